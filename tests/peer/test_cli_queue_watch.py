"""A queued task's timeout and `grapevine watch`, tried as a user would: `grapevine` run as a
subprocess against real peers on 127.0.0.1 (issue 13, "Rough edges").

The cluster: p0 hosts two agents on the offline model, a boss that delegates to a worker; p1
joined it and serves the built-in roles. Nobody serves "summarize".
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from peer.runtime.queue_timeouts import HOME_GRACE, MAX_NAP
from scripts.local_cluster import (
    LocalCluster,
    Peer,
    child_env,
    grapevine_command,
    members_of,
    wait_for,
    wait_ready,
    wait_views,
)
from tests.e2e.cluster_helpers import OFFLINE_LLM
from tests.peer.test_cli_tasks import one_line_error

CONFIG = """
[[agents]]
name = "boss"
roles = ["boss"]
system = "You lead the team.\\nDelegate to: worker\\nParts: 1"
tools = ["delegate", "final_answer"]

[[agents]]
name = "worker"
roles = ["worker"]
system = "You write one section."
"""
REASON = "queue timeout: no live peer served role 'summarize' for 2 s"


@dataclass
class Cluster:
    cluster: LocalCluster
    agents: Peer
    plain: Peer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cli-queue-watch")
    config = root / "agents.toml"
    config.write_text(CONFIG + OFFLINE_LLM)
    with LocalCluster(root, extra_args=()) as peers:
        agents = peers.add(extra_args=("--config", str(config)))
        plain = peers.add(join=[agents])
        asyncio.run(known([agents, plain]))
        yield Cluster(peers, agents, plain)


async def known(peers: list[Peer]) -> None:
    """Every peer answers, sees the other alive and sees the agents' roles."""
    await wait_ready(peers, timeout=20)
    await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=15)

    async def roles_seen() -> tuple[bool, object]:
        seen = [
            {r for m in await members_of(p) if m["status"] == "alive" for r in m["roles"]}
            for p in peers
        ]
        return all({"boss", "worker"} <= roles for roles in seen), seen

    await wait_for("roles known everywhere", roles_seen, timeout=15)


def grapevine(peer: Peer, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*grapevine_command(), *args, *peer.cli_flags()],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def test_a_queued_task_fails_at_its_queue_timeout(cluster: Cluster) -> None:
    started = time.monotonic()
    submitted = grapevine(
        cluster.plain, "submit", "--role", "summarize", "--queue", "--queue-timeout", "2", "text"
    )
    elapsed = time.monotonic() - started
    assert submitted.returncode == 1, submitted.stderr
    assert 2 <= elapsed < 15, elapsed  # the deadline, and not much later
    accepted, *_, last = submitted.stderr.strip().splitlines()
    assert accepted.startswith("grapevine submit: task ") and "accepted" in accepted
    task_id = accepted.split()[3]
    assert last == f"grapevine submit: task {task_id} failed: {REASON}"

    task = json.loads(grapevine(cluster.plain, "task", task_id, "--json").stdout)
    assert (task["state"], task["cancel"]["reason"]) == ("failed", REASON)
    assert task["cancel"]["outcome"] == "failed"
    watched = grapevine(cluster.plain, "watch", task_id)  # already over: it says so at once
    assert watched.returncode == 1 and REASON in watched.stdout
    assert REASON in one_line_error(watched, 1)


def test_queue_timeout_needs_queue(cluster: Cluster) -> None:
    line = one_line_error(
        grapevine(cluster.plain, "submit", "--role", "summarize", "--queue-timeout", "2", "x"), 2
    )
    assert line == "grapevine submit: --queue-timeout applies to a queued task: add --queue"


def test_a_claimed_task_outlives_its_queue_timeout(cluster: Cluster) -> None:
    submitted = grapevine(
        cluster.plain, "submit", "--role", "sleep", "--queue", "--queue-timeout", "1", "3"
    )
    assert submitted.returncode == 0, submitted.stderr


def test_the_queue_timeout_survives_a_restart_of_the_origin(cluster: Cluster) -> None:
    origin = cluster.plain
    submitted = grapevine(
        origin,
        "submit",
        "--role",
        "summarize",
        "--queue",
        "--queue-timeout",
        "3",
        "--no-wait",
        "later",
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    cluster.cluster.kill(origin)  # SIGKILL: nothing is saved on the way out
    time.sleep(3.5)  # the deadline passes while the origin is down
    cluster.cluster.start(origin)
    asyncio.run(known([cluster.agents, origin]))
    started = time.monotonic()
    watched = grapevine(origin, "watch", task_id, "--json")
    assert watched.returncode == 1, watched.stderr
    assert time.monotonic() - started < 10
    task = json.loads(watched.stdout.strip().splitlines()[-1])
    assert task["cancel"]["reason"] == REASON.replace("2 s", "3 s")


def test_a_queued_task_whose_origin_never_returns_is_failed_by_its_home(cluster: Cluster) -> None:
    # The record carries the queue timeout, so the other peer, the task's arbiter once the
    # origin is gone, ends it after the deadline and a grace (decision 58).
    origin, other = cluster.plain, cluster.agents
    submitted = grapevine(
        origin, "submit", "--role", "summarize", "--queue", "--queue-timeout", "2", "--no-wait", "x"
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    cluster.cluster.kill(origin)  # SIGKILL, and it stays down until the task is over
    try:
        started = time.monotonic()
        watched = grapevine(other, "watch", task_id, "--json", timeout=90)
        assert watched.returncode == 1, watched.stderr
        assert time.monotonic() - started < 2 + HOME_GRACE + MAX_NAP + 15
        task = json.loads(watched.stdout.strip().splitlines()[-1])
        assert (task["state"], task["cancel"]["reason"]) == ("failed", REASON)
        assert task["cancel"]["outcome"] == "failed"
    finally:
        cluster.cluster.start(origin)
        asyncio.run(known([cluster.agents, origin]))


def test_watch_follows_an_agent_task_step_by_step(cluster: Cluster) -> None:
    submitted = grapevine(cluster.agents, "submit", "--role", "boss", "--no-wait", "a brief")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    watched = grapevine(cluster.agents, "watch", task_id[:10])
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    boss = f"{task_id[:10]} boss: "
    assert any(boss + "model call to " in line and "calls delegate" in line for line in lines)
    delegated = [line for line in lines if boss + "delegated to worker: task " in line]
    assert len(delegated) == 1, lines
    child = delegated[0].split("task ")[-1][:10]
    assert any(f"{child} worker: child task of {task_id[:10]}" in line for line in lines)
    assert any(f"{child} worker: model call to " in line for line in lines)
    assert any(boss + "tool final_answer returned" in line for line in lines)
    assert any(boss + "result accepted: ok" in line for line in lines)
    events = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert events == list(range(len(events))), lines  # one line per event, then the answer
    assert "".join(lines[len(events) :]).strip(), lines

    as_json = grapevine(cluster.agents, "watch", task_id, "--json")
    assert as_json.returncode == 0
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    steps = [e["step"] for e in events if e.get("type") == "task-progress" and e["id"] == task_id]
    assert steps[:3] == ["model-call", "delegation", "tool-call"]
    assert events[-1]["id"] == task_id and events[-1]["state"] == "done"  # the task, last

    # Through a peer that neither runs nor submitted it: the facts, not the steps.
    elsewhere = grapevine(cluster.plain, "watch", task_id, "--json")
    assert elsewhere.returncode == 0
    kinds = {json.loads(line).get("type") for line in elsewhere.stdout.splitlines()}
    assert "task-result" in kinds and "task-progress" not in kinds


def test_watch_at_the_origin_shows_the_steps_of_a_run_elsewhere(cluster: Cluster) -> None:
    # Submitted at the plain peer, the boss task runs at the agents' peer; its steps are told
    # to the origin (protocol.tasks.progress), where its user follows it.
    submitted = grapevine(cluster.plain, "submit", "--role", "boss", "--no-wait", "a brief")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    as_json = grapevine(cluster.plain, "watch", task_id, "--json")
    assert as_json.returncode == 0, as_json.stderr
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    steps = [e for e in events if e.get("type") == "task-progress" and e["id"] == task_id]
    assert [e["step"] for e in steps][:3] == ["model-call", "delegation", "tool-call"], events
    assert steps[0]["detail"]["model"] and steps[0]["epoch"] == 1
    assert [e["seq"] for e in steps] == list(range(1, len(steps) + 1))
    assert events[-1]["id"] == task_id and events[-1]["state"] == "done"  # the task, last
    # The worker's run is the child's, submitted where the boss runs: the boss's runner
    # passes its steps up to the boss's origin (decision 77).
    [child] = {e["id"] for e in events if e.get("type") == "task-child"}
    child_steps = [
        e["step"] for e in events if e.get("type") == "task-progress" and e["id"] == child
    ]
    assert "model-call" in child_steps, events
    human = grapevine(cluster.plain, "watch", task_id[:10])
    assert human.returncode == 0, human.stderr
    boss = f"{task_id[:10]} boss: "
    assert any(boss + "model call to " in line for line in human.stdout.splitlines())
    assert any(f"{child[:10]} worker: model call to " in line for line in human.stdout.splitlines())


def test_watch_refuses_a_bad_id(cluster: Cluster) -> None:
    assert "hex digits" in one_line_error(grapevine(cluster.plain, "watch", "nothex"), 2)
