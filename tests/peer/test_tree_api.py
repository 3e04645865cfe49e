"""`GET /v1/tasks/{id}/tree` (peer/http/tree.py) over a socket, and `tree_json`'s guards.

Two real in-process peers; a parent and two children are submitted through the driver with
`parent=`, as a delegating agent does, and the tree is read from the other peer's API too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.agents.ports import AgentOutput
from peer.client import ApiError, GrapevineClient
from peer.http.app import PeerApi
from peer.http.tree import MAX_TREE_DEPTH, tree_json
from peer.runtime.driver import Driver
from peer.runtime.executor import Outcome, Work, builtin_roles
from protocol.tasks.messages import TaskRecord
from protocol.tasks.state import TaskState
from tests.peer.inprocess import API_HEADERS, API_TOKEN, in_process_peer

KEY = bytes(range(64, 96))
NODE_FIELDS = {
    "id",
    "role",
    "state",
    "created",
    "ended",
    "peer",
    "agent",
    "usage",
    "duplicates",
    "progress",
    "model_calls",
    "model_calls_repeated",
    "model_tokens",
    "repeated_tokens",
    "model_calls_by_run",
    "children",
}


async def writer(work: Work) -> Outcome:
    """An agent-like role: JSON output naming the agent, and token usage."""
    answer = AgentOutput(f"wrote {work.input.decode()}", "writer-1", "offline", 2)
    return Outcome(answer.encode(), usage=(100, 20, 7))


class Env:
    def __init__(self, drivers: list[Driver], clients: list[TestClient[Any, Any]]) -> None:
        self.drivers = drivers
        self.clients = clients

    async def tree(self, task_id: str, at: int = 0) -> Any:
        r = await self.clients[at].get(f"/v1/tasks/{task_id}/tree")
        assert r.status == 200, await r.text()
        return await r.json()


@pytest_asyncio.fixture
async def env(tmp_path: Any) -> AsyncIterator[Env]:
    async with AsyncExitStack() as stack:
        roles = {**builtin_roles(), "writer": writer}
        started = [
            await stack.enter_async_context(in_process_peer(index, KEY, roles=roles))
            for index in (1, 2)
        ]
        a, b = (peer.driver for peer in started)
        assert await b.join([a.node.addr], timeout=5.0) is not None
        deadline = asyncio.get_running_loop().time() + 10
        while len(a.node.capable("echo")) < 2 or len(b.node.capable("echo")) < 2:
            assert asyncio.get_running_loop().time() < deadline, "peer states did not spread"
            await asyncio.sleep(0.05)
        clients: list[TestClient[Any, Any]] = []
        for index, peer in enumerate(started):
            (tmp_path / str(index)).mkdir()
            api = PeerApi(
                peer.driver,
                peer.transport,
                tmp_path / str(index),
                lambda: None,
                token=API_TOKEN,
                keepalive=0.2,
            )
            client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
            await client.start_server()
            stack.push_async_callback(client.close)
            clients.append(client)
        yield Env([a, b], clients)


async def _settled(env: Env, task_id: str, at: int, check: Callable[[Any], bool]) -> Any:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        tree = await env.tree(task_id, at)
        if check(tree):
            return tree
        assert asyncio.get_running_loop().time() < deadline, tree
        await asyncio.sleep(0.05)


def _all_done(tree: Any) -> bool:
    return tree["state"] == "done" and all(_all_done(c) for c in tree["children"])


async def test_tree_of_a_parent_and_two_children(env: Env) -> None:
    a, b = env.drivers
    parent = a.submit("writer", b"the report", nonce=os.urandom(16))
    first = a.submit("writer", b"part one", parent=parent, created=1000.0, nonce=os.urandom(16))
    second = b.submit("echo", b"part two", parent=parent, created=2000.0, nonce=os.urandom(16))
    a.submit("echo", b"unrelated", nonce=os.urandom(16))
    for at in (0, 1):
        tree = await _settled(
            env, parent.hex(), at, lambda t: len(t["children"]) == 2 and _all_done(t)
        )
        assert set(tree) == NODE_FIELDS | {"totals", "truncated"}
        assert tree["id"] == parent.hex() and tree["role"] == "writer"
        assert tree["agent"] == "writer-1" and tree["duplicates"] == 0
        assert tree["usage"] == {
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "cost_microdollars": 7,
        }
        owner = a.node.tasks.tasks[parent].claim
        assert owner is not None and tree["peer"] is not None and len(tree["peer"]) == 52
        one, two = tree["children"]
        assert set(one) == set(two) == NODE_FIELDS
        assert (one["id"], two["id"]) == (first.hex(), second.hex()), "oldest first"
        assert one["agent"] == "writer-1" and one["children"] == []
        # Created from the record; ended when this peer learned the result (its wall clock).
        assert (one["created"], two["created"]) == (1000.0, 2000.0)
        assert all(abs(n["ended"] - time.time()) < 60 for n in (tree, one, two))
        assert two["role"] == "echo" and two["agent"] is None
        assert two["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "cost_microdollars": 0}
        assert tree["totals"] == {
            "tasks": 3,
            "executions": 3,
            "duplicates": 0,
            "prompt_tokens": 200,
            "completion_tokens": 40,
            "cost_microdollars": 14,
            "model_calls": 0,
            "model_calls_repeated": 0,
            "model_tokens": 0,
            "repeated_tokens": 0,
        }
        assert tree["truncated"] is False

    leaf = await env.tree(second.hex()[:10])
    assert leaf["id"] == second.hex() and leaf["children"] == []
    assert leaf["totals"]["tasks"] == 1 and leaf["totals"]["prompt_tokens"] == 0

    async with GrapevineClient(f"127.0.0.1:{env.clients[0].port}", API_TOKEN) as client:
        assert (await client.tree(parent.hex()))["totals"]["tasks"] == 3


async def test_a_finished_tree_read_once_is_not_asked_for_again(env: Env) -> None:
    # A read answers with every object of a task and its children: a dashboard polling a
    # finished tree must not make the network send the whole tree at each look.
    a, b = env.drivers
    parent = a.submit("writer", b"the report", nonce=os.urandom(16))
    for k in range(3):
        a.submit("echo", b"part %d" % k, parent=parent, nonce=os.urandom(16))
    await _settled(env, parent.hex(), 1, lambda t: len(t["children"]) == 3 and _all_done(t))
    asked: list[bytes] = []
    fetch = b.node.fetch

    def counting(now: float, task_ids: list[bytes]) -> Any:
        asked.extend(task_ids)
        return fetch(now, task_ids)

    b.node.fetch = counting  # type: ignore[method-assign]
    first = await env.tree(parent.hex(), 1)  # this look may read what ended during the last
    asked.clear()
    for _ in range(2):
        assert await env.tree(parent.hex(), 1) == first
    assert asked == []
    # An unknown task is still asked for.
    await env.clients[1].get(f"/v1/tasks/{os.urandom(32).hex()}/tree")
    assert len(asked) == 1


async def test_pending_task_has_no_peer_usage_or_agent(env: Env) -> None:
    a, _ = env.drivers
    lonely = a.submit("nobody serves this", b"x", nonce=os.urandom(16))
    tree = await env.tree(lonely.hex())
    assert tree["state"] == "pending" and tree["peer"] is None and tree["ended"] is None
    assert tree["usage"] is None and tree["agent"] is None and tree["children"] == []
    assert tree["totals"]["executions"] == 0


async def test_unknown_or_malformed_id_is_the_same_problem_as_get_task(env: Env) -> None:
    for path in ("ab" * 32, "nothex"):
        tree = await env.clients[0].get(f"/v1/tasks/{path}/tree")
        task = await env.clients[0].get(f"/v1/tasks/{path}")
        assert tree.status == task.status and tree.status in (400, 404)
        assert tree.headers["Content-Type"].startswith("application/problem+json")
        assert await tree.json(content_type=None) == await task.json(content_type=None)
    async with GrapevineClient(f"127.0.0.1:{env.clients[0].port}", API_TOKEN) as client:
        with pytest.raises(ApiError) as raised:
            await client.tree("ab" * 32)
        assert raised.value.status == 404 and "not known" in raised.value.detail


def _state(index: int, parent: int | None) -> TaskState:
    task_id = index.to_bytes(32, "big")
    st = TaskState(task_id, 0.0)
    parent_id = parent.to_bytes(32, "big") if parent is not None else b""
    st.record = TaskRecord(
        b"k", float(index), "r", b"", 0, parent_id, "", b"n", 0.0, "", b"", task_id, b"o" * 32
    )
    return st


def test_tree_json_guards_against_cycles() -> None:
    # A forged parent chain: 1 -> 2 -> 3 -> 1, and 2 lists itself.
    states = {i: _state(i, None) for i in (1, 2, 3)}
    links = {1: [2], 2: [3, 2], 3: [1]}
    tree = tree_json(states[1], lambda tid: [states[c] for c in links[int.from_bytes(tid)]])
    ids: list[str] = []

    def walk(node: Any) -> None:
        ids.append(node["id"])
        for child in node["children"]:
            walk(child)

    walk(tree)
    assert ids == [states[i].task_id.hex() for i in (1, 2, 3)]
    assert tree["totals"]["tasks"] == 3 and tree["truncated"] is False


def test_tree_json_stops_at_the_depth_cap() -> None:
    chain = {i: _state(i, i - 1 if i else None) for i in range(MAX_TREE_DEPTH + 10)}

    def children(task_id: bytes) -> list[TaskState]:
        nxt = int.from_bytes(task_id) + 1
        return [chain[nxt]] if nxt in chain else []

    tree = tree_json(chain[0], children)
    depth, node = 0, tree
    while node["children"]:
        depth, node = depth + 1, node["children"][0]
    assert depth == MAX_TREE_DEPTH and tree["truncated"] is True
    assert tree["totals"]["tasks"] == MAX_TREE_DEPTH + 1
