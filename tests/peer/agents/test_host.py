"""The agent host (peer/agents/host.py) on real in-process peers with the offline model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from peer.agents.demand import DEMAND_EVENT, HEADER_BYTES, seal_demand
from peer.agents.host import AgentHost
from peer.agents.llm import LlmSettings, ModelClient
from peer.agents.peer_port import DriverTaskPort
from peer.agents.ports import AgentInput, AgentOutput, Budget
from peer.agents.runtime import SPAWN_ROLE
from peer.agents.spawning import SpawnRequest
from peer.agents.spec import AgentSpec, PoolSettings, TreeLimits
from peer.runtime.driver import Driver
from peer.runtime.executor import Executor, Work
from peer.runtime.transport import Transport
from protocol.effects import EventReceived
from protocol.identity import Signer
from protocol.tasks.messages import Result
from tests.peer.inprocess import in_process_peer

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
OFFLINE = LlmSettings(offline_via_litellm=False)
BOSS = AgentSpec(
    "boss",
    ("boss",),
    system="You lead.\nDelegate to: worker\nParts: 2",
    tools=("delegate", "final_answer"),
)
WORKER = AgentSpec("worker", ("worker",), system="You write one section.")
SPAWNER = AgentSpec(
    "spawner",
    ("spawner",),
    system="Spawn: helper",
    tools=("spawn_agent", "final_answer"),
)


class Peer:
    def __init__(
        self, driver: Driver, transport: Transport, executor: Executor, host: AgentHost
    ) -> None:
        self.driver = driver
        self.transport = transport
        self.executor = executor
        self.host = host


Factory = Callable[..., Any]


@pytest_asyncio.fixture
async def peers(tmp_path: Path) -> AsyncIterator[Factory]:
    started: list[Peer] = []
    stack = AsyncExitStack()

    async def make(
        specs: tuple[AgentSpec, ...],
        pool: PoolSettings | None = None,
        clock: Callable[[], float] | None = None,
        network_rpm: float = 0.0,
    ) -> Peer:
        index = len(started) + 1
        # Seed-only: the roles are the agent host's to declare (`AgentHost.start`).
        built = await stack.enter_async_context(in_process_peer(index, KEY, seed_only=True))
        driver = built.driver
        client = ModelClient(OFFLINE, clock=asyncio.get_running_loop().time)
        host = AgentHost(
            driver,
            specs,
            client,
            DriverTaskPort(driver),
            signer=Signer(built.store.load_or_create_identity(), driver.node.config.network_id),
            limits=TreeLimits(),
            pool_settings=pool or PoolSettings(),
            workspace=tmp_path / f"workspace-{index}",
            network_rpm=network_rpm,
            clock=clock,
        )
        stack.push_async_callback(host.close)  # before the executor closes
        host.start()
        peer = Peer(driver, built.transport, built.executor, host)
        started.append(peer)
        if index == 1:
            driver.join_now([driver.node.addr])
        else:
            assert await driver.join([started[0].driver.node.addr], 5.0) is not None
        return peer

    async with stack:
        yield make


async def _until(check: Callable[[], object], limit: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the limit"
        await asyncio.sleep(0.02)


async def _result(driver: Driver, task_id: bytes, limit: float = 20.0) -> Result:
    result = await driver.wait_result(task_id, limit)
    assert result is not None, "no result within the limit"
    return result


async def test_boss_delegates_to_worker_on_one_peer(peers: Factory) -> None:
    peer = await peers((BOSS, WORKER))
    request = AgentInput("Write a short note on city parks").encode()
    root = peer.driver.submit("boss", request, idempotency_key="root")
    result = await _result(peer.driver, root)
    assert result.outcome == "ok", result.output
    output = AgentOutput.decode(result.output)
    assert output is not None and output.agent == "boss"
    children = peer.driver.children_of(root)
    assert len(children) == 2
    for child in children:
        assert child.accepted is not None and child.accepted.outcome == "ok"
        child_output = AgentOutput.decode(child.accepted.output)
        assert child_output is not None and child_output.agent == "worker"
    assert "combined from 2 delegated sections" in output.answer
    assert result.usage[0] > 0, "the offline model's token estimate is reported"
    status = peer.host.status()
    assert {a["name"]: a["running"] for a in status["agents"]} == {"boss": 0, "worker": 0}
    json.dumps(status)


async def test_boss_delegates_to_worker_on_another_peer(peers: Factory) -> None:
    boss_peer = await peers((BOSS,))
    worker_peer = await peers((WORKER,))
    await _until(lambda: boss_peer.driver.node.capable("worker"))
    assert boss_peer.driver.node.node_id not in boss_peer.driver.node.capable("worker")
    request = AgentInput("Draft a brief on bicycle lanes").encode()
    root = boss_peer.driver.submit("boss", request, idempotency_key="remote")
    result = await _result(boss_peer.driver, root)
    assert result.outcome == "ok", result.output
    children = boss_peer.driver.children_of(root)
    assert len(children) == 2
    worker_id = worker_peer.driver.node.node_id
    assert all(c.accepted is not None and c.accepted.owner == worker_id for c in children)
    assert result.owner == boss_peer.driver.node.node_id


async def test_a_role_with_no_agents_is_not_advertised(peers: Factory) -> None:
    peer = await peers((BOSS,), PoolSettings(max_spawned=0))
    state = peer.driver.node.peer_states()[peer.driver.node.node_id]
    assert state.roles == ("boss", "echo", "sleep")
    assert not peer.driver.node.capable("worker")
    assert not peer.driver.node.capable(SPAWN_ROLE)
    assert peer.host.max_running == 4 + 1 and state.free_slots == 5
    # Without anyone serving "worker", the boss's delegation is refused, not left waiting.
    root = peer.driver.submit("boss", b"Write about rivers", idempotency_key="lonely")
    result = await _result(peer.driver, root)
    assert result.outcome == "ok"
    assert peer.driver.children_of(root) == []


async def test_spawn_agent_places_exactly_one_agent(peers: Factory) -> None:
    first = await peers((SPAWNER,))
    second = await peers((WORKER,))
    await _until(lambda: len(first.driver.node.capable(SPAWN_ROLE)) == 2)
    root = first.driver.submit("spawner", b"Get me a helper", idempotency_key="spawn")
    result = await _result(first.driver, root)
    assert result.outcome == "ok", result.output
    (spawn_task,) = first.driver.children_of(root)
    assert spawn_task.record is not None and spawn_task.record.role == SPAWN_ROLE
    assert spawn_task.accepted is not None and spawn_task.accepted.outcome == "ok"
    placed = json.loads(spawn_task.accepted.output)
    assert placed["role"] == "helper" and placed["agent"] == "helper-spawned-1"
    hosts = [first.host, second.host]
    assert sum(h.spawned for h in hosts) == 1
    (where,) = [h for h in hosts if h.spawned]
    assert placed["peer"] == where.me
    assert "helper" in where.roles
    assert where.max_running == 4 + 1 + 1
    # The new role is advertised, and served.
    await _until(lambda: len(first.driver.node.capable("helper")) == 1)
    task = first.driver.submit("helper", b"Say hello", idempotency_key="hello")
    answer = await _result(first.driver, task)
    output = AgentOutput.decode(answer.output)
    assert answer.outcome == "ok" and output is not None and output.agent == "helper-spawned-1"


async def test_bad_spawn_input_fails_the_task_clearly(peers: Factory) -> None:
    peer = await peers((WORKER,))
    cases = {
        b"not json": "JSON object",
        b'{"role": "echo", "system": "", "model": "grapevine/offline"}': "reserved",
        b'{"role": "x", "system": "", "model": ""}': "model",
        b'{"role": "x", "model": "m", "tools": ["rm_rf"]}': "not built-in tools",
        b'{"role": "x", "model": "m", "colour": 1}': "unknown field",
    }
    for i, (data, words) in enumerate(cases.items()):
        task = peer.driver.submit(SPAWN_ROLE, data, idempotency_key=f"bad-{i}")
        result = await _result(peer.driver, task)
        assert result.outcome == "failed" and words.encode() in result.output, result.output
    assert peer.host.spawned == 0


async def test_spawned_agents_fill_the_pool_then_spawn_is_withdrawn(peers: Factory) -> None:
    peer = await peers((WORKER,), PoolSettings(max_spawned=1))
    data = json.dumps({"role": "helper", "system": "", "model": "grapevine/offline"}).encode()
    first = await _result(peer.driver, peer.driver.submit(SPAWN_ROLE, data, nonce=b"1" * 16))
    assert first.outcome == "ok"
    assert SPAWN_ROLE not in peer.host.roles
    assert SPAWN_ROLE not in peer.driver.node.peer_states()[peer.driver.node.node_id].roles
    # A spawn task started anyway (claimed before the withdrawal) fails saying why.
    with pytest.raises(RuntimeError, match="no room"):
        await peer.executor.handlers[SPAWN_ROLE](Work(b"s" * 32, 1, SPAWN_ROLE, data))
    assert peer.host.spawned == 1


async def test_idle_spawned_agent_retires_and_its_role_is_withdrawn(peers: Factory) -> None:
    now = [1000.0]
    peer = await peers((WORKER,), PoolSettings(idle_retire=60.0), clock=lambda: now[0])
    spec = AgentSpec("helper-spawned-1", ("helper",))
    peer.host.add(spec, spawned=True)
    assert "helper" in peer.driver.node.peer_states()[peer.driver.node.node_id].roles
    now[0] += 59.0
    assert peer.host.check_pool().retire == ()
    now[0] += 1.0
    assert peer.host.check_pool().retire == ("helper-spawned-1",)
    assert "helper" not in peer.host.roles and "helper" not in peer.executor.handlers
    assert "helper" not in peer.driver.node.peer_states()[peer.driver.node.node_id].roles
    assert [a["name"] for a in peer.host.status()["agents"]] == ["worker"]


async def test_pool_grows_a_spawned_role_whose_tasks_wait(peers: Factory) -> None:
    peer = await peers((WORKER,), PoolSettings(grow_after=0.2, idle_retire=60.0))
    peer.host.add(AgentSpec("slow-spawned-1", ("slow",)), spawned=True)
    # Hold the only "slow" agent's slot, as a long execution would.
    agent = peer.host.roster.agents["slow-spawned-1"]
    agent.slots.start(b"busy" * 8, None)
    waiting = peer.driver.submit("slow", b"Write about moss", idempotency_key="moss")
    await asyncio.sleep(0.4)
    plan = peer.host.check_pool()
    assert plan.grow == ("slow-spawned-1",)
    names = [a["name"] for a in peer.host.status()["agents"]]
    assert names == ["worker", "slow-spawned-1", "slow-spawned-2"]
    result = await _result(peer.driver, waiting)
    output = AgentOutput.decode(result.output)
    assert output is not None and output.agent == "slow-spawned-2"
    agent.slots.clear()


async def test_llm_demand_is_gossiped_and_shares_the_network_limit(peers: Factory) -> None:
    busy = await peers((WORKER,), network_rpm=60.0)
    quiet = await peers((BOSS,), network_rpm=60.0)
    seen = quiet.driver.hub.subscribe()
    await _result(busy.driver, busy.driver.submit("worker", b"hi", idempotency_key="d1"))
    busy.host.broadcast_demand()

    async def demand_event() -> bytes:
        while True:
            item = await seen.get()
            assert item is not None
            note = item.note
            if (
                isinstance(note, EventReceived)
                and note.name == DEMAND_EVENT
                and note.origin == busy.driver.node.node_id
                and note.payload[HEADER_BYTES:] != b"{}"
            ):
                return note.payload

    payload = await asyncio.wait_for(demand_event(), 10.0)
    assert json.loads(payload[HEADER_BYTES:])["grapevine/offline"] > 0
    mine = busy.host.share_of("grapevine/offline")
    theirs = quiet.host.share_of("grapevine/offline")
    assert theirs == 60.0 / 4, "a peer with no demand gets the floor: limit / (2 × peers)"
    assert mine is not None and 0 < mine <= 60.0
    assert quiet.host.share_of("grapevine/offline") is not None
    assert busy.host.status()["network_rpm"] == 60.0


async def test_spawn_request_defaults() -> None:
    request = SpawnRequest.decode(b'{"role": "r", "system": "s", "model": "m"}')
    assert request == SpawnRequest("r", "s", "m", ("final_answer",))
    request = SpawnRequest.decode(b'{"role": "r", "model": "m", "tools": ["delegate"]}')
    assert request.tools == ("delegate", "final_answer")


async def test_a_spawn_outside_the_allow_lists_is_refused(peers: Factory) -> None:
    peer = await peers((WORKER,), PoolSettings(tools=("read_file",)))
    roles = peer.host.roles
    cases = {
        "openai/gpt-4o": (b"model 'openai/gpt-4o' is not allowed on this peer", None),
        "grapevine/offline": (b"tool(s) 'write_file' not allowed on this peer", ["write_file"]),
    }
    for i, (model, (words, tools)) in enumerate(cases.items()):
        body: dict[str, Any] = {"role": "helper", "system": "", "model": model}
        if tools is not None:
            body["tools"] = tools
        task = peer.driver.submit(SPAWN_ROLE, json.dumps(body).encode(), nonce=bytes([i]) * 16)
        result = await _result(peer.driver, task)
        assert result.outcome == "failed" and words in result.output, result.output
    assert peer.host.spawned == 0 and peer.host.roles == roles
    assert "helper" not in peer.executor.handlers
    allowed = {"role": "helper", "system": "", "model": "grapevine/offline", "tools": ["read_file"]}
    task = peer.driver.submit(SPAWN_ROLE, json.dumps(allowed).encode(), nonce=b"o" * 16)
    assert (await _result(peer.driver, task)).outcome == "ok"
    assert peer.host.spawned == 1


async def test_a_task_asking_more_than_the_operators_budget_gets_the_cap(
    peers: Factory,
) -> None:
    capped_boss = replace(BOSS, budget=Budget(tokens=10_000))
    peer = await peers((capped_boss, WORKER))
    request = AgentInput("Write a short note on city parks", Budget(tokens=10**12)).encode()
    root = peer.driver.submit("boss", request, idempotency_key="greedy")
    result = await _result(peer.driver, root)
    assert result.outcome == "ok", result.output
    children = peer.driver.children_of(root)
    assert len(children) == 2
    for child in children:
        assert child.record is not None
        given = AgentInput.decode(child.record.input).budget
        assert 0 < given.tokens <= 10_000 * 3 // 4 // 2


async def test_unsigned_and_forged_demand_events_change_no_share(peers: Factory) -> None:
    honest = await peers((WORKER,), network_rpm=60.0)
    attacker = await peers((BOSS,), network_rpm=60.0)
    await _until(lambda: honest.driver.node.member(attacker.driver.node.node_id) is not None)
    board = honest.host.demand
    assert board is not None
    # The attacker's genuine (signed) demand counts: with nobody wanting anything, two peers
    # split the limit.
    await _until(lambda: honest.host.share_of("grapevine/offline") == 60.0 / 2)
    before = honest.host.share_of("grapevine/offline")
    # The attacker's own events, unsigned (the old format) and signed by another key.
    outsider = Signer(b"o" * 32, attacker.driver.node.config.network_id)
    attacker.driver.broadcast(DEMAND_EVENT, json.dumps({"grapevine/offline": 1e12}).encode())
    attacker.driver.broadcast(
        DEMAND_EVENT, seal_demand(outsider, 9, 9, {"grapevine/offline": 1e12})
    )
    await _until(lambda: board.dropped["malformed"] >= 1 and board.dropped["bad-signature"] >= 1)
    # An event claiming to come from a third member the attacker is not.
    victim = Signer(b"v" * 32, attacker.driver.node.config.network_id)
    forged = seal_demand(victim, 1, 1, {"grapevine/offline": 1e12})
    honest.host.observe_demand(attacker.driver.node.node_id, forged)
    honest.host.observe_demand(victim.node_id, forged)
    assert board.dropped["bad-signature"] >= 2 and board.dropped["unknown-origin"] == 1
    assert honest.host.share_of("grapevine/offline") == before
    assert honest.host.status()["demand_dropped"] == dict(board.dropped)
