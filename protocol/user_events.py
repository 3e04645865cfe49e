"""User events: application broadcasts ordered by a Lamport clock, delivered once per peer.

Invariants:
- (`origin`, `ltime`) identifies an event network-wide; each is delivered here at most once
  while the de-duplicator remembers it, and an event older than that window is ignored (it may
  be a replay).
- An event whose clock jumps more than `MAX_LTIME_JUMP` ahead is dropped: events are unsigned,
  and one could otherwise push every clock so far that all later events look too old (Serf has
  this weakness).
- The most recent events ride along every push-pull (`recent`), so one that gossip missed
  still arrives (Serf does the same).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Protocol

from protocol.codec import encode_message
from protocol.effects import Dropped, EventReceived, Note
from protocol.gossip import EventDedup
from protocol.wire import UserEvent

MAX_LTIME_JUMP = 2**32
_PUSH_PULL_EVENTS = 128
"""Most recent user events carried by every push-pull."""


class Port(Protocol):
    """What user events need from the node: gossip and notifications."""

    def gossip(self, key: Hashable, message: bytes) -> None: ...
    def note(self, note: Note) -> None: ...


class UserEvents:
    """This peer's Lamport clock and the user events it has delivered.

    Args:
        node_id: this peer's id (the origin of the events it broadcasts).
        window: how many recent events are remembered (`GossipConfig.event_dedup`).
        port: where events are gossiped and delivered.
    """

    def __init__(self, node_id: bytes, window: int, port: Port) -> None:
        self.node_id = node_id
        self.window = window
        self.port = port
        self.ltime = 0
        self.dedup = EventDedup(window)
        self.recent: deque[bytes] = deque(maxlen=_PUSH_PULL_EVENTS)
        """The wire bytes of the latest events delivered, for push-pull."""

    def broadcast(self, name: str, payload: bytes) -> None:
        """Start a new event of ours (delivered here too)."""
        self.ltime += 1
        self.apply(UserEvent(self.node_id, self.ltime, name, payload), None)

    def apply(self, ev: UserEvent, raw: bytes | None) -> None:
        """Deliver and gossip an event seen for the first time (`raw`: its wire bytes)."""
        if ev.ltime > self.ltime + MAX_LTIME_JUMP:
            self.port.note(Dropped("event", f"event clock {ev.ltime} jumps too far ahead"))
            return
        self.ltime = max(self.ltime, ev.ltime)
        if ev.ltime + self.window < self.ltime:
            return  # older than anything we still remember: it may be a replay
        if not self.dedup.first_time(ev.origin, ev.ltime):
            return
        raw = raw or encode_message(ev)
        self.recent.append(raw)
        self.port.gossip(("event", ev.origin, ev.ltime), raw)
        self.port.note(EventReceived(ev.origin, ev.ltime, ev.name, ev.payload))
