"""Task messages: records, claims, results, cancels, and anti-entropy.

Invariants:
- These are wire messages (their kinds and codec live in `protocol.wire`); every signed one
  exposes `signed_payload()`, the exact bytes its author's signature covers.
- Derived fields (`task_id`, `origin`, `owner`, `by`) are computed on decode, never sent, so a
  sender cannot claim an id its content does not hash to.
- Each signed kind has its own signature domain (`DOMAIN_*`), so a signature made for one kind
  never verifies as another.
- A run of a task is named by its claim: (epoch, owner, owner incarnation). A claim is the start
  of a run and a result its end, so a task costs three signed objects (record, claim, result);
  the separate execution-log entries of v1 (kind `EXECUTION`) are retired (decision 23).
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass, replace
from typing import TypeVar

import msgpack

MAX_INLINE_PAYLOAD = 64 * 1024
"""Largest task input or result output carried inline; larger payloads are rejected for now
(content-addressed blobs fetched over HTTP are the planned remedy)."""
MAX_NONCE = 16
TRACEPARENT_CHARS = 55
"""Length of a W3C trace context `traceparent` header of version 00, the only one carried."""
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")

DOMAIN_TASK = b"grapevine/task/v1"
DOMAIN_CLAIM = b"grapevine/claim/v1"
DOMAIN_RESULT = b"grapevine/result/v1"
DOMAIN_CANCEL = b"grapevine/cancel/v1"
DOMAIN_EPOCH_GRANT = b"grapevine/epoch-grant/v1"
DOMAIN_CHECKPOINT = b"grapevine/checkpoint/v1"
MAX_CHECKPOINT_BYTES = MAX_INLINE_PAYLOAD
"""Largest payload of one checkpoint (as large as an inline result)."""
MAX_CHECKPOINTS = 256
"""Most checkpoints of one owner's runs of one epoch: their sequence numbers run 1 to this."""

OUTCOMES = ("ok", "failed", "timeout", "cancelled", "fenced")
"""The outcomes a result may carry."""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A unit of work, signed by the peer it was submitted at (its origin).

    `task_id` hashes the idempotency key and its scope (the parent) when there is a key, so the
    same key names the same task at any peer; without one, the origin, the nonce and the spec.
    `traceparent` carries the submission's W3C trace context, so a delegation tree across peers
    is one trace (`peer.observability.tracing`); it is signed but named by neither the id nor
    the spec (`protocol.tasks.idempotency`): one key submitted under two contexts is one task.
    """

    origin_key: bytes
    created: float  # the origin's wall clock; compared only to order two records of one task
    role: str
    input: bytes
    priority: int
    parent: bytes  # the parent task's id, or b"" for a root task
    idempotency_key: str
    nonce: bytes
    timeout: float  # seconds one execution may run; 0 means no limit
    traceparent: str  # W3C trace context of the submission, or ""; not part of the spec
    sig: bytes
    task_id: bytes  # derived on decode, never sent
    origin: bytes  # sha256(origin_key); derived
    queue_timeout: float = 0.0
    """Seconds after `created` the task fails if no peer claimed it (`submit --queue`), or 0.
    Signed, not part of the spec (nor of the id): the task's home members end it when its
    origin cannot (decision 58)."""

    def signed_payload(self) -> bytes:
        """The payload the origin's signature covers (the queue timeout only when there is
        one, so a record without one is signed as before decision 58)."""
        fields = [self.origin_key, float(self.created), self.role, self.input, self.priority]
        fields += [self.parent, self.idempotency_key, self.nonce, float(self.timeout)]
        fields.append(self.traceparent)
        if self.queue_timeout:
            fields.append(float(self.queue_timeout))
        return bytes(msgpack.packb(fields))


def is_traceparent(value: str) -> bool:
    """Whether `value` may be a record's `traceparent`: empty, or a W3C `traceparent` of
    version 00 (55 characters, lowercase hex, trace and parent ids not all zero)."""
    return value == "" or _TRACEPARENT.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Claim:
    """`owner` claims the task for `epoch`; claims are ordered by (epoch, HRW score)."""

    task_id: bytes
    owner_key: bytes
    owner_incarnation: int
    epoch: int
    sig: bytes
    owner: bytes  # derived

    def signed_payload(self) -> bytes:
        """The payload the owner's signature covers."""
        return bytes(
            msgpack.packb([self.task_id, self.owner_key, self.owner_incarnation, self.epoch])
        )


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of `owner`'s execution under `epoch`. `usage` is (prompt tokens,
    completion tokens, cost in millionths of a dollar)."""

    task_id: bytes
    epoch: int
    owner_key: bytes
    outcome: str
    output: bytes
    usage: tuple[int, int, int]
    sig: bytes
    owner: bytes  # derived

    def signed_payload(self) -> bytes:
        """The payload the owner's signature covers."""
        return bytes(
            msgpack.packb(
                [
                    self.task_id,
                    self.epoch,
                    self.owner_key,
                    self.outcome,
                    self.output,
                    list(self.usage),
                ]
            )
        )


CANCEL_OUTCOMES = ("cancelled", "failed")
"""How a cancel ends a task: `cancelled` (asked for), or `failed` (its origin gave up on it:
a queued task no peer claimed in time, decision 45)."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """A request, signed by the peer that made it, to stop the task wherever it runs; the
    task ends with `outcome` (see `CANCEL_OUTCOMES`)."""

    task_id: bytes
    by_key: bytes
    reason: str
    sig: bytes
    by: bytes  # derived
    outcome: str = "cancelled"

    def signed_payload(self) -> bytes:
        """The payload the canceller's signature covers (the outcome only where it is not the
        default, so a plain cancel is signed as before decision 45)."""
        fields: list[object] = [self.task_id, self.by_key, self.reason]
        if self.outcome != "cancelled":
            fields.append(self.outcome)
        return bytes(msgpack.packb(fields))


@dataclass(frozen=True, slots=True)
class TaskHeld:
    """Sent to a task's origin by each peer that made the task record durable."""

    task_id: bytes


SHARDS = 256
"""Anti-entropy shards: a task's shard is the first byte of its id."""


@dataclass(frozen=True, slots=True)
class TaskShards:
    """Anti-entropy between two peers over the tasks both are replicas of (decision 31).

    Level 0 (with each push-pull): `shards` holds (shard, digest) of every non-empty shard;
    `entries` is empty. Level 1 (the answer): `shards` names the shards whose digests differ
    (with the answerer's digest, empty where it holds none of the shard) and `entries` the
    answerer's (task id, digest) in them, by id; `upto` is the last id listed when the list
    was cut short (the rest is compared at the next exchange), else empty.
    """

    level: int
    shards: tuple[tuple[int, bytes], ...]
    entries: tuple[tuple[bytes, bytes], ...]
    upto: bytes


@dataclass(frozen=True, slots=True)
class Inventory:
    """What a peer holds of one task, by object key, not content (see `TaskHave`).

    `digest` is the task's digest there (`TaskState.digest`): a receiver holding the same
    digest stops at it. `record` is the 8-byte tag of the record held (`record_tag`; empty: no
    record). `keys` names every other object held, one `INVENTORY_KEY` record each, in order:
    grants (KEY_GRANT, epoch, grantee), claims (KEY_CLAIM, epoch, owner, incarnation),
    checkpoints as ranges (KEY_STEPS, epoch, owner, first, last: every sequence number from
    first to last is held), results (KEY_RESULT, epoch, owner) and the cancel (KEY_CANCEL);
    unused fields are zero. The keys are parsed only where the digests differ
    (`protocol.tasks.inventory.parse_keys`), so a sync of tasks held alike costs a comparison
    of digests."""

    task_id: bytes
    digest: bytes
    record: bytes
    keys: bytes


INVENTORY_KEY = struct.Struct(">BQ32sQQ")
"""One key of an inventory: kind, epoch, node id (owner or grantee), then two numbers."""
KEY_GRANT, KEY_CLAIM, KEY_STEPS, KEY_RESULT, KEY_CANCEL = range(5)


RECORD_TAG_BYTES = 8


def record_tag(sig: bytes) -> bytes:
    """A record's short name in an inventory: two records of one task (one idempotency key
    submitted at two peers) differ in it."""
    return hashlib.sha256(sig).digest()[:RECORD_TAG_BYTES]


@dataclass(frozen=True, slots=True)
class TaskHave:
    """The sender's inventory of some tasks (decision 44): a replica sync (`reply`: after a
    task changes, to its other replicas and origin), or repair of tasks held differently.
    The receiver sends back only the objects the sender lacks and, if `reply`, asks for the
    tasks it holds none of and sends its own inventory of those where the sender holds
    something it lacks."""

    entries: tuple[Inventory, ...]
    reply: bool


@dataclass(frozen=True, slots=True)
class TaskRead:
    """A read at a peer that may not hold these tasks: send every object of them and of the
    children held (their tree), as for `TaskWant`."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class TaskWant:
    """Ask for every object held about these tasks."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class TaskAsk:
    """A standby whose turn came with no claim in view asks the task's first-ranked peer (its
    "primary" for this epoch) whether it may claim `epoch`; see `TaskGrant`."""

    task_id: bytes
    epoch: int


@dataclass(frozen=True, slots=True)
class TaskGrant:
    """The primary's answer: `grantee` (and no one else, the primary included) may claim
    `epoch` of the task, unless the grantee is declared dead. The primary grants each epoch once
    and keeps the grant durable, so two standbys never both step in for a live primary."""

    task_id: bytes
    epoch: int
    grantee: bytes


@dataclass(frozen=True, slots=True)
class EpochGrant:
    """The task's arbiter (the first live member of its home: the top k members by HRW) lets
    `grantee` claim `epoch` > 1: it held the owner of epoch - 1 down and no result. Signed by
    the arbiter; a claim of epoch e > 1 is accepted only with the grant naming its owner
    (decision 25)."""

    task_id: bytes
    epoch: int
    grantee: bytes
    arbiter_key: bytes
    sig: bytes
    arbiter: bytes  # derived

    def signed_payload(self) -> bytes:
        """The payload the arbiter's signature covers."""
        return bytes(msgpack.packb([self.task_id, self.epoch, self.grantee, self.arbiter_key]))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Step `seq` of `owner`'s run of the task under `epoch`: `data` is opaque here (the
    host's record of a model call or tool result, say), signed by the owner, held by the
    task's replicas and audience, so whoever takes the task over resumes from it instead of
    paying for the steps again."""

    task_id: bytes
    epoch: int
    seq: int
    owner_key: bytes
    data: bytes
    sig: bytes
    owner: bytes  # derived

    def signed_payload(self) -> bytes:
        """The payload the owner's signature covers."""
        fields = [self.task_id, self.epoch, self.seq, self.owner_key, self.data]
        return bytes(msgpack.packb(fields))


ProgressValue = str | int | float | bool | None
"""What a progress detail's field holds: what JSON carries as it is."""
MAX_PROGRESS_FIELDS = 16
"""Fields in one progress report's detail."""
MAX_PROGRESS_TEXT = 256
"""Characters of one text field of a progress report (longer text is cut by the sender)."""


@dataclass(frozen=True, slots=True)
class TaskProgress:
    """A step of the sender's run of the task under `epoch`, told to the task's origin as it
    happens (a model call answered, a tool call returned, a child asked for): `kind` names
    it, `time` is when it was made (the runner's wall clock) and `detail` its fields. For
    watchers only: neither signed, stored nor gossiped, and accepted only from the member
    whose claim is the task's current one (`protocol.tasks.progress`).

    A relayed step (`via` set) is one of a descendant's, passed up the tree: the sender runs
    `via` under `via_epoch`, the receiver submitted `via`, and `owner` ran the step."""

    task_id: bytes
    epoch: int
    kind: str
    time: float
    detail: tuple[tuple[str, ProgressValue], ...]
    owner: bytes = b""
    via: bytes = b""
    via_epoch: int = 0


MAX_PAGE = 500
"""Most summaries in one `TaskPage`, and the cap on the limit a `TaskList` asks for: about
140 KB at worst (a 128-character role in every row), far under the envelope limit."""


@dataclass(frozen=True, slots=True)
class TaskList:
    """Ask for a page of the tasks the receiver holds and arbitrates (it is the first of their
    replica set in its own view): ids strictly above `after` (b"" for the first page), in id
    order, at most `limit`, in `state`, of `role` and claimed by `owner` when those are not
    empty. Answered with a `TaskPage` carrying `request` (see `protocol.tasks.listing`)."""

    request: int
    after: bytes
    limit: int
    state: str
    role: str
    owner: bytes = b""
    """A node id: only tasks whose current claim is its (b"": any, unclaimed ones too)."""


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """One task as a network listing shows it: a row of a `TaskPage`. `outcome` is "" without
    an accepted result; `owner` is b"" and `epoch` 0 while it is unclaimed."""

    task_id: bytes
    role: str
    state: str
    outcome: str
    origin: bytes
    owner: bytes
    epoch: int
    created: float


@dataclass(frozen=True, slots=True)
class TaskPage:
    """The answer to the `TaskList` numbered `request`: its page, and whether the answering
    peer arbitrates more tasks past it."""

    request: int
    tasks: tuple[TaskSummary, ...]
    more: bool


def task_id_of(
    origin: bytes,
    idempotency_key: str,
    nonce: bytes,
    role: str,
    input_digest: bytes,
    priority: int,
    parent: bytes,
    timeout: float,
) -> bytes:
    """The id of a task.

    With an idempotency key: sha256 over the key's scope (`parent`, empty for a top-level task)
    and the key, nothing else, so the same key names the same task at every peer and a re-run
    parent names the same children (`protocol.tasks.idempotency`). With only a nonce: sha256
    over origin, nonce and spec, unique per submission.
    """
    if idempotency_key:
        scoped = msgpack.packb([parent, idempotency_key])
        return hashlib.sha256(b"grapevine/task-id/v2/key" + scoped).digest()
    spec = msgpack.packb([b"n" + nonce, role, input_digest, priority, parent, float(timeout)])
    return hashlib.sha256(b"grapevine/task-id/v1" + origin + spec).digest()


TaskMessage = (
    TaskRecord
    | Claim
    | Result
    | Cancel
    | EpochGrant
    | Checkpoint
    | TaskHeld
    | TaskShards
    | TaskHave
    | TaskRead
    | TaskWant
    | TaskAsk
    | TaskGrant
    | TaskList
    | TaskPage
    | TaskProgress
)
"""Every message of the task plane (`protocol.tasks.plane.Tasks.dispatch` takes each one)."""

Signed = TypeVar("Signed", TaskRecord, Claim, Result, Cancel, EpochGrant, Checkpoint)


def with_signature(obj: Signed, sig: bytes) -> Signed:
    """`obj` carrying `sig`, the signature of its `signed_payload()`."""
    return replace(obj, sig=sig)
