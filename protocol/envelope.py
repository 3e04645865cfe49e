"""Envelopes: the versioned unit of transfer carrying one or more encoded messages.

Invariants:
- An envelope is the msgpack array ``[version, sender_id, sender_addr, [msg, ...]]`` where
  each ``msg`` is the bytes `protocol.codec.encode_message` made. Messages are encoded once and
  carried as opaque bytes, so a broadcast queued at a peer is encoded exactly once no matter
  how many envelopes it rides in (memberlist's compound message).
- Decoding checks the size before parsing and the envelope's shape; its messages stay encoded
  until `decode_message`. Any violation raises `RemoteProtocolError`; nothing else escapes.
  Decoding the very same `bytes` object again returns the envelope decoded last, unchanged.
- Merging keeps every message and its order; it only regroups them.
- `peek_sender` reads only an envelope's head, for hosts that note who sent what before the
  node decodes it; it never raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from protocol import fields
from protocol.errors import RemoteProtocolError
from protocol.identity import NODE_ID_BYTES
from protocol.wire import MAX_ENVELOPE_BYTES

PROTOCOL_VERSION = 1

MERGED_ENVELOPE_BYTES = 1024 * 1024
"""Largest envelope `merge_envelopes` makes: big enough to batch a busy second's direct sends,
small enough that one request never holds a peer's loop for long."""
_BIN_HEADER = 5
"""Most bytes msgpack spends on the length of one encoded message inside an envelope."""
HEAD_BYTES = 64
"""Bytes of an envelope that hold its array header, version and sender id (1 + 1 + 34, with
room for a multi-byte version)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One unit of transfer between two peers."""

    sender: bytes
    sender_addr: str
    messages: tuple[bytes, ...]


def encode_envelope(sender: bytes, sender_addr: str, messages: list[bytes]) -> bytes:
    """Encode an envelope around already-encoded messages."""
    return bytes(msgpack.packb([PROTOCOL_VERSION, sender, sender_addr, messages]))


def peek_sender(data: bytes) -> bytes | None:
    """The sender id an encoded envelope names, read from its first `HEAD_BYTES` only (under
    a microsecond whatever its size); None if that head is not an envelope's. The sender is
    as claimed: nothing is checked beyond its shape."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(data[:HEAD_BYTES])
    try:
        if unpacker.read_array_header() != 4 or unpacker.unpack() != PROTOCOL_VERSION:
            return None
        sender = unpacker.unpack()
    except (msgpack.OutOfData, msgpack.UnpackException, ValueError):
        return None
    return sender if type(sender) is bytes and len(sender) == NODE_ID_BYTES else None


_last_decoded: tuple[bytes, Envelope] | None = None
"""The last envelope decoded, with the bytes object it came from: a host decodes the same
received object up to three times (its lane's classifier, its slicer, the node), and a
decode costs about 10 microseconds. Only an immutable `bytes` object is kept, compared by
identity (the reference held here keeps it alive, so its identity cannot be reused)."""


def decode_envelope(data: bytes) -> Envelope:
    """Decode an envelope; its messages stay encoded until `decode_message`.

    Raises:
        RemoteProtocolError: oversize, malformed, wrong version or wrong shape.
    """
    global _last_decoded
    last = _last_decoded
    if last is not None and last[0] is data:
        return last[1]
    envelope = _decode_envelope(data)
    if type(data) is bytes:
        _last_decoded = (data, envelope)
    return envelope


def _decode_envelope(data: bytes) -> Envelope:
    obj = fields.unpack_strict(data, MAX_ENVELOPE_BYTES)
    if not isinstance(obj, list) or len(obj) != 4:
        raise RemoteProtocolError("envelope is not a 4-element array")
    version, sender, addr, messages = obj
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise RemoteProtocolError(f"unsupported protocol version {version!r}")
    fields.node_id(sender)
    fields.addr(addr)
    if not isinstance(messages, list) or not all(type(m) is bytes for m in messages):
        raise RemoteProtocolError("envelope messages must be an array of bytes")
    return Envelope(sender, addr, tuple(messages))


def merge_envelopes(envelopes: list[bytes], limit: int = MERGED_ENVELOPE_BYTES) -> list[bytes]:
    """Merge envelopes bound for one peer into as few as possible, messages in order.

    Consecutive envelopes from the same sender are joined while the result stays within
    `limit` bytes; an envelope that does not decode, or is larger alone, passes unchanged.
    """
    out: list[bytes] = []
    head: tuple[bytes, str] | None = None
    messages: list[bytes] = []
    size = 0

    def flush() -> None:
        if head is not None and messages:
            out.append(encode_envelope(head[0], head[1], messages))

    for data in envelopes:
        try:
            env = decode_envelope(data)
        except RemoteProtocolError:
            env = None
        if env is None or len(data) > limit:
            flush()
            head, messages, size = None, [], 0
            out.append(data)
            continue
        added = sum(len(m) + _BIN_HEADER for m in env.messages)
        if head != (env.sender, env.sender_addr) or size + added > limit:
            flush()
            head, messages, size = (env.sender, env.sender_addr), [], len(data)
        else:
            size += added
        messages.extend(env.messages)
    flush()
    return out
