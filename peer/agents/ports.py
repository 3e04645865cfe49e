"""The contracts between the agent host's parts: models, the task network, task payloads.

Invariants:
- A `Completion` is provider-neutral: litellm responses and the offline model both become one,
  so the agent loop never sees a provider's types.
- `TaskPort` is everything an agent may do to the task network; the runtime never touches the
  driver or the node directly, so it is tested against a small in-memory port.
- Agent tasks carry `AgentInput` (JSON) as their input and `AgentOutput` (JSON) as their
  output. A plain-text input is a request with no budget given (the agent's own applies).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

Usage = tuple[int, int, int]
"""(prompt tokens, completion tokens, cost in millionths of a dollar) — as on `Result`."""


class ModelError(Exception):
    """A model call failed for good (retries exhausted or a non-retryable provider error)."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call the model asked for; `arguments` already decoded from JSON."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Completion:
    """One model reply, whichever provider made it."""

    content: str
    """Text of the reply ("" when the model only called tools)."""
    tool_calls: tuple[ToolCall, ...]
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int
    """Cost in millionths of a dollar by litellm's accounting (0 for the offline model)."""
    model: str


class Model(Protocol):
    """Calls a model by its litellm string (`peer.agents.llm.ModelClient` is the real one)."""

    async def complete(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Completion:
        """Return the model's reply; waits (does not fail) while rate-limited or the breaker
        is open. Raises `ModelError` when the call failed for good."""
        ...


@dataclass(frozen=True, slots=True)
class TaskView:
    """One task as this peer knows it (gossiped state: may lag the network)."""

    task_id: bytes
    parent: bytes
    """b"" for a root task."""
    role: str
    input: bytes
    state: str
    """pending, running, done, failed or cancelled."""
    usage: Usage
    """Usage on its accepted result; (0, 0, 0) until there is one."""


@dataclass(frozen=True, slots=True)
class ChildResult:
    """How a child task ended."""

    outcome: str
    """"ok", "failed", "timeout", or "cancelled" (cancelled before a result was accepted)."""
    output: bytes
    usage: Usage


class TaskPort(Protocol):
    """What an agent may do to the task network (implemented over `peer.runtime.driver.Driver`)."""

    def submit_child(self, parent: bytes, role: str, data: bytes, priority: int) -> bytes:
        """Submit a child task of `parent`; the same (parent, role, data) gives the same id."""
        ...

    async def wait_result(self, task_id: bytes) -> ChildResult:
        """Wait until the task has an accepted result or is cancelled."""
        ...

    def suspend(self, task_id: bytes) -> None:
        """The running execution of `task_id` waits on children: free its slot meanwhile."""
        ...

    def resume(self, task_id: bytes) -> None:
        """It runs again: count its slot again (never waits, so a tree cannot deadlock)."""
        ...

    def task(self, task_id: bytes) -> TaskView | None:
        """The task as known here, or None."""
        ...

    def children(self, task_id: bytes) -> list[TaskView]:
        """The known children of a task, oldest first."""
        ...

    def role_available(self, role: str) -> bool:
        """Whether some live peer (this one included) advertises `role`."""
        ...


@dataclass(frozen=True, slots=True)
class Budget:
    """Tokens and cost a task (and everything it delegates) may still spend; 0 = unlimited."""

    tokens: int = 0
    cost_micro: int = 0


@dataclass(frozen=True, slots=True)
class AgentInput:
    """The input of an agent task: the request and what the tree allows below this node."""

    request: str
    budget: Budget = field(default_factory=Budget)
    depth: int = 0
    """0 for a root task; a child of a task at depth d is at d + 1."""

    def encode(self) -> bytes:
        body: dict[str, Any] = {"request": self.request, "depth": self.depth}
        if self.budget.tokens or self.budget.cost_micro:
            body["budget"] = {"tokens": self.budget.tokens, "cost_micro": self.budget.cost_micro}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> AgentInput:
        """Parse a task input; plain text (not a JSON object with "request") is the request.

        Raises:
            ValueError: a JSON input whose fields have the wrong types.
        """
        text = data.decode("utf-8", errors="replace")
        try:
            body = json.loads(text)
        except ValueError:
            return cls(text)
        if not isinstance(body, dict) or "request" not in body:
            return cls(text)
        request, depth, budget = body["request"], body.get("depth", 0), body.get("budget", {})
        if not isinstance(request, str) or not isinstance(depth, int) or depth < 0:
            raise ValueError("agent input: request must be text and depth a non-negative integer")
        if not isinstance(budget, dict):
            raise ValueError("agent input: budget must be an object")
        tokens, cost = budget.get("tokens", 0), budget.get("cost_micro", 0)
        if not isinstance(tokens, int) or not isinstance(cost, int) or tokens < 0 or cost < 0:
            raise ValueError("agent input: budget tokens and cost_micro must be integers >= 0")
        return cls(request, Budget(tokens, cost), depth)


@dataclass(frozen=True, slots=True)
class AgentOutput:
    """The output of an agent task: the answer and who produced it (the tree shows both)."""

    answer: str
    agent: str
    model: str
    steps: int

    def encode(self) -> bytes:
        body = {
            "answer": self.answer,
            "agent": self.agent,
            "model": self.model,
            "steps": self.steps,
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> AgentOutput | None:
        """Parse an agent task's output; None if it is not one (e.g. an echo task's)."""
        try:
            body = json.loads(data.decode("utf-8"))
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("answer"), str):
            return None
        return cls(
            body["answer"],
            str(body.get("agent", "")),
            str(body.get("model", "")),
            int(body.get("steps", 0)) if isinstance(body.get("steps", 0), int) else 0,
        )
