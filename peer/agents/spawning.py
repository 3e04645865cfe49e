"""Spawn requests: the input of a `grapevine.spawn` task, and what the operator allows.

Theory of operation. The `spawn_agent` tool submits a child task of role `grapevine.spawn`
whose input is a `SpawnRequest`; the peer that claims it adds one agent (`peer.agents.host`).
Every call that agent makes is billed to that peer's keys, so before adding it the host asks
`SpawnAllowList.refusal`: the model and each tool must be among those its operator allows
(`[pool] models`, `[pool] tools`).

Invariants:
- Pure: decoding and the allow-list check read nothing but their arguments.
- A request that is malformed or not allowed fails its task with a message naming the field
  and the value; nothing on the peer changes.
- `final_answer` is always allowed and always given: an agent without it cannot finish.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from peer.agents.offline import OFFLINE_MODEL
from peer.agents.spec import (
    BUILTIN_TOOLS,
    RESERVED_PREFIX,
    RESERVED_ROLES,
    AgentSpec,
    PoolSettings,
    is_valid_name,
)

MAX_SPAWN_INPUT = 16 * 1024
ALWAYS_ALLOWED_TOOLS = ("final_answer",)


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """The input of a `grapevine.spawn` task."""

    role: str
    system: str
    model: str
    tools: tuple[str, ...]

    @classmethod
    def decode(cls, data: bytes) -> SpawnRequest:
        """Parse {"role", "system", "model", "tools"?}; tools default to ("final_answer",).

        Raises:
            ValueError: not a JSON object, a field missing or of the wrong type, a reserved
                or malformed role, or a tool that is not a built-in. The message says which.
        """
        if len(data) > MAX_SPAWN_INPUT:
            raise ValueError(f"spawn request is {len(data)} bytes (max {MAX_SPAWN_INPUT})")
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict):
            raise ValueError('spawn request must be a JSON object {"role", "system", "model"}')
        unknown = sorted(set(body) - {"role", "system", "model", "tools"})
        if unknown:
            raise ValueError(f"spawn request: unknown field(s) {', '.join(unknown)}")
        role, system, model = body.get("role"), body.get("system", ""), body.get("model")
        if not isinstance(role, str) or not is_valid_name(role):
            raise ValueError(f"spawn request: role must be a name (letters, digits, ._-): {role!r}")
        if role in RESERVED_ROLES or role.startswith(RESERVED_PREFIX):
            raise ValueError(f"spawn request: role {role!r} is reserved for the peer's own roles")
        if not isinstance(system, str):
            raise ValueError("spawn request: system must be a string")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"spawn request: model must be a litellm model string, got {model!r}")
        tools = body.get("tools", list(ALWAYS_ALLOWED_TOOLS))
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise ValueError("spawn request: tools must be an array of built-in tool names")
        bad = [t for t in tools if t not in BUILTIN_TOOLS]
        if bad:
            raise ValueError(
                f"spawn request: {', '.join(map(repr, bad))} not built-in tools "
                f"({', '.join(BUILTIN_TOOLS)})"
            )
        tools = [*tools, *(t for t in ALWAYS_ALLOWED_TOOLS if t not in tools)]
        return cls(role, system, model, tuple(dict.fromkeys(tools)))


@dataclass(frozen=True, slots=True)
class SpawnAllowList:
    """The models and tools a spawned agent may have on this peer."""

    models: frozenset[str]
    tools: frozenset[str]

    @classmethod
    def of(cls, settings: PoolSettings, declared: Iterable[AgentSpec]) -> SpawnAllowList:
        """The operator's `[pool] models` and `tools`, or their defaults: the models of the
        declared agents and the offline model; the built-in tools of the declared agents."""
        specs = tuple(declared)
        models = settings.models
        if models is None:
            models = (OFFLINE_MODEL, *(spec.model for spec in specs))
        tools = settings.tools
        if tools is None:
            tools = tuple(t for spec in specs for t in spec.tools if t in BUILTIN_TOOLS)
        return cls(frozenset(models), frozenset((*tools, *ALWAYS_ALLOWED_TOOLS)))

    def refusal(self, request: SpawnRequest) -> str | None:
        """Why this peer will not host the requested agent, or None if it may."""
        if request.model not in self.models:
            return (
                f"spawn refused: model {request.model!r} is not allowed on this peer "
                f"(pool.models: {', '.join(sorted(self.models)) or 'none'})"
            )
        denied = [tool for tool in request.tools if tool not in self.tools]
        if denied:
            return (
                f"spawn refused: tool(s) {', '.join(map(repr, denied))} not allowed on this "
                f"peer (pool.tools: {', '.join(sorted(self.tools))})"
            )
        return None
