"""Task lifecycle events: one INFO line each, and the metrics observed at them.

The driver hands every note and command it applies to `TaskLifecycle.observe`, and calls
`submitted` and `ended` itself (a submission and an execution's end are calls, not notes).

Events (the `event` field of each line, logger `grapevine.tasks`), each from this peer's view:
- submitted: a new task was submitted here (a resubmission with the same idempotency key is
  not a new task and logs nothing).
- claimed / takeover: this peer's claim became the task's greatest; "takeover" when it is a
  later epoch than the first (an earlier owner was down, or its run is being replaced).
- started: an execution of the task started here.
- ended: an execution here ended with `outcome` (ok, failed, timeout) after `duration` s.
- fenced: an execution here was stopped (`reason`: a greater claim, an accepted result, a
  cancel, isolation, compaction) after `duration` s.
- result: the task submitted here has its accepted result (`outcome`, `seconds` since submit).
- cancelled: the task was cancelled (`reason`), as this peer learned it.

Invariants:
- Every line carries task_id (hex), role, epoch, peer (this peer's short id) and trace_id
  (the trace id of the trace context the task's record carries, empty without one), as
  `extra` fields the JSON format writes as keys; the text format has them in the message
  (`trace=` only when there is one).
- The same events open and close this peer's spans of the task (`tracing`: a claim span, and
  an execution span from its start to its end or fence; `peer.observability.tracing`).
- Nothing here changes the node: it only reads tasks' records (`Node.task`).
- The notes of stored objects replayed at a restart (`replaying`) are not events: a restart
  logs no old claims or results and observes no latencies hours long.
- With INFO disabled no line is built; with no `metrics` attached nothing is observed. Either
  way the cost per note is one `match`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from peer.observability.instruments import EventMetrics, drop_reason
from peer.observability.tracing import PeerTracing, trace_id_of
from protocol.effects import (
    CancelExecution,
    Command,
    Dropped,
    Note,
    ResultAccepted,
    StartExecution,
    TaskCancelled,
    TaskClaimed,
)
from protocol.identity import short_id
from protocol.node import Node
from protocol.tasks.state import TaskState
from protocol.wire import RUN_COUNTS

log = logging.getLogger("grapevine.tasks")


@dataclass(slots=True)
class _Run:
    role: str
    epoch: int
    started: float


class TaskLifecycle:
    """Logs each task lifecycle event of one peer and feeds `metrics` (see the module).

    Args:
        node: the peer's node, read for tasks' records.
        clock: monotonic seconds (execution durations).
        wall: wall-clock seconds (latencies from a task's creation time, which is wall-clock).
        tracing: this peer's spans of the tasks' claims and executions.
    """

    def __init__(
        self,
        node: Node,
        clock: Callable[[], float],
        wall: Callable[[], float],
        tracing: PeerTracing,
    ) -> None:
        self.metrics: EventMetrics | None = None
        """Where events are counted and timed; None observes nothing (set by the builder)."""
        self.replaying = False
        """True while the driver replays stored task objects: their notes are old news, so
        nothing is logged or observed (the executions they start are, as they start)."""
        self._node = node
        self._clock = clock
        self._wall = wall
        self.tracing = tracing
        self._peer = short_id(node.node_id)
        self._runs: dict[bytes, _Run] = {}
        self.run_counts = dict.fromkeys(RUN_COUNTS, 0)
        """This peer's executions since it started, as `RUN_COUNTS` names them (its peer
        state carries them to every dashboard: decision 64)."""

    def runs(self) -> tuple[int, ...]:
        """`run_counts` in `RUN_COUNTS` order."""
        return tuple(self.run_counts[name] for name in RUN_COUNTS)

    def submitted(self, task_id: bytes) -> None:
        """A new task was submitted here."""
        self._emit("submitted", task_id, self._role(task_id), 0)

    def ended(self, task_id: bytes, epoch: int, outcome: str) -> None:
        """An execution here reported its end (before the node hears of it)."""
        run = self._runs.get(task_id)
        if run is None or run.epoch != epoch:
            return  # fenced meanwhile: its end was logged then
        del self._runs[task_id]
        self.run_counts["ok" if outcome == "ok" else "failed"] += 1
        self.tracing.execution_ended(task_id, epoch, outcome)
        if self.metrics is not None:
            self.metrics.executions.labels(outcome).inc()
        duration = round(self._clock() - run.started, 6)
        self._emit("ended", task_id, run.role, epoch, outcome=outcome, duration=duration)

    def observe(self, note: Note | Command) -> None:
        """Log and count what `note` says about a task (other notes pass through)."""
        if self.replaying and not isinstance(note, StartExecution):
            return
        metrics = self.metrics
        match note:
            case StartExecution(task_id=task_id, epoch=epoch, role=role):
                self._runs[task_id] = _Run(role, epoch, self._clock())
                st = self._node.task(task_id)
                duplicate = st is not None and st.execution_count() > 1
                self.run_counts["started"] += 1
                self.run_counts["duplicates"] += duplicate
                self.tracing.execution_started(task_id, role, epoch, self._traceparent(task_id))
                if metrics is not None:
                    self._observe_start(metrics, st, duplicate)
                self._emit("started", task_id, role, epoch)
            case CancelExecution(task_id=task_id, epoch=epoch, reason=reason):
                run = self._runs.get(task_id)
                if run is None or run.epoch != epoch:
                    return
                del self._runs[task_id]
                outcome = "cancelled" if reason == "cancelled" else "fenced"
                self.run_counts[outcome] += 1
                self.tracing.execution_ended(task_id, epoch, outcome, reason)
                if metrics is not None:
                    metrics.executions.labels(outcome).inc()
                duration = round(self._clock() - run.started, 6)
                self._emit("fenced", task_id, run.role, epoch, reason=reason, duration=duration)
            case TaskClaimed(task_id=task_id, owner=owner, epoch=epoch):
                if owner != self._node.node_id:
                    return
                if metrics is not None:
                    metrics.claims.inc()
                if epoch > 1:
                    self.run_counts["takeovers"] += 1
                event = "takeover" if epoch > 1 else "claimed"
                role = self._role(task_id)
                self.tracing.claimed(task_id, role, epoch, self._traceparent(task_id))
                self._emit(event, task_id, role, epoch)
            case ResultAccepted(task_id=task_id, epoch=epoch, outcome=outcome, flipped=False):
                st = self._node.task(task_id)
                rec = st.record if st is not None else None
                if rec is None or rec.origin != self._node.node_id:
                    return  # latency is the submitter's: where the client waits
                seconds = round(max(0.0, self._wall() - rec.created), 6)
                if metrics is not None:
                    metrics.submit_to_result.observe(seconds)
                self._emit("result", task_id, rec.role, epoch, outcome=outcome, seconds=seconds)
            case TaskCancelled(task_id=task_id, reason=reason, outcome=outcome):
                epoch = self._epoch(task_id)
                role = self._role(task_id)
                self._emit("cancelled", task_id, role, epoch, reason=reason, outcome=outcome)
            case Dropped(reason=reason):
                if metrics is not None:
                    metrics.dropped.labels(drop_reason(reason)).inc()
            case _:
                pass

    def _observe_start(self, metrics: EventMetrics, st: TaskState | None, duplicate: bool) -> None:
        if duplicate:
            metrics.duplicates.inc()
        if st is not None and st.record is not None:
            metrics.submit_to_start.observe(max(0.0, self._wall() - st.record.created))

    def _role(self, task_id: bytes) -> str:
        st = self._node.task(task_id)
        return st.record.role if st is not None and st.record is not None else ""

    def _traceparent(self, task_id: bytes) -> str:
        st = self._node.task(task_id)
        return st.record.traceparent if st is not None and st.record is not None else ""

    def _epoch(self, task_id: bytes) -> int:
        st = self._node.task(task_id)
        return st.claim.epoch if st is not None and st.claim is not None else 0

    def _emit(self, event: str, task_id: bytes, role: str, epoch: int, **fields: object) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        text = task_id.hex()
        trace = trace_id_of(self._traceparent(task_id))
        detail = "".join(f" {key}={value}" for key, value in fields.items())
        log.info(
            "task %s %s: role=%s epoch=%d peer=%s%s%s",
            text,
            event,
            role,
            epoch,
            self._peer,
            detail,
            f" trace={trace}" if trace else "",
            extra={
                "event": event,
                "task_id": text,
                "role": role,
                "epoch": epoch,
                "peer": self._peer,
                "trace_id": trace,
                **fields,
            },
        )
