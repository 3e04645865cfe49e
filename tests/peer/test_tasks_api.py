"""The task endpoints (peer/http/) on two real in-process peers over loopback.

Peer A serves the API under test; peer B joins it, so submissions are replicated and either
peer may run the work. Both run the built-in roles on real executors.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.http.app import PeerApi
from peer.runtime.driver import Driver
from peer.runtime.transport import Transport
from tests.peer.inprocess import API_HEADERS, API_TOKEN, JSON_BODY, in_process_peer

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
TASK_FIELDS = {
    "id",
    "role",
    "state",
    "owner",
    "epoch",
    "priority",
    "parent",
    "created",
    "idempotency_key",
    "timeout",
    "origin",
    "input",
    "result",
    "executions",
    "duplicates",
    "cancel",
}


class Env:
    def __init__(
        self,
        client: TestClient[Any, Any],
        api: PeerApi,
        drivers: list[Driver],
        transports: list[Transport],
    ) -> None:
        self.client = client
        self.api = api
        self.drivers = drivers
        self.transports = transports

    async def post(self, body: Any) -> Any:
        return await self.client.post("/v1/tasks", json=body)

    async def submit(self, **body: Any) -> str:
        r = await self.post(body)
        assert r.status == 202, await r.text()
        answer = await r.json()
        assert set(answer) == {"id"}
        return str(answer["id"])

    async def task(self, task_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/tasks/{task_id}")
        assert r.status == 200, await r.text()
        task: dict[str, Any] = await r.json()
        return task

    async def until_state(self, task_id: str, *states: str, limit: float = 10.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + limit
        while True:
            task = await self.task(task_id)
            if task["state"] in states:
                return task
            assert asyncio.get_running_loop().time() < deadline, task
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def env(tmp_path: Any) -> AsyncIterator[Env]:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(in_process_peer(1, KEY))
        second = await stack.enter_async_context(in_process_peer(2, KEY))
        a, b = first.driver, second.driver
        assert await b.join([a.node.addr], timeout=5.0) is not None
        deadline = asyncio.get_running_loop().time() + 10
        while len(a.node.capable("echo")) < 2 or len(b.node.capable("echo")) < 2:
            assert asyncio.get_running_loop().time() < deadline, "peer states did not spread"
            await asyncio.sleep(0.05)
        api = PeerApi(a, first.transport, tmp_path, lambda: None, token=API_TOKEN, keepalive=0.2)
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        stack.push_async_callback(client.close)
        yield Env(client, api, [a, b], [first.transport, second.transport])


async def _problem(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = await response.json(content_type=None)
    for word in words:
        assert word in body["detail"], body
    return body


async def test_submit_runs_once_and_both_peers_agree(env: Env) -> None:
    task_id = await env.submit(role="echo", input="hello ✓", priority=3)
    assert len(task_id) == 64
    task = await env.until_state(task_id, "done")
    assert set(task) == TASK_FIELDS
    assert task["role"] == "echo" and task["priority"] == 3 and task["input"] == "hello ✓"
    result = task["result"]
    assert result["outcome"] == "ok" and result["output"] == "hello ✓"
    assert result["owner"] == task["owner"] and result["epoch"] == task["epoch"] == 1
    assert result["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "cost_microdollars": 0}
    assert task["duplicates"] == 0
    assert [(e["phase"], e["outcome"]) for e in task["executions"]] == [
        ("start", None),
        ("end", "ok"),
    ]
    other = env.drivers[1].node.tasks.tasks[bytes.fromhex(task_id)]
    deadline = asyncio.get_running_loop().time() + 5
    while other.accepted is None or not other.runs():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert other.accepted.owner == env.drivers[0].node.tasks.tasks[other.task_id].accepted.owner  # type: ignore[union-attr]

    listed = (await (await env.client.get("/v1/tasks?state=done&role=echo")).json())["tasks"]
    assert [t["id"] for t in listed] == [task_id]
    assert (await (await env.client.get("/v1/tasks?state=running")).json())["tasks"] == []
    prefix = await env.task(task_id[:8])
    assert prefix["id"] == task_id
    stats = await (await env.client.get("/v1/tasks/stats")).json()
    totals = stats["totals"]
    assert totals["tasks"] == totals["done"] == totals["executions"] == 1
    assert totals["duplicates"] == totals["takeovers"] == totals["fenced"] == totals["flips"] == 0
    assert totals["signatures_verified"] >= 0


async def test_bad_input_is_refused_naming_the_field_and_creates_nothing(env: Env) -> None:
    cases: list[tuple[Any, str]] = [
        ({"input": "x"}, "role"),
        ({"role": "echo"}, "input"),
        ({"role": "", "input": "x"}, "role"),
        ({"role": "r" * 129, "input": "x"}, "role"),
        ({"role": "echo", "input": 5}, "input"),
        ({"role": "echo", "input": "x" * (64 * 1024 + 1)}, "input"),
        ({"role": "echo", "input": "x", "priority": -1}, "priority"),
        ({"role": "echo", "input": "x", "priority": True}, "priority"),
        ({"role": "echo", "input": "x", "priority": 1.5}, "priority"),
        ({"role": "echo", "input": "x", "timeout": "soon"}, "timeout"),
        ({"role": "echo", "input": "x", "timeout": -1}, "timeout"),
        ({"role": "echo", "input": "x", "idempotency_key": 7}, "idempotency_key"),
        ({"role": "echo", "input": "x", "wait": "yes"}, "wait"),
        ({"role": "echo", "input": "x", "colour": "red"}, "colour"),
        ([1, 2], "object"),
    ]
    for body, word in cases:
        await _problem(await env.post(body), 400, word)
    r = await env.client.post("/v1/tasks", data=b"{not json", headers=JSON_BODY)
    await _problem(r, 400, "JSON")
    for driver in env.drivers:
        assert driver.node.tasks.tasks == {}
    await _problem(await env.client.get("/v1/tasks?state=weird"), 400, "state")
    await _problem(await env.client.get("/v1/tasks?limit=0"), 400, "limit")
    await _problem(await env.client.get("/v1/tasks/xyz"), 400, "hex")
    await _problem(await env.client.get("/v1/tasks/abc"), 400, "prefix")
    await _problem(await env.client.get("/v1/tasks/" + "0" * 64), 404, "not known")
    await _problem(await env.client.post("/v1/tasks/" + "0" * 64 + "/cancel"), 404)


async def test_idempotency_key_returns_the_same_task(env: Env) -> None:
    body = {"role": "echo", "input": "once", "idempotency_key": "order-17"}
    first = await env.submit(**body)
    second = await env.submit(**body)
    assert first == second
    task = await env.until_state(first, "done")
    assert task["idempotency_key"] == "order-17" and task["duplicates"] == 0
    third = await env.submit(role="echo", input="once")
    assert third != first, "without a key every submission is a new task"
    assert len(env.drivers[0].node.tasks.tasks) == 2


async def test_cancel_stops_a_running_task(env: Env) -> None:
    task_id = await env.submit(role="sleep", input="30")
    await env.until_state(task_id, "running")
    r = await env.client.post(f"/v1/tasks/{task_id}/cancel")
    assert r.status == 202
    assert (await r.json())["state"] == "cancelled"
    await _problem(await env.client.post(f"/v1/tasks/{task_id}/cancel"), 409, "cancelled")
    deadline = asyncio.get_running_loop().time() + 5
    while any(d.executor.running for d in env.drivers if d.executor is not None):
        assert asyncio.get_running_loop().time() < deadline, "the execution was not stopped"
        await asyncio.sleep(0.05)
    task = await env.until_state(task_id, "cancelled")
    assert task["result"] is None and task["cancel"]["reason"]
    deadline = asyncio.get_running_loop().time() + 5
    while not any(e["outcome"] == "fenced" for e in (await env.task(task_id))["executions"]):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


async def test_timeout_becomes_the_outcome(env: Env) -> None:
    task_id = await env.submit(role="sleep", input="10", timeout=0.1)
    task = await env.until_state(task_id, "failed")
    assert task["result"]["outcome"] == "timeout" and task["timeout"] == 0.1


async def test_wait_answers_with_the_final_task(env: Env) -> None:
    r = await env.post({"role": "sleep", "input": "0.1", "wait": True})
    assert r.status == 200
    task = await r.json()
    assert task["state"] == "done" and task["result"]["output"] == "slept 0.1 s"


async def _sse(response: Any, limit: float) -> AsyncIterator[dict[str, Any]]:
    async def lines() -> AsyncIterator[bytes]:
        while True:
            line = await asyncio.wait_for(response.content.readline(), limit)
            if not line:
                return
            yield line

    async for raw in lines():
        line = raw.decode().strip()
        if line.startswith("data:"):
            yield json.loads(line[5:])


async def test_watch_one_task_reports_its_life_and_ends(env: Env) -> None:
    task_id = await env.submit(role="sleep", input="0.2")
    r = await env.client.get(f"/v1/tasks/{task_id}/watch")
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    events = [e async for e in _sse(r, limit=5.0)]
    kinds = [e["type"] for e in events]
    assert kinds == ["task-claimed", "task-started", "task-ended", "task-result"], events
    assert all(e["id"] == task_id for e in events)
    assert events[-1]["outcome"] == "ok" and events[-1]["state"] == "done"
    # A finished task's stream replays its history and ends at once.
    again = await env.client.get(f"/v1/tasks/{task_id}/watch")
    assert [e["type"] async for e in _sse(again, limit=5.0)] == kinds


async def test_watch_all_follows_task_notes(env: Env) -> None:
    r = await env.client.get("/v1/tasks/watch?follow=1")
    assert r.status == 200
    task_id = await env.submit(role="echo", input="x")
    seen: list[str] = []
    async for event in _sse(r, limit=5.0):
        if event["id"] == task_id:
            seen.append(event["type"])
        if "task-result" in seen:
            break
    assert "task-claimed" in seen and seen[-1] == "task-result"
    r.close()
    recent = (await (await env.client.get("/v1/tasks/watch")).json())["events"]
    assert any(e["type"] == "task-replicated" and e["id"] == task_id for e in recent)
    await _problem(await env.client.get("/v1/tasks/watch?follow=maybe"), 400, "follow")


async def test_unreplicated_submission_is_a_503_naming_the_task(env: Env) -> None:
    b = env.drivers[1]
    env.api.tasks.replication_timeout = 0.3
    await b.leave(timeout=2.0)  # A now has no live member to hold a copy
    deadline = asyncio.get_running_loop().time() + 5
    while any(m.up and m.node_id == b.node.node_id for m in env.drivers[0].node.members()):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    body = await _problem(await env.post({"role": "echo", "input": "x"}), 503, "durable")
    task_id = body["detail"].split()[1]
    assert (await env.task(task_id))["role"] == "echo"


async def test_the_same_key_names_the_same_task_at_another_peer_and_another_spec_is_409(
    env: Env, tmp_path: Any
) -> None:
    b = env.drivers[1]
    api_b = PeerApi(b, env.transports[1], tmp_path, lambda: None, token=API_TOKEN)
    client_b: TestClient[Any, Any] = TestClient(TestServer(api_b.app), headers=API_HEADERS)
    await client_b.start_server()
    try:
        body = {"role": "echo", "input": "network-wide", "idempotency_key": "order-99"}
        first = await env.submit(**body)
        again = await client_b.post("/v1/tasks", json=body)
        assert again.status in (200, 202), await again.text()
        assert (await again.json())["id"] == first
        other = await client_b.post("/v1/tasks", json={**body, "input": "something else"})
        problem = await _problem(other, 409, first)
        assert problem["task"] == first
        task = await env.until_state(first, "done")
        assert task["input"] == "network-wide" and task["duplicates"] == 0
    finally:
        await client_b.close()
