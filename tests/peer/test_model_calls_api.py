"""Model calls logged as checkpoints, read over a socket: the tree's and the stats' counts.

Two real in-process peers serve an agent role (the offline model, four tool rounds and an
answer: five model calls); the task's checkpoints are recorded through the real
`Driver.checkpoint`, replicated to the other peer, and both APIs count the same calls.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.agents.checkpoints import decode
from peer.agents.llm import ModelClient
from peer.agents.model_settings import LlmSettings
from peer.agents.offline import OFFLINE_MODEL
from peer.agents.peer_port import DriverTaskPort
from peer.agents.runtime import AgentRuntime
from peer.agents.spec import AgentSpec, TreeLimits
from peer.agents.tools import Toolbox
from peer.http.app import PeerApi
from peer.runtime.driver import Driver
from peer.runtime.executor import Outcome, Work, builtin_roles
from tests.peer.inprocess import API_HEADERS, API_TOKEN, in_process_peer

KEY = bytes(range(96, 128))
TOOLS = ("tests.peer.agents.test_offline_rounds:work_round", "final_answer")
SPEC = AgentSpec(
    "rounds",
    ("rounds",),
    model=OFFLINE_MODEL,
    system="You work in rounds.\nRepeat: work_round 4",
    tools=TOOLS,
)


class Env:
    def __init__(self, drivers: list[Driver], clients: list[TestClient[Any, Any]]) -> None:
        self.drivers = drivers
        self.clients = clients

    async def get(self, path: str, at: int) -> Any:
        r = await self.clients[at].get(path)
        assert r.status == 200, await r.text()
        return await r.json()


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    drivers: list[Driver] = []
    client = ModelClient(LlmSettings(offline_via_litellm=False))

    def agent_on(index: int) -> Any:
        async def run(work: Work) -> Outcome:
            driver = drivers[index]
            runtime = AgentRuntime(
                SPEC,
                client,
                DriverTaskPort(driver),
                Toolbox.load(TOOLS),
                TreeLimits(),
                tmp_path / "ws",
                checkpoints=driver,
            )
            return await runtime.run(work)

        return run

    async with AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(
                in_process_peer(index, KEY, roles={**builtin_roles(), "rounds": agent_on(index)})
            )
            for index in (0, 1)
        ]
        drivers.extend(peer.driver for peer in started)
        a, b = drivers
        assert await b.join([a.node.addr], timeout=5.0) is not None
        deadline = asyncio.get_running_loop().time() + 10
        while len(a.node.capable("rounds")) < 2 or len(b.node.capable("rounds")) < 2:
            assert asyncio.get_running_loop().time() < deadline, "peer states did not spread"
            await asyncio.sleep(0.05)
        clients: list[TestClient[Any, Any]] = []
        for index, peer in enumerate(started):
            (tmp_path / str(index)).mkdir()
            api = PeerApi(
                peer.driver, peer.transport, tmp_path / str(index), lambda: None, token=API_TOKEN
            )
            test_client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
            await test_client.start_server()
            stack.push_async_callback(test_client.close)
            clients.append(test_client)
        yield Env(drivers, clients)


async def test_tree_and_stats_count_the_model_calls_of_a_run(env: Env) -> None:
    a, b = env.drivers
    task = a.submit("rounds", b"Plan the garden", nonce=os.urandom(16))
    deadline = asyncio.get_running_loop().time() + 10
    trees: list[Any] = []
    while True:
        trees = [await env.get(f"/v1/tasks/{task.hex()}/tree", at) for at in (0, 1)]
        if all(t["state"] == "done" and t["model_calls"] == 5 for t in trees):
            break
        assert asyncio.get_running_loop().time() < deadline, trees
        await asyncio.sleep(0.05)

    owner = trees[0]["peer"]
    for tree in trees:
        assert tree["model_calls_repeated"] == 0 and tree["repeated_tokens"] == 0
        assert tree["model_tokens"] > 0
        usage = tree["usage"]
        assert tree["model_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        [run] = tree["model_calls_by_run"]
        assert run == {
            "epoch": 1,
            "owner": owner,
            "model_calls": 5,
            "model_calls_repeated": 0,
            "model_calls_resumed": 0,
            "model_tokens": tree["model_tokens"],
            "repeated_tokens": 0,
        }
        totals = tree["totals"]
        assert (totals["model_calls"], totals["model_calls_repeated"]) == (5, 0)
        assert totals["model_tokens"] == tree["model_tokens"]
    for at in (0, 1):
        stats = (await env.get("/v1/tasks/stats", at))["totals"]
        assert stats["model_calls"] == 5 and stats["model_calls_repeated"] == 0
        assert stats["model_tokens"] == trees[0]["model_tokens"] and stats["repeated_tokens"] == 0
    kinds = [decode(c.data)["k"] for c in b.checkpoints(task)]  # type: ignore[index]
    assert kinds == ["call", "reply", "tool"] * 5, "every step, in order, replicated"
