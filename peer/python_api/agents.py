"""`Agent`: an LLM agent declared in Python, with typed Python functions as its tools.

    import peer

    def lookup(topic: str, depth: Literal["brief", "full"] = "brief") -> str:
        \"\"\"Look a topic up in the team's notes.\"\"\"
        ...

    researcher = peer.Agent("researcher", system="You research.", tools=[lookup])

Invariants:
- An `Agent` is exactly an `[[agents]]` table written in Python: its fields go through the
  config file's own parser (`peer.agents.spec.parse_agents`), so the same values are
  accepted, with the same defaults and the same messages (prefixed "Agent('name')"), and
  a peer hosts it as it hosts a configured agent.
- A tool is a built-in tool's name, a "package.module:function" path, or a function defined
  at the top level of a module, which is named by its import path: the peer imports it as
  it imports a configured tool, and its schema comes from its type hints and docstring
  (`peer.agents.tools`). A lambda or a nested function has no import path and is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from peer.agents.offline import OFFLINE_MODEL
from peer.agents.ports import Budget
from peer.agents.spec import AgentSpec, parse_agents


class Agent:
    """An LLM agent declared in code; a peer serving it hosts it like an `[[agents]]` table.

    Args:
        name: unique on the peer.
        roles: the roles it serves (one name or several); by default its name.
        model: a litellm model string; by default the offline stand-in model.
        system: the system prompt.
        tools: built-in tool names ("delegate", "final_answer", ...), "module:function"
            paths, or top-level Python functions with type hints.
        max_concurrent: tasks it runs at once.
        temperature: sampling temperature, 0 to 2; None: the provider's default.
        max_tokens: completion tokens per model call; None: the provider's default.
        budget: what one of its tasks and everything it delegates may spend: tokens, or a
            `Budget`; None: `[limits] default_budget`.
        api_base: the model's server (a vLLM, Ollama or llama.cpp server, ...).
        api_key_env: the NAME of the environment variable holding the key.
        params: extra litellm parameters.

    Raises:
        ValueError: a value the config file would refuse, or a tool with no import path;
            the message starts with "Agent('name')" and names the field.
    """

    def __init__(
        self,
        name: str,
        *,
        roles: str | Sequence[str] | None = None,
        model: str = OFFLINE_MODEL,
        system: str = "",
        tools: Sequence[str | Callable[..., Any]] = ("final_answer",),
        max_concurrent: int = 1,
        temperature: float | None = None,
        max_tokens: int | None = None,
        budget: int | Budget | None = None,
        api_base: str | None = None,
        api_key_env: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        where = f"Agent({name!r})"
        role_list = [name] if roles is None else [roles] if isinstance(roles, str) else roles
        table: dict[str, Any] = {
            "name": name,
            "roles": list(role_list),
            "model": model,
            "system": system,
            "tools": [tool_path(where, tool) for tool in tools],
            "max_concurrent": max_concurrent,
        }
        optional: dict[str, Any] = {
            "temperature": temperature,
            "max_tokens": max_tokens,
            "api_base": api_base,
            "api_key_env": api_key_env,
            "params": None if params is None else dict(params),
            "budget": {"tokens": budget.tokens, "cost_micro": budget.cost_micro}
            if isinstance(budget, Budget)
            else budget,
        }
        table.update({key: value for key, value in optional.items() if value is not None})
        try:
            (spec,) = parse_agents([table])
        except ValueError as exc:
            message = str(exc).removeprefix("agents[0]")
            raise ValueError(f"{where}{message}") from None
        self.spec: AgentSpec = spec
        """The agent as the host takes it (the same value an `[[agents]]` table gives)."""

    @property
    def name(self) -> str:
        """Its name on the peer."""
        return self.spec.name

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles it serves."""
        return self.spec.roles

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, roles={list(self.roles)!r}, model={self.spec.model!r})"


def tool_path(where: str, tool: str | Callable[..., Any]) -> str:
    """The name a peer loads `tool` by: a string as given, a function by its import path.

    Raises:
        ValueError: a function that cannot be imported back by "module:name" (a lambda, a
            nested function, a method), or neither a string nor a function.
    """
    if isinstance(tool, str):
        return tool
    module = getattr(tool, "__module__", None)
    qualname = getattr(tool, "__qualname__", None)
    if not callable(tool) or not isinstance(module, str) or not isinstance(qualname, str):
        raise ValueError(f"{where}.tools: {tool!r} is neither a tool name nor a function")
    if "." in qualname or "<" in qualname:
        raise ValueError(
            f"{where}.tools: {module}.{qualname} is not a top-level function of its module; a "
            "peer loads tools by import path, so define it at the top level"
        )
    found = getattr(importlib.import_module(module), qualname, None)
    if found is not tool:
        raise ValueError(
            f"{where}.tools: {module}:{qualname} does not name this function (it was "
            "replaced or renamed); define the tool at the top level of its module"
        )
    return f"{module}:{qualname}"
