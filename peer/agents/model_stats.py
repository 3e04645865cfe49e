"""Per model and server: the counters and state the model client keeps, and the running totals
that outlive a restart.

Invariants:
- One `ModelStats` per model and server (`stats_key`): one model name served by two local
  servers must not share a breaker or a tally. A key never holds a credential of the
  server's URL (`shown_server`), saved keys included once restored.
- `usage_totals` gives the running totals (`USAGE_TOTALS`), JSON-able; `restore_usage` adds
  saved totals back, skipping anything that is not a non-negative count, so a damaged tally
  never stops a peer. The state of the moment (breaker, waiting calls, recent starts) is not
  kept: it means nothing after a restart (decision 52).
- `advertised` picks what the peer state carries (decision 54): per model name (its servers
  summed, the worst breaker), those whose breaker is not closed first, then the costliest, at
  most `MAX_STATE_MODELS`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from peer.agents.endpoints import ModelEndpoint
from peer.agents.limits import CircuitBreaker
from protocol.wire import MAX_NAME_CHARS, MAX_STATE_MODELS, Breaker, ModelUsage

USAGE_TOTALS = (
    "calls",
    "ok",
    "errors",
    "retries",
    "waits",
    "wait_seconds",
    "prompt_tokens",
    "completion_tokens",
    "cost_micro",
)
"""The counters of `ModelStats` kept across restarts."""


@dataclass(slots=True)
class ModelStats:
    """What the client counts and holds for one model on one server."""

    model: str
    breaker: CircuitBreaker
    calls: int = 0
    ok: int = 0
    errors: int = 0
    retries: int = 0
    waits: int = 0
    wait_seconds: float = 0.0
    waiting: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micro: int = 0
    resume_at: float = 0.0
    """No attempt before this (a provider's Retry-After), for every caller of the model."""
    starts: deque[float] = field(default_factory=deque)


def stats_key(model: str, endpoint: ModelEndpoint) -> str:
    """The key of a model's stats: the model, and its server when it has its own (as
    `shown_server` shows it)."""
    return model if endpoint.api_base is None else f"{model}@{shown_server(endpoint.api_base)}"


def shown_server(api_base: str) -> str:
    """`api_base` as stats keys show it (metrics labels, `/v1/agents`, the dashboard, the
    saved totals): without the credentials a URL may carry (`user:password@`, a query such as
    `?key=...`, a fragment), which those must never expose. Scheme, host, port and path stay,
    so two servers stay apart."""
    parts = urlsplit(api_base)
    if not parts.scheme or not parts.netloc:
        return api_base.split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def usage_totals(stats: Mapping[str, ModelStats]) -> dict[str, dict[str, str | int | float]]:
    """Per stats key, the model and its running totals."""
    return {
        key: {"model": s.model, **{name: getattr(s, name) for name in USAGE_TOTALS}}
        for key, s in sorted(stats.items())
    }


def restore_usage(
    stats: dict[str, ModelStats],
    saved: Mapping[str, Mapping[str, object]],
    breaker: Callable[[], CircuitBreaker],
) -> None:
    """Add `saved` totals (`usage_totals` of an earlier life) to `stats`, creating the stats
    of models not called yet in this life (each with a new `breaker()`)."""
    for saved_key, totals in saved.items():
        model = totals.get("model")
        if not isinstance(model, str) or not model:
            continue
        key = _shown_key(saved_key, model)
        held = stats.get(key)
        if held is None:
            held = stats[key] = ModelStats(model, breaker())
        for name in USAGE_TOTALS:
            value = totals.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                kind = type(getattr(held, name))
                setattr(held, name, getattr(held, name) + kind(value))


def _shown_key(key: str, model: str) -> str:
    # Totals saved before `shown_server` existed may be keyed by the whole api_base.
    server = key.removeprefix(f"{model}@")
    return key if server == key else f"{model}@{shown_server(server)}"


BREAKERS = {"closed": Breaker.CLOSED, "open": Breaker.OPEN, "half_open": Breaker.HALF_OPEN}
"""`CircuitBreaker.state` as the wire names it."""


def advertised(stats: Mapping[str, ModelStats]) -> tuple[ModelUsage, ...]:
    """The models a peer state carries (see the module invariants)."""
    spend: dict[str, int] = {}
    worst: dict[str, Breaker] = {}
    usage: dict[str, tuple[int, int, int]] = {}
    for s in stats.values():
        if not 0 < len(s.model) <= MAX_NAME_CHARS:
            continue  # a name the wire cannot carry is left out of the advertisement
        spend[s.model] = spend.get(s.model, 0) + s.cost_micro
        state = BREAKERS.get(s.breaker.state, Breaker.OPEN)
        worst[s.model] = max(worst.get(s.model, Breaker.CLOSED), state)
        tokens, waits, waiting = usage.get(s.model, (0, 0, 0))
        usage[s.model] = (
            tokens + s.prompt_tokens + s.completion_tokens,
            waits + s.waits,
            waiting + s.waiting,
        )
    ranked = sorted(spend, key=lambda m: (worst[m] == Breaker.CLOSED, -spend[m], m))
    return tuple(ModelUsage(m, spend[m], worst[m], *usage[m]) for m in ranked[:MAX_STATE_MODELS])
