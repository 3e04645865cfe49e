"""Message codec: one wire message to and from its msgpack bytes.

Invariants:
- A message is the msgpack array ``[kind, field, ...]``; its shape is fixed by its `Kind`
  (see `ARITY`; a kind may have longer forms, `LONGER_FORM`), and the kind numbers are
  append-only (see `protocol.wire`). The larger task shapes are decoded in
  `protocol.tasks.shapes` and `protocol.tasks.inventory`.
- Decoding is strict: every field is checked by `protocol.fields`, derived fields (node ids,
  task ids) are computed here and never trusted from the sender, and any violation raises
  `RemoteProtocolError`; nothing else escapes `decode_message`.
- Signatures are not checked here (that needs the network id and the cache); see `node.py`.
"""

from __future__ import annotations

import hashlib
from typing import Any, assert_never

import msgpack

from protocol import fields
from protocol.errors import RemoteProtocolError
from protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from protocol.tasks import inventory, shapes
from protocol.tasks.messages import (
    CANCEL_OUTCOMES,
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
    TaskProgress,
    TaskRead,
    TaskRecord,
    TaskShards,
    TaskWant,
)
from protocol.wire import (
    MAX_MESSAGE_BYTES,
    MAX_ROLES,
    MAX_STATE_MODELS,
    RUN_COUNTS,
    Ack,
    Alive,
    Breaker,
    Dead,
    IndirectPing,
    Kind,
    MemberEntry,
    Message,
    ModelUsage,
    Nack,
    PeerState,
    Ping,
    PushPull,
    Status,
    Suspect,
    UserEvent,
    model_usage_fields,
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
        fields.encodable(s.agents),
        fields.encodable(s.spend_micro),
        *([model_usage_fields(s.models)] if s.models or s.runs else []),
        *([[fields.encodable(n) for n in s.runs]] if s.runs else []),
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
        *([float(t.queue_timeout)] if t.queue_timeout else []),
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
        case TaskList(request, after, limit, state, role, owner):
            request, limit = fields.encodable(request), fields.encodable(limit)
            filtered = [owner] if owner else []  # the longer form only when filtering
            return [Kind.TASK_LIST, request, after, limit, state, role, *filtered]
        case TaskProgress(task_id, epoch, kind, time, detail, owner, via, via_epoch):
            pairs = [[key, value] for key, value in detail]
            relayed = [owner, via, fields.encodable(via_epoch)] if via else []
            epoch = fields.encodable(epoch)
            return [Kind.TASK_PROGRESS, task_id, epoch, kind, time, pairs, *relayed]
        case TaskPage(request, tasks, more):
            rows = [shapes.summary_fields(s) for s in tasks]
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
    if len(row) != shape and len(row) not in LONGER_FORM.get(kind, ()):
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
            return shapes.task_record(f)
        case Kind.CLAIM:
            key, author = fields.signer(f[2])
            return Claim(
                fields.node_id(f[1]),
                key,
                fields.uint(f[3]),
                fields.uint(f[4]),
                fields.signature(f[5]),
                author,
            )
        case Kind.RESULT:
            key, author = fields.signer(f[3])
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
                author,
            )
        case Kind.CANCEL:
            key, author = fields.signer(f[2])
            outcome = "cancelled" if len(f) == ARITY[kind] else f[5]
            if len(f) > ARITY[kind] and outcome not in CANCEL_OUTCOMES[1:]:
                raise RemoteProtocolError("a cancel's outcome, when given, must be 'failed'")
            return Cancel(
                fields.node_id(f[1]),
                key,
                fields.reason(f[3]),
                fields.signature(f[4]),
                author,
                outcome,
            )
        case Kind.TASK_HELD:
            return TaskHeld(fields.node_id(f[1]))
        case Kind.TASK_SHARDS:
            return shapes.task_shards_from(f)
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
            after, state, role = (
                shapes.optional_id(f[2]),
                shapes.optional_name(f[4]),
                shapes.optional_name(f[5]),
            )
            owner = fields.node_id(f[6]) if len(f) > 6 else b""
            return TaskList(fields.uint(f[1]), after, fields.uint(f[3]), state, role, owner)
        case Kind.TASK_PAGE:
            return shapes.task_page_from(f)
        case Kind.TASK_PROGRESS:
            return shapes.task_progress_from(f)
        case Kind.EPOCH_GRANT:
            key, author = fields.signer(f[4])
            epoch = fields.uint(f[2])
            if epoch < 2:
                raise RemoteProtocolError("an epoch grant is for a takeover: epoch 2 or more")
            return EpochGrant(
                fields.node_id(f[1]),
                epoch,
                fields.node_id(f[3]),
                key,
                fields.signature(f[5]),
                author,
            )
        case Kind.CHECKPOINT:
            return shapes.checkpoint_from(f)
        case Kind.EXECUTION:
            raise RemoteProtocolError(f"retired message kind {kind.name}")
        case _:
            assert_never(kind)


RETIRED_KINDS = frozenset({Kind.EXECUTION, Kind.TASK_DIGESTS, Kind.TASK_SYNC})
"""Kinds no longer sent: v1's execution-log entries (a run is now its claim and its result,
decision 23), whole-history task digests (now `TaskShards`, decision 31) and replica syncs by
digest (now inventories, `TaskHave`, decision 44). Decoding one is a
protocol error, like an unknown kind."""

LONGER_FORM: dict[Kind, tuple[int, ...]] = {
    Kind.CANCEL: (6,),
    Kind.PEER_STATE: (12, 13),
    Kind.TASK: (13,),
    Kind.TASK_LIST: (7,),
    Kind.TASK_PROGRESS: (9,),
}
"""Kinds with longer shapes: a cancel whose outcome is not the default (`failed`, decision
45) carries it last, a peer state naming its models carries them last (decision 54) and its
run counts after them (decision 64), a task record with a queue timeout carries it last
(decision 58), a network listing filtered by owner carries the owner last (decision 74), a
progress step relayed up a task tree carries its runner and the task it travels through
(decision 77); a plain one keeps the shape it had before."""

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
    Kind.PEER_STATE: 11,
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
    Kind.TASK_PROGRESS: 6,
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
    if not isinstance(f, list) or len(f) not in (10, 11, 12):
        raise RemoteProtocolError("peer state must have 10 to 12 fields")
    node_id, version, roles, free_slots, queue_len, load, incarnation, sig, agents, spend = f[:10]
    runs = _run_counts(f[11]) if len(f) == 12 else ()
    # Models may be empty only when run counts follow: one encoding per state.
    models = _model_usage(f[10]) if len(f) > 10 and (f[10] != [] or not runs) else ()
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
        fields.uint(agents),
        fields.uint(spend),
        models,
        runs,
    )


def _run_counts(f: Any) -> tuple[int, ...]:
    if not isinstance(f, list) or len(f) != len(RUN_COUNTS):
        raise RemoteProtocolError(f"peer state run counts must be {len(RUN_COUNTS)} integers")
    runs = tuple(fields.uint(n) for n in f)
    if not any(runs):
        raise RemoteProtocolError("peer state run counts of all zeros are left out")
    return runs


def _model_usage(f: Any) -> tuple[ModelUsage, ...]:
    if not isinstance(f, list) or not 0 < len(f) <= MAX_STATE_MODELS:
        raise RemoteProtocolError(
            f"peer state models must be an array of 1..{MAX_STATE_MODELS} entries"
        )
    out: list[ModelUsage] = []
    for entry in f:
        if not isinstance(entry, list) or len(entry) not in (3, 6):
            raise RemoteProtocolError(
                "a peer state model must be [model, spend, breaker] or those and "
                "[tokens, waits, waiting]"
            )
        model, spend, breaker = entry[:3]
        if type(breaker) is not int or not 0 <= breaker < len(Breaker):
            raise RemoteProtocolError(f"unknown breaker state {breaker!r}")
        tokens, waits, waiting = (
            (fields.uint(v) for v in entry[3:]) if len(entry) == 6 else (0, 0, 0)
        )
        if len(entry) == 6 and not (tokens or waits or waiting):
            raise RemoteProtocolError("a peer state model's usage is sent only when not all 0")
        out.append(
            ModelUsage(
                fields.name(model), fields.uint(spend), Breaker(breaker), tokens, waits, waiting
            )
        )
    if len({m.model for m in out}) != len(out):
        raise RemoteProtocolError("a peer state names a model twice")
    return tuple(out)
