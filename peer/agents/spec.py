"""Agent specs, tree limits and pool settings, and their parsing from the peer's TOML config.

Invariants:
- Everything here is a frozen value; parsing is the only place a config table is trusted.
- A bad value raises `ValueError` whose message starts with where it is, "agents[2].budget",
  "limits.max_depth", then says what is wanted and what was given, so a typo never falls back
  to a default silently. Unknown keys are errors too.
- Agent names are unique on a peer. Several agents may serve one role (a pool of workers, or
  the same role on two models): a task of the role goes to the least busy of them.
  The built-in roles (`echo`, `sleep`) and the `grapevine.` prefix are reserved.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peer.agents.endpoints import ModelEndpoint, parse_endpoint
from peer.agents.ports import Budget

BUILTIN_TOOLS = ("delegate", "spawn_agent", "read_file", "write_file", "final_answer")
"""Tools every agent may name; anything else must be a "package.module:function" path."""
RESERVED_ROLES = ("echo", "sleep")
"""Roles the peer itself serves (`peer.runtime.executor.builtin_roles`)."""
RESERVED_PREFIX = "grapevine."
"""Roles of the peers' own machinery (e.g. `grapevine.spawn`)."""
MAX_NAME = 64

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One agent a peer hosts, as declared by an `[[agents]]` table."""

    name: str
    """Unique on this peer; shown in results (`AgentOutput.agent`) and the task tree."""
    roles: tuple[str, ...]
    """The task roles this agent serves (at least one)."""
    model: str = "grapevine/offline"
    """A litellm model string ("openai/gpt-4o-mini", "ollama/llama3"); the default is the
    deterministic offline stand-in, which needs no network or key."""
    system: str = ""
    """The system prompt."""
    tools: tuple[str, ...] = ("final_answer",)
    """Built-in tool names (`BUILTIN_TOOLS`) and "package.module:function" import paths."""
    max_concurrent: int = 1
    """Tasks this agent runs at once; the peer advertises the sum over its agents as slots.
    More slots take more work from the network but share one machine's rate limits."""
    temperature: float | None = None
    """Sampling temperature, 0 to 2; None leaves the provider's default."""
    max_tokens: int | None = None
    """Completion tokens per model call; None leaves the provider's default."""
    budget: Budget = field(default_factory=Budget)
    """What one task of this agent and everything it delegates may spend at most (0 =
    unlimited in that unit); unset, the tree limits' `default_budget`. The operator's cap: a
    task's input may ask for less, never more (`peer.agents.tree.budget_for`)."""
    api_base: str | None = None
    """The model's server for this agent (a vLLM, Ollama or llama.cpp server, any
    OpenAI-compatible endpoint); None: the model's or `[llm]`'s (`peer.agents.endpoints`)."""
    api_key_env: str | None = None
    """The NAME of the environment variable holding this agent's key (never the key)."""
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Extra `litellm.acompletion` parameters of this agent, over the model's and `[llm]`'s."""

    @property
    def endpoint(self) -> ModelEndpoint:
        """This agent's own endpoint settings (`LlmSettings.endpoint_for` adds the rest)."""
        return ModelEndpoint(self.api_base, self.api_key_env, self.params)


@dataclass(frozen=True, slots=True)
class TreeLimits:
    """The rules that keep a delegation tree finite (`[limits]`); see `peer.agents.tree`."""

    max_depth: int = 4
    """Deepest task of a tree (a root is at depth 0). Deeper trees can split work finer but
    multiply calls: a tree of fan-out f and depth d has up to f**d leaves."""
    max_children: int = 16
    """Children one task may create (the fan-out limit)."""
    max_steps: int = 16
    """Model calls one execution may make before it fails with a step-limit message."""
    parent_reserve: float = 0.25
    """Share of its remaining budget a parent keeps for its own calls when it delegates; the
    rest is split equally among the delegate calls of one model turn. Higher leaves the parent
    room to combine the answers, lower gives children more to work with."""
    default_budget: Budget = field(default_factory=lambda: Budget(tokens=200_000))
    """The cap on a task's budget when its agent gives none (a task may ask for less)."""


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """How many agents a peer spawns at runtime, and when (`[pool]`)."""

    max_spawned: int = 4
    """Agents this peer may add at runtime (`spawn_agent`) on top of its configured ones;
    0 refuses every spawn. Each one is an extra slot sharing this machine's rate limits."""
    idle_retire: float = 60.0
    """Seconds a spawned agent may sit idle before it is retired and its slot withdrawn."""
    grow_after: float = 5.0
    """Seconds tasks of a role must have waited before the pool adds an agent for it."""
    models: tuple[str, ...] | None = None
    """Models a spawned agent may use: every call is billed to this peer's keys, so a spawn
    naming any other fails. None: the models of the `[[agents]]` and the offline model
    (`peer.agents.spawning.SpawnAllowList.of`)."""
    tools: tuple[str, ...] | None = None
    """Built-in tools a spawned agent may be given (`final_answer` always); a spawn asking for
    any other fails. None: the built-in tools of the `[[agents]]`."""


def parse_agents(value: object) -> tuple[AgentSpec, ...]:
    """Parse the `[[agents]]` array of tables.

    Args:
        value: the decoded TOML value of `agents`.

    Returns:
        The specs, in the order written.

    Raises:
        ValueError: a bad value; the message names the table index and key, e.g.
            "agents[2].max_concurrent: must be an integer >= 1, got 0".
    """
    if not isinstance(value, list):
        raise ValueError(f"agents: must be an array of tables ([[agents]]), got {_kind(value)}")
    specs: list[AgentSpec] = []
    names: dict[str, int] = {}
    for index, table in enumerate(value):
        where = f"agents[{index}]"
        spec = _agent(where, table)
        if spec.name in names:
            raise ValueError(
                f"{where}.name: {spec.name!r} is already the name of agents[{names[spec.name]}]"
            )
        names[spec.name] = index
        specs.append(spec)
    return tuple(specs)


def parse_limits(value: object) -> TreeLimits:
    """Parse the `[limits]` table.

    Raises:
        ValueError: a bad value; the message names the key, e.g. "limits.max_depth: ...".
    """
    table = _table("limits", value, TreeLimits.__dataclass_fields__)
    defaults = TreeLimits()
    reserve = _number("limits.parent_reserve", table.get("parent_reserve"), 0.0, 1.0)
    if reserve is not None and reserve >= 1.0:
        raise ValueError(f"limits.parent_reserve: must be a number >= 0 and < 1, got {reserve}")
    default_budget = table.get("default_budget")
    return TreeLimits(
        max_depth=_int("limits.max_depth", table.get("max_depth"), 0, defaults.max_depth),
        max_children=_int(
            "limits.max_children", table.get("max_children"), 0, defaults.max_children
        ),
        max_steps=_int("limits.max_steps", table.get("max_steps"), 1, defaults.max_steps),
        parent_reserve=defaults.parent_reserve if reserve is None else reserve,
        default_budget=defaults.default_budget
        if default_budget is None
        else _budget("limits.default_budget", default_budget),
    )


def parse_pool(value: object) -> PoolSettings:
    """Parse the `[pool]` table.

    Raises:
        ValueError: a bad value; the message names the key, e.g. "pool.idle_retire: ...".
    """
    table = _table("pool", value, PoolSettings.__dataclass_fields__)
    defaults = PoolSettings()
    idle = _number("pool.idle_retire", table.get("idle_retire"), 0.0, math.inf)
    if idle is not None and idle <= 0:
        raise ValueError(f"pool.idle_retire: must be a number of seconds > 0, got {idle}")
    grow = _number("pool.grow_after", table.get("grow_after"), 0.0, math.inf)
    models = table.get("models")
    tools = table.get("tools")
    return PoolSettings(
        max_spawned=_int("pool.max_spawned", table.get("max_spawned"), 0, defaults.max_spawned),
        idle_retire=defaults.idle_retire if idle is None else idle,
        grow_after=defaults.grow_after if grow is None else grow,
        models=None if models is None else _models("pool.models", models),
        tools=None if tools is None else _builtin_tools("pool.tools", tools),
    )


def is_valid_name(text: str) -> bool:
    """Whether `text` is a usable agent or role name: 1..64 letters, digits, ".", "_", "-"
    (starting with a letter or digit)."""
    return _NAME.fullmatch(text) is not None


def is_import_path(text: str) -> bool:
    """Whether `text` looks like a "package.module:function" tool path."""
    return _IMPORT_PATH.fullmatch(text) is not None


def _agent(where: str, value: object) -> AgentSpec:
    table = _table(where, value, AgentSpec.__dataclass_fields__)
    defaults = AgentSpec("", ())
    if "name" not in table:
        raise ValueError(f"{where}.name: required (a name for this agent)")
    name = _name(f"{where}.name", table["name"])
    roles = table.get("roles")
    if roles is None:
        raise ValueError(f"{where}.roles: required (the roles this agent serves)")
    if not isinstance(roles, list) or not roles:
        raise ValueError(f"{where}.roles: must be a non-empty array of names, got {roles!r}")
    role_names: list[str] = []
    for i, role in enumerate(roles):
        role_name = _name(f"{where}.roles[{i}]", role)
        if role_name in RESERVED_ROLES or role_name.startswith(RESERVED_PREFIX):
            raise ValueError(
                f"{where}.roles[{i}]: {role_name!r} is reserved for the peer's own roles"
            )
        if role_name in role_names:
            raise ValueError(f"{where}.roles[{i}]: {role_name!r} is listed twice")
        role_names.append(role_name)
    model = table.get("model", defaults.model)
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"{where}.model: must be a litellm model string, got {model!r}")
    system = table.get("system", defaults.system)
    if not isinstance(system, str):
        raise ValueError(f"{where}.system: must be a string, got {_kind(system)}")
    temperature = _number(f"{where}.temperature", table.get("temperature"), 0.0, 2.0)
    max_tokens = table.get("max_tokens")
    endpoint = parse_endpoint(where, table)
    return AgentSpec(
        name=name,
        roles=tuple(role_names),
        model=model,
        system=system,
        tools=_tools(f"{where}.tools", table.get("tools", list(defaults.tools))),
        max_concurrent=_int(f"{where}.max_concurrent", table.get("max_concurrent"), 1, 1),
        temperature=temperature,
        max_tokens=None if max_tokens is None else _int(f"{where}.max_tokens", max_tokens, 1, 1),
        budget=defaults.budget
        if "budget" not in table
        else _budget(f"{where}.budget", table["budget"]),
        api_base=endpoint.api_base,
        api_key_env=endpoint.api_key_env,
        params=endpoint.params,
    )


def _tools(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: must be an array of tool names, got {_kind(value)}")
    tools: list[str] = []
    for i, tool in enumerate(value):
        if not isinstance(tool, str) or not (tool in BUILTIN_TOOLS or is_import_path(tool)):
            raise ValueError(
                f"{where}[{i}]: {tool!r} is neither a built-in tool "
                f'({", ".join(BUILTIN_TOOLS)}) nor a "package.module:function" path'
            )
        if tool in tools:
            raise ValueError(f"{where}[{i}]: {tool!r} is listed twice")
        tools.append(tool)
    return tuple(tools)


def _models(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: must be an array of litellm model strings, got {_kind(value)}")
    models: list[str] = []
    for i, model in enumerate(value):
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"{where}[{i}]: must be a litellm model string, got {model!r}")
        if model in models:
            raise ValueError(f"{where}[{i}]: {model!r} is listed twice")
        models.append(model)
    return tuple(models)


def _builtin_tools(where: str, value: object) -> tuple[str, ...]:
    tools = _tools(where, value)
    for i, tool in enumerate(tools):
        if tool not in BUILTIN_TOOLS:
            raise ValueError(
                f"{where}[{i}]: {tool!r} is not a built-in tool ({', '.join(BUILTIN_TOOLS)}); "
                "spawned agents get built-in tools only"
            )
    return tools


def _budget(where: str, value: object) -> Budget:
    if isinstance(value, int) and not isinstance(value, bool):
        return Budget(tokens=_int(where, value, 0, 0))
    if isinstance(value, dict):
        table = _table(where, value, ("tokens", "cost_micro"))
        return Budget(
            tokens=_int(f"{where}.tokens", table.get("tokens"), 0, 0),
            cost_micro=_int(f"{where}.cost_micro", table.get("cost_micro"), 0, 0),
        )
    raise ValueError(
        f"{where}: must be a number of tokens or a table {{tokens, cost_micro}}, got {value!r}"
    )


def _table(where: str, value: object, known: Mapping[str, Any] | tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must be a table, got {_kind(value)}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return value


def _name(where: str, value: object) -> str:
    if not isinstance(value, str) or not is_valid_name(value):
        raise ValueError(
            f"{where}: must be 1..{MAX_NAME} letters, digits, '.', '_' or '-' starting with a "
            f"letter or digit, got {value!r}"
        )
    return value


def _int(where: str, value: object, minimum: int, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: must be an integer >= {minimum}, got {value!r}")
    return value


def _number(where: str, value: object, low: float, high: float) -> float | None:
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        bound = f"from {low:g} to {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{where}: must be a number {bound}, got {value!r}")
    return float(value)


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{type(value).__name__} {value!r}"
