"""A delegation tree across three real peer processes with the offline model.

Peer p0 hosts a boss, p1 an admin, p2 a worker (each from its own TOML config). Root tasks are
submitted at p1; each boss delegates two sections to admins, each admin two to workers, so one
root makes a tree of 7 tasks over three machines' worth of processes. Checks that every task
of every tree is done with the same result on every peer, ran on the peer hosting its role,
and ran once (0 duplicates); and that `GET /v1/agents` shows each peer's agents.

Every wait is bounded; the cluster fixture ends every process it started, by pid.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peer.agents.ports import AgentInput, AgentOutput
from peer.api_token import read_token_file, token_path
from scripts.local_cluster import LocalCluster, Peer, wait_for
from tests.e2e.cluster_helpers import add_configured, run_showing_logs, task_views, wait_team_known

pytestmark = pytest.mark.e2e

ROOTS = 3
TREE = 1 + 2 + 4
"""Tasks per root: the boss's, two admins', four workers'."""
SETTLE_LIMIT = 25.0

CONFIGS = {
    "boss": """
[[agents]]
name = "boss"
roles = ["boss"]
system = "You lead the team.\\nDelegate to: admin\\nParts: 2"
tools = ["delegate", "final_answer"]
""",
    "admin": """
[[agents]]
name = "admin"
roles = ["admin"]
system = "You organise one part.\\nDelegate to: worker\\nParts: 2"
tools = ["delegate", "final_answer"]
max_concurrent = 2
""",
    "worker": """
[[agents]]
name = "worker"
roles = ["worker"]
system = "You write one section."
max_concurrent = 4
""",
}


def test_a_delegation_tree_spans_three_peers(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    root.mkdir()
    with LocalCluster(root, profile="local", extra_args=()) as cluster:
        peers = add_configured(cluster, [(f"{name}.toml", text) for name, text in CONFIGS.items()])
        run_showing_logs(_run(peers), peers)


def _facts(task: dict[str, Any]) -> tuple[Any, ...]:
    result = task["result"]
    return (
        task["state"],
        task["owner"],
        task["parent"],
        None if result is None else (result["outcome"], result["output"], result["owner"]),
    )


async def _run(peers: list[Peer]) -> None:
    start = time.monotonic()
    await wait_team_known(peers)
    ready = time.monotonic() - start
    roots = []
    async with peers[1].client() as client:
        for i in range(ROOTS):
            request = AgentInput(f"Draft a policy brief on urban tree cover, case {i}")
            answer = await client.submit("boss", request.encode().decode(), idempotency_key=f"r{i}")
            roots.append(answer["id"])

    views: list[dict[str, dict[str, Any]]] = []

    async def settled() -> tuple[bool, object]:
        nonlocal views
        views = await task_views(peers, limit=1000)
        states = [sorted(t["state"] for t in v.values()) for v in views]
        differing = sum(
            1
            for tid in views[0]
            if len({_facts(v.get(tid, {})) if tid in v else None for v in views}) > 1
        )
        done = all(len(v) == ROOTS * TREE for v in views) and all(
            s == ["done"] * (ROOTS * TREE) for s in states
        )
        return done and not differing, {"counts": [len(v) for v in views], "differing": differing}

    settled_in = await wait_for("every tree done everywhere", settled, SETTLE_LIMIT, 0.5)
    owner_of = {"boss": peers[0].node_id, "admin": peers[1].node_id, "worker": peers[2].node_id}
    tasks = views[0]
    by_role = {role: [t for t in tasks.values() if t["role"] == role] for role in owner_of}
    assert [len(by_role[r]) for r in ("boss", "admin", "worker")] == [ROOTS, 2 * ROOTS, 4 * ROOTS]
    for role, owner in owner_of.items():
        assert all(t["owner"] == owner for t in by_role[role]), f"{role} ran elsewhere"
    assert sum(t["duplicates"] for t in tasks.values()) == 0
    assert sorted(t["id"] for t in by_role["boss"]) == sorted(roots)
    parents = {t["id"]: t["parent"] for t in tasks.values()}
    for admin in by_role["admin"]:
        assert parents[admin["id"]] in roots
    for worker in by_role["worker"]:
        assert parents[parents[worker["id"]]] in roots
    for boss in by_role["boss"]:
        output = AgentOutput.decode(boss["result"]["output"].encode())
        assert output is not None and output.agent == "boss"
        assert "combined from 2 delegated sections" in output.answer
    statuses = []
    async with aiohttp.ClientSession() as session:
        for peer in peers:
            token = read_token_file(token_path(peer.data_dir))
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(f"http://{peer.api}/v1/agents", headers=headers) as response:
                assert response.status == 200
                statuses.append(await response.json())
    assert [[a["name"] for a in s["agents"]] for s in statuses] == [["boss"], ["admin"], ["worker"]]
    calls = [sum(m["calls"] for m in s["model"].values()) for s in statuses]
    print(
        f"\n{ROOTS} trees of {TREE} tasks on 3 peers: cluster ready in {ready:.1f} s, every "
        f"tree done and identical on every peer {settled_in:.1f} s after submission; "
        f"model calls per peer {calls}; duplicates 0.\n"
        f"status of p2: {json.dumps(statuses[2]['agents'])}"
    )
