"""User events and the membership event feed: POST and GET /v1/events.

Invariants:
- A user event is checked completely (name length, UTF-8 payload size) before it is
  broadcast; a refused one is not sent.
- `GET /v1/events` shows the hub's recent notes, or with `?follow=1` streams every note from
  the moment of the request (`peer.http.common.stream_hub`); both show the same notes in the
  same form (`event_json`).
"""

from __future__ import annotations

from aiohttp import web

from peer.http.common import (
    Json,
    bad_request,
    follow_requested,
    json_object,
    recent_json,
    stream_hub,
)
from peer.node_ids import node_id_text
from peer.runtime.driver import Driver
from peer.runtime.hub import Observed
from protocol.effects import (
    EventReceived,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    MemberSuspected,
    MemberUpdated,
)
from protocol.errors import LocalProtocolError
from protocol.wire import MAX_EVENT_PAYLOAD, MAX_NAME_CHARS


class EventApi:
    """The /v1/events endpoints of one peer.

    Args:
        driver: the peer's driver (its broadcast and its membership hub).
        keepalive: seconds between keep-alive comments on an idle followed stream.
    """

    def __init__(self, driver: Driver, keepalive: float) -> None:
        self.driver = driver
        self.keepalive = keepalive

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.post("/v1/events", self._post), web.get("/v1/events", self._get)]

    async def _post(self, request: web.Request) -> web.Response:
        body = await json_object(request, required={"name"}, optional={"payload"})
        name = body["name"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise bad_request(f"name must be a string of 1 to {MAX_NAME_CHARS} characters")
        payload = body.get("payload", "")
        if not isinstance(payload, str):
            raise bad_request("payload must be a string (UTF-8 text, may be empty)")
        data = payload.encode("utf-8", errors="surrogatepass")
        if len(data) > MAX_EVENT_PAYLOAD:
            raise bad_request(
                f"payload is {len(data)} bytes of UTF-8; at most {MAX_EVENT_PAYLOAD} are allowed"
            )
        try:
            origin, ltime = self.driver.broadcast(name, data)
        except LocalProtocolError as exc:
            raise bad_request(str(exc)) from None
        return web.json_response({"origin": node_id_text(origin), "ltime": ltime}, status=202)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        hub = self.driver.hub
        if not follow_requested(request):
            return web.json_response({"events": recent_json(hub, event_json)})
        return await stream_hub(request, hub, event_json, self.keepalive)


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
