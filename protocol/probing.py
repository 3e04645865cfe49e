"""The SWIM probe cycle: direct probes, indirect probes through helpers, and relays.

Theory of operation (SWIM section 3.1 with Lifeguard's local health, as memberlist does it):
- Every probe interval (scaled by awareness) ping the next member of a shuffled round-robin list
  of alive and suspect members; every other probe may instead re-check a suspect this peer has
  not probed for two intervals, or a member another peer declared down that this peer has not
  probed since (so this peer's own failure detector gets its say; see `Member.down_here`).
- No ack within the probe timeout: ask `indirect_checks` random alive members to ping the
  target for us. A helper relays the target's ack, or nacks before our round ends if it
  reached nobody.
- No ack by the end of the interval: report the target as unanswered (the membership rules
  then suspect it, or record that our own probe found it down). Missed nacks raise our
  awareness (we are probably the slow one); an ack lowers it and clears `Member.down_here`.
- A helper pings the target at the address its own member table holds, never at one the
  request names, and a target it does not know is nacked at once: a probe cannot be aimed at
  a stranger. Acks and nacks go to the requester's known address (`src`, as the node resolved
  it; an unknown requester's answers are dropped by `protocol.dissemination`).

Invariants:
- At most one probe of our own is running; its timers carry its sequence number, so a timer of
  an earlier probe finds nothing to do.
- An ack, nack or relay timeout that matches no running probe or relay changes nothing.
- A clock stall (`forget_running`) drops the running probe and every relay without a verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from protocol.codec import encode_message
from protocol.config import NodeConfig
from protocol.effects import Dropped, Note
from protocol.member_table import Member, MemberTable, Rng
from protocol.suspicion import Awareness
from protocol.timers import ProbeDue, ProbeRoundEnd, ProbeTimeout, RelayTimeout, Timer
from protocol.wire import Ack, IndirectPing, Nack, Ping, Status, Suspect

RELAY_TIMEOUT_FRACTION = 0.8
"""An indirect helper waits this fraction of the probe timeout before it nacks."""


class ProbePort(Protocol):
    """What probing needs from the node that hosts it."""

    def send(self, addr: str, messages: list[bytes], piggyback: bool) -> None: ...
    def note(self, note: Note) -> None: ...
    def schedule(self, at: float, timer: Timer) -> None: ...


@dataclass(slots=True)
class _Probe:
    seq: int
    target: bytes
    started: float
    acked: bool = False
    nacks_expected: int = 0
    nacks: int = 0


@dataclass(frozen=True, slots=True)
class _Relay:
    requester_addr: str
    requester_seq: int
    target: bytes
    seen: int


class Prober:
    """The probe cycle of one peer, over its member table.

    Args:
        config: the node's configuration (its `swim` section).
        table: the members to probe; `table.me` is this peer.
        awareness: this peer's local health, shared with the membership rules.
        rng: orders the round-robin and picks helpers.
        port: where pings, acks and timers go.
        unanswered: called when a probed member stayed silent for a whole round.
    """

    def __init__(
        self,
        config: NodeConfig,
        table: MemberTable,
        awareness: Awareness,
        rng: Rng,
        port: ProbePort,
        unanswered: Callable[[float, Member], None],
    ) -> None:
        self.config = config
        self.table = table
        self.awareness = awareness
        self.rng = rng
        self.port = port
        self.unanswered = unanswered
        self._order: list[bytes] = []
        self._next = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._last_probe_was_recheck = False
        self._rechecks: dict[bytes, None] = {}
        """Members to check on ourselves, oldest first (may hold stale entries)."""
        self._seq = 0
        self.probes_sent = 0
        """Direct probes this peer started (one per probe round with a target)."""
        self.indirect_probes = 0
        """Probe rounds that fell back to asking helpers (the target missed the probe timeout
        and at least one helper was asked)."""

    def add_target(self, node_id: bytes) -> None:
        """Put a member that came up into the round-robin, at a random position."""
        # A random position keeps new members from all being probed at once (memberlist).
        self._order.insert(self.rng.randrange(len(self._order) + 1), node_id)

    def recheck(self, node_id: bytes) -> None:
        """Check on a member ourselves soon: one we now suspect (again within the suspicion),
        or one declared down before our own probe found it so (once)."""
        self._rechecks[node_id] = None

    def forget_running(self) -> None:
        """Drop the running probe and every relay: our clock jumped, so no verdict."""
        self._probe = None
        self._relays.clear()

    def on_probe_due(self, now: float) -> None:
        if self._probe is not None:
            # The round of the previous probe ends now. Its ProbeRoundEnd is due at this same
            # instant but was armed after this timer, so it would find the probe replaced.
            self.on_probe_round_end(now, self._probe.seq)
        swim = self.config.swim
        self.port.schedule(now + self.awareness.scale(swim.probe_interval), ProbeDue())
        target = None if self._last_probe_was_recheck else self._recheck_target(now)
        self._last_probe_was_recheck = target is not None
        target = target or self._next_target()
        if target is None:
            self._probe = None
            return
        self._seq += 1
        self.probes_sent += 1
        self._probe = _Probe(self._seq, target.node_id, now)
        target.probed_at = now
        msgs = [encode_message(Ping(self._seq, target.node_id, target.incarnation))]
        if target.status == Status.SUSPECT:
            # Tell the target it is suspected, so it can refute without waiting for gossip.
            me = self.table.me.node_id
            msgs.append(encode_message(Suspect(target.node_id, target.incarnation, me)))
        self.port.send(target.addr, msgs, piggyback=True)
        self.port.schedule(now + self.awareness.scale(swim.probe_timeout), ProbeTimeout(self._seq))

    def on_probe_timeout(self, now: float, seq: int) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        target = self.table.members.get(probe.target)
        swim = self.config.swim
        end = probe.started + self.awareness.scale(swim.probe_interval)
        self.port.schedule(max(now, end), ProbeRoundEnd(seq))
        if target is None:
            return
        helpers = self.table.random_members(
            swim.indirect_checks,
            lambda m: m.status == Status.ALIVE and m.node_id != probe.target,
        )
        request = encode_message(IndirectPing(seq, target.node_id, target.addr, target.incarnation))
        for helper in helpers:
            self.port.send(helper.addr, [request], piggyback=False)
        probe.nacks_expected = len(helpers)
        if helpers:
            self.indirect_probes += 1

    def on_probe_round_end(self, now: float, seq: int) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        self._probe = None
        missed = probe.nacks_expected - probe.nacks
        self.awareness.apply(missed if probe.nacks_expected else 1)
        target = self.table.members.get(probe.target)
        if target is not None:
            self.unanswered(now, target)

    def on_ping(self, src: str, ping: Ping, death: bytes | None = None) -> None:
        """Ack a ping; `death`, our declaration that the prober is dead, goes first."""
        if ping.target != self.table.me.node_id:
            self.port.note(Dropped(src, "ping addressed to another node id"))
            return
        told = [death] if death is not None else []
        self.port.send(src, told + self._ack(ping.seq, ping.seen), piggyback=True)

    def _ack(self, seq: int, seen: int) -> list[bytes]:
        # A prober that knows us at an older incarnation missed our refutation: hand it over
        # first, so a relay has applied it by the time it forwards the ack.
        ack = encode_message(Ack(seq))
        me = self.table.me
        if seen >= me.incarnation:
            return [ack]
        return [encode_message(me.alive), ack]

    def on_indirect_ping(self, now: float, src: str, req: IndirectPing) -> None:
        if req.target == self.table.me.node_id:
            self.port.send(src, self._ack(req.seq, req.seen), piggyback=False)
            return
        target = self.table.members.get(req.target)
        if target is None:
            # Nobody we know to ping: say so at once, so the requester's awareness stays put.
            self.port.send(src, [encode_message(Nack(req.seq))], piggyback=False)
            return
        self._seq += 1
        self._relays[self._seq] = _Relay(src, req.seq, req.target, req.seen)
        ping = Ping(self._seq, req.target, req.seen)
        self.port.send(target.addr, [encode_message(ping)], True)
        # Nack before the requester's round ends (it asked us at probe_timeout into a round of
        # probe_interval), so a nack from a healthy helper is never mistaken for a missed one.
        timeout = RELAY_TIMEOUT_FRACTION * self.config.swim.probe_timeout
        self.port.schedule(now + self.awareness.scale(timeout), RelayTimeout(self._seq))

    def on_ack(self, ack: Ack) -> None:
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            msgs = [encode_message(Ack(relay.requester_seq))]
            target = self.table.members.get(relay.target)
            if target is not None and target.alive.incarnation > relay.seen:
                msgs.insert(0, encode_message(target.alive))
            self.port.send(relay.requester_addr, msgs, piggyback=False)
            return
        probe = self._probe
        if probe is not None and probe.seq == ack.seq and not probe.acked:
            probe.acked = True
            self.awareness.apply(-1)
            target = self.table.members.get(probe.target)
            if target is not None:
                target.down_here = False

    def on_nack(self, nack: Nack) -> None:
        probe = self._probe
        if probe is not None and probe.seq == nack.seq:
            probe.nacks += 1

    def on_relay_timeout(self, seq: int) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None:
            msg = encode_message(Nack(relay.requester_seq))
            self.port.send(relay.requester_addr, [msg], piggyback=False)

    def _recheck_target(self, now: float) -> Member | None:
        # Every other probe may go to a recheck (the rest keep the round-robin going, or a mass
        # failure would starve it): the one who suspects a member checks on it again within
        # the suspicion, instead of waiting for its round-robin turn, and the ack carries the
        # refutation if it was missed (see `_ack`); a member declared down by another peer
        # is probed once, so whether it is down here is this peer's own finding.
        horizon = now - 2 * self.awareness.scale(self.config.swim.probe_interval)
        for nid in list(self._rechecks):
            m = self.table.members.get(nid)
            if m is not None and m.status == Status.SUSPECT:
                if m.probed_at < horizon:
                    return m
            elif m is not None and not m.up and not m.down_here and m.probed_at < m.since:
                return m
            else:
                del self._rechecks[nid]
        return None

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._next < len(self._order):
                m = self.table.members.get(self._order[self._next])
                self._next += 1
                if m is not None and m.up:
                    return m
            self._order = [m.node_id for m in self.table.others() if m.up]
            self.rng.shuffle(self._order)
            self._next = 0
        return None
