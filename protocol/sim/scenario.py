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
4. With `tasks`, from T0 every peer serves and the tasks are submitted at random running peers
   (`protocol.sim.task_load` has the details).
5. The run ends at T0 + duration; the figures describe the whole run. `converged` uses the
   same test as the join (stopped peers must be seen down); `convergence` describes the strict
   one (every running peer ALIVE) with counts of what disagrees.

Cost per task: a run with tasks is simulated twice, the second time without tasks (the
baseline: same seed, same join, same scheduled faults, every peer serving and advertising its
roles, every peer with its own counting signature cache both times). `bytes_per_task` and
`verifications_per_task` are the differences of the two runs' totals (bytes sent by all peers;
Ed25519 verifications summed over all peers) divided by the tasks submitted: the task plane's
cost, membership traffic subtracted.
The baseline totals are reported too (`baseline_bytes`, `baseline_verifications`).

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
from collections.abc import Callable
from dataclasses import dataclass, replace

from protocol.config import NodeConfig, suspicion_min_timeout
from protocol.config import sim as sim_config
from protocol.sim.checker import Checker
from protocol.sim.figures import Figure, median_reached, rounded, worst_reached
from protocol.sim.network import LinkModel
from protocol.sim.simulator import Simulator
from protocol.sim.task_load import TaskLoad

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
        tasks: tasks submitted at random running peers (`protocol.sim.task_load`).
        config: protocol configuration (None: `protocol.config.sim()`); its
            `tasks.replication` is the task plane's replication.
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
    tasks: int = 0
    config: NodeConfig | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first impossible parameter."""
        if self.nodes < 1:
            raise ValueError("nodes must be at least 1")
        LinkModel(self.latency, self.jitter, self.loss, self.duplicate).validate()
        if not self.duration > 0:
            raise ValueError("duration must be positive")
        if min(self.crashes, self.pauses, self.broadcasts, self.tasks) < 0:
            raise ValueError("crashes, pauses, broadcasts and tasks must be non-negative")
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
    report = progress or (lambda phase, done, total: None)
    config = params.config or sim_config()
    figures, sent, verified = _run(params, report, per_peer_caches=params.tasks > 0)
    figures["replication"] = config.tasks.replication
    if not params.tasks:
        figures.update(tasks=0, done=0, lost=0, duplicates=0)
        figures.update(verifications_per_task=None, bytes_per_task=None)
        return figures

    def baseline_report(phase: str, done: float, total: float) -> None:
        report("baseline", done, total)

    _, base_sent, base_verified = _run(replace(params, tasks=0), baseline_report, True, True)
    tasks = figures["tasks"]
    assert isinstance(tasks, int)
    figures.update(
        bytes=sent,
        baseline_bytes=base_sent,
        bytes_per_task=round((sent - base_sent) / tasks) if tasks else None,
        verifications=verified,
        baseline_verifications=base_verified,
        verifications_per_task=rounded((verified - base_verified) / tasks) if tasks else None,
    )
    return figures


def _run(
    params: ScenarioParams, report: Progress, per_peer_caches: bool, serve: bool = False
) -> tuple[dict[str, Figure], int, int]:
    """Simulate `params` once; returns its figures, the bytes sent by all peers and the
    signatures they verified. With `serve`, every peer serves even with no tasks to submit
    (the baseline of a task run)."""
    n = params.nodes
    link = LinkModel(params.latency, params.jitter, params.loss, params.duplicate)
    sim = Simulator(n, params.seed, params.config, link, per_peer_caches)
    checker = Checker(sim)
    rng = random.Random(f"scenario:{params.seed}")

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
    end = t0 + params.duration
    load = TaskLoad(sim, params.tasks, params.seed, t0, end) if params.tasks or serve else None

    def crash(i: int) -> None:
        if load is not None:
            load.crashed(i)
        checker.crash(i)

    victims = rng.sample(range(1, n), params.crashes + params.pauses)
    for i in victims[: params.crashes]:
        sim.at(t0 + 1.0 + rng.uniform(0.0, FAULT_WINDOW), functools.partial(crash, i))
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
    figures: dict[str, Figure] = {
        "nodes": n,
        "seed": params.seed,
        "loss": params.loss,
        "duplicate": params.duplicate,
        "converged": convergence.ok,
        "convergence": str(strict),
        "join_seconds": rounded(join_seconds),
        "broadcasts": len(sent_events),
        "broadcast_p50_s": median_reached([d.seconds[0.5] for d in dissemination]),
        "broadcast_p99_s": median_reached([d.seconds[0.99] for d in dissemination]),
        "broadcast_p9999_s": median_reached([d.seconds[0.9999] for d in dissemination]),
        "broadcast_all_s": worst_reached([d.seconds[1.0] for d in dissemination]),
        "broadcast_missing": sum(d.missing for d in dissemination),
        "crashes": len(detections),
        "crash_detection_s": [rounded(d) for d in detections],
        "crash_detection_max_s": (
            rounded(max(known_detections))
            if detections and len(known_detections) == len(detections)
            else None
        ),
        "pauses": params.pauses,
        "pause_seconds": rounded(pause_length) if params.pauses else None,
        "partition_s": params.partition[1] if params.partition is not None else None,
        "healed_after_s": rounded(healed_seconds),
        "false_positives": len(checker.false_positives),
        "false_suspicions": len(checker.false_suspicions),
        "suspicions": len(checker.suspicions),
        "downs": len(checker.downs),
        "messages_per_peer_s": rounded((sim.network.sent - sent0) / per_peer_second),
        "bytes_per_peer_s": round((sim.network.bytes - bytes0) / per_peer_second),
        "messages": sim.network.sent,
        "messages_lost": sim.network.lost,
        "messages_duplicated": sim.network.duplicated,
        "messages_cut": sim.network.cut,
        "simulated_seconds": rounded(sim.now),
        "events": sim.events_processed,
        "signatures_verified": sim.cache.verified,
        "cache_hits": sim.cache.hits,
    }
    if load is not None and params.tasks:
        figures.update(load.figures())
    return figures, sim.network.bytes, sim.peer_verifications()
