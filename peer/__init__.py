"""The asyncio shell around protocol.Node: transport, sealing, storage, agents, API.

It is also the Python API (docs/python.md): `role` serves a role with an async function,
`Agent` declares an LLM agent in code, `run` and `serve` start a peer with the command line's
settings. They are loaded on first use (`__getattr__`), so `import peer` and the `grapevine`
command's fast paths import none of the peer runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peer.agents.ports import Budget
    from peer.python_api.agents import Agent
    from peer.python_api.roles import Role, role
    from peer.python_api.running import run, serve
    from peer.python_api.serving import ServeError
    from peer.python_api.task import ChildFailed, DelegationError, DelegationRefused, Task

_EXPORTS = {
    "role": "peer.python_api.roles",
    "Role": "peer.python_api.roles",
    "Task": "peer.python_api.task",
    "DelegationError": "peer.python_api.task",
    "DelegationRefused": "peer.python_api.task",
    "ChildFailed": "peer.python_api.task",
    "Agent": "peer.python_api.agents",
    "Budget": "peer.agents.ports",
    "ServeError": "peer.python_api.serving",
    "run": "peer.python_api.running",
    "serve": "peer.python_api.running",
}
"""Public name -> the module that defines it."""

__all__ = [
    "Agent",
    "Budget",
    "ChildFailed",
    "DelegationError",
    "DelegationRefused",
    "Role",
    "ServeError",
    "Task",
    "role",
    "run",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
