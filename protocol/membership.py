"""SWIM membership with Lifeguard (Das, Gupta, Motivala 2002; Dadgar et al. 2018).

Theory of operation (the rules, in the order memberlist's state.go applies them):
- Probing: every probe interval (scaled by awareness) ping the next member of a shuffled
  round-robin list of alive and suspect members. No ack within the probe timeout: ask
  `indirect_checks` random members to ping it for us (they nack if they reach nobody). No ack by
  the end of the interval: suspect the target. Missed nacks raise our awareness (we are probably
  the slow one); an ack lowers it.
- Incarnations order facts about a member. alive(i) overrides anything below i; suspect(i) and
  dead(i) override alive(j) for j <= i; dead(i) also overrides suspect(i). Only the member itself
  raises its incarnation, by signing a new alive record: that is a refutation.
- Suspicion: a suspected member is declared dead when its Lifeguard timeout runs out; the timeout
  starts at max and shrinks toward min as independent members confirm the suspicion.
- A member that hears itself suspected or declared dead refutes with incarnation + 1, unless it
  is leaving. Leaving is dead(i) sent by the member about itself, recorded as `left`.
- Push-pull merges a remote full state: alive entries are applied as alive; a remote *dead* is
  applied only as a suspicion, so the member gets a chance to refute; remote *left* is final.
  Members new to us are re-gossiped however we learned them, as memberlist does. (Keeping quiet
  about members learned from a push-pull halves the cost of a join storm in the simulator, but
  a fact whose retransmissions were spent while the network was small then never reaches a
  peer that joined concurrently until the next push-pull: measured, and rejected.)
- Only alive records are signed (by the member itself); a record whose signature fails changes
  nothing and is reported as `Dropped`.
- Dead and left members are kept for `dead_retention`, contacted by reconnect, then forgotten.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Protocol, assert_never

from protocol.codec import encode_message
from protocol.config import (
    NodeConfig,
    suspicion_confirmations_wanted,
    suspicion_min_timeout,
)
from protocol.effects import (
    Dropped,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    MemberSuspected,
    MemberUpdated,
    Note,
    PersistKind,
)
from protocol.identity import DOMAIN_ALIVE, Signer, VerifiedCache
from protocol.suspicion import Awareness, Suspicion
from protocol.timers import (
    ProbeDue,
    ProbeRoundEnd,
    ProbeTimeout,
    RelayTimeout,
    SuspicionDue,
    Timer,
)
from protocol.wire import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberEntry,
    MembershipMessage,
    Nack,
    Ping,
    Status,
    Suspect,
    alive_payload,
)


class Port(Protocol):
    """What membership needs from the node that hosts it."""

    def send(self, addr: str, messages: list[bytes], piggyback: bool) -> None: ...
    def gossip(self, key: Hashable, message: bytes) -> None: ...
    def note(self, note: Note) -> None: ...
    def schedule(self, at: float, timer: Timer) -> None: ...
    def persist(self, kind: PersistKind, key: bytes, value: bytes) -> None: ...


class Rng(Protocol):
    """The slice of `random.Random` the protocol uses; injected so runs replay exactly."""

    def random(self) -> float: ...
    def randrange(self, start: int, stop: int | None = ..., step: int = ...) -> int: ...
    def shuffle(self, x: list[bytes]) -> None: ...


class Member:
    """One member as this peer sees it."""

    __slots__ = ("alive", "status", "incarnation", "since", "suspicion", "probed_at")

    def __init__(self, alive: Alive, status: Status, incarnation: int, since: float) -> None:
        self.alive = alive
        self.status = status
        self.incarnation = incarnation
        self.since = since
        """When the status last changed (local clock)."""
        self.suspicion: Suspicion | None = None
        self.probed_at = float("-inf")
        """When this peer last probed the member (local clock)."""

    @property
    def node_id(self) -> bytes:
        return self.alive.node_id

    @property
    def addr(self) -> str:
        return self.alive.addr

    @property
    def up(self) -> bool:
        """Alive or suspect: still probed and gossiped to."""
        return self.status <= Status.SUSPECT


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


RELAY_TIMEOUT_FRACTION = 0.8
"""An indirect helper waits this fraction of the probe timeout before it nacks."""


def _membership_key(node_id: bytes) -> Hashable:
    return ("member", node_id)


class Membership:
    """The SWIM state machine of one peer. Driven by `protocol.node.Node`."""

    def __init__(
        self,
        config: NodeConfig,
        signer: Signer,
        addr: str,
        incarnation: int,
        rng: Rng,
        cache: VerifiedCache,
        port: Port,
    ) -> None:
        self.config = config
        self.signer = signer
        self.node_id = signer.node_id
        self.addr = addr
        self.incarnation = incarnation
        self.rng = rng
        self.cache = cache
        self.port = port
        self.awareness = Awareness(config.swim.awareness_max_multiplier)
        self.leaving = False
        self.members: dict[bytes, Member] = {}
        self._others: list[Member] = []
        self._other_index: dict[bytes, int] = {}
        self._probe_order: list[bytes] = []
        self._probe_next = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._last_probe_was_suspect = False
        self._suspects: dict[bytes, None] = {}
        """Members we hold as suspect, oldest suspicion first (may hold stale entries)."""
        self._seq = 0
        self._generation = 0
        self._up = 1
        self.false_refutations = 0
        """Times this peer had to refute a suspicion or death of itself."""
        self.members[self.node_id] = Member(self._sign_alive(), Status.ALIVE, incarnation, 0.0)
        self._announce_self()

    # Queries.

    def alive_count(self) -> int:
        """Members alive or suspect, including this peer (the n of the formulas)."""
        return self._up

    def entries(self) -> list[MemberEntry]:
        """The full state for a push-pull, this peer included."""
        return [MemberEntry(m.alive, m.status, m.incarnation) for m in self.members.values()]

    def others(self) -> Iterator[Member]:
        """Every member other than this peer, in no particular order."""
        return iter(self._others)

    def random_members(self, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to `k` distinct random other members satisfying `accept`.

        Rejection-samples the member list, so the cost is O(k) while most members qualify and
        never more than O(n).
        """
        n = len(self._others)
        if n == 0 or k <= 0:
            return []
        chosen: dict[bytes, Member] = {}
        for _ in range(4 * k + 8):
            m = self._others[self.rng.randrange(n)]
            if m.node_id not in chosen and accept(m):
                chosen[m.node_id] = m
                if len(chosen) == k:
                    return list(chosen.values())
        rest = [m for m in self._others if m.node_id not in chosen and accept(m)]
        while rest and len(chosen) < k:
            m = rest.pop(self.rng.randrange(len(rest)))
            chosen[m.node_id] = m
        return list(chosen.values())

    # Local alive record.

    def _sign_alive(self) -> Alive:
        payload = alive_payload(self.signer.public_key, self.addr, self.incarnation)
        sig = self.signer.sign(DOMAIN_ALIVE, payload)
        return Alive(self.signer.public_key, self.addr, self.incarnation, sig, self.node_id)

    def _announce_self(self) -> None:
        me = self.members[self.node_id]
        me.alive = self._sign_alive()
        me.incarnation = self.incarnation
        self.port.persist(PersistKind.INCARNATION, b"self", self.incarnation.to_bytes(8, "big"))
        self.port.gossip(_membership_key(self.node_id), encode_message(me.alive))

    def _refute(self, accused_incarnation: int) -> None:
        self.incarnation = max(self.incarnation, accused_incarnation) + 1
        self.awareness.apply(1)
        self.false_refutations += 1
        self._announce_self()

    # Membership rules.

    def apply_alive(self, now: float, a: Alive, src: str, raw: bytes | None) -> None:
        """Apply an alive record (signature checked only if it would change something)."""
        m = self.members.get(a.node_id)
        if m is not None and a.node_id != self.node_id and a.incarnation <= m.incarnation:
            return  # old news changes nothing, so its signature need not be checked
        if not self._verified(a, src):
            return
        if a.node_id == self.node_id:
            mine = self.members[self.node_id].alive
            if a.incarnation > self.incarnation or (
                a.incarnation == self.incarnation and a.addr != mine.addr
            ):
                self._refute(a.incarnation)
            return
        if m is None:
            m = Member(a, Status.ALIVE, a.incarnation, now)
            self._add(m)
            self.port.note(MemberJoined(a.node_id, a.addr, a.incarnation))
            self.port.gossip(_membership_key(a.node_id), raw or encode_message(a))
            return
        was = m.status
        if not m.up:
            self._up += 1
        m.alive, m.status, m.incarnation, m.since = a, Status.ALIVE, a.incarnation, now
        m.suspicion = None
        self.port.gossip(_membership_key(a.node_id), raw or encode_message(a))
        if was >= Status.DEAD:
            self._insert_probe_target(a.node_id)
            self.port.note(MemberRecovered(a.node_id, a.addr, a.incarnation))
        else:
            self.port.note(MemberUpdated(a.node_id, a.addr, a.incarnation))

    def apply_suspect(self, now: float, s: Suspect, raw: bytes | None) -> None:
        """Apply a suspicion raised or confirmed by `s.accuser`."""
        if s.node_id == self.node_id:
            if not self.leaving and s.incarnation >= self.incarnation:
                self._refute(s.incarnation)
            return
        m = self.members.get(s.node_id)
        if m is None or s.incarnation < m.incarnation:
            return
        if m.suspicion is not None:
            if m.suspicion.confirm(s.accuser):
                self._schedule_suspicion(m)
                self.port.gossip(_membership_key(m.node_id), raw or encode_message(s))
            return
        if m.status != Status.ALIVE:
            return
        n = self.alive_count()
        swim = self.config.swim
        low = suspicion_min_timeout(swim.suspicion_mult, n, swim.probe_interval)
        self._generation += 1
        m.status, m.incarnation, m.since = Status.SUSPECT, s.incarnation, now
        m.suspicion = Suspicion(
            now,
            low,
            low * swim.suspicion_max_timeout_mult,
            suspicion_confirmations_wanted(swim.suspicion_mult, n),
            s.accuser,
            self._generation,
        )
        self._schedule_suspicion(m)
        self._suspects[m.node_id] = None
        self.port.gossip(_membership_key(m.node_id), raw or encode_message(s))
        self.port.note(MemberSuspected(m.node_id, m.incarnation))

    def apply_dead(self, now: float, d: Dead, raw: bytes | None) -> None:
        """Apply a death declaration, or a leave when the accuser is the member itself."""
        if d.node_id == self.node_id:
            if not self.leaving and d.incarnation >= self.incarnation:
                self._refute(d.incarnation)
            return
        m = self.members.get(d.node_id)
        if m is None or d.incarnation < m.incarnation or m.status >= Status.DEAD:
            return
        left = d.accuser == d.node_id
        if m.up:
            self._up -= 1
        m.status = Status.LEFT if left else Status.DEAD
        m.incarnation, m.since, m.suspicion = d.incarnation, now, None
        self.port.gossip(_membership_key(m.node_id), raw or encode_message(d))
        self.port.note(MemberDown(m.node_id, m.incarnation, left))

    def merge(self, now: float, entries: tuple[MemberEntry, ...], src: str) -> None:
        """Merge a remote full state (push-pull)."""
        for e in entries:
            nid = e.alive.node_id
            if nid not in self.members and e.status >= Status.DEAD:
                self._learn_departed(now, e, src)
                continue
            self.apply_alive(now, e.alive, src, None)
            if e.status == Status.LEFT:
                self.apply_dead(now, Dead(nid, e.incarnation, nid), None)
            elif e.status != Status.ALIVE:
                self.apply_suspect(now, Suspect(nid, e.incarnation, self.node_id), None)

    def _learn_departed(self, now: float, e: MemberEntry, src: str) -> None:
        a = e.alive
        if a.node_id == self.node_id:
            return
        if not self._verified(a, src):
            return
        self._add(Member(a, e.status, max(e.incarnation, a.incarnation), now))

    def _verified(self, a: Alive, src: str) -> bool:
        ok = self.cache.verify(
            DOMAIN_ALIVE, self.config.network_id, a.public_key, a.signed_payload(), a.sig
        )
        if not ok:
            self.port.note(Dropped(src, "alive record with a bad signature"))
        return ok

    def leave(self) -> bytes:
        """Start leaving: returns the encoded leave broadcast (already queued)."""
        self.leaving = True
        msg = encode_message(Dead(self.node_id, self.incarnation, self.node_id))
        self.port.gossip(_membership_key(self.node_id), msg)
        return msg

    def reap(self, now: float) -> list[bytes]:
        """Forget members dead or left for longer than the retention; returns their ids."""
        cutoff = now - self.config.swim.dead_retention
        gone = [m.node_id for m in self._others if m.status >= Status.DEAD and m.since < cutoff]
        for nid in gone:
            self._remove(nid)
        return gone

    # Probing.

    def on_probe_due(self, now: float) -> None:
        if self._probe is not None:
            # The round of the previous probe ends now. Its ProbeRoundEnd is due at this same
            # instant but was armed after this timer, so it would find the probe replaced.
            self.on_probe_round_end(now, self._probe.seq)
        swim = self.config.swim
        self.port.schedule(now + self.awareness.scale(swim.probe_interval), ProbeDue())
        target = None if self._last_probe_was_suspect else self._stale_suspect(now)
        self._last_probe_was_suspect = target is not None
        target = target or self._next_probe_target()
        if target is None:
            self._probe = None
            return
        self._seq += 1
        self._probe = _Probe(self._seq, target.node_id, now)
        target.probed_at = now
        msgs = [encode_message(Ping(self._seq, target.node_id, target.incarnation))]
        if target.status == Status.SUSPECT:
            # Tell the target it is suspected, so it can refute without waiting for gossip.
            msgs.append(encode_message(Suspect(target.node_id, target.incarnation, self.node_id)))
        self.port.send(target.addr, msgs, piggyback=True)
        self.port.schedule(now + self.awareness.scale(swim.probe_timeout), ProbeTimeout(self._seq))

    def on_probe_timeout(self, now: float, seq: int) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        target = self.members.get(probe.target)
        swim = self.config.swim
        end = probe.started + self.awareness.scale(swim.probe_interval)
        self.port.schedule(max(now, end), ProbeRoundEnd(seq))
        if target is None:
            return
        helpers = self.random_members(
            swim.indirect_checks,
            lambda m: m.status == Status.ALIVE and m.node_id != probe.target,
        )
        request = encode_message(IndirectPing(seq, target.node_id, target.addr, target.incarnation))
        for helper in helpers:
            self.port.send(helper.addr, [request], piggyback=False)
        probe.nacks_expected = len(helpers)

    def on_probe_round_end(self, now: float, seq: int) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        self._probe = None
        missed = probe.nacks_expected - probe.nacks
        self.awareness.apply(missed if probe.nacks_expected else 1)
        target = self.members.get(probe.target)
        if target is not None and target.up:
            self.apply_suspect(now, Suspect(target.node_id, target.incarnation, self.node_id), None)

    def on_ping(self, src: str, ping: Ping) -> None:
        if ping.target != self.node_id:
            self.port.note(Dropped(src, "ping addressed to another node id"))
            return
        self.port.send(src, self._ack(ping.seq, ping.seen), piggyback=True)

    def _ack(self, seq: int, seen: int) -> list[bytes]:
        # A prober that knows us at an older incarnation missed our refutation: hand it over
        # first, so a relay has applied it by the time it forwards the ack.
        ack = encode_message(Ack(seq))
        if seen >= self.incarnation:
            return [ack]
        return [encode_message(self.members[self.node_id].alive), ack]

    def on_indirect_ping(self, now: float, src: str, req: IndirectPing) -> None:
        if req.target == self.node_id:
            self.port.send(src, self._ack(req.seq, req.seen), piggyback=False)
            return
        self._seq += 1
        self._relays[self._seq] = _Relay(src, req.seq, req.target, req.seen)
        ping = Ping(self._seq, req.target, req.seen)
        self.port.send(req.target_addr, [encode_message(ping)], True)
        # Nack before the requester's round ends (it asked us at probe_timeout into a round of
        # probe_interval), so a nack from a healthy helper is never mistaken for a missed one.
        timeout = RELAY_TIMEOUT_FRACTION * self.config.swim.probe_timeout
        self.port.schedule(now + self.awareness.scale(timeout), RelayTimeout(self._seq))

    def on_ack(self, ack: Ack) -> None:
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            msgs = [encode_message(Ack(relay.requester_seq))]
            target = self.members.get(relay.target)
            if target is not None and target.alive.incarnation > relay.seen:
                msgs.insert(0, encode_message(target.alive))
            self.port.send(relay.requester_addr, msgs, piggyback=False)
            return
        probe = self._probe
        if probe is not None and probe.seq == ack.seq and not probe.acked:
            probe.acked = True
            self.awareness.apply(-1)

    def on_nack(self, nack: Nack) -> None:
        probe = self._probe
        if probe is not None and probe.seq == nack.seq:
            probe.nacks += 1

    def on_relay_timeout(self, seq: int) -> None:
        relay = self._relays.pop(seq, None)
        if relay is not None:
            msg = encode_message(Nack(relay.requester_seq))
            self.port.send(relay.requester_addr, [msg], piggyback=False)

    def on_suspicion_due(self, now: float, node_id: bytes, generation: int) -> None:
        m = self.members.get(node_id)
        s = m.suspicion if m is not None else None
        if m is None or s is None or s.generation != generation:
            return
        if now < s.deadline:
            self.port.schedule(s.deadline, SuspicionDue(node_id, generation))
            return
        self.apply_dead(now, Dead(node_id, m.incarnation, self.node_id), None)

    def on_stall(self, now: float) -> None:
        """Our clock jumped: no verdict from timers that ran while we were frozen."""
        self._probe = None
        self._relays.clear()
        self.awareness.apply(self.awareness.max_multiplier)
        for m in self._others:
            if m.suspicion is not None:
                m.suspicion.restart(now)
                self._schedule_suspicion(m)

    def dispatch(self, now: float, src: str, msg: MembershipMessage, raw: bytes) -> None:
        """Apply one membership message."""
        match msg:
            case Ping():
                self.on_ping(src, msg)
            case IndirectPing():
                self.on_indirect_ping(now, src, msg)
            case Ack():
                self.on_ack(msg)
            case Nack():
                self.on_nack(msg)
            case Alive():
                self.apply_alive(now, msg, src, raw)
            case Suspect():
                self.apply_suspect(now, msg, raw)
            case Dead():
                self.apply_dead(now, msg, raw)
            case _:
                assert_never(msg)

    # Bookkeeping.

    def _schedule_suspicion(self, m: Member) -> None:
        assert m.suspicion is not None
        self.port.schedule(m.suspicion.deadline, SuspicionDue(m.node_id, m.suspicion.generation))

    def _add(self, m: Member) -> None:
        self.members[m.node_id] = m
        self._other_index[m.node_id] = len(self._others)
        self._others.append(m)
        if m.up:
            self._up += 1
            self._insert_probe_target(m.node_id)

    def _remove(self, node_id: bytes) -> None:
        if self.members.pop(node_id).up:
            self._up -= 1
        i = self._other_index.pop(node_id)
        last = self._others.pop()
        if i < len(self._others):
            self._others[i] = last
            self._other_index[last.node_id] = i

    def _insert_probe_target(self, node_id: bytes) -> None:
        # A random position keeps new members from all being probed at once (memberlist).
        self._probe_order.insert(self.rng.randrange(len(self._probe_order) + 1), node_id)

    def _stale_suspect(self, now: float) -> Member | None:
        # Every other probe may go to a suspect (the rest keep the round-robin going, or a mass
        # failure would starve it): the one who suspects a member
        # checks on it again within the suspicion, instead of waiting for its round-robin turn,
        # and the ack carries the refutation if it was missed (see `_ack`).
        horizon = now - 2 * self.awareness.scale(self.config.swim.probe_interval)
        for nid in list(self._suspects):
            m = self.members.get(nid)
            if m is None or m.status != Status.SUSPECT:
                del self._suspects[nid]
            elif m.probed_at < horizon:
                return m
        return None

    def _next_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_next < len(self._probe_order):
                m = self.members.get(self._probe_order[self._probe_next])
                self._probe_next += 1
                if m is not None and m.up:
                    return m
            self._probe_order = [m.node_id for m in self._others if m.up]
            self.rng.shuffle(self._probe_order)
            self._probe_next = 0
        return None
