"""What a peer serves from Python: roles and agents found in modules or given, checked
against the configured agents, and turned into the executor's role handlers.

Theory of operation. `grapevine agent --handlers a,b` and `peer.run(...)` both end in a
`Served` value: `load_modules` imports each module (the current directory first on
`sys.path`, as `python -m` does) and takes every `Role` and `Agent` bound at its top level;
`collect` takes them as given. `settings_with` adds the code agents to the settings' own, so
`peer.build.build_peer` hosts them as it hosts configured ones, and `role_handlers` gives the
executor one handler per Python role.

Invariants:
- Every problem is a `ServeError` with a one-line message naming the module, role or agent:
  a module that cannot be imported (its own exception's type and message, no traceback), a
  module that defines no role and no agent, two different functions for one role, a role
  also served by an agent (configured or in code), an agent name used twice, Python roles on
  a seed-only peer (`--no-agents`), a code agent whose key variable is not set.
- A role is served by exactly one thing on a peer: a Python function or agents, never both,
  so which one runs a task never depends on load order.
- A Python role's result is the task's output: text as UTF-8, `bytes` as they are, anything
  else as JSON; a value JSON cannot hold fails the task saying so.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from peer.agents.checkpoints import CheckpointPort
from peer.agents.ports import AgentInput, TaskPort
from peer.agents.spec import AgentSpec, TreeLimits
from peer.agents.tree import budget_for
from peer.python_api.agents import Agent
from peer.python_api.roles import Role
from peer.python_api.task import Task
from peer.runtime.executor import Outcome, RoleHandler, Work
from peer.runtime.progress import ProgressLog
from peer.settings import AgentSettings

Servable = Role | Agent | ModuleType | str
"""What `collect` takes: a role, an agent, a module, or a module's import name."""


class ServeError(Exception):
    """What a peer was asked to serve from Python cannot be served; one line says why."""


@dataclass(frozen=True, slots=True)
class Served:
    """The Python roles and code agents one peer serves."""

    roles: tuple[Role, ...] = ()
    agents: tuple[Agent, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.roles or self.agents)


def load_modules(names: Sequence[str]) -> Served:
    """Import each module and serve every `Role` and `Agent` at its top level.

    Args:
        names: import names ("shout", "crew.roles"); the current directory is searched
            first, then `sys.path`.

    Raises:
        ServeError: a module cannot be imported or serves nothing, or two serve a role
            differently (see the module invariants).
    """
    found: list[Role | Agent] = []
    for name in names:
        module = import_module(name)
        items = module_items(module)
        if not items:
            raise ServeError(
                f"module {name!r} ({module.__file__}) defines no roles: decorate an async "
                "function with @role(...) or bind a peer.Agent(...) at its top level"
            )
        found.extend(items)
    return collect(found)


def collect(items: Iterable[Servable]) -> Served:
    """The roles and agents of `items` (modules contribute their top-level ones).

    Raises:
        ServeError: a module cannot be imported, a role has two functions, an agent name is
            used twice or an item is none of the four kinds.
    """
    roles: dict[str, Role] = {}
    agents: dict[str, Agent] = {}
    for item in items:
        for thing in _expand(item):
            if isinstance(thing, Role):
                other = roles.setdefault(thing.name, thing)
                if other is not thing and other.function is not thing.function:
                    raise ServeError(
                        f"role {thing.name!r} is served both by {other.where} and by {thing.where}"
                    )
            else:
                agent = agents.setdefault(thing.name, thing)
                if agent is not thing:
                    raise ServeError(f"two agents are named {thing.name!r}")
    served = Served(tuple(roles.values()), tuple(agents.values()))
    _check_roles(served.roles, tuple(a.spec for a in served.agents), "in code")
    return served


def settings_with(settings: AgentSettings, served: Served) -> AgentSettings:
    """`settings` with the code agents added to the configured ones, once both are checked.

    Raises:
        ServeError: a seed-only peer, an agent name used twice, a role that both a Python
            function and an agent serve, a code agent whose key variable is not set.
    """
    if not served:
        return settings
    if settings.no_agents:
        raise ServeError(
            "a seed-only peer (--no-agents) serves no roles; drop --no-agents to serve "
            "Python roles or agents"
        )
    configured = {spec.name for spec in settings.agents}
    for agent in served.agents:
        if agent.name in configured:
            raise ServeError(f"agent {agent.name!r} is defined both in code and in the config file")
    _check_roles(served.roles, settings.agents, "in the config file")
    agents = settings.agents + tuple(a.spec for a in served.agents)
    if served.agents:
        from peer.agents.model_settings import LlmSettings, check_credentials

        try:
            check_credentials(agents, settings.llm or LlmSettings(), os.environ)
        except ValueError as exc:
            raise ServeError(str(exc)) from None
    return replace(settings, agents=agents)


def role_handlers(
    roles: Sequence[Role],
    port: TaskPort,
    limits: TreeLimits,
    steps: ProgressLog | None = None,
    checkpoints: CheckpointPort | None = None,
) -> dict[str, RoleHandler]:
    """One executor handler per Python role, running its function on a `Task`.

    Args:
        roles: the Python roles.
        port: the task network the tasks delegate through.
        limits: the tree limits (depth, fan-out, default budget).
        steps: where delegations are reported as they happen (`Driver.progress`).
        checkpoints: where the tasks' durable steps are kept (the `Driver`); None keeps none.
    """
    return {r.name: _handler(r, port, limits, steps, checkpoints) for r in roles}


def role_slots(roles: Iterable[Role]) -> dict[str, int]:
    """Each Python role's slots (its `max_concurrent`), by name."""
    return {r.name: r.max_concurrent for r in roles}


def import_module(name: str) -> ModuleType:
    """Import `name` with the current directory first on `sys.path`.

    Raises:
        ServeError: no such module, or its import raised; one line with the reason.
    """
    here = str(Path.cwd())
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise ServeError(
                f"no module named {name!r} (looked in {here} and on sys.path)"
            ) from None
        raise ServeError(f"cannot import {name}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise ServeError(f"cannot import {name}: {type(exc).__name__}: {exc}") from None


def module_items(module: ModuleType) -> list[Role | Agent]:
    """The roles and agents bound at the top level of `module`, in definition order."""
    return [value for value in vars(module).values() if isinstance(value, Role | Agent)]


def encode_result(value: Any) -> bytes:
    """A Python role's return value as task output (see the module invariants).

    Raises:
        TypeError: the value is neither text, bytes nor JSON-able.
    """
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the role returned {type(value).__name__}, which is neither text nor JSON ({exc})"
        ) from None


def _expand(item: Servable) -> list[Role | Agent]:
    if isinstance(item, Role | Agent):
        return [item]
    if isinstance(item, str):
        item = import_module(item)
    if isinstance(item, ModuleType):
        return module_items(item)
    raise ServeError(f"cannot serve {item!r}: give roles, agents, modules or module names")


def _check_roles(roles: Sequence[Role], agents: Sequence[AgentSpec], where: str) -> None:
    served_by = {role: spec.name for spec in agents for role in spec.roles}
    for r in roles:
        if r.name in served_by:
            raise ServeError(
                f"role {r.name!r} is served both by {r.where} and by agent "
                f"{served_by[r.name]!r} {where}; a peer serves a role with one or the other"
            )


def _handler(
    role: Role,
    port: TaskPort,
    limits: TreeLimits,
    steps: ProgressLog | None,
    checkpoints: CheckpointPort | None,
) -> RoleHandler:
    gate = asyncio.Semaphore(role.max_concurrent)
    cap = AgentSpec(role.name, (role.name,))

    async def run(work: Work) -> Outcome:
        try:
            given = AgentInput.decode(work.input)
        except ValueError as exc:
            return Outcome(f"bad input: {exc}".encode(), "failed")
        budget = budget_for(given.budget, cap, limits)
        task = Task(work, given, port, limits, budget, steps, checkpoints)
        async with gate:
            value = await role.function(task)
        return Outcome(encode_result(value))

    return run
