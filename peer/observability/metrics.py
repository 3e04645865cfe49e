"""One peer's Prometheus registry: the instruments observed at events and the collector read
at scrape time (docs/observability.md lists every metric).

Invariants:
- Each peer owns its `CollectorRegistry`; nothing is registered on prometheus_client's
  process-wide default, so in-process peers (tests, simulations) never share a value and a
  peer's exposition holds its own metrics only.
- The exposition is produced on the event loop thread, where the collector may read the
  driver's state safely.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from peer.observability.api_metrics import ApiCollector
from peer.observability.collector import AgentHostView, PeerCollector
from peer.observability.instruments import EventMetrics
from peer.runtime.driver import Driver
from peer.runtime.transport import Transport

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The Prometheus text exposition format's media type (version 0.0.4)."""


class PeerMetrics:
    """The metrics of one peer.

    Args:
        driver: the peer's driver; its task lifecycle starts feeding `events` at once.
        transport: the peer's transport.
        host: the agent host, when the peer hosts agents.
    """

    def __init__(self, driver: Driver, transport: Transport, host: AgentHostView | None) -> None:
        self.registry = CollectorRegistry()
        self.events = EventMetrics(self.registry)
        self.registry.register(PeerCollector(driver, transport, host))
        driver.lifecycle.metrics = self.events

    def watch_api(self, refused: Counter[str], connections: Callable[[], int]) -> None:
        """Export the local API's refusals (`RequestGuard.refused`) and open connections.

        Call once, from the API of this peer.
        """
        self.registry.register(ApiCollector(refused, connections))

    def exposition(self) -> bytes:
        """Every metric now, in the Prometheus text format."""
        return generate_latest(self.registry)
