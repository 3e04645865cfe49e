"""One simulated scenario from parameters to figures: join, faults, measurements.

Timeline (all times virtual):
1. Peer 0 starts; the others start evenly over min(10, 0.01 n) seconds and join through peer 0.
   The run waits until every running peer sees every other one up (alive or suspect: under
   heavy loss some suspicion is always in flight), checked every half second, at most
   `JOIN_TIMEOUT` seconds past the last start. T0 is that moment.
2. From T0 + 1 s: one broadcast every `BROADCAST_SPACING` seconds from a random running peer;
   crashes of distinct random non-seed peers and pauses of other non-seed peers at random times
   within `FAULT_WINDOW` seconds. A pause lasts `PAUSE_FRACTION` of the minimum suspicion timeout,
   below the detection time, so a correct protocol declares nobody dead because of it.
3. If asked, a partition at T0 + at splits the peers into two random sides (`fraction` of them
   on the first) and heals after its duration.
4. The run ends at T0 + duration; the figures describe the whole run. `converged` uses the
   same test as the join (stopped peers must be seen down); `convergence` describes the strict
   one (every running peer ALIVE) with counts of what disagrees.

Invariants:
- All randomness comes from `random.Random` seeded with the scenario seed (scenario choices) and
  from the simulator (network and protocol), so the returned dict is a pure function of the
  parameters. Wall-clock time is deliberately absent: `protocol/` reads no clock; callers that
  want it measure around `run_scenario`.
- The figures dict holds only JSON-representable values (numbers, None, strings, lists).
"""

from __future__ import annotations

import functools
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from protocol.config import NodeConfig, suspicion_min_timeout
from protocol.sim.checker import Checker
from protocol.sim.network import LinkModel
from protocol.sim.simulator import Simulator

JOIN_TIMEOUT = 180.0
"""Seconds after the last peer started that the run waits for the views to converge."""
BROADCAST_SPACING = 2.0
"""Seconds between two broadcasts."""
FAULT_WINDOW = 10.0
"""Crashes and pauses happen within this many seconds after T0 + 1 s."""
PAUSE_FRACTION = 0.75
"""A pause lasts this fraction of the minimum suspicion timeout (below the detection time)."""
CHUNK = 0.5
"""Seconds of virtual time between two progress reports and convergence checks."""

Figure = float | int | str | bool | None | list[float | None]
Progress = Callable[[str, float, float], None]
"""Called with (phase, virtual seconds done, virtual seconds planned) between chunks."""


@dataclass(frozen=True, slots=True)
class ScenarioParams:
    """What to simulate.

    Attributes:
        nodes: number of peers (at least 1).
        seed: the seed of every random choice.
        loss: probability a message is lost, in [0, 1).
        duplicate: probability a delivered message arrives twice, in [0, 1].
        latency: fixed one-way delay in seconds.
        jitter: mean of the exponential extra delay in seconds (reorders messages).
        duration: simulated seconds after the views converged (T0).
        partition: (at, duration, fraction): at T0 + at seconds split the peers into two sides,
            `fraction` of them on one side, and heal `duration` seconds later; None for none.
        crashes: peers crashed (never peer 0, the seed), at most nodes - 1.
        pauses: peers paused below the detection time (distinct from the crashed ones).
        broadcasts: user events sent from random running peers.
        config: protocol configuration (None: `protocol.config.sim()`).
    """

    nodes: int
    seed: int = 0
    loss: float = 0.0
    duplicate: float = 0.0
    latency: float = 0.0005
    jitter: float = 0.0005
    duration: float = 60.0
    partition: tuple[float, float, float] | None = None
    crashes: int = 0
    pauses: int = 0
    broadcasts: int = 0
    config: NodeConfig | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first impossible parameter."""
        if self.nodes < 1:
            raise ValueError("nodes must be at least 1")
        LinkModel(self.latency, self.jitter, self.loss, self.duplicate).validate()
        if not self.duration > 0:
            raise ValueError("duration must be positive")
        if min(self.crashes, self.pauses, self.broadcasts) < 0:
            raise ValueError("crashes, pauses and broadcasts must be non-negative")
        if self.crashes + self.pauses > self.nodes - 1:
            raise ValueError("crashes + pauses must not exceed nodes - 1 (peer 0 is the seed)")
        if self.partition is not None:
            at, length, fraction = self.partition
            if at < 0 or not length > 0 or not 0.0 < fraction < 1.0:
                raise ValueError("partition needs at >= 0, duration > 0 and 0 < fraction < 1")
            if self.nodes < 2:
                raise ValueError("a partition needs at least 2 nodes")


def join_spacing(nodes: int) -> float:
    """Seconds between two peers' starts: all start within min(10, 0.01 n) seconds."""
    return min(0.01, 10.0 / nodes)


def run_scenario(params: ScenarioParams, progress: Progress | None = None) -> dict[str, Figure]:
    """Simulate `params` and return its figures (see the module doc for the timeline).

    Args:
        params: the scenario.
        progress: optional callback between chunks of virtual time.

    Returns:
        A dict of JSON-representable figures, identical for identical `params`.

    Raises:
        ValueError: a parameter is impossible.
    """
    params.validate()
    n = params.nodes
    link = LinkModel(params.latency, params.jitter, params.loss, params.duplicate)
    sim = Simulator(n, params.seed, params.config, link)
    checker = Checker(sim)
    rng = random.Random(f"scenario:{params.seed}")
    report = progress or (lambda phase, done, total: None)

    sim.start_all(join_spacing(n))
    last_start = (n - 1) * join_spacing(n)
    deadline = last_start + JOIN_TIMEOUT
    join_seconds: float | None = None
    while sim.now < deadline:
        sim.run_until(sim.now + CHUNK)
        report("joining", sim.now, last_start)
        if sim.now >= last_start and checker.is_converged(suspect_ok=True):
            join_seconds = sim.now
            break
    t0 = sim.now
    sent0, bytes0 = sim.network.sent, sim.network.bytes

    swim = sim.config.swim
    pause_length = PAUSE_FRACTION * suspicion_min_timeout(
        swim.suspicion_mult, n, swim.probe_interval
    )
    victims = rng.sample(range(1, n), params.crashes + params.pauses)
    for i in victims[: params.crashes]:
        sim.at(t0 + 1.0 + rng.uniform(0.0, FAULT_WINDOW), functools.partial(checker.crash, i))
    for i in victims[params.crashes :]:
        when = t0 + 1.0 + rng.uniform(0.0, FAULT_WINDOW)
        sim.at(when, functools.partial(checker.pause, i, pause_length))
    sent_events: list[tuple[bytes, int]] = []

    def broadcast(k: int) -> None:
        candidates = [p.index for p in sim.peers if p.running]
        origin, ltime, _ = checker.broadcast(rng.choice(candidates), "bench", b"%d" % k)
        sent_events.append((origin, ltime))

    for k in range(params.broadcasts):
        sim.at(t0 + 1.0 + BROADCAST_SPACING * k, functools.partial(broadcast, k))
    heal_at: float | None = None
    if params.partition is not None:
        at, length, fraction = params.partition
        order = list(range(n))
        rng.shuffle(order)
        cut = min(n - 1, max(1, round(fraction * n)))
        sides = [sorted(order[:cut]), sorted(order[cut:])]
        sim.at(t0 + at, lambda: checker.partition(sides))
        heal_at = t0 + at + length
        sim.at(heal_at, checker.heal)

    end = t0 + params.duration
    peer_seconds = 0.0
    healed_seconds: float | None = None
    while sim.now < end:
        start = sim.now
        sim.run_until(min(end, start + CHUNK))
        peer_seconds += (sim.now - start) * sum(1 for p in sim.peers if p.node is not None)
        report("running", sim.now - t0, params.duration)
        healing = heal_at is not None and healed_seconds is None and sim.now >= heal_at
        if healing and heal_at is not None and checker.is_converged(suspect_ok=True):
            healed_seconds = sim.now - heal_at

    dissemination = [checker.dissemination(o, lt) for o, lt in sent_events]
    detections = [checker.detection(k) for k in range(len(checker.crashes))]
    known_detections = [d for d in detections if d is not None]
    convergence = checker.converged(suspect_ok=True)
    strict = checker.converged()
    per_peer_second = peer_seconds or 1.0
    return {
        "nodes": n,
        "seed": params.seed,
        "loss": params.loss,
        "duplicate": params.duplicate,
        "converged": convergence.ok,
        "convergence": str(strict),
        "join_seconds": _r(join_seconds),
        "broadcasts": len(sent_events),
        "broadcast_p50_s": _median([d.seconds[0.5] for d in dissemination]),
        "broadcast_p99_s": _median([d.seconds[0.99] for d in dissemination]),
        "broadcast_p9999_s": _median([d.seconds[0.9999] for d in dissemination]),
        "broadcast_all_s": _worst([d.seconds[1.0] for d in dissemination]),
        "broadcast_missing": sum(d.missing for d in dissemination),
        "crashes": len(detections),
        "crash_detection_s": [_r(d) for d in detections],
        "crash_detection_max_s": (
            _r(max(known_detections))
            if detections and len(known_detections) == len(detections)
            else None
        ),
        "pauses": params.pauses,
        "pause_seconds": _r(pause_length) if params.pauses else None,
        "partition_s": params.partition[1] if params.partition is not None else None,
        "healed_after_s": _r(healed_seconds),
        "false_positives": len(checker.false_positives),
        "false_suspicions": len(checker.false_suspicions),
        "suspicions": len(checker.suspicions),
        "downs": len(checker.downs),
        "messages_per_peer_s": _r((sim.network.sent - sent0) / per_peer_second),
        "bytes_per_peer_s": round((sim.network.bytes - bytes0) / per_peer_second),
        "messages": sim.network.sent,
        "lost": sim.network.lost,
        "duplicated": sim.network.duplicated,
        "cut": sim.network.cut,
        "simulated_seconds": _r(sim.now),
        "events": sim.events_processed,
        "signatures_verified": sim.cache.verified,
        "cache_hits": sim.cache.hits,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _median(xs: list[float | None]) -> float | None:
    """Median over the values reached; None if any value is None or there are none."""
    if not xs or any(x is None for x in xs):
        return None
    return _r(statistics.median([x for x in xs if x is not None]))


def _worst(xs: list[float | None]) -> float | None:
    if not xs or any(x is None for x in xs):
        return None
    return _r(max(x for x in xs if x is not None))
