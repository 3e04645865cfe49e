"""The model client: every model call of the agent host goes through `ModelClient.complete`.

A call is: resolve the endpoint (server, key, params; `peer.agents.endpoints`), wait for the
model's circuit breaker and rate limits (`peer.agents.limits`), call `litellm.acompletion`
(streamed when the endpoint says `stream`: `peer.agents.streaming`), retry retryable provider
errors with exponential backoff and jitter (or the provider's
`Retry-After`), and turn the response into a provider-neutral `Completion`.

Invariants:
- litellm is imported on the first call that needs it, never at import time of this module
  (it costs ~2.5 s and ~170 MB), in a worker thread so the event loop keeps serving, with
  `LITELLM_LOCAL_MODEL_COST_MAP` set first so it never downloads its price list. The first
  import also registers the offline provider.
- Waiting for a limit or an open breaker never fails a call; only a non-retryable provider
  error, a missing or rejected credential, a `Retry-After` past the task's deadline or
  exhausted retries do, as `ModelError`. A rejected credential (401, 403) is never retried and
  never counted against the breaker (`peer.agents.provider_errors`).
- Each call goes to the endpoint resolved for it (`LlmSettings.endpoint_for`); breakers and
  counters are per model and server, rate limits and network shares per model string.
- This client owns retries: the SDK under litellm is told not to retry (`max_retries=0`).
- A streamed call is one attempt from the request to the stream's end: limits, breaker,
  retries and `Retry-After` treat it as they treat a whole reply, and a stream cut midway is
  retried whole. Its `Completion` is the one the same reply unstreamed would give. The
  offline model always answers whole.
- Each attempt reserves one request and an estimate of its tokens; the reservation is
  corrected by the actual usage (or refunded when the attempt failed).
- Time comes from the injected `clock`, waiting from the injected `sleep`, jitter from the
  injected `random.Random`: tests drive all three.
- A tool call whose arguments are not a JSON object is kept as {"_raw": text}, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from peer.agents.endpoints import MissingCredential, ModelEndpoint
from peer.agents.limits import CircuitBreaker, ModelLimiter
from peer.agents.model_settings import LlmSettings
from peer.agents.model_stats import (
    ModelStats,
    advertised,
    restore_usage,
    shown_server,
    stats_key,
    usage_totals,
)
from peer.agents.offline import OFFLINE_MODEL, PROVIDER, OfflineModel
from peer.agents.ports import Completion, ModelError, ToolCall
from peer.agents.provider_errors import ErrorKind, classify, retry_after
from peer.agents.streaming import streamed_completion
from peer.observability.logs import adopt_litellm_loggers
from protocol.wire import ModelUsage

log = logging.getLogger(__name__)

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
MAX_RETRY_AFTER = 300.0
"""A provider asking to wait longer than this (a spent daily quota) fails the call: a task
should not hold its slot for hours."""
TASK_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "grapevine_task_deadline", default=None
)
"""When the task the current model calls serve must end, on the client's clock; set by
`ModelClient.task_deadline`."""


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
        env: Mapping[str, str] | None = None,
        wall_clock: Callable[[], float] = time.time,
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
            pass litellm's `mock_response` here; deployments configure endpoints instead).
        env: where `api_key_env` variables are read, at each call; `os.environ` when None.
        wall_clock: Unix time, for a `Retry-After` given as an HTTP date.
        """
        self.settings = settings or LlmSettings()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._network_share = network_share
        self._extra = extra_kwargs if extra_kwargs is not None else {}
        self._env = env if env is not None else os.environ
        self._wall_clock = wall_clock
        self._credential_reported: set[str] = set()
        self._limiter = ModelLimiter(self.settings.limits, self.settings.default_limits)
        self._stats: dict[str, ModelStats] = {}
        self._offline = OfflineModel()
        self._litellm: Any = None
        self._importing: asyncio.Future[Any] | None = None

    async def complete(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        endpoint: ModelEndpoint | None = None,
    ) -> Completion:
        """Call `model` (a litellm model string) and return its reply.

        Waits (does not fail) while rate-limited, while the model's breaker is open, and for
        as long as a provider's `Retry-After` asks (within the task's deadline).

        Args:
            endpoint: the calling agent's server, key variable and params, over the model's
                and `[llm]`'s (`LlmSettings.endpoint_for`).

        Raises:
            ModelError: a non-retryable provider error; a missing or rejected credential
                (never retried); a `Retry-After` beyond the task's deadline; retries exhausted.
        """
        resolved = self.settings.endpoint_for(model, endpoint)
        try:
            connection = resolved.call_kwargs(self._env)
        except MissingCredential as exc:
            raise ModelError(f"{model}: {exc}") from None
        stats = self._stats_for(model, resolved)
        stream = resolved.streams and not model.startswith(f"{PROVIDER}/")
        estimate = _estimate_tokens(messages, tools) + (max_tokens or COMPLETION_ESTIMATE)
        attempt = 0
        while True:
            await self._admit(model, stats, estimate)
            stats.calls += 1
            stats.starts.append(self._clock())
            _forget_before(stats.starts, stats.starts[-1] - DEMAND_WINDOW)
            try:
                completion = await self._attempt(
                    model, connection, messages, tools, temperature, max_tokens, stream
                )
            except asyncio.CancelledError:
                stats.breaker.on_abandoned(self._clock())
                self._limiter.settle(model, self._clock(), estimate, 0)
                raise
            except Exception as exc:
                now = self._clock()
                stats.errors += 1
                self._limiter.settle(model, now, estimate, 0)
                kind = ErrorKind.FAIL if self._litellm is None else classify(self._litellm, exc)
                if kind is not ErrorKind.RETRY:
                    # The provider answered (bad request, rejected key): it is up, so the
                    # breaker counts a success; the call fails for good.
                    stats.breaker.on_success(now)
                    if kind is ErrorKind.CREDENTIAL:
                        raise ModelError(self._credential_rejected(model, resolved, exc)) from exc
                    raise ModelError(f"{model}: {_describe(exc)}") from exc
                stats.breaker.on_failure(now)
                if attempt >= self.settings.retries:
                    raise ModelError(
                        f"{model}: gave up after {attempt + 1} attempts: {_describe(exc)}"
                    ) from exc
                delay = self._delay_before_retry(model, stats, attempt, exc, now)
                stats.retries += 1
                await self._sleep(delay)
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

    def spend_micro(self) -> int:
        """Micro-dollars every model call here cost so far, all models together."""
        return sum(s.cost_micro for s in self._stats.values())

    def usage_totals(self) -> dict[str, dict[str, str | int | float]]:
        """Per model and server, the running totals worth keeping across a restart
        (`peer.agents.model_stats`)."""
        return usage_totals(self._stats)

    def advertised_models(self) -> tuple[ModelUsage, ...]:
        """What this peer's state says of its models: spend and breaker, the most telling
        `MAX_STATE_MODELS` (`peer.agents.model_stats.advertised`)."""
        return advertised(self._stats)

    def restore_usage(self, saved: Mapping[str, Mapping[str, object]]) -> None:
        """Count on from `saved` (`usage_totals` of an earlier life, from the store)."""
        restore_usage(self._stats, saved, self._new_breaker)

    def demand(self) -> dict[str, float]:
        """Per model, requests per minute this peer would make if unlimited: the calls started
        in the last minute plus those waiting now (gossiped for `limits.NetworkShare`)."""
        now = self._clock()
        demand: dict[str, float] = {}
        for stats in self._stats.values():
            _forget_before(stats.starts, now - DEMAND_WINDOW)
            wanted = len(stats.starts) * 60.0 / DEMAND_WINDOW + stats.waiting
            demand[stats.model] = demand.get(stats.model, 0.0) + wanted
        return demand

    def with_endpoint(self, endpoint: ModelEndpoint) -> EndpointModel:
        """A `Model` whose calls go through this client to `endpoint` (an agent's own
        `api_base`, `api_key_env` and `params`)."""
        return EndpointModel(self, endpoint)

    @contextlib.contextmanager
    def task_deadline(self, seconds: float) -> Iterator[None]:
        """Within the block, calls serve a task that must end within `seconds` (0: no
        deadline): a `Retry-After` reaching past it fails the call at once instead of
        sleeping until the task times out."""
        token = TASK_DEADLINE.set(self._clock() + seconds if seconds > 0 else None)
        try:
            yield
        finally:
            TASK_DEADLINE.reset(token)

    async def _admit(self, model: str, stats: ModelStats, estimate: int) -> None:
        """Wait until the provider's Retry-After has passed, the breaker lets the call through
        and the limits are reserved."""
        waited = False
        stats.waiting += 1
        try:
            while True:
                now = self._clock()
                wait = max(0.0, stats.resume_at - now)
                if wait == 0:
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
        connection: Mapping[str, Any],
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        temperature: float | None,
        max_tokens: int | None,
        stream: bool,
    ) -> Completion:
        if model == OFFLINE_MODEL and not self.settings.offline_via_litellm:
            thinking = self._offline.think_seconds(messages)
            if thinking:
                await self._sleep(thinking)
            reply = self._offline.reply(messages, tools)
            return Completion(
                reply.content,
                reply.tool_calls,
                reply.prompt_tokens,
                reply.completion_tokens,
                0,
                model,
            )
        litellm = await self._import_litellm()
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
            # The OpenAI SDK under litellm retries twice by default, unseen by the breaker
            # and the limits; this client owns the retry policy.
            "max_retries": 0,
            **connection,
        }
        if tools:
            kwargs["tools"] = tools
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        kwargs.update(self._extra)
        if stream:
            response = await streamed_completion(litellm, kwargs, self.settings.timeout)
        else:
            response = await litellm.acompletion(**kwargs)
        return _to_completion(litellm, model, response)

    async def _import_litellm(self) -> Any:
        # In a worker thread: on the event loop, the import held it for seconds (measured 2.5 to
        # 5 s), long enough for the node to find itself isolated and fence its runs (decision
        # 48). The first callers share one import; a failed one fails each call that waited.
        if self._litellm is None:
            if self._importing is None:
                self._importing = asyncio.ensure_future(asyncio.to_thread(import_litellm))
            self._litellm = await asyncio.shield(self._importing)
        return self._litellm

    def _delay_before_retry(
        self, model: str, stats: ModelStats, attempt: int, exc: Exception, now: float
    ) -> float:
        """The backoff, or the provider's Retry-After when longer (which then holds every
        caller of the model).

        Raises:
            ModelError: the Retry-After reaches past the task's deadline or MAX_RETRY_AFTER.
        """
        delay = self._backoff(attempt)
        asked = retry_after(exc, self._wall_clock())
        if asked is None:
            return delay
        deadline = TASK_DEADLINE.get()
        if asked > MAX_RETRY_AFTER or (deadline is not None and now + asked > deadline):
            bound = (
                f"more than {MAX_RETRY_AFTER:g} s"
                if deadline is None or now + MAX_RETRY_AFTER < deadline
                else f"past the task's deadline, {max(0.0, deadline - now):.1f} s away"
            )
            raise ModelError(
                f"{model}: rate limited; the provider asks to retry after {asked:g} s, {bound}"
            ) from exc
        stats.resume_at = max(stats.resume_at, now + asked)
        return max(delay, asked)

    def _credential_rejected(self, model: str, endpoint: ModelEndpoint, exc: Exception) -> str:
        """The failure message of a rejected key; also logged, once per model and server."""
        status = getattr(exc, "status_code", None)
        variable = endpoint.api_key_env or "the provider's key variable, or set api_key_env"
        # The message becomes the task's signed result: the server without its credentials.
        where = f" at {shown_server(endpoint.api_base)}" if endpoint.api_base else ""
        text = f"model {model}{where}: the provider rejected the credential (HTTP {status}); "
        text += f"check {variable}"
        key = stats_key(model, endpoint)
        if key not in self._credential_reported:
            self._credential_reported.add(key)
            log.error("%s", text)
        return f"{text}: {_describe(exc)}"

    def _backoff(self, attempt: int) -> float:
        delay = min(self.settings.backoff_max, self.settings.backoff_base * 2.0**attempt)
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def _stats_for(self, model: str, endpoint: ModelEndpoint) -> ModelStats:
        key = stats_key(model, endpoint)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ModelStats(model, self._new_breaker())
        return stats

    def _new_breaker(self) -> CircuitBreaker:
        return CircuitBreaker(self.settings.breaker_errors, self.settings.breaker_cooldown)


class EndpointModel:
    """A `peer.agents.ports.Model` bound to one endpoint: an agent's calls through the shared
    client (its limits, breakers and counters), to the agent's own server and key."""

    def __init__(self, client: ModelClient, endpoint: ModelEndpoint) -> None:
        self.client = client
        self.endpoint = endpoint

    async def complete(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Completion:
        """`ModelClient.complete` with this endpoint."""
        return await self.client.complete(
            model,
            messages,
            tools,
            temperature=temperature,
            max_tokens=max_tokens,
            endpoint=self.endpoint,
        )


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
