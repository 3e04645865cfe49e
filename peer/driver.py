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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from protocol.effects import (
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
    StallDetected,
)
from protocol.identity import short_id
from protocol.node import Node
from protocol.wire import Status

log = logging.getLogger(__name__)

RECENT_NOTES = 1000
SUBSCRIBER_QUEUE = 1000
MEMBER_SAVE_INTERVAL = 10.0
"""Seconds between saves of the membership hints used to re-join after a restart."""


class Sender(Protocol):
    """Where sends go (`peer.transport.Transport`, or a fake in tests)."""

    def send(self, addr: str, data: bytes) -> None: ...


class RecordStore(Protocol):
    """The durable side the driver needs (`peer.store.Store`, or a fake in tests)."""

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
            case _:
                pass
        if isinstance(note, _PUBLISHED):
            addr = getattr(note, "addr", None)
            if addr is None and not isinstance(note, EventReceived):
                member = self.node.member(note.node_id)
                addr = member.addr if member is not None else None
            self.hub.publish(Observed(self._wall(), note, addr))
