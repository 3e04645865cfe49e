"""Where a task submitted without an idempotency key lives, through the API of a real
in-process peer among six over loopback: while half its slots are free its id puts the peer it
was submitted at on top of its replica set, and the task runs there (decision 96); beyond that
the peer is one of its replicas below its arbiter, and the tasks run at the other peers
(decision 94)."""

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


async def test_tasks_submitted_one_at_a_time_run_where_they_were_submitted(
    origin: tuple[TestClient[Any, Any], Driver],
) -> None:
    client, driver = origin
    me = driver.node.node_id
    for n in range(TASKS):
        r = await client.post(
            "/v1/tasks", json={"role": "echo", "input": f"task {n}", "wait": True}
        )
        assert r.status == 200, await r.text()
        task_id = bytes.fromhex((await r.json())["id"])
        assert driver.node.replica_set(task_id)[0] == me, "on top of its replica set"
        result = await driver.wait_result(task_id, timeout=10)
        assert result is not None and result.owner == me, "run here"
    counted = driver.node.task_counters()
    assert counted["task ids placed to run at their origin"] == TASKS


async def test_tasks_beyond_half_the_slots_run_elsewhere_with_their_origin_a_replica(
    origin: tuple[TestClient[Any, Any], Driver],
) -> None:
    client, driver = origin
    me = driver.node.node_id
    ids = []
    for n in range(TASKS):  # 3 s runs: the first few are still running as the rest arrive
        r = await client.post("/v1/tasks", json={"role": "sleep", "input": f"3.{n:02d}"})
        assert r.status == 202, await r.text()
        ids.append(bytes.fromhex((await r.json())["id"]))
    here, elsewhere = [], []
    for task_id in ids:
        home = driver.node.replica_set(task_id)
        assert me in home, "a replica in either case"
        result = await driver.wait_result(task_id, timeout=20)
        assert result is not None and result.outcome == "ok"
        (here if home[0] == me else elsewhere).append(result.owner)
    slots = driver.node.tasks.max_running
    # Placed here while at least half the slots are free: floor(slots / 2) + 1 runs.
    assert len(here) == slots // 2 + 1 and set(here) == {me}
    assert me not in elsewhere and len(set(elsewhere)) > 1, "the rest run at the other peers"
    counted = driver.node.task_counters()
    assert counted["task ids placed with their origin among the replicas"] == len(elsewhere)


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
