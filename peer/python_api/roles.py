"""`@role`: a role served by an async Python function, next to the peer's LLM agents.

    from peer import role

    @role("shout")
    async def shout(task):
        return task.input.upper()

Invariants:
- Decorating only describes: it returns a `Role` value (still callable as the function) and
  registers nothing anywhere. A peer serves the `Role`s it is given: those found at the top
  level of the modules named by `grapevine agent --handlers` (`peer.python_api.serving`), or
  those passed to `peer.run`. So importing a module of roles has no side effect, and two
  peers in one process can serve different roles.
- A bad declaration fails at decoration time, naming the function: a role name that is not a
  name or is reserved (`echo`, `sleep`, `grapevine.*`), a function that is not `async def`
  or does not take exactly the task, a `max_concurrent` below 1.
- This module imports nothing heavy: `from peer import role` stays fast.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peer.agents.spec import RESERVED_PREFIX, RESERVED_ROLES, is_valid_name

if TYPE_CHECKING:
    from peer.python_api.task import Task

HandlerFunction = Callable[["Task"], Awaitable[Any]]
"""An async function of the task; its return value (text, or any JSON-able value) is the
task's result."""


@dataclass(frozen=True, slots=True)
class Role:
    """A role and the async function that serves it (what `@role` returns)."""

    name: str
    function: HandlerFunction
    max_concurrent: int = 1
    """Tasks of this role run at once on a peer; each is a slot the peer advertises."""

    def __call__(self, task: Task) -> Awaitable[Any]:
        """Call the function itself (handy in unit tests of a handler)."""
        return self.function(task)

    @property
    def where(self) -> str:
        """ "module.function", for messages."""
        return f"{self.function.__module__}.{self.function.__qualname__}"


def role(name: str, *, max_concurrent: int = 1) -> Callable[[HandlerFunction], Role]:
    """Serve the role `name` with the decorated async function.

    The function receives a `peer.python_api.task.Task` (`task.input`, `await
    task.delegate(role, input)`, `task.progress(...)`, `task.budget`) and returns the task's
    result: text, or any JSON-able value (sent as JSON). An exception fails the task with its
    message.

    Args:
        name: the role (1..64 letters, digits, ".", "_", "-"); not `echo`, `sleep` or
            `grapevine.*`, which the peer serves itself.
        max_concurrent: tasks of this role one peer runs at once (each adds a slot).

    Raises:
        ValueError: a bad name or `max_concurrent`.
        TypeError: the decorated object is not an async function of one argument.
    """
    check_role_name(name)
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
        raise ValueError(f"@role({name!r}): max_concurrent must be an integer >= 1")
    if max_concurrent < 1:
        raise ValueError(f"@role({name!r}): max_concurrent must be >= 1, got {max_concurrent}")

    def decorate(function: HandlerFunction) -> Role:
        if not inspect.iscoroutinefunction(function):
            raise TypeError(
                f"@role({name!r}): {getattr(function, '__qualname__', function)!r} must be an "
                "`async def` function of the task"
            )
        required = [
            p
            for p in inspect.signature(function).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(required) != 1:
            raise TypeError(
                f"@role({name!r}): {function.__qualname__} must take exactly one argument, "
                f"the task (it takes {len(required)})"
            )
        return Role(name, function, max_concurrent)

    return decorate


def check_role_name(name: object) -> None:
    """Refuse a role name a peer cannot serve.

    Raises:
        ValueError: not a name, or reserved for the peer's own roles.
    """
    if not isinstance(name, str) or not is_valid_name(name):
        raise ValueError(
            f"role {name!r}: a role is 1..64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    if name in RESERVED_ROLES or name.startswith(RESERVED_PREFIX):
        raise ValueError(f"role {name!r} is reserved for the peer's own roles")
