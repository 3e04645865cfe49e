"""Where a peer's notifications go once the driver applied a call's effects: subscribers and
waiters.

Invariants:
- Everything runs on the driver's event loop thread; nothing here calls the node except its
  read-only queries (`Node.task`, `Node.member`), so observing a note never changes state.
- Notifications reach subscribers through a `NoteHub`: a buffer of the most recent
  `RECENT_NOTES` plus one bounded queue per subscriber. A subscriber that falls
  `SUBSCRIBER_QUEUE` notes behind is dropped (its queue ends with `None`); it never blocks the
  driver. Membership and user events go to `Notifications.members`, task notes to
  `Notifications.tasks`, so a busy task stream cannot push membership changes out of the
  recent buffer.
- A waiter is a future that a notification resolves: the first answer to a join
  (`JoinSucceeded`), a task held by enough peers (`TaskReplicated`), a task's accepted result
  (`ResultAccepted`, or `TaskCancelled` with none). A waiter that times out is forgotten; the
  caller then reads the node for the answer.
- `close` ends everything: subscriptions end with `None`, result waiters get None and
  replication waiters are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from protocol.effects import (
    CancelExecution,
    Command,
    Dropped,
    EventReceived,
    JoinSucceeded,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    MemberSuspected,
    MemberUpdated,
    Note,
    ResultAccepted,
    StallDetected,
    StartExecution,
    SubmissionConflicted,
    TaskCancelled,
    TaskClaimed,
    TaskReplicated,
)
from protocol.identity import short_id
from protocol.node import Node
from protocol.tasks.messages import Result

log = logging.getLogger(__name__)

RECENT_NOTES = 1000
SUBSCRIBER_QUEUE = 1000

MEMBER_NOTES = (
    MemberJoined,
    MemberUpdated,
    MemberSuspected,
    MemberDown,
    MemberRecovered,
    EventReceived,
)
"""Published to `Notifications.members`."""
TASK_NOTES = (
    TaskReplicated,
    SubmissionConflicted,
    TaskClaimed,
    StartExecution,
    CancelExecution,
    ResultAccepted,
    TaskCancelled,
)
"""Published to `Notifications.tasks`."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Observed:
    """A notification as subscribers see it: wall-clock time, the note, the member's address."""

    time: float
    note: Note | Command
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


class Waiters(Generic[K, V]):
    """Futures waiting for the value a later notification gives their key."""

    def __init__(self) -> None:
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._waiting

    def __len__(self) -> int:
        """How many keys someone waits on."""
        return len(self._waiting)

    async def wait(
        self, key: K, timeout: float | None, start: Callable[[], None] | None = None
    ) -> V:
        """Wait until `resolve(key, value)`; return the value.

        Args:
            key: what to wait for.
            timeout: seconds to wait at most (None: no limit).
            start: called once the waiter is registered, so an answer it provokes is not missed.

        Raises:
            TimeoutError: `timeout` seconds passed first.
            asyncio.CancelledError: `cancel_all` ended the wait.
        """
        waiter: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(waiter)
        try:
            if start is not None:
                start()
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        finally:
            waiters = self._waiting.get(key, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiting.pop(key, None)

    def resolve(self, key: K, value: V) -> None:
        """Give `value` to everyone waiting on `key`."""
        for waiter in self._waiting.pop(key, []):
            if not waiter.done():
                waiter.set_result(value)

    def resolve_all(self, value: V) -> None:
        """Give `value` to everyone waiting, whatever the key."""
        for key in list(self._waiting):
            self.resolve(key, value)

    def cancel_all(self) -> None:
        """Cancel every wait."""
        for waiters in self._waiting.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()


class Notifications:
    """The peer's side of the node's notifications: logs, subscriber hubs and waiters.

    Args:
        node: the protocol node, read for members' addresses and tasks' results.
        wall: wall-clock seconds, stamped on what subscribers see.
    """

    def __init__(self, node: Node, wall: Callable[[], float]) -> None:
        self.members = NoteHub()
        """Membership changes and user events."""
        self.tasks = NoteHub()
        """Task notes (claims, starts, stops, results, cancels, replication)."""
        self._node = node
        self._wall = wall
        self._joins: Waiters[None, str] = Waiters()
        self._replications: Waiters[bytes, None] = Waiters()
        self._results: Waiters[bytes, Result | None] = Waiters()
        self.closed = False
        """Whether `close` was called (the driver stopped): waits end at once."""

    @property
    def results_awaited(self) -> int:
        """How many tasks someone waits on the result of."""
        return len(self._results)

    async def join(self, ask: Callable[[], None], timeout: float) -> str | None:
        """Call `ask` (it sends join requests) and wait for the first answer.

        Returns:
            The address of the seed that answered within `timeout` seconds, or None.
        """
        try:
            return await self._joins.wait(None, timeout, ask)
        except TimeoutError:
            return None

    async def wait_replicated(self, task_id: bytes, timeout: float) -> bool:
        """Wait until the task submitted here is held by enough other peers (`TaskReplicated`).

        Returns:
            True at once if it already is, else whether it became so within `timeout` seconds
            (False at once when the submission is refused: `SubmissionConflicted`).
        """
        state = self._node.task(task_id)
        if state is None:
            return False
        if state.replicated:
            return True
        with contextlib.suppress(TimeoutError):
            await self._replications.wait(task_id, timeout)
        return state.replicated  # False after `SubmissionConflicted`

    async def wait_result(self, task_id: bytes, timeout: float | None = None) -> Result | None:
        """Wait for the accepted result of a task (a child of a task running here, say).

        The task need not be known yet: its record may still be on its way.

        Returns:
            The accepted result, at once if there already is one; None if the task is
            cancelled with no accepted result, `timeout` seconds passed, or `close` was called.
        """
        state = self._node.task(task_id)
        if state is not None and state.accepted is not None:
            return state.accepted
        if self.closed or (state is not None and state.cancel is not None):
            return None
        try:
            return await self._results.wait(task_id, timeout)
        except TimeoutError:
            return None

    def observe(self, note: Note | Command) -> None:
        """Log `note`, resolve the waiters it answers and publish it to its hub."""
        match note:
            case JoinSucceeded(seed_addr, members):
                log.info("joined through %s; %d members alive", seed_addr, members)
                self._joins.resolve(None, seed_addr)
            case StallDetected(gap):
                log.warning("the event loop stalled for %.1f s; restarted running timeouts", gap)
            case Dropped(peer, reason):
                log.debug("dropped input from %s: %s", peer, reason)
            case MemberJoined() | MemberRecovered():
                log.info("member %s up at %s", short_id(note.node_id), note.addr)
            case MemberDown(node_id, _, left):
                log.info("member %s %s", short_id(node_id), "left" if left else "failed")
            case TaskReplicated(task_id=task_id) | SubmissionConflicted(task_id=task_id):
                # A refused submission ends the wait too: the caller reads the node for which.
                self._replications.resolve(task_id, None)
            case ResultAccepted(task_id=task_id) | TaskCancelled(task_id=task_id):
                if task_id in self._results:
                    self._results.resolve(task_id, self._accepted(task_id))
            case _:
                pass
        if isinstance(note, TASK_NOTES):
            self.tasks.publish(Observed(self._wall(), note, None))
        elif isinstance(note, MEMBER_NOTES):
            addr = getattr(note, "addr", None)
            if addr is None and not isinstance(note, EventReceived):
                member = self._node.member(note.node_id)
                addr = member.addr if member is not None else None
            self.members.publish(Observed(self._wall(), note, addr))

    def close(self) -> None:
        """End every subscription and wait (see the module invariants)."""
        self.closed = True
        self.members.close()
        self.tasks.close()
        self._replications.cancel_all()
        self._results.resolve_all(None)

    def _accepted(self, task_id: bytes) -> Result | None:
        state = self._node.task(task_id)
        return state.accepted if state is not None else None
