"""Invariant checker for simulated runs: convergence, false positives, detection, dissemination.

The checker is a `Simulator` observer. It records, with virtual time, every membership verdict
(`MemberSuspected`, `MemberDown`, `MemberRecovered`) per observing peer and the first arrival of
every user event per peer, and it performs the faults it is asked to (`crash`, `restart`,
`pause`, `partition`, `heal`) so it knows when each happened.

Invariants and definitions:
- Converged: every running peer sees every other running peer ALIVE, and every stopped peer
  (crashed, node None) DEAD, LEFT or not at all. Paused peers are neither judged nor judging:
  a frozen peer may rightly be suspected, and its own view is stale until it resumes.
- False positive: `MemberDown(left=False)` at P about Q while Q was up in the life the verdict
  is about (its incarnation is at least the one Q started this life with), not paused, P and Q
  reachable, and no partition in effect anywhere during the last `evidence_window` seconds.
  The window is the longest a death verdict can take from the first missed probe (maximum
  suspicion timeout plus two probe intervals). Verdicts travel: a peer cut off from Q rightly
  declares it dead, and after the heal that verdict reaches Q's own side before Q's refutation
  does (memberlist behaves the same), so a verdict that close to a partition is evidence from
  the partition, not a mistake. A pause is never an excuse: pauses below the detection time must
  not get anyone declared dead. A suspicion of a running, reachable peer (no window) is a false
  suspicion: expected under loss and after a heal, harmless once refuted.
- Crash detection time: from `crash` until every peer that kept running the same life since
  the crash holds a `MemberDown` about the crashed peer issued after the crash; None until then.
- Dissemination of a user event: among the peers running at the query in the life they had when
  the event was sent, the time from the send until a given fraction of them received it.
- Everything here is a pure function of the notes seen and the calls made, so it is as
  deterministic as the simulator. Recording is O(1) per note; `converged` is O(n^2) dictionary
  lookups, which is a fraction of a second at 1,000 peers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from protocol.config import suspicion_min_timeout
from protocol.effects import (
    EventReceived,
    MemberDown,
    MemberRecovered,
    MemberSuspected,
    Note,
    StallDetected,
)
from protocol.sim.simulator import SimPeer, Simulator
from protocol.wire import Status


@dataclass(frozen=True, slots=True)
class Verdict:
    """One membership notification: `observer` changed its mind about `subject` at `time`."""

    time: float
    observer: int
    subject: int
    incarnation: int
    false: bool
    """The verdict was about a peer that was demonstrably up and reachable (see module doc)."""


@dataclass(frozen=True, slots=True)
class Convergence:
    """How far the views are from agreement. True when `ok`."""

    ok: bool
    views: int
    """Running peers whose views were checked."""
    missing: int
    """(observer, subject) pairs where a running subject is unknown to the observer."""
    not_alive: int
    """Pairs where a running subject is seen worse than allowed (dead or left; and suspect
    unless suspicion was accepted)."""
    stale: int
    """Pairs where a stopped subject is still seen ALIVE or SUSPECT."""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"converged ({self.views} views)"
        return (
            f"not all alive over {self.views} views: {self.missing} running peers unknown, "
            f"{self.not_alive} running peers held suspect or dead, "
            f"{self.stale} stopped peers still up"
        )


@dataclass(frozen=True, slots=True)
class Dissemination:
    """How one user event spread: seconds until each fraction of the target peers had it."""

    target: int
    """Peers that should have received it (running, same life as when it was sent)."""
    received: int
    missing: int
    seconds: dict[float, float | None] = field(default_factory=dict)
    """Fraction -> seconds after the send (None: not reached)."""


@dataclass(frozen=True, slots=True)
class _Crash:
    index: int
    time: float
    lives: tuple[int, ...]
    """Every peer's `life` at the crash, to tell who kept running the same life."""


class Checker:
    """Records a simulated run and answers questions about it.

    Args:
        sim: the simulator to observe; the checker registers itself as an observer.
    """

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self._index = {p.signer.node_id: p.index for p in sim.peers}
        self._life_start_incarnation = [0] * len(sim.peers)
        self._cuts: list[tuple[float, dict[int, int]]] = [(-math.inf, {})]
        """Partition history: (time it started, peer index -> side); {} is a whole network."""
        swim = sim.config.swim
        low = suspicion_min_timeout(swim.suspicion_mult, len(sim.peers), swim.probe_interval)
        self.evidence_window = low * swim.suspicion_max_timeout_mult + 2 * swim.probe_interval
        """Seconds before a death verdict that count as its evidence (see the module doc)."""
        self.suspicions: list[Verdict] = []
        self.downs: list[Verdict] = []
        self.lefts: list[Verdict] = []
        self.recoveries: list[Verdict] = []
        self.stalls: list[tuple[float, int, float]] = []
        """(time, peer, gap) for each `StallDetected`."""
        self.crashes: list[_Crash] = []
        self._downs_of: dict[int, list[Verdict]] = {}
        self._events: dict[tuple[bytes, int], dict[int, float]] = {}
        self._event_lives: dict[tuple[bytes, int], tuple[float, tuple[int, ...]]] = {}
        sim.observers.append(self)

    # Faults, performed through the checker so it knows when they happened.

    def crash(self, index: int) -> None:
        """Crash peer `index` now and remember when."""
        sim = self.sim
        self.crashes.append(_Crash(index, sim.now, tuple(p.life for p in sim.peers)))
        sim.crash(index)

    def restart(self, index: int) -> None:
        """Restart crashed peer `index`; verdicts about its earlier lives stop counting."""
        self.sim.restart(index)
        node = self.sim.peers[index].node
        assert node is not None
        self._life_start_incarnation[index] = node.incarnation

    def pause(self, index: int, duration: float) -> None:
        """Freeze peer `index` for `duration` seconds."""
        self.sim.pause(index, duration)

    def partition(self, sides: list[list[int]]) -> None:
        """Cut the network into sides of peer indices."""
        self.sim.partition(sides)
        self._cuts.append((self.sim.now, {i: s for s, side in enumerate(sides, 1) for i in side}))

    def heal(self) -> None:
        """End every partition."""
        self.sim.heal()
        self._cuts.append((self.sim.now, {}))

    def broadcast(self, index: int, name: str, payload: bytes) -> tuple[bytes, int, float]:
        """Send a user event from peer `index`; returns (origin, ltime, time sent)."""
        sim = self.sim
        t0 = sim.now
        lives = tuple(p.life if p.node is not None else -1 for p in sim.peers)
        origin, ltime = sim.broadcast(index, name, payload)
        self._event_lives[(origin, ltime)] = (t0, lives)
        return origin, ltime, t0

    # Observation.

    def __call__(self, now: float, peer: SimPeer, note: Note) -> None:
        kind = type(note)
        if kind is EventReceived:
            assert isinstance(note, EventReceived)
            seen = self._events.setdefault((note.origin, note.ltime), {})
            seen.setdefault(peer.index, now)
        elif kind is MemberSuspected:
            assert isinstance(note, MemberSuspected)
            subject = self._index.get(note.node_id)
            if subject is not None:
                false = self._up_and_reachable(now, peer.index, subject, note.incarnation)
                self.suspicions.append(Verdict(now, peer.index, subject, note.incarnation, false))
        elif kind is MemberDown:
            assert isinstance(note, MemberDown)
            subject = self._index.get(note.node_id)
            if subject is None:
                return
            if note.left:
                self.lefts.append(Verdict(now, peer.index, subject, note.incarnation, False))
                return
            false = self._up_and_reachable(
                now, peer.index, subject, note.incarnation
            ) and self._whole_since(now - self.evidence_window)
            v = Verdict(now, peer.index, subject, note.incarnation, false)
            self.downs.append(v)
            self._downs_of.setdefault(subject, []).append(v)
        elif kind is MemberRecovered:
            assert isinstance(note, MemberRecovered)
            subject = self._index.get(note.node_id)
            if subject is not None:
                self.recoveries.append(Verdict(now, peer.index, subject, note.incarnation, False))
        elif kind is StallDetected:
            assert isinstance(note, StallDetected)
            self.stalls.append((now, peer.index, note.gap))

    def _up_and_reachable(self, now: float, observer: int, subject: int, incarnation: int) -> bool:
        q = self.sim.peers[subject]
        if q.node is None or q.paused or incarnation < self._life_start_incarnation[subject]:
            return False
        return self._side(self._cuts[-1][1], observer) == self._side(self._cuts[-1][1], subject)

    def _whole_since(self, since: float) -> bool:
        """True if no partition was in effect at any time in [since, now]."""
        for start, sides in reversed(self._cuts):
            if sides:
                return False
            if start <= since:
                return True
        return True

    @staticmethod
    def _side(sides: dict[int, int], index: int) -> int:
        return sides.get(index, 0)

    # Figures.

    @property
    def false_positives(self) -> list[Verdict]:
        """Death verdicts about peers that were up and reachable (see the module doc)."""
        return [v for v in self.downs if v.false]

    @property
    def false_suspicions(self) -> list[Verdict]:
        """Suspicions of peers that were up and reachable when suspected."""
        return [v for v in self.suspicions if v.false]

    def converged(self, suspect_ok: bool = False) -> Convergence:
        """Compare every running peer's view with the truth (see the module doc).

        Args:
            suspect_ok: accept SUSPECT for running peers too. Under heavy loss some suspicion
                is always in flight, so "everyone sees everyone up" is the useful test there.
        """
        peers = self.sim.peers
        running = [p for p in peers if p.running]
        stopped = [p for p in peers if p.node is None]
        worst = Status.SUSPECT if suspect_ok else Status.ALIVE
        missing = not_alive = stale = 0
        for p in running:
            assert p.node is not None
            members = p.node.membership.members
            for q in running:
                if q is p:
                    continue
                m = members.get(q.signer.node_id)
                if m is None:
                    missing += 1
                elif m.status > worst:
                    not_alive += 1
            for q in stopped:
                m = members.get(q.signer.node_id)
                if m is not None and m.status <= Status.SUSPECT:
                    stale += 1
        ok = missing == not_alive == stale == 0
        return Convergence(ok, len(running), missing, not_alive, stale)

    def is_converged(self, suspect_ok: bool = False) -> bool:
        """`converged(suspect_ok).ok`, faster: stops at the first disagreement."""
        peers = self.sim.peers
        running = [p for p in peers if p.running]
        stopped = [p.signer.node_id for p in peers if p.node is None]
        running_ids = [p.signer.node_id for p in running]
        worst, suspect = (Status.SUSPECT if suspect_ok else Status.ALIVE), Status.SUSPECT
        for p in running:
            assert p.node is not None
            members = p.node.membership.members
            own = p.signer.node_id
            for nid in running_ids:
                if nid != own:
                    m = members.get(nid)
                    if m is None or m.status > worst:
                        return False
            for nid in stopped:
                m = members.get(nid)
                if m is not None and m.status <= suspect:
                    return False
        return True

    def detection(self, crash: int) -> float | None:
        """Seconds from the `crash`-th crash (in call order) until every peer that kept running
        the same life declared the crashed peer dead; None if some have not yet."""
        c = self.crashes[crash]
        survivors = {
            p.index
            for p in self.sim.peers
            if p.node is not None and p.index != c.index and p.life == c.lives[p.index]
        }
        first: dict[int, float] = {}
        for v in self._downs_of.get(c.index, ()):
            if v.time >= c.time and v.observer in survivors:
                first.setdefault(v.observer, v.time)
        if len(first) < len(survivors):
            return None
        return max(first.values(), default=c.time) - c.time

    def dissemination(
        self, origin: bytes, ltime: int, fractions: tuple[float, ...] = (0.5, 0.99, 0.9999, 1.0)
    ) -> Dissemination:
        """How the event (origin, ltime), sent through `broadcast`, reached its target peers.

        Raises:
            KeyError: the event was not sent through `Checker.broadcast`.
        """
        t0, lives = self._event_lives[(origin, ltime)]
        seen = self._events.get((origin, ltime), {})
        target = [
            p.index for p in self.sim.peers if p.node is not None and p.life == lives[p.index]
        ]
        times = sorted(seen[i] - t0 for i in target if i in seen)
        seconds: dict[float, float | None] = {}
        for f in fractions:
            need = max(1, math.ceil(f * len(target)))
            seconds[f] = times[need - 1] if need <= len(times) else None
        return Dissemination(len(target), len(times), len(target) - len(times), seconds)
