"""HTTP API (docs/http-api.md): every endpoint, problem details, inert bad input, SSE."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.build import Peer
from peer.http.app import PeerApi
from peer.keys import keyring_path
from peer.runtime.driver import Driver
from peer.runtime.executor import builtin_roles
from peer.runtime.keyring import Keyring, key_id_of, load_keyring_text
from protocol.wire import Breaker, ModelUsage
from tests.peer.inprocess import API_HEADERS, API_TOKEN, JSON_BODY, in_process_peer

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
NEW_KEY = bytes([7] * 32)


async def _peer(stack: AsyncExitStack, index: int) -> Peer:
    """A peer of incarnation 3 that runs nothing but advertises the echo and sleep roles."""
    peer = await stack.enter_async_context(in_process_peer(index, KEY, 3, roles={}, seed_only=True))
    peer.driver.set_state(("echo", "sleep"), 4, 0, 0.0)
    return peer


class Env:
    def __init__(
        self, client: TestClient[Any, Any], api: PeerApi, other: Driver, data_dir: Path
    ) -> None:
        self.client = client
        self.api = api
        self.other = other
        self.data_dir = data_dir
        self.leaves = 0

    def left(self) -> None:
        self.leaves += 1


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async with AsyncExitStack() as stack:
        peer, other = await _peer(stack, 1), await _peer(stack, 2)
        holder: list[Env] = []
        api = PeerApi(
            peer.driver,
            peer.transport,
            tmp_path,
            lambda: holder[0].left(),
            token=API_TOKEN,
            keepalive=0.2,
        )
        api.address = "127.0.0.1:8946"
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        stack.push_async_callback(client.close)
        holder.append(Env(client, api, other.driver, tmp_path))
        yield holder[0]


async def _problem(response: Any, status: int, *detail_words: str) -> dict[str, Any]:
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["type"] == "about:blank" and body["status"] == status and body["title"]
    for word in detail_words:
        assert word in body["detail"], body
    return body


async def test_self_health_members(env: Env) -> None:
    node = env.api.driver.node
    r = await env.client.get("/v1/self")
    me = await r.json()
    assert set(me) == {
        "id",
        "short_id",
        "address",
        "api",
        "incarnation",
        "network_id",
        "version",
        "uptime",
        "degraded",
        "degraded_reason",
    }
    assert (me["degraded"], me["degraded_reason"]) == (False, None)
    assert len(me["id"]) == 52 and me["id"] == me["id"].lower() and me["short_id"] == me["id"][:10]
    assert me["address"] == node.addr and me["api"] == "127.0.0.1:8946"
    assert me["incarnation"] == 3 and me["network_id"] == node.config.network_id.hex()

    health = await (await env.client.get("/v1/health")).json()
    assert health["status"] == "ok" and health["members_alive"] == 1 and health["uptime"] >= 0
    assert (health["degraded"], health["degraded_reason"], health["write_failures"]) == (
        False,
        None,
        0,
    )

    # What an agent host advertises (decisions 47 and 54).
    env.api.driver.set_usage(
        2, 1_500, (ModelUsage("openai/gpt-4o", 1_500, Breaker.OPEN, tokens=900, waits=2),)
    )
    # And its executions since it started (decision 64).
    env.api.driver.set_runs((5, 3, 1, 1, 0, 0, 1))
    members = (await (await env.client.get("/v1/members")).json())["members"]
    assert members == [
        {
            "id": me["id"],
            "short_id": me["short_id"],
            "address": node.addr,
            "status": "alive",
            "incarnation": 3,
            "self": True,
            "roles": ["echo", "sleep"],
            "free_slots": 4,
            "queue_len": 0,
            "load": 0.0,
            "agents": 2,
            "spend_micro": 1_500,
            "models": [
                {
                    "model": "openai/gpt-4o",
                    "spend_micro": 1_500,
                    "breaker": "open",
                    "tokens": 900,
                    "waits": 2,
                    "waiting": 0,
                }
            ],
            "runs": {
                "started": 5,
                "ok": 3,
                "failed": 1,
                "duplicates": 1,
                "takeovers": 0,
                "fenced": 0,
                "cancelled": 1,
            },
            "last_seen": None,
        }
    ]


async def test_events_post_then_buffer(env: Env) -> None:
    r = await env.client.post("/v1/events", json={"name": "deploy", "payload": "v2 ✓"})
    assert r.status == 202
    answer = await r.json()
    assert answer["ltime"] == 1 and len(answer["origin"]) == 52
    r = await env.client.post("/v1/events", json={"name": "ping"})
    assert (await r.json())["ltime"] == 2
    events = (await (await env.client.get("/v1/events")).json())["events"]
    assert [(e["type"], e["name"], e["payload"]) for e in events] == [
        ("event", "deploy", "v2 ✓"),
        ("event", "ping", ""),
    ]
    assert events[0]["origin"] == answer["origin"] and events[0]["time"] > 0


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", ["not valid JSON"]),
        (b"[1, 2]", ["JSON object"]),
        (json.dumps({"payload": "x"}).encode(), ["missing", "name"]),
        (json.dumps({"name": 5}).encode(), ["name"]),
        (json.dumps({"name": ""}).encode(), ["name"]),
        (json.dumps({"name": "n" * 129}).encode(), ["name"]),
        (json.dumps({"name": "a", "payload": 3}).encode(), ["payload"]),
        (json.dumps({"name": "a", "payload": "x" * 8193}).encode(), ["payload", "8192"]),
        (json.dumps({"name": "a", "extra": 1}).encode(), ["unknown", "extra"]),
    ],
)
async def test_bad_event_input_is_400_and_changes_nothing(
    env: Env, body: bytes, words: list[str]
) -> None:
    node = env.api.driver.node
    r = await env.client.post("/v1/events", data=body, headers=JSON_BODY)
    await _problem(r, 400, *words)
    assert node.ltime == 0 and not env.api.driver.hub.recent


async def test_routing_errors_are_problems(env: Env) -> None:
    await _problem(await env.client.get("/v1/nope"), 404, "/v1/nope")
    r = await env.client.delete("/v1/members")
    await _problem(r, 405, "DELETE")
    assert "GET" in r.headers["Allow"]
    r = await env.client.post("/v1/events", data=b"x" * (257 * 1024), headers=JSON_BODY)
    await _problem(r, 413)
    await _problem(await env.client.get("/v1/events?follow=maybe"), 400, "follow")


async def test_metrics(env: Env) -> None:
    metrics = await (await env.client.get("/v1/metrics")).json()
    assert {
        "rejected",
        "dropped",
        "messages_in",
        "messages_out",
        "bytes_in",
        "bytes_out",
        "signatures_verified",
        "signature_cache_hits",
    } <= set(metrics)
    assert metrics["rejected"] == {} and metrics["dropped"] == 0


async def test_key_rotation_through_the_api(env: Env) -> None:
    transport = env.api.transport
    old_id, new_id = key_id_of(KEY).hex(), key_id_of(NEW_KEY).hex()
    new_b64 = base64.b64encode(NEW_KEY).decode()
    old_b64 = base64.b64encode(KEY).decode()
    assert await (await env.client.get("/v1/keys")).json() == {"primary": old_id, "accepted": []}

    r = await env.client.post("/v1/keys", json={"action": "use", "key": new_b64})
    await _problem(r, 400, "not installed")
    assert not keyring_path(env.data_dir).exists()

    r = await env.client.post("/v1/keys", json={"action": "install", "key": new_b64})
    assert await r.json() == {"primary": old_id, "accepted": [new_id]}
    r = await env.client.post("/v1/keys", json={"action": "use", "key": new_b64})
    assert await r.json() == {"primary": new_id, "accepted": [old_id]}
    assert transport.keyring.primary == NEW_KEY

    r = await env.client.post("/v1/keys", json={"action": "remove", "key": new_b64})
    await _problem(r, 400, "primary")
    r = await env.client.post("/v1/keys", json={"action": "remove", "key": old_b64})
    assert await r.json() == {"primary": new_id, "accepted": []}

    path = keyring_path(env.data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = load_keyring_text(path.read_text())
    assert saved == transport.keyring and saved.network_id == Keyring(KEY).network_id


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"action": "install"}, ["missing", "key"]),
        ({"action": "burn", "key": "AAAA"}, ["action"]),
        ({"action": "install", "key": 12}, ["key"]),
        ({"action": "install", "key": "not base64!"}, ["key", "base64"]),
        ({"action": "install", "key": base64.b64encode(b"short").decode()}, ["key", "32"]),
    ],
)
async def test_bad_key_input_changes_nothing(
    env: Env, body: dict[str, Any], words: list[str]
) -> None:
    before = env.api.transport.keyring
    await _problem(await env.client.post("/v1/keys", json=body), 400, *words)
    assert env.api.transport.keyring is before
    assert not keyring_path(env.data_dir).exists()


async def test_leave(env: Env) -> None:
    r = await env.client.post("/v1/leave")
    assert r.status == 202 and await r.json() == {"status": "leaving"}
    await asyncio.sleep(0)
    assert env.leaves == 1
    assert (await (await env.client.get("/v1/health")).json())["status"] == "leaving"
    await env.client.post("/v1/leave")
    await asyncio.sleep(0)
    assert env.leaves == 1


async def test_agents_is_the_host_status_or_else_the_executor_roles(env: Env) -> None:
    r = await env.client.get("/v1/agents")
    assert r.status == 200 and await r.json() == {"agents": [], "roles": []}  # runs no role
    async with in_process_peer(3, KEY) as builtins:
        api = PeerApi(
            builtins.driver, builtins.transport, env.data_dir, lambda: None, token=API_TOKEN
        )
        async with TestClient(TestServer(api.app), headers=API_HEADERS) as client:
            body = await (await client.get("/v1/agents")).json()
        assert body == {"agents": [], "roles": sorted(builtin_roles())}

    status = {"agents": [{"name": "writer"}], "roles": ["write"]}
    api = PeerApi(
        env.api.driver,
        env.api.transport,
        env.data_dir,
        lambda: None,
        token=API_TOKEN,
        agents=lambda: status,
    )
    async with TestClient(TestServer(api.app), headers=API_HEADERS) as client:
        assert await (await client.get("/v1/agents")).json() == status


async def test_followed_stream_yields_member_events_and_keepalives(env: Env) -> None:
    me = env.api.driver.node
    r = await env.client.get("/v1/events?follow=1")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    await env.other.join([me.addr], timeout=2.0)
    comments = 0
    event: dict[str, Any] | None = None
    async with asyncio.timeout(5):
        while event is None or comments < 2:
            line = (await r.content.readline()).decode().rstrip("\n")
            if line.startswith(":"):
                comments += 1
            elif line.startswith("data: ") and event is None:
                event = json.loads(line[6:])
    assert event is not None and event["type"] == "member-joined"
    assert event["address"] == env.other.node.addr and event["incarnation"] == 3
    assert len(event["id"]) == 52 and event["short_id"] == event["id"][:10]
    env.api.driver.hub.close()
    async with asyncio.timeout(2):
        rest = await r.content.read()  # the stream ends once the hub closes
    assert b"data:" not in rest and r.content.at_eof()
