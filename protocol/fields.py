"""Strict msgpack reading: bounded unpacking and one validator per field shape.

Invariants:
- `unpack_strict` checks the size before parsing, then walks the input's structure without
  building anything (`check_shape`) before msgpack builds it: nesting deeper than `MAX_DEPTH`,
  maps, ext types, and arrays claiming more elements than there are bytes left to hold them
  are refused. msgpack reserves a list's slots as soon as it reads the claimed length, so
  without the walk nested claims multiply (a 5,000-byte input reserved ~38 MiB); with it, what
  unpacking allocates is at most `ALLOCATION_FACTOR` times the input size.
- Every validator returns its value unchanged or raises `RemoteProtocolError`; nothing else
  escapes, so the codec and the envelope reader turn any peer input into that one error.
- `uint` accepts exactly the integers `protocol.wire.MAX_UINT` allows, and the encoders check
  their integers against the same bound (`encodable`), so what one peer encodes the others
  decode.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.identity import NODE_ID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from protocol.tasks.messages import MAX_INLINE_PAYLOAD
from protocol.wire import (
    MAX_ADDR_CHARS,
    MAX_EVENT_PAYLOAD,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_UINT,
)

MAX_DEPTH = 16
"""Deepest nesting of arrays accepted. The deepest message is a push-pull's role list, at
depth 4 (message, states, state, roles); the rest is headroom for new kinds."""
ALLOCATION_FACTOR = 128
"""Bound on what unpacking allocates per input byte once `check_shape` passed. Python's own
overhead sets it: one byte (an empty array) becomes a list object of about 80 bytes."""


def unpack_strict(data: bytes, limit: int) -> Any:
    """Unpack msgpack `data` of at most `limit` bytes with every length capped.

    Raises:
        RemoteProtocolError: oversize or malformed.
    """
    size = len(data)
    if size > limit:
        raise RemoteProtocolError(f"{size} bytes exceeds the limit of {limit}")
    check_shape(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=min(MAX_EVENT_PAYLOAD, size),
            max_bin_len=min(limit, MAX_MESSAGE_BYTES, size),
            max_array_len=min(MAX_MESSAGES, size),
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on bad input; all mean the same
        raise RemoteProtocolError(f"malformed msgpack: {type(exc).__name__}") from None


# How `check_shape` reads each first byte (the msgpack specification's format table):
# the size of a token whose size the first byte fixes, else 0.
_FIXED_SIZE = bytearray(256)
for _b in [*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3]:
    _FIXED_SIZE[_b] = 1  # fixints, nil, booleans
for _b in range(0xA0, 0xC0):
    _FIXED_SIZE[_b] = 1 + (_b & 0x1F)  # fixstr
for _b, _size in {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}.items():
    _FIXED_SIZE[_b] = _size  # floats and unsigned integers
for _b, _size in {0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}.items():
    _FIXED_SIZE[_b] = _size  # signed integers
_LONG_ARRAY_FIRST_BYTES = bytes([0xDC, 0xDD])
_ARRAY_FIRST_BYTES = bytes(range(0x90, 0xA0)) + _LONG_ARRAY_FIRST_BYTES
_LENGTH = {
    # first byte: (is an array, struct reading the length that follows)
    0xC4: (False, struct.Struct(">B")),  # bin8
    0xC5: (False, struct.Struct(">H")),  # bin16
    0xC6: (False, struct.Struct(">I")),  # bin32
    0xD9: (False, struct.Struct(">B")),  # str8
    0xDA: (False, struct.Struct(">H")),  # str16
    0xDB: (False, struct.Struct(">I")),  # str32
    0xDC: (True, struct.Struct(">H")),  # array16
    0xDD: (True, struct.Struct(">I")),  # array32
}


def check_shape(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Walk msgpack `data` without building it; refuse what could make unpacking allocate
    more than `ALLOCATION_FACTOR` bytes per input byte.

    Every element of an array takes at least one byte, so at any point the elements still
    owed by the open arrays can be no more than the bytes left: a claim beyond that is a lie,
    refused before msgpack reserves room for it.

    Raises:
        RemoteProtocolError: nesting deeper than `max_depth`, a map or ext type, an array
            claiming more elements than the bytes left can hold, truncated or trailing data.
    """
    size = len(data)
    arrays = size - len(data.translate(None, _ARRAY_FIRST_BYTES))
    if arrays <= max_depth and size - len(data.translate(None, _LONG_ARRAY_FIRST_BYTES)) <= 2:
        # Counting bytes that could start an array overcounts (they also occur inside
        # strings and binaries) but never misses one. At most `max_depth` arrays, of which at
        # most two claim more than 15 elements (and no more than `size`, msgpack's own cap):
        # nesting and reserved slots are within bounds without the walk, which most small
        # messages skip this way (the walk is pure Python; counting is not).
        return
    pos = 0
    fixed, lengths = _FIXED_SIZE, _LENGTH
    parents: list[int] = []  # elements still to read in each enclosing array
    left = 1  # elements still to read in the current array (at first, the root value)
    owed = 1  # elements still to read in all open arrays: left + sum(parents)
    try:
        while True:
            if not left:
                if not parents:
                    break
                left = parents.pop()
                continue
            left -= 1
            owed -= 1
            first = data[pos]
            step = fixed[first]
            if step:
                pos += step
                continue
            if 0x90 <= first <= 0x9F:
                is_array, length, pos = True, first & 0x0F, pos + 1
            elif first in lengths:
                is_array, reader = lengths[first]
                length = reader.unpack_from(data, pos + 1)[0]
                pos += 1 + reader.size
            else:
                raise RemoteProtocolError(f"msgpack type 0x{first:02x} is not accepted")
            if not is_array:
                pos += length
                continue
            if len(parents) >= max_depth:
                raise RemoteProtocolError(f"arrays nested deeper than {max_depth}")
            owed += length
            if owed > size - pos:
                raise RemoteProtocolError("an array claims more elements than the input holds")
            parents.append(left)
            left = length
    except (IndexError, struct.error):
        raise RemoteProtocolError("truncated msgpack") from None
    if pos != size:
        raise RemoteProtocolError("truncated msgpack" if pos > size else "trailing bytes")


def array(v: Any) -> list[Any]:
    """An array of any elements."""
    if not isinstance(v, list):
        raise RemoteProtocolError("expected an array")
    return v


def public_key(v: Any) -> bytes:
    """An Ed25519 public key."""
    if type(v) is not bytes or len(v) != PUBLIC_KEY_BYTES:
        raise RemoteProtocolError("a public key must be 32 bytes")
    return v


def signature(v: Any) -> bytes:
    """An Ed25519 signature."""
    if type(v) is not bytes or len(v) != SIGNATURE_BYTES:
        raise RemoteProtocolError("a signature must be 64 bytes")
    return v


def key_hash(key: bytes) -> bytes:
    """The node id a public key names (never sent; derived on decode)."""
    return hashlib.sha256(key).digest()


KNOWN_SIGNERS = 4096
"""Public keys `signer` remembers with their node ids: a network's members, many times over."""
_signers: dict[bytes, tuple[bytes, bytes]] = {}


def signer(v: Any) -> tuple[bytes, bytes]:
    """A signed object's public key and the node id it names, both the very objects every
    other decode of that key returned (while it is remembered).

    Raises:
        RemoteProtocolError: not a 32-byte key.
    """
    # A peer holds thousands of signed objects by a few hundred members, each with its own
    # copy of its author's key and node id (about 360 bytes per held task), and derived that
    # id with a sha256 per decode. Remembering the ids by key shares the copies and skips the
    # hash. It is a memo of a pure function, so nothing decided depends on it; a flood of
    # strangers' keys only empties it (`KNOWN_SIGNERS`).
    known = _signers.get(v) if type(v) is bytes else None
    if known is not None:
        return known
    key = public_key(v)
    if len(_signers) >= KNOWN_SIGNERS:
        _signers.clear()
    known = _signers[key] = (key, key_hash(key))
    return known


def inline_payload(v: Any) -> bytes:
    """A task input or result output carried inline."""
    if type(v) is not bytes or len(v) > MAX_INLINE_PAYLOAD:
        raise RemoteProtocolError(f"an inline payload must be at most {MAX_INLINE_PAYLOAD} bytes")
    return v


def reason(v: Any) -> str:
    """A short free-text reason, possibly empty."""
    if type(v) is not str or len(v) > MAX_NAME_CHARS:
        raise RemoteProtocolError(f"a reason must be a string of at most {MAX_NAME_CHARS} chars")
    return v


def uint(v: Any) -> int:
    """An unsigned integer that fits in 63 bits."""
    if type(v) is not int or not 0 <= v <= MAX_UINT:
        raise RemoteProtocolError(f"expected an unsigned integer, got {type(v).__name__}")
    return v


def encodable(v: int) -> int:
    """An unsigned integer this peer is about to encode: exactly what `uint` accepts.

    Raises:
        LocalProtocolError: negative or above `MAX_UINT` (a bug here, not a peer's fault).
    """
    if not 0 <= v <= MAX_UINT:
        raise LocalProtocolError(f"{v} is outside the wire's unsigned range 0..{MAX_UINT}")
    return v


def node_id(v: Any) -> bytes:
    """A node or task id (a sha256 digest)."""
    if type(v) is not bytes or len(v) != NODE_ID_BYTES:
        raise RemoteProtocolError("a node id must be 32 bytes")
    return v


def addr(v: Any) -> str:
    """A host:port address."""
    if type(v) is not str or not 0 < len(v) <= MAX_ADDR_CHARS:
        raise RemoteProtocolError(f"an address must be a string of 1..{MAX_ADDR_CHARS} chars")
    return v


def name(v: Any) -> str:
    """A non-empty name: a role, an event name, an outcome."""
    if type(v) is not str or not 0 < len(v) <= MAX_NAME_CHARS:
        raise RemoteProtocolError(f"a name must be a string of 1..{MAX_NAME_CHARS} chars")
    return v


def event_payload(v: Any) -> bytes:
    """A user event's payload."""
    if type(v) is not bytes or len(v) > MAX_EVENT_PAYLOAD:
        raise RemoteProtocolError(f"an event payload must be at most {MAX_EVENT_PAYLOAD} bytes")
    return v
