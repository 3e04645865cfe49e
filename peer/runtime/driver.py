"""The asyncio driver: owns one `protocol.node.Node` and applies its `Effects`.

Invariants:
- Everything runs on the event loop thread, and only this driver calls the node, so the
  protocol needs no locks. The clock is `loop.time()` (monotonic).
- Effects are applied in order, fully: persists first, then sends, then notifications. The
  persists are group-committed by `disk` (`peer.runtime.group_commit`, decision 24): one fsync
  per turn of the loop, nothing sent before what it announces is on disk, and a failed write
  makes the peer `degraded` until disk catches up.
- A submission is acknowledged only on disk: `submit` raises `NotDurable` unless every record
  so far, its own included, is written.
- Exactly one timer handle is armed, at the latest `wake_at`.
- Notifications go to `notifications` (`peer.runtime.hub`): its subscriber hubs (`hub` for
  membership and user events, `task_hub` for task notes) and the waiters of `join`,
  `wait_replicated` and `wait_result`. The steps of executions running here (model calls,
  tool calls, delegations) go to `progress`, local to this peer.
- Executions: `StartExecution` and `CancelExecution` become work on the attached
  `peer.runtime.executor.Executor`; its completions come back through `complete`, a node call
  like any other. Without an executor nothing runs (seed-only peers serve no roles).
- Restart: `restore` replays stored task objects in one batch (one persist transaction).
- Task lifecycle: every note and command applied, each new submission and each execution's
  end also go to `lifecycle` (`peer.observability.lifecycle`), which logs them, feeds the
  peer's metrics and opens and closes its spans; a command goes there before the executor,
  so an execution's span exists when its asyncio task is made.
- Traces: `tracing` (`peer.observability.tracing`; from the `OTEL_*` environment unless given)
  traces each submission here, and its trace context goes into the task's record; each
  execution runs in a context holding its span (the executor's `context_of`).
- Task trees: `children_of` reads the node's parent -> children index (`Node.children`). A
  parent waiting on its children `suspend`s (node and executor release its slot) and
  `resume`s when it goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar, assert_never

from peer.observability.lifecycle import TaskLifecycle
from peer.observability.tracing import PeerTracing
from peer.runtime.executor import Executor, Usage, Work
from peer.runtime.group_commit import GroupCommit, NotDurable, RecordStore
from peer.runtime.hub import NoteHub, Notifications
from peer.runtime.progress import ProgressLog, Step
from protocol.effects import CancelExecution, Command, Effects, Send, StartExecution
from protocol.errors import LocalProtocolError
from protocol.identity import short_id
from protocol.node import Node
from protocol.tasks.listing import PageQuery
from protocol.tasks.messages import Checkpoint, Result, task_id_of
from protocol.tasks.state import TaskState
from protocol.wire import ModelUsage, Status

_T = TypeVar("_T")

log = logging.getLogger(__name__)

MEMBER_SAVE_INTERVAL = 10.0
"""Seconds between saves of the membership hints used to re-join after a restart."""
RUNS_INTERVAL = 2.0
"""Seconds between two readings of this peer's run counts for its peer state (the node
gossips a change at its slowest rate, decision 64)."""
FETCH_POLL = 0.02
"""Seconds between looks for the answer to a read of a task this peer does not hold."""
READ_BACKOFF = (1.0, 8.0)
"""A wait for the result of a task this peer is not told of asks its holders after 1 s, then
at doubling intervals up to 8 s (see `wait_result`)."""


class Sender(Protocol):
    """Where sends go (`peer.runtime.transport.Transport`, or a fake in tests)."""

    def send(self, addr: str, data: bytes, probe: bool = False) -> None: ...


class Driver:
    """Runs one node on the event loop.

    Args:
        node: the protocol node, created with `clock()` as its `now`.
        sender: delivers sealed envelopes (the transport).
        store: makes `Persist` effects and membership hints durable.
        clock: monotonic seconds; defaults to the running loop's clock.
        wall: wall-clock seconds, for timestamps shown to users and membership hints.
        tracing: the peer's traces; by default what the `OTEL_*` environment configures
            (`PeerTracing.from_environment`: nothing, unless an exporter is named).
        writer: where the group commits run (the peer's writer thread), or None: on the loop.
    """

    def __init__(
        self,
        node: Node,
        sender: Sender,
        store: RecordStore,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        tracing: PeerTracing | None = None,
        writer: concurrent.futures.Executor | None = None,
    ) -> None:
        self.node = node
        self._sender = sender
        self._store = store
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self._wall = wall
        self._wall_offset: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._save_timer: asyncio.TimerHandle | None = None
        self._runs_timer: asyncio.TimerHandle | None = None
        self.notifications = Notifications(node, wall)
        self.progress = ProgressLog(wall, forward=self._report_step)
        """The steps of the executions running here and of the tasks submitted here
        (`peer.runtime.progress`)."""
        self.tracing = tracing or PeerTracing.from_environment(short_id(node.node_id))
        """Traces submissions here and this peer's claims and executions."""
        self.lifecycle = TaskLifecycle(node, self._clock, wall, self.tracing)
        """Logs task lifecycle events, observes their metrics and spans."""
        self.executor: Executor | None = None
        self.leaving = False
        self.hints: set[str] = set()
        """Addresses remembered from a previous run: tried on join, never kept as seeds."""
        self.disk = GroupCommit(store, self._loop, self._deliver, writer, self._send)
        """Writes the node's records, one fsync per turn of the loop (on `writer`, the peer's
        writer thread, if given), and holds back the effects that wait for them (`degraded`,
        `write_failures`, `on_written` live there)."""

    @property
    def hub(self) -> NoteHub:
        """Membership changes and user events, for subscribers."""
        return self.notifications.members

    @property
    def task_hub(self) -> NoteHub:
        """Task notes, for subscribers."""
        return self.notifications.tasks

    def start(self) -> None:
        """Arm the node's timers and the periodic save of membership hints."""
        self.disk.apply(self.node.tick(self._clock()))
        self._save_timer = self._loop.call_later(MEMBER_SAVE_INTERVAL, self._periodic_save)
        self._runs_timer = self._loop.call_later(RUNS_INTERVAL, self._advertise_runs)

    def stop(self) -> None:
        """Disarm every timer, save membership hints and end subscriptions."""
        for handle in (self._timer, self._save_timer, self._runs_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._save_timer = self._runs_timer = None
        self.disk.commit()
        self.disk.write([], retry=True)
        self.save_members()
        self.notifications.close()
        self.progress.close()
        self.tracing.shutdown()

    # Inputs

    def receive(self, src: str, data: bytes) -> None:
        """Hand one opened envelope from `src` to the node."""
        self.disk.apply(self.node.handle(self._clock(), src, data))

    def join_now(self, addrs: list[str]) -> None:
        """Ask `addrs` for their state without waiting for an answer. Addresses in `hints`
        (members remembered from a previous run) are tried once, not kept as seeds."""
        seeds = [a for a in addrs if a not in self.hints]
        hinted = [a for a in addrs if a in self.hints]
        if seeds:
            self.disk.apply(self.node.join(self._clock(), seeds))
        if hinted:
            self.disk.apply(self.node.join(self._clock(), hinted, remember=False))

    async def join(self, addrs: list[str], timeout: float) -> str | None:
        """Ask `addrs` to let us join; return the address of the first that answered.

        Returns:
            The seed address that answered within `timeout` seconds, or None.
        """
        return await self.notifications.join(lambda: self.join_now(addrs), timeout)

    def broadcast(self, name: str, payload: bytes) -> tuple[bytes, int]:
        """Broadcast a user event; return its (origin, ltime).

        Raises:
            LocalProtocolError: the name or payload exceeds the wire limits.
        """
        self.disk.apply(self.node.broadcast(self._clock(), name, payload))
        return self.node.node_id, self.node.ltime

    def set_state(
        self, roles: tuple[str, ...], free_slots: int, queue_len: int, load: float
    ) -> None:
        """Advertise this peer's roles and load (see `Node.set_state`)."""
        self.disk.apply(self.node.set_state(self._clock(), roles, free_slots, queue_len, load))

    def set_usage(self, agents: int, spend_micro: int, models: tuple[ModelUsage, ...] = ()) -> None:
        """Advertise this peer's agents, model spend and its models' spend and breakers (see
        `Node.set_usage`)."""
        self.disk.apply(self.node.set_usage(self._clock(), agents, spend_micro, models))

    def wall(self) -> float:
        """Wall-clock seconds, as shown to users."""
        return self._wall()

    def wall_of(self, node_time: float) -> float:
        """The wall-clock time of a moment given in the node's (monotonic) time, by the
        clocks' offset as first read (so one moment reads the same each time)."""
        if self._wall_offset is None:
            self._wall_offset = self._wall() - self._clock()
        return node_time + self._wall_offset

    # Tasks

    def attach(self, executor: Executor) -> None:
        """Run the executions the node starts on `executor` (declare its roles with `serve`)."""
        self.executor = executor
        executor.on_done = self.complete
        if self.tracing.enabled:
            tracing = self.tracing
            executor.context_of = lambda work: tracing.execution_context(work.task_id, work.epoch)

    def serve(self, roles: tuple[str, ...], max_running: int) -> None:
        """Declare the roles this peer executes and how many run at once (`Node.serve`)."""
        self.disk.apply(self.node.serve(self._clock(), roles, max_running))

    def restore(self, raws: Iterable[bytes]) -> int:
        """Replay stored task objects (`Node.restore`) as one batch; return how many.

        Call it before joining and before `serve`, so that nothing is claimed on the strength
        of a partial replay.
        """
        return self._replay(lambda now, raw: self.node.restore(now, raw), raws)

    def restore_tombstones(self, rows: Iterable[tuple[bytes, bytes]]) -> int:
        """Replay stored tombstones, (task id, stored form) each (`Node.restore_tombstone`),
        as one batch, before `restore`; return how many."""
        return self._replay(lambda now, row: self.node.restore_tombstone(now, *row), rows)

    def _replay(self, replay: Callable[[float, _T], Effects], items: Iterable[_T]) -> int:
        now = self._clock()
        merged = Effects()
        count = 0
        for item in items:
            fx = replay(now, item)
            merged.sends += fx.sends
            merged.persists += fx.persists
            merged.notes += fx.notes
            merged.commands += fx.commands
            merged.wake_at = fx.wake_at
            count += 1
        if count:
            # Replayed objects are old news: their notes are not lifecycle events.
            self.lifecycle.replaying = True
            try:
                self.disk.apply(merged)
            finally:
                self.lifecycle.replaying = False
        return count

    def submit(
        self,
        role: str,
        data: bytes,
        *,
        priority: int = 0,
        parent: bytes = b"",
        idempotency_key: str = "",
        nonce: bytes = b"",
        timeout: float = 0.0,
        created: float | None = None,
        traceparent: str = "",
        queue_timeout: float = 0.0,
        durably: list[asyncio.Future[bool]] | None = None,
    ) -> bytes:
        """Submit a task here; return its id (`Node.submit`). `parent` is the id of the task
        that delegates this one (empty for a root task). `traceparent` is the submitter's W3C
        trace context (an HTTP client's header), the submission's parent when no span is
        current here; by default, the parent task's.

        Raises:
            LocalProtocolError: a field is out of bounds.
            NotDurable: the task's record, or an earlier one, could not be written to disk
                here; the node holds the task nonetheless.
        """
        inherited = traceparent
        if not inherited and parent:
            held = self.node.task(parent)
            inherited = held.record.traceparent if held is not None and held.record else ""
        with self.tracing.submission(role, inherited) as traced:
            fx, task_id = self.node.submit(
                self._clock(),
                role,
                data,
                priority=priority,
                parent=parent,
                idempotency_key=idempotency_key,
                nonce=nonce,
                timeout=timeout,
                created=self._wall() if created is None else created,
                traceparent=traced.traceparent,
                queue_timeout=queue_timeout,
            )
            traced.submitted(task_id)
            # A resubmission (same idempotency key) persists nothing: the record it names may
            # be among the unwritten ones, so those are retried whatever the call brought.
            if fx.persists:
                self.lifecycle.submitted(task_id)
            if durably is None:
                # The caller waits for this answer: commit now, with whatever else waits.
                if not self.disk.apply(fx, retry=True, commit_now=True):
                    raise NotDurable(task_id, self.disk.degraded or "unknown")
            else:
                durably.append(self.disk.apply_then(fx))
        return task_id

    async def submit_durably(self, role: str, data: bytes, **kwargs: Any) -> bytes:
        """`submit`, but the write joins this turn's group commit, so the submissions of many
        clients in one turn of the loop cost one fsync; returns once it is on disk.

        Raises:
            As `submit`.
        """
        commit: list[asyncio.Future[bool]] = []
        task_id = self.submit(role, data, durably=commit, **kwargs)
        if not await commit[0]:
            raise NotDurable(task_id, self.disk.degraded or "unknown")
        return task_id

    def task_id_for(
        self,
        role: str,
        data: bytes,
        *,
        priority: int = 0,
        parent: bytes = b"",
        idempotency_key: str = "",
        nonce: bytes = b"",
        timeout: float = 0.0,
    ) -> bytes:
        """The id `submit` gives a task with the same arguments, known before it is submitted
        (an input blob is pushed to its task's designated holders before the record exists)."""
        digest = hashlib.sha256(data).digest()
        node_id = self.node.node_id
        return task_id_of(
            node_id, idempotency_key, nonce, role, digest, priority, parent, float(timeout)
        )

    async def wait_replicated(self, task_id: bytes, timeout: float) -> bool:
        """Wait until the task submitted here is held by enough other peers (`TaskReplicated`).

        Returns:
            True at once if it already is, else whether it became so within `timeout` seconds.
        """
        return await self.notifications.wait_replicated(task_id, timeout)

    async def wait_result(self, task_id: bytes, timeout: float | None = None) -> Result | None:
        """Wait for the accepted result of a task (a child of a task running here, say).

        The task need not be known yet: its record may still be on its way. While this peer
        is not in the task's audience, its news does not come here by itself (a parent taken
        over waits on children its dead owner submitted), so it asks the task's holders now and
        then (`READ_BACKOFF`).

        Returns:
            The accepted result, at once if there already is one; None if the task is
            cancelled with no accepted result, `timeout` seconds passed, or the driver stopped.
        """
        deadline = None if timeout is None else self._clock() + timeout
        interval = READ_BACKOFF[0]
        while True:
            step = interval if deadline is None else min(interval, deadline - self._clock())
            result = await self.notifications.wait_result(task_id, max(step, 0.0))
            st = self.node.task(task_id)
            if result is not None or (st is not None and st.cancel is not None):
                # The node may hold it before it is on disk here (a commit in flight): a
                # result this peer authored is not shown before it would survive a crash.
                await self.saved()
                return result
            if self.notifications.closed or (deadline is not None and self._clock() >= deadline):
                return None
            if not self.node.told_of(task_id):
                self.disk.apply(self.node.fetch(self._clock(), [task_id]))
            interval = min(interval * 2, READ_BACKOFF[1])

    def children_of(self, task_id: bytes) -> list[TaskState]:
        """The tasks whose record names `task_id` as parent, oldest first (created, then id)."""
        return self.node.children(task_id)

    def suspend(self, task_id: bytes) -> None:
        """A task running here waits (on its children): release its slot in the executor and
        the node (`Node.suspend`), so other work can run meanwhile. A no-op if it is not
        running here."""
        if self.executor is not None:
            self.executor.suspend(task_id)  # first: work the node starts now finds the slot
        self.disk.apply(self.node.suspend(self._clock(), task_id))

    def resume(self, task_id: bytes) -> None:
        """A suspended task goes on: it holds its slot again at once (`Node.resume`)."""
        self.disk.apply(self.node.resume(self._clock(), task_id))
        if self.executor is not None:
            self.executor.resume(task_id)

    async def fetch(self, task_ids: list[bytes], timeout: float) -> None:
        """Ask the peers holding these tasks for them (`Node.fetch`), and wait until each has a
        record here or `timeout` seconds passed: a read of a task this peer does not hold."""
        self.disk.apply(self.node.fetch(self._clock(), task_ids))
        deadline = self._clock() + timeout
        while self._clock() < deadline:
            if all((st := self.node.task(t)) is not None and st.record for t in task_ids):
                return
            await asyncio.sleep(FETCH_POLL)

    def ask_task_pages(self, peers: list[bytes], query: PageQuery) -> dict[bytes, int]:
        """Ask `peers` for their page of a network listing (`Node.ask_task_pages`); return the
        request id sent to each (its page: `Node.task_page`)."""
        fx, asked = self.node.ask_task_pages(self._clock(), peers, query)
        self.disk.apply(fx)
        return asked

    def cancel_task(
        self, task_id: bytes, reason: str = "cancelled", outcome: str = "cancelled"
    ) -> None:
        """Cancel a task network-wide (`Node.cancel`); it ends `outcome`."""
        self.disk.apply(self.node.cancel(self._clock(), task_id, reason, outcome))

    def expire_task(self, task_id: bytes, reason: str) -> bool:
        """End a queued task nobody claimed, as its arbiter (`Node.expire`); whether it was."""
        fx, ended = self.node.expire(self._clock(), task_id, reason)
        self.disk.apply(fx)
        return ended

    def complete(
        self, task_id: bytes, epoch: int, outcome: str, output: bytes, usage: Usage
    ) -> None:
        """Report the end of an execution to the node (`Node.complete`); the executor calls it.

        An outcome or output the node refuses is reported as "failed" with the reason, so the
        task still gets a result.
        """
        self.lifecycle.ended(task_id, epoch, outcome)
        try:
            fx = self.node.complete(self._clock(), task_id, epoch, outcome, output, usage)
        except LocalProtocolError as exc:
            log.warning("task %s: the node refused its result: %s", task_id.hex()[:12], exc)
            reason = f"the result was refused: {exc}".encode()
            fx = self.node.complete(self._clock(), task_id, epoch, "failed", reason, usage)
        self.disk.apply(fx)

    def checkpoint(self, task_id: bytes, epoch: int, data: bytes) -> int:
        """Record step `data` of this peer's run of the task under `epoch` (`Node.checkpoint`):
        signed, written with this turn's group commit and sent to the task's replicas and
        audience with the run's next objects (at `saved`, or `LINGER` later at the latest), so
        whoever takes the task over resumes from it. Returns its sequence number.

        Raises:
            LocalProtocolError: this peer does not run the task under `epoch`, `data` is over
                `MAX_CHECKPOINT_BYTES`, or the run has `MAX_CHECKPOINTS` already.
        """
        fx, made = self.node.checkpoint(self._clock(), task_id, epoch, data)
        self.disk.apply(fx)
        return made.seq

    async def saved(self) -> bool:
        """Wait until every effect applied so far is delivered: its records on disk here and
        its sends handed to the transport (`GroupCommit.flushed`), the claims and checkpoints
        still waiting for more of their run (`protocol.tasks.core.LINGER`) included."""
        self.disk.apply(self.node.send_lingering(self._clock()))
        return await self.disk.flushed()

    def checkpoints(self, task_id: bytes) -> list[Checkpoint]:
        """Every step of the task's runs held here, ordered by (epoch, owner, seq)."""
        return self.node.checkpoints(task_id)

    async def leave(self, timeout: float = 3.0) -> bool:
        """Gossip our leave and wait until it was sent to enough peers or `timeout` passed.

        Returns:
            True if the node reported the leave as done within the timeout.
        """
        self.leaving = True
        self.disk.apply(self.node.leave(self._clock()))
        deadline = self._clock() + timeout
        while not self.node.leave_done() and self._clock() < deadline:
            await asyncio.sleep(0.05)
        return self.node.leave_done()

    # Membership hints

    def remember_members(self, rows: Iterable[tuple[bytes, str, int]]) -> None:
        """Hand the node the members saved before a restart (`Store.load_members` rows), so
        it ranks tasks' homes among them until it learns of them again (decision 51)."""
        wall = self._wall()
        self.node.remember_members(
            self._clock(), [(node_id, max(0.0, wall - seen)) for node_id, _, seen in rows]
        )

    def save_members(self) -> None:
        """Save the members worth re-joining after a restart (all but us and those that left)."""
        now, wall = self._clock(), self._wall()
        rows = [
            (m.node_id, m.addr, int(wall if m.up else wall - (now - m.since)))
            for m in self.node.members()
            if m.node_id != self.node.node_id and m.status != Status.LEFT
        ]
        try:
            self._store.save_members(rows)
        except Exception:
            log.exception("saving membership hints failed")

    # Model usage

    def load_model_usage(self) -> dict[str, dict[str, object]]:
        """The model usage totals saved before a restart (empty if none or unreadable)."""
        try:
            return self._store.load_model_usage()
        except Exception:
            log.exception("reading the saved model usage failed; counting from zero")
            return {}

    def save_model_usage(self, usage: Mapping[str, Mapping[str, object]]) -> None:
        """Save the model usage totals (`ModelClient.usage_totals`); a failure is logged and
        the next save tries again."""
        try:
            self._store.save_model_usage(usage)
        except Exception:
            log.exception("saving the model usage failed")

    def set_runs(self, runs: tuple[int, ...]) -> None:
        """Advertise this peer's run counts (see `Node.set_runs`)."""
        self.disk.apply(self.node.set_runs(self._clock(), runs))

    def _advertise_runs(self) -> None:
        self.set_runs(self.lifecycle.runs())
        self._runs_timer = self._loop.call_later(RUNS_INTERVAL, self._advertise_runs)

    def _periodic_save(self) -> None:
        self.disk.write([], retry=True)
        self.save_members()
        self._save_timer = self._loop.call_later(MEMBER_SAVE_INTERVAL, self._periodic_save)

    # Effects

    def _on_timer(self) -> None:
        self._timer = None
        self.disk.apply(self.node.tick(self._clock()))

    def _deliver(self, fx: Effects, durable: bool) -> None:
        if durable or not fx.persists:
            for send in fx.sends:
                self._send(send)
        for note in fx.notes:
            self.notifications.observe(note)
            self.lifecycle.observe(note)
            self.progress.observe(note)
        for command in fx.commands:
            self.lifecycle.observe(command)
            self._execute(command)
            self.notifications.observe(command)
        self._arm(fx.wake_at)

    def _report_step(self, step: Step) -> None:
        # Told to the task's origin (protocol.tasks.progress). A step made after its run ended
        # here (a Python role's late report) stays this peer's own.
        with contextlib.suppress(LocalProtocolError):
            fx = self.node.report_progress(
                self._clock(), step.task_id, step.epoch, step.kind, step.time, step.detail
            )
            self.disk.apply(fx)

    def _send(self, send: Send) -> None:
        self._sender.send(send.addr, send.data, send.probe)

    def _arm(self, wake_at: float | None) -> None:
        if self._timer is not None:
            if wake_at is not None and self._timer.when() == wake_at:
                return
            self._timer.cancel()
            self._timer = None
        if wake_at is not None:
            self._timer = self._loop.call_at(wake_at, self._on_timer)

    def _execute(self, command: Command) -> None:
        """Hand the executions the node starts and stops to the executor."""
        match command:
            case StartExecution(task_id, epoch, role, data, priority, timeout, parent):
                if self.executor is not None:
                    work = Work(task_id, epoch, role, data, priority, timeout, parent)
                    self.executor.start(work)
                else:
                    log.warning("task %s started with no executor attached", task_id.hex()[:12])
            case CancelExecution(task_id, epoch, reason):
                log.debug("task %s epoch %d stopped: %s", task_id.hex()[:12], epoch, reason)
                if self.executor is not None:
                    self.executor.cancel(task_id, epoch)
            case _:
                assert_never(command)
