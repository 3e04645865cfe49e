"""Wire format: a versioned msgpack envelope carrying one or more messages.

Theory of operation
- An envelope is the msgpack array ``[version, sender_id, sender_addr, [msg, ...]]`` where each
  ``msg`` is itself a msgpack-encoded byte string ``[kind, field, ...]``. Messages are encoded
  once and carried as opaque bytes, so a broadcast queued at a peer is encoded exactly once no
  matter how many envelopes it rides in (memberlist's compound message).
- Message kinds are an append-only IntEnum: the numbers are part of the protocol. Never reuse or
  renumber one; add new kinds at the end.
- Decoding is strict: size is checked before parsing, msgpack limits cap every string, binary
  and array length (so no input can make us allocate past them), maps and ext types are
  refused, and every message must have exactly its kind's shape. Any violation raises
  `RemoteProtocolError`; nothing else escapes `decode_envelope` or `decode_message`.
- Signatures are not checked here (that needs the network id and the cache); see `node.py`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from protocol.errors import RemoteProtocolError
from protocol.identity import NODE_ID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES

PROTOCOL_VERSION = 1

MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
"""Largest envelope accepted: a push-pull of about 20,000 members fits."""
MAX_MESSAGE_BYTES = MAX_ENVELOPE_BYTES
MAX_MESSAGES = 100_000
"""Most messages in one envelope, and most entries in one push-pull."""
MAX_ADDR_CHARS = 262
"""An address is host:port; 253 for a DNS name plus brackets, colon and port."""
MAX_NAME_CHARS = 128
MAX_EVENT_PAYLOAD = 8 * 1024
"""Largest user event payload (Serf allows 512 bytes by default, 9 KiB at most)."""
MAX_ROLES = 64
MAX_UINT = 2**63 - 1


class Kind(IntEnum):
    """Message kinds. Append-only: the numbers are part of the protocol."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    ALIVE = 5
    SUSPECT = 6
    DEAD = 7
    PUSH_PULL = 8
    USER_EVENT = 9
    PEER_STATE = 10


class Status(IntEnum):
    """Member status as carried in push-pull. Append-only."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe of `target`; answered with `Ack(seq)`."""

    seq: int
    target: bytes


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to probe `target` at `target_addr` and relay the ack (or a nack)."""

    seq: int
    target: bytes
    target_addr: str


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a ping with the same `seq`."""

    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """An indirect prober reached no one: tells the requester its own path may be fine."""

    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    """A member's signed statement: "I am at `addr` with `incarnation`"."""

    public_key: bytes
    addr: str
    incarnation: int
    sig: bytes
    node_id: bytes  # sha256(public_key); derived on decode, never sent

    def signed_payload(self) -> bytes:
        """The payload the signature covers (see `identity.signing_input`)."""
        return alive_payload(self.public_key, self.addr, self.incarnation)


@dataclass(frozen=True, slots=True)
class Suspect:
    """`accuser` suspects `node_id` at `incarnation` of having failed."""

    node_id: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """`accuser` declares `node_id` dead at `incarnation`; accuser == node_id means it left."""

    node_id: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True, slots=True)
class MemberEntry:
    """One member of a push-pull state exchange."""

    alive: Alive
    status: Status
    incarnation: int


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full membership state. `reply` is False on the request, True on the answer; `join`
    marks a request from a peer that is joining through us."""

    join: bool
    reply: bool
    members: tuple[MemberEntry, ...]
    states: tuple[PeerState, ...]


@dataclass(frozen=True, slots=True)
class UserEvent:
    """An application broadcast; (`origin`, `ltime`) identifies it network-wide."""

    origin: bytes
    ltime: int
    name: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class PeerState:
    """A peer's small, bounded advertisement: what it can run and how busy it is. `version`
    orders updates from the same peer; the greatest wins."""

    node_id: bytes
    version: int
    roles: tuple[str, ...]
    free_slots: int
    queue_len: int
    load: float


Message = (
    Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | PushPull | UserEvent | PeerState
)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One unit of transfer between two peers."""

    sender: bytes
    sender_addr: str
    messages: tuple[bytes, ...]


def alive_payload(public_key: bytes, addr: str, incarnation: int) -> bytes:
    """Canonical bytes an alive record's signature covers."""
    return bytes(msgpack.packb([public_key, addr, incarnation]))


# Encoding.


def encode_envelope(sender: bytes, sender_addr: str, messages: list[bytes]) -> bytes:
    """Encode an envelope around already-encoded messages."""
    return bytes(msgpack.packb([PROTOCOL_VERSION, sender, sender_addr, messages]))


def encode_message(msg: Message) -> bytes:
    """Encode one message to its wire bytes."""
    return bytes(msgpack.packb(_to_fields(msg)))


def _alive_fields(a: Alive) -> list[Any]:
    return [a.public_key, a.addr, a.incarnation, a.sig]


def _state_fields(s: PeerState) -> list[Any]:
    return [s.node_id, s.version, list(s.roles), s.free_slots, s.queue_len, float(s.load)]


def _to_fields(msg: Message) -> list[Any]:
    match msg:
        case Ping(seq, target):
            return [Kind.PING, seq, target]
        case IndirectPing(seq, target, target_addr):
            return [Kind.INDIRECT_PING, seq, target, target_addr]
        case Ack(seq):
            return [Kind.ACK, seq]
        case Nack(seq):
            return [Kind.NACK, seq]
        case Alive():
            return [Kind.ALIVE, *_alive_fields(msg)]
        case Suspect(node_id, incarnation, accuser):
            return [Kind.SUSPECT, node_id, incarnation, accuser]
        case Dead(node_id, incarnation, accuser):
            return [Kind.DEAD, node_id, incarnation, accuser]
        case PushPull(join, reply, members, states):
            rows = [[*_alive_fields(m.alive), int(m.status), m.incarnation] for m in members]
            return [Kind.PUSH_PULL, join, reply, rows, [_state_fields(s) for s in states]]
        case UserEvent(origin, ltime, name, payload):
            return [Kind.USER_EVENT, origin, ltime, name, payload]
        case PeerState():
            return [Kind.PEER_STATE, *_state_fields(msg)]
    raise TypeError(f"not a wire message: {msg!r}")  # pragma: no cover - typing guards this


# Decoding.


def _unpack(data: bytes, limit: int) -> Any:
    if len(data) > limit:
        raise RemoteProtocolError(f"{len(data)} bytes exceeds the limit of {limit}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_EVENT_PAYLOAD,
            max_bin_len=min(limit, MAX_MESSAGE_BYTES),
            max_array_len=MAX_MESSAGES,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on bad input; all mean the same
        raise RemoteProtocolError(f"malformed msgpack: {type(exc).__name__}") from None


def decode_envelope(data: bytes) -> Envelope:
    """Decode an envelope; its messages stay encoded until `decode_message`.

    Raises:
        RemoteProtocolError: oversize, malformed, wrong version or wrong shape.
    """
    obj = _unpack(data, MAX_ENVELOPE_BYTES)
    if not isinstance(obj, list) or len(obj) != 4:
        raise RemoteProtocolError("envelope is not a 4-element array")
    version, sender, addr, messages = obj
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise RemoteProtocolError(f"unsupported protocol version {version!r}")
    _node_id(sender)
    _addr(addr)
    if not isinstance(messages, list) or not all(type(m) is bytes for m in messages):
        raise RemoteProtocolError("envelope messages must be an array of bytes")
    return Envelope(sender, addr, tuple(messages))


def decode_message(data: bytes) -> Message:
    """Decode one message.

    Raises:
        RemoteProtocolError: malformed, unknown kind or wrong shape.
    """
    fields = _unpack(data, MAX_MESSAGE_BYTES)
    if not isinstance(fields, list) or not fields or type(fields[0]) is not int:
        raise RemoteProtocolError("message is not an array starting with its kind")
    try:
        kind = Kind(fields[0])
    except ValueError:
        raise RemoteProtocolError(f"unknown message kind {fields[0]}") from None
    shape = _ARITY[kind]
    if len(fields) != shape:
        raise RemoteProtocolError(f"{kind.name} has {len(fields)} fields, expected {shape}")
    f = fields
    match kind:
        case Kind.PING:
            return Ping(_uint(f[1]), _node_id(f[2]))
        case Kind.INDIRECT_PING:
            return IndirectPing(_uint(f[1]), _node_id(f[2]), _addr(f[3]))
        case Kind.ACK:
            return Ack(_uint(f[1]))
        case Kind.NACK:
            return Nack(_uint(f[1]))
        case Kind.ALIVE:
            return _alive(f[1:])
        case Kind.SUSPECT:
            return Suspect(_node_id(f[1]), _uint(f[2]), _node_id(f[3]))
        case Kind.DEAD:
            return Dead(_node_id(f[1]), _uint(f[2]), _node_id(f[3]))
        case Kind.PUSH_PULL:
            return _push_pull(f)
        case Kind.USER_EVENT:
            return UserEvent(_node_id(f[1]), _uint(f[2]), _name(f[3]), _payload(f[4]))
        case Kind.PEER_STATE:
            return _peer_state(f[1:])


_ARITY = {
    Kind.PING: 3,
    Kind.INDIRECT_PING: 4,
    Kind.ACK: 2,
    Kind.NACK: 2,
    Kind.ALIVE: 5,
    Kind.SUSPECT: 4,
    Kind.DEAD: 4,
    Kind.PUSH_PULL: 5,
    Kind.USER_EVENT: 5,
    Kind.PEER_STATE: 7,
}


def _alive(f: list[Any]) -> Alive:
    if len(f) != 4:
        raise RemoteProtocolError("alive record has the wrong number of fields")
    public_key, addr, incarnation, sig = f
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_BYTES:
        raise RemoteProtocolError("alive record public key must be 32 bytes")
    if type(sig) is not bytes or len(sig) != SIGNATURE_BYTES:
        raise RemoteProtocolError("alive record signature must be 64 bytes")
    return Alive(
        public_key, _addr(addr), _uint(incarnation), sig, hashlib.sha256(public_key).digest()
    )


def _push_pull(f: list[Any]) -> PushPull:
    join, reply, rows, states = f[1], f[2], f[3], f[4]
    if type(join) is not bool or type(reply) is not bool:
        raise RemoteProtocolError("push-pull flags must be booleans")
    if not isinstance(rows, list) or not isinstance(states, list):
        raise RemoteProtocolError("push-pull members and states must be arrays")
    members = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 6:
            raise RemoteProtocolError("push-pull member row must have 6 fields")
        try:
            status = Status(row[4])
        except ValueError:
            raise RemoteProtocolError(f"unknown member status {row[4]!r}") from None
        members.append(MemberEntry(_alive(row[:4]), status, _uint(row[5])))
    return PushPull(join, reply, tuple(members), tuple(_peer_state(s) for s in states))


def _peer_state(f: Any) -> PeerState:
    if not isinstance(f, list) or len(f) != 6:
        raise RemoteProtocolError("peer state must have 6 fields")
    node_id, version, roles, free_slots, queue_len, load = f
    if not isinstance(roles, list) or len(roles) > MAX_ROLES:
        raise RemoteProtocolError(f"peer state roles must be an array of at most {MAX_ROLES}")
    if type(load) is not float or not 0.0 <= load <= 1e9:
        raise RemoteProtocolError("peer state load must be a finite non-negative float")
    return PeerState(
        _node_id(node_id),
        _uint(version),
        tuple(_name(r) for r in roles),
        _uint(free_slots),
        _uint(queue_len),
        load,
    )


def _uint(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_UINT:
        raise RemoteProtocolError(f"expected an unsigned integer, got {type(v).__name__}")
    return v


def _node_id(v: Any) -> bytes:
    if type(v) is not bytes or len(v) != NODE_ID_BYTES:
        raise RemoteProtocolError("a node id must be 32 bytes")
    return v


def _addr(v: Any) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_ADDR_CHARS:
        raise RemoteProtocolError(f"an address must be a string of 1..{MAX_ADDR_CHARS} chars")
    return v


def _name(v: Any) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_NAME_CHARS:
        raise RemoteProtocolError(f"a name must be a string of 1..{MAX_NAME_CHARS} chars")
    return v


def _payload(v: Any) -> bytes:
    if type(v) is not bytes or len(v) > MAX_EVENT_PAYLOAD:
        raise RemoteProtocolError(f"an event payload must be at most {MAX_EVENT_PAYLOAD} bytes")
    return v
