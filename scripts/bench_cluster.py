"""Benchmark real peer processes on loopback against Serf 0.9's published LAN figures.

For each cluster size N (default 10, 30 and 100) this starts N `grapevine agent --no-agents`
processes on 127.0.0.1 (all joining through the first), waits until every peer sees N alive,
and measures:

- idle cost per peer over `--idle` seconds: CPU % (utime + stime from /proc/<pid>/stat), RSS
  (VmRSS from /proc/<pid>/status) and bytes/s in + out (from `/v1/metrics`);
- user-event dissemination: `--broadcasts` events, each sent through a random peer's API; the
  time until the last of the N peers received it. Receipt times are the peers' own wall-clock
  timestamps on their `/v1/events` SSE streams (subscribed before the first broadcast), so the
  figure excludes this script's own scheduling delays. Missing deliveries are counted;
- failure detection: SIGKILL one peer (not the seed); the time until every survivor's stream
  reported it `member-down`;
- false positives: `member-down` reports about any peer that was not killed.

Serf's reference numbers (Serf 0.9 docs, "Convergence simulator" and the LAN profile):
an event reaches all of 10 agents in p50 308 ms / p90 459 ms and all of 30 in p50 454 ms /
p90 646 ms; a SIGKILLed agent is noticed by all in about 7 s; an idle agent uses about 15 MB
RSS and 0.2 % CPU. Serf runs as one native Go process per machine; here N Python processes
share this machine's cores with each other and with this script, which inflates every figure
for large N — read the table with that in mind.

Every phase is bounded in time; Ctrl-C or SIGTERM ends every peer this script started (by pid)
before exiting. Usage::

    python scripts/bench_cluster.py                       # sizes 10, 30, 100; LAN profile
    python scripts/bench_cluster.py --sizes 10,30 --json  # also print the raw results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from local_cluster import (
    GrapevineError,
    LocalCluster,
    Peer,
    query,
    wait_ready,
    wait_views,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_ATTEMPTS = 5
SERF_EVENT_P50_MS = {10: 308.0, 30: 454.0}
SERF_EVENT_P90_MS = {10: 459.0, 30: 646.0}
SERF_SIGKILL_S = 7.0
SERF_RSS_MB = 15.0
SERF_CPU_PCT = 0.2


@dataclass
class Result:
    """What one cluster size measured; None where a phase could not run."""

    size: int
    profile: str
    start_s: float | None = None
    converge_s: float | None = None
    cpu_pct_median: float | None = None
    cpu_pct_max: float | None = None
    rss_mb_median: float | None = None
    rss_mb_max: float | None = None
    bytes_per_s_median: float | None = None
    event_ms: list[float] = field(default_factory=list)
    missing_deliveries: int = 0
    sigkill_detect_s: float | None = None
    sigkill_missing: int = 0
    false_positives: int = 0
    suspicions_of_live_peers: int = 0
    errors: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float | None:
        if not self.event_ms:
            return None
        ordered = sorted(self.event_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Watcher:
    """One SSE subscription per peer, recording when each peer received what."""

    def __init__(self, peers: Sequence[Peer]) -> None:
        self.peers = list(peers)
        self.events: dict[str, dict[str, float]] = {}
        """event name -> {peer name: receipt time (peer's wall clock)}"""
        self.downs: dict[str, dict[str, float]] = {}
        """node id -> {observer peer name: time it reported member-down}"""
        self.suspected: dict[str, set[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(p)) for p in self.peers]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, peer: Peer) -> None:
        try:
            async with peer.client() as client:
                async for event in client.events(follow=True):
                    kind, when = event.get("type"), float(event.get("time", 0.0))
                    if kind == "event":
                        self.events.setdefault(event["name"], {}).setdefault(peer.name, when)
                    elif kind == "member-down":
                        self.downs.setdefault(event["id"], {}).setdefault(peer.name, when)
                    elif kind == "member-suspected":
                        self.suspected.setdefault(event["id"], set()).add(peer.name)
        except GrapevineError:
            pass  # the peer was killed or left; its absence shows in the counts

    async def wait_all(
        self, table: dict[str, dict[str, float]], key: str, names: set[str], timeout: float
    ) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if names <= set(table.get(key, {})):
                break
            await asyncio.sleep(0.05)
        return dict(table.get(key, {}))


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def traffic(peer: Peer) -> int | None:
    """Bytes in + out so far, or None if the (overloaded) peer did not answer in time."""
    try:
        metrics = await query(peer, lambda c: c.metrics())
    except GrapevineError:
        return None
    return int(metrics["bytes_in"]) + int(metrics["bytes_out"])


async def measure_idle(result: Result, peers: Sequence[Peer], seconds: float) -> None:
    pids = [p.pid for p in peers if p.pid is not None]
    ticks0 = [cpu_ticks(pid) for pid in pids]
    bytes0 = await asyncio.gather(*(traffic(p) for p in peers))
    start = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - start
    ticks1 = [cpu_ticks(pid) for pid in pids]
    bytes1 = await asyncio.gather(*(traffic(p) for p in peers))
    cpu = [100 * (b - a) / CLOCK_TICKS / elapsed for a, b in zip(ticks0, ticks1, strict=True)]
    rss = [rss_mb(pid) for pid in pids]
    rates = [
        (b - a) / elapsed
        for a, b in zip(bytes0, bytes1, strict=True)
        if a is not None and b is not None
    ]
    result.cpu_pct_median, result.cpu_pct_max = statistics.median(cpu), max(cpu)
    result.rss_mb_median, result.rss_mb_max = statistics.median(rss), max(rss)
    result.bytes_per_s_median = statistics.median(rates) if rates else None


async def measure_events(
    result: Result, watcher: Watcher, peers: Sequence[Peer], count: int, timeout: float
) -> None:
    everyone = {p.name for p in peers}
    # Warm-up events prove every subscription is live before anything is timed: a stream that
    # connected after an event was delivered never shows it, which is no lost delivery.
    warmed: set[str] = set()
    for attempt in range(WARMUP_ATTEMPTS):
        name = f"bench-warmup-{attempt}"
        try:
            async with peers[0].client() as client:
                await client.send_event(name, "")
        except GrapevineError as exc:
            result.errors.append(f"{name} not sent: {exc}")
            continue
        warmed |= set(await watcher.wait_all(watcher.events, name, everyone, 3.0))
        if warmed == everyone:
            break
    else:
        result.errors.append(f"{len(everyone - warmed)} event streams never delivered a warm-up")
    rng = random.Random(1)
    for i in range(count):
        name = f"bench-{i}"
        origin = rng.choice(peers)
        sent = time.time()
        try:
            async with origin.client() as client:
                await client.send_event(name, "x" * 32)
        except GrapevineError as exc:
            result.errors.append(f"{name} not sent through {origin.name}: {exc}")
            continue
        got = await watcher.wait_all(watcher.events, name, everyone, timeout)
        result.missing_deliveries += len(everyone - set(got))
        if set(got) == everyone:
            result.event_ms.append(1000 * max(0.0, max(got.values()) - sent))
        await asyncio.sleep(0.3)


async def measure_sigkill(
    result: Result, cluster: LocalCluster, watcher: Watcher, peers: Sequence[Peer], timeout: float
) -> None:
    victim = peers[len(peers) // 2]
    survivors = {p.name for p in peers if p is not victim}
    killed = time.time()
    cluster.kill(victim, signal.SIGKILL)
    got = await watcher.wait_all(watcher.downs, victim.node_id, survivors, timeout)
    result.sigkill_missing = len(survivors - set(got))
    if not result.sigkill_missing:
        result.sigkill_detect_s = max(got.values()) - killed
    others = {p.node_id for p in peers if p is not victim}
    result.false_positives = sum(len(watcher.downs.get(node, {})) for node in others)
    result.suspicions_of_live_peers = sum(len(watcher.suspected.get(n, ())) for n in others)


async def bench_size(size: int, args: argparse.Namespace, root: Path) -> Result:
    result = Result(size, args.profile)
    extra = ("--no-agents", "--log-level", "warning")
    with LocalCluster(root / f"n{size}", profile=args.profile, extra_args=extra) as cluster:
        began = time.monotonic()
        seed = cluster.add()
        await wait_ready([seed], timeout=30)
        for _ in range(size - 1):
            cluster.add(join=[seed])
        peers = cluster.peers
        try:
            await wait_ready(peers, timeout=30 + 1.5 * size)
            result.start_s = time.monotonic() - began
            everyone = {p.node_id: "alive" for p in peers}
            result.converge_s = await wait_views(peers, everyone, timeout=60 + size, exact=True)
            print(
                f"  N={size}: started in {result.start_s:.1f} s, all views agree after "
                f"{result.converge_s:.1f} s more",
                file=sys.stderr,
            )
            await measure_idle(result, peers, args.idle)
            watcher = Watcher(peers)
            watcher.start()
            try:
                await measure_events(result, watcher, peers, args.broadcasts, args.event_timeout)
                print(
                    f"  N={size}: {len(result.event_ms)} events timed, "
                    f"{result.missing_deliveries} deliveries missing",
                    file=sys.stderr,
                )
                await measure_sigkill(result, cluster, watcher, peers, args.detect_timeout)
            finally:
                await watcher.stop()
        except (TimeoutError, RuntimeError, GrapevineError) as exc:
            result.errors.append(str(exc)[:500])
            print(f"  N={size}: {str(exc)[:300]}", file=sys.stderr)
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _num(value: float | None, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def render(results: Sequence[Result]) -> str:
    """The comparison table: one column per size, Serf's figure beside ours where it exists."""
    header = ["metric"]
    for r in results:
        header += [f"ours N={r.size}", f"Serf N={r.size}"]
    rows: list[list[str]] = []

    def row(label: str, ours: list[str], serf: list[str]) -> None:
        cells = [label]
        for mine, theirs in zip(ours, serf, strict=True):
            cells += [mine, theirs]
        rows.append(cells)

    sizes = [r.size for r in results]
    row(
        "event to all, p50",
        [_ms(r.percentile(0.5)) for r in results],
        [_ms(SERF_EVENT_P50_MS.get(n)) for n in sizes],
    )
    row(
        "event to all, p90",
        [_ms(r.percentile(0.9)) for r in results],
        [_ms(SERF_EVENT_P90_MS.get(n)) for n in sizes],
    )
    row("missing deliveries", [str(r.missing_deliveries) for r in results], ["-"] * len(sizes))
    row(
        "SIGKILL noticed by all",
        [
            _num(r.sigkill_detect_s, " s")
            if not r.sigkill_missing
            else f"{r.sigkill_missing} never"
            for r in results
        ],
        [f"~{SERF_SIGKILL_S:.0f} s"] * len(sizes),
    )
    row("false positives (down)", [str(r.false_positives) for r in results], ["-"] * len(sizes))
    row(
        "suspicions of live peers",
        [str(r.suspicions_of_live_peers) for r in results],
        ["-"] * len(sizes),
    )
    row(
        "idle CPU / peer (median)",
        [_num(r.cpu_pct_median, " %", 2) for r in results],
        [f"~{SERF_CPU_PCT} %"] * len(sizes),
    )
    row(
        "idle CPU / peer (max)", [_num(r.cpu_pct_max, " %", 2) for r in results], ["-"] * len(sizes)
    )
    row(
        "RSS / peer (median)",
        [_num(r.rss_mb_median, " MB") for r in results],
        [f"~{SERF_RSS_MB:.0f} MB"] * len(sizes),
    )
    row(
        "idle bytes/s / peer, in+out",
        [_num(r.bytes_per_s_median, " B/s", 0) for r in results],
        ["-"] * len(sizes),
    )
    row("all started (s)", [_num(r.start_s, " s") for r in results], ["-"] * len(sizes))
    row("all views agree (s)", [_num(r.converge_s, " s") for r in results], ["-"] * len(sizes))
    table = [header, *rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]
    for r in results:
        lines += [f"N={r.size}: {error}" for error in r.errors]
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark real Grapevine peers on 127.0.0.1 against Serf's LAN figures."
    )
    parser.add_argument("--sizes", default="10,30,100", help="comma-separated cluster sizes")
    parser.add_argument("--profile", default="lan", help="protocol preset (lan compares to Serf)")
    parser.add_argument("--broadcasts", type=int, default=20, help="events timed per size")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    parser.add_argument(
        "--event-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for one event to reach everyone",
    )
    parser.add_argument(
        "--detect-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every survivor to report the killed peer",
    )
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be integers separated by commas, got {args.sizes!r}")
    if any(n < 3 for n in sizes):
        parser.error("every size must be at least 3 (a seed, a victim and a survivor)")
    signal.signal(signal.SIGTERM, _interrupt)
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gv-bench-") as tmp:
            for size in sizes:
                print(f"benchmarking N={size} ({args.profile} profile)...", file=sys.stderr)
                results.append(asyncio.run(bench_size(size, args, Path(tmp))))
    except KeyboardInterrupt:
        print("interrupted; every peer was stopped", file=sys.stderr)
        if not results:
            return 130
    print(render(results))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
