"""`grapevine status` (peer/cli/status.py) run as a user runs it: a subprocess, against an
in-process peer serving its API on a real socket, after agents on two peers ran a delegation
tree (the offline model): members, roles, free slots, tasks by state and model spend."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from peer.agents.ports import AgentInput
from peer.agents.spec import AgentSpec
from peer.build import Peer, build_peer
from peer.cli.status import RUN_NAMES, render_status, summarize
from peer.http.app import PeerApi
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings
from protocol.identity import short_id
from protocol.wire import RUN_COUNTS
from scripts.local_cluster import child_env, grapevine_command
from tests.peer.inprocess import API_TOKEN, MemoryStore

KEY = bytes(range(192, 224))
LEAD = AgentSpec(
    "lead", ("report",), system="Delegate to: section\nParts: 2", tools=("delegate", "final_answer")
)
WRITER = AgentSpec("writer", ("section",))


@asynccontextmanager
async def agent_peer(*agents: AgentSpec) -> AsyncIterator[Peer]:
    with tempfile.TemporaryDirectory() as scratch:
        settings = AgentSettings(
            bind="127.0.0.1:0", data_dir=Path(scratch), profile="local", agents=agents
        )
        async with build_peer(settings, keyring=Keyring(KEY), store=MemoryStore()) as peer:
            yield peer


async def grapevine(api: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *grapevine_command(),
        *args,
        "--api",
        api,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**child_env(), "GRAPEVINE_API_TOKEN": API_TOKEN},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_status_shows_the_fleet_tasks_agents_and_spend(tmp_path: Path) -> None:
    async with agent_peer(LEAD) as a, agent_peer(WRITER) as b:
        assert a.host is not None
        assert await b.driver.join([a.node.addr], timeout=5.0) is not None
        deadline = time.monotonic() + 20
        while not a.node.capable("section"):
            assert time.monotonic() < deadline, "the writer's role never reached the lead"
            await asyncio.sleep(0.02)
        root = a.driver.submit("report", AgentInput("Parks").encode(), nonce=os.urandom(16))
        result = await a.driver.wait_result(root, timeout=30)
        assert result is not None and result.outcome == "ok"
        # Each peer's agents reach the other in its peer state (decision 47).
        states = a.node.peer_states()
        while (s := states.get(b.node.node_id)) is None or s.agents != 1:
            assert time.monotonic() < deadline, "the writer's usage never reached the lead"
            await asyncio.sleep(0.05)
            states = a.node.peer_states()
        api = PeerApi(
            a.driver, a.transport, tmp_path, lambda: None, token=API_TOKEN, agents=a.host.status
        )
        await api.start("127.0.0.1", 0)
        try:
            # A live network's figures move (free slots, usage gossip): the human view is
            # compared with JSON read before and after it that agree with each other.
            for _ in range(5):
                code, before, err = await grapevine(api.address, "status", "--json")
                assert code == 0, err
                code, human, err = await grapevine(api.address, "status")
                assert code == 0, err
                code, raw, err = await grapevine(api.address, "status", "--json")
                assert code == 0, err
                if _stable(json.loads(before)) == _stable(json.loads(raw)):
                    break
        finally:
            await api.stop()
        ids = [short_id(a.node.node_id), short_id(b.node.node_id)]

    shown: dict[str, Any] = json.loads(raw)
    assert set(shown) == {"members", "tasks", "agents", "summary"}
    summary = shown["summary"]
    assert summary == summarize(shown["members"], shown["tasks"], shown["agents"])
    assert summary["members"] == {"alive": 2, "suspect": 0, "dead": 0, "left": 0}
    assert {"report", "section"} <= set(summary["roles"])
    alive_slots = sum(m["free_slots"] for m in shown["members"] if m["status"] == "alive")
    assert summary["free_slots"] == alive_slots > 0
    assert [m["agents"] for m in shown["members"]] == [1, 1] and summary["agents"] == 2
    assert summary["spend_micro"] == 0  # the offline model costs nothing
    assert summary["tasks"]["done"] == shown["tasks"]["totals"]["done"] >= 3  # root, 2 children
    assert summary["tasks"]["pending"] == summary["tasks"]["running"] == 0
    model = shown["agents"]["model"]["grapevine/offline"]
    assert summary["spend"]["calls"] == model["calls"] >= 2  # the plan, then the answer
    assert summary["spend"]["prompt_tokens"] == model["prompt_tokens"] > 0
    assert summary["spend"]["cost_micro"] == 0

    # The human view: the same figures, as a person reads them.
    assert human.strip() == render_status(shown["members"], shown["tasks"], shown["agents"])
    lines = human.splitlines()
    assert lines[0].startswith(
        f"fleet: 2 members (2 alive); {alive_slots} free slots, 2 agents and $0.000000 of model "
        "spend on alive members; roles served: "
    )
    # Runs across the network: each member's own counts (decision 64), summed.
    runs = summary["runs"]
    assert runs == {key: sum(m["runs"][key] for m in shown["members"]) for key in RUN_NAMES}
    assert RUN_NAMES == RUN_COUNTS  # the CLI's copy of the protocol's names
    assert lines[1] == "runs across the network (as members last advertised them): " + ", ".join(
        f"{runs[key]} {key}" for key in RUN_NAMES
    )
    header = ["MEMBER", "ADDRESS", "STATUS", "ROLES", "FREE", "QUEUE", "LOAD", "AGENTS", "SPEND"]
    assert lines[2].split() == header
    assert lines[3].startswith(f"{ids[0]} (self)") and " alive " in lines[3]
    assert lines[4].startswith(ids[1]) and "section" in lines[4]
    done = summary["tasks"]["done"]
    assert f"tasks held here: {shown['tasks']['totals']['tasks']} (pending 0, running 0, " in human
    assert f"done {done}, failed 0, cancelled 0)" in human
    calls = shown["tasks"]["totals"]["model_calls"]
    assert calls > 0 and f"model calls of them: {calls} made, 0 repeated after" in human
    assert "agents here: 1; roles served here: " in human
    assert any(line.split()[:3] == ["lead", "report", "grapevine/offline"] for line in lines)
    tokens = model["prompt_tokens"] + model["completion_tokens"]
    assert f"model spend here: $0.000000, {tokens} tokens (" in human
    assert f" in {model['calls']} calls" in human


def _stable(shown: dict[str, Any]) -> str:
    """What the human view shows of a `status --json` answer (it leaves out what moves while
    nothing happens: members' last contact, agents' idle time)."""
    return render_status(shown["members"], shown["tasks"], shown["agents"])


def test_status_of_an_unreachable_peer_is_one_line() -> None:
    done = subprocess.run(
        [*grapevine_command(), "status", "--api", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert "cannot reach the peer API" in done.stderr


def test_a_peer_without_agents_and_missing_fields_render_without_errors() -> None:
    members = [{"id": "ab" * 32, "self": True, "status": "alive", "roles": ["echo"]}]
    text = render_status(members, {}, {"agents": [], "roles": ["echo"]})
    assert text.splitlines()[0] == (
        "fleet: 1 members (1 alive); 0 free slots, 0 agents and $0.000000 of model spend on "
        "alive members; roles served: echo"
    )
    assert "tasks held here: - (pending 0, running 0, done 0, failed 0, cancelled 0)" in text
    assert "agents here: none; roles served here: echo" in text
    assert text.endswith(
        "model spend here: $0.000000, 0 tokens (0 prompt, 0 completion) in 0 calls"
    )


def test_the_network_spend_sums_what_alive_members_advertise() -> None:
    def member(n: int, status: str, agents: int, spend: int) -> dict[str, Any]:
        return {"id": f"{n:02d}" * 32, "status": status, "agents": agents, "spend_micro": spend}

    members = [
        member(1, "alive", 2, 1_500_000),
        member(2, "alive", 3, 250),
        member(3, "dead", 9, 7),
    ]
    summary = summarize(members, {}, {"agents": []})
    assert (summary["agents"], summary["spend_micro"]) == (5, 1_500_250)
    text = render_status(members, {}, {"agents": []})
    assert "5 agents and $1.500250 of model spend on alive members" in text.splitlines()[0]
    assert "$0.000250" in text and "$0.000007" in text  # each member's own, the dead one's too


def test_status_names_every_alive_members_tripped_breakers() -> None:
    # Breakers ride the members' peer states (decision 54): the overview lists the ones not
    # closed under the fleet table, and leaves out dead members' and closed ones.
    def member(short: str, status: str, models: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": short * 5, "short_id": short, "status": status, "models": models}

    members = [
        member("aaaa", "alive", [{"model": "m1", "spend_micro": 5, "breaker": "open"}]),
        member("bbbb", "alive", [{"model": "m2", "spend_micro": 1, "breaker": "closed"}]),
        member("cccc", "dead", [{"model": "m3", "spend_micro": 0, "breaker": "open"}]),
        member("dddd", "alive", [{"model": "m4", "spend_micro": 0, "breaker": "half_open"}]),
    ]
    summary = summarize(members, {}, {})
    assert summary["breakers"] == [
        {"member": "aaaa", "model": "m1", "breaker": "open"},
        {"member": "dddd", "model": "m4", "breaker": "half_open"},
    ]
    fleet = render_status(members, {}, {}).split("\n\n")[0].splitlines()
    at = fleet.index("breaker open: m1 at aaaa")
    assert fleet[at + 1] == "breaker half open: m4 at dddd"


def test_status_sums_each_models_tokens_and_waits_over_the_alive_members() -> None:
    # Decision 59: the members' peer states name each model's tokens and rate-limit waits.
    def member(short: str, status: str, models: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": short * 5, "short_id": short, "status": status, "models": models}

    def use(model: str, tokens: int, waits: int, waiting: int) -> dict[str, Any]:
        return {
            "model": model,
            "spend_micro": 10,
            "breaker": "closed",
            "tokens": tokens,
            "waits": waits,
            "waiting": waiting,
        }

    members = [
        member("aaaa", "alive", [use("m1", 100, 2, 1), use("m2", 5, 0, 0)]),
        member("bbbb", "alive", [use("m1", 50, 1, 0)]),
        member("cccc", "dead", [use("m1", 1_000, 9, 9)]),  # a dead member's are left out
        member("dddd", "alive", [{"model": "m2", "spend_micro": 1, "breaker": "closed"}]),
    ]
    summary = summarize(members, {}, {})
    assert summary["models"] == {
        "m1": {"peers": 2, "tokens": 150, "spend_micro": 20, "waits": 3, "waiting": 1},
        "m2": {"peers": 2, "tokens": 5, "spend_micro": 11, "waits": 0, "waiting": 0},
    }
    fleet = render_status(members, {}, {}).split("\n\n")[0].splitlines()
    at = fleet.index("models across the network (as alive members advertise them):")
    assert fleet[at + 1].split() == ["MODEL", "PEERS", "TOKENS", "SPEND", "WAITS", "WAITING"]
    assert fleet[at + 2].split() == ["m1", "2", "150", "$0.000020", "3", "1"]
