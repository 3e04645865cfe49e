"""The local HTTP API of one peer, assembled from its resources (docs/http-api.md is the contract).

Invariants:
- Paths are versioned (/v1/...); answers are JSON; every error is an RFC 9457 problem
  (`peer.http.common.problems`). Outside /v1: `/metrics` (Prometheus text) and the web
  dashboard, `/` and `/dashboard/*` (`peer.http.dashboard`).
- Each resource module owns its routes and reads the protocol only through the node's query
  facade; this module only builds them, orders their routes and runs the server.
- Every request passes `peer.http.guard.RequestGuard` (Host, Origin, bearer token, JSON
  bodies, UTF-8 URLs) before any handler; its refusals are problems like any other, counted
  by reason and shown by `GET /v1/metrics` ("api_refused") and `GET /metrics`.
- Stopping ends the followed event streams (the driver's membership hub closes) before the
  server goes away.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web

from peer.http.agents import AgentApi
from peer.http.blobs import BlobApi
from peer.http.common import KEEPALIVE_INTERVAL, MAX_BODY_BYTES, Json, problems
from peer.http.dashboard import DashboardApi
from peer.http.events import EventApi
from peer.http.guard import API_LIMITS, RequestGuard, session_cookie_name
from peer.http.keys import KeyApi
from peer.http.members import MemberApi
from peer.http.metrics import MetricsApi
from peer.http.tasks import TaskApi
from peer.http.tree import TreeApi
from peer.http.watch import WatchApi
from peer.observability.metrics import PeerMetrics
from peer.runtime.blobs import BlobService
from peer.runtime.driver import Driver
from peer.runtime.queue_timeouts import QueueTimeouts
from peer.runtime.serving import ServerLimits, host_port, open_connections, serve
from peer.runtime.transport import Transport


class Resource(Protocol):
    """One resource of the API: a group of routes and the state its handlers share."""

    def routes(self) -> list[web.RouteDef]:
        """The routes to add, in the order they must be matched."""
        ...


class PeerApi:
    """The HTTP API of one peer.

    Args:
        driver: the peer's driver (node, notes, commands).
        transport: the peer's transport (counters, keyring).
        data_dir: where the keyring copy is saved after a key change.
        on_leave: called once when a client asks the peer to leave.
        token: the bearer token every request must carry (`peer.api_token`).
        keepalive: seconds between keep-alive comments on idle event streams.
        blobs: the peer's blob service (large task inputs, `GET /v1/blobs/...`); None refuses
            inputs over the inline limit and serves no blobs.
        agents: returns the `GET /v1/agents` answer (the agent host's status); None for a peer
            without agents, which answers with its executor's roles.
        metrics: the peer's metrics, served at `GET /metrics`; None serves no such route.
        limits: the API server's connection caps (tests lower them).
    """

    def __init__(
        self,
        driver: Driver,
        transport: Transport,
        data_dir: Path,
        on_leave: Callable[[], None],
        *,
        token: str,
        keepalive: float = KEEPALIVE_INTERVAL,
        blobs: BlobService | None = None,
        agents: Callable[[], Json] | None = None,
        metrics: PeerMetrics | None = None,
        limits: ServerLimits = API_LIMITS,
    ) -> None:
        self.driver = driver
        self.transport = transport
        self.data_dir = data_dir
        self.address = ""
        """The "host:port" the API listens on, once started."""
        self._runner: web.AppRunner | None = None
        self._limits = limits
        self.guard = RequestGuard(token)
        self.queue_timeouts = QueueTimeouts(driver, data_dir)
        """Queued tasks' timeouts, kept in `data_dir` and enforced while the API serves."""
        self.tasks = TaskApi(driver, blobs, queue_timeouts=self.queue_timeouts)
        resources: list[Resource] = [
            MemberApi(driver, transport, lambda: self.address, on_leave, self.guard.refused),
            EventApi(driver, keepalive),
            KeyApi(transport, data_dir),
            WatchApi(driver, keepalive),  # /v1/tasks/watch before the tasks' /v1/tasks/{id}
            self.tasks,
            TreeApi(driver),
            BlobApi(blobs),
            AgentApi(driver, agents),
        ]
        if metrics is not None:
            resources.append(MetricsApi(metrics))
            metrics.watch_api(self.guard.refused, self.connections)
        self.dashboard = DashboardApi(self.guard, token)
        """The web dashboard at `/` (its one-time login URL: `dashboard.login_url`)."""
        resources.append(self.dashboard)
        self.app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=[problems, self.guard.middleware]
        )
        self.app.add_routes([route for resource in resources for route in resource.routes()])

    async def start(self, host: str, port: int) -> None:
        """Serve on (host, port); port 0 picks a free one (see `address`).

        Raises:
            OSError: the address cannot be bound.
        """
        if host and not _is_ip(host):
            self.guard.names = frozenset({host})
        self._runner, bound_port = await serve(
            self.app, host, port, limits=self._limits, refused=self.guard.refused
        )
        self.address = host_port(host, bound_port)
        self.guard.cookie = session_cookie_name(bound_port)
        self.queue_timeouts.start()

    def connections(self) -> int:
        """Connections the API server holds now (0 when it is not serving)."""
        return open_connections(self._runner) if self._runner is not None else 0

    async def stop(self) -> None:
        """Stop serving; open event streams end."""
        self.driver.hub.close()
        await self.queue_timeouts.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
