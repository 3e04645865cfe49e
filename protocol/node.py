"""One peer's protocol state: membership, dissemination, user events and peer state, composed.

Theory of operation
- The host calls `handle(now, src, data)` for every envelope received, `tick(now)` at or after
  the `wake_at` it was last given, and the calls `join`, `leave`, `broadcast` (a user event),
  `set_state`, and for tasks `submit`, `complete`, `checkpoint`, `cancel`, `fetch`,
  `suspend`, `resume`, `serve`, `restore` (`protocol.node_task_calls`). Each returns
  `Effects`; the host persists, then sends, then reads the notifications and runs the
  commands (start or stop an execution).
- Time only moves through `now`; randomness only through the injected rng. Same inputs, same
  outputs, byte for byte: that is what lets the simulator replay a seed exactly.
- Input from peers never raises: a bad envelope is dropped whole (`Dropped`, nothing applied);
  a message that decodes but fails a semantic check (bad signature) is dropped alone.
- If `now` jumped by more than `stall_threshold` since the previous call, the host froze us
  (GC pause, suspended VM): running timeouts are restarted instead of trusted.
- Byte-identical copies of broadcasts received recently are skipped before decoding (see
  `protocol.dissemination`).
- The parts: `Membership` (SWIM), `Dissemination` (gossip, piggybacking, seeds, leaving),
  `UserEvents`, `PeerStates` and `Tasks`; they act through, and the task rules read the
  network through, one `NodePort` (`protocol.node_port`), which buffers the effects and the
  timers. `Node` is the host's API: it builds the parts, keeps the clock, routes each message
  and timer to its part, and answers the host's read-only queries (`protocol.node_queries`).
"""

from __future__ import annotations

from typing import assert_never

from protocol.codec import decode_message, encode_message
from protocol.config import NodeConfig, push_pull_interval_for, suspicion_min_timeout
from protocol.dissemination import Dissemination
from protocol.effects import Dropped, Effects, JoinSucceeded, StallDetected
from protocol.envelope import Envelope, decode_envelope
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.identity import Signer, VerifiedCache
from protocol.member_table import Rng
from protocol.membership import Membership
from protocol.node_port import NodePort
from protocol.node_task_calls import NodeTaskCalls
from protocol.peer_states import PeerStates
from protocol.tasks.claim_rule import DOWN_GRACE_PROBES
from protocol.tasks.messages import (
    Cancel,
    Checkpoint,
    Claim,
    EpochGrant,
    Result,
    TaskAsk,
    TaskGrant,
    TaskHave,
    TaskHeld,
    TaskList,
    TaskPage,
    TaskProgress,
    TaskRead,
    TaskRecord,
    TaskShards,
    TaskWant,
)
from protocol.tasks.plane import Tasks
from protocol.timers import (
    GossipDue,
    JoinSettleDue,
    LingerDue,
    ProbeDue,
    ProbeRoundEnd,
    ProbeTimeout,
    PushPullDue,
    ReapDue,
    ReconnectDue,
    RelayTimeout,
    RetentionDue,
    SuspicionDue,
    TaskStandby,
    Timer,
)
from protocol.user_events import UserEvents
from protocol.wire import (
    MAX_EVENT_PAYLOAD,
    MAX_NAME_CHARS,
    MAX_ROLES,
    MAX_STATE_MODELS,
    MAX_UINT,
    RUN_COUNTS,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    ModelUsage,
    Nack,
    PeerState,
    Ping,
    PushPull,
    Status,
    Suspect,
    UserEvent,
)

_FROZEN = 0.5
"""A gap between calls longer than this means we were frozen (gossip timers call us every
gossip interval otherwise): input queued meanwhile is read before any claim is made."""


class Node(NodeTaskCalls):
    """The sans-IO protocol state machine of one peer.

    Args:
        config: validated protocol configuration.
        signer: this peer's identity key, bound to `config.network_id`.
        addr: the address other peers reach us at ("host:port").
        rng: a seeded `random.Random` (or anything with the same methods).
        now: the current time (seconds, monotonic).
        incarnation: start above every incarnation this identity used before; the host keeps
            the last one durable (its `PersistKind.INCARNATION` record) and passes it + 1.
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
        self._last_heard = now
        port = self.port = NodePort(self.node_id, now)
        self.queue = port.queue
        self.user_events = UserEvents(self.node_id, config.gossip.event_dedup, port)
        self.advertisements = port.advertisements = PeerStates(
            signer, incarnation, self.cache, lambda nid: self.membership.members.get(nid), port
        )
        self.membership = port.membership = Membership(
            config, signer, addr, incarnation, rng, self.cache, port
        )
        self.dissemination = port.dissemination = Dissemination(
            config, self.node_id, addr, rng, self.membership, self.queue, port.deliver, port.note
        )
        self.tasks = port.tasks = Tasks(
            signer,
            config.network_id,
            lambda: self.membership.incarnation,
            config.tasks.standby_delay,
            config.tasks.replication,
            self.cache,
            port,
            port,
            retention=config.tasks.retention,
            tombstone_grace=config.tasks.tombstone_grace,
            down_grace=DOWN_GRACE_PROBES * config.swim.probe_interval,
        )
        g = config.gossip
        port.schedule(now + rng.random() * config.swim.probe_interval, ProbeDue())
        port.schedule(now + rng.random() * g.gossip_interval, GossipDue())
        port.schedule(now + g.push_pull_interval * (0.5 + rng.random()), PushPullDue())
        port.schedule(now + g.reconnect_interval * (0.5 + rng.random()), ReconnectDue())
        port.schedule(now + config.swim.gossip_to_the_dead, ReapDue())

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
                if self.dissemination.seen_recently(raw):
                    continue
                decoded.append((decode_message(raw), raw))
        except RemoteProtocolError as exc:
            self.port.note(Dropped(src, str(exc)))
            return self._exit()
        for _, raw in decoded:
            self.dissemination.remember(raw)
        self._last_heard = now
        for msg, raw in decoded:
            self._dispatch(now, envelope, msg, raw)
        return self._exit()

    def tick(self, now: float) -> Effects:
        """Fire every timer due at `now`."""
        self._enter(now)
        while (timer := self.port.due(now)) is not None:
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
        for seed in self.dissemination.add_seeds(seeds, remember):
            self._push_pull(seed, join=True, reply=False)
        return self._exit()

    def remember_members(self, now: float, members: list[tuple[bytes, float]]) -> None:
        """Before joining after a restart: the members this peer knew before it, each as
        (node id, seconds since it was last seen up). Until the table learns of them (or
        `dead_retention` after they were last seen) they count among the members a task's
        home is ranked from, so that a peer restarted where it reaches only some of the
        network does not take itself for a task's arbiter (decision 51)."""
        self.port.remember(now, members, self.config.swim.dead_retention)

    def leave(self, now: float) -> Effects:
        """Leave gracefully: gossip our departure now. The host keeps ticking until
        `leave_done()` (or its own timeout), then stops."""
        self._enter(now)
        self.dissemination.leave(self.membership.leave())
        self.dissemination.gossip_round(now)
        return self._exit()

    def leave_done(self) -> bool:
        """True once the leave was sent to `gossip_fanout` peers, or as often as the retransmit
        limit allows when that is lower, or there is no one to tell."""
        return self.dissemination.leave_done()

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
        self.user_events.broadcast(name, payload)
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
        self.advertisements.advertise(roles, free_slots, queue_len, load)
        return self._exit()

    def set_usage(
        self, now: float, agents: int, spend_micro: int, models: tuple[ModelUsage, ...] = ()
    ) -> Effects:
        """Advertise how many agents this peer hosts, what its model calls cost (micro-dollars)
        and, for up to `MAX_STATE_MODELS` models, each one's spend, breaker, tokens and
        rate-limit waits, in our peer state (gossiped at a bounded rate: decisions 47, 54
        and 59).

        Raises:
            LocalProtocolError: a number negative or beyond the wire's range, more models
                than a state carries, a model named twice or a name the wire refuses.
        """
        if not 0 <= agents <= MAX_UINT or not 0 <= spend_micro <= MAX_UINT:
            raise LocalProtocolError(f"agents and spend_micro must be within 0..{MAX_UINT}")
        if len(models) > MAX_STATE_MODELS or len({m.model for m in models}) != len(models):
            raise LocalProtocolError(
                f"a peer state names at most {MAX_STATE_MODELS} models, each once"
            )
        for m in models:
            counts = (m.spend_micro, m.tokens, m.waits, m.waiting)
            if not 0 < len(m.model) <= MAX_NAME_CHARS or not all(
                0 <= c <= MAX_UINT for c in counts
            ):
                raise LocalProtocolError(f"model usage out of the wire's range: {m!r:.200}")
        self._enter(now)
        self.port.usage_changed(agents, spend_micro, tuple(models))
        return self._exit()

    def set_runs(self, now: float, runs: tuple[int, ...]) -> Effects:
        """Advertise this peer's executions since it started, counted as `RUN_COUNTS` names
        them, in our peer state, for dashboards to sum (gossiped at the slowest rate:
        decision 64).

        Raises:
            LocalProtocolError: not one count per `RUN_COUNTS` name, or one out of the wire's
                range.
        """
        if len(runs) != len(RUN_COUNTS) or not all(0 <= n <= MAX_UINT for n in runs):
            raise LocalProtocolError(
                f"run counts are {len(RUN_COUNTS)} integers within 0..{MAX_UINT}"
            )
        self._enter(now)
        self.port.runs_changed(tuple(runs) if any(runs) else ())
        return self._exit()

    # Internals.

    def _enter(self, now: float) -> None:
        gap = now - self.port.now
        self.port.now = now
        if gap > _FROZEN:
            self.tasks.on_stall(now, _FROZEN)
        if gap > self.config.swim.stall_threshold:
            self.port.note(StallDetected(gap))
            self.membership.on_stall(now)
            self.tasks.on_stall(now)
            self._last_heard = now

    def _exit(self) -> Effects:
        self.tasks.settle(self.port.now)
        self.port.flush_state()
        return self.port.take()

    def _fire(self, now: float, timer: Timer) -> None:
        m = self.membership
        match timer:
            case ProbeDue():
                m.probes.on_probe_due(now)
                self._resync_recovered()
                if self._isolated(now):
                    # Quiet at least until the next probe, which looks again.
                    next_probe = m.awareness.scale(self.config.swim.probe_interval)
                    self.tasks.on_isolated(now, now + next_probe)
            case ProbeTimeout(seq):
                m.probes.on_probe_timeout(now, seq)
            case ProbeRoundEnd(seq):
                m.probes.on_probe_round_end(now, seq)
            case RelayTimeout(seq):
                m.probes.on_relay_timeout(seq)
            case SuspicionDue(node_id, generation):
                m.on_suspicion_due(now, node_id, generation)
            case GossipDue():
                self.port.schedule(now + self.config.gossip.gossip_interval, GossipDue())
                self.dissemination.gossip_round(now)
            case PushPullDue():
                interval = push_pull_interval_for(
                    self.config.gossip.push_pull_interval, m.alive_count()
                )
                self.port.schedule(now + interval, PushPullDue())
                targets = m.random_members(1, lambda x: x.status == Status.ALIVE)
                if targets:
                    self._push_pull(targets[0].addr, join=False, reply=False)
            case JoinSettleDue():
                # The seed's answer is a snapshot: a peer that joined a moment later reaches
                # us only by gossip, whose few retransmissions can all miss us, and then by
                # the next periodic push-pull, 15 to 60 s away. memberlist accepts that wait;
                # one early exchange with any member (the seed included) closes it.
                targets = m.random_members(1, lambda x: x.status == Status.ALIVE)
                if targets:
                    self._push_pull(targets[0].addr, join=False, reply=False)
            case ReconnectDue():
                self.port.schedule(now + self.config.gossip.reconnect_interval, ReconnectDue())
                target = self.dissemination.reconnect_target()
                if target is not None:
                    self._push_pull(target, join=False, reply=False)
            case TaskStandby(task_id, at):
                self.tasks.on_standby(now, task_id, at)
            case LingerDue():
                self.tasks.send_lingering(now)
            case RetentionDue(at):
                self.tasks.on_retention_due(now, at)
            case ReapDue():
                self.port.schedule(now + self.config.swim.gossip_to_the_dead, ReapDue())
                for node_id in m.reap(now):
                    self.advertisements.forget(node_id)
                self.port.forget_remembered(now)
            case _:
                assert_never(timer)

    def _dispatch(self, now: float, envelope: Envelope, msg: Message, raw: bytes) -> None:
        # Answers go to where the sender is known to be, not where the envelope says (see
        # `protocol.dissemination`); asked per message, as one may have just introduced it.
        sender = envelope.sender
        src = self.dissemination.reply_addr(sender, envelope.sender_addr)
        match msg:
            case Ping() | IndirectPing() | Ack() | Nack() | Alive() | Suspect() | Dead():
                self.membership.dispatch(now, src, msg, raw, sender)
            case (
                TaskRecord()
                | Claim()
                | Result()
                | Cancel()
                | EpochGrant()
                | Checkpoint()
                | TaskHeld()
                | TaskShards()
                | TaskHave()
                | TaskRead()
                | TaskWant()
                | TaskAsk()
                | TaskGrant()
                | TaskList()
                | TaskPage()
                | TaskProgress()
            ):
                self.tasks.dispatch(now, src, sender, msg, raw)
            case PushPull():
                self.membership.merge(now, msg.members, src)
                for state in msg.states:
                    self._apply_state(now, state, None, src)
                if not msg.reply:
                    to = self.dissemination.push_pull_answer_addr(
                        now, sender, envelope.sender_addr, msg.join
                    )
                    if to is not None:
                        self._push_pull(to, join=msg.join, reply=True)
                elif self.dissemination.joining:
                    self.dissemination.joining.clear()
                    # Known by now from its own state, at the address it signed.
                    seed = self.dissemination.reply_addr(sender, envelope.sender_addr)
                    self.port.note(JoinSucceeded(seed, self.membership.alive_count()))
                    settle = now + self.config.swim.probe_interval
                    self.port.schedule(settle, JoinSettleDue())
            case UserEvent():
                self.user_events.apply(msg, raw)
            case PeerState():
                self._apply_state(now, msg, raw, src)
            case _:
                assert_never(msg)

    def _apply_state(self, now: float, state: PeerState, raw: bytes | None, src: str) -> None:
        if self.advertisements.apply(now, state, raw, src):
            self.tasks.view_changed()

    def _resync_recovered(self) -> None:
        # A member back from dead (a restart, a healed partition) may hold what we lack and
        # lack what we hold: tasks finished on either side while apart are repaired by no
        # replica sync (their rounds ran out) and, at random push-pull pairing, only after
        # minutes at 30 peers (task campaign, seed 563). So exchange full state with each one
        # soon, one per probe interval (a heal that brings back many costs one push-pull a
        # second, not a storm).
        port = self.port
        while port.recovered:
            node_id = next(iter(port.recovered))
            del port.recovered[node_id]
            member = self.membership.table.members.get(node_id)
            if member is not None and member.status == Status.ALIVE:
                self._push_pull(member.addr, join=False, reply=False)
                return

    def _push_pull(self, addr: str, join: bool, reply: bool) -> None:
        states = self.advertisements.shared()
        msg = PushPull(join, reply, tuple(self.membership.entries()), states)
        messages = [encode_message(msg), *self.user_events.recent]
        if self.tasks.tasks:
            partner = next(
                (m.node_id for m in self.membership.members.values() if m.addr == addr), None
            )
            messages.append(encode_message(self.tasks.shard_summary(partner)))
        self.dissemination.send(addr, messages, piggyback=False)

    def _isolated(self, now: float) -> bool:
        # Heard from no one for as long as others need to declare us dead: they will take
        # our work over, so what runs here would only be a duplicate.
        n = self.membership.alive_count()
        swim = self.config.swim
        quiet = suspicion_min_timeout(swim.suspicion_mult, n, swim.probe_interval)
        return n > 1 and now - self._last_heard > quiet + swim.probe_interval
