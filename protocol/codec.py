"""Message codec: one wire message to and from its msgpack bytes.

Invariants:
- A message is the msgpack array ``[kind, field, ...]``; its shape is fixed by its `Kind`
  (see `ARITY`), and the kind numbers are append-only (see `protocol.wire`).
- Decoding is strict: every field is checked by `protocol.fields`, derived fields (node ids,
  task ids) are computed here and never trusted from the sender, and any violation raises
  `RemoteProtocolError`; nothing else escapes `decode_message`.
- Signatures are not checked here (that needs the network id and the cache); see `node.py`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, assert_never

import msgpack

from protocol import fields
from protocol.errors import RemoteProtocolError
from protocol.identity import NODE_ID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from protocol.tasks import inventory
from protocol.tasks.messages import (
    CANCEL_OUTCOMES,
    MAX_CHECKPOINTS,
    MAX_NONCE,
    MAX_PAGE,
    SHARDS,
    Cancel,
    Checkpoint,
    Claim,
    EpochGrant,
    Result,
    TaskAsk,
    TaskGrant,
    TaskHave,
    TaskHeld,
    TaskList,
    TaskPage,
    TaskRead,
    TaskRecord,
    TaskShards,
    TaskSummary,
    TaskWant,
    is_traceparent,
    task_id_of,
)
from protocol.wire import (
    MAX_MESSAGE_BYTES,
    MAX_NAME_CHARS,
    MAX_ROLES,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Kind,
    MemberEntry,
    Message,
    Nack,
    PeerState,
    Ping,
    PushPull,
    Status,
    Suspect,
    UserEvent,
)


def encode_message(msg: Message) -> bytes:
    """Encode one message to its wire bytes."""
    return bytes(msgpack.packb(_to_fields(msg)))


def _alive_fields(a: Alive) -> list[Any]:
    return [a.public_key, a.addr, fields.encodable(a.incarnation), a.sig]


def _state_fields(s: PeerState) -> list[Any]:
    return [
        s.node_id,
        fields.encodable(s.version),
        list(s.roles),
        fields.encodable(s.free_slots),
        fields.encodable(s.queue_len),
        float(s.load),
        fields.encodable(s.incarnation),
        s.sig,
    ]


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
        t.traceparent,
        t.sig,
    ]


def _to_fields(msg: Message) -> list[Any]:
    match msg:
        case Ping(seq, target, seen):
            return [Kind.PING, fields.encodable(seq), target, fields.encodable(seen)]
        case IndirectPing(seq, target, target_addr, seen):
            return [
                Kind.INDIRECT_PING,
                fields.encodable(seq),
                target,
                target_addr,
                fields.encodable(seen),
            ]
        case Ack(seq):
            return [Kind.ACK, fields.encodable(seq)]
        case Nack(seq):
            return [Kind.NACK, fields.encodable(seq)]
        case Alive():
            return [Kind.ALIVE, *_alive_fields(msg)]
        case Suspect(node_id, incarnation, accuser):
            return [Kind.SUSPECT, node_id, fields.encodable(incarnation), accuser]
        case Dead(node_id, incarnation, accuser):
            return [Kind.DEAD, node_id, fields.encodable(incarnation), accuser]
        case PushPull(join, reply, members, states):
            rows = [
                [*_alive_fields(m.alive), int(m.status), fields.encodable(m.incarnation)]
                for m in members
            ]
            return [Kind.PUSH_PULL, join, reply, rows, [_state_fields(s) for s in states]]
        case UserEvent(origin, ltime, name, payload):
            return [Kind.USER_EVENT, origin, fields.encodable(ltime), name, payload]
        case PeerState():
            return [Kind.PEER_STATE, *_state_fields(msg)]
        case TaskRecord():
            return _task_fields(msg)
        case Claim(task_id, owner_key, incarnation, epoch, sig):
            return [Kind.CLAIM, task_id, owner_key, incarnation, epoch, sig]
        case Result(task_id, epoch, owner_key, outcome, output, usage, sig):
            return [Kind.RESULT, task_id, epoch, owner_key, outcome, output, list(usage), sig]
        case Cancel(task_id, by_key, reason, sig, _, outcome):
            extra = [] if outcome == "cancelled" else [outcome]
            return [Kind.CANCEL, task_id, by_key, reason, sig, *extra]
        case TaskHeld(task_id):
            return [Kind.TASK_HELD, task_id]
        case TaskShards(level, shards, entries, upto):
            rows = [list(e) for e in entries]
            return [Kind.TASK_SHARDS, level, [list(s) for s in shards], rows, upto]
        case TaskHave():
            return [Kind.TASK_HAVE, *inventory.have_fields(msg)]
        case TaskRead(ids):
            return [Kind.TASK_READ, list(ids)]
        case TaskWant(ids):
            return [Kind.TASK_WANT, list(ids)]
        case TaskAsk(task_id, epoch):
            return [Kind.TASK_ASK, task_id, epoch]
        case EpochGrant(task_id, epoch, grantee, arbiter_key, sig):
            return [Kind.EPOCH_GRANT, task_id, epoch, grantee, arbiter_key, sig]
        case TaskGrant(task_id, epoch, grantee):
            return [Kind.TASK_GRANT, task_id, epoch, grantee]
        case Checkpoint(task_id, epoch, seq, owner_key, data, sig):
            return [Kind.CHECKPOINT, task_id, epoch, seq, owner_key, data, sig]
        case TaskList(request, after, limit, state, role):
            request, limit = fields.encodable(request), fields.encodable(limit)
            return [Kind.TASK_LIST, request, after, limit, state, role]
        case TaskPage(request, tasks, more):
            rows = [_summary_fields(s) for s in tasks]
            return [Kind.TASK_PAGE, fields.encodable(request), rows, more]
        case _:
            assert_never(msg)


def decode_message(data: bytes) -> Message:
    """Decode one message.

    Raises:
        RemoteProtocolError: malformed, unknown kind or wrong shape.
    """
    row = fields.unpack_strict(data, MAX_MESSAGE_BYTES)
    if not isinstance(row, list) or not row or type(row[0]) is not int:
        raise RemoteProtocolError("message is not an array starting with its kind")
    try:
        kind = Kind(row[0])
    except ValueError:
        raise RemoteProtocolError(f"unknown message kind {row[0]}") from None
    if kind in RETIRED_KINDS:
        raise RemoteProtocolError(f"retired message kind {kind.name}")
    shape = ARITY[kind]
    if len(row) != shape and len(row) != LONGER_FORM.get(kind):
        raise RemoteProtocolError(f"{kind.name} has {len(row)} fields, expected {shape}")
    f = row
    match kind:
        case Kind.PING:
            return Ping(fields.uint(f[1]), fields.node_id(f[2]), fields.uint(f[3]))
        case Kind.INDIRECT_PING:
            return IndirectPing(
                fields.uint(f[1]), fields.node_id(f[2]), fields.addr(f[3]), fields.uint(f[4])
            )
        case Kind.ACK:
            return Ack(fields.uint(f[1]))
        case Kind.NACK:
            return Nack(fields.uint(f[1]))
        case Kind.ALIVE:
            return _alive(f[1:])
        case Kind.SUSPECT:
            return Suspect(fields.node_id(f[1]), fields.uint(f[2]), fields.node_id(f[3]))
        case Kind.DEAD:
            return Dead(fields.node_id(f[1]), fields.uint(f[2]), fields.node_id(f[3]))
        case Kind.PUSH_PULL:
            return _push_pull(f)
        case Kind.USER_EVENT:
            return UserEvent(
                fields.node_id(f[1]),
                fields.uint(f[2]),
                fields.name(f[3]),
                fields.event_payload(f[4]),
            )
        case Kind.PEER_STATE:
            return _peer_state(f[1:])
        case Kind.TASK:
            return _task(f)
        case Kind.CLAIM:
            key = fields.public_key(f[2])
            return Claim(
                fields.node_id(f[1]),
                key,
                fields.uint(f[3]),
                fields.uint(f[4]),
                fields.signature(f[5]),
                fields.key_hash(key),
            )
        case Kind.RESULT:
            key = fields.public_key(f[3])
            usage = f[6]
            if not isinstance(usage, list) or len(usage) != 3:
                raise RemoteProtocolError("result usage must be 3 unsigned integers")
            return Result(
                fields.node_id(f[1]),
                fields.uint(f[2]),
                key,
                fields.name(f[4]),
                fields.inline_payload(f[5]),
                (fields.uint(usage[0]), fields.uint(usage[1]), fields.uint(usage[2])),
                fields.signature(f[7]),
                fields.key_hash(key),
            )
        case Kind.CANCEL:
            key = fields.public_key(f[2])
            outcome = "cancelled" if len(f) == ARITY[kind] else f[5]
            if len(f) > ARITY[kind] and outcome not in CANCEL_OUTCOMES[1:]:
                raise RemoteProtocolError("a cancel's outcome, when given, must be 'failed'")
            return Cancel(
                fields.node_id(f[1]),
                key,
                fields.reason(f[3]),
                fields.signature(f[4]),
                fields.key_hash(key),
                outcome,
            )
        case Kind.TASK_HELD:
            return TaskHeld(fields.node_id(f[1]))
        case Kind.TASK_SHARDS:
            return _task_shards(f)
        case Kind.TASK_DIGESTS:
            raise RemoteProtocolError(f"retired message kind {kind.name}")
        case Kind.TASK_SYNC:
            raise RemoteProtocolError(f"retired message kind {kind.name}")
        case Kind.TASK_HAVE:
            return inventory.decode_have(f)
        case Kind.TASK_READ:
            return TaskRead(tuple(fields.node_id(t) for t in fields.array(f[1])))
        case Kind.TASK_WANT:
            return TaskWant(tuple(fields.node_id(t) for t in fields.array(f[1])))
        case Kind.TASK_ASK:
            return TaskAsk(fields.node_id(f[1]), fields.uint(f[2]))
        case Kind.TASK_GRANT:
            return TaskGrant(fields.node_id(f[1]), fields.uint(f[2]), fields.node_id(f[3]))
        case Kind.TASK_LIST:
            after, state, role = _optional_id(f[2]), _optional_name(f[4]), _optional_name(f[5])
            return TaskList(fields.uint(f[1]), after, fields.uint(f[3]), state, role)
        case Kind.TASK_PAGE:
            return _task_page(f)
        case Kind.EPOCH_GRANT:
            key = fields.public_key(f[4])
            epoch = fields.uint(f[2])
            if epoch < 2:
                raise RemoteProtocolError("an epoch grant is for a takeover: epoch 2 or more")
            return EpochGrant(
                fields.node_id(f[1]),
                epoch,
                fields.node_id(f[3]),
                key,
                fields.signature(f[5]),
                fields.key_hash(key),
            )
        case Kind.CHECKPOINT:
            return _checkpoint(f)
        case Kind.EXECUTION:
            raise RemoteProtocolError(f"retired message kind {kind.name}")
        case _:
            assert_never(kind)


RETIRED_KINDS = frozenset({Kind.EXECUTION, Kind.TASK_DIGESTS, Kind.TASK_SYNC})
"""Kinds no longer sent: v1's execution-log entries (a run is now its claim and its result,
decision 23), whole-history task digests (now `TaskShards`, decision 31) and replica syncs by
digest (now inventories, `TaskHave`, decision 44). Decoding one is a
protocol error, like an unknown kind."""

LONGER_FORM: dict[Kind, int] = {Kind.CANCEL: 6}
"""Kinds with a second, longer shape: a cancel whose outcome is not the default (`failed`,
decision 45) carries it last; a plain one keeps the shape it had before."""

ARITY: dict[Kind, int] = {
    Kind.PING: 4,
    Kind.INDIRECT_PING: 5,
    Kind.ACK: 2,
    Kind.NACK: 2,
    Kind.ALIVE: 5,
    Kind.SUSPECT: 4,
    Kind.DEAD: 4,
    Kind.PUSH_PULL: 5,
    Kind.USER_EVENT: 5,
    Kind.PEER_STATE: 9,
    Kind.TASK: 12,
    Kind.CLAIM: 6,
    Kind.RESULT: 8,
    Kind.CANCEL: 5,
    Kind.TASK_HELD: 2,
    Kind.TASK_WANT: 2,
    Kind.TASK_ASK: 3,
    Kind.TASK_GRANT: 4,
    Kind.EPOCH_GRANT: 6,
    Kind.CHECKPOINT: 7,
    Kind.TASK_SHARDS: 5,
    Kind.TASK_HAVE: 3,
    Kind.TASK_READ: 2,
    Kind.TASK_LIST: 6,
    Kind.TASK_PAGE: 4,
}


def _checkpoint(f: list[Any]) -> Checkpoint:
    key = fields.public_key(f[4])
    epoch, seq = fields.uint(f[2]), fields.uint(f[3])
    if epoch < 1:
        raise RemoteProtocolError("a checkpoint belongs to a claimed run: epoch 1 or more")
    if not 1 <= seq <= MAX_CHECKPOINTS:
        raise RemoteProtocolError(f"a checkpoint's sequence number runs 1 to {MAX_CHECKPOINTS}")
    data = fields.inline_payload(f[5])
    return Checkpoint(
        fields.node_id(f[1]), epoch, seq, key, data, fields.signature(f[6]), fields.key_hash(key)
    )


def _alive(f: list[Any]) -> Alive:
    if len(f) != 4:
        raise RemoteProtocolError("alive record has the wrong number of fields")
    public_key, addr, incarnation, sig = f
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_BYTES:
        raise RemoteProtocolError("alive record public key must be 32 bytes")
    if type(sig) is not bytes or len(sig) != SIGNATURE_BYTES:
        raise RemoteProtocolError("alive record signature must be 64 bytes")
    return Alive(
        public_key,
        fields.addr(addr),
        fields.uint(incarnation),
        sig,
        hashlib.sha256(public_key).digest(),
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
        members.append(MemberEntry(_alive(row[:4]), status, fields.uint(row[5])))
    return PushPull(join, reply, tuple(members), tuple(_peer_state(s) for s in states))


def _peer_state(f: Any) -> PeerState:
    if not isinstance(f, list) or len(f) != 8:
        raise RemoteProtocolError("peer state must have 8 fields")
    node_id, version, roles, free_slots, queue_len, load, incarnation, sig = f
    if not isinstance(roles, list) or len(roles) > MAX_ROLES:
        raise RemoteProtocolError(f"peer state roles must be an array of at most {MAX_ROLES}")
    if type(load) is not float or not 0.0 <= load <= 1e9:
        raise RemoteProtocolError("peer state load must be a finite non-negative float")
    return PeerState(
        fields.node_id(node_id),
        fields.uint(version),
        tuple(fields.name(r) for r in roles),
        fields.uint(free_slots),
        fields.uint(queue_len),
        load,
        fields.uint(incarnation),
        fields.signature(sig),
    )


def _task(f: list[Any]) -> TaskRecord:
    key = fields.public_key(f[1])
    created, timeout = f[2], f[9]
    if type(created) is not float or type(timeout) is not float or not 0.0 <= timeout <= 1e9:
        raise RemoteProtocolError("task created and timeout must be non-negative floats")
    role, data, priority, parent = (
        fields.name(f[3]),
        fields.inline_payload(f[4]),
        fields.uint(f[5]),
        f[6],
    )
    if type(parent) is not bytes or len(parent) not in (0, NODE_ID_BYTES):
        raise RemoteProtocolError("task parent must be a task id or empty")
    idem, nonce = f[7], f[8]
    if type(idem) is not str or len(idem) > MAX_NAME_CHARS:
        raise RemoteProtocolError(f"idempotency key must be at most {MAX_NAME_CHARS} chars")
    if type(nonce) is not bytes or len(nonce) > MAX_NONCE:
        raise RemoteProtocolError(f"task nonce must be at most {MAX_NONCE} bytes")
    traceparent = f[10]
    if type(traceparent) is not str or not is_traceparent(traceparent):
        raise RemoteProtocolError("task traceparent must be empty or a W3C traceparent (v00)")
    origin = fields.key_hash(key)
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
        traceparent,
        fields.signature(f[11]),
        task_id,
        origin,
    )


def _digest_entry(v: Any) -> tuple[bytes, bytes]:
    if not isinstance(v, list) or len(v) != 2 or type(v[1]) is not bytes or len(v[1]) != 8:
        raise RemoteProtocolError("a task digest entry is [task id, 8-byte digest]")
    return (fields.node_id(v[0]), v[1])


def _task_shards(f: list[Any]) -> TaskShards:
    level = fields.uint(f[1])
    if level > 1:
        raise RemoteProtocolError("task shards level must be 0 (summary) or 1 (answer)")
    shards: list[tuple[int, bytes]] = []
    for row in fields.array(f[2]):
        if not isinstance(row, list) or len(row) != 2 or type(row[1]) is not bytes:
            raise RemoteProtocolError("a task shard is [shard, digest]")
        shard = fields.uint(row[0])
        if shard >= SHARDS or len(row[1]) not in (0, 8):
            raise RemoteProtocolError("a task shard is [0-255, 8-byte or empty digest]")
        shards.append((shard, row[1]))
    if len({s for s, _ in shards}) != len(shards):
        raise RemoteProtocolError("task shards repeat a shard")
    entries = tuple(_digest_entry(e) for e in fields.array(f[3]))
    return TaskShards(level, tuple(shards), entries, _optional_id(f[4]))


def _optional_id(v: Any) -> bytes:
    """A task or node id, or empty (a listing's first page, an unclaimed task's owner)."""
    return b"" if v == b"" else fields.node_id(v)


def _optional_name(v: Any) -> str:
    """A name that may be empty (a listing's filters, a summary's outcome)."""
    if type(v) is not str or len(v) > MAX_NAME_CHARS:
        raise RemoteProtocolError(f"expected a string of at most {MAX_NAME_CHARS} chars")
    return v


def _summary_fields(s: TaskSummary) -> list[Any]:
    return [
        s.task_id,
        s.role,
        s.state,
        s.outcome,
        s.origin,
        s.owner,
        fields.encodable(s.epoch),
        float(s.created),
    ]


def _task_page(f: list[Any]) -> TaskPage:
    rows, more = fields.array(f[2]), f[3]
    if len(rows) > MAX_PAGE or type(more) is not bool:
        raise RemoteProtocolError(f"a task page has at most {MAX_PAGE} rows and a boolean more")
    return TaskPage(fields.uint(f[1]), tuple(_summary(r) for r in rows), more)


def _summary(v: Any) -> TaskSummary:
    if not isinstance(v, list) or len(v) != 8:
        raise RemoteProtocolError("a task summary has 8 fields")
    task_id, role, state, outcome, origin, owner, epoch, created = v
    if type(created) is not float or not math.isfinite(created):
        raise RemoteProtocolError("a task summary's created time must be a finite float")
    return TaskSummary(
        fields.node_id(task_id),
        fields.name(role),
        fields.name(state),
        _optional_name(outcome),
        fields.node_id(origin),
        _optional_id(owner),
        fields.uint(epoch),
        created,
    )
