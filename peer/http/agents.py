"""The LLM agents this peer hosts: GET /v1/agents.

Invariants:
- With an agent host, the answer is its status (`peer.agents.host.AgentHost.status`), read
  fresh on every request.
- Without one, the answer lists no agents and the roles of the executor attached to the driver
  (the built-in roles; none when nothing is attached), so every peer answers the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from peer.http.common import Json
from peer.runtime.driver import Driver


class AgentApi:
    """The /v1/agents endpoint of one peer.

    Args:
        driver: the peer's driver (its executor's roles when no agents are hosted).
        status: returns the agent host's status; None when the peer hosts no agents.
    """

    def __init__(self, driver: Driver, status: Callable[[], Json] | None) -> None:
        self.driver = driver
        self.status = status

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.get("/v1/agents", self._get)]

    async def _get(self, request: web.Request) -> web.Response:
        if self.status is not None:
            return web.json_response(self.status())
        executor = self.driver.executor
        roles = list(executor.roles) if executor is not None else []
        return web.json_response({"agents": [], "roles": roles})
