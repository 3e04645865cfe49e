"""The metrics read at scrape time from counters and state the peer keeps anyway.

`PeerCollector.collect` runs on the event loop when `/metrics` is scraped and reads the node's
query facade, the transport's counters, the driver's write health, the executor, the agent
host's roster and model client and the workspace jail's refusals: the same sources as the
JSON endpoints (/v1/metrics, /v1/tasks/stats, /v1/agents). Nothing is counted twice, and the
hot paths pay nothing.

Invariants:
- Collecting only reads; it never changes the peer's state.
- Label values come from fixed or operator-configured sets: member statuses, task states, the
  transport's and the jail's refusal reasons, the task plane's counter names, served roles and
  configured models. Never a task id, a node id or an address.
- Counters (`..._total`) only ever rise while the process runs; gauges are the state now.
- The cost is linear in the tasks held (tasks by state), a few milliseconds for tens of
  thousands, so a scrape every second costs the peer well under 1% of its time.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peer.agents.jail import JAIL_REFUSALS, refusals_in
from peer.http.common import version
from peer.http.task_views import STATES
from peer.runtime.driver import Driver
from peer.runtime.transport import Transport
from protocol.identity import short_id
from protocol.wire import Status

MEMBERSHIP_COUNTERS = {
    "probes": ("grapevine_probes", "Direct probes (SWIM pings) this peer started."),
    "indirect probes": (
        "grapevine_indirect_probes",
        "Probe rounds that asked helpers to ping the target (it missed the probe timeout).",
    ),
    "suspicions": ("grapevine_suspicions", "Suspicions of other members started here."),
    "suspicions refuted": (
        "grapevine_false_suspicions_refuted",
        "Suspected members that proved alive (a newer alive record ended the suspicion).",
    ),
    "refutations": (
        "grapevine_refutations",
        "Times this peer refuted a suspicion or death declared of itself.",
    ),
}
"""`Node.membership_counters` keys, as metric names (without `_total`) and help texts."""
TASK_COUNTERS = {
    "takeovers": ("grapevine_task_takeovers", "Claims this peer made over an earlier claim."),
    "fenced": ("grapevine_task_fenced", "Executions here stopped by fencing or a cancel."),
    "grants made": ("grapevine_task_grants", "Epochs this peer granted as a task's primary."),
    "grants asked": (
        "grapevine_task_grant_requests",
        "Grants this peer asked of a task's primary as its standby.",
    ),
    "result flips": (
        "grapevine_task_result_flips",
        "Accepted results replaced by a greater claim's result.",
    ),
}
"""Task plane counters (`Node.task_counters`) with a metric of their own; the others go to
`grapevine_task_plane_events_total{event}`."""


class AgentHostView(Protocol):
    """What the collector reads of the agent host (`peer.agents.host.AgentHost`)."""

    @property
    def roster(self) -> Iterable[Any]: ...

    @property
    def client(self) -> Any: ...

    @property
    def workspace(self) -> Path: ...


class PeerCollector(Collector):
    """Yields the scrape-time metrics of one peer (see the module invariants).

    Args:
        driver: the peer's driver (node queries, executor, write health).
        transport: the peer's transport (envelope counters and refusals).
        host: the agent host, when the peer hosts agents (slots per agent role, model calls).
    """

    def __init__(self, driver: Driver, transport: Transport, host: AgentHostView | None) -> None:
        self.driver = driver
        self.transport = transport
        self.host = host

    def describe(self) -> list[Metric]:
        """Nothing up front: the metrics' label values are known only when collecting."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every scrape-time metric, read now."""
        yield from self._peer()
        yield from self._membership()
        yield from self._transport()
        yield from self._tasks()
        yield from self._slots()
        if self.host is not None:
            yield from self._models(self.host.client.status())
            yield self._workspace(self.host.workspace)

    def _peer(self) -> Iterator[Metric]:
        node = self.driver.node
        info = GaugeMetricFamily(
            "grapevine_peer_info",
            "This peer: its short id and version.",
            labels=["peer", "version"],
        )
        info.add_metric([short_id(node.node_id), version()], 1)
        yield info
        yield GaugeMetricFamily(
            "grapevine_incarnation", "This peer's incarnation.", value=node.incarnation
        )
        yield GaugeMetricFamily(
            "grapevine_degraded",
            "1 while the last write to disk failed (see /v1/health), else 0.",
            value=0 if self.driver.disk.degraded is None else 1,
        )
        yield CounterMetricFamily(
            "grapevine_store_write_failures",
            "Writes to disk that failed.",
            value=self.driver.disk.write_failures,
        )
        yield CounterMetricFamily(
            "grapevine_signatures_verified",
            "Ed25519 signatures this peer verified (each object once: the cache remembers).",
            value=node.signatures_verified(),
        )
        yield CounterMetricFamily(
            "grapevine_signature_cache_hits",
            "Signature checks answered by the cache instead of a fresh verification.",
            value=node.signature_cache_hits(),
        )

    def _membership(self) -> Iterator[Metric]:
        node = self.driver.node
        statuses = Tally(Status(m.status).name.lower() for m in node.members())
        members = GaugeMetricFamily(
            "grapevine_members",
            "Members known here, this peer included, by status.",
            labels=["status"],
        )
        for status in Status:
            name = status.name.lower()
            members.add_metric([name], statuses[name])
        yield members
        counts = node.membership_counters()
        for key, (name, text) in MEMBERSHIP_COUNTERS.items():
            yield CounterMetricFamily(name, text, value=counts.get(key, 0))

    def _transport(self) -> Iterator[Metric]:
        t = self.transport
        messages = CounterMetricFamily(
            "grapevine_gossip_messages",
            "Envelopes received (in) and sent (out) over the transport.",
            labels=["direction"],
        )
        messages.add_metric(["in"], t.messages_in)
        messages.add_metric(["out"], t.messages_out)
        yield messages
        sizes = CounterMetricFamily(
            "grapevine_gossip_bytes",
            "Bytes received (in) and sent (out) over the transport, blobs included.",
            labels=["direction"],
        )
        sizes.add_metric(["in"], t.bytes_in)
        sizes.add_metric(["out"], t.bytes_out)
        yield sizes
        rejected = CounterMetricFamily(
            "grapevine_envelopes_rejected",
            "Envelopes and bodies refused before the protocol saw them, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(t.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily(
            "grapevine_gossip_send_failures",
            "Sends that failed: a probe with no 2xx answer, a channel refused, reset or timed out.",
            value=t.send_failures,
        )
        yield CounterMetricFamily(
            "grapevine_gossip_sends_dropped",
            "Sends dropped before leaving (queue full, peer unreachable, unsealable).",
            value=t.sends_dropped,
        )
        channels = GaugeMetricFamily(
            "grapevine_transport_channels",
            "Channels (one WebSocket per peer pair carrying bulk envelopes) open now, to other "
            "peers (out) and from them (in).",
            labels=["direction"],
        )
        out, into = t.channels
        channels.add_metric(["out"], out)
        channels.add_metric(["in"], into)
        yield channels
        yield CounterMetricFamily(
            "grapevine_transport_channels_opened",
            "Channels this peer opened to other peers.",
            value=t.channels_opened,
        )

    def _tasks(self) -> Iterator[Metric]:
        node = self.driver.node
        states = Tally(st.state for st in node.held_tasks() if st.record is not None)
        tasks = GaugeMetricFamily(
            "grapevine_tasks", "Tasks held here (their record), by state.", labels=["state"]
        )
        for state in STATES:
            tasks.add_metric([state], states[state])
        yield tasks
        yield GaugeMetricFamily(
            "grapevine_task_tombstones",
            "Compacted tasks' tombstones held here.",
            value=node.tombstone_count(),
        )
        counters = node.task_counters()
        for key, (name, text) in TASK_COUNTERS.items():
            yield CounterMetricFamily(name, text, value=counters.get(key, 0))
        others = CounterMetricFamily(
            "grapevine_task_plane_events",
            "Other task plane events (refused or superseded objects, repairs, compactions).",
            labels=["event"],
        )
        for key, count in sorted(counters.items()):
            if key not in TASK_COUNTERS:
                others.add_metric([key.replace(": ", "_").replace(" ", "_")], count)
        yield others

    def _slots(self) -> Iterator[Metric]:
        node, executor = self.driver.node, self.driver.executor
        suspended = node.suspended_here()
        holding = [t for t in node.running_here() if t not in suspended]
        used = Tally(st.record.role for t in holding if (st := node.task(t)) and st.record)
        capacity = executor.max_running if executor is not None else 0
        free_here = max(0, capacity - len(holding))
        agent_free: Tally[str] = Tally()
        if self.host is not None:
            for agent in self.host.roster:
                busy = len(agent.slots.running) - len(agent.slots.suspended)
                for role in agent.spec.roles:
                    agent_free[role] += max(0, agent.spec.max_concurrent - busy)
        slots = GaugeMetricFamily(
            "grapevine_executor_slots",
            "Execution slots here by role: used (held by a running execution of the role) and "
            "free (an execution of the role could start now).",
            labels=["role", "state"],
        )
        roles = set(executor.roles if executor is not None else ()) | set(used)
        for role in sorted(roles):
            free = min(free_here, agent_free[role]) if role in agent_free else free_here
            slots.add_metric([role, "used"], used[role])
            slots.add_metric([role, "free"], free)
        yield slots
        yield GaugeMetricFamily(
            "grapevine_executor_capacity",
            "Executions run here at once (max_running).",
            value=capacity,
        )
        yield GaugeMetricFamily(
            "grapevine_executions_suspended",
            "Executions here waiting on their child tasks (they hold no slot).",
            value=len(suspended),
        )
        yield GaugeMetricFamily(
            "grapevine_executions_waiting",
            "Executions the node started that wait in the executor for a free slot.",
            value=executor.waiting if executor is not None else 0,
        )

    def _workspace(self, workspace: Path) -> Metric:
        refused = refusals_in(workspace)
        family = CounterMetricFamily(
            "grapevine_workspace_refusals",
            "Agent file tool calls the workspace jail refused, by operation (read, write) and "
            "reason (bad_path, link, not_regular, hard_link, too_large).",
            labels=["operation", "reason"],
        )
        for operation in ("read", "write"):
            for reason in JAIL_REFUSALS:
                family.add_metric([operation, reason], refused[operation, reason])
        return family

    def _models(self, status: dict[str, Any]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "grapevine_model_requests",
            "Model calls (attempts) that ended, by model and outcome (ok, error).",
            labels=["model", "outcome"],
        )
        retries = CounterMetricFamily(
            "grapevine_model_retries", "Retries after retryable errors.", labels=["model"]
        )
        tokens = CounterMetricFamily(
            "grapevine_model_tokens",
            "Tokens of successful calls by model and kind (prompt, completion).",
            labels=["model", "kind"],
        )
        cost = CounterMetricFamily(
            "grapevine_model_cost_dollars",
            "Spend of successful calls, in US dollars, as litellm prices them.",
            labels=["model"],
        )
        waits = CounterMetricFamily(
            "grapevine_model_rate_limit_waits",
            "Calls that had to wait for a rate limit or an open breaker.",
            labels=["model"],
        )
        waited = CounterMetricFamily(
            "grapevine_model_rate_limit_wait_seconds",
            "Seconds calls spent waiting for rate limits or an open breaker.",
            labels=["model"],
        )
        waiting = GaugeMetricFamily(
            "grapevine_model_requests_waiting", "Calls waiting now.", labels=["model"]
        )
        breaker = GaugeMetricFamily(
            "grapevine_model_breaker_state",
            "The model's circuit breaker: 1 for its current state (closed, open, half_open).",
            labels=["model", "state"],
        )
        opened = CounterMetricFamily(
            "grapevine_model_breaker_opened", "Times the breaker opened.", labels=["model"]
        )
        for model, s in sorted(status.items()):
            requests.add_metric([model, "ok"], s["ok"])
            requests.add_metric([model, "error"], s["errors"])
            retries.add_metric([model], s["retries"])
            tokens.add_metric([model, "prompt"], s["prompt_tokens"])
            tokens.add_metric([model, "completion"], s["completion_tokens"])
            cost.add_metric([model], s["cost_micro"] / 1e6)
            waits.add_metric([model], s["waits"])
            waited.add_metric([model], s["wait_seconds"])
            waiting.add_metric([model], s["waiting"])
            for state in ("closed", "open", "half_open"):
                breaker.add_metric([model, state], 1 if s["breaker"] == state else 0)
            opened.add_metric([model], s["breaker_opened"])
        yield from (requests, retries, tokens, cost, waits, waited, waiting, breaker, opened)
