"""A deterministic discrete-event simulator that runs the real `protocol.node.Node`.

Invariants:
- Virtual time only: one event heap ordered by (time, sequence number); nothing reads a clock.
- All randomness derives from the seed: the network's faults from one `random.Random(seed)`,
  each peer's protocol choices from its own `random.Random("seed:index")`, identities from the
  index. Same seed and same calls, same history, byte for byte.
- Peers are driven exactly as the asyncio driver drives them: `handle` for each delivery, `tick`
  at `wake_at`, effects applied in order (persist, then send, then notifications, then
  commands).
- A crashed peer loses everything but its durable records (the `Persist` effects); it restarts
  with the same identity and the next incarnation, as a real peer restarted on its data dir.
- A paused peer is frozen: messages to it wait in its socket buffer and arrive when it resumes,
  with the clock jumped forward, exactly what a GC pause or a suspended VM looks like.
- Peers share one verified-signature cache: verification is deterministic, and 1,000 peers must
  not pay 1,000 times for the same signature. To measure each peer's work, `per_peer_caches`
  gives every peer (every life of it: a restart forgets) its own counting cache
  (`protocol.sim.peer_cache.PeerCache`) that still shares the Ed25519 work.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.config import NodeConfig, sim
from protocol.effects import Command, Effects, JoinSucceeded, Note, PersistKind
from protocol.identity import Signer, VerifiedCache
from protocol.node import Node
from protocol.sim.network import LinkModel, Network
from protocol.sim.peer_cache import PeerCache
from protocol.wire import Status

_DELIVER, _WAKE, _RESUME, _ACTION = 0, 1, 2, 3
_PAUSE_BUFFER = 65536
JOIN_RETRY = 2.0
"""Seconds a simulated peer waits for a join answer before asking again (bootstrap's retry)."""

Observer = Callable[[float, "SimPeer", Note], None]
Executor = Callable[[float, "SimPeer", Command], None]
"""Carries out a peer's commands (starts and stops its executions), as the host's executor."""


def sim_address(index: int) -> str:
    """The simulated address of peer `index`."""
    return f"sim-{index}:7946"


@dataclass(slots=True)
class SimPeer:
    """One simulated machine: an identity, a durable store and, while running, a Node."""

    index: int
    addr: str
    signer: Signer
    node: Node | None = None
    durable: dict[tuple[PersistKind, bytes], bytes] = field(default_factory=dict)
    paused: bool = False
    life: int = 0
    next_wake: float | None = None
    buffer: list[tuple[str, bytes]] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    joined: bool = False
    started_at: float = 0.0
    last_seen: dict[bytes, float] = field(default_factory=dict)
    """When each member the last life knew was last seen up, as the host's saved membership
    hints (kept at the crash; a real peer saves them every few seconds)."""

    @property
    def running(self) -> bool:
        """Up and not paused: would answer a probe right now."""
        return self.node is not None and not self.paused


class Simulator:
    """A simulated network of `n` peers.

    Args:
        n: number of peers (created stopped; see `start` and `start_all`).
        seed: the seed every random choice derives from.
        config: protocol configuration (default `protocol.config.sim()`).
        link: the network's latency and fault model.
        per_peer_caches: give each peer its own counting cache (see the module doc); costs
            memory per peer, so only measurements of per-peer work ask for it.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        config: NodeConfig | None = None,
        link: LinkModel | None = None,
        per_peer_caches: bool = False,
    ) -> None:
        self.config = config or sim()
        self.seed = seed
        self.now = 0.0
        self.network = Network(link or LinkModel(), random.Random(seed))
        self.cache = VerifiedCache(capacity=max(65536, 8 * n))
        self.per_peer_caches = per_peer_caches
        self.peer_caches: list[PeerCache] = []
        """Every per-peer cache made so far, over all lives (empty unless `per_peer_caches`)."""
        self.observers: list[Observer] = []
        self.executors: list[Executor] = []
        self.events_processed = 0
        self._heap: list[tuple[float, int, int, int, object, object]] = []
        self._seq = 0
        self.peers = [
            SimPeer(i, sim_address(i), Signer(_sim_key(i), self.config.network_id))
            for i in range(n)
        ]
        self._by_addr = {p.addr: p for p in self.peers}

    # Scenario control.

    def start(self, index: int, seeds: list[int]) -> None:
        """Start peer `index` now and join it through the peers `seeds` (may be empty)."""
        p = self.peers[index]
        if p.node is not None:
            raise ValueError(f"peer {index} is already running")
        stored = p.durable.get((PersistKind.INCARNATION, b"self"))
        incarnation = int.from_bytes(stored, "big") + 1 if stored else 0
        rng = random.Random(f"{self.seed}:{index}:{p.life}")
        p.life += 1
        cache = self.cache
        if self.per_peer_caches:
            cache = PeerCache(self.cache)
            self.peer_caches.append(cache)
        p.node = Node(self.config, p.signer, p.addr, rng, self.now, incarnation, cache)
        if p.last_seen:
            ages = [(n, self.now - at) for n, at in sorted(p.last_seen.items())]
            p.node.remember_members(self.now, ages)
        p.paused, p.joined, p.started_at, p.next_wake = False, False, self.now, None
        p.seeds = [self.peers[s].addr for s in seeds if s != index]
        self._apply(p, p.node.tick(self.now))
        self._join(p)

    def start_all(self, spacing: float = 0.01) -> None:
        """Start peer 0, then every other peer `spacing` seconds apart, joining through 0."""
        self.start(0, [])
        for i in range(1, len(self.peers)):
            self.at(i * spacing, functools.partial(self.start, i, [0]))

    def crash(self, index: int) -> None:
        """Kill peer `index` (kill -9): its in-memory state is gone, its durable records stay."""
        p = self.peers[index]
        if p.node is not None:
            p.last_seen = {
                m.node_id: self.now if m.up else m.since
                for m in p.node.members()
                if m.node_id != p.signer.node_id and m.status != Status.LEFT
            }
        p.node, p.paused, p.next_wake = None, False, None
        p.buffer.clear()

    def restart(self, index: int) -> None:
        """Restart a crashed peer with its identity and durable records; it rejoins."""
        seeds = [i for i in range(min(3, len(self.peers))) if i != index]
        self.start(index, seeds)

    def pause(self, index: int, duration: float) -> None:
        """Freeze peer `index` for `duration` seconds."""
        p = self.peers[index]
        if p.node is None or p.paused:
            return
        p.paused = True
        self._push(self.now + duration, _RESUME, index, p.life, None)

    def partition(self, sides: list[list[int]]) -> None:
        """Cut the network into sides of peer indices."""
        self.network.partition([[self.peers[i].addr for i in side] for side in sides])

    def heal(self) -> None:
        """End every partition."""
        self.network.heal()

    def broadcast(self, index: int, name: str, payload: bytes) -> tuple[bytes, int]:
        """Send a user event from peer `index`; returns its (origin, ltime) id."""
        p = self.peers[index]
        assert p.node is not None, "cannot broadcast from a stopped peer"
        fx = p.node.broadcast(self.now, name, payload)
        self._apply(p, fx)
        return p.node.node_id, p.node.ltime

    def apply(self, index: int, fx: Effects) -> None:
        """Apply the effects of a call a scenario made on peer `index`'s node itself (a task
        submission or completion): persist, send, notify observers, re-arm its timer."""
        self._apply(self.peers[index], fx)

    def at(self, when: float, action: Callable[[], object]) -> None:
        """Run `action` at virtual time `when`."""
        self._push(when, _ACTION, 0, action, None)

    def run_until(self, until: float) -> None:
        """Process every event up to virtual time `until`, then stop the clock there."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            t, _, kind, index, a, b = heapq.heappop(heap)
            self.now = t
            self.events_processed += 1
            if kind == _DELIVER:
                self._deliver(index, a, b)  # type: ignore[arg-type]
            elif kind == _WAKE:
                p = self.peers[index]
                if p.node is not None and not p.paused and p.life == a and p.next_wake == t:
                    p.next_wake = None
                    self._apply(p, p.node.tick(t))
            elif kind == _RESUME:
                self._resume(index, a)  # type: ignore[arg-type]
            else:
                a()  # type: ignore[operator]
        self.now = max(self.now, until)

    # Queries.

    def running(self) -> list[SimPeer]:
        """Peers up and not paused."""
        return [p for p in self.peers if p.running]

    def peer_verifications(self) -> int:
        """Signatures verified, summed over every peer and life: what real peers would have
        done with `per_peer_caches`, the simulator's own (shared) work without."""
        if self.per_peer_caches:
            return sum(cache.verified for cache in self.peer_caches)
        return self.cache.verified

    # Internals.

    def _push(self, t: float, kind: int, index: int, a: object, b: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, index, a, b))

    def _join(self, p: SimPeer) -> None:
        if p.node is None or p.joined or not p.seeds:
            return
        self._apply(p, p.node.join(self.now, p.seeds))
        life = p.life
        self.at(self.now + JOIN_RETRY, lambda: self._retry_join(p, life))

    def _retry_join(self, p: SimPeer, life: int) -> None:
        if p.life == life and not p.paused:
            self._join(p)

    def _deliver(self, index: int, src: str, data: bytes) -> None:
        p = self.peers[index]
        if p.node is None:
            return
        if p.paused:
            if len(p.buffer) < _PAUSE_BUFFER:
                p.buffer.append((src, data))
            return
        self._apply(p, p.node.handle(self.now, src, data))

    def _resume(self, index: int, life: int) -> None:
        p = self.peers[index]
        if p.node is None or p.life != life or not p.paused:
            return
        p.paused = False
        pending, p.buffer = p.buffer, []
        self._apply(p, p.node.tick(self.now))
        for src, data in pending:
            if p.node is None or p.paused:
                break
            self._apply(p, p.node.handle(self.now, src, data))

    def _apply(self, p: SimPeer, fx: Effects) -> None:
        for rec in fx.persists:
            p.durable[(rec.kind, rec.key)] = rec.value
        net = self.network
        for send in fx.sends:
            dst = self._by_addr.get(send.addr)
            for delay in net.delays(p.addr, send.addr, len(send.data)):
                if dst is not None:
                    self._push(self.now + delay, _DELIVER, dst.index, p.addr, send.data)
        for note in fx.notes:
            if isinstance(note, JoinSucceeded):
                p.joined = True
            for observe in self.observers:
                observe(self.now, p, note)
        for command in fx.commands:
            for execute in self.executors:
                execute(self.now, p, command)
        if fx.wake_at is not None:
            wake = max(fx.wake_at, self.now)
            if wake != p.next_wake:
                p.next_wake = wake
                self._push(wake, _WAKE, p.index, p.life, None)


def _sim_key(index: int) -> bytes:
    return hashlib.sha256(b"grapevine-sim-identity:%d" % index).digest()
