"""A canned peer HTTP API (docs/http-api.md) for testing the client and the CLI without a peer.

Invariants:
- Answers are fixed values shaped exactly as docs/http-api.md documents, so a test can assert
  on what the client or the CLI made of them.
- `ThreadedFakeApi` serves the same app from a background thread, so a CLI subprocess (which
  runs its own event loop) can talk to it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from aiohttp import web

SELF_ID = "a" * 52
OTHER_ID = "b" * 52
DEAD_ID = "c" * 52
KEY_ID = "0badc0de"

MEMBERS: list[dict[str, Any]] = [
    {
        "id": OTHER_ID,
        "short_id": OTHER_ID[:10],
        "address": "127.0.0.1:7002",
        "status": "alive",
        "incarnation": 1,
        "self": False,
        "roles": ["writer", "critic"],
        "free_slots": 2,
        "queue_len": 0,
        "load": 0.25,
        "last_seen": 1_700_000_002.25,
    },
    {
        "id": SELF_ID,
        "short_id": SELF_ID[:10],
        "address": "127.0.0.1:7001",
        "status": "alive",
        "incarnation": 3,
        "self": True,
        "roles": [],
        "free_slots": 0,
        "queue_len": 0,
        "load": 0.0,
        "last_seen": None,
    },
    {
        "id": DEAD_ID,
        "short_id": DEAD_ID[:10],
        "address": "127.0.0.1:7003",
        "status": "dead",
        "incarnation": 2,
        "self": False,
        "roles": [],
        "free_slots": 0,
        "queue_len": 0,
        "load": 0.0,
        "last_seen": 1_699_999_990.0,
    },
]

EVENTS: list[dict[str, Any]] = [
    {
        "type": "member-down",
        "time": 1_700_000_000.0,
        "id": DEAD_ID,
        "short_id": DEAD_ID[:10],
        "address": "127.0.0.1:7003",
        "incarnation": 2,
    },
    {
        "type": "event",
        "time": 1_700_000_001.5,
        "origin": OTHER_ID,
        "ltime": 7,
        "name": "deploy",
        "payload": "v1.2.3",
    },
]


def _problem(status: int, title: str, detail: str) -> web.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type="application/problem+json")


async def _self(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "id": SELF_ID,
            "short_id": SELF_ID[:10],
            "address": "127.0.0.1:7001",
            "api": "127.0.0.1:8946",
            "incarnation": 3,
            "network_id": "ab" * 16,
            "version": "0.1.0",
            "uptime": 75.5,
        }
    )


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "members_alive": 2, "uptime": 75.5})


async def _members(request: web.Request) -> web.Response:
    return web.json_response({"members": MEMBERS})


async def _leave(request: web.Request) -> web.Response:
    return web.json_response({"status": "leaving"}, status=202)


async def _send_event(request: web.Request) -> web.Response:
    body = await request.json()
    if body.get("name") == "too-big":
        return _problem(413, "Event too large", "the payload exceeds 512 bytes")
    return web.json_response({"origin": SELF_ID, "ltime": 8}, status=202)


async def _events(request: web.Request) -> web.StreamResponse:
    if request.query.get("follow") != "1":
        return web.json_response({"events": EVENTS})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b": keep-alive\n\n")
    for event in EVENTS:
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
    await response.write_eof()
    return response


async def _metrics(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "rejected": {"unknown_key": 4},
            "dropped": 0,
            "messages_in": 10,
            "messages_out": 12,
            "bytes_in": 2048,
            "bytes_out": 4096,
            "signatures_verified": 5,
            "signature_cache_hits": 9,
        }
    )


async def _keys(request: web.Request) -> web.Response:
    return web.json_response({"primary": KEY_ID, "accepted": [KEY_ID]})


async def _change_keys(request: web.Request) -> web.Response:
    body = await request.json()
    if body.get("action") == "remove":
        return _problem(409, "Cannot remove the primary key", "use another key first")
    return web.json_response({"primary": KEY_ID, "accepted": [KEY_ID, "feedf00d"]})


def make_app() -> web.Application:
    """Return an aiohttp application serving the canned API."""
    app = web.Application()
    app.router.add_get("/v1/self", _self)
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/v1/members", _members)
    app.router.add_post("/v1/leave", _leave)
    app.router.add_post("/v1/events", _send_event)
    app.router.add_get("/v1/events", _events)
    app.router.add_get("/v1/metrics", _metrics)
    app.router.add_get("/v1/keys", _keys)
    app.router.add_post("/v1/keys", _change_keys)
    return app


class ThreadedFakeApi:
    """The canned API on 127.0.0.1 (a free port), served from a daemon thread."""

    def __init__(self) -> None:
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(make_app())
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake API did not start")

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.address = f"127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()
