"""`GET /v1/tasks?scope=network` (peer/http/task_pages.py, peer/runtime/task_listing.py) on
three real in-process peers over loopback, each serving its API on a socket.

Tasks are submitted at different peers; the network listing from any one peer pages through
every task exactly once, in id order. A peer that does not answer is reported, not hidden.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.client import GrapevineClient
from peer.http.app import PeerApi
from peer.node_ids import node_id_text
from peer.runtime.driver import Driver
from tests.peer.inprocess import API_HEADERS, API_TOKEN, in_process_peer

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
PEERS = 3
TASKS = 13
SUMMARY_FIELDS = {"id", "role", "state", "outcome", "origin", "owner", "epoch", "created"}


class Net:
    def __init__(self, clients: list[TestClient[Any, Any]], apis: list[PeerApi]) -> None:
        self.clients = clients
        self.apis = apis
        self.drivers: list[Driver] = [api.driver for api in apis]

    async def get(self, at: int, query: str) -> Any:
        r = await self.clients[at].get("/v1/tasks?" + query)
        assert r.status == 200, await r.text()
        return await r.json()

    async def state(self, at: int, task_id: str) -> str | None:
        r = await self.clients[at].get(f"/v1/tasks/{task_id}")
        return (await r.json())["state"] if r.status == 200 else None

    async def problem(self, at: int, query: str, word: str) -> None:
        r = await self.clients[at].get("/v1/tasks?" + query)
        assert r.status == 400, await r.text()
        assert r.headers["Content-Type"].startswith("application/problem+json")
        body = await r.json(content_type=None)
        assert word in body["detail"], body

    async def pages(self, at: int, query: str) -> list[dict[str, Any]]:
        """Every page of a network listing at peer `at`, following next_cursor."""
        pages: list[dict[str, Any]] = []
        cursor = ""
        while True:
            page = await self.get(at, f"scope=network&{query}&cursor={cursor}")
            assert set(page) == {"tasks", "next_cursor", "partial", "missing"}
            pages.append(page)
            if page["next_cursor"] is None:
                return pages
            cursor = page["next_cursor"]
            assert len(pages) < 50, "the cursor never ends"


@pytest_asyncio.fixture
async def net(tmp_path: Any) -> AsyncIterator[Net]:
    async with AsyncExitStack() as stack:
        peers = [await stack.enter_async_context(in_process_peer(i, KEY)) for i in range(PEERS)]
        first = peers[0].driver
        for other in peers[1:]:
            assert await other.driver.join([first.node.addr], timeout=5.0) is not None
        deadline = asyncio.get_running_loop().time() + 10
        while any(len(p.driver.node.capable("echo")) < PEERS for p in peers):
            assert asyncio.get_running_loop().time() < deadline, "peer states did not spread"
            await asyncio.sleep(0.05)
        apis, clients = [], []
        for i, p in enumerate(peers):
            api = PeerApi(p.driver, p.transport, tmp_path / str(i), lambda: None, token=API_TOKEN)
            client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
            await client.start_server()
            stack.push_async_callback(client.close)
            apis.append(api)
            clients.append(client)
        yield Net(clients, apis)


async def submit_everywhere(net: Net) -> list[str]:
    """Submit `TASKS` echo tasks round-robin at every peer; wait until each is done."""
    ids = []
    for n in range(TASKS):
        r = await net.clients[n % PEERS].post("/v1/tasks", json={"role": "echo", "input": str(n)})
        assert r.status == 202, await r.text()
        ids.append((await r.json())["id"])
    deadline = asyncio.get_running_loop().time() + 15
    for at, task_id in enumerate(ids):
        while (await net.state(at % PEERS, task_id)) != "done":
            assert asyncio.get_running_loop().time() < deadline, f"task {task_id} not done"
            await asyncio.sleep(0.05)
    return ids


async def test_every_task_appears_once_across_pages_from_any_peer(net: Net) -> None:
    ids = await submit_everywhere(net)
    for at in range(PEERS):
        pages = await net.pages(at, "limit=5")
        assert [len(p["tasks"]) for p in pages] == [5, 5, 3]
        listed = [t["id"] for p in pages for t in p["tasks"]]
        assert listed == sorted(ids), f"peer {at}: each task once, in id order"
        for page in pages:
            assert page["partial"] is False and page["missing"] == []
            if page["next_cursor"] is not None:
                assert page["next_cursor"] == page["tasks"][-1]["id"]
        row = pages[0]["tasks"][0]
        assert set(row) == SUMMARY_FIELDS
        assert (row["role"], row["state"], row["outcome"], row["epoch"]) == (
            "echo",
            "done",
            "ok",
            1,
        )
        assert row["owner"] and row["origin"] and row["created"] > 0
    local = await net.get(0, "scope=local&limit=100")
    assert {t["id"] for t in local["tasks"]} <= set(ids)
    whole = await net.get(1, "scope=network&limit=500")
    assert [t["id"] for t in whole["tasks"]] == sorted(ids) and whole["next_cursor"] is None


async def test_filters_apply_to_the_network_scope(net: Net) -> None:
    ids = await submit_everywhere(net)
    done = await net.pages(2, "limit=500&state=done&role=echo")
    assert [t["id"] for p in done for t in p["tasks"]] == sorted(ids)
    assert (await net.get(2, "scope=network&state=pending"))["tasks"] == []
    assert (await net.get(2, "scope=network&role=sleep"))["tasks"] == []


async def test_the_owner_filter_applies_before_the_limit_in_both_scopes(net: Net) -> None:
    ids = await submit_everywhere(net)
    whole = await net.get(0, "scope=network&limit=500")
    owners = {t["owner"] for t in whole["tasks"]}
    for owner in owners:
        mine = sorted(t["id"] for t in whole["tasks"] if t["owner"] == owner)
        pages = await net.pages(1, f"limit=2&owner={owner}")
        assert [t["id"] for p in pages for t in p["tasks"]] == mine
        first = await net.get(2, f"scope=network&limit=1&owner={owner.upper()}")
        assert [t["id"] for t in first["tasks"]] == mine[:1]  # the filter came before the limit
        for at in range(PEERS):
            local = await net.get(at, f"limit=1&owner={owner}")
            held = await net.get(at, "limit=100")
            expected = [t["id"] for t in held["tasks"] if t["owner"] == owner][:1]
            assert [t["id"] for t in local["tasks"]] == expected
    assert sum(len([t for t in whole["tasks"] if t["owner"] == o]) for o in owners) == len(ids)
    stranger = node_id_text(bytes(32))
    assert (await net.get(0, f"scope=network&owner={stranger}"))["tasks"] == []
    assert (await net.get(0, f"owner={stranger}"))["tasks"] == []
    for bad in ("peer-a", stranger[:-1], "0" * 52, stranger + "a", "é" * 52):
        await net.problem(0, f"owner={bad}", "owner")
        await net.problem(0, f"scope=network&owner={bad}", "owner")


async def test_the_client_follows_every_page(net: Net) -> None:
    ids = await submit_everywhere(net)
    port = net.clients[1].server.port
    async with GrapevineClient(f"127.0.0.1:{port}", API_TOKEN) as client:
        pages = [p async for p in client.network_task_pages(page_size=4)]
        first = await client.list_tasks("network", limit=2, cursor=sorted(ids)[0])
    assert [len(p["tasks"]) for p in pages] == [4, 4, 4, 1]
    assert [t["id"] for p in pages for t in p["tasks"]] == sorted(ids)
    assert [t["id"] for t in first["tasks"]] == sorted(ids)[1:3]


async def test_a_peer_that_does_not_answer_is_reported_missing(
    net: Net, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await submit_everywhere(net)
    silent = net.drivers[2].node
    monkeypatch.setattr(silent.tasks.listing, "on_list", lambda *args: None)
    net.apis[0].tasks.listing.timeout = 0.3
    page = await net.get(0, "scope=network&limit=500")
    assert page["partial"] is True
    assert page["missing"] == [node_id_text(silent.node_id)]
    arbitrated_by_silent = {
        t.hex() for t in map(bytes.fromhex, ids) if silent.replica_set(t)[0] == silent.node_id
    }
    assert [t["id"] for t in page["tasks"]] == sorted(set(ids) - arbitrated_by_silent)


async def test_bad_scope_limit_or_cursor_is_refused_naming_it(net: Net) -> None:
    await net.problem(0, "scope=everywhere", "scope")
    await net.problem(0, "scope=network&limit=0", "limit")
    await net.problem(0, "scope=network&limit=501", "limit")
    await net.problem(0, "scope=network&limit=ten", "limit")
    await net.problem(0, "scope=network&cursor=xyz", "cursor")
    await net.problem(0, "scope=network&cursor=" + "a" * 63, "cursor")
    await net.problem(0, "scope=network&state=weird", "state")
    await net.problem(0, "cursor=" + "a" * 64, "scope=network")
    empty = await net.get(0, "scope=network&cursor=" + "f" * 64)
    assert empty == {"tasks": [], "next_cursor": None, "partial": False, "missing": []}
