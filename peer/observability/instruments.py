"""The metrics observed where something happens (the rest are read at scrape time: see
`peer.observability.collector`).

Only what no counter of the protocol or the runtime already holds lives here: latency
histograms (they need each observation), counts the peer sees in its notes (its own claims,
duplicate runs, executions ended by outcome, inputs dropped by reason) and the store's write
latency.

Invariants:
- Every instrument is registered on the peer's own `CollectorRegistry`, never the process-wide
  default, so peers in one process never share a value.
- Label values come from fixed sets: `drop_reason` maps the protocol's free-text reasons onto
  `DROP_REASONS`, outcomes are the protocol's `OUTCOMES` plus "fenced" and "cancelled"; no
  label ever carries a task id, a node id or an address.
- Observing costs a few microseconds and never raises into the caller.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
"""Seconds, for submit→start and submit→result: no-op tasks take milliseconds, agent tasks
minutes."""
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)
"""Seconds, for one store transaction: an fsync is ~0.15 ms on an SSD, milliseconds on slow
disks."""
DROP_REASONS = (
    "bad_signature",
    "incarnation",
    "unknown_sender",
    "rate_limited",
    "task_conflict",
    "task_object",
    "compacted",
    "user_event",
    "stored_record",
    "misaddressed",
    "malformed",
)
"""The reasons `grapevine_inputs_dropped_total` is labelled with."""
_DROP_WORDS = (
    ("signature", "bad_signature"),
    ("incarnation", "incarnation"),
    ("unknown", "unknown_sender"),
    ("not known here", "unknown_sender"),
    ("rate-limited", "rate_limited"),
    ("conflicting", "task_conflict"),
    ("compacted", "compacted"),
    ("event clock", "user_event"),
    ("stored", "stored_record"),
    ("addressed to another", "misaddressed"),
    ("claim", "task_object"),
    ("result", "task_object"),
    ("cancel", "task_object"),
)
"""Words of the protocol's drop reasons (`protocol.effects.Dropped`) and the fixed reason each
stands for, the first match winning; anything else (a decoding error) is "malformed"."""


def drop_reason(text: str) -> str:
    """The label of one of `DROP_REASONS` for the free-text reason of a `Dropped` note."""
    for word, reason in _DROP_WORDS:
        if word in text:
            return reason
    return "malformed"


class EventMetrics:
    """The instruments observed at events, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.submit_to_start = Histogram(
            "grapevine_task_submit_to_start_seconds",
            "From a task's submission (its record's creation time) to the start of an "
            "execution here.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.submit_to_result = Histogram(
            "grapevine_task_submit_to_result_seconds",
            "From a task's submission to its first accepted result, for tasks submitted here.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.claims = Counter(
            "grapevine_task_claims",
            "Claims this peer made (each starts an execution here; takeovers included).",
            registry=registry,
        )
        self.duplicates = Counter(
            "grapevine_task_duplicate_executions",
            "Executions started here of a task that another run had claimed before.",
            registry=registry,
        )
        self.executions = Counter(
            "grapevine_task_executions",
            "Executions here that ended, by outcome (ok, failed, timeout, fenced, cancelled).",
            ["outcome"],
            registry=registry,
        )
        self.dropped = Counter(
            "grapevine_inputs_dropped",
            "Inputs the protocol rejected after opening their envelope, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        self.store_write = Histogram(
            "grapevine_store_write_seconds",
            "Duration of one committed (fsynced) store transaction.",
            buckets=WRITE_BUCKETS,
            registry=registry,
        )
