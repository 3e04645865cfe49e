"""`GET /metrics`: the peer's metrics in the Prometheus text exposition format.

Invariants:
- Guarded like every route (`peer.http.guard`): a scraper sends the API token as a bearer
  token (Prometheus' `authorization` credentials), and a scrape without it is answered 401.
- The answer is the peer's own registry only (`peer.observability.metrics.PeerMetrics`).
- The JSON endpoints (/v1/metrics, /v1/tasks/stats, /v1/agents) stay for the CLI.
"""

from __future__ import annotations

from aiohttp import web

from peer.observability.metrics import CONTENT_TYPE, PeerMetrics


class MetricsApi:
    """The Prometheus endpoint of one peer.

    Args:
        metrics: the peer's metrics.
    """

    def __init__(self, metrics: PeerMetrics) -> None:
        self.metrics = metrics

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.get("/metrics", self._get)]

    async def _get(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response
