"""The example projects run as their READMEs say (issue 13): examples/research_crew across two
peer processes, a Python boss role started with `grapevine agent --handlers crew_boss` and
LLM agents declared in Python on a peer started by `python crew_team.py team.toml`
(`peer.run`), on the offline model.

The example's files are copied into a private directory and run from there; every process is
recorded in the `LocalCluster` and ended by pid.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.local_cluster import (
    LocalCluster,
    Peer,
    child_env,
    free_port,
    grapevine_command,
    wait_for,
    wait_ready,
)
from tests.e2e.cluster_helpers import OFFLINE_LLM, task_views

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "research_crew"
TOPIC = "honey bees in cities"


def test_the_research_crew_runs_across_two_peers(tmp_path: Path) -> None:
    root = tmp_path / "crew"
    shutil.copytree(EXAMPLE, root)
    with LocalCluster(root, profile="local") as cluster:
        boss = cluster.add(extra_args=("--handlers", "crew_boss"))
        team = start_team(cluster, boss)
        peers = [boss, team]
        try:
            asyncio.run(crew_ready(peers))
            done = subprocess.run(
                [*grapevine_command(), "submit", *boss.cli_flags(), "--role", "research", TOPIC],
                capture_output=True,
                text=True,
                env=child_env(),
                timeout=90,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            tasks = asyncio.run(settled(peers))
        except (TimeoutError, RuntimeError, AssertionError) as exc:
            logs = "\n".join(f"--- {p.name}:\n{p.log_tail(25)}" for p in peers)
            raise AssertionError(f"{exc}\n{logs}") from exc
    answer = done.stdout
    assert answer.startswith(f"# {TOPIC}\n\n[offline stand-in model] "), answer
    assert "## what is known\n\n[offline stand-in model] " in answer
    assert "## what is still open\n\n[offline stand-in model] " in answer
    by_role: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        by_role.setdefault(task["role"], []).append(task)
    assert {role: len(found) for role, found in by_role.items()} == {
        "research": 1,
        "researcher": 2,
        "writer": 1,
    }
    (root_task,) = by_role["research"]
    assert root_task["owner"] == boss.node_id
    for child in by_role["researcher"] + by_role["writer"]:
        assert child["owner"] == team.node_id and child["parent"] == root_task["id"]
    assert all(t["state"] == "done" and t["duplicates"] == 0 for t in tasks)


def start_team(cluster: LocalCluster, boss: Peer) -> Peer:
    """Start `python crew_team.py team.toml`, its config naming its ports, key and seed."""
    assert cluster.key_file is not None
    team = Peer(
        name="team",
        bind=f"127.0.0.1:{free_port()}",
        api=f"127.0.0.1:{free_port()}",
        data_dir=cluster.root / "team",
        key_file=cluster.key_file,
        join=[boss.bind],
        log_path=cluster.root / "team.log",
    )
    (cluster.root / "team.toml").write_text(
        f'bind = "{team.bind}"\n'
        f'api = "{team.api}"\n'
        f'data_dir = "{team.data_dir}"\n'
        f'network_key_file = "{team.key_file}"\n'
        f'join = ["{boss.bind}"]\n'
        'profile = "local"\n' + OFFLINE_LLM
    )
    cluster.peers.append(team)  # so the cluster ends it
    team.launch([sys.executable, "crew_team.py", "team.toml"], cwd=cluster.root)
    return team


async def crew_ready(peers: list[Peer]) -> None:
    """Both peers answer and see each other alive with the crew's three roles."""
    await wait_ready(peers, timeout=20)

    async def known() -> tuple[bool, object]:
        seen = {}
        for peer in peers:
            async with peer.client() as client:
                members = await client.members()
            seen[peer.name] = sorted(
                {r for m in members if m["status"] == "alive" for r in m["roles"]}
            )
        wanted = {"research", "researcher", "writer"}
        return all(wanted <= set(roles) for roles in seen.values()), seen

    await wait_for("the crew's roles known on both peers", known, timeout=20)


async def settled(peers: list[Peer]) -> list[dict[str, Any]]:
    """The boss peer's tasks, once all four are done there."""
    tasks: list[dict[str, Any]] = []

    async def done() -> tuple[bool, object]:
        nonlocal tasks
        (view,) = await task_views(peers[:1], limit=100)
        tasks = list(view.values())
        states = sorted(t["state"] for t in tasks)
        return states == ["done"] * 4, states

    await wait_for("the crew's four tasks done", done, timeout=20)
    return tasks
