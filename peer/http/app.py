"""The local HTTP API (docs/http-api.md is the contract; this module implements it).

Invariants:
- Paths are versioned (/v1/...); answers are JSON; every error is an RFC 9457 problem
  (`application/problem+json`) with a `detail` that says what was wrong, naming the field.
- A request that fails validation changes nothing: bodies are parsed and checked completely
  before the driver, the transport or the data directory is touched.
- Node ids are lowercase base32 without padding (52 characters); `short_id` is the first 10.
- The followed event stream never blocks the driver: it reads a bounded subscriber queue
  (`peer.runtime.driver.NoteHub`) and ends when the peer drops it for lagging or shuts down.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from aiohttp import web

from peer.keys import save_keyring
from peer.runtime.driver import Driver, Observed
from peer.runtime.sealing import Keyring, decode_key, key_id_of
from peer.runtime.serving import host_port, serve
from peer.runtime.transport import Transport
from protocol.effects import (
    EventReceived,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    MemberSuspected,
    MemberUpdated,
)
from protocol.errors import LocalProtocolError
from protocol.membership import Member
from protocol.wire import MAX_EVENT_PAYLOAD, MAX_NAME_CHARS, Status

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
"""Largest request body; anything bigger is refused with 413 before it is read. Room for a
task input at the protocol's 64 KiB limit even when JSON escaping doubles or triples it."""
KEEPALIVE_INTERVAL = 15.0
"""Seconds between SSE keep-alive comments on an idle followed event stream."""
PROBLEM_TYPE = "application/problem+json"

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def version() -> str:
    """Return the installed Grapevine version, or "0.1.0.dev0" when run from a checkout."""
    try:
        return metadata.version("grapevine")
    except metadata.PackageNotFoundError:
        return "0.1.0.dev0"


def node_id_text(node_id: bytes) -> str:
    """Return the API form of a node id: lowercase base32 without padding."""
    return base64.b32encode(node_id).decode("ascii").lower().rstrip("=")


class Problem(Exception):
    """An error answer; raised inside handlers, turned into problem+json by the middleware."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


def _bad_request(detail: str) -> Problem:
    return Problem(400, "Bad Request", detail)


def problem_response(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Return an RFC 9457 problem details answer."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    response = web.json_response(body, status=status, content_type=PROBLEM_TYPE)
    if headers:
        response.headers.update(headers)
    return response


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        return problem_response(exc.status, exc.title, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        details = {
            404: f"no such endpoint: {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body exceeds {MAX_BODY_BYTES} bytes",
        }
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem_response(
            exc.status, exc.reason, details.get(exc.status, exc.text or exc.reason), headers
        )
    except Exception:
        log.exception("API request %s %s failed", request.method, request.path)
        return problem_response(
            500, "Internal Server Error", "the peer failed to answer; see its log"
        )


class PeerApi:
    """The HTTP API of one peer.

    Args:
        driver: the peer's driver (node, notes, commands).
        transport: the peer's transport (counters, keyring).
        data_dir: where the keyring copy is saved after a key change.
        on_leave: called once when a client asks the peer to leave.
        keepalive: seconds between keep-alive comments on idle event streams.
    """

    def __init__(
        self,
        driver: Driver,
        transport: Transport,
        data_dir: Path,
        on_leave: Callable[[], None],
        *,
        keepalive: float = KEEPALIVE_INTERVAL,
    ) -> None:
        self.driver = driver
        self.transport = transport
        self.data_dir = data_dir
        self.address = ""
        """The "host:port" the API listens on, once started."""
        self._on_leave = on_leave
        self._keepalive = keepalive
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_problems])
        routes = [
            web.get("/v1/self", self._self),
            web.get("/v1/health", self._health),
            web.get("/v1/members", self._members),
            web.post("/v1/leave", self._leave),
            web.post("/v1/events", self._events_post),
            web.get("/v1/events", self._events_get),
            web.get("/v1/metrics", self._metrics),
            web.get("/v1/keys", self._keys_get),
            web.post("/v1/keys", self._keys_post),
        ]
        # Imported here: peer.http.tasks builds on this module's helpers (Problem, _json_object).
        from peer.http.tasks import TaskApi

        self.tasks = TaskApi(driver, keepalive)
        self.app.add_routes(routes + self.tasks.routes())

    async def start(self, host: str, port: int) -> None:
        """Serve on (host, port); port 0 picks a free one (see `address`).

        Raises:
            OSError: the address cannot be bound.
        """
        self._runner, bound_port = await serve(self.app, host, port)
        self.address = host_port(host, bound_port)

    async def stop(self) -> None:
        """Stop serving; open event streams end."""
        self.driver.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _uptime(self) -> float:
        return round(self._loop.time() - self._started, 3)

    # Handlers

    async def _self(self, request: web.Request) -> web.Response:
        node = self.driver.node
        return web.json_response(
            {
                "id": node_id_text(node.node_id),
                "short_id": node_id_text(node.node_id)[:10],
                "address": node.addr,
                "api": self.address,
                "incarnation": node.incarnation,
                "network_id": node.config.network_id.hex(),
                "version": version(),
                "uptime": self._uptime(),
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        alive = sum(1 for m in self.driver.node.members() if m.status == Status.ALIVE)
        return web.json_response(
            {
                "status": "leaving" if self.driver.leaving else "ok",
                "members_alive": alive,
                "uptime": self._uptime(),
            }
        )

    async def _members(self, request: web.Request) -> web.Response:
        members = sorted(self.driver.node.members(), key=lambda m: m.node_id)
        return web.json_response({"members": [self._member(m) for m in members]})

    def _member(self, m: Member) -> Json:
        node = self.driver.node
        state = node.states.get(m.node_id)
        text = node_id_text(m.node_id)
        return {
            "id": text,
            "short_id": text[:10],
            "address": m.addr,
            "status": Status(m.status).name.lower(),
            "incarnation": m.incarnation,
            "self": m.node_id == node.node_id,
            "roles": list(state.roles) if state is not None else [],
            "free_slots": state.free_slots if state is not None else 0,
            "queue_len": state.queue_len if state is not None else 0,
            "load": state.load if state is not None else 0.0,
        }

    async def _leave(self, request: web.Request) -> web.Response:
        if not self.driver.leaving:
            self.driver.leaving = True
            self._loop.call_soon(self._on_leave)
        return web.json_response({"status": "leaving"}, status=202)

    async def _events_post(self, request: web.Request) -> web.Response:
        body = await _json_object(request, required={"name"}, optional={"payload"})
        name = body["name"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise _bad_request(f"name must be a string of 1 to {MAX_NAME_CHARS} characters")
        payload = body.get("payload", "")
        if not isinstance(payload, str):
            raise _bad_request("payload must be a string (UTF-8 text, may be empty)")
        data = payload.encode("utf-8", errors="surrogatepass")
        if len(data) > MAX_EVENT_PAYLOAD:
            raise _bad_request(
                f"payload is {len(data)} bytes of UTF-8; at most {MAX_EVENT_PAYLOAD} are allowed"
            )
        try:
            origin, ltime = self.driver.broadcast(name, data)
        except LocalProtocolError as exc:
            raise _bad_request(str(exc)) from None
        return web.json_response({"origin": node_id_text(origin), "ltime": ltime}, status=202)

    async def _events_get(self, request: web.Request) -> web.StreamResponse:
        follow = request.query.get("follow", "0").strip().lower()
        if follow not in ("0", "1", "true", "false", "yes", "no", ""):
            raise _bad_request(f"follow must be 1 or 0, got {follow!r}")
        if follow not in ("1", "true", "yes"):
            events = [e for e in map(event_json, self.driver.hub.recent) if e is not None]
            return web.json_response({"events": events})
        return await self._stream(request)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        queue = self.driver.hub.subscribe()
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            await response.write(b": stream open\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self._keepalive)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if item is None:
                    break
                event = event_json(item)
                if event is not None:
                    await response.write(f"data: {json.dumps(event)}\n\n".encode())
        except ConnectionError:
            pass  # the client went away
        finally:
            self.driver.hub.unsubscribe(queue)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        t, node = self.transport, self.driver.node
        return web.json_response(
            {
                "rejected": dict(sorted(t.rejected.items())),
                "dropped": node.dropped,
                "messages_in": t.messages_in,
                "messages_out": t.messages_out,
                "bytes_in": t.bytes_in,
                "bytes_out": t.bytes_out,
                "send_failures": t.send_failures,
                "sends_dropped": t.sends_dropped,
                "signatures_verified": node.cache.verified,
                "signature_cache_hits": node.cache.hits,
            }
        )

    async def _keys_get(self, request: web.Request) -> web.Response:
        return web.json_response(keys_json(self.transport.keyring))

    async def _keys_post(self, request: web.Request) -> web.Response:
        body = await _json_object(request, required={"action", "key"}, optional=set())
        action, key_text = body["action"], body["key"]
        if action not in ("install", "use", "remove"):
            raise _bad_request(f"action must be 'install', 'use' or 'remove', got {action!r}")
        if not isinstance(key_text, str):
            raise _bad_request("key must be a string (the base64 key from `grapevine keygen`)")
        try:
            key = decode_key(key_text)
        except ValueError as exc:
            raise _bad_request(f"key: {exc}") from None
        current = self.transport.keyring
        key_id = key_id_of(key).hex()
        if action == "install":
            updated = Keyring(current.primary, (*current.accepted, key), current.network_id)
        elif action == "use":
            if key not in current.keys:
                raise _bad_request(
                    f"key {key_id} is not installed; install it on every peer first, then use it"
                )
            updated = Keyring(key, current.keys, current.network_id)
        else:
            if key == current.primary:
                raise _bad_request(
                    f"key {key_id} is the primary key; use another key first, then remove this one"
                )
            if key not in current.keys:
                raise _bad_request(f"key {key_id} is not in the keyring")
            updated = Keyring(
                current.primary, [k for k in current.accepted if k != key], current.network_id
            )
        if updated != current:
            save_keyring(self.data_dir, updated)
            self.transport.set_keyring(updated)
            log.info("keyring changed (%s %s): %r", action, key_id, updated)
        return web.json_response(keys_json(updated))


def keys_json(keyring: Keyring) -> Json:
    """Return the API form of a keyring: key ids only, never keys."""
    return {
        "primary": key_id_of(keyring.primary).hex(),
        "accepted": [key_id_of(k).hex() for k in keyring.accepted],
    }


def event_json(item: Observed) -> Json | None:
    """Return the API form of an observed notification, or None if the API does not show it."""
    note = item.note
    match note:
        case EventReceived(origin, ltime, name, payload):
            return {
                "type": "event",
                "time": round(item.time, 3),
                "origin": node_id_text(origin),
                "ltime": ltime,
                "name": name,
                "payload": payload.decode("utf-8", errors="replace"),
            }
        case MemberJoined(node_id, _, incarnation):
            return _member_event("member-joined", item, node_id, incarnation)
        case MemberUpdated(node_id, _, incarnation):
            return _member_event("member-updated", item, node_id, incarnation)
        case MemberSuspected(node_id, incarnation):
            return _member_event("member-suspected", item, node_id, incarnation)
        case MemberDown(node_id, incarnation, left):
            kind = "member-left" if left else "member-down"
            return _member_event(kind, item, node_id, incarnation)
        case MemberRecovered(node_id, _, incarnation):
            return _member_event("member-recovered", item, node_id, incarnation)
        case _:
            return None


def _member_event(kind: str, item: Observed, node_id: bytes, incarnation: int) -> Json:
    text = node_id_text(node_id)
    event: Json = {"type": kind, "time": round(item.time, 3), "id": text, "short_id": text[:10]}
    if item.addr is not None:
        event["address"] = item.addr
    event["incarnation"] = incarnation
    return event


async def _json_object(request: web.Request, required: set[str], optional: set[str]) -> Json:
    raw = await request.read()
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad_request("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("the body must be a JSON object")
    missing = sorted(required - set(body))
    if missing:
        raise _bad_request(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(body) - required - optional)
    if unknown:
        raise _bad_request(f"unknown field(s): {', '.join(unknown)}")
    return body
