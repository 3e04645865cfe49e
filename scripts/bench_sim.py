#!/usr/bin/env python3
"""Benchmark the real protocol in the simulator at growing sizes.

For each size N: join through one seed until the views agree; measure the steady-state load
(messages and bytes per peer per second) over a quiet window; send broadcasts from random peers
(median time and gossip rounds to 99.99 % of peers); crash random non-seed peers (median time
until every survivor declared them dead); and the simulator's speed (simulated s per wall s).
Prints a table against the targets and saves a plot to scripts/out/bench_sim.png.

The load window starts after every peer's first push-pull (1.5 intervals after its start),
so it shows the steady state: probes plus the size-scaled push-pull rate.

Usage: scripts/bench_sim.py [--sizes 10,100,1000] [--seed 1] [--quick] [--max-wall 600]

Full membership costs O(N^2) member entries across the network (10,000 peers: 10^8), so every
size runs under a wall-clock and memory guard; a size that trips it is reported as
"not measured" with the reason, never extrapolated into the table.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.sim.checker import Checker
from protocol.sim.simulator import Simulator

OUT = Path(__file__).resolve().parent / "out"
MAX_RSS_GB = 12.0


class NotMeasured(Exception):
    """A size could not be measured within the guards; the message says why."""


@dataclass
class Row:
    n: int
    join_s: float
    dissemination_s: float | None
    rounds: float | None
    detection_s: float | None
    msgs: float
    bytes: float
    speed: float
    wall: float
    rss_gb: float
    """Peak resident memory of this process so far (sizes run in ascending order)."""


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def _run(sim: Simulator, until: float, deadline: float) -> None:
    while sim.now < until:
        sim.run_until(min(until, sim.now + 1.0))
        if time.perf_counter() > deadline:
            raise NotMeasured(f"wall-clock limit reached at {sim.now:.0f} simulated s")
        if _rss_gb() > MAX_RSS_GB:
            raise NotMeasured(f"memory above {MAX_RSS_GB:g} GB at {sim.now:.0f} simulated s")


def measure(n: int, seed: int, quick: bool, max_wall: float) -> Row:
    started = time.perf_counter()
    deadline = started + max_wall
    rng = random.Random(f"bench:{seed}:{n}")
    sim = Simulator(n, seed)
    checker = Checker(sim)
    sim.start_all(min(0.01, 10.0 / n))
    _run(sim, min(10.0, 0.01 * n), deadline)
    while not checker.is_converged():
        if sim.now > 300.0:
            raise NotMeasured(f"views did not converge: {checker.converged()}")
        _run(sim, sim.now + 1.0, deadline)
    join_s = sim.now

    # Every peer's first push-pull comes 0.5-1.5 push-pull intervals after it starts (a burst
    # of full-state exchanges at 1,000 peers); steady state begins after it.
    _run(sim, max(sim.now, 1.5 * sim.config.gossip.push_pull_interval + 5.0), deadline)
    window = 10.0 if quick else 30.0
    sent, sent_bytes, wall0 = sim.network.sent, sim.network.bytes, time.perf_counter()
    _run(sim, sim.now + window, deadline)
    msgs = (sim.network.sent - sent) / n / window
    load_bytes = (sim.network.bytes - sent_bytes) / n / window
    speed = window / (time.perf_counter() - wall0)

    sent_events = []
    for _ in range(2 if quick else 5):
        origin, ltime, _ = checker.broadcast(rng.randrange(n), "bench", b"x" * 64)
        sent_events.append((origin, ltime))
        _run(sim, sim.now + 5.0, deadline)
    dissemination = _median(
        [checker.dissemination(o, lt, (0.9999,)).seconds[0.9999] for o, lt in sent_events]
    )

    victims = rng.sample(range(1, n), min(n - 1, 1 if quick else 3))
    first = len(checker.crashes)
    for v in victims:
        checker.crash(v)
        _run(sim, sim.now + 2.0, deadline)
    crashes = range(first, first + len(victims))
    limit = sim.now + 120.0
    while sim.now < limit and any(checker.detection(k) is None for k in crashes):
        _run(sim, sim.now + 2.0, deadline)
    detection = _median([checker.detection(k) for k in crashes])

    interval = sim.config.gossip.gossip_interval
    return Row(
        n=n,
        join_s=join_s,
        dissemination_s=dissemination,
        rounds=None if dissemination is None else dissemination / interval,
        detection_s=detection,
        msgs=msgs,
        bytes=load_bytes,
        speed=speed,
        wall=time.perf_counter() - started,
        rss_gb=_rss_gb(),
    )


def _median(xs: list[float | None]) -> float | None:
    """Median, or None if any sample never completed (an honest "not reached")."""
    known = [x for x in xs if x is not None]
    return statistics.median(known) if known and len(known) == len(xs) else None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def table(rows: list[Row], skipped: dict[int, str]) -> str:
    head = (
        f"{'peers':>7} {'join s':>7} {'99.99% s':>9} {'rounds':>7} {'detect s':>9} "
        f"{'msg/peer/s':>11} {'B/peer/s':>9} {'sim s/wall s':>13} {'wall s':>7} {'peak GB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.n:>7,} {_fmt(r.join_s, 1):>7} {_fmt(r.dissemination_s):>9} "
            f"{_fmt(r.rounds, 1):>7} {_fmt(r.detection_s, 1):>9} {_fmt(r.msgs):>11} "
            f"{_fmt(r.bytes, 0):>9} {_fmt(r.speed):>13} {_fmt(r.wall, 0):>7} {_fmt(r.rss_gb):>8}"
        )
    for n, reason in skipped.items():
        lines.append(f"{n:>7,} not measured: {reason}")
    lines += [
        "",
        "targets: 99.99% within ~3 s at 1,000 peers (Serf's model: 2.2 s); per-peer load",
        "constant in N; 1,000 peers x 60 simulated s in under 60 s of wall time (speed >= 1).",
    ]
    by_n = {r.n: r for r in rows}
    if 1000 in by_n:
        r = by_n[1000]
        ok = r.dissemination_s is not None and r.dissemination_s <= 3.0
        lines.append(
            f"1,000 peers: dissemination {_fmt(r.dissemination_s)} s "
            f"({'meets' if ok else 'misses'} ~3 s); speed {r.speed:.2f} sim s per wall s "
            f"({'meets' if r.speed >= 1.0 else 'misses'} the 1x target)"
        )
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        lines.append(
            f"load from {lo.n:,} to {hi.n:,} peers: messages x{hi.msgs / lo.msgs:.2f}, "
            f"bytes x{hi.bytes / lo.bytes:.2f} per peer per second"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r.n for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels: list[tuple[str, list[float | None], float | None]] = [
        ("broadcast to 99.99% (s)", [r.dissemination_s for r in rows], 3.0),
        ("crash detected by all (s)", [r.detection_s for r in rows], None),
        ("messages per peer per s", [float(r.msgs) for r in rows], None),
        ("bytes per peer per s", [float(r.bytes) for r in rows], None),
    ]
    for ax, (title, ys, target) in zip(axes.flat, panels, strict=True):
        pts = [(n, y) for n, y in zip(ns, ys, strict=True) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        if target is not None:
            ax.axhline(target, linestyle="--", color="grey", label="target")
            ax.legend()
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_xlabel("peers")
        ax.grid(True, alpha=0.3)
    fig.suptitle("Grapevine protocol in the simulator (LAN config, no loss)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="comma-separated peer counts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer samples")
    parser.add_argument(
        "--max-wall", type=float, default=600.0, help="wall-clock seconds allowed per size"
    )
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be comma-separated integers")
    if not sizes or min(sizes) < 2:
        parser.error("--sizes needs sizes of at least 2")
    rows: list[Row] = []
    skipped: dict[int, str] = {}
    for n in sorted(sizes):
        print(f"measuring {n:,} peers ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(n, args.seed, args.quick, args.max_wall))
        except NotMeasured as exc:
            skipped[n] = str(exc)
    print(table(rows, skipped))
    if rows:
        path = OUT / "bench_sim.png"
        plot(rows, path)
        print(f"\nplot: {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
