"""SWIM membership with Lifeguard (Das, Gupta, Motivala 2002; Dadgar et al. 2018).

`Membership` is the entry point: it owns the member table (`protocol.member_table`), the probe
cycle (`protocol.probing`, reached as `Membership.probes`) and the rules below, which alone
decide which record about a member wins.

Theory of operation (the rules, in the order memberlist's state.go applies them):
- Probing (`protocol.probing`): each round pings one member, through `indirect_checks` helpers
  if it stays silent; a member silent for a whole round is suspected here.
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
- Incarnations are bounded on receipt (`protocol.wire`): an alive record above
  `MAX_INCARNATION`, or an unsigned claim (suspect, dead, a push-pull row's status) not below
  it or more than `INCARNATION_STEP` above the incarnation known here, changes nothing and is
  reported as `Dropped`. So a refutation (claim + 1) never exceeds `MAX_INCARNATION`, our own
  incarnation (and the one persisted for a restart) always encodes, and a forged claim costs
  at most one refutation.
- This peer's own verdicts are kept apart (`Member.down_here`, read by `confirmed_down`): a
  probe of ours unanswered for a whole round, or a suspicion running out here. A member
  another peer declared down is probed once more by us (`Prober.recheck`), so our own
  detector gets its say; when it agrees, the port hears `member_confirmed_down`.
- Dead and left members are kept for `dead_retention`, contacted by reconnect, then forgotten.
- A member held dead here that probes us is told so: the ack carries our death declaration of
  it, so a falsely declared member refutes at its next probe of us. Otherwise it would hear of
  its death only from gossip, whose few transmissions may all ride to other members, or at its
  next push-pull, tens of seconds later (memberlist relies on those two alone).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
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
from protocol.member_table import Member, MemberTable, Rng
from protocol.probing import Prober
from protocol.suspicion import Awareness, Suspicion
from protocol.timers import SuspicionDue, Timer
from protocol.wire import (
    INCARNATION_STEP,
    MAX_INCARNATION,
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
    def member_confirmed_down(self, node_id: bytes) -> None: ...


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
        self.incarnation = min(incarnation, MAX_INCARNATION)
        self.cache = cache
        self.port = port
        self.awareness = Awareness(config.swim.awareness_max_multiplier)
        self.leaving = False
        self._generation = 0
        self.false_refutations = 0
        """Times this peer had to refute a suspicion or death of itself."""
        self.suspicions = 0
        """Suspicions of other members started here (our own probe's, or one gossiped)."""
        self.suspicions_refuted = 0
        """Suspected members that proved alive (a newer alive record ended the suspicion)."""
        me = Member(self._sign_alive(), Status.ALIVE, self.incarnation, 0.0)
        self.table = MemberTable(me, rng)
        self.probes = Prober(config, self.table, self.awareness, rng, port, self._unanswered)
        self._announce_self()

    # Queries.

    @property
    def members(self) -> dict[bytes, Member]:
        """Every known member by node id, this peer included; read it, never write it."""
        return self.table.members

    def alive_count(self) -> int:
        """Members alive or suspect, including this peer (the n of the formulas)."""
        return self.table.alive_count()

    def entries(self) -> list[MemberEntry]:
        """The full state for a push-pull, this peer included."""
        return self.table.entries()

    def others(self) -> Iterator[Member]:
        """Every member other than this peer, in no particular order."""
        return self.table.others()

    def random_members(self, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to `k` distinct random other members satisfying `accept` (see `MemberTable`)."""
        return self.table.random_members(k, accept)

    def confirmed_down(self, node_id: bytes) -> bool:
        """True if `node_id` is down here and this peer's own failure detector agrees.

        Down and confirmed: dead or left, with a probe of ours unanswered for a whole round or
        a suspicion run out here since it last showed life (`Member.down_here`). A member not
        known here (never, or forgotten after `dead_retention` as dead) counts as confirmed.
        A suspicion or death declared by another peer alone never makes this True.
        """
        m = self.members.get(node_id)
        if m is None:
            return True
        return not m.up and m.down_here

    # Local alive record.

    def _sign_alive(self) -> Alive:
        payload = alive_payload(self.signer.public_key, self.addr, self.incarnation)
        sig = self.signer.sign(DOMAIN_ALIVE, payload)
        return Alive(self.signer.public_key, self.addr, self.incarnation, sig, self.node_id)

    def _announce_self(self) -> None:
        me = self.table.me
        me.alive = self._sign_alive()
        me.incarnation = self.incarnation
        self.port.persist(PersistKind.INCARNATION, b"self", self.incarnation.to_bytes(8, "big"))
        self.port.gossip(_membership_key(self.node_id), encode_message(me.alive))

    def _refute(self, accused_incarnation: int) -> None:
        # Accusations are accepted only below MAX_INCARNATION, so this is at most the cap; the
        # min covers an alive record of ours at the cap (only our own key can sign one).
        self.incarnation = min(max(self.incarnation, accused_incarnation) + 1, MAX_INCARNATION)
        self.awareness.apply(1)
        self.false_refutations += 1
        self._announce_self()

    # Membership rules.

    def apply_alive(self, now: float, a: Alive, src: str, raw: bytes | None) -> None:
        """Apply an alive record (signature checked only if it would change something)."""
        m = self.members.get(a.node_id)
        if m is not None and a.node_id != self.node_id and a.incarnation <= m.incarnation:
            return  # old news changes nothing, so its signature need not be checked
        if a.incarnation > MAX_INCARNATION:
            self.port.note(Dropped(src, f"alive record above incarnation {MAX_INCARNATION}"))
            return
        if not self._verified(a, src):
            return
        if a.node_id == self.node_id:
            mine = self.table.me.alive
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
        self.table.set_status(m, Status.ALIVE)
        m.alive, m.incarnation, m.since = a, a.incarnation, now
        m.suspicion, m.down_here = None, False
        self.port.gossip(_membership_key(a.node_id), raw or encode_message(a))
        if was == Status.SUSPECT:
            self.suspicions_refuted += 1
        if was >= Status.DEAD:
            self.probes.add_target(a.node_id)
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
        self.suspicions += 1
        self.table.set_status(m, Status.SUSPECT)
        m.incarnation, m.since = s.incarnation, now
        m.suspicion = Suspicion(
            now,
            low,
            low * swim.suspicion_max_timeout_mult,
            suspicion_confirmations_wanted(swim.suspicion_mult, n),
            s.accuser,
            self._generation,
        )
        self._schedule_suspicion(m)
        self.probes.recheck(m.node_id)
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
        self.table.set_status(m, Status.LEFT if left else Status.DEAD)
        m.incarnation, m.since, m.suspicion = d.incarnation, now, None
        if not m.down_here:
            self.probes.recheck(m.node_id)
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
            if e.status == Status.ALIVE or not self.credible(nid, e.incarnation, src):
                continue
            if e.status == Status.LEFT:
                self.apply_dead(now, Dead(nid, e.incarnation, nid), None)
            else:
                self.apply_suspect(now, Suspect(nid, e.incarnation, self.node_id), None)

    def _learn_departed(self, now: float, e: MemberEntry, src: str) -> None:
        a = e.alive
        if a.node_id == self.node_id:
            return
        if a.incarnation > MAX_INCARNATION or not self._verified(a, src):
            return
        incarnation = max(e.incarnation, a.incarnation)
        if not self._within(a.incarnation, incarnation, src):
            return
        m = Member(a, e.status, incarnation, now)
        self._add(m)
        self.probes.recheck(m.node_id)

    def credible(self, node_id: bytes, incarnation: int, src: str) -> bool:
        """Whether an unsigned claim (suspect, dead) of `incarnation` about `node_id` may be
        applied: below `MAX_INCARNATION` and within `INCARNATION_STEP` of what is known here.
        A claim that may not is reported as `Dropped`."""
        if node_id == self.node_id:
            return self._within(self.incarnation, incarnation, src)
        m = self.members.get(node_id)
        return m is None or self._within(m.incarnation, incarnation, src)

    def _within(self, known: int, claimed: int, src: str) -> bool:
        if claimed < MAX_INCARNATION and claimed <= known + INCARNATION_STEP:
            return True
        self.port.note(Dropped(src, f"claim of incarnation {claimed}, {known} known"))
        return False

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
        gone = [m.node_id for m in self.others() if m.status >= Status.DEAD and m.since < cutoff]
        for nid in gone:
            self.table.remove(nid)
        return gone

    def on_suspicion_due(self, now: float, node_id: bytes, generation: int) -> None:
        m = self.members.get(node_id)
        s = m.suspicion if m is not None else None
        if m is None or s is None or s.generation != generation:
            return
        if now < s.deadline:
            self.port.schedule(s.deadline, SuspicionDue(node_id, generation))
            return
        m.down_here = True
        self.apply_dead(now, Dead(node_id, m.incarnation, self.node_id), None)

    def on_stall(self, now: float) -> None:
        """Our clock jumped: no verdict from timers that ran while we were frozen."""
        self.probes.forget_running()
        self.awareness.apply(self.awareness.max_multiplier)
        for m in self.others():
            if m.suspicion is not None:
                m.suspicion.restart(now)
                self._schedule_suspicion(m)

    def dispatch(
        self, now: float, src: str, msg: MembershipMessage, raw: bytes, sender: bytes = b""
    ) -> None:
        """Apply one membership message received from `src`, sent by node `sender` (as its
        envelope says; only used to tell a prober we hold dead that we do)."""
        if isinstance(msg, Suspect | Dead) and not self.credible(msg.node_id, msg.incarnation, src):
            return
        match msg:
            case Ping():
                self.probes.on_ping(src, msg, self._death_of(sender))
            case IndirectPing():
                self.probes.on_indirect_ping(now, src, msg)
            case Ack():
                self.probes.on_ack(msg)
            case Nack():
                self.probes.on_nack(msg)
            case Alive():
                self.apply_alive(now, msg, src, raw)
            case Suspect():
                self.apply_suspect(now, msg, raw)
            case Dead():
                self.apply_dead(now, msg, raw)
            case _:
                assert_never(msg)

    def _death_of(self, node_id: bytes) -> bytes | None:
        """Our death declaration of `node_id` if we hold it dead (not left), else None."""
        m = self.members.get(node_id)
        if m is None or m.status != Status.DEAD or node_id == self.node_id:
            return None
        return encode_message(Dead(node_id, m.incarnation, self.node_id))

    # Bookkeeping.

    def _schedule_suspicion(self, m: Member) -> None:
        assert m.suspicion is not None
        self.port.schedule(m.suspicion.deadline, SuspicionDue(m.node_id, m.suspicion.generation))

    def _add(self, m: Member) -> None:
        self.table.add(m)
        if m.up:
            self.probes.add_target(m.node_id)

    def _unanswered(self, now: float, target: Member) -> None:
        was_down_here, target.down_here = target.down_here, True
        if target.up:
            self.apply_suspect(now, Suspect(target.node_id, target.incarnation, self.node_id), None)
        elif not was_down_here:
            # Declared down by another peer first; our own probe now agrees.
            self.port.member_confirmed_down(target.node_id)
