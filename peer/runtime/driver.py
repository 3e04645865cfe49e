"""The asyncio driver: owns one `protocol.node.Node` and applies its `Effects`.

Invariants:
- Everything runs on the event loop thread, and only this driver calls the node, so the
  protocol needs no locks. The clock is `loop.time()` (monotonic).
- Effects are applied in order, fully: persists first (one `put_many` transaction), then sends,
  then notifications. If the persist fails, the sends of that call are not sent (they might
  announce a fact that is not durable) and the error is logged.
- Exactly one timer handle is armed, at the latest `wake_at`.
- Notifications reach subscribers through a `NoteHub`: a buffer of the most recent
  `RECENT_NOTES` plus one bounded queue per subscriber. A subscriber that falls
  `SUBSCRIBER_QUEUE` notes behind is dropped (its queue ends with `None`); it never blocks us.
  Membership and user events go to `hub`, task notes to `task_hub`, so a busy task stream
  cannot push membership changes out of the recent buffer.
- Executions: `StartExecution` and `CancelExecution` become work on the attached
  `peer.runtime.executor.Executor`; its completions come back through `complete`, a node call
  like any other. Without an executor nothing runs (seed-only peers serve no roles).
- Restart: `restore` replays stored task objects in one batch (one persist transaction).
- Task trees: every task record the node applies passes through `_apply` as a "task" persist,
  so the parent -> children index (`children_of`) is kept there, whichever way the record came
  (submitted here, gossip, anti-entropy, restore). A parent waiting on its children `suspend`s
  (node and executor release its slot) and `resume`s when it goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from peer.runtime.executor import Executor, Usage, Work
from protocol.effects import (
    CancelExecution,
    Dropped,
    Effects,
    EventReceived,
    JoinSucceeded,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    MemberSuspected,
    MemberUpdated,
    Note,
    Persist,
    ResultAccepted,
    StallDetected,
    StartExecution,
    TaskCancelled,
    TaskClaimed,
    TaskReplicated,
)
from protocol.errors import LocalProtocolError
from protocol.identity import short_id
from protocol.node import Node
from protocol.tasks import TaskState
from protocol.wire import Result, Status

log = logging.getLogger(__name__)

RECENT_NOTES = 1000
SUBSCRIBER_QUEUE = 1000
MEMBER_SAVE_INTERVAL = 10.0
"""Seconds between saves of the membership hints used to re-join after a restart."""


class Sender(Protocol):
    """Where sends go (`peer.runtime.transport.Transport`, or a fake in tests)."""

    def send(self, addr: str, data: bytes) -> None: ...


class RecordStore(Protocol):
    """The durable side the driver needs (`peer.runtime.store.Store`, or a fake in tests)."""

    def put_many(self, records: Iterable[Persist]) -> None: ...

    def save_members(self, rows: Iterable[tuple[bytes, str, int]]) -> None: ...


@dataclass(frozen=True, slots=True)
class Observed:
    """A notification as subscribers see it: wall-clock time, the note, the member's address."""

    time: float
    note: Note
    addr: str | None


class NoteHub:
    """Fan-out of `Observed` notes to any number of bounded subscriber queues."""

    def __init__(self, recent: int = RECENT_NOTES, queue_size: int = SUBSCRIBER_QUEUE) -> None:
        self.recent: deque[Observed] = deque(maxlen=recent)
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[Observed | None]] = set()

    def subscribe(self) -> asyncio.Queue[Observed | None]:
        """Return a queue receiving every note published from now on; `None` ends it."""
        queue: asyncio.Queue[Observed | None] = asyncio.Queue(self._queue_size + 1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Observed | None]) -> None:
        """Stop delivering to `queue`."""
        self._subscribers.discard(queue)

    def publish(self, item: Observed) -> None:
        """Buffer `item` and deliver it to every subscriber, dropping those that lag."""
        self.recent.append(item)
        for queue in list(self._subscribers):
            if queue.qsize() >= self._queue_size:
                self._end(queue)
            else:
                queue.put_nowait(item)

    def close(self) -> None:
        """End every subscription."""
        for queue in list(self._subscribers):
            self._end(queue)

    def _end(self, queue: asyncio.Queue[Observed | None]) -> None:
        self._subscribers.discard(queue)
        queue.put_nowait(None)  # the queue has one slot more than the lag limit


_PUBLISHED = (
    MemberJoined,
    MemberUpdated,
    MemberSuspected,
    MemberDown,
    MemberRecovered,
    EventReceived,
)
_TASK_NOTES = (
    TaskReplicated,
    TaskClaimed,
    StartExecution,
    CancelExecution,
    ResultAccepted,
    TaskCancelled,
)


class Driver:
    """Runs one node on the event loop.

    Args:
        node: the protocol node, created with `clock()` as its `now`.
        sender: delivers sealed envelopes (the transport).
        store: makes `Persist` effects and membership hints durable.
        clock: monotonic seconds; defaults to the running loop's clock.
        wall: wall-clock seconds, for timestamps shown to users and membership hints.
    """

    def __init__(
        self,
        node: Node,
        sender: Sender,
        store: RecordStore,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.hub = NoteHub()
        self._sender = sender
        self._store = store
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self._wall = wall
        self._timer: asyncio.TimerHandle | None = None
        self._save_timer: asyncio.TimerHandle | None = None
        self._join_waiters: list[asyncio.Future[str]] = []
        self._replication_waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._result_waiters: dict[bytes, list[asyncio.Future[Result | None]]] = {}
        """Task id -> ids of the tasks naming it as parent (see `_apply`)."""
        self.task_hub = NoteHub()
        self.executor: Executor | None = None
        self.joined = asyncio.Event()
        """Set once a join request was answered (this run)."""
        self.leaving = False
        self.hints: set[str] = set()
        """Addresses remembered from a previous run: tried on join, never kept as seeds."""

    def start(self) -> None:
        """Arm the node's timers and the periodic save of membership hints."""
        self._apply(self.node.tick(self._clock()))
        self._save_timer = self._loop.call_later(MEMBER_SAVE_INTERVAL, self._periodic_save)

    def stop(self) -> None:
        """Disarm every timer, save membership hints and end subscriptions."""
        for handle in (self._timer, self._save_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._save_timer = None
        self.save_members()
        self.hub.close()
        self.task_hub.close()
        for waiters in self._replication_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
        for task_id in list(self._result_waiters):
            self._resolve(task_id, None)

    # Inputs

    def receive(self, src: str, data: bytes) -> None:
        """Hand one opened envelope from `src` to the node."""
        self._apply(self.node.handle(self._clock(), src, data))

    def join_now(self, addrs: list[str]) -> None:
        """Ask `addrs` for their state without waiting for an answer. Addresses in `hints`
        (members remembered from a previous run) are tried once, not kept as seeds."""
        seeds = [a for a in addrs if a not in self.hints]
        hinted = [a for a in addrs if a in self.hints]
        if seeds:
            self._apply(self.node.join(self._clock(), seeds))
        if hinted:
            self._apply(self.node.join(self._clock(), hinted, remember=False))

    async def join(self, addrs: list[str], timeout: float) -> str | None:
        """Ask `addrs` to let us join; return the address of the first that answered.

        Returns:
            The seed address that answered within `timeout` seconds, or None.
        """
        waiter: asyncio.Future[str] = self._loop.create_future()
        self._join_waiters.append(waiter)
        try:
            self.join_now(addrs)
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return None
        finally:
            self._join_waiters.remove(waiter)

    def broadcast(self, name: str, payload: bytes) -> tuple[bytes, int]:
        """Broadcast a user event; return its (origin, ltime).

        Raises:
            LocalProtocolError: the name or payload exceeds the wire limits.
        """
        self._apply(self.node.broadcast(self._clock(), name, payload))
        return self.node.node_id, self.node.ltime

    def set_state(
        self, roles: tuple[str, ...], free_slots: int, queue_len: int, load: float
    ) -> None:
        """Advertise this peer's roles and load (see `Node.set_state`)."""
        self._apply(self.node.set_state(self._clock(), roles, free_slots, queue_len, load))

    def wall(self) -> float:
        """Wall-clock seconds, as shown to users."""
        return self._wall()

    # Tasks

    def attach(self, executor: Executor) -> None:
        """Run the executions the node starts on `executor` (declare its roles with `serve`)."""
        self.executor = executor
        executor.on_done = self.complete

    def serve(self, roles: tuple[str, ...], max_running: int) -> None:
        """Declare the roles this peer executes and how many run at once (`Node.serve`)."""
        self._apply(self.node.serve(self._clock(), roles, max_running))

    def restore(self, raws: Iterable[bytes]) -> int:
        """Replay stored task objects (`Node.restore`), as one batch; return how many.

        Call it before joining and before `serve`, so that nothing is claimed on the strength
        of a partial replay.
        """
        now = self._clock()
        merged = Effects()
        count = 0
        for raw in raws:
            fx = self.node.restore(now, raw)
            merged.sends += fx.sends
            merged.persists += fx.persists
            merged.notes += fx.notes
            merged.wake_at = fx.wake_at
            count += 1
        if count:
            self._apply(merged)
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
    ) -> bytes:
        """Submit a task here; return its id (`Node.submit`). `parent` is the id of the task
        that delegates this one (empty for a root task).

        Raises:
            LocalProtocolError: a field is out of bounds.
        """
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
        )
        self._apply(fx)
        return task_id

    async def wait_replicated(self, task_id: bytes, timeout: float) -> bool:
        """Wait until the task submitted here is held by enough other peers (`TaskReplicated`).

        Returns:
            True at once if it already is, else whether it became so within `timeout` seconds.
        """
        state = self.node.task(task_id)
        if state is None:
            return False
        if state.replicated:
            return True
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._replication_waiters.setdefault(task_id, []).append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except TimeoutError:
            return state.replicated
        finally:
            waiters = self._replication_waiters.get(task_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._replication_waiters.pop(task_id, None)

    async def wait_result(self, task_id: bytes, timeout: float | None = None) -> Result | None:
        """Wait for the accepted result of a task (a child of a task running here, say).

        The task need not be known yet: its record may still be on its way.

        Returns:
            The accepted result, at once if there already is one; None if the task is
            cancelled with no accepted result, `timeout` seconds passed, or the driver stopped.
        """
        state = self.node.task(task_id)
        if state is not None and state.accepted is not None:
            return state.accepted
        if state is not None and state.cancel is not None:
            return None
        waiter: asyncio.Future[Result | None] = self._loop.create_future()
        self._result_waiters.setdefault(task_id, []).append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._result_waiters.get(task_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._result_waiters.pop(task_id, None)

    def children_of(self, task_id: bytes) -> list[TaskState]:
        """The tasks whose record names `task_id` as parent, oldest first (created, then id)."""
        return self.node.children(task_id)

    def _accepted(self, task_id: bytes) -> Result | None:
        state = self.node.task(task_id)
        return state.accepted if state is not None else None

    def suspend(self, task_id: bytes) -> None:
        """A task running here waits (on its children): release its slot in the executor and
        the node (`Node.suspend`), so other work can run meanwhile. A no-op if it is not
        running here."""
        if self.executor is not None:
            self.executor.suspend(task_id)  # first: work the node starts now finds the slot
        self._apply(self.node.suspend(self._clock(), task_id))

    def resume(self, task_id: bytes) -> None:
        """A suspended task goes on: it holds its slot again at once (`Node.resume`)."""
        self._apply(self.node.resume(self._clock(), task_id))
        if self.executor is not None:
            self.executor.resume(task_id)

    def cancel_task(self, task_id: bytes, reason: str = "cancelled") -> None:
        """Cancel a task network-wide (`Node.cancel`)."""
        self._apply(self.node.cancel(self._clock(), task_id, reason))

    def complete(
        self, task_id: bytes, epoch: int, outcome: str, output: bytes, usage: Usage
    ) -> None:
        """Report the end of an execution to the node (`Node.complete`); the executor calls it.

        An outcome or output the node refuses is reported as "failed" with the reason, so the
        task still gets a result.
        """
        try:
            fx = self.node.complete(self._clock(), task_id, epoch, outcome, output, usage)
        except LocalProtocolError as exc:
            log.warning("task %s: the node refused its result: %s", task_id.hex()[:12], exc)
            reason = f"the result was refused: {exc}".encode()
            fx = self.node.complete(self._clock(), task_id, epoch, "failed", reason, usage)
        self._apply(fx)

    async def leave(self, timeout: float = 3.0) -> bool:
        """Gossip our leave and wait until it was sent to enough peers or `timeout` passed.

        Returns:
            True if the node reported the leave as done within the timeout.
        """
        self.leaving = True
        self._apply(self.node.leave(self._clock()))
        deadline = self._clock() + timeout
        while not self.node.leave_done() and self._clock() < deadline:
            await asyncio.sleep(0.05)
        return self.node.leave_done()

    # Membership hints

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

    def _periodic_save(self) -> None:
        self.save_members()
        self._save_timer = self._loop.call_later(MEMBER_SAVE_INTERVAL, self._periodic_save)

    # Effects

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self.node.tick(self._clock()))

    def _apply(self, fx: Effects) -> None:
        sends_allowed = True
        if fx.persists:
            try:
                self._store.put_many(fx.persists)
            except Exception:
                log.exception(
                    "persisting %d records failed; holding back this call's sends", len(fx.persists)
                )
                sends_allowed = False
        if sends_allowed:
            for send in fx.sends:
                self._sender.send(send.addr, send.data)
        for note in fx.notes:
            self._observe(note)
        self._arm(fx.wake_at)

    def _resolve(self, task_id: bytes, result: Result | None) -> None:
        for waiter in self._result_waiters.pop(task_id, []):
            if not waiter.done():
                waiter.set_result(result)

    def _arm(self, wake_at: float | None) -> None:
        if self._timer is not None:
            if wake_at is not None and self._timer.when() == wake_at:
                return
            self._timer.cancel()
            self._timer = None
        if wake_at is not None:
            self._timer = self._loop.call_at(wake_at, self._on_timer)

    def _observe(self, note: Note) -> None:
        match note:
            case JoinSucceeded(seed_addr, members):
                log.info("joined through %s; %d members alive", seed_addr, members)
                self.joined.set()
                for waiter in self._join_waiters:
                    if not waiter.done():
                        waiter.set_result(seed_addr)
            case StallDetected(gap):
                log.warning("the event loop stalled for %.1f s; restarted running timeouts", gap)
            case Dropped(peer, reason):
                log.debug("dropped input from %s: %s", peer, reason)
            case MemberJoined() | MemberRecovered():
                log.info("member %s up at %s", short_id(note.node_id), note.addr)
            case MemberDown(node_id, _, left):
                log.info("member %s %s", short_id(node_id), "left" if left else "failed")
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
            case TaskReplicated(task_id, _):
                for replicated in self._replication_waiters.pop(task_id, []):
                    if not replicated.done():
                        replicated.set_result(None)
            case ResultAccepted(task_id=task_id) if task_id in self._result_waiters:
                self._resolve(task_id, self._accepted(task_id))
            case TaskCancelled(task_id=task_id) if task_id in self._result_waiters:
                self._resolve(task_id, self._accepted(task_id))
            case _:
                pass
        if isinstance(note, _TASK_NOTES):
            self.task_hub.publish(Observed(self._wall(), note, None))
            return
        if isinstance(note, _PUBLISHED):
            addr = getattr(note, "addr", None)
            if addr is None and not isinstance(note, EventReceived):
                member = self.node.member(note.node_id)
                addr = member.addr if member is not None else None
            self.hub.publish(Observed(self._wall(), note, addr))


