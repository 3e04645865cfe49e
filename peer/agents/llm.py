"""The model client: every model call of the agent host goes through `ModelClient.complete`.

A call is: wait for the model's circuit breaker and rate limits (`peer.agents.limits`), call
`litellm.acompletion`, retry retryable provider errors with exponential backoff and jitter,
and turn the response into a provider-neutral `Completion`.

Invariants:
- litellm is imported on the first call that needs it, never at import time of this module
  (it costs ~2.5 s and ~170 MB), with `LITELLM_LOCAL_MODEL_COST_MAP` set first so it never
  downloads its price list. The first import also registers the offline provider.
- Waiting for a limit or an open breaker never fails a call; only a non-retryable provider
  error or exhausted retries do, as `ModelError`.
- Each attempt reserves one request and an estimate of its tokens; the reservation is
  corrected by the actual usage (or refunded when the attempt failed).
- Time comes from the injected `clock`, waiting from the injected `sleep`, jitter from the
  injected `random.Random`: tests drive all three.
- A tool call whose arguments are not a JSON object is kept as {"_raw": text}, never raised.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peer.agents.limits import CircuitBreaker, ModelLimiter
from peer.agents.offline import OFFLINE_MODEL, PROVIDER, OfflineModel
from peer.agents.ports import Completion, ModelError, ToolCall
from peer.observability.logs import adopt_litellm_loggers

COMPLETION_ESTIMATE = 512
"""Tokens reserved for a reply when the call gives no max_tokens (settled after the call)."""
MAX_WAIT_STEP = 1.0
"""Longest single sleep while waiting: callers behind a half-open breaker re-ask this often."""
MIN_WAIT_STEP = 0.001
"""Shortest single sleep while waiting: a clock that does not move in a tinier step (floats
near 1e9) must not spin the loop."""
MIN_SHARE_PER_MINUTE = 1.0
"""A network share below this is raised to it: a peer is never shut out entirely."""
DEMAND_WINDOW = 60.0
"""Demand (for the network share) counts the calls started within this many seconds."""


@dataclass(frozen=True, slots=True)
class LlmSettings:
    """How model calls are retried, limited and guarded; the `[llm]` table of the config."""

    retries: int = 3
    """Retries after a retryable provider error (so up to retries + 1 attempts). More rides
    out longer outages but holds a task (and its slot) longer before it fails."""
    backoff_base: float = 0.5
    """Seconds before the first retry; attempt n waits min(backoff_max, base × 2^n), of which
    a random half (equal jitter) so peers hitting the same outage do not retry in step."""
    backoff_max: float = 8.0
    """Cap of one backoff, in seconds."""
    breaker_errors: int = 5
    """Consecutive provider errors on a model that open its breaker (calls then wait rather
    than hammer a failing provider). Lower reacts faster but trips on short blips."""
    breaker_cooldown: float = 10.0
    """Seconds an open breaker waits before one probe call; doubles on each failed probe up to
    16 × this."""
    limits: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """model → (requests per minute, tokens per minute), 0 = unlimited: set them a little
    under the provider's limits so calls wait here instead of failing there."""
    default_limits: tuple[float, float] = (0.0, 0.0)
    """(requests per minute, tokens per minute) of a model not in `limits`."""
    network_requests_per_minute: float = 0.0
    """A requests-per-minute limit per model for the whole network (e.g. one shared API key),
    divided among peers by gossiped demand; 0 = off. The host keeps the shares
    (`limits.NetworkShare`) and hands the client its `network_share` hook."""
    offline_via_litellm: bool = True
    """Call the offline model through litellm like any provider (one code path). False calls
    it directly and never imports litellm while only the offline model is used: ~150 MB and
    ~2.5 s less per process, for scale runs with hundreds of peers on one machine."""
    timeout: float = 120.0
    """Seconds one provider call may take before it counts as a (retryable) timeout."""

    @classmethod
    def from_table(cls, table: Mapping[str, object]) -> LlmSettings:
        """Parse the `[llm]` table of a TOML config.

        Keys: retries, backoff_base, backoff_max, breaker_errors, breaker_cooldown,
        requests_per_minute and tokens_per_minute (the default limits),
        network_requests_per_minute, offline_via_litellm, timeout, and `models`, a table of
        model → {requests_per_minute, tokens_per_minute}.

        Raises:
            ValueError: an unknown key or a value of the wrong type or range; the message
                names the key.
        """
        known = {
            "retries", "backoff_base", "backoff_max", "breaker_errors", "breaker_cooldown",
            "requests_per_minute", "tokens_per_minute", "network_requests_per_minute",
            "offline_via_litellm", "timeout", "models",
        }  # fmt: skip
        for key in table:
            if key not in known:
                raise ValueError(f"llm.{key}: unknown key (known: {', '.join(sorted(known))})")
        defaults = cls()
        limits: dict[str, tuple[float, float]] = {}
        models = table.get("models", {})
        if not isinstance(models, Mapping):
            raise ValueError("llm.models: must be a table of model → limits")
        for model, entry in models.items():
            where = f"llm.models.{model!r}"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: must be a table")
            for key in entry:
                if key not in ("requests_per_minute", "tokens_per_minute"):
                    raise ValueError(f"{where}.{key}: unknown key")
            limits[str(model)] = (
                _number(entry, "requests_per_minute", 0.0, f"{where}."),
                _number(entry, "tokens_per_minute", 0.0, f"{where}."),
            )
        settings = cls(
            retries=_integer(table, "retries", defaults.retries, 0),
            backoff_base=_number(table, "backoff_base", defaults.backoff_base),
            backoff_max=_number(table, "backoff_max", defaults.backoff_max),
            breaker_errors=_integer(table, "breaker_errors", defaults.breaker_errors, 1),
            breaker_cooldown=_number(table, "breaker_cooldown", defaults.breaker_cooldown),
            limits=limits,
            default_limits=(
                _number(table, "requests_per_minute", 0.0),
                _number(table, "tokens_per_minute", 0.0),
            ),
            network_requests_per_minute=_number(table, "network_requests_per_minute", 0.0),
            offline_via_litellm=_boolean(table, "offline_via_litellm", True),
            timeout=_number(table, "timeout", defaults.timeout),
        )
        if settings.timeout <= 0:
            raise ValueError("llm.timeout: must be > 0")
        return settings


def _number(table: Mapping[str, object], key: str, default: float, prefix: str = "llm.") -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{prefix}{key}: must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{prefix}{key}: must be a finite number >= 0")
    return float(value)


def _integer(table: Mapping[str, object], key: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"llm.{key}: must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"llm.{key}: must be >= {minimum}")
    return value


def _boolean(table: Mapping[str, object], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"llm.{key}: must be true or false, not {type(value).__name__}")
    return value


@dataclass(slots=True)
class _ModelStats:
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
    starts: deque[float] = field(default_factory=deque)


class ModelClient:
    """The real `peer.agents.ports.Model`: litellm behind limits, a breaker and retries."""

    def __init__(
        self,
        settings: LlmSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        network_share: Callable[[str], float | None] | None = None,
        extra_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Args:
        settings: retries, limits and breaker; defaults when None.
        clock: monotonic seconds (limits and breaker run on it).
        sleep: awaits the given seconds (backoff and waiting for limits).
        rng: jitter source; seeded from the OS when None.
        network_share: model → this peer's requests-per-minute share of the network-wide
            limit (None: no cap for that model), applied as an extra requests-per-minute
            bucket; usually backed by `limits.NetworkShare`.
        extra_kwargs: merged into every `litellm.acompletion` call, read at each call (tests
            pass litellm's `mock_response` here; deployments may pass api_base and the like).
        """
        self.settings = settings or LlmSettings()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._network_share = network_share
        self._extra = extra_kwargs if extra_kwargs is not None else {}
        self._limiter = ModelLimiter(self.settings.limits, self.settings.default_limits)
        self._stats: dict[str, _ModelStats] = {}
        self._offline = OfflineModel()
        self._litellm: Any = None

    async def complete(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Completion:
        """Call `model` (a litellm model string) and return its reply.

        Waits (does not fail) while rate-limited or the model's breaker is open.

        Raises:
            ModelError: a non-retryable provider error, or retries exhausted.
        """
        stats = self._stats_for(model)
        estimate = _estimate_tokens(messages, tools) + (max_tokens or COMPLETION_ESTIMATE)
        attempt = 0
        while True:
            await self._admit(model, stats, estimate)
            stats.calls += 1
            stats.starts.append(self._clock())
            _forget_before(stats.starts, stats.starts[-1] - DEMAND_WINDOW)
            try:
                completion = await self._attempt(model, messages, tools, temperature, max_tokens)
            except asyncio.CancelledError:
                stats.breaker.on_abandoned(self._clock())
                self._limiter.settle(model, self._clock(), estimate, 0)
                raise
            except Exception as exc:
                now = self._clock()
                stats.errors += 1
                self._limiter.settle(model, now, estimate, 0)
                if not self._retryable(exc):
                    # The provider answered (bad request, auth): it is up, so the breaker
                    # counts a success; the call fails for good.
                    stats.breaker.on_success(now)
                    raise ModelError(f"{model}: {_describe(exc)}") from exc
                stats.breaker.on_failure(now)
                if attempt >= self.settings.retries:
                    raise ModelError(
                        f"{model}: gave up after {attempt + 1} attempts: {_describe(exc)}"
                    ) from exc
                stats.retries += 1
                await self._sleep(self._backoff(attempt))
                attempt += 1
                continue
            now = self._clock()
            stats.ok += 1
            stats.breaker.on_success(now)
            used = completion.prompt_tokens + completion.completion_tokens
            self._limiter.settle(model, now, estimate, used)
            stats.prompt_tokens += completion.prompt_tokens
            stats.completion_tokens += completion.completion_tokens
            stats.cost_micro += completion.cost_micro
            return completion

    def status(self) -> dict[str, Any]:
        """Per model: breaker state and counters, JSON-able (for the HTTP API)."""
        return {
            model: {
                "breaker": s.breaker.state,
                "breaker_opened": s.breaker.opened,
                "breaker_cooldown": s.breaker.cooldown,
                "calls": s.calls,
                "ok": s.ok,
                "errors": s.errors,
                "retries": s.retries,
                "waits": s.waits,
                "wait_seconds": round(s.wait_seconds, 3),
                "waiting": s.waiting,
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "cost_micro": s.cost_micro,
            }
            for model, s in sorted(self._stats.items())
        }

    def demand(self) -> dict[str, float]:
        """Per model, requests per minute this peer would make if unlimited: the calls started
        in the last minute plus those waiting now (gossiped for `limits.NetworkShare`)."""
        now = self._clock()
        demand = {}
        for model, stats in self._stats.items():
            _forget_before(stats.starts, now - DEMAND_WINDOW)
            demand[model] = len(stats.starts) * 60.0 / DEMAND_WINDOW + stats.waiting
        return demand

    async def _admit(self, model: str, stats: _ModelStats, estimate: int) -> None:
        """Wait until the breaker lets the call through and the limits are reserved."""
        waited = False
        stats.waiting += 1
        try:
            while True:
                now = self._clock()
                wait = stats.breaker.before_call(now)
                if wait == 0:
                    wait = self._limiter.reserve(model, now, estimate, self._share(model))
                    if wait > 0:
                        # A probe slot taken by a caller that must wait for its limits goes
                        # back, so the probe is not stuck behind this caller's sleep.
                        stats.breaker.on_abandoned(now)
                if wait == 0:
                    return
                if not waited:
                    stats.waits += 1
                    waited = True
                step = min(max(wait, MIN_WAIT_STEP), MAX_WAIT_STEP)
                stats.wait_seconds += step
                await self._sleep(step)
        finally:
            stats.waiting -= 1

    def _share(self, model: str) -> float | None:
        if self._network_share is None:
            return None
        share = self._network_share(model)
        return None if share is None else max(share, MIN_SHARE_PER_MINUTE)

    async def _attempt(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        temperature: float | None,
        max_tokens: int | None,
    ) -> Completion:
        if model == OFFLINE_MODEL and not self.settings.offline_via_litellm:
            reply = self._offline.reply(messages, tools)
            return Completion(
                reply.content,
                reply.tool_calls,
                reply.prompt_tokens,
                reply.completion_tokens,
                0,
                model,
            )
        litellm = self._import_litellm()
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "timeout": self.settings.timeout,
            # Parameters a model does not take (e.g. temperature on reasoning models) are
            # dropped rather than failing the call.
            "drop_params": True,
            # litellm >= 1.7x routes any call with tools through its MCP gateway check,
            # which imports the optional `mcp` package; our tools are plain functions.
            "_skip_mcp_handler": True,
        }
        if tools:
            kwargs["tools"] = tools
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        kwargs.update(self._extra)
        response = await litellm.acompletion(**kwargs)
        return _to_completion(litellm, model, response)

    def _import_litellm(self) -> Any:
        if self._litellm is None:
            self._litellm = import_litellm()
        return self._litellm

    def _retryable(self, exc: Exception) -> bool:
        litellm = self._litellm
        if litellm is None:
            return False
        retryable = (
            litellm.RateLimitError,
            litellm.APIConnectionError,
            litellm.Timeout,
            litellm.InternalServerError,
            litellm.ServiceUnavailableError,
            litellm.BadGatewayError,
        )
        return isinstance(exc, retryable)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.settings.backoff_max, self.settings.backoff_base * 2.0**attempt)
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def _stats_for(self, model: str) -> _ModelStats:
        stats = self._stats.get(model)
        if stats is None:
            breaker = CircuitBreaker(self.settings.breaker_errors, self.settings.breaker_cooldown)
            stats = self._stats[model] = _ModelStats(breaker)
        return stats


def import_litellm() -> Any:
    """Import litellm the way the host needs it: no price-list download, offline provider
    registered, no banner lines on stdout. Returns the module."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    from peer.agents.offline import register_with_litellm

    # litellm prints "Give Feedback / Get Help" banners to stdout on errors; the peer's
    # stdout belongs to the CLI and the logs.
    litellm.suppress_debug_info = True
    adopt_litellm_loggers()
    register_with_litellm()
    return litellm


def _to_completion(litellm: Any, model: str, response: Any) -> Completion:
    message = response.choices[0].message
    calls = tuple(_tool_call(raw) for raw in (getattr(message, "tool_calls", None) or []))
    usage = getattr(response, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    return Completion(
        message.content or "",
        calls,
        prompt_tokens,
        completion_tokens,
        _cost_micro(litellm, model, response),
        model,
    )


def _tool_call(raw: Any) -> ToolCall:
    text = raw.function.arguments or "{}"
    try:
        arguments = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        # A model that wrote broken JSON: keep what it said so the agent loop can report it
        # back to the model instead of crashing the task.
        arguments = {"_raw": text if isinstance(text, str) else json.dumps(text, default=str)}
    return ToolCall(str(raw.id or ""), str(raw.function.name or ""), arguments)


def _cost_micro(litellm: Any, model: str, response: Any) -> int:
    """litellm's price of the call in millionths of a dollar; 0 when it cannot price it."""
    if model.startswith(f"{PROVIDER}/"):
        return 0
    try:
        dollars = float(litellm.completion_cost(completion_response=response, model=model))
    except Exception:
        # An unpriced model (self-hosted, new) must not fail a call that succeeded.
        return 0
    return max(0, round(dollars * 1_000_000))


def _estimate_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    """About 4 characters a token: good enough to reserve, corrected by the actual usage."""
    text = json.dumps([messages, tools], ensure_ascii=False, default=str)
    return math.ceil(len(text) / 4)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def _forget_before(starts: deque[float], cutoff: float) -> None:
    while starts and starts[0] < cutoff:
        starts.popleft()
