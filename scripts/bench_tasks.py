"""Benchmark no-op tasks through real Grapevine peers, against Celery on Redis, in one run.

For each size N (default 3, 10 and 30) this measures, with the same no-op task (`echo`):

- Grapevine: N `grapevine agent` processes on 127.0.0.1 (profile "local", 4 execution slots
  each), tasks submitted at random peers through the HTTP API with `--in-flight` concurrent
  submissions. Start and accepted-result times come from the peers' own `/v1/tasks/watch`
  streams (the executing peer's `task-started`, the submitting peer's `task-result`), so they
  exclude this script's scheduling; "submit" is the moment the client sent the request.
- Celery: one `redis-server` (Debian's, started here on a free port) as broker and result
  backend, N worker processes with the threads pool and concurrency 4, `acks_late=True`,
  prefetch multiplier 1; tasks sent with `apply_async` from `--in-flight` threads. The task
  records its own start and end time; "accepted" is its end (the backend write follows).

Both systems log at `--log-level` (default warning: neither logs anything per task; Celery's
workers always ran at WARNING here, while the peers logged four lines per task at INFO until
2026-12-01).

Each row first runs `--warmup` tasks that are not measured (default 500), for Grapevine and
Celery alike: the first tasks between two Grapevine peers open the channel between them, which
a network that has been running has open (870 of them at 30 peers; decision 89). `--warmup 0`
measures a network that has just started, as this script did before.

Figures: throughput (tasks/s from the first submission to the last result accepted where it
was submitted; "all peers" is how long until every Grapevine peer held every result), latency
submit→start and submit→accepted (p50/p99), messages per task (Grapevine: envelopes sent by
all peers; Celery: Redis commands), CPU per task (all peer processes; Celery workers plus
redis-server), Ed25519 signatures verified per task summed over all peers (`sig/task`, from
each peer's `/v1/metrics` `signatures_verified`; Grapevine only), duplicate executions.
Before the rows, a microbenchmark of Ed25519 sign and verify through PyNaCl (libsodium, what
`protocol/identity.py` uses) and through `cryptography` (OpenSSL): median of 5 runs. Then a
crash run for both: `--crash-tasks` sleep tasks (`--crash-sleep` s each) on `--crash-size`
workers, one worker SIGKILLed mid-run and replaced
(Grapevine: restarted with its data directory; Celery: a fresh worker, with the Redis
visibility timeout at `--visibility` s so unacknowledged tasks come back), counting
duplicates and unfinished tasks.

`--metrics-cost` measures what observability costs instead (issue 12: at most 5% lower
throughput with metrics on and tracing off): at each size, `--metrics-runs` triples of no-op
rows: nobody reading `GET /metrics` and no tracing (off); every peer scraped every
`SCRAPE_INTERVAL` s (metrics on); scraped and every peer tracing, its spans written by the
console exporter (`OTEL_TRACES_EXPORTER=console`, to the peer's log: traced). The order turns
at each run so that drift of a shared machine hits all three; it prints each triple's
throughputs and ratios to the first, and the medians. (The peers' event-time metrics cannot be
switched off; "off" is nobody scraping them.)

Every phase is bounded in time; every process this script starts is ended by pid on exit.
Needs `pip install -e '.[bench]'` and `apt-get install redis-server` for the Celery rows; without
them the Grapevine rows still run. Usage::

    python scripts/bench_tasks.py --quick          # N = 3, 10; few tasks; about two minutes
    python scripts/bench_tasks.py                  # N = 3, 10, 30
    python scripts/bench_tasks.py --json           # also print the raw results
    python scripts/bench_tasks.py --no-celery --metrics-cost --sizes 3 --tasks 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from local_cluster import (
    REPO,
    ApiError,
    GrapevineError,
    LocalCluster,
    Peer,
    free_port,
    query,
    wait_for,
    wait_ready,
    wait_views,
)

from peer.api_token import load_or_create_token
from peer.demo.processes import stop_processes

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCRAPE_INTERVAL = 1.0
"""Seconds between scrapes of every peer's /metrics in the scraped rows of --metrics-cost."""
slow_acks: list[str] = []
"""Submissions of the last Grapevine run answered 503 (not replicated within the API's limit)."""
WORKER_SLOTS = 4
"""Execution slots per Grapevine peer (peer.build.AGENT_SLOTS) and Celery worker
concurrency."""
PHASE_LIMIT = 180.0
"""Seconds any one phase may take before the run is reported as incomplete."""
LOG_LEVEL = "warning"
"""The peers' and the Celery workers' log level alike (`--log-level`): at WARNING neither logs
anything per task; at INFO a Grapevine peer logs each task's events, as a Celery worker does."""
WARMUP_SETTLE = 1.0
"""Seconds between the warm-up's last result and the measured run, for its last messages
(replica syncs come later, 2 s after a change, and are part of any steady state)."""
CRYPTO_RUNS = 5
CRYPTO_OPS = 2000
CRYPTO_MESSAGE_BYTES = 256
"""The Ed25519 microbenchmark: the median of CRYPTO_RUNS runs of CRYPTO_OPS operations on a
message about the size of a signed claim or result with its domain and network prefix."""


@dataclass
class Row:
    """One system at one size."""

    system: str
    workers: int
    tasks: int
    completed: int = 0
    seconds: float = 0.0
    throughput: float = 0.0
    start_p50_ms: float = 0.0
    start_p99_ms: float = 0.0
    accept_p50_ms: float = 0.0
    accept_p99_ms: float = 0.0
    messages_per_task: float = 0.0
    cpu_ms_per_task: float = 0.0
    verified_per_task: float | None = None
    """Grapevine: Ed25519 signatures verified per task, summed over all peers."""
    duplicates: int = 0
    converged_seconds: float = 0.0
    """Grapevine: until every peer held every result (not only the origins)."""
    note: str = ""


@dataclass
class CrashRow:
    """One system's SIGKILL run."""

    system: str
    workers: int
    tasks: int
    completed: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class CryptoRow:
    """Ed25519 through one binding: microseconds per operation, median of CRYPTO_RUNS."""

    binding: str
    sign_us: float
    verify_us: float


@dataclass
class Report:
    crypto: list[CryptoRow] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    crashes: list[CrashRow] = field(default_factory=list)


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of live processes, from /proc (children not included)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- Grapevine ---------------------------------------------------------------------------------


async def start_echo_cluster(cluster: LocalCluster, size: int) -> list[Peer]:
    """Start `size` peers joining through the first, and wait until every one sees every
    other alive and serving "echo" (so the executor ranking is the same everywhere)."""
    seed = cluster.add()
    for _ in range(size - 1):
        cluster.add(join=[seed])
    peers = list(cluster.peers)
    await wait_ready(peers, timeout=60)
    await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=90)
    # Every peer must know every other's roles before the ranking is the same everywhere.
    await wait_for("roles advertised", lambda: _roles_known(peers), timeout=60, interval=0.5)
    return peers


async def _roles_known(peers: list[Peer]) -> tuple[bool, object]:
    lacking = {}
    for peer in peers:
        members = await query(peer, lambda c: c.members())
        missing = sum(1 for m in members if "echo" not in m["roles"])
        if missing:
            lacking[peer.name] = missing
    return not lacking, lacking


class _Watch:
    """Collects every peer's task events (wall-clock times) from its /v1/tasks/watch stream."""

    def __init__(self, peers: list[Peer]) -> None:
        self.started: dict[str, list[float]] = {}
        self.accepted: dict[tuple[str, str], float] = {}
        self._tasks = [asyncio.get_running_loop().create_task(self._follow(p)) for p in peers]

    async def _follow(self, peer: Peer) -> None:
        with contextlib.suppress(GrapevineError):
            async with peer.client() as client:
                async for event in client.task_events(follow=True):
                    if event["type"] == "task-started":
                        self.started.setdefault(event["id"], []).append(event["time"])
                    elif event["type"] == "task-result":
                        self.accepted.setdefault((peer.name, event["id"]), event["time"])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _submit(
    peers: list[Peer], count: int, in_flight: int, role: str, data: str, rng: random.Random
) -> dict[str, tuple[str, float]]:
    """Submit `count` tasks at random peers; return {task id: (origin peer name, submit time)}."""
    sent: dict[str, tuple[str, float]] = {}
    slow_acks.clear()
    clients = {p.name: p.client() for p in peers}
    for client in clients.values():
        await client.__aenter__()
    queue = iter(range(count))

    async def worker() -> None:
        for _ in queue:
            peer = rng.choice(peers)
            at = time.time()
            try:
                answer = await clients[peer.name].submit(role, data)
            except ApiError as exc:
                if exc.status != 503:
                    raise
                # Durable at the origin but not yet held by another peer within the API's
                # limit: the task exists and runs; count the slow acknowledgement.
                slow_acks.append(exc.detail.split()[1])
                sent[exc.detail.split()[1]] = (peer.name, at)
                continue
            sent[answer["id"]] = (peer.name, at)

    try:
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    finally:
        for client in clients.values():
            await client.__aexit__(None, None, None)
    return sent


async def _totals(peers: list[Peer]) -> tuple[int, int, int]:
    """(envelopes sent by all peers, signatures verified by all peers, duplicate executions
    as the first peer sees them)."""
    out = verified = 0
    for peer in peers:
        metrics = await query(peer, lambda c: c.metrics())
        out += int(metrics["messages_out"])
        verified += int(metrics["signatures_verified"])
    stats = await query(peers[0], lambda c: c.task_stats())
    return out, verified, int(stats["totals"]["duplicates"])


async def _done_everywhere(
    peers: list[Peer], ids: list[str], every: int = 0
) -> tuple[bool, object]:
    """Whether every task is final as read at every peer (a peer that does not hold a task
    asks its replica set): on every `every`-th task (default: a sample of about 50), since each
    read may cost a round trip."""
    sample = ids[:: every or max(1, len(ids) // 50)]
    pending = 0
    for peer in peers:
        for tid in sample:
            task = await query(peer, lambda c, t=tid: c.task(t))
            pending += task["state"] in ("pending", "running")
    return not pending, {"pending reads": pending}


async def _done_at_origins(
    peers: list[Peer], sent: dict[str, tuple[str, float]], watch: _Watch
) -> float:
    """When the last task's result was accepted at the peer it was submitted to (where its
    client waits): the time the Celery rows measure too. Taken from the event streams; a task
    whose event a lagging stream dropped is asked for, and counts as done when seen."""
    by_name = {p.name: p for p in peers}
    deadline = time.monotonic() + PHASE_LIMIT
    latest = 0.0
    while True:
        missing = [(o, t) for t, (o, _) in sent.items() if (o, t) not in watch.accepted]
        if not missing:
            return max([latest] + [watch.accepted[(o, t)] for t, (o, _) in sent.items()])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} results not accepted at their origin")
        await asyncio.sleep(0.2)
        if all(k in watch.accepted for k in missing):
            continue
        for origin, task_id in missing[:50]:
            task = await query(by_name[origin], lambda c, t=task_id: c.task(t))
            if task["state"] != "pending" and task["state"] != "running":
                watch.accepted.setdefault((origin, task_id), time.time())
                latest = time.time()


async def _scrape_forever(peers: list[Peer], scrapes: list[int]) -> None:
    """GET every peer's /metrics every `SCRAPE_INTERVAL` s, as Prometheus would; count them."""
    tokens = {p.name: load_or_create_token(p.data_dir) for p in peers}
    async with aiohttp.ClientSession() as session:
        while True:
            for peer in peers:
                headers = {"Authorization": f"Bearer {tokens[peer.name]}"}
                async with session.get(f"http://{peer.api}/metrics", headers=headers) as answer:
                    await answer.read()
                    if answer.status == 200:
                        scrapes[0] += 1
            await asyncio.sleep(SCRAPE_INTERVAL)


async def grapevine_row(
    root: Path,
    size: int,
    tasks: int,
    in_flight: int,
    *,
    warmup: int = 0,
    scrape: bool = False,
    trace: bool = False,
    log_level: str = LOG_LEVEL,
) -> Row:
    row = Row(
        "grapevine" + ("+scrape" if scrape else "") + ("+trace" if trace else ""), size, tasks
    )
    rng = random.Random(size)
    name = f"gv{size}{'-scraped' if scrape else ''}{'-traced' if trace else ''}"
    with LocalCluster(
        root / name, profile="local", extra_args=("--log-level", log_level)
    ) as cluster:
        # The peers inherit this process's environment when they start (`child_env`).
        saved = os.environ.get("OTEL_TRACES_EXPORTER")
        os.environ["OTEL_TRACES_EXPORTER"] = "console" if trace else "none"
        try:
            peers = await start_echo_cluster(cluster, size)
        finally:
            if saved is None:
                del os.environ["OTEL_TRACES_EXPORTER"]
            else:
                os.environ["OTEL_TRACES_EXPORTER"] = saved
        pids = [p.pid for p in peers if p.pid is not None]
        scrapes = [0]
        scraper = asyncio.create_task(_scrape_forever(peers, scrapes)) if scrape else None
        watch = _Watch(peers)
        await asyncio.sleep(0.5)  # let every stream open
        messages0, verified0, _ = await _totals(peers)
        cpu0, t0 = cpu_seconds(pids), time.time()
        done_at = t0
        sent: dict[str, tuple[str, float]] = {}
        phase = "warm-up: " if warmup else ""
        try:
            if warmup:
                # Not measured: the first tasks between two peers open the channel between
                # them (a connection, an upgrade and a hello each way), which a running
                # network has open already; at 30 peers that is 870 channels (decision 89).
                warm = await _submit(peers, warmup, in_flight, "echo", "noop", random.Random(-size))
                await _done_at_origins(peers, warm, watch)
                await asyncio.sleep(WARMUP_SETTLE)
                messages0, verified0, _ = await _totals(peers)
                cpu0, t0 = cpu_seconds(pids), time.time()
                done_at = t0
            phase = ""
            sent = await _submit(peers, tasks, in_flight, "echo", "noop", rng)
            done_at = await _done_at_origins(peers, sent, watch)
            # The cost of running the tasks: measured once every result is at its origin (and
            # a moment for the replicas to get theirs), before the convergence check below,
            # whose reads at every peer are a reader's cost, not the tasks'.
            await asyncio.sleep(0.5)
            cpu1 = cpu_seconds(pids)
            messages1, verified1, _ = await _totals(peers)
            # Replica sets: no peer holds every task; "all peers" is when a sample of tasks
            # reads as final at every peer.
            ids = sorted(sent)
            await wait_for("final everywhere", lambda: _done_everywhere(peers, ids), PHASE_LIMIT)
            row.converged_seconds = time.time() - t0
        except TimeoutError as exc:
            row.note = (phase + str(exc))[:120]
            sent = {}
        await asyncio.sleep(0.3)
        await watch.close()
        if scraper is not None:
            scraper.cancel()
            await asyncio.gather(scraper, return_exceptions=True)
        if not sent:  # timed out before every result was in: cost up to now
            cpu1 = cpu_seconds(pids)
            messages1, verified1, _ = await _totals(peers)
        # Each peer's stream reports the executions it started: one per task unless duplicated.
        row.completed = sum(1 for t, (o, _) in sent.items() if (o, t) in watch.accepted)
        row.duplicates = sum(max(0, len(watch.started.get(t, [])) - 1) for t in sent)
    # Latencies come from the event streams; a stream that lagged behind is dropped by the peer
    # (peer.runtime.driver.SUBSCRIBER_QUEUE), so they may cover fewer tasks than ran (see the note).
    starts = [min(watch.started[t]) - at for t, (_, at) in sent.items() if t in watch.started]
    accepts = [
        watch.accepted[(origin, t)] - at
        for t, (origin, at) in sent.items()
        if (origin, t) in watch.accepted
    ]
    if len(accepts) < len(sent) or len(starts) < len(sent):
        row.note = f"latency samples: {len(starts)} starts, {len(accepts)} results"
    row.seconds = done_at - t0
    row.throughput = row.completed / row.seconds if row.seconds > 0 else 0.0
    row.start_p50_ms, row.start_p99_ms = pct(starts, 0.5) * 1e3, pct(starts, 0.99) * 1e3
    row.accept_p50_ms, row.accept_p99_ms = pct(accepts, 0.5) * 1e3, pct(accepts, 0.99) * 1e3
    row.messages_per_task = (messages1 - messages0) / max(1, tasks)
    row.cpu_ms_per_task = (cpu1 - cpu0) * 1e3 / max(1, tasks)
    row.verified_per_task = (verified1 - verified0) / max(1, tasks)
    if slow_acks:
        row.note = (row.note + f"; {len(slow_acks)} submissions acknowledged 503").lstrip("; ")
    if scrape:
        row.note = (row.note + f"; {scrapes[0]} scrapes").lstrip("; ")
    return row


async def grapevine_crash(
    root: Path, size: int, tasks: int, sleep: float, log_level: str = LOG_LEVEL
) -> CrashRow:
    row = CrashRow("grapevine", size, tasks)
    rng = random.Random(7)
    with LocalCluster(
        root / "gv-crash", profile="local", extra_args=("--log-level", log_level)
    ) as cluster:
        peers = await start_echo_cluster(cluster, size)
        victim = peers[-1]
        start = time.monotonic()
        sent = await _submit(peers, tasks, 16, "sleep", f"{sleep:g}", rng)
        await asyncio.sleep(sleep / 2)
        cluster.kill(victim, signal.SIGKILL)
        survivors = [p for p in peers if p is not victim]
        expected = {p.node_id: "alive" for p in survivors} | {victim.node_id: "dead"}
        with contextlib.suppress(TimeoutError):
            await wait_views(survivors, expected, timeout=30)
        cluster.start(victim)
        try:
            await wait_ready([victim], timeout=30)
            ids = sorted(sent)
            await wait_for("final everywhere", lambda: _done_everywhere(peers, ids), PHASE_LIMIT)
            # The sample above may miss a re-run still going (the victim resumes its claims
            # when it restarts): every task must read final at the survivor counted below.
            await wait_for(
                "all final", lambda: _done_everywhere(survivors[:1], ids, 1), PHASE_LIMIT
            )
        except TimeoutError as exc:
            row.note = str(exc)[:120]
        row.seconds = time.monotonic() - start
        final = [await query(survivors[0], lambda c, t=tid: c.task(t)) for tid in sorted(sent)]
        row.completed = sum(1 for t in final if t["state"] == "done")
        row.duplicates = sum(int(t["duplicates"]) for t in final)
        row.note = row.note or f"takeovers {sum(int(t['epoch']) - 1 for t in final)}"
    return row


# --- Celery ------------------------------------------------------------------------------------

CELERY_APP = textwrap.dedent(
    """
    import os, time
    import redis
    from celery import Celery

    URL = os.environ["BENCH_REDIS_URL"]
    app = Celery(__name__, broker=URL, backend=URL)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        broker_transport_options={"visibility_timeout": float(os.environ["BENCH_VISIBILITY"])},
        worker_hijack_root_logger=False,
    )
    counter = redis.Redis.from_url(URL)

    @app.task(bind=True)
    def noop(self, data, sleep=0.0):
        start = time.time()
        counter.incr("bench:exec:" + self.request.id)
        if sleep:
            time.sleep(sleep)
        return [start, time.time(), data]
    """
)


class Celery:
    """A redis-server and Celery worker processes started (and ended, by pid) by this script."""

    def __init__(self, root: Path, visibility: float, log_level: str = LOG_LEVEL) -> None:
        self.root = root
        self.log_level = log_level
        self.module = f"bench_celery_{root.name.replace('-', '_')}"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.visibility = visibility
        self.redis: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{self.module}.py").write_text(CELERY_APP)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BENCH_REDIS_URL=self.url,
            BENCH_VISIBILITY=str(self.visibility),
            PYTHONPATH=str(self.root),
        )
        return env

    def start_redis(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )

    def start_worker(self) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        log = (self.root / f"worker{n}.log").open("ab")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                self.module,
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                str(WORKER_SLOTS),
                "--loglevel",
                self.log_level.upper(),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"w{n}@bench",
            ],
            cwd=self.root,
            env=self.env(),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        stop_processes([*self.workers, self.redis], grace=10)

    def pids(self) -> list[int]:
        live = [w.pid for w in self.workers if w.poll() is None]
        return live + ([self.redis.pid] if self.redis is not None else [])


@contextlib.contextmanager
def celery_cluster(
    root: Path, workers: int, visibility: float, log_level: str = LOG_LEVEL
) -> Iterator[tuple[Celery, Any]]:
    import redis  # the bench extra; checked by the caller

    cel = Celery(root, visibility, log_level)
    try:
        cel.start_redis()
        client = redis.Redis.from_url(cel.url)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer within 10 s")
            time.sleep(0.05)
        for _ in range(workers):
            cel.start_worker()
        sys.path.insert(0, str(root))
        os.environ.update(BENCH_REDIS_URL=cel.url, BENCH_VISIBILITY=str(visibility))
        app = importlib.import_module(cel.module).app
        _wait_workers(app, workers)
        yield cel, client
    finally:
        cel.close()
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))
        sys.modules.pop(cel.module, None)


def _wait_workers(app: Any, workers: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if len(replies) >= workers:
            return
    raise RuntimeError(f"only some of {workers} Celery workers answered within 60 s")


def _celery_send(app: Any, count: int, in_flight: int, sleep: float) -> dict[str, float]:
    sent: dict[str, float] = {}
    lock = threading.Lock()
    numbers = iter(range(count))

    def sender() -> None:
        task = app.tasks[f"{app.main}.noop"]
        for _ in numbers:
            at = time.time()
            result = task.apply_async(("noop", sleep))
            with lock:
                sent[result.id] = at

    threads = [threading.Thread(target=sender) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent


def _celery_collect(app: Any, sent: dict[str, float], limit: float) -> dict[str, list[float]]:
    from celery.result import AsyncResult

    results: dict[str, list[float]] = {}
    deadline = time.monotonic() + limit
    pending = set(sent)
    while pending and time.monotonic() < deadline:
        for task_id in list(pending):
            result = AsyncResult(task_id, app=app)
            if result.ready():
                value = result.get(timeout=5)
                results[task_id] = [float(value[0]), float(value[1])]
                pending.discard(task_id)
        if pending:
            time.sleep(0.2)
    return results


def _redis_calls(client: Any) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def _duplicates(client: Any, ids: Sequence[str]) -> int:
    counts = client.mget([f"bench:exec:{i}" for i in ids]) if ids else []
    return sum(max(0, int(c) - 1) for c in counts if c is not None)


def celery_row(
    root: Path,
    workers: int,
    tasks: int,
    in_flight: int,
    warmup: int = 0,
    log_level: str = LOG_LEVEL,
) -> Row:
    row = Row("celery+redis", workers, tasks)
    with celery_cluster(root / f"celery{workers}", workers, 3600.0, log_level) as (cel, client):
        app = sys.modules[cel.module].app
        if warmup:  # as for Grapevine: connections open and workers running before we measure
            _celery_collect(app, _celery_send(app, warmup, in_flight, 0.0), PHASE_LIMIT)
            time.sleep(WARMUP_SETTLE)
        calls0, cpu0, t0 = _redis_calls(client), cpu_seconds(cel.pids()), time.time()
        sent = _celery_send(app, tasks, in_flight, 0.0)
        results = _celery_collect(app, sent, PHASE_LIMIT)
        # What collecting results costs Redis is not part of the task's cost: count to here.
        cpu1, calls1 = cpu_seconds(cel.pids()), _redis_calls(client)
        row.duplicates = _duplicates(client, list(sent))
    starts = [results[t][0] - at for t, at in sent.items() if t in results]
    accepts = [results[t][1] - at for t, at in sent.items() if t in results]
    row.completed = len(results)
    row.seconds = max((r[1] for r in results.values()), default=t0) - t0
    row.throughput = row.completed / row.seconds if row.seconds > 0 else 0.0
    row.start_p50_ms, row.start_p99_ms = pct(starts, 0.5) * 1e3, pct(starts, 0.99) * 1e3
    row.accept_p50_ms, row.accept_p99_ms = pct(accepts, 0.5) * 1e3, pct(accepts, 0.99) * 1e3
    row.messages_per_task = (calls1 - calls0) / max(1, tasks)
    row.cpu_ms_per_task = (cpu1 - cpu0) * 1e3 / max(1, tasks)
    row.note = "accepted = task end; messages = Redis commands (result polling excluded)"
    return row


def celery_crash(
    root: Path,
    workers: int,
    tasks: int,
    sleep: float,
    visibility: float,
    log_level: str = LOG_LEVEL,
) -> CrashRow:
    row = CrashRow("celery+redis", workers, tasks)
    with celery_cluster(root / "celery-crash", workers, visibility, log_level) as (cel, client):
        app = sys.modules[cel.module].app
        start = time.monotonic()
        sent = _celery_send(app, tasks, 16, sleep)
        time.sleep(sleep / 2)
        victim = cel.workers[-1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        cel.start_worker()
        results = _celery_collect(app, sent, min(PHASE_LIMIT, visibility * 3 + 60))
        row.seconds = time.monotonic() - start
        row.completed = len(results)
        row.duplicates = _duplicates(client, list(sent))
        row.note = f"visibility timeout {visibility:g} s"
    return row


# --- Ed25519 bindings --------------------------------------------------------------------------


def _median_us(operation: Any) -> float:
    """Microseconds per call of `operation`, the median over CRYPTO_RUNS runs."""
    runs = []
    for _ in range(CRYPTO_RUNS):
        start = time.perf_counter()
        for _ in range(CRYPTO_OPS):
            operation()
        runs.append((time.perf_counter() - start) / CRYPTO_OPS * 1e6)
    return statistics.median(runs)


def crypto_rows() -> list[CryptoRow]:
    """Ed25519 sign and verify of a task-sized message through PyNaCl and `cryptography`."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair

    message = bytes(i % 256 for i in range(CRYPTO_MESSAGE_BYTES))
    public, secret = crypto_sign_seed_keypair(bytes(32))
    signed = crypto_sign(message, secret)
    rows = [
        CryptoRow(
            "PyNaCl (libsodium)",
            _median_us(lambda: crypto_sign(message, secret)),
            _median_us(lambda: crypto_sign_open(signed, public)),
        )
    ]
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    verifier, signature = key.public_key(), key.sign(message)
    rows.append(
        CryptoRow(
            "cryptography (OpenSSL)",
            _median_us(lambda: key.sign(message)),
            _median_us(lambda: verifier.verify(signature, message)),
        )
    )
    return rows


def crypto_table(rows: list[CryptoRow]) -> str:
    lines = [
        f"Ed25519, {CRYPTO_MESSAGE_BYTES}-byte message, median of {CRYPTO_RUNS} runs of "
        f"{CRYPTO_OPS} operations",
        f"{'binding':<24} {'sign us':>8} {'verify us':>10}",
    ]
    for r in rows:
        lines.append(f"{r.binding:<24} {r.sign_us:>8.1f} {r.verify_us:>10.1f}")
    if len(rows) == 2 and rows[0].verify_us:
        lines.append(
            f"{rows[1].binding} / {rows[0].binding}: sign {rows[1].sign_us / rows[0].sign_us:.2f}x"
            f", verify {rows[1].verify_us / rows[0].verify_us:.2f}x"
        )
    return "\n".join(lines)


# --- report ------------------------------------------------------------------------------------


def table(report: Report) -> str:
    header = (
        f"{'system':<13} {'N':>3} {'tasks':>6} {'done':>6} {'tasks/s':>8} {'start p50':>9} "
        f"{'p99':>7} {'result p50':>10} {'p99':>7} {'msg/task':>8} {'cpu ms/task':>11} "
        f"{'sig/task':>8} {'dup':>4} {'all peers':>9}"
    )
    lines = [header]
    for r in report.rows:
        verified = f"{r.verified_per_task:>8.1f}" if r.verified_per_task is not None else "       -"
        lines.append(
            f"{r.system:<13} {r.workers:>3} {r.tasks:>6} {r.completed:>6} {r.throughput:>8.1f} "
            f"{r.start_p50_ms:>8.0f}ms {r.start_p99_ms:>5.0f}ms {r.accept_p50_ms:>8.0f}ms "
            f"{r.accept_p99_ms:>5.0f}ms {r.messages_per_task:>8.1f} {r.cpu_ms_per_task:>11.2f} "
            f"{verified} {r.duplicates:>4} "
            + (f"{r.converged_seconds:>8.1f}s" if r.converged_seconds else f"{'-':>9}")
        )
    by_size: dict[int, dict[str, Row]] = {}
    for r in report.rows:
        by_size.setdefault(r.workers, {})[r.system] = r
    for size, systems in sorted(by_size.items()):
        gv, cel = systems.get("grapevine"), systems.get("celery+redis")
        if gv and cel and cel.throughput and gv.cpu_ms_per_task:
            lines.append(
                f"N={size}: grapevine/celery throughput {gv.throughput / cel.throughput:.2f}x, "
                f"result p50 {gv.accept_p50_ms / max(cel.accept_p50_ms, 1e-9):.1f}x, "
                f"cpu/task {gv.cpu_ms_per_task / max(cel.cpu_ms_per_task, 1e-9):.1f}x"
            )
    if report.crashes:
        lines.append("")
        lines.append(
            f"{'SIGKILL run':<13} {'N':>3} {'tasks':>6} {'done':>6} {'dup':>4} {'seconds':>8}  note"
        )
        for c in report.crashes:
            lines.append(
                f"{c.system:<13} {c.workers:>3} {c.tasks:>6} {c.completed:>6} {c.duplicates:>4} "
                f"{c.seconds:>8.1f}  {c.note}"
            )
    return "\n".join(lines)


MODES = ("off", "on", "traced")
"""The rows of each --metrics-cost run: (scraped, traced) for each."""
_MODE_FLAGS = {"off": (False, False), "on": (True, False), "traced": (True, True)}


def metrics_cost(
    root: Path, sizes: list[int], tasks: int, in_flight: int, runs: int, log_level: str
) -> str:
    """Triples of rows (off, metrics on, metrics on and tracing) at each size: the table of
    throughputs, each one's ratio to off, and the medians (see the module docstring)."""
    lines = [
        f"{'N':>3} {'run':>3} {'off tasks/s':>11} {'on tasks/s':>10} {'traced':>7} "
        f"{'on/off':>6} {'traced/off':>10}  note"
    ]
    for size in sizes:
        seen: dict[str, list[float]] = {mode: [] for mode in MODES}
        for run in range(runs):
            print(f"metrics cost N={size} run {run + 1}/{runs} ...", file=sys.stderr, flush=True)
            rows = {}
            # The order turns at each run, so that a trend of the machine favours no mode.
            turn = run % len(MODES)
            for mode in MODES[turn:] + MODES[:turn]:
                scrape, trace = _MODE_FLAGS[mode]
                rows[mode] = asyncio.run(
                    grapevine_row(
                        root / f"{run}-{mode}",
                        size,
                        tasks,
                        in_flight,
                        scrape=scrape,
                        trace=trace,
                        log_level=log_level,
                    )
                )
            for mode in MODES:
                seen[mode].append(rows[mode].throughput)
            base = rows["off"].throughput
            on, traced = rows["on"].throughput, rows["traced"].throughput
            note = "; ".join(r.note for r in rows.values() if r.note)
            on_ratio, traced_ratio = (on / base, traced / base) if base else (0.0, 0.0)
            lines.append(
                f"{size:>3} {run + 1:>3} {base:>11.1f} {on:>10.1f} {traced:>7.1f} "
                f"{on_ratio:>6.3f} {traced_ratio:>10.3f}  {note}"
            )
        ratios = {
            mode: [b / a for a, b in zip(seen["off"], seen[mode], strict=True) if a]
            for mode in ("on", "traced")
        }
        medians = {mode: statistics.median(v) if v else 0.0 for mode, v in ratios.items()}
        lines.append(
            f"{size:>3} {'med':>3} {statistics.median(seen['off']):>11.1f} "
            f"{statistics.median(seen['on']):>10.1f} {statistics.median(seen['traced']):>7.1f} "
            f"{medians['on']:>6.3f} {medians['traced']:>10.3f}  median of {runs} runs"
        )
    return "\n".join(lines)


def celery_missing() -> str | None:
    """Why the Celery rows cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian/Ubuntu: sudo apt-get install redis-server)"
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError:
        return "celery and redis are not installed (pip install -e '.[bench]')"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 3,10,30)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per row (default 1000)")
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent submissions")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="tasks run and not measured before each row, Grapevine and Celery alike "
        "(default 500, quick 100; 0 measures a network that has just started)",
    )
    parser.add_argument("--quick", action="store_true", help="N = 3, 10; 300 tasks; short crash")
    parser.add_argument("--no-celery", action="store_true", help="only the Grapevine rows")
    parser.add_argument("--no-crash", action="store_true", help="skip the SIGKILL runs")
    parser.add_argument("--crash-size", type=int, default=3)
    parser.add_argument("--crash-tasks", type=int, default=None, help="default 120 (quick 40)")
    parser.add_argument("--crash-sleep", type=float, default=1.0)
    parser.add_argument(
        "--visibility",
        type=float,
        default=10.0,
        help="Redis visibility timeout for the Celery crash run, seconds",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=LOG_LEVEL,
        help="log level of the Grapevine peers and of the Celery workers alike (default "
        "warning: neither logs per task; at info a peer logs each task's events)",
    )
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    parser.add_argument(
        "--metrics-cost",
        action="store_true",
        help="only compare Grapevine throughput: nobody scraping /metrics, scraped every "
        "second, and scraped with every peer tracing (console exporter)",
    )
    parser.add_argument(
        "--metrics-runs", type=int, default=3, help="runs of three rows per size for --metrics-cost"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("3,10" if args.quick else "3,10,30")).split(",")]
    tasks = args.tasks or (300 if args.quick else 1000)
    warmup = args.warmup if args.warmup is not None else (100 if args.quick else 500)
    if warmup < 0 or tasks < 1:
        parser.error("--tasks must be at least 1 and --warmup at least 0")
    crash_tasks = args.crash_tasks or (40 if args.quick else 120)
    missing = None if args.no_celery else celery_missing()
    if missing:
        print(f"bench_tasks: Celery rows skipped: {missing}", file=sys.stderr)
    run_celery = not args.no_celery and missing is None

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.metrics_cost:
        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
            cost_table = metrics_cost(
                Path(tmp), sizes, tasks, args.in_flight, args.metrics_runs, args.log_level
            )
            print(cost_table)
        return 0
    report = Report(crypto=crypto_rows())
    print(crypto_table(report.crypto), end="\n\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        root = Path(tmp)
        for size in sizes:
            print(f"grapevine N={size}: {tasks} tasks ...", file=sys.stderr, flush=True)
            report.rows.append(
                asyncio.run(
                    grapevine_row(
                        root, size, tasks, args.in_flight, warmup=warmup, log_level=args.log_level
                    )
                )
            )
            print(f"  {report.rows[-1]}", file=sys.stderr, flush=True)
            if run_celery:
                print(f"celery N={size}: {tasks} tasks ...", file=sys.stderr, flush=True)
                report.rows.append(
                    celery_row(root, size, tasks, args.in_flight, warmup, args.log_level)
                )
                print(f"  {report.rows[-1]}", file=sys.stderr, flush=True)
        if not args.no_crash:
            print("SIGKILL runs ...", file=sys.stderr, flush=True)
            report.crashes.append(
                asyncio.run(
                    grapevine_crash(
                        root, args.crash_size, crash_tasks, args.crash_sleep, args.log_level
                    )
                )
            )
            if run_celery:
                report.crashes.append(
                    celery_crash(
                        root,
                        args.crash_size,
                        crash_tasks,
                        args.crash_sleep,
                        args.visibility,
                        args.log_level,
                    )
                )
    print(table(report))
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "scripts"))
    sys.exit(main())
