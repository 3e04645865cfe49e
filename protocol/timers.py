"""Timers: the third vocabulary (besides wire messages and notifications), as foca keeps them.

A timer is a typed value scheduled for a deadline. Timers that can go stale carry the sequence
number or generation they were armed for; when one fires for a probe or suspicion that has since
moved on, the handler sees the mismatch and ignores it. So nothing ever has to be cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProbeDue:
    """Time to probe the next member in the round-robin order."""


@dataclass(frozen=True, slots=True)
class ProbeTimeout:
    """The direct probe `seq` got no ack in time: try indirect probes."""

    seq: int


@dataclass(frozen=True, slots=True)
class ProbeRoundEnd:
    """The probe `seq` had its whole interval: without an ack, suspect the target."""

    seq: int


@dataclass(frozen=True, slots=True)
class RelayTimeout:
    """A ping we sent for someone else's indirect probe `seq` went unanswered: nack it."""

    seq: int


@dataclass(frozen=True, slots=True)
class SuspicionDue:
    """The suspicion `generation` of `node_id` may have run out."""

    node_id: bytes
    generation: int


@dataclass(frozen=True, slots=True)
class GossipDue:
    """Time for a gossip round."""


@dataclass(frozen=True, slots=True)
class PushPullDue:
    """Time for a full-state exchange with a random member."""


@dataclass(frozen=True, slots=True)
class JoinSettleDue:
    """One probe interval after joining: one more full-state exchange, for the members that
    joined (through the seed or elsewhere) while the seed was answering us."""


@dataclass(frozen=True, slots=True)
class ReconnectDue:
    """Time to try a dead member or a seed, so partitions heal."""


@dataclass(frozen=True, slots=True)
class ReapDue:
    """Time to forget members dead for longer than the retention."""


@dataclass(frozen=True, slots=True)
class TaskStandby:
    """A standby's turn to look at `task_id` again (claim it if still unclaimed), armed for
    `at`; only the timer armed last for a task counts (see `Tasks._wake`)."""

    task_id: bytes
    at: float


@dataclass(frozen=True, slots=True)
class LingerDue:
    """Time to send the claims and checkpoints made here that still wait for more of their run
    (see `protocol.tasks.core.LINGER`)."""


@dataclass(frozen=True, slots=True)
class RetentionDue:
    """Time to compact the tasks final for longer than the retention and forget the
    tombstones older than the grace, armed for `at`; only the one armed last counts (see
    `protocol.tasks.retention`)."""

    at: float


Timer = (
    ProbeDue
    | ProbeTimeout
    | ProbeRoundEnd
    | RelayTimeout
    | SuspicionDue
    | GossipDue
    | PushPullDue
    | JoinSettleDue
    | ReconnectDue
    | ReapDue
    | TaskStandby
    | LingerDue
    | RetentionDue
)
