"""`DriverTaskPort`: the agents' `TaskPort` over a real peer's `peer.runtime.driver.Driver`.

Invariants:
- A child's id depends only on (parent, role, data), at any peer: it is submitted with the
  idempotency key "child:" + the first 40 hex digits of sha256(parent ‖ role ‖ data), scoped
  by its parent (`protocol.tasks.messages.task_id_of`), so an agent loop that repeats a
  delegation (a retried step, or an execution re-run at another peer after a takeover) names
  the same task instead of running the work twice. A child the key already names with
  another priority is that child: it is reused, not refused.
- Everything read here is this peer's gossiped view (`Node.tasks`, `Node.capable`): it may lag
  the network, never leads it.
- A child cancelled before any result was accepted is reported as outcome "cancelled"; an
  accepted result's outcome "fenced" (never accepted in practice) is reported as "failed", so
  agents only ever see the four outcomes of `ChildResult`.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from peer.agents.ports import ChildResult, TaskView, Usage
from peer.runtime.blobs import BlobUnavailable
from protocol.blobs import parse_blob_ref
from protocol.tasks.idempotency import IdempotencyConflict

if TYPE_CHECKING:
    from peer.runtime.blobs import BlobService
    from peer.runtime.driver import Driver
    from protocol.tasks.state import TaskState

_CHILD_OUTCOMES = ("ok", "failed", "timeout", "cancelled")


def child_key(parent: bytes, role: str, data: bytes) -> str:
    """The idempotency key of a child task: the same call gives the same key."""
    digest = hashlib.sha256(parent + role.encode() + data).hexdigest()
    return "child:" + digest[:40]


def task_view(state: TaskState) -> TaskView | None:
    """A task as agents see it; None while its record has not arrived here."""
    record = state.record
    if record is None:
        return None
    usage: Usage = state.accepted.usage if state.accepted is not None else (0, 0, 0)
    return TaskView(state.task_id, record.parent, record.role, record.input, state.state, usage)


class DriverTaskPort:
    """What an agent may do to the task network, done through this peer's driver.

    Args:
        driver: the running peer's driver (its node holds the gossiped task and peer state).
        blobs: fetches a child's output that came back as a blob reference (over 64 KiB);
            without it such an output is handed over as the reference text.
    """

    def __init__(self, driver: Driver, blobs: BlobService | None = None) -> None:
        self._driver = driver
        self._blobs = blobs

    def submit_child(self, parent: bytes, role: str, data: bytes, priority: int) -> bytes:
        """Submit a child task of `parent`; the same (parent, role, data) gives the same id.

        Raises:
            protocol.errors.LocalProtocolError: a field is out of bounds (e.g. input too large).
        """
        try:
            return self._driver.submit(
                role,
                data,
                parent=parent,
                priority=priority,
                idempotency_key=child_key(parent, role, data),
            )
        except IdempotencyConflict as conflict:
            return conflict.task_id

    async def wait_result(self, task_id: bytes) -> ChildResult:
        """Wait until the task has an accepted result or is cancelled without one."""
        result = await self._driver.wait_result(task_id)
        if result is None:
            return ChildResult("cancelled", b"", (0, 0, 0))
        outcome = result.outcome if result.outcome in _CHILD_OUTCOMES else "failed"
        output = result.output
        ref = parse_blob_ref(output)
        if ref is not None and self._blobs is not None:
            try:
                output = await self._blobs.get(ref[0], hints=[result.owner])
            except BlobUnavailable as exc:
                return ChildResult(
                    "failed", f"the output blob is unavailable: {exc}".encode(), result.usage
                )
        return ChildResult(outcome, output, result.usage)

    def suspend(self, task_id: bytes) -> None:
        """The execution of `task_id` waits on children: its slot is free meanwhile."""
        self._driver.suspend(task_id)

    def resume(self, task_id: bytes) -> None:
        """The execution of `task_id` runs again and counts its slot again."""
        self._driver.resume(task_id)

    def task(self, task_id: bytes) -> TaskView | None:
        """The task as known here, or None."""
        state = self._driver.node.task(task_id)
        return None if state is None else task_view(state)

    def children(self, task_id: bytes) -> list[TaskView]:
        """The known children of a task, oldest first."""
        views = (task_view(state) for state in self._driver.children_of(task_id))
        return [view for view in views if view is not None]

    def role_available(self, role: str) -> bool:
        """Whether some live peer (this one included) advertises `role`."""
        return bool(self._driver.node.capable(role))
