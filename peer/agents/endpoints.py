"""Where and how a model is called: its server, the name of its credential, extra litellm
parameters; parsed from `[llm]`, `[llm.models."m"]` and `[[agents]]`.

Invariants:
- A key is never written in a config: only the NAME of the environment variable that holds it
  (`api_key_env`). Its value is read from the environment at call time and never logged.
- Three levels, most specific first: an agent's endpoint, then its model's
  (`[llm.models."m"]`), then `[llm]`'s. `api_base` and `api_key_env` are taken from the first
  level that gives them; `params` merge key by key in the same order.
- A parameter the model client sets itself (the model, messages, tools, key, server, timeout,
  retries, stream options, sampling) is refused in `params`, so every setting has one home and
  a `params` entry cannot quietly undo the client's retry or credential rules.
- `params.stream` (true or false) is the one parameter the client reads rather than passes:
  it chooses how the client reads the reply (`ModelEndpoint.streams`), never what it returns.
- Parse errors are one line starting with where the value is ("agents[0].api_key_env: ...").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENDPOINT_KEYS = ("api_base", "api_key_env", "params")
"""The keys an endpoint adds to `[llm]`, `[llm.models."m"]` and each `[[agents]]` table."""

CLIENT_PARAMS = {
    "model": "the agent's `model`",
    "messages": "the conversation",
    "tools": "the agent's `tools`",
    "tool_choice": "the agent loop",
    "stream_options": "the model client (it asks for usage when `stream` is true)",
    "api_key": "`api_key_env` (the name of the environment variable holding the key)",
    "api_base": "`api_base`",
    "base_url": "`api_base`",
    "timeout": "`[llm] timeout`",
    "request_timeout": "`[llm] timeout`",
    "num_retries": "`[llm] retries` (the client retries, with its breaker)",
    "max_retries": "`[llm] retries` (the client retries, with its breaker)",
    "temperature": "the agent's `temperature`",
    "max_tokens": "the agent's `max_tokens`",
}
"""litellm parameters `params` may not set → the setting that owns each."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class ModelEndpoint:
    """How to reach a model beyond its litellm string; every field optional."""

    api_base: str | None = None
    """The server's base URL ("http://127.0.0.1:8000/v1" for vLLM, "http://127.0.0.1:11434"
    for Ollama); None: the provider's default (or its usual environment variable)."""
    api_key_env: str | None = None
    """The name of the environment variable holding the key; None: the provider's usual one
    (OPENAI_API_KEY, ANTHROPIC_API_KEY, …), read by litellm itself."""
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Extra keyword arguments of `litellm.acompletion` (e.g. `top_p`, `extra_headers`,
    `reasoning_effort`), passed as written; `stream = true` has replies streamed (`streams`)."""

    def over(self, base: ModelEndpoint) -> ModelEndpoint:
        """This endpoint, with what it leaves unset taken from `base`."""
        return ModelEndpoint(
            self.api_base if self.api_base is not None else base.api_base,
            self.api_key_env if self.api_key_env is not None else base.api_key_env,
            {**base.params, **self.params},
        )

    @property
    def streams(self) -> bool:
        """Whether calls read the reply as a stream (`params.stream`; default false)."""
        return self.params.get("stream") is True

    def call_kwargs(self, env: Mapping[str, str]) -> dict[str, Any]:
        """The `litellm.acompletion` keyword arguments of this endpoint, but `stream` (the
        client sets it, with its stream options, when `streams`).

        Raises:
            MissingCredential: `api_key_env` names a variable that is not set (or empty).
        """
        kwargs = {key: value for key, value in self.params.items() if key != "stream"}
        if self.api_base is not None:
            kwargs["api_base"] = self.api_base
        if self.api_key_env is not None:
            key = env.get(self.api_key_env, "")
            if not key:
                raise MissingCredential(self.api_key_env)
            kwargs["api_key"] = key
        return kwargs


class MissingCredential(Exception):
    """An endpoint's `api_key_env` names an environment variable that is not set."""

    def __init__(self, variable: str) -> None:
        super().__init__(f"the environment variable {variable} (api_key_env) is not set")
        self.variable = variable


def parse_endpoint(where: str, table: Mapping[str, object]) -> ModelEndpoint:
    """Read the endpoint keys (`ENDPOINT_KEYS`) of a config table; other keys are the
    caller's to check.

    Args:
        where: the table's place for error messages, e.g. "agents[2]" or "llm".

    Raises:
        ValueError: a key of the wrong type or a refused parameter; the message starts with
            `where` and the key.
    """
    api_base = table.get("api_base")
    if api_base is not None and (not isinstance(api_base, str) or not api_base.strip()):
        raise ValueError(f"{where}.api_base: must be a URL string, got {api_base!r}")
    api_key_env = table.get("api_key_env")
    if api_key_env is not None and (
        not isinstance(api_key_env, str) or not _ENV_NAME.fullmatch(api_key_env)
    ):
        raise ValueError(
            f"{where}.api_key_env: must be the NAME of an environment variable (letters, digits "
            f"and _), not the key itself; got {_redacted(api_key_env)}"
        )
    params = table.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(
            f"{where}.params: must be a table of litellm parameters, got {type(params).__name__}"
        )
    for key in params:
        owner = CLIENT_PARAMS.get(key)
        if owner is not None:
            raise ValueError(f"{where}.params.{key}: set by {owner}, not in params")
        if key.startswith(("_", "mock_")):
            raise ValueError(f"{where}.params.{key}: litellm's internal parameters are refused")
    stream = params.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError(f"{where}.params.stream: must be true or false, got {stream!r}")
    return ModelEndpoint(api_base, api_key_env, dict(params))


def _redacted(value: object) -> str:
    """A wrong `api_key_env` may be a pasted key: show its type and length, never the text."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return type(value).__name__
