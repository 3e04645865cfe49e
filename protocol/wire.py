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
from protocol.task_messages import MAX_INLINE_PAYLOAD as MAX_INLINE_PAYLOAD
from protocol.task_messages import MAX_NONCE as MAX_NONCE
from protocol.task_messages import Cancel as Cancel
from protocol.task_messages import Claim as Claim
from protocol.task_messages import Execution as Execution
from protocol.task_messages import Result as Result
from protocol.task_messages import TaskAsk as TaskAsk
from protocol.task_messages import TaskDigests as TaskDigests
from protocol.task_messages import TaskGrant as TaskGrant
from protocol.task_messages import TaskHeld as TaskHeld
from protocol.task_messages import TaskRecord as TaskRecord
from protocol.task_messages import TaskWant as TaskWant
from protocol.task_messages import task_id_of as task_id_of

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
MERGED_ENVELOPE_BYTES = 1024 * 1024
"""Largest envelope `merge_envelopes` makes: big enough to batch a busy second's direct sends,
small enough that one request never holds a peer's loop for long."""
_BIN_HEADER = 5
"""Most bytes msgpack spends on the length of one encoded message inside an envelope."""


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
    TASK = 11
    CLAIM = 12
    RESULT = 13
    CANCEL = 14
    EXECUTION = 15
    TASK_HELD = 16
    TASK_DIGESTS = 17
    TASK_WANT = 18
    TASK_ASK = 19
    TASK_GRANT = 20


class Status(IntEnum):
    """Member status as carried in push-pull. Append-only."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe of `target`; answered with `Ack(seq)`. `seen` is the incarnation the prober
    knows of the target: a target past it answers with its current alive record too, so a
    prober holding a stale suspicion learns the refutation it missed."""

    seq: int
    target: bytes
    seen: int = 0


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to probe `target` at `target_addr` and relay the ack (or a nack)."""

    seq: int
    target: bytes
    target_addr: str
    seen: int = 0


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
    marks a request from a peer joining through us, and is echoed on the answer."""

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
    Ping
    | IndirectPing
    | Ack
    | Nack
    | Alive
    | Suspect
    | Dead
    | PushPull
    | UserEvent
    | PeerState
    | TaskRecord
    | Claim
    | Result
    | Cancel
    | Execution
    | TaskHeld
    | TaskDigests
    | TaskWant
    | TaskAsk
    | TaskGrant
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


def encode_message(msg: Message) -> bytes:
    """Encode one message to its wire bytes."""
    return bytes(msgpack.packb(_to_fields(msg)))


def _alive_fields(a: Alive) -> list[Any]:
    return [a.public_key, a.addr, a.incarnation, a.sig]


def _state_fields(s: PeerState) -> list[Any]:
    return [s.node_id, s.version, list(s.roles), s.free_slots, s.queue_len, float(s.load)]


def _task_fields(t: TaskRecord) -> list[Any]:
    return [
        Kind.TASK,
        t.origin_key,
        float(t.created),
        t.role,
        t.input,
        t.priority,
        t.parent,
        t.idempotency_key,
        t.nonce,
        float(t.timeout),
        t.sig,
    ]


def _to_fields(msg: Message) -> list[Any]:
    match msg:
        case Ping(seq, target, seen):
            return [Kind.PING, seq, target, seen]
        case IndirectPing(seq, target, target_addr, seen):
            return [Kind.INDIRECT_PING, seq, target, target_addr, seen]
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
        case TaskRecord():
            return _task_fields(msg)
        case Claim(task_id, owner_key, incarnation, epoch, sig):
            return [Kind.CLAIM, task_id, owner_key, incarnation, epoch, sig]
        case Result(task_id, epoch, owner_key, outcome, output, usage, sig):
            return [Kind.RESULT, task_id, epoch, owner_key, outcome, output, list(usage), sig]
        case Cancel(task_id, by_key, reason, sig):
            return [Kind.CANCEL, task_id, by_key, reason, sig]
        case Execution(task_id, epoch, owner_key, phase, outcome, sig):
            return [Kind.EXECUTION, task_id, epoch, owner_key, phase, outcome, sig]
        case TaskHeld(task_id):
            return [Kind.TASK_HELD, task_id]
        case TaskDigests(entries):
            return [Kind.TASK_DIGESTS, [list(e) for e in entries]]
        case TaskWant(ids):
            return [Kind.TASK_WANT, list(ids)]
        case TaskAsk(task_id, epoch):
            return [Kind.TASK_ASK, task_id, epoch]
        case TaskGrant(task_id, epoch, grantee):
            return [Kind.TASK_GRANT, task_id, epoch, grantee]
    raise TypeError(f"not a wire message: {msg!r}")  # pragma: no cover - typing guards this


# Decoding.


def _unpack(data: bytes, limit: int) -> Any:
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
            return Ping(_uint(f[1]), _node_id(f[2]), _uint(f[3]))
        case Kind.INDIRECT_PING:
            return IndirectPing(_uint(f[1]), _node_id(f[2]), _addr(f[3]), _uint(f[4]))
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
        case Kind.TASK:
            return _task(f)
        case Kind.CLAIM:
            key = _key(f[2])
            return Claim(_node_id(f[1]), key, _uint(f[3]), _uint(f[4]), _sig(f[5]), _hash(key))
        case Kind.RESULT:
            key = _key(f[3])
            usage = f[6]
            if not isinstance(usage, list) or len(usage) != 3:
                raise RemoteProtocolError("result usage must be 3 unsigned integers")
            return Result(
                _node_id(f[1]),
                _uint(f[2]),
                key,
                _name(f[4]),
                _inline(f[5]),
                (_uint(usage[0]), _uint(usage[1]), _uint(usage[2])),
                _sig(f[7]),
                _hash(key),
            )
        case Kind.CANCEL:
            key = _key(f[2])
            return Cancel(_node_id(f[1]), key, _text(f[3]), _sig(f[4]), _hash(key))
        case Kind.EXECUTION:
            key = _key(f[3])
            phase = _uint(f[4])
            if phase > 1:
                raise RemoteProtocolError("execution phase must be 0 (start) or 1 (end)")
            return Execution(
                _node_id(f[1]), _uint(f[2]), key, phase, _name(f[5]), _sig(f[6]), _hash(key)
            )
        case Kind.TASK_HELD:
            return TaskHeld(_node_id(f[1]))
        case Kind.TASK_DIGESTS:
            return TaskDigests(tuple(_digest_entry(e) for e in _array(f[1])))
        case Kind.TASK_WANT:
            return TaskWant(tuple(_node_id(t) for t in _array(f[1])))
        case Kind.TASK_ASK:
            return TaskAsk(_node_id(f[1]), _uint(f[2]))
        case Kind.TASK_GRANT:
            return TaskGrant(_node_id(f[1]), _uint(f[2]), _node_id(f[3]))


_ARITY = {
    Kind.PING: 4,
    Kind.INDIRECT_PING: 5,
    Kind.ACK: 2,
    Kind.NACK: 2,
    Kind.ALIVE: 5,
    Kind.SUSPECT: 4,
    Kind.DEAD: 4,
    Kind.PUSH_PULL: 5,
    Kind.USER_EVENT: 5,
    Kind.PEER_STATE: 7,
    Kind.TASK: 11,
    Kind.CLAIM: 6,
    Kind.RESULT: 8,
    Kind.CANCEL: 5,
    Kind.EXECUTION: 7,
    Kind.TASK_HELD: 2,
    Kind.TASK_DIGESTS: 2,
    Kind.TASK_WANT: 2,
    Kind.TASK_ASK: 3,
    Kind.TASK_GRANT: 4,
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
        if type(row[4]) is not int or not 0 <= row[4] < len(Status):
            raise RemoteProtocolError(f"unknown member status {row[4]!r}")
        status = Status(row[4])
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


def _task(f: list[Any]) -> TaskRecord:
    key = _key(f[1])
    created, timeout = f[2], f[9]
    if type(created) is not float or type(timeout) is not float or not 0.0 <= timeout <= 1e9:
        raise RemoteProtocolError("task created and timeout must be non-negative floats")
    role, data, priority, parent = _name(f[3]), _inline(f[4]), _uint(f[5]), f[6]
    if type(parent) is not bytes or len(parent) not in (0, NODE_ID_BYTES):
        raise RemoteProtocolError("task parent must be a task id or empty")
    idem, nonce = f[7], f[8]
    if type(idem) is not str or len(idem) > MAX_NAME_CHARS:
        raise RemoteProtocolError(f"idempotency key must be at most {MAX_NAME_CHARS} chars")
    if type(nonce) is not bytes or len(nonce) > MAX_NONCE:
        raise RemoteProtocolError(f"task nonce must be at most {MAX_NONCE} bytes")
    origin = _hash(key)
    task_id = task_id_of(
        origin, idem, nonce, role, hashlib.sha256(data).digest(), priority, parent, timeout
    )
    return TaskRecord(
        key,
        created,
        role,
        data,
        priority,
        parent,
        idem,
        nonce,
        timeout,
        _sig(f[10]),
        task_id,
        origin,
    )


def _array(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise RemoteProtocolError("expected an array")
    return v


def _digest_entry(v: Any) -> tuple[bytes, bytes]:
    if not isinstance(v, list) or len(v) != 2 or type(v[1]) is not bytes or len(v[1]) != 8:
        raise RemoteProtocolError("a task digest entry is [task id, 8-byte digest]")
    return (_node_id(v[0]), v[1])


def _key(v: Any) -> bytes:
    if type(v) is not bytes or len(v) != PUBLIC_KEY_BYTES:
        raise RemoteProtocolError("a public key must be 32 bytes")
    return v


def _sig(v: Any) -> bytes:
    if type(v) is not bytes or len(v) != SIGNATURE_BYTES:
        raise RemoteProtocolError("a signature must be 64 bytes")
    return v


def _hash(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _inline(v: Any) -> bytes:
    if type(v) is not bytes or len(v) > MAX_INLINE_PAYLOAD:
        raise RemoteProtocolError(f"an inline payload must be at most {MAX_INLINE_PAYLOAD} bytes")
    return v


def _text(v: Any) -> str:
    if type(v) is not str or len(v) > MAX_NAME_CHARS:
        raise RemoteProtocolError(f"a reason must be a string of at most {MAX_NAME_CHARS} chars")
    return v


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
