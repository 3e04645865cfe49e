"""The peer and its membership: /v1/self, /v1/health, /v1/members, /v1/join, /v1/leave,
/v1/metrics.

Invariants:
- Everything here is read from the node's public view (`members()`, `peer_states()`, the
  signature counters), the transport's counters and the driver's write health; nothing here
  changes them but `join` and `leave`, each through the driver.
- `POST /v1/join` asks the seeds once, through the same code as the start-up join
  (`bootstrap.join.join_with_retry`, one attempt), and answers 200 naming the seed that
  answered or 502 naming each address and why it did not; either way the node keeps the seeds
  and retries them on its own, as for the seeds given at start.
- A member this peer has no signed state for yet shows no roles and no free slots.
- A member's `last_seen` is the unix time this peer last received an envelope the member
  sent (`peer.runtime.contact.LastContact`, kept by the transport), null if none arrived
  since this peer started, and null for this peer itself.
- `POST /v1/leave` calls `on_leave` once, on the next loop turn, however often it is asked.
- A peer whose last write to disk failed says so (`degraded`, its reason) in /v1/self and
  /v1/health, whose status is then "degraded" (unless "leaving"), so health checks see it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from bootstrap.join import join_with_retry
from bootstrap.seeds import parse_seeds
from peer.http.common import Json, Problem, bad_request, json_object, version
from peer.node_ids import node_id_text
from peer.runtime.driver import Driver
from peer.runtime.transport import Transport
from protocol.member_table import Member
from protocol.wire import RUN_COUNTS, Status

JOIN_TIMEOUT = 3.0
"""Seconds `POST /v1/join` waits for a seed to answer before saying none did."""
MAX_JOIN_SEEDS = 64


class MemberApi:
    """The endpoints about this peer and the members it knows.

    Args:
        driver: the peer's driver.
        transport: the peer's transport (its counters).
        address: the "host:port" the API listens on, once started ("" before).
        on_leave: called once when a client asks the peer to leave.
        api_refused: the API's refusals by reason (`RequestGuard.refused`), for /v1/metrics.
    """

    def __init__(
        self,
        driver: Driver,
        transport: Transport,
        address: Callable[[], str],
        on_leave: Callable[[], None],
        api_refused: Counter[str],
    ) -> None:
        self.driver = driver
        self.transport = transport
        self.api_refused = api_refused
        self._address = address
        self._on_leave = on_leave
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [
            web.get("/v1/self", self._self),
            web.get("/v1/health", self._health),
            web.get("/v1/members", self._members),
            web.post("/v1/join", self._join),
            web.post("/v1/leave", self._leave),
            web.get("/v1/metrics", self._metrics),
        ]

    def _uptime(self) -> float:
        return round(self._loop.time() - self._started, 3)

    async def _self(self, request: web.Request) -> web.Response:
        node = self.driver.node
        return web.json_response(
            {
                "id": node_id_text(node.node_id),
                "short_id": node_id_text(node.node_id)[:10],
                "address": node.addr,
                "api": self._address(),
                "incarnation": node.incarnation,
                "network_id": node.config.network_id.hex(),
                "version": version(),
                "uptime": self._uptime(),
                **self._degraded(),
            }
        )

    def _degraded(self) -> Json:
        reason = self.driver.disk.degraded
        return {"degraded": reason is not None, "degraded_reason": reason}

    async def _health(self, request: web.Request) -> web.Response:
        alive = sum(1 for m in self.driver.node.members() if m.status == Status.ALIVE)
        status = "ok" if self.driver.disk.degraded is None else "degraded"
        return web.json_response(
            {
                "status": "leaving" if self.driver.leaving else status,
                "members_alive": alive,
                "uptime": self._uptime(),
                **self._degraded(),
                "write_failures": self.driver.disk.write_failures,
            }
        )

    async def _members(self, request: web.Request) -> web.Response:
        members = sorted(self.driver.node.members(), key=lambda m: m.node_id)
        return web.json_response({"members": [self._member(m) for m in members]})

    def _member(self, m: Member) -> Json:
        node = self.driver.node
        state = node.peer_states().get(m.node_id)
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
            "agents": state.agents if state is not None else 0,
            "spend_micro": state.spend_micro if state is not None else 0,
            "models": [
                {
                    "model": u.model,
                    "spend_micro": u.spend_micro,
                    "breaker": u.breaker.name.lower(),
                    "tokens": u.tokens,
                    "waits": u.waits,
                    "waiting": u.waiting,
                }
                for u in (state.models if state is not None else ())
            ],
            "runs": dict(zip(RUN_COUNTS, state.runs or (0,) * len(RUN_COUNTS), strict=True))
            if state is not None
            else dict.fromkeys(RUN_COUNTS, 0),
            "last_seen": None if m.node_id == node.node_id else self._last_seen(m.node_id),
        }

    def _last_seen(self, node_id: bytes) -> float | None:
        heard = self.transport.last_contact.get(node_id)
        return None if heard is None else round(heard, 3)

    async def _join(self, request: web.Request) -> web.Response:
        body = await json_object(request, required={"seeds"}, optional=set())
        texts = body["seeds"]
        if (
            not isinstance(texts, list)
            or not 0 < len(texts) <= MAX_JOIN_SEEDS
            or not all(isinstance(t, str) for t in texts)
        ):
            raise bad_request(f"seeds must be a list of 1 to {MAX_JOIN_SEEDS} host:port strings")
        try:
            seeds = parse_seeds(texts)
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        result = await join_with_retry(
            seeds,
            self.driver.join,
            failure_reason=self.transport.last_failure.get,
            attempts=1,
            attempt_timeout=JOIN_TIMEOUT,
        )
        if result.joined_via is None:
            raise Problem(502, "Bad Gateway", f"{result.message}; the peer keeps trying them")
        return web.json_response({"joined": result.joined_via})

    async def _leave(self, request: web.Request) -> web.Response:
        if not self.driver.leaving:
            self.driver.leaving = True
            self._loop.call_soon(self._on_leave)
        return web.json_response({"status": "leaving"}, status=202)

    async def _metrics(self, request: web.Request) -> web.Response:
        t, node = self.transport, self.driver.node
        return web.json_response(
            {
                "rejected": dict(sorted(t.rejected.items())),
                "api_refused": dict(sorted((+self.api_refused).items())),
                "dropped": node.dropped,
                "messages_in": t.messages_in,
                "messages_out": t.messages_out,
                "bytes_in": t.bytes_in,
                "bytes_out": t.bytes_out,
                "send_failures": t.send_failures,
                "sends_dropped": t.sends_dropped,
                "signatures_verified": node.signatures_verified(),
                "signature_cache_hits": node.signature_cache_hits(),
            }
        )
