"""One peer's protocol state: membership, dissemination, user events and peer state, composed.

Theory of operation
- The host calls `handle(now, src, data)` for every envelope received, `tick(now)` at or after
  the `wake_at` it was last given, and the commands: `join`, `leave`, `broadcast` (a user
  event), `set_state`, and for tasks `submit`, `complete`, `cancel`, `suspend`, `resume`,
  `serve`, `restore`. Each returns `Effects`; the host persists, then sends, then reads the
  notifications.
- Time only moves through `now`; randomness only through the injected rng. Same inputs, same
  outputs, byte for byte: that is what lets the simulator replay a seed exactly.
- Input from peers never raises: a bad envelope is dropped whole (`Dropped`, nothing applied);
  a message that decodes but fails a semantic check (bad signature) is dropped alone.
- Timers live in one heap. Stale timers are not cancelled; their handlers recognise them.
- If `now` jumped by more than `stall_threshold` since the previous call, the host froze us
  (GC pause, suspended VM): running timeouts are restarted instead of trusted.
- Broadcast kinds (alive, suspect, dead, user event, peer state, task record, cancel,
  execution entry) are idempotent under their merge rules, so byte-identical copies received
  recently are skipped before decoding: the same fact arrives many times during dissemination,
  and re-applying it would change nothing. Claims and results are not skipped: one dropped
  because its predecessor had not arrived yet must be applied when it comes again.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterator, Mapping
from types import MappingProxyType

from protocol.config import (
    NodeConfig,
    push_pull_interval_for,
    retransmit_limit,
    suspicion_min_timeout,
)
from protocol.effects import (
    Dropped,
    Effects,
    EventReceived,
    JoinSucceeded,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    Note,
    Persist,
    Send,
    StallDetected,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.gossip import MESSAGE_OVERHEAD, BroadcastQueue, EventDedup
from protocol.identity import Signer, VerifiedCache
from protocol.membership import Member, Membership, Rng
from protocol.task_state import TaskState
from protocol.tasks import STORE, Tasks
from protocol.timers import (
    GossipDue,
    ProbeDue,
    ProbeRoundEnd,
    ProbeTimeout,
    PushPullDue,
    ReapDue,
    ReconnectDue,
    RelayTimeout,
    SuspicionDue,
    TaskStandby,
    Timer,
)
from protocol.wire import (
    MAX_EVENT_PAYLOAD,
    MAX_NAME_CHARS,
    MAX_ROLES,
    Kind,
    Message,
    PeerState,
    PushPull,
    Status,
    UserEvent,
    decode_envelope,
    decode_message,
    encode_envelope,
    encode_message,
)

_BROADCAST_KINDS = frozenset(
    {
        Kind.ALIVE,
        Kind.SUSPECT,
        Kind.DEAD,
        Kind.USER_EVENT,
        Kind.PEER_STATE,
        Kind.TASK,
        Kind.CANCEL,
        Kind.EXECUTION,
    }
)
_RECENT_CAPACITY = 4096
_FROZEN = 0.5
"""A gap between calls longer than this means we were frozen (gossip timers call us every
gossip interval otherwise): input queued meanwhile is read before any claim is made."""
_MAX_LTIME_JUMP = 2**32
_EARLY_STATES = 1024
"""Peer states held for members not yet known (oldest dropped first)."""
_PUSH_PULL_EVENTS = 128
"""Most recent user events carried by every push-pull, so one that gossip missed still
arrives (Serf does the same); duplicates are dropped by the event de-duplicator."""
_ENVELOPE_OVERHEAD = 64


class Node:
    """The sans-IO protocol state machine of one peer.

    Args:
        config: validated protocol configuration.
        signer: this peer's identity key, bound to `config.network_id`.
        addr: the address other peers reach us at ("host:port").
        rng: a seeded `random.Random` (or anything with the same methods).
        now: the current time (seconds, monotonic).
        incarnation: start above every incarnation this identity used before; the host keeps
            the last one durable (the `Persist("incarnation", ...)` effect) and passes it + 1.
        cache: verified-signature cache; simulated peers may share one.

    Raises:
        LocalProtocolError: the configuration is invalid.
    """

    def __init__(
        self,
        config: NodeConfig,
        signer: Signer,
        addr: str,
        rng: Rng,
        now: float,
        incarnation: int = 0,
        cache: VerifiedCache | None = None,
    ) -> None:
        config.validate()
        if signer.network_id != config.network_id:
            raise LocalProtocolError("the signer is bound to a different network id")
        self.config = config
        self.addr = addr
        self.rng = rng
        self.node_id = signer.node_id
        self.cache = cache if cache is not None else VerifiedCache()
        self._fx = Effects()
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = 0
        self._last_call = now
        self._last_heard = now
        self.queue = BroadcastQueue()
        self.events = EventDedup(config.gossip.event_dedup)
        self._recent_events: deque[bytes] = deque(maxlen=_PUSH_PULL_EVENTS)
        self.ltime = 0
        self.states: dict[bytes, PeerState] = {}
        self._early_states: dict[bytes, PeerState] = {}
        self._full_since: dict[bytes, float] = {}
        self._state_version = incarnation << 32
        self._seeds: list[str] = []
        self._joining: set[str] = set()
        self._recent: set[bytes] = set()
        self._recent_old: set[bytes] = set()
        self.leave_transmits = 0
        self._leave_msg: bytes | None = None
        self.dropped = 0
        """Inputs rejected (each also reported as a `Dropped` notification)."""
        self.membership = Membership(config, signer, addr, incarnation, rng, self.cache, self)
        self.tasks = Tasks(
            signer,
            config.network_id,
            lambda: self.membership.incarnation,
            config.tasks.standby_delay,
            config.tasks.replication,
            self.cache,
            self,
            self,
        )
        g = config.gossip
        self.schedule(now + rng.random() * config.swim.probe_interval, ProbeDue())
        self.schedule(now + rng.random() * g.gossip_interval, GossipDue())
        self.schedule(now + g.push_pull_interval * (0.5 + rng.random()), PushPullDue())
        self.schedule(now + g.reconnect_interval * (0.5 + rng.random()), ReconnectDue())
        self.schedule(now + config.swim.gossip_to_the_dead, ReapDue())

    # Port: what the machines use to act.

    def send(self, addr: str, messages: list[bytes], piggyback: bool) -> None:
        """Send `messages` to `addr` in one envelope, topped up with broadcasts if asked."""
        if piggyback:
            used = _ENVELOPE_OVERHEAD + sum(len(m) + MESSAGE_OVERHEAD for m in messages)
            messages = messages + self._broadcasts(self.config.gossip.packet_budget - used)
        self._fx.sends.append(Send(addr, encode_envelope(self.node_id, self.addr, messages)))

    def gossip(self, key: Hashable, message: bytes) -> None:
        """Queue a broadcast for piggybacking and gossip (see `protocol.gossip`)."""
        self.queue.queue(key, message)

    def note(self, note: Note) -> None:
        """Report a notification to the host."""
        if isinstance(note, Dropped):
            self.dropped += 1
        self._fx.notes.append(note)
        if isinstance(note, MemberDown):
            self.tasks.on_member_down(self._last_call, note.node_id)
        elif isinstance(note, JoinSucceeded):
            self.tasks.release(self._last_call)
        elif isinstance(note, MemberJoined | MemberRecovered):
            early = self._early_states.pop(note.node_id, None)
            if early is not None:
                self._apply_state(early, None)

    def schedule(self, at: float, timer: Timer) -> None:
        """Arm `timer` for `at`."""
        self._timer_seq += 1
        heapq.heappush(self._timers, (at, self._timer_seq, timer))

    def persist(self, kind: str, key: bytes, value: bytes) -> None:
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

    # View: what the task rules read of membership.

    def is_down(self, node_id: bytes) -> bool:
        """Dead, left, or unknown (a member forgotten after its retention is long dead)."""
        m = self.membership.members.get(node_id)
        return m is None or not m.up

    def capable(self, role: str) -> list[bytes]:
        """Live members advertising `role`, this peer included when it serves the role."""
        out = [self.node_id] if role in self.tasks.roles else []
        for nid, state in self.states.items():
            if nid != self.node_id and role in state.roles and not self.is_down(nid):
                out.append(nid)
        return out

    def full_since(self, node_id: bytes) -> float | None:
        """Since when `node_id` has advertised no free execution slot (None: it has one)."""
        return self._full_since.get(node_id)

    def slots_changed(self) -> None:
        """An execution started or ended here: advertise the free slots left."""
        state = self.states.get(self.node_id)
        free = max(0, self.tasks.max_running - self.tasks.slots_used())
        if state is not None and state.free_slots != free:
            self._advertise(state.roles, free, state.queue_len, state.load)

    def addr_of(self, node_id: bytes) -> str | None:
        """The address of a known member."""
        m = self.membership.members.get(node_id)
        return m.addr if m is not None else None

    # Entry points.

    def handle(self, now: float, src: str, data: bytes) -> Effects:
        """Process one envelope received from the transport address `src`."""
        self._enter(now)
        try:
            envelope = decode_envelope(data)
            if envelope.sender == self.node_id:
                raise RemoteProtocolError("envelope claims to come from this node")
            decoded: list[tuple[Message, bytes]] = []
            for raw in envelope.messages:
                if self._seen_recently(raw):
                    continue
                decoded.append((decode_message(raw), raw))
        except RemoteProtocolError as exc:
            self.note(Dropped(src, str(exc)))
            return self._exit()
        for _, raw in decoded:
            self._remember(raw)
        self._last_heard = now
        reply_to = envelope.sender_addr
        for msg, raw in decoded:
            if self.membership.dispatch(now, reply_to, msg, raw):
                continue
            if not self.tasks.dispatch(now, reply_to, envelope.sender, msg, raw):
                self._dispatch_other(now, reply_to, msg, raw)
        return self._exit()

    def tick(self, now: float) -> Effects:
        """Fire every timer due at `now`."""
        self._enter(now)
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            self._fire(now, timer)
        return self._exit()

    def join(self, now: float, seeds: list[str], remember: bool = True) -> Effects:
        """Ask each seed address for its full state; `JoinSucceeded` reports the first answer.

        With `remember`, seeds are retried by reconnect for as long as they are not known alive,
        so a partition that cut us off from everyone but a seed still heals. Pass False for
        addresses that are only hints (members remembered from before a restart).
        """
        self._enter(now)
        if all(seed == self.addr for seed in seeds):
            self.tasks.release(now)  # a network of one: nobody else's view to wait for
        for seed in seeds:
            if seed == self.addr:
                continue
            if remember and seed not in self._seeds:
                self._seeds.append(seed)
            self._joining.add(seed)
            self._push_pull(seed, join=True, reply=False)
        return self._exit()

    def leave(self, now: float) -> Effects:
        """Leave gracefully: gossip our departure now. The host keeps ticking until
        `leave_done()` (or its own timeout), then stops."""
        self._enter(now)
        self._leave_msg = self.membership.leave()
        self._gossip_round()
        return self._exit()

    def leave_done(self) -> bool:
        """True once the leave was sent to `gossip_fanout` peers, or as often as the retransmit
        limit allows when that is lower, or there is no one to tell."""
        if self._leave_msg is None:
            return False
        return (
            self.leave_transmits >= self.config.gossip.gossip_fanout
            or ("member", self.node_id) not in self.queue
            or self.membership.alive_count() <= 1
        )

    def broadcast(self, now: float, name: str, payload: bytes) -> Effects:
        """Broadcast a user event to every peer (delivered here too).

        Raises:
            LocalProtocolError: `name` or `payload` exceeds the wire limits.
        """
        if not 0 < len(name) <= MAX_NAME_CHARS:
            raise LocalProtocolError(f"event name must be 1..{MAX_NAME_CHARS} characters")
        if len(payload) > MAX_EVENT_PAYLOAD:
            raise LocalProtocolError(f"event payload must be at most {MAX_EVENT_PAYLOAD} bytes")
        self._enter(now)
        self.ltime += 1
        self._apply_event(UserEvent(self.node_id, self.ltime, name, payload), None)
        return self._exit()

    def set_state(
        self, now: float, roles: tuple[str, ...], free_slots: int, queue_len: int, load: float
    ) -> Effects:
        """Advertise what this peer can run and how busy it is.

        Raises:
            LocalProtocolError: too many roles, a bad role name, or a negative number.
        """
        if len(roles) > MAX_ROLES or not all(0 < len(r) <= MAX_NAME_CHARS for r in roles):
            raise LocalProtocolError(f"at most {MAX_ROLES} roles of 1..{MAX_NAME_CHARS} chars")
        if free_slots < 0 or queue_len < 0 or not 0.0 <= load <= 1e9:
            raise LocalProtocolError("free_slots, queue_len and load must be non-negative")
        self._enter(now)
        self._advertise(roles, free_slots, queue_len, load)
        return self._exit()

    def _advertise(
        self, roles: tuple[str, ...], free_slots: int, queue_len: int, load: float
    ) -> None:
        self._state_version += 1
        state = PeerState(
            self.node_id, self._state_version, tuple(roles), free_slots, queue_len, float(load)
        )
        self.states[self.node_id] = state
        self.gossip(("state", self.node_id), encode_message(state))

    def submit(
        self,
        now: float,
        role: str,
        data: bytes,
        *,
        priority: int = 0,
        parent: bytes = b"",
        idempotency_key: str = "",
        nonce: bytes = b"",
        timeout: float = 0.0,
        created: float = 0.0,
    ) -> tuple[Effects, bytes]:
        """Submit a task here; returns the effects and the task id. `TaskReplicated` reports
        when `config.tasks.replication` other peers hold it (at once when replication is 0).

        Raises:
            LocalProtocolError: a field is out of bounds, or neither key nor nonce is given.
        """
        self._enter(now)
        record = self.tasks.submit(
            now,
            role,
            data,
            priority=priority,
            parent=parent,
            idempotency_key=idempotency_key,
            nonce=nonce,
            timeout=timeout,
            created=created,
        )
        if self.config.tasks.replication == 0:
            self.tasks.acknowledge_unreplicated(record.task_id)
        return self._exit(), record.task_id

    def complete(
        self,
        now: float,
        task_id: bytes,
        epoch: int,
        outcome: str,
        output: bytes,
        usage: tuple[int, int, int] = (0, 0, 0),
    ) -> Effects:
        """Report the end of an execution started by `StartExecution` (ignored if fenced).

        Raises:
            LocalProtocolError: unknown outcome or oversize output.
        """
        self._enter(now)
        self.tasks.complete(now, task_id, epoch, outcome, output, usage)
        return self._exit()

    def cancel(self, now: float, task_id: bytes, reason: str = "cancelled") -> Effects:
        """Cancel a task network-wide; it stops wherever it runs."""
        self._enter(now)
        self.tasks.cancel(now, task_id, reason)
        return self._exit()

    def suspend(self, now: float, task_id: bytes) -> Effects:
        """An execution here waits (on its child tasks): release its slot until `resume`.

        It stays owned and running for every other rule; the free slot is advertised and tasks
        passed for lack of one are looked at again. A no-op for a task not running here or
        already suspended."""
        self._enter(now)
        self.tasks.suspend(now, task_id)
        return self._exit()

    def resume(self, now: float, task_id: bytes) -> Effects:
        """A suspended execution goes on: it holds a slot again at once, even beyond
        `max_running` (it never waits for one, so a tree of tasks cannot deadlock). A no-op for
        a task not suspended."""
        self._enter(now)
        self.tasks.resume(now, task_id)
        return self._exit()

    def serve(self, now: float, roles: tuple[str, ...], max_running: int) -> Effects:
        """Declare the roles this peer executes and how many executions it runs at once
        before passing its turn, advertise them, and look at open tasks again."""
        self._enter(now)
        self.tasks.roles = frozenset(roles)
        self.tasks.max_running = max_running
        self._advertise(roles, max(0, max_running - self.tasks.slots_used()), 0, 0.0)
        self.tasks.reevaluate(now)
        return self._exit()

    def restore(self, now: float, raw: bytes) -> Effects:
        """Re-apply a task object this peer persisted before a restart (verified like a peer's).

        Restore every stored object, then `serve`, then `join`. Until the join succeeds (and a
        standby delay after it, so what we missed arrives) this peer claims nothing: with an
        empty view every owner would look dead. Own claims left without a result are then
        resumed under the same epoch (`StartExecution` again)."""
        self._enter(now)
        try:
            msg = decode_message(raw)
        except RemoteProtocolError as exc:
            self.note(Dropped(STORE, f"unreadable stored record: {exc}"))
            return self._exit()
        self.tasks.hold()
        self.tasks.dispatch(now, STORE, self.node_id, msg, raw)
        return self._exit()

    # Queries.

    # Queries: the host's read-only view of the task plane (STYLE rule 13). The objects returned
    # are the protocol's own, shared for speed: the host reads them and never changes them.

    def task(self, task_id: bytes) -> TaskState | None:
        """The state of a task held here, or None."""
        return self.tasks.tasks.get(task_id)

    def held_tasks(self) -> Iterator[TaskState]:
        """Every task state held here, in no particular order."""
        return iter(self.tasks.tasks.values())

    def open_tasks(self) -> list[TaskState]:
        """The held tasks with neither an accepted result nor a cancel."""
        held = self.tasks.tasks
        return [held[t] for t in self.tasks.open if t in held]

    def children(self, task_id: bytes) -> list[TaskState]:
        """The held tasks whose record names `task_id` as parent, oldest first."""
        held = self.tasks.tasks
        kids = [held[c] for c in self.tasks.children.get(task_id, ()) if c in held]
        return sorted(kids, key=_age)

    def task_counters(self) -> dict[str, int]:
        """The task plane's event counters (result flips, conflicting grants, ...), a copy."""
        return dict(self.tasks.counters)

    def running_here(self) -> frozenset[bytes]:
        """Tasks whose execution holds a slot here."""
        return frozenset(self.tasks.running)

    def suspended_here(self) -> frozenset[bytes]:
        """Tasks running here that wait on their children and have freed their slot."""
        return frozenset(self.tasks.suspended)

    def peer_states(self) -> Mapping[bytes, PeerState]:
        """The latest signed state each peer advertised (roles, free slots, load), by node id."""
        return MappingProxyType(self.states)

    def signatures_verified(self) -> int:
        """Signatures this peer verified (each object digest once: the cache remembers)."""
        return self.cache.verified

    def members(self) -> list[Member]:
        """Every member known, this peer included."""
        return list(self.membership.members.values())

    def member(self, node_id: bytes) -> Member | None:
        """The member with `node_id`, if known."""
        return self.membership.members.get(node_id)

    @property
    def incarnation(self) -> int:
        """This peer's current incarnation."""
        return self.membership.incarnation

    # Internals.

    def _enter(self, now: float) -> None:
        gap = now - self._last_call
        self._last_call = now
        if gap > _FROZEN:
            self.tasks.on_stall(now, _FROZEN)
        if gap > self.config.swim.stall_threshold:
            self.note(StallDetected(gap))
            self.membership.on_stall(now)
            self.tasks.on_stall(now)
            self._last_heard = now

    def _exit(self) -> Effects:
        self.tasks.settle(self._last_call)
        fx = self._fx
        self._fx = Effects()
        fx.wake_at = self._timers[0][0] if self._timers else None
        return fx

    def _seen_recently(self, raw: bytes) -> bool:
        return raw in self._recent or raw in self._recent_old

    def _remember(self, raw: bytes) -> None:
        # Only once the whole envelope decoded: a dropped envelope must leave no trace, or
        # its good messages would be skipped when they arrive again in a valid one.
        # Messages are fixarrays, so raw[1] is the kind (see the module docstring).
        if len(raw) < 2 or raw[1] not in _BROADCAST_KINDS:
            return
        self._recent.add(raw)
        if len(self._recent) >= _RECENT_CAPACITY:
            self._recent_old, self._recent = self._recent, set()

    def _fire(self, now: float, timer: Timer) -> None:
        m = self.membership
        match timer:
            case ProbeDue():
                m.on_probe_due(now)
                if self._isolated(now):
                    # Quiet at least until the next probe, which looks again.
                    next_probe = m.awareness.scale(self.config.swim.probe_interval)
                    self.tasks.on_isolated(now, now + next_probe)
            case ProbeTimeout(seq):
                m.on_probe_timeout(now, seq)
            case ProbeRoundEnd(seq):
                m.on_probe_round_end(now, seq)
            case RelayTimeout(seq):
                m.on_relay_timeout(seq)
            case SuspicionDue(node_id, generation):
                m.on_suspicion_due(now, node_id, generation)
            case GossipDue():
                self.schedule(now + self.config.gossip.gossip_interval, GossipDue())
                self._gossip_round()
            case PushPullDue():
                interval = push_pull_interval_for(
                    self.config.gossip.push_pull_interval, m.alive_count()
                )
                self.schedule(now + interval, PushPullDue())
                targets = m.random_members(1, lambda x: x.status == Status.ALIVE)
                if targets:
                    self._push_pull(targets[0].addr, join=False, reply=False)
            case ReconnectDue():
                self.schedule(now + self.config.gossip.reconnect_interval, ReconnectDue())
                self._reconnect()
            case TaskStandby(task_id, at):
                self.tasks.on_standby(now, task_id, at)
            case ReapDue():
                self.schedule(now + self.config.swim.gossip_to_the_dead, ReapDue())
                for node_id in m.reap(now):
                    self.states.pop(node_id, None)
                    self._full_since.pop(node_id, None)

    def _dispatch_other(self, now: float, src: str, msg: Message, raw: bytes) -> None:
        match msg:
            case PushPull():
                self.membership.merge(now, msg.members, src)
                for state in msg.states:
                    self._apply_state(state, None)
                if not msg.reply:
                    self._push_pull(src, join=msg.join, reply=True)
                elif self._joining:
                    self._joining.clear()
                    self.note(JoinSucceeded(src, self.membership.alive_count()))
            case UserEvent():
                self._apply_event(msg, raw)
            case PeerState():
                self._apply_state(msg, raw)
            case _:
                self.note(Dropped(src, f"unexpected {type(msg).__name__} message"))

    def _apply_event(self, ev: UserEvent, raw: bytes | None) -> None:
        if ev.ltime > self.ltime + _MAX_LTIME_JUMP:
            # Unsigned events could otherwise push every clock so far that all later events
            # look too old (Serf has this weakness).
            self.note(Dropped("event", f"event clock {ev.ltime} jumps too far ahead"))
            return
        self.ltime = max(self.ltime, ev.ltime)
        if ev.ltime + self.config.gossip.event_dedup < self.ltime:
            return  # older than anything we still remember: it may be a replay
        if not self.events.first_time(ev.origin, ev.ltime):
            return
        raw = raw or encode_message(ev)
        self._recent_events.append(raw)
        self.gossip(("event", ev.origin, ev.ltime), raw)
        self.note(EventReceived(ev.origin, ev.ltime, ev.name, ev.payload))

    def _apply_state(self, state: PeerState, raw: bytes | None) -> None:
        if state.node_id not in self.membership.members:
            # Gossip may bring a peer's state before its alive record; its copies are then
            # skipped as already seen, so keep it until the member is known.
            early = self._early_states.get(state.node_id)
            if early is None or early.version < state.version:
                self._early_states[state.node_id] = state
                if len(self._early_states) > _EARLY_STATES:
                    self._early_states.pop(next(iter(self._early_states)))
            return
        known = self.states.get(state.node_id)
        if known is not None and known.version >= state.version:
            return
        if state.node_id == self.node_id:
            # A record from an earlier life of ours: supersede it rather than adopt it.
            self._state_version = state.version
            return
        self.states[state.node_id] = state
        self.gossip(("state", state.node_id), raw or encode_message(state))
        if state.free_slots > 0:
            self._full_since.pop(state.node_id, None)
        else:
            self._full_since.setdefault(state.node_id, self._last_call)
        # The task rules read roles and fullness, not the number of free slots: a peer going
        # from 3 free slots to 2 changes no decision, and re-deciding every open task on each
        # such change costs O(open tasks) per gossiped state.
        if known is None or (known.roles, known.free_slots > 0) != (
            state.roles,
            state.free_slots > 0,
        ):
            self.tasks.view_changed()

    def _push_pull(self, addr: str, join: bool, reply: bool) -> None:
        states = tuple(self.states.values())
        msg = PushPull(join, reply, tuple(self.membership.entries()), states)
        messages = [encode_message(msg), *self._recent_events]
        if self.tasks.tasks:
            messages.append(encode_message(self.tasks.digests()))
        self.send(addr, messages, piggyback=False)

    def _isolated(self, now: float) -> bool:
        # Heard from no one for as long as others need to declare us dead: they will take
        # our work over, so what runs here would only be a duplicate.
        n = self.membership.alive_count()
        swim = self.config.swim
        quiet = suspicion_min_timeout(swim.suspicion_mult, n, swim.probe_interval)
        return n > 1 and now - self._last_heard > quiet + swim.probe_interval

    def _reconnect(self) -> None:
        m = self.membership
        candidates = [x.addr for x in m.others() if x.status == Status.DEAD]
        up_addrs = {x.addr for x in m.others() if x.up}
        candidates += [s for s in self._seeds if s not in up_addrs]
        if candidates:
            self._push_pull(candidates[self.rng.randrange(len(candidates))], False, False)

    def _gossip_targets(self) -> list[Member]:
        now = self._last_call
        grace = self.config.swim.gossip_to_the_dead

        def reachable(m: Member) -> bool:
            return m.up or (m.status == Status.DEAD and now - m.since < grace)

        return self.membership.random_members(self.config.gossip.gossip_fanout, reachable)

    def _gossip_round(self) -> None:
        if not len(self.queue):
            return
        targets = self._gossip_targets()
        budget = self.config.gossip.packet_budget - _ENVELOPE_OVERHEAD
        for extra in range(self.config.gossip.backlog_packets):
            # After the first packet, more only while news nobody was sent yet waits.
            if extra and not self.queue.fresh():
                return
            for target in targets:
                messages = self._broadcasts(budget, solo=True)
                if not messages:
                    return
                self._fx.sends.append(
                    Send(target.addr, encode_envelope(self.node_id, self.addr, messages))
                )

    def _broadcasts(self, budget: int, solo: bool = False) -> list[bytes]:
        if not len(self.queue):
            return []
        limit = retransmit_limit(self.config.gossip.retransmit_mult, self.membership.alive_count())
        out = self.queue.get(budget, limit, solo)
        if self._leave_msg is not None and self._leave_msg in out:
            self.leave_transmits += 1
        return out


def _age(state: TaskState) -> tuple[float, bytes]:
    """Oldest first: by the record's creation time, then by task id."""
    created = state.record.created if state.record is not None else 0.0
    return (created, state.task_id)
