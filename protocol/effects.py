"""What protocol calls return: sends, durable records, commands and notifications for the host.

Invariants:
- Every entry point of `protocol.node.Node` returns one `Effects`; the host applies it fully
  (persist first, then send, then deliver notifications and run commands) and re-arms one
  timer at `wake_at`.
- Notifications (`Note`) say what happened, named in the past tense; commands (`Command`) tell
  the host what to do (start or stop an execution). Both are frozen, slotted values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver `data` (one encoded envelope) to the peer listening at `addr`; `probe` when it
    carries a probe, ack or nack (the host gives those a lane of their own)."""

    addr: str
    data: bytes
    probe: bool = False


class PersistKind(StrEnum):
    """The kinds of durable record. The values are what the host stores: never rename one."""

    INCARNATION = "incarnation"
    """This peer's incarnation, under the key ``b"self"``."""
    TASK = "task"
    CLAIM = "claim"
    RESULT = "result"
    CANCEL = "cancel"
    EXECUTION = "execution"
    """Retired (decision 23): rows of v1 stores are ignored on restore and deleted with their
    task."""
    EPOCH_GRANT = "epoch-grant"
    """An arbiter's signed grant of a takeover epoch (`protocol.tasks.messages.EpochGrant`),
    by task id + epoch + grantee."""
    CHECKPOINT = "checkpoint"
    """A signed step of a run (`protocol.tasks.messages.Checkpoint`), by task id + epoch +
    owner + sequence number."""
    GRANT = "grant"
    """A primary's grant of an epoch to a standby (see `protocol.tasks.grants`)."""
    TOMBSTONE = "tombstone"
    """What is left of a compacted task (`protocol.tasks.retention.Tombstone`), by task id."""
    FORGET_TASK = "forget-task"
    """A deletion, not a record: remove every record whose key starts with the task id given
    as key (its objects and grants; not its tombstone). Applied in the same transaction as
    the records around it and in order, so a compaction's forget, then tombstone, is atomic."""
    FORGET_TOMBSTONE = "forget-tombstone"
    """A deletion, not a record: remove the tombstone stored under the task id given as key.
    Its task's objects went when the tombstone came (`FORGET_TASK`), so the expiry searches
    the tombstones alone: searching every task kind again found nothing and cost a sixth of a
    soak peer's writes (decision 81)."""


@dataclass(frozen=True, slots=True)
class Persist:
    """Store `value` under (`kind`, `key`) durably before any send in the same Effects leaves."""

    kind: PersistKind
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """A member became known and alive."""

    node_id: bytes
    addr: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """A known member changed address, incarnation or advertised state while staying up."""

    node_id: bytes
    addr: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    """A member is suspected of having failed; it is not yet declared dead."""

    node_id: bytes
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberDown:
    """A member was declared dead (failed) or left gracefully (`left=True`)."""

    node_id: bytes
    incarnation: int
    left: bool


@dataclass(frozen=True, slots=True)
class MemberRecovered:
    """A member that was dead or left is alive again (restart, healed partition, refutation)."""

    node_id: bytes
    addr: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class JoinSucceeded:
    """A seed answered our join request; we now hold its view of the network."""

    seed_addr: str
    members: int


@dataclass(frozen=True, slots=True)
class EventReceived:
    """A user event (application broadcast) reached this peer for the first time."""

    origin: bytes
    ltime: int
    name: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class StallDetected:
    """The host did not call us for `gap` seconds; our own timeouts were reset, not trusted."""

    gap: float


@dataclass(frozen=True, slots=True)
class TaskReplicated:
    """A task submitted here is durable at `holders` other peers: the client may be told."""

    task_id: bytes
    holders: int


@dataclass(frozen=True, slots=True)
class SubmissionConflicted:
    """A task submitted here with an idempotency key conflicts with the task that key already
    names, which has another spec: the submission is refused, not acknowledged, and the
    existing record is now held here. `task_id` is the existing task's id."""

    task_id: bytes


@dataclass(frozen=True, slots=True)
class TaskClaimed:
    """The greatest claim known for a task changed."""

    task_id: bytes
    owner: bytes
    epoch: int


@dataclass(frozen=True, slots=True)
class StartExecution:
    """Command: run this task here under `epoch`, then report with `Node.complete`."""

    task_id: bytes
    epoch: int
    role: str
    input: bytes
    priority: int
    timeout: float
    parent: bytes


@dataclass(frozen=True, slots=True)
class CancelExecution:
    """Command: stop running this task here; `reason` says why (fenced, cancelled, result
    accepted). The node has already logged the execution's end: do not report it."""

    task_id: bytes
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResultAccepted:
    """The accepted result of a task changed; `flipped` if it replaced an earlier one."""

    task_id: bytes
    epoch: int
    owner: bytes
    outcome: str
    flipped: bool


@dataclass(frozen=True, slots=True)
class TaskCancelled:
    """A task was cancelled (here or by a peer): it runs nowhere once the cancel has spread.
    It ended `outcome`: `cancelled`, or `failed` when its origin gave up on it."""

    task_id: bytes
    by: bytes
    reason: str
    outcome: str = "cancelled"


@dataclass(frozen=True, slots=True)
class ProgressHeard:
    """The peer running a task submitted here reported a step of its run under `epoch`
    (`protocol.tasks.progress`): `kind` names it, `time` is when it was made there."""

    task_id: bytes
    epoch: int
    owner: bytes
    kind: str
    time: float
    detail: tuple[tuple[str, str | int | float | bool | None], ...]


@dataclass(frozen=True, slots=True)
class Dropped:
    """Input from `peer` was rejected for `reason`; no state changed."""

    peer: str
    reason: str


Note = (
    MemberJoined
    | MemberUpdated
    | MemberSuspected
    | MemberDown
    | MemberRecovered
    | JoinSucceeded
    | EventReceived
    | StallDetected
    | TaskReplicated
    | SubmissionConflicted
    | TaskClaimed
    | ResultAccepted
    | TaskCancelled
    | ProgressHeard
    | Dropped
)

Command = StartExecution | CancelExecution


@dataclass(slots=True)
class Effects:
    """The result of one protocol call.

    Attributes:
        sends: envelopes to deliver, in order.
        persists: records to make durable before `sends` leave.
        notes: notifications for the host, in the order they happened.
        commands: executions for the host to start or stop, in order.
        wake_at: the earliest time the node must be ticked again (None: never).
    """

    sends: list[Send] = field(default_factory=list)
    persists: list[Persist] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    wake_at: float | None = None
