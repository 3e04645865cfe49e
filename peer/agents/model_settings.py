"""The model layer's settings: the `[llm]` table (retries, limits, breaker, endpoints) and the
start-time check of the credentials the configured models use.

Invariants:
- Parsing is the only place the `[llm]` table is trusted; an unknown key or a value of the
  wrong type or range raises `ValueError` naming the key ("llm.retries: ...").
- Importing this module never imports litellm: the settings load before the peer decides
  whether it needs litellm at all.
- A credential is checked by the name of its variable only; its value is never shown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peer.agents.endpoints import ENDPOINT_KEYS, MissingCredential, ModelEndpoint, parse_endpoint

if TYPE_CHECKING:
    from peer.agents.spec import AgentSpec


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
    endpoint: ModelEndpoint = field(default_factory=ModelEndpoint)
    """`api_base`, `api_key_env` and `params` of `[llm]`: the defaults of every model."""
    endpoints: Mapping[str, ModelEndpoint] = field(default_factory=dict)
    """model → its `api_base`, `api_key_env` and `params` (`[llm.models."m"]`), over
    `endpoint`; an agent's own settings go over these."""

    def endpoint_for(self, model: str, agent: ModelEndpoint | None = None) -> ModelEndpoint:
        """The endpoint a call of `model` uses: the agent's, over the model's, over `[llm]`'s."""
        endpoint = self.endpoints.get(model, ModelEndpoint()).over(self.endpoint)
        return endpoint if agent is None else agent.over(endpoint)

    @classmethod
    def from_table(cls, table: Mapping[str, object]) -> LlmSettings:
        """Parse the `[llm]` table of a TOML config.

        Keys: retries, backoff_base, backoff_max, breaker_errors, breaker_cooldown,
        requests_per_minute and tokens_per_minute (the default limits),
        network_requests_per_minute, offline_via_litellm, timeout, the endpoint keys
        (`peer.agents.endpoints.ENDPOINT_KEYS`), and `models`, a table of model →
        {requests_per_minute, tokens_per_minute, endpoint keys}.

        Raises:
            ValueError: an unknown key or a value of the wrong type or range; the message
                names the key.
        """
        known = {
            "retries", "backoff_base", "backoff_max", "breaker_errors", "breaker_cooldown",
            "requests_per_minute", "tokens_per_minute", "network_requests_per_minute",
            "offline_via_litellm", "timeout", "models", *ENDPOINT_KEYS,
        }  # fmt: skip
        for key in table:
            if key not in known:
                raise ValueError(f"llm.{key}: unknown key (known: {', '.join(sorted(known))})")
        defaults = cls()
        limits: dict[str, tuple[float, float]] = {}
        endpoints: dict[str, ModelEndpoint] = {}
        models = table.get("models", {})
        if not isinstance(models, Mapping):
            raise ValueError("llm.models: must be a table of model → limits")
        for model, entry in models.items():
            where = f"llm.models.{model!r}"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: must be a table")
            for key in entry:
                if key not in ("requests_per_minute", "tokens_per_minute", *ENDPOINT_KEYS):
                    raise ValueError(f"{where}.{key}: unknown key")
            endpoint = parse_endpoint(where, entry)
            if endpoint != ModelEndpoint():
                endpoints[str(model)] = endpoint
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
            endpoint=parse_endpoint("llm", table),
            endpoints=endpoints,
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


def check_credentials(
    agents: Sequence[AgentSpec], settings: LlmSettings, env: Mapping[str, str]
) -> None:
    """Check at start that every `api_key_env` the configured models use names a set variable.

    Args:
        agents: the configured agents (`agents[i]` in messages).
        settings: the `[llm]` settings (its `models` are checked too: spawned agents use them).
        env: the environment the peer will read the keys from.

    Raises:
        ValueError: one line naming each model and variable that is missing.
    """
    missing: list[str] = []
    for where, model, endpoint in _models_used(agents, settings):
        try:
            endpoint.call_kwargs(env)
        except MissingCredential as exc:
            missing.append(f"{where} (model {model}): api_key_env {exc.variable} is not set")
    if missing:
        raise ValueError("; ".join(missing))


OFFLINE_PREFIX = "grapevine/"
"""Model strings of the offline stand-in (`peer.agents.offline.PROVIDER`; not imported here,
it costs tens of milliseconds and settings load on the CLI's path)."""


def _models_used(
    agents: Sequence[AgentSpec], settings: LlmSettings
) -> list[tuple[str, str, ModelEndpoint]]:
    """(where it is configured, model, resolved endpoint) of every configured model."""
    used = [
        (f"agents[{i}]", spec.model, settings.endpoint_for(spec.model, spec.endpoint))
        for i, spec in enumerate(agents)
    ]
    used += [
        (f"llm.models.{model!r}", model, settings.endpoint_for(model))
        for model in settings.endpoints
    ]
    return used


def unset_provider_keys(
    agents: Sequence[AgentSpec],
    settings: LlmSettings,
    validate: Callable[[str], Mapping[str, object]],
) -> list[str]:
    """One line per configured model whose provider's usual key variables are all unset
    (`validate` is `litellm.validate_environment(model=...)`), for the peer to log at start.

    Models with an `api_key_env` (checked by `check_credentials`) or an `api_base` (a local or
    private server, which may need no key) and the offline model are left out, and so are
    variables that name a server rather than a key (litellm lists `OLLAMA_API_BASE`). A
    warning, not an error: a provider may take credentials from elsewhere (AWS profiles,
    Google's default credentials), and a key that is set may still be refused; the first call
    says so (decision 65).
    """
    lines: list[str] = []
    for where, model, endpoint in _models_used(agents, settings):
        if endpoint.api_key_env or endpoint.api_base or model.startswith(OFFLINE_PREFIX):
            continue
        try:
            found = validate(model)
        except Exception:  # litellm knows no such provider: the first call will say so
            continue
        missing = found.get("missing_keys")
        if found.get("keys_in_environment") or not isinstance(missing, list):
            continue
        keys = [str(k) for k in missing if not str(k).endswith(("_API_BASE", "_BASE_URL"))]
        if keys:
            lines.append(
                f"{where} (model {model}): {' or '.join(keys)} is not set, so its calls will "
                "fail with an authentication error; set it, or name the variable that holds "
                "the key with api_key_env"
            )
    return lines
