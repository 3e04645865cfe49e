"""Soak: a few real peers run many echo tasks. Does throughput hold, do memory and disk stay
flat, and can a new peer still join at the end? (issue 10, "Proof")

- `--peers` (default 3) `grapevine agent` processes on 127.0.0.1 through scripts/local_cluster.py
  (profile "local", agents on, so each serves "echo"), started as scripts/bench_tasks.py starts
  its clusters; `--task-retention` is passed to every peer when `grapevine agent --help`
  offers it, and skipped with a note otherwise.
- `--tasks` (default 200,000) echo tasks, each submitted at a random peer with `wait` (the API
  answers once the task is final), at most `--in-flight` (default 64) outstanding.
- Throughput per window of `--window` completed tasks (default 10,000; a run of fewer than two
  windows uses a fifth of its tasks): first and last window (target: last within 10 % of first).
- Every `--sample-every` seconds: the total RSS of the peer processes (VmRSS in
  /proc/PID/status) and the total size of their data directories (target: flat within ±20 %
  after the first retention window).
- At the end a fresh peer joins through the first one: how long until its API answers and until
  it sees every peer alive (target 10 s; given up after `--join-timeout`).

Prints a table; saves scripts/out/bench_soak.png (matplotlib, Agg) and bench_soak.json.
Bounded: the load stops at `--max-seconds` (default 1800) whatever is left, the join has its own
limit, and every process this script starts is ended by pid on exit (LocalCluster); nothing else
is signalled. Usage::

    python scripts/bench_soak.py --tasks 5000                       # a check, about a minute
    python scripts/bench_soak.py --task-retention 60s               # the issue's soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_tasks import start_echo_cluster
from local_cluster import (
    REPO,
    ApiError,
    ClientError,
    LocalCluster,
    Peer,
    child_env,
    grapevine_command,
    statuses,
    wait_ready,
    wait_views,
)

OUT = REPO / "scripts" / "out"
TABLE_SAMPLES = 12
"""Samples printed in the table (evenly spread; the plot and the JSON have them all)."""
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*$")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass
class Sample:
    """The peers at one moment of the load."""

    seconds: float
    completed: int
    rss_mb: float
    data_mb: float


@dataclass
class Soak:
    """What one soak run measured."""

    peers: int
    tasks: int
    in_flight: int
    window: int
    retention: str
    """The `--task-retention` passed, or why none was."""
    completed: int = 0
    failed: int = 0
    errors: int = 0
    seconds: float = 0.0
    window_rates: list[float] = field(default_factory=list)
    """Tasks per second of each full window of `window` completions, in order."""
    samples: list[Sample] = field(default_factory=list)
    join_ready_s: float | None = None
    join_alive_s: float | None = None
    join_note: str = ""
    note: str = ""


def retention_seconds(text: str) -> float:
    """Seconds in "60s", "5m", "24h", "7d" or a plain number of seconds.

    Raises:
        ValueError: not such a duration.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 60s, 5m, 24h)")
    return float(match.group(1)) * _UNIT[match.group(2)]


def agent_offers(flag: str) -> bool:
    """Whether `grapevine agent --help` lists `flag`."""
    run = subprocess.run(
        [*grapevine_command(), "agent", "--help"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return flag in run.stdout


def rss_mb(peers: list[Peer]) -> float:
    """Total VmRSS of the peers' live processes, MB."""
    total_kb = 0
    for peer in peers:
        if peer.pid is None:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{peer.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def data_mb(peers: list[Peer]) -> float:
    """Total size of the files in the peers' data directories, MB."""
    total = 0
    for peer in peers:
        for directory, _, files in os.walk(peer.data_dir):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(directory, name))
    return total / 1e6


def window_rates(finished: list[float], start: float, window: int) -> list[float]:
    """Tasks per second of each full window of `window` completions (times in order)."""
    edges = [start] + [finished[i - 1] for i in range(window, len(finished) + 1, window)]
    return [window / max(b - a, 1e-9) for a, b in itertools.pairwise(edges)]


async def run_load(peers: list[Peer], soak: Soak, args: argparse.Namespace) -> None:
    """Submit the tasks with `wait`, `in_flight` at a time, sampling the peers meanwhile."""
    rng = random.Random(1)
    numbers = iter(range(soak.tasks))
    finished: list[float] = []
    clients = {p.name: p.client() for p in peers}
    for client in clients.values():
        await client.__aenter__()
    start = time.monotonic()

    async def worker() -> None:
        for k in numbers:
            peer = rng.choice(peers)
            client = clients[peer.name]
            try:
                try:
                    task = await client.submit("echo", f"soak {k}", wait=True)
                except ApiError as exc:
                    if exc.status != 503:
                        raise
                    # Durable at the origin, not yet replicated within the API's limit: it runs.
                    task = await client.wait_task(exc.detail.split()[1])
            except (ApiError, ClientError, IndexError):
                soak.errors += 1
                continue
            if task.get("state") == "done":
                finished.append(time.monotonic())
            else:
                soak.failed += 1

    async def sampler() -> None:
        while True:
            sample = Sample(time.monotonic() - start, len(finished), rss_mb(peers), data_mb(peers))
            soak.samples.append(sample)
            print(
                f"  {sample.seconds:6.0f} s  {sample.completed:>9,} of {soak.tasks:,} done"
                f"  ({sample.completed / max(sample.seconds, 1e-9):6.1f}/s)"
                f"  RSS {sample.rss_mb:7.1f} MB  data {sample.data_mb:7.1f} MB",
                file=sys.stderr,
                flush=True,
            )
            dead = [p.name for p in peers if not p.running()]
            if dead:
                soak.note = f"peer {dead[0]} exited:\n{peers[0].log_tail()}"
                return
            await asyncio.sleep(args.sample_every)

    load = asyncio.gather(*(worker() for _ in range(soak.in_flight)))
    watcher = asyncio.create_task(sampler())
    try:
        await asyncio.wait(
            [load, watcher], timeout=args.max_seconds, return_when=asyncio.FIRST_COMPLETED
        )
        if not load.done():
            soak.note = soak.note or f"stopped at --max-seconds {args.max_seconds:g}"
        for future in (load, watcher):
            future.cancel()
        await asyncio.gather(load, watcher, return_exceptions=True)
    finally:
        for client in clients.values():
            await client.__aexit__(None, None, None)
    soak.seconds = time.monotonic() - start
    soak.completed = len(finished)
    soak.samples.append(Sample(soak.seconds, len(finished), rss_mb(peers), data_mb(peers)))
    soak.window_rates = window_rates(finished, start, soak.window)


async def fresh_join(cluster: LocalCluster, peers: list[Peer], soak: Soak, limit: float) -> None:
    """Start one more peer through the first and time until it sees every peer alive."""
    start = time.monotonic()
    fresh = cluster.add(join=[peers[0]])
    try:
        await wait_ready([fresh], timeout=limit)
        soak.join_ready_s = time.monotonic() - start
        everyone = {p.node_id: "alive" for p in [*peers, fresh] if p.node_id}
        remaining = max(1.0, limit - soak.join_ready_s)
        await wait_views([fresh], everyone, timeout=remaining)
        soak.join_alive_s = time.monotonic() - start
    except (TimeoutError, RuntimeError) as exc:
        seen: dict[str, str] = {}
        with contextlib.suppress(ApiError, ClientError, OSError):
            seen = await statuses(fresh)
        alive = sum(1 for s in seen.values() if s == "alive")
        soak.join_note = f"after {limit:g} s it saw {alive} of {len(peers) + 1} peers alive"
        if isinstance(exc, RuntimeError):
            soak.join_note = str(exc)[:200]


async def soak_run(root: Path, soak: Soak, args: argparse.Namespace, extra: list[str]) -> None:
    with LocalCluster(root, profile="local", extra_args=tuple(extra)) as cluster:
        peers = await start_echo_cluster(cluster, soak.peers)
        print(f"{soak.peers} peers up; submitting {soak.tasks:,} tasks ...", file=sys.stderr)
        await run_load(peers, soak, args)
        print("load over; a fresh peer joins ...", file=sys.stderr)
        await fresh_join(cluster, peers, soak, args.join_timeout)


def _growth(a: float, b: float) -> str:
    return f"{(b - a) / a * 100:+.0f}%" if a else "-"


def table(soak: Soak, retention_s: float | None) -> str:
    rate = soak.completed / soak.seconds if soak.seconds else 0.0
    lines = [
        f"bench_soak: {soak.peers} peers, {soak.tasks:,} echo tasks, {soak.in_flight} in flight,"
        f" retention {soak.retention}",
        f"completed {soak.completed:,} of {soak.tasks:,} (failed {soak.failed}, errors "
        f"{soak.errors}) in {soak.seconds:.1f} s: {rate:.1f} tasks/s",
    ]
    if soak.window_rates:
        first, last = soak.window_rates[0], soak.window_rates[-1]
        lines.append(
            f"throughput per {soak.window:,}-task window ({len(soak.window_rates)} windows): first "
            f"{first:.1f}/s, last {last:.1f}/s, last/first {last / first:.2f} (target >= 0.90)"
        )
    lines.append(f"{'t (s)':>8} {'tasks done':>11} {'RSS MB':>8} {'data MB':>8}")
    step = max(1, len(soak.samples) // TABLE_SAMPLES)
    shown = soak.samples[::step]
    if soak.samples and shown[-1] is not soak.samples[-1]:
        shown.append(soak.samples[-1])
    for s in shown:
        lines.append(f"{s.seconds:>8.0f} {s.completed:>11,} {s.rss_mb:>8.1f} {s.data_mb:>8.1f}")
    if soak.samples:
        first, last = soak.samples[0], soak.samples[-1]
        lines.append(
            f"RSS {first.rss_mb:.0f} -> {last.rss_mb:.0f} MB; data {first.data_mb:.1f} -> "
            f"{last.data_mb:.1f} MB"
        )
        after = [s for s in soak.samples if retention_s is not None and s.seconds >= retention_s]
        if after:
            base = after[0]
            lines.append(
                f"since the first retention window ({base.seconds:.0f} s): RSS "
                f"{_growth(base.rss_mb, last.rss_mb)}, data {_growth(base.data_mb, last.data_mb)}"
                f" (target within ±20%)"
            )
        if last.completed:
            lines.append(
                f"per task: RSS {(last.rss_mb - first.rss_mb) * 1024 / last.completed:.2f} KB, "
                f"data {(last.data_mb - first.data_mb) * 1e3 / last.completed:.2f} KB"
            )
    if soak.join_alive_s is not None:
        lines.append(
            f"fresh peer: API ready after {soak.join_ready_s:.1f} s, every peer alive after "
            f"{soak.join_alive_s:.1f} s from its start (target 10 s)"
        )
    else:
        lines.append(f"fresh peer: {soak.join_note or 'not measured'}")
    if soak.note:
        lines.append(f"note: {soak.note}")
    return "\n".join(lines)


def plot(soak: Soak, retention_s: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = soak.samples
    ts = [s.seconds for s in samples]
    rates = [0.0] + [
        (b.completed - a.completed) / max(b.seconds - a.seconds, 1e-9)
        for a, b in itertools.pairwise(samples)
    ]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    panels = [
        ("tasks/s (per sample)", rates),
        ("RSS of all peers (MB)", [s.rss_mb for s in samples]),
        ("data dirs (MB)", [s.data_mb for s in samples]),
    ]
    for ax, (title, ys) in zip(axes, panels, strict=True):
        ax.plot(ts, ys, "-")
        if retention_s is not None:
            ax.axvline(retention_s, linestyle="--", color="grey", label="retention")
            ax.legend()
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("seconds into the load")
    fig.suptitle(
        f"Soak: {soak.peers} peers, {soak.completed:,} echo tasks, retention {soak.retention}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=3, help="peer processes (default 3)")
    parser.add_argument("--tasks", type=int, default=200_000, help="echo tasks (default 200000)")
    parser.add_argument("--in-flight", type=int, default=64, help="tasks outstanding at most")
    parser.add_argument("--task-retention", default=None, help="passed to every peer, e.g. 60s")
    parser.add_argument("--window", type=int, default=10_000, help="tasks per throughput window")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds per sample")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="limit of the load")
    parser.add_argument("--join-timeout", type=float, default=30.0, help="limit of the join")
    args = parser.parse_args(argv)
    if args.peers < 1 or args.tasks < 1 or args.in_flight < 1 or args.window < 1:
        parser.error("--peers, --tasks, --in-flight and --window must be at least 1")
    if args.sample_every <= 0 or args.max_seconds <= 0 or args.join_timeout <= 0:
        parser.error("--sample-every, --max-seconds and --join-timeout must be positive")
    retention_s: float | None = None
    extra: list[str] = []
    retention = "not asked"
    if args.task_retention is not None:
        try:
            retention_s = retention_seconds(args.task_retention)
        except ValueError as exc:
            parser.error(str(exc))
        if agent_offers("--task-retention"):
            extra = ["--task-retention", args.task_retention]
            retention = args.task_retention
        else:
            retention = f"{args.task_retention} skipped (`grapevine agent` has no --task-retention)"
            print(f"bench_soak: --task-retention {retention}", file=sys.stderr)
            retention_s = None
    window = args.window if args.tasks >= 2 * args.window else max(1, args.tasks // 5)
    soak = Soak(args.peers, args.tasks, args.in_flight, window, retention)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        asyncio.run(soak_run(Path(tmp), soak, args, extra))
    print(table(soak, retention_s))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_soak.json").write_text(json.dumps(asdict(soak), indent=2))
    if soak.samples:
        plot(soak, retention_s, OUT / "bench_soak.png")
        print(f"plot: {OUT / 'bench_soak.png'}")
    return 0 if soak.completed == soak.tasks and soak.join_alive_s is not None else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "scripts"))
    sys.exit(main())
