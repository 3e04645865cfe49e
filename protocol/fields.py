"""Strict msgpack reading: bounded unpacking and one validator per field shape.

Invariants:
- `unpack_strict` checks the size before parsing and caps every string, binary and array
  length, so no input can make us allocate past the limits; maps and ext types are refused.
- Every validator returns its value unchanged or raises `RemoteProtocolError`; nothing else
  escapes, so the codec and the envelope reader turn any peer input into that one error.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

from protocol.errors import RemoteProtocolError
from protocol.identity import NODE_ID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from protocol.task_messages import MAX_INLINE_PAYLOAD
from protocol.wire import (
    MAX_ADDR_CHARS,
    MAX_EVENT_PAYLOAD,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_UINT,
)


def unpack_strict(data: bytes, limit: int) -> Any:
    """Unpack msgpack `data` of at most `limit` bytes with every length capped.

    Raises:
        RemoteProtocolError: oversize or malformed.
    """
    size = len(data)
    if size > limit:
        raise RemoteProtocolError(f"{size} bytes exceeds the limit of {limit}")
    # msgpack reserves room for a container as soon as it reads the claimed length; every
    # element takes at least one byte, so no honest claim exceeds the input size.
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
