"""Agents at scale on this machine: many peer processes, a thousand agents, a thousand-task tree.

Starts `--peers` real `grapevine agent` processes on 127.0.0.1 (default 100), each hosting
`--agents` agents on the offline model (default 10: an admin, a lead and eight workers; the
first peer also hosts the boss), then submits one MegaAgent-style job: the boss delegates to
`--fanout` admins, each admin to `--fanout` leads, each lead to `--fanout` workers (default
1 + 10 + 100 + 1,000 = 1,111 tasks), and waits for the boss's answer. Reports wall time,
tasks/s, duplicate executions, peak RSS per peer and total CPU.

A hundred peers on two cores are a crowded host: each process gets a few percent of a core and
stalls for seconds, so the default protocol profile here is `wan` (memberlist's WAN timings),
not `lan`, whose half-second probe timeout turns those stalls into false failures.

The offline model is called directly rather than through litellm here
(`offline_via_litellm = false`): importing litellm costs ~170 MB per process, which a hundred
processes on one 24 GiB machine cannot afford; the agent loop, tools, delegation, claims and
gossip are the same code either way.

Every process is started by this script's `LocalCluster` and ended by pid when it exits.

    python scripts/bench_agents.py                      # 100 peers, 1,001 agents, 1,011 tasks
    python scripts/bench_agents.py --peers 10 --fanout 4    # a quick look: 85 tasks
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from peer.agents.offline import MAX_PARTS  # noqa: E402
from peer.api_token import load_or_create_token  # noqa: E402
from scripts.local_cluster import (  # noqa: E402
    GrapevineError,
    LocalCluster,
    Peer,
    query,
    wait_for,
    wait_ready,
    wait_views,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
OUT = REPO / "scripts" / "out"


@dataclass
class Report:
    peers: int
    agents: int
    tree_tasks: int
    executions: int
    duplicates: int
    takeovers: int
    fenced: int
    start_s: float
    wall_s: float
    tasks_per_s: float
    rss_peak_median_mb: float
    rss_peak_max_mb: float
    cpu_s: float
    cpu_start_s: float
    tokens: int
    agree: int
    checked: int
    duplicate_causes: dict[str, int]
    network_counters: dict[str, float]
    per_task: dict[str, float]


def peer_config(boss: bool, agents: int, fanout: int) -> str:
    """The TOML of one peer: an admin, a lead and workers (and the boss on the first peer)."""
    plan = f"\\nParts: {fanout}"
    blocks = [
        # The default 200,000-token tree budget, split down three levels, leaves a worker less
        # than one offline call; a thousand-task tree needs about 100 times that.
        f"[limits]\nmax_depth = 4\nmax_children = {max(16, fanout)}\nmax_steps = 8\n"
        "default_budget = 50000000\n",
        "[llm]\noffline_via_litellm = false\n",
        _agent("admin", "admin", "Delegate to: lead" + plan, 2, delegate=True),
        _agent("lead", "lead", "Delegate to: worker" + plan, 2, delegate=True),
    ]
    blocks += [
        _agent(f"worker-{i}", "worker", "Write the section asked for.", 1)
        for i in range(agents - 2)
    ]
    if boss:
        blocks.append(_agent("boss", "boss", "Delegate to: admin" + plan, 1, delegate=True))
    return "\n".join(blocks)


def _agent(name: str, role: str, system: str, slots: int, delegate: bool = False) -> str:
    tools = '["delegate", "final_answer"]' if delegate else '["final_answer"]'
    return (
        f'[[agents]]\nname = "{name}"\nroles = ["{role}"]\nsystem = "{system}"\n'
        f"tools = {tools}\nmax_concurrent = {slots}\n"
    )


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of live processes, from /proc."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MB; 0 if it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return (ordered[n // 2] + ordered[(n - 1) // 2]) / 2 if n else float("nan")


async def start_peers(cluster: LocalCluster, args: argparse.Namespace, root: Path) -> list[Peer]:
    seed: Peer | None = None
    for i in range(args.peers):
        config = root / f"peer{i}.toml"
        config.write_text(peer_config(i == 0, args.agents, args.fanout))
        peer = cluster.add(join=[seed] if seed else [], extra_args=("--config", str(config)))
        seed = seed or peer
        if i % 10 == 9:  # let each batch import and join before the next one starts
            await wait_ready(cluster.peers[-10:], timeout=120)
            print(f"  {i + 1} peers started", file=sys.stderr, flush=True)
    peers = list(cluster.peers)
    await wait_ready(peers, timeout=120)
    await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=240)

    async def roles_known() -> tuple[bool, object]:
        lacking = {}
        for peer in peers[:: max(1, len(peers) // 10)]:
            members = await query(peer, lambda c: c.members())
            missing = sum(1 for m in members if "worker" not in m["roles"])
            if missing:
                lacking[peer.name] = missing
        return not lacking, lacking

    await wait_for("roles advertised", roles_known, timeout=120, interval=1.0)
    return peers


async def run_job(peers: list[Peer], args: argparse.Namespace) -> tuple[str, float]:
    boss = peers[0]
    started = time.monotonic()
    answer = await query(
        boss,
        lambda c: c.submit("boss", args.job, idempotency_key="bench-agents", wait=False),
    )
    task_id = str(answer["id"])
    expected = 1 + args.fanout + args.fanout**2 + args.fanout**3
    last = -1
    while True:
        try:
            tree = await query(boss, lambda c: c.tree(task_id))
        except GrapevineError as exc:  # a peer crowded by a hundred others answers slowly
            print(f"  polling: {exc}; retrying", file=sys.stderr, flush=True)
            await asyncio.sleep(2.0)
            continue
        done = _count_done(tree)
        if done != last:
            print(f"  {done} of {expected} tasks done", file=sys.stderr, flush=True)
            last = done
        if tree["state"] in ("done", "failed", "cancelled"):
            break
        if time.monotonic() - started > args.timeout:
            raise TimeoutError(f"job not finished within {args.timeout} s ({done} tasks done)")
        await asyncio.sleep(2.0)
    if tree["state"] != "done":
        raise RuntimeError(f"the job ended {tree['state']}")
    return task_id, time.monotonic() - started


def _count_done(node: dict[str, Any]) -> int:
    own = 1 if node.get("state") == "done" else 0
    return own + sum(_count_done(child) for child in node.get("children", []))


async def check_agreement(peers: list[Peer], task_id: str, sample: int) -> tuple[int, int, Any]:
    """How many of `sample` peers (spread over the list, the boss's first) hold the tree the
    boss's peer holds, after giving the last objects a bounded time to spread. Every round
    reads the boss's peer again: it may still be gathering the tree's last leaves when the job
    ends (a run read it once, at 1,103 of 1,111 tasks, and counted every peer as differing)."""
    picked = peers[:: max(1, len(peers) // sample)][:sample]

    async def totals(peer: Peer) -> Any:
        try:
            tree = await query(peer, lambda c: c.tree(task_id))
        except GrapevineError as exc:
            return {"unreachable": str(exc)}
        return tree["totals"]

    async def settled() -> tuple[bool, object]:
        views = [await totals(p) for p in picked]
        return all(v == views[0] for v in views), views

    with contextlib.suppress(TimeoutError):
        await wait_for("every sampled peer holds the whole tree", settled, timeout=60, interval=1)
    views = [await totals(p) for p in picked]
    reference = views[0]
    agree = sum(1 for v in views if v == reference)
    for peer, view in zip(picked, views, strict=True):
        if view != reference:
            print(f"  {peer.name} differs: {view} != {reference}", file=sys.stderr)
    return agree, len(picked), reference


async def bench(args: argparse.Namespace, root: Path) -> Report:
    with LocalCluster(root, profile=args.profile) as cluster:
        t0 = time.monotonic()
        peers = await start_peers(cluster, args, root)
        start_s = time.monotonic() - t0
        pids = [p.pid for p in peers if p.pid is not None]
        cpu_start = cpu_seconds(pids)
        print(f"{len(peers)} peers up in {start_s:.0f} s; submitting", file=sys.stderr)
        before = await network_counters(peers, PER_TASK)
        task_id, wall = await run_job(peers, args)
        cpu = cpu_seconds(pids) - cpu_start
        after = await network_counters(peers, PER_TASK)
        agree, checked, totals = await check_agreement(peers, task_id, sample=10)
        causes = await duplicate_causes(peers[0], task_id)
        counters = await network_counters(peers)
        stats = await query(peers[0], lambda c: c.task_stats())
        rss = [peak_rss_mb(pid) for pid in pids]
        tasks = int(totals["tasks"])
        return Report(
            peers=len(peers),
            agents=len(peers) * args.agents + 1,
            tree_tasks=tasks,
            executions=int(totals["executions"]),
            duplicates=int(totals["duplicates"]),
            takeovers=int(stats["totals"]["takeovers"]),
            fenced=int(stats["totals"]["fenced"]),
            start_s=round(start_s, 1),
            wall_s=round(wall, 1),
            tasks_per_s=round(tasks / wall, 1),
            rss_peak_median_mb=round(median(rss), 1),
            rss_peak_max_mb=round(max(rss), 1),
            cpu_s=round(cpu, 1),
            cpu_start_s=round(cpu_start, 1),
            tokens=int(totals["prompt_tokens"]) + int(totals["completion_tokens"]),
            agree=agree,
            checked=checked,
            duplicate_causes=causes,
            network_counters=counters,
            per_task={
                name: round((after[name] - before[name]) / max(1, tasks), 1)
                for name in PER_TASK.values()
            },
        )


TASK_EVENTS = {
    "grants handed on": "epoch-1 grants handed on",
    "conflicting grants": "conflicting grants learned",
    "takeover asked within the down grace": "takeovers refused within the down grace",
    "asks answered lately": "standby asks read again within half an ask interval",
}
"""Task plane counters (`grapevine_task_plane_events_total{event}`) and their row names."""
COUNTED = {
    "grapevine_suspicions_total": "suspicions started",
    "grapevine_false_suspicions_refuted_total": "suspected members that proved alive",
    "grapevine_refutations_total": "refutations of accusations about oneself",
    "grapevine_task_takeovers_total": "takeover claims",
    "grapevine_task_grants_total": "epoch-1 grants made by a primary",
    "grapevine_task_grant_requests_total": "grants asked by standbys",
    "grapevine_gossip_sends_dropped_total": "sends dropped before leaving",
    "grapevine_gossip_send_failures_total": "sends failed (channel refused, reset, timed out)",
    **{
        # The label as `peer.observability.collector` writes it.
        f'grapevine_task_plane_events_total{{event="{key.replace(" ", "_")}"}}': name
        for key, name in TASK_EVENTS.items()
    },
}
"""Series of every peer's `GET /metrics` summed over the network, and their row names."""
PER_TASK = {
    'grapevine_gossip_messages_total{direction="out"}': "envelopes sent per task",
    "grapevine_signatures_verified_total": "signatures verified per task",
    "grapevine_task_grant_requests_total": "grants asked per task",
}
"""Series read before and after the job: what the job itself cost the network, per task
(the totals above include the start-up)."""


async def network_counters(
    peers: list[Peer], counted: dict[str, str] = COUNTED
) -> dict[str, float]:
    """The `counted` series (default `COUNTED`) summed over every peer that answers (the
    failure detector's false alarms and the claim races behind duplicate executions)."""
    sums = dict.fromkeys(counted.values(), 0.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for peer in peers:
            headers = {"Authorization": f"Bearer {load_or_create_token(peer.data_dir)}"}
            try:
                async with session.get(f"http://{peer.api}/metrics", headers=headers) as answer:
                    text = await answer.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                print(f"  {peer.name}: /metrics unreadable ({exc})", file=sys.stderr)
                continue
            for line in text.splitlines():
                series, _, value = line.rpartition(" ")
                if series in counted:
                    sums[counted[series]] += float(value)
    return sums


async def duplicate_causes(peer: Peer, task_id: str) -> dict[str, int]:
    """Extra runs of the tree's tasks by cause, from each repeated task's executions:
    `same epoch` (two owners claimed one epoch), `takeover` (a later epoch after the owner
    was held dead), `restart` (one owner ran its epoch again in a new incarnation)."""
    tree = await query(peer, lambda c: c.tree(task_id))
    repeated: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if int(node.get("duplicates") or 0) > 0:
            repeated.append(str(node["id"]))
        for child in node.get("children", []):
            walk(child)

    walk(tree)
    causes = {"same epoch": 0, "takeover": 0, "restart": 0}
    for tid in repeated:
        task = await query(peer, lambda c, tid=tid: c.task(tid))
        runs = {(e["epoch"], e["owner"], e["incarnation"]) for e in task["executions"]}
        seen_epochs: set[int] = set()
        seen_pairs: set[tuple[int, str]] = set()
        for epoch, owner, _inc in sorted(runs):
            if (epoch, owner) in seen_pairs:
                causes["restart"] += 1
            elif epoch in seen_epochs:
                causes["same epoch"] += 1
            elif seen_epochs:
                causes["takeover"] += 1
            seen_pairs.add((epoch, owner))
            seen_epochs.add(epoch)
        print(f"  repeated {tid[:12]}: {sorted(runs)}", file=sys.stderr)
    return causes


def table(r: Report) -> str:
    rows = [
        ("peer processes", f"{r.peers}"),
        ("agents", f"{r.agents:,}"),
        ("tasks in the tree", f"{r.tree_tasks:,}"),
        ("executions", f"{r.executions:,}"),
        ("duplicate executions", f"{r.duplicates}"),
        ("takeovers (all tasks, boss's peer view)", f"{r.takeovers}"),
        ("fenced executions (same view)", f"{r.fenced}"),
        *((f"  repeated: {cause}", f"{n}") for cause, n in r.duplicate_causes.items()),
        *((f"network: {name}", f"{n:,.0f}") for name, n in r.network_counters.items()),
        ("start-up (all peers joined) s", f"{r.start_s}"),
        ("job wall time s", f"{r.wall_s}"),
        ("tasks/s", f"{r.tasks_per_s}"),
        ("peak RSS per peer, median MB", f"{r.rss_peak_median_mb}"),
        ("peak RSS per peer, max MB", f"{r.rss_peak_max_mb}"),
        ("CPU during the job, all peers s", f"{r.cpu_s}"),
        *((f"job: {name}", f"{n:,.1f}") for name, n in r.per_task.items()),
        ("CPU before the job (start-up) s", f"{r.cpu_start_s}"),
        ("tokens (offline estimate)", f"{r.tokens:,}"),
        ("sampled peers agreeing on the tree", f"{r.agree} of {r.checked}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--peers", type=int, default=100, help="peer processes (default 100)")
    parser.add_argument("--agents", type=int, default=10, help="agents per peer (default 10)")
    parser.add_argument(
        "--fanout", type=int, default=10, help="children of each boss, admin and lead (10)"
    )
    parser.add_argument("--job", default="Plan a country's policy on heat resilience")
    parser.add_argument("--profile", default="wan", choices=("lan", "local", "wan"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="job time limit, s")
    parser.add_argument("--out", type=Path, default=OUT / "bench_agents.json")
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy every peer's log here at the end (to trace a duplicate to its cause)",
    )
    args = parser.parse_args(argv)
    if args.peers < 1 or args.agents < 3 or not 1 <= args.fanout <= MAX_PARTS:
        parser.error(f"need at least 1 peer, 3 agents per peer and a fan-out of 1 to {MAX_PARTS}")
    # SIGTERM unwinds like Ctrl-C would, so LocalCluster ends every peer it started by pid
    # and the data directory goes (without it, a terminated run left 100 peers running).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-agents-") as tmp:
        try:
            report = asyncio.run(bench(args, Path(tmp)))
        except (TimeoutError, RuntimeError, GrapevineError) as exc:
            print(f"bench_agents: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench_agents: interrupted; every peer it started was stopped", file=sys.stderr)
            return 130
        finally:
            if args.keep_logs is not None:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).glob("*.log"):
                    shutil.copy(log, args.keep_logs / log.name)
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
