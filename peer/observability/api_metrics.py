"""The local API's metrics, read at scrape time from the counters its guard keeps anyway.

The API (`peer.http.app.PeerApi`) is built after the peer's metrics, so it hands its counters
over when it starts (`PeerMetrics.watch_api`); a peer without an API exports none of these.

Invariants:
- Collecting only reads the guard's `refused` counter and the server's connection count.
- The `reason` label takes exactly the values of `peer.http.guard.API_REFUSALS`, every one of
  them present from the first scrape (at 0), so a rate is defined before the first refusal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peer.http.guard import API_REFUSALS


class ApiCollector(Collector):
    """Yields the local API's refusals by reason and its open connections.

    Args:
        refused: the guard's refusal counter (`RequestGuard.refused`).
        connections: the connections the API server holds now.
    """

    def __init__(self, refused: Counter[str], connections: Callable[[], int]) -> None:
        self.refused = refused
        self.connections = connections

    def describe(self) -> list[Metric]:
        """Nothing up front (the collector is registered while the peer runs)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The API's metrics, read now."""
        refusals = CounterMetricFamily(
            "grapevine_api_refusals",
            "Local API connections and requests refused or cut off, by reason: over the "
            "connection caps, unproven connections closed, foreign Host or Origin, a missing or "
            "wrong token, a body not JSON, a bad request, a body too large or too late.",
            labels=["reason"],
        )
        for reason in API_REFUSALS:
            refusals.add_metric([reason], self.refused[reason])
        yield refusals
        yield GaugeMetricFamily(
            "grapevine_api_connections",
            "Connections the local API holds now.",
            value=self.connections(),
        )
