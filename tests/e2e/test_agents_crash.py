"""A 3-level agent tree across five real peers survives the SIGKILL of a peer running an admin.

Layout (each peer from its own TOML config, offline model called directly):

- p0: the boss ("Delegate to: admin", "Parts: 2");
- p1, p2: an admin each ("Delegate to: worker", "Parts: 3"), so the admin task that was running
  on the killed peer has a capable standby to take it over;
- p3, p4: a worker each, 6 slots, so no worker ever waits for a slot.

How the kill lands while an admin is running: the offline model has no delay, but a worker
whose system prompt says "Save to: section.md" and which is offered a tool named `write_file`
calls it before answering. The workers are offered `write_file` from this module by import path
(`tests.e2e.test_agents_crash:write_file`, importable by the peer processes because the repo
is on their PYTHONPATH and `tests` is a namespace package): it sleeps `WORK_SECONDS` and writes
nothing. So every worker runs for `WORK_SECONDS`, and its admin parent stays "running"
(suspended, waiting on its children) meanwhile. (Making the worker role appear late instead
does not work: delegating to a role no live peer serves is refused at once.)

Which peer dies: the tree on p0 names each admin task's owner (`peer`). Both admins may land
on the same peer (a suspended admin frees its slot, so the preferred owner often takes the
second one too); the test kills the owner of fewer admin tasks, and expects one takeover per
admin task it owned (1 or 2). It kills only once the other admin peer knows that admin's three
worker tasks: the peer taking over must find the children its predecessor created (matched by
role and request), or it would create and run new ones.

Asserts, within `SURVIVE_LIMIT` of the kill: the root is done on every surviving peer; every
surviving peer has the same tree (ids, roles, states, owners, agents, usage, duplicates) of
1 boss, 2 admins and 6 workers, each admin with exactly 3 workers; each worker ran once; the
only duplicate executions are the takeovers of the killed peer's admin tasks, each a start of
epoch 2 by the other admin peer, whose result is the accepted one. Then the killed peer is
restarted (with its own config) and must converge on the same tree and root result within
`CONVERGE_LIMIT`, and still show the same totals a standby delay later (it resumed nothing).
Prints, from the kill: p0 declaring the peer dead, the takeover (the first epoch-2 execution
start in the new owner's log), the new owner's result, the root done on p0 and everywhere
(polled every 0.1 s).

Timing: takeover follows the death declaration within a poll (about 5 s after the kill in
the local profile). The rest is dominated by `WORK_SECONDS` plus gossip: in a 5-peer local
cluster each broadcast is sent only twice (retransmit_mult 2), and the dead peer still draws
gossip for 15 s, so a result often misses a peer until the next push-pull (15 s). Observed
wall: 25-50 s (18 s of it the workers).

Every wait is bounded; the cluster fixture ends every process it started, by pid.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from peer.agents.ports import AgentInput, AgentOutput
from scripts.local_cluster import (
    GrapevineError,
    LocalCluster,
    Peer,
    wait_for,
    wait_ready,
)
from tests.e2e.cluster_helpers import add_configured, run_showing_logs, wait_team_known

pytestmark = pytest.mark.e2e

WORK_SECONDS = 18.0
"""How long each worker's `write_file` call sleeps: the window in which the kill lands."""
ADMINS, WORKERS_PER_ADMIN = 2, 3
TREE = 1 + ADMINS + ADMINS * WORKERS_PER_ADMIN
SURVIVE_LIMIT = 60.0
CONVERGE_LIMIT = 30.0
STANDBY_DELAY = 3.0
"""`protocol.config.TaskConfig.standby_delay` (the same in both profiles)."""


def write_file(path: str, content: str) -> str:
    """Save a section (slowly: this test's stand-in for real work; nothing is written).

    Args:
        path: where the section would go.
        content: the section's text.
    """
    time.sleep(WORK_SECONDS)
    return f"saved {len(content)} characters to {path}"


BOSS = """
[[agents]]
name = "boss"
roles = ["boss"]
system = "You lead the team.\\nDelegate to: admin\\nParts: 2"
tools = ["delegate", "final_answer"]
"""
ADMIN = """
[[agents]]
name = "admin"
roles = ["admin"]
system = "You organise one part.\\nDelegate to: worker\\nParts: 3"
tools = ["delegate", "final_answer"]
max_concurrent = 2
"""
WORKER = """
[[agents]]
name = "worker"
roles = ["worker"]
system = "You write one section.\\nSave to: section.md"
tools = ["tests.e2e.test_agents_crash:write_file", "final_answer"]
max_concurrent = 6
"""
LAYOUT = (
    ("boss", BOSS),
    ("admin", ADMIN),
    ("admin", ADMIN),
    ("worker", WORKER),
    ("worker", WORKER),
)


def test_a_tree_survives_the_kill_of_an_admin_peer(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    root.mkdir()
    with LocalCluster(root, profile="local", extra_args=()) as cluster:
        configs = [(f"p{i}.toml", text) for i, (_, text) in enumerate(LAYOUT)]
        peers = add_configured(cluster, configs)
        run_showing_logs(_run(cluster, peers), peers)


async def _tree(peer: Peer, task_id: str) -> dict[str, Any]:
    async with peer.client() as client:
        return await client.tree(task_id)


async def _task(peer: Peer, task_id: str) -> dict[str, Any]:
    async with peer.client() as client:
        return await client.task(task_id)


def _shape(node: dict[str, Any]) -> tuple[Any, ...]:
    """Everything of a tree node that must be the same on every peer, children by id."""
    children = tuple(sorted((_shape(c) for c in node["children"]), key=lambda s: s[0]))
    usage = node["usage"]
    return (
        node["id"],
        node["role"],
        node["state"],
        node["peer"],
        node["agent"],
        None if usage is None else tuple(sorted(usage.items())),
        node["duplicates"],
        children,
    )


def _admins(tree: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in tree["children"] if c["role"] == "admin"]


async def _run(cluster: LocalCluster, peers: list[Peer]) -> None:
    start = time.monotonic()
    await wait_team_known(peers)
    ready = time.monotonic() - start
    by_id = {p.node_id: p for p in peers}
    admin_ids = {p.node_id for p, (role, _) in zip(peers, LAYOUT, strict=True) if role == "admin"}
    worker_ids = {p.node_id for p, (role, _) in zip(peers, LAYOUT, strict=True) if role == "worker"}

    request = AgentInput("Draft a policy brief on urban tree cover")
    async with peers[0].client() as client:
        answer = await client.submit("boss", request.encode().decode(), idempotency_key="crash")
    root_id: str = answer["id"]
    placement: dict[str, str] = {}
    submitted = time.monotonic()

    # Kill while both admins run (as p0 sees it) the peer owning an admin (the one owning
    # fewer, when they differ), once every other admin peer knows that admin's three workers:
    # the peer taking it over must find the children its predecessor created, or it would
    # create and run new ones (a child is matched by role and request).
    chosen: list[tuple[str, list[str]]] = []

    async def admins_running() -> tuple[bool, object]:
        trees = await asyncio.gather(*(_tree(p, root_id) for p in peers))
        known = [{w["id"] for a in _admins(t) for w in a["children"]} for t in trees]
        admins = _admins(trees[0])
        seen: dict[str, object] = {p.name: len(k) for p, k in zip(peers, known, strict=True)}
        seen["p0 admins"] = [
            (a["state"], a["peer"], [w["state"] for w in a["children"]]) for a in admins
        ]
        if len(admins) != ADMINS or any(a["state"] != "running" for a in admins):
            return False, seen
        if any(len(a["children"]) != WORKERS_PER_ADMIN for a in admins):
            return False, seen
        owners = sorted({a["peer"] for a in admins})  # sorted twice: a stable, fair order
        for owner in sorted(owners, key=lambda o: sum(a["peer"] == o for a in admins)):
            mine = [a for a in admins if a["peer"] == owner]
            workers = {w["id"] for a in mine for w in a["children"]}
            standbys = [
                k
                for p, k in zip(peers, known, strict=True)
                if p.node_id in admin_ids and p.node_id != owner
            ]
            if all(workers <= k for k in standbys):
                chosen.append((owner, sorted(a["id"] for a in mine)))
                placement.update({a["id"]: a["peer"] for a in admins})
                return True, seen
        return False, seen

    await wait_for("both admins running with their workers", admins_running, WORK_SECONDS, 0.1)
    running_after = time.monotonic() - submitted
    assert set(placement.values()) <= admin_ids, f"an admin ran off the admin peers: {placement}"
    victim, killed = by_id[chosen[0][0]], chosen[0][1]
    survivors = [p for p in peers if p is not victim]
    standbys = [p for p in survivors if p.node_id in admin_ids]
    cluster.kill(victim)
    killed_at = time.monotonic()

    # Poll often until the root is done everywhere, noting when p0 declares the victim dead,
    # when each takeover starts (on the standby admin peers' own logs) and when the root is
    # done on p0 (where the boss runs) and on every survivor.
    taken_over: dict[str, float] = {}
    admin_done: dict[str, float] = {}
    dead_at = boss_done_at = root_done_at = 0.0
    deadline = killed_at + SURVIVE_LIMIT
    last: object = None
    while True:
        try:
            if not dead_at:
                async with peers[0].client() as client:
                    view = {m["id"]: m["status"] for m in await client.members()}
                if view.get(victim.node_id) not in ("alive", "suspect"):
                    dead_at = time.monotonic() - killed_at
            for task_id in killed:
                for peer in standbys:
                    if task_id in taken_over:
                        break
                    task = await _task(peer, task_id)
                    if any(e["epoch"] >= 2 and e["phase"] == "start" for e in task["executions"]):
                        taken_over[task_id] = time.monotonic() - killed_at
                for peer in standbys:
                    if task_id in admin_done:
                        break
                    task = await _task(peer, task_id)
                    if task["result"] is not None and task["owner"] == peer.node_id:
                        admin_done[task_id] = time.monotonic() - killed_at
            states = {p.name: (await _task(p, root_id))["state"] for p in survivors}
            if states[peers[0].name] == "done" and not boss_done_at:
                boss_done_at = time.monotonic() - killed_at
            last = {"root": states, "taken over": taken_over}
            if all(s == "done" for s in states.values()) and len(taken_over) == len(killed):
                root_done_at = root_done_at or time.monotonic() - killed_at
                trees = await asyncio.gather(*(_tree(p, root_id) for p in survivors))
                if len({_shape(t) for t in trees}) == 1 and all(
                    t["totals"]["tasks"] == TREE for t in trees
                ):
                    break
                last = {"trees differ": [t["totals"] for t in trees]}
        except GrapevineError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"tree done everywhere: not within {SURVIVE_LIMIT:.0f} s; {last!r}")
        await asyncio.sleep(0.1)
    settled_at = time.monotonic() - killed_at

    tree = trees[0]
    assert tree["role"] == "boss" and tree["state"] == "done" and tree["peer"] == peers[0].node_id
    admins = _admins(tree)
    assert len(tree["children"]) == ADMINS == len(admins)
    for admin in admins:
        assert admin["state"] == "done" and admin["agent"] == "admin"
        assert admin["peer"] in admin_ids
        assert len(admin["children"]) == WORKERS_PER_ADMIN, "the takeover made new workers"
        assert admin["duplicates"] == (1 if admin["id"] in killed else 0)
        for worker in admin["children"]:
            assert worker["role"] == "worker" and worker["state"] == "done"
            assert worker["peer"] in worker_ids and worker["agent"] == "worker"
            assert worker["duplicates"] == 0 and worker["children"] == []
    totals = tree["totals"]
    assert totals["tasks"] == TREE
    assert totals["duplicates"] == len(killed), totals
    assert totals["executions"] == TREE + len(killed), totals

    # Each killed admin: epoch 1 started on the victim, epoch 2 by another admin peer, whose
    # result is the accepted one everywhere.
    for task_id in killed:
        views = await asyncio.gather(*(_task(p, task_id) for p in survivors))
        for task in views:
            starts = sorted(
                (e["epoch"], e["owner"]) for e in task["executions"] if e["phase"] == "start"
            )
            assert len(starts) == 2, starts
            assert starts[0] == (1, victim.node_id), starts
            assert starts[1][0] == 2 and starts[1][1] in admin_ids - {victim.node_id}, starts
            assert task["epoch"] == 2 and task["owner"] == starts[1][1]
            result = task["result"]
            assert result["outcome"] == "ok" and result["epoch"] == 2
            assert result["owner"] == starts[1][1]
        assert len({v["result"]["output"] for v in views}) == 1

    roots = await asyncio.gather(*(_task(p, root_id) for p in survivors))
    outputs = {r["result"]["output"] for r in roots}
    assert len(outputs) == 1, "surviving peers disagree on the root's result"
    boss = AgentOutput.decode(next(iter(outputs)).encode())
    assert boss is not None and boss.agent == "boss"
    assert f"combined from {ADMINS} delegated sections" in boss.answer

    # The killed peer comes back (with its own config): it must converge on the same tree and
    # execute nothing again.
    cluster.start(victim)
    restarted = time.monotonic()
    await wait_ready([victim], timeout=20)
    expected = _shape(tree)

    async def converged() -> tuple[bool, object]:
        mine = await _tree(victim, root_id)
        task = await _task(victim, root_id)
        same = _shape(mine) == expected and task["result"] is not None
        same = same and task["result"]["output"] == next(iter(outputs))
        return same, mine["totals"]

    rejoined = await wait_for("the restarted peer converges", converged, CONVERGE_LIMIT, 0.2)
    restart_took = time.monotonic() - restarted
    # A restarted peer resumes its own claims left without a result a standby delay (3 s) after
    # joining: wait past that, then check that it resumed nothing (the epoch-2 claim won).
    await asyncio.sleep(STANDBY_DELAY + 1.0)
    everyone = await asyncio.gather(*(_tree(p, root_id) for p in peers))
    assert {_shape(t) for t in everyone} == {expected}
    assert all(t["totals"] == totals for t in everyone), [t["totals"] for t in everyone]
    total = time.monotonic() - start

    placed = {task[:8]: by_id[owner].name for task, owner in placement.items()}
    print(
        f"\ncluster ready in {ready:.1f} s; admins {placed} running with their workers "
        f"{running_after:.1f} s after submission; SIGKILL of {victim.name} ({len(killed)} admin "
        f"task(s) on it); after the kill: declared dead on p0 {dead_at:.1f} s, takeover "
        f"(epoch 2 start) {max(taken_over.values()):.1f} s, its result on the new owner "
        f"{max(admin_done.values()):.1f} s, root done on p0 "
        f"{boss_done_at:.1f} s, on every survivor {root_done_at:.1f} s, trees identical "
        f"{settled_at:.1f} s; restarted {victim.name} converged {rejoined:.1f} s after its "
        f"API answered ({restart_took:.1f} s with start-up); totals {totals}; "
        f"wall {total:.1f} s."
    )
