"""The node's port and view: what the parts of a node (membership, dissemination, user events,
peer states, task rules) act through and read, kept apart from the host's API (`Node`).

Invariants:
- Everything the parts do leaves through here: sends, gossip, notifications, commands,
  persists and timers are buffered until the node hands the host one `Effects` (`take`).
- Notifications double as the parts' verdicts to each other, applied at once and in order: a
  member declared down is offered to the task rules for takeover, the first join answer
  releases held claims, and a member becoming known gets the peer state kept aside for it.
- Timers live in one heap ordered by (deadline, arming order); stale ones are not cancelled,
  their handlers recognise them.
- `now` is the time of the node call in progress; the node sets it on entry.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import assert_never

from protocol.dissemination import Dissemination
from protocol.effects import (
    Command,
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
    PersistKind,
    ProgressHeard,
    ResultAccepted,
    Send,
    StallDetected,
    SubmissionConflicted,
    TaskCancelled,
    TaskClaimed,
    TaskReplicated,
)
from protocol.gossip import BroadcastQueue
from protocol.membership import Membership
from protocol.peer_states import PeerStates
from protocol.tasks.plane import Tasks
from protocol.timers import Timer
from protocol.wire import ModelUsage, Status

STATE_GOSSIP_INTERVAL = 0.5
"""Least seconds between gossiped versions of our free-slot count (see
`NodePort.slots_changed`)."""
STATE_GOSSIP_BUDGET = 10.0
"""Versions of free-slot counts gossiped per second by the whole network, at most: each peer
waits `live members / STATE_GOSSIP_BUDGET` seconds (at least `STATE_GOSSIP_INTERVAL`) between
two. Every peer verifies every version, so a peer's cost is bounded by this budget whatever
the network's size and task rate, as in Cassandra's gossip of load (decision 23); others' view
of whether we are full lags by that interval plus dissemination, and only steers hints (which
standby a full primary hands its turn to, a pool's growth)."""
USAGE_GOSSIP_INTERVAL = 5.0
"""Least seconds between two versions of our state gossiped for a change of usage alone
(agents hosted, model spend: `NodePort.usage_changed`)."""
USAGE_GOSSIP_BUDGET = 5.0
"""Versions gossiped per second by the whole network for usage alone, at most: each peer waits
`live members / USAGE_GOSSIP_BUDGET` seconds (at least `USAGE_GOSSIP_INTERVAL`) between two.
Usage steers nothing (dashboards and `grapevine status` read it), so it may lag: 20 s at 100
peers (decision 47)."""
COUNT_REFRESH_INTERVAL = 10.0
"""Least seconds between two versions of our state gossiped because our free-slot count or run
counts alone changed (fullness unchanged): dashboards show them, nothing decides on them
(decisions 63 and 64)."""
COUNT_REFRESH_BUDGET = 1.0
"""Versions gossiped per second by the whole network for free-slot or run counts alone, at
most: each peer waits `live members / COUNT_REFRESH_BUDGET` seconds (at least
`COUNT_REFRESH_INTERVAL`) between two: 10 s up to 10 peers, 30 s at 30. Each version reaches
every peer, about a hundred sends at 30 peers: a hundred messages a second, network-wide."""


class NodePort:
    """The port (`membership.Port`, `tasks.Port`) and view (`tasks.View`) of one node.

    The parts are attached by the node right after it builds them (they take this port when
    built); before that, only `gossip`, `persist`, `schedule` and `note` of non-verdicts work,
    which is all membership uses while it is built.

    Args:
        node_id: this peer's id.
        now: the time of the node's creation.
    """

    membership: Membership
    dissemination: Dissemination
    advertisements: PeerStates
    tasks: Tasks

    def __init__(self, node_id: bytes, now: float) -> None:
        self.node_id = node_id
        self.now = now
        self.queue = BroadcastQueue()
        self.timers: list[tuple[float, int, Timer]] = []
        self.dropped = 0
        """Inputs rejected (each also reported as a `Dropped` notification)."""
        self._fx = Effects()
        self._timer_seq = 0
        self._live: tuple[bytes, ...] | None = None
        """`live_members`, kept until a member's status changes (a notification says so)."""
        self._capable: dict[str, list[bytes]] = {}
        """`capable`'s other peers per role, kept while `_capable_at` holds."""
        self._capable_at: tuple[int, int] = (-1, -1)
        """(`advertisements.roles_version`, `_status_changes`) `_capable` was built at."""
        self._status_changes = 0
        """Counts the notifications that change who is up (as `_live` is dropped)."""
        self._state_gossip_at = 0.0
        self._state_pending = False
        self._gossiped_full: bool | None = None
        self._usage_gossip_at = 0.0
        self._usage_pending = False
        self._count_refresh_at = 0.0
        self.remembered: dict[bytes, float] = {}
        """Members this peer knew before a restart (the host's saved hints) that are not in
        the table, each with when to forget it: they count in `known_members`, so a restarted
        peer ranks a task's home among the members it knew, as the rest do (decision 51)."""
        self.recovered: dict[bytes, None] = {}
        """Members back from dead (a restart, a healed partition) that we have not exchanged
        full state with since, oldest first (`Node` takes one per probe interval)."""

    def take(self) -> Effects:
        """Hand over what was buffered since the last call, with the next timer's deadline."""
        fx, self._fx = self._fx, Effects()
        fx.wake_at = self.timers[0][0] if self.timers else None
        return fx

    def due(self, now: float) -> Timer | None:
        """Pop the next timer due at `now`, or None."""
        if self.timers and self.timers[0][0] <= now:
            return heapq.heappop(self.timers)[2]
        return None

    # Port: what the parts use to act.

    def send(self, addr: str, messages: list[bytes], piggyback: bool) -> None:
        """Send `messages` to `addr` in one envelope, topped up with broadcasts if asked."""
        self.dissemination.send(addr, messages, piggyback)

    def send_lazy(self, addr: str, messages: list[bytes]) -> None:
        """Send `messages` to `addr` with our next envelope there (see `Dissemination`)."""
        self.dissemination.send_lazy(addr, messages)

    def flush_lazy(self) -> None:
        """Send the lazy messages still waiting, alone."""
        self.dissemination.flush_lazy()

    def deliver(self, send: Send) -> None:
        """Buffer one envelope for the host to send."""
        self._fx.sends.append(send)

    def gossip(self, key: Hashable, message: bytes) -> None:
        """Queue a broadcast for piggybacking and gossip (see `protocol.gossip`)."""
        self.queue.queue(key, message)

    def note(self, note: Note) -> None:
        """Report a notification to the host, and apply the verdicts it carries."""
        self._fx.notes.append(note)
        if isinstance(note, MemberDown | MemberJoined | MemberRecovered):
            self._live = None
            self._status_changes += 1
        match note:
            case Dropped():
                self.dropped += 1
            case MemberDown(node_id):
                self.tasks.on_member_down(self.now, node_id)
            case JoinSucceeded():
                self.tasks.release(self.now)
            case MemberJoined(node_id) | MemberRecovered(node_id):
                if self.advertisements.member_known(self.now, node_id):
                    self.tasks.view_changed()
                if isinstance(note, MemberRecovered):
                    self.recovered[node_id] = None
            case (
                MemberUpdated()
                | MemberSuspected()
                | EventReceived()
                | StallDetected()
                | TaskReplicated()
                | SubmissionConflicted()
                | TaskClaimed()
                | ResultAccepted()
                | TaskCancelled()
                | ProgressHeard()
            ):
                pass
            case _:
                assert_never(note)

    def member_confirmed_down(self, node_id: bytes) -> None:
        """A member declared down by another peer first is now down by this peer's own probe
        too (`confirmed_down` turned True): the task rules look at it again."""
        self.tasks.on_member_down(self.now, node_id)

    def command(self, command: Command) -> None:
        """Ask the host to start or stop an execution."""
        self._fx.commands.append(command)

    def schedule(self, at: float, timer: Timer) -> None:
        """Arm `timer` for `at`."""
        self._timer_seq += 1
        heapq.heappush(self.timers, (at, self._timer_seq, timer))

    def persist(self, kind: PersistKind, key: bytes, value: bytes) -> None:
        """Ask the host to make a record durable before this call's sends leave."""
        self._fx.persists.append(Persist(kind, key, value))

    def send_to_random(
        self, k: int, messages: list[bytes], exclude: frozenset[bytes] = frozenset()
    ) -> None:
        """Send `messages` directly to `k` random alive members not in `exclude`."""
        alive = self.membership.random_members(
            k, lambda x: x.status == Status.ALIVE and x.node_id not in exclude
        )
        for m in alive:
            self.send(m.addr, messages, piggyback=False)

    def slots_changed(self) -> None:
        """An execution started or ended here: advertise the free slots left.

        Our own state changes at once. It is gossiped only when whether we are full changed,
        at most one version every `STATE_GOSSIP_INTERVAL` (`flush_state` sends the newest
        when due). Every peer receives and verifies each version gossiped, and free slots
        change with every execution's start and end: gossiping each made a task cost O(N)
        messages and signature checks (decision 18). A new count alone is gossiped at most
        every `COUNT_REFRESH_INTERVAL` (`flush_state`), for dashboards."""
        state = self.advertisements.states.get(self.node_id)
        free = self.tasks.free_slots()
        if state is None or state.free_slots == free:
            return
        # Others only act on whether we are full (claim rule, spawning), so a new count that
        # leaves that unchanged is kept here and goes out with the next change that matters.
        changed = (free == 0) != self._gossiped_full
        due = changed and self.now >= self._state_gossip_at
        self.advertisements.advertise(state.roles, free, state.queue_len, state.load, due)
        if due:
            self._gossiped(free)
        self._state_pending = changed and not due

    def usage_changed(
        self, agents: int, spend_micro: int, models: tuple[ModelUsage, ...] = ()
    ) -> None:
        """Our usage (agents hosted, model spend, spend and breaker by model) is now this: our
        next state carries it, and one is gossiped for it at most every
        `USAGE_GOSSIP_INTERVAL` (within the network's `USAGE_GOSSIP_BUDGET`); `flush_state`
        sends a waiting one when due."""
        ads = self.advertisements
        if ads.usage == (agents, spend_micro, models):
            return
        ads.usage = (agents, spend_micro, models)
        state = ads.states.get(self.node_id)
        if state is None:
            return  # the first state we make carries it
        due = self.now >= self._usage_gossip_at
        ads.advertise(state.roles, state.free_slots, state.queue_len, state.load, due)
        if due:
            self._usage_gossiped()
        self._usage_pending = not due

    def _usage_gossiped(self) -> None:
        members = len(self.live_members())
        interval = max(USAGE_GOSSIP_INTERVAL, members / USAGE_GOSSIP_BUDGET)
        self._usage_gossip_at = self.now + interval

    def flush_state(self) -> None:
        """Gossip our newest state if a rate-limited one waits and its turn came."""
        self._refresh_count()
        if self._usage_pending and self.now >= self._usage_gossip_at:
            self._usage_pending = False
            self._usage_gossiped()
            self.advertisements.gossip_own()
        if self._state_pending and self.now >= self._state_gossip_at:
            self._state_pending = False
            state = self.advertisements.states.get(self.node_id)
            if state is not None and (state.free_slots == 0) != self._gossiped_full:
                self._gossiped(state.free_slots)
                self.advertisements.gossip_own()

    def runs_changed(self, runs: tuple[int, ...]) -> None:
        """Our run counts are now `runs` (`RUN_COUNTS`, or () for none): our states carry them
        from now on; one is gossiped for them as for a new free-slot count (`flush_state`)."""
        ads = self.advertisements
        if ads.runs == runs:
            return
        ads.runs = runs
        state = ads.states.get(self.node_id)
        if state is not None:
            ads.advertise(state.roles, state.free_slots, state.queue_len, state.load, False)

    def _refresh_count(self) -> None:
        # A new free-slot count or run counts alone: dashboards read them, nothing decides on
        # them, so they go out at the slowest rate (decisions 63 and 64).
        ads = self.advertisements
        own, published = ads.states.get(self.node_id), ads.published
        if own is None or published is None:
            return
        if (own.free_slots, own.runs) == (published.free_slots, published.runs):
            return
        if self.now < self._count_refresh_at:
            return
        members = len(self.live_members())
        self._count_refresh_at = self.now + max(
            COUNT_REFRESH_INTERVAL, members / COUNT_REFRESH_BUDGET
        )
        ads.gossip_own()

    def _gossiped(self, free: int) -> None:
        self._gossiped_full = free == 0
        members = len(self.live_members())
        interval = max(STATE_GOSSIP_INTERVAL, members / STATE_GOSSIP_BUDGET)
        self._state_gossip_at = self.now + interval

    # View: what the task rules read of membership.

    def is_down(self, node_id: bytes) -> bool:
        """Dead, left, or unknown (a member forgotten after its retention is long dead)."""
        m = self.membership.members.get(node_id)
        return m is None or not m.up

    def confirmed_down(self, node_id: bytes) -> bool:
        """Down here and this peer's own failure detector agrees: its own probe of the member
        went unanswered for a whole round, or its suspicion of it ran out here, since the
        member last showed life. A DEAD or SUSPECT from another peer alone never makes this
        True (unknown members count as confirmed, as for `is_down`); see
        `Membership.confirmed_down`."""
        return self.membership.confirmed_down(node_id)

    def capable(self, role: str) -> list[bytes]:
        """Live members advertising `role`, this peer included when it serves the role (a
        new list: the caller may keep or change it)."""
        # Asked several times per task by every holder; scanning every member each time was
        # a tenth of a 30-peer network's function calls per task. Roles and who is up change
        # rarely, and each change is counted.
        at = (self.advertisements.roles_version, self._status_changes)
        if at != self._capable_at:
            self._capable_at = at
            self._capable = {}
        others = self._capable.get(role)
        if others is None:
            others = self._capable[role] = [
                nid
                for nid, state in self.advertisements.states.items()
                if nid != self.node_id and role in state.roles and not self.is_down(nid)
            ]
        return [self.node_id, *others] if role in self.tasks.roles else list(others)

    def live_members(self) -> tuple[bytes, ...]:
        """Every member up (alive or suspect), this peer included, in id order."""
        if self._live is None:
            members = self.membership.members
            self._live = tuple(sorted(nid for nid, m in members.items() if m.up))
        return self._live

    def known_members(self) -> tuple[bytes, ...]:
        """Every member in the table whatever its status (until reaped), this peer included,
        and the members remembered from before a restart that the table lacks."""
        table = self.membership.members
        if not self.remembered:
            return tuple(table)
        return (*table, *(n for n in self.remembered if n not in table))

    def remember(self, now: float, members: list[tuple[bytes, float]], keep: float) -> None:
        """Remember `members` ((node id, seconds since last seen)) known before a restart,
        each for `keep` seconds after it was last seen, as the table keeps a dead member."""
        for node_id, age in members:
            if node_id != self.node_id and age < keep:
                self.remembered[node_id] = now + keep - age

    def forget_remembered(self, now: float) -> None:
        """Drop remembered members that are now in the table (it keeps and reaps them) or
        whose time is up."""
        table = self.membership.members
        for node_id, until in list(self.remembered.items()):
            if node_id in table or until <= now:
                del self.remembered[node_id]

    def advertises(self, node_id: bytes, role: str) -> bool | None:
        """Whether `node_id` advertises `role`; None if its state is not known here."""
        if node_id == self.node_id:
            return role in self.tasks.roles
        state = self.advertisements.states.get(node_id)
        return None if state is None else role in state.roles

    def down_since(self, node_id: bytes) -> float | None:
        """When `node_id` was declared dead here (None: up, left, or not known)."""
        m = self.membership.members.get(node_id)
        return m.since if m is not None and m.status == Status.DEAD else None

    def dead_since(self, after: float) -> list[bytes]:
        """Members declared dead here at or after `after` (not those that left)."""
        return [
            nid
            for nid, m in self.membership.members.items()
            if m.status == Status.DEAD and m.since >= after
        ]

    def full_since(self, node_id: bytes) -> float | None:
        """Since when `node_id` has advertised no free execution slot (None: it has one)."""
        return self.advertisements.full_since(node_id)

    def addr_of(self, node_id: bytes) -> str | None:
        """The address of a known member."""
        m = self.membership.members.get(node_id)
        return m.addr if m is not None else None
