"""Network-wide idempotency: which record of a keyed task is kept, and when a submission conflicts.

Invariants (docs/decisions.md decision 21):
- A task submitted with an idempotency key is named by the key's scope (its parent task, or
  nothing for a top-level task) and the key alone (`protocol.tasks.messages.task_id_of`), so
  the same key names the same task at every peer; two records of one task may therefore come
  from different origins, or carry different specs.
- Records of one id with the same spec (role, input, priority, parent, timeout) are the same
  task: every peer keeps the one that `record_order` puts first, a total order on records, so
  the peers converge on one record whatever order they receive them in. Claims, results and
  cancels name the task id, not the record, so those made under the other record stay valid.
- A record of one id with another spec is a conflict: the record held is kept (first wins)
  and the other is refused; its origin, whose submission it was, is told (with the record
  held) and reports the conflict to its host instead of acknowledging.
- Everything here is pure and decided by these functions only.
"""

from __future__ import annotations

import hashlib

from protocol.errors import LocalProtocolError
from protocol.tasks.messages import TaskRecord

Spec = tuple[str, bytes, int, bytes, float]
"""What a submission asks for: (role, sha256 of the input, priority, parent, timeout)."""


class IdempotencyConflict(LocalProtocolError):
    """The idempotency key names an existing task with another spec; nothing was submitted.

    Attributes:
        task_id: the existing task's id.
    """

    def __init__(self, task_id: bytes) -> None:
        super().__init__(
            f"idempotency key already names task {task_id.hex()} with another spec "
            "(role, input, priority, parent or timeout)"
        )
        self.task_id = task_id


def spec_for(role: str, data: bytes, priority: int, parent: bytes, timeout: float) -> Spec:
    """The spec of a submission (what must match for two submissions to be one task)."""
    return (role, hashlib.sha256(data).digest(), priority, parent, float(timeout))


def spec_of(record: TaskRecord) -> Spec:
    """The spec a record asks for."""
    return spec_for(record.role, record.input, record.priority, record.parent, record.timeout)


def record_order(record: TaskRecord) -> tuple[float, bytes]:
    """The order of two same-spec records of one task: the first is kept everywhere.

    The latest submission (by its origin's clock) first: a client retries at another peer, and
    a parent re-runs at another peer, because the first one failed, so the task's origin (where
    its objects are sent and its client waits) moves to where the client waits now. The digest
    of the signature breaks ties, so the order is total and the same at every peer.
    """
    return (-record.created, hashlib.sha256(record.sig).digest())


def kept_record(held: TaskRecord, received: TaskRecord) -> TaskRecord:
    """Which of two same-id records a peer holding `held` keeps on receiving `received`.

    Same spec: the first by `record_order`. Another spec: `held` (first wins; see the module
    invariants).
    """
    if spec_of(held) != spec_of(received):
        return held
    return received if record_order(received) < record_order(held) else held
