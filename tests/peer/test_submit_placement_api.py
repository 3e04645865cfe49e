"""Where a task submitted without an idempotency key lives (decision 94), through the API of a
real in-process peer among six over loopback: its id makes the peer it was submitted at one
of its replicas, below its arbiter, so the tasks still run at the other peers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.http.app import PeerApi
from peer.runtime.driver import Driver
from tests.peer.inprocess import API_HEADERS, API_TOKEN, joined_peers

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
PEERS = 6
TASKS = 12


@pytest_asyncio.fixture
async def origin(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Driver]]:
    async with AsyncExitStack() as stack:
        peers = await joined_peers(stack, PEERS, KEY)
        first = peers[0]
        api = PeerApi(first.driver, first.transport, tmp_path, lambda: None, token=API_TOKEN)
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        stack.push_async_callback(client.close)
        yield client, first.driver


async def test_tasks_without_a_key_have_their_origin_among_their_replicas(
    origin: tuple[TestClient[Any, Any], Driver],
) -> None:
    client, driver = origin
    me = driver.node.node_id
    ids = []
    for n in range(TASKS):
        r = await client.post("/v1/tasks", json={"role": "echo", "input": f"task {n}"})
        assert r.status == 202, await r.text()
        ids.append(bytes.fromhex((await r.json())["id"]))
    owners = []
    for task_id in ids:
        home = driver.node.replica_set(task_id)
        assert me in home and home[0] != me, "a replica, below the arbiter"
        result = await driver.wait_result(task_id, timeout=10)
        assert result is not None and result.outcome == "ok"
        owners.append(result.owner)
    assert me not in owners and len(set(owners)) > 1, "they run at the other peers"
    counted = driver.node.task_counters()
    assert counted["task ids placed with their origin among the replicas"] == TASKS


async def test_a_task_with_a_key_keeps_the_id_its_key_names(
    origin: tuple[TestClient[Any, Any], Driver],
) -> None:
    client, driver = origin
    body = {"role": "echo", "input": "keyed", "idempotency_key": "placement-key"}
    r = await client.post("/v1/tasks", json=body)
    assert r.status == 202, await r.text()
    expected = driver.task_id_for("echo", b"keyed", idempotency_key="placement-key")
    assert (await r.json())["id"] == expected.hex()
    assert "task ids placed with their origin among the replicas" not in (
        driver.node.task_counters()
    )
