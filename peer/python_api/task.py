"""`Task`: one execution of a Python role, as its function sees it.

Theory of operation. A Python role's task arrives as an LLM agent's would: its input is an
`AgentInput` (or plain text, which is a request with no budget given), so agents and Python
roles delegate to each other freely. `task.input` is the request text; `task.budget` is what
the task and everything it delegates may spend (the input's budget capped by the operator's
`[limits] default_budget`). `task.delegate(role, input)` creates a child task through the
same `TaskPort` and the same tree rules as an agent's `delegate` tool (`peer.agents.tree`:
depth limit, loop guard, fan-out limit, the reuse of a child created before a takeover) and
returns the child's answer as text.

Invariants:
- A delegation that the tree rules refuse raises `DelegationRefused` before any child
  exists; a child that ends other than "ok" raises `ChildFailed`. Uncaught, either fails the
  task with its message, as any exception of the function does.
- The same (role, input) asked again by the same task names the same child (its id is a
  function of parent, role and input: `peer.agents.peer_port.child_key`), so a task re-run
  after a takeover, or a function that asks twice, waits for the existing child instead of
  paying for the work again.
- While at least one delegation is waiting, the task is suspended (its slot freed), exactly
  once however many wait concurrently, so a tree of Python roles cannot deadlock a peer.
- Each child's share is the budget left when it is created (or less, if `budget=` asks);
  what a child spent is charged when it ends, and a task whose budget is spent cannot
  delegate further.
- Each child asked for is reported at once as a "delegation" step of the execution to the
  peer's `ProgressLog` (`peer.runtime.progress`), as an agent's are, so `grapevine watch`
  follows a Python role's tree as it grows.
- `step(name, fn, ...)` runs `fn` once per task across takeovers and restarts: its result is
  recorded as a checkpoint and replayed by a later run (`peer.python_api.steps`). Each step
  is reported as a "step" step (its name, and whether it was replayed) when it completes.
- `progress` reports are "note" steps of the execution (so the watch stream and the tree show
  them as they happen), logged as task lifecycle events (`event=progress`, in the peer's log
  format) and added to the execution's trace span.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from peer.agents.checkpoints import CheckpointPort
from peer.agents.ports import AgentInput, AgentOutput, Budget, TaskPort
from peer.agents.spec import TreeLimits
from peer.agents.tree import (
    Ledger,
    check_depth,
    check_fan_out,
    find_child,
    find_loop,
    subtree_usage,
    tighter_limit,
)
from peer.python_api.steps import Steps
from peer.runtime.executor import Work
from peer.runtime.progress import ProgressLog

log = logging.getLogger(__name__)

MAX_FAILURE_QUOTE = 500
"""Characters of a failed child's output quoted in `ChildFailed`."""


class DelegationError(Exception):
    """A delegation did not give an answer."""


class DelegationRefused(DelegationError):
    """The tree rules refused to create the child (depth, loop, fan-out, budget, no peer
    serves the role); nothing was submitted."""


class ChildFailed(DelegationError):
    """The child task ended without an answer.

    Args:
        outcome: "failed", "timeout" or "cancelled".
        output: what the child said (its error message), cut to `MAX_FAILURE_QUOTE`.
    """

    def __init__(self, role: str, outcome: str, output: str) -> None:
        super().__init__(f"child task of role {role!r} {outcome}: {output[:MAX_FAILURE_QUOTE]}")
        self.outcome = outcome
        self.output = output


class Task:
    """One execution of a Python role (the argument of a `@role` function).

    Args:
        work: the execution, as the executor hands it over.
        given: its decoded input.
        port: the task network (children, suspend and resume).
        limits: the tree limits (depth, fan-out).
        budget: what this task and its subtree may spend (0 = unlimited in that unit).
        steps: where its delegations are reported as they happen (the peer's
            `Driver.progress`); None reports nothing.
        checkpoints: where its durable steps are recorded and read (the peer's `Driver`);
            None keeps none (`step` then always runs its function).
    """

    def __init__(
        self,
        work: Work,
        given: AgentInput,
        port: TaskPort,
        limits: TreeLimits,
        budget: Budget,
        steps: ProgressLog | None = None,
        checkpoints: CheckpointPort | None = None,
    ) -> None:
        self._durable = Steps(checkpoints, work.task_id, work.epoch)
        self._work = work
        self._steps = steps
        self._given = given
        self._port = port
        self._limits = limits
        self._ledger = Ledger(budget)
        self._created: set[bytes] = set()
        self._waiting = 0

    @property
    def input(self) -> str:
        """The task's input: the request text (what `grapevine submit` was given)."""
        return self._given.request

    @property
    def id(self) -> str:
        """The task id, in hex (as `grapevine task ID` takes it)."""
        return self._work.task_id.hex()

    @property
    def role(self) -> str:
        """The role this task was submitted for."""
        return self._work.role

    @property
    def epoch(self) -> int:
        """The claim's epoch: 1 for a first run, higher after each takeover. Give
        (`id`, `epoch`) to outside systems as an idempotency key."""
        return self._work.epoch

    @property
    def depth(self) -> int:
        """0 for a root task; a child of a task at depth d is at d + 1."""
        return self._given.depth

    @property
    def budget(self) -> Budget:
        """What this task and everything it delegates may spend (tokens, cost in millionths
        of a dollar; 0 = unlimited in that unit)."""
        return self._ledger.budget

    @property
    def spent(self) -> Budget:
        """What its finished children (and their subtrees) spent so far."""
        return Budget(self._ledger.tokens_used, self._ledger.cost_used)

    def json(self) -> Any:
        """The input parsed as JSON.

        Raises:
            ValueError: the input is not JSON.
        """
        return json.loads(self.input)

    def progress(self, message: str, **fields: str | int | float | bool) -> None:
        """Report progress: a "note" step in the watch stream and the tree, a lifecycle log
        line (`event=progress`) and a span event.

        Args:
            message: what happened, in a few words ("found 3 sources").
            fields: more values for the log line and the span event.
        """
        detail = "".join(f" {key}={value}" for key, value in fields.items())
        log.info(
            "task %s progress: role=%s epoch=%d %s%s",
            self.id,
            self.role,
            self.epoch,
            message,
            detail,
            extra={
                "event": "progress",
                "task_id": self.id,
                "role": self.role,
                "epoch": self.epoch,
                "progress": message,
                **fields,
            },
        )
        trace.get_current_span().add_event("progress", {"message": message, **fields})
        if self._steps is not None:
            self._steps.report(self._work.task_id, self.epoch, "note", message=message, **fields)

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` (awaited if it returns an awaitable) once for this task:
        its result is recorded with the task's replicas, and a run after a takeover or a
        restart gets the recorded result instead of calling `fn` again
        (`peer.python_api.steps`). Put what must not be paid for twice in a step.

        Args:
            name: the step's name; a re-run replays recorded steps while the names of its
                steps, in order, agree with the earlier run's.
            fn: the work; its result must be JSON.

        Returns:
            `fn`'s result, or the one recorded by an earlier run of this task.

        Raises:
            TypeError: `fn`'s result is not JSON, or `name` is empty.
        """
        resumed = self._durable.resumed
        value = await self._durable.run(name, fn, args, kwargs)
        if self._steps is not None:  # shown in the watch stream and the tree as it happens
            replayed = self._durable.resumed > resumed
            self._steps.report(self._work.task_id, self.epoch, "step", name=name, replayed=replayed)
        return value

    async def delegate(self, role: str, input: Any, *, budget: Budget | None = None) -> str:
        """Run a child task of `role` on `input` somewhere in the network; return its answer.

        Args:
            role: the role that should do it (an agent's or another Python role's).
            input: text, or any JSON-able value (sent as JSON text).
            budget: at most this for the child and its subtree; by default, what is left
                of this task's budget.

        Returns:
            The child's answer: an agent's answer text, or a Python role's result (JSON
            text for a non-text result).

        Raises:
            DelegationRefused: the tree rules refused; no child was created.
            ChildFailed: the child ended without an answer.
        """
        request = input if isinstance(input, str) else json.dumps(input, sort_keys=True)
        share = self._share(budget)
        refusal = check_depth(self.depth, self._limits) or find_loop(
            self._port, self._work.parent, (self.role, self.input), (role, request)
        )
        if refusal is not None:
            raise DelegationRefused(refusal)
        existing = find_child(self._port, self._work.task_id, role, request)
        reused = existing is not None
        if existing is not None:
            child_id = existing.task_id
        else:
            if not self._port.role_available(role):
                raise DelegationRefused(f"no live peer serves the role {role!r}")
            known = {child.task_id for child in self._port.children(self._work.task_id)}
            refusal = check_fan_out(len(known | self._created), self._limits)
            if refusal is not None:
                raise DelegationRefused(refusal)
            data = AgentInput(request, share, self.depth + 1).encode()
            child_id = self._port.submit_child(self._work.task_id, role, data, self._work.priority)
        reused = reused or child_id in self._created
        self._created.add(child_id)
        if self._steps is not None:
            self._steps.report(
                self._work.task_id,
                self.epoch,
                "delegation",
                child=child_id.hex(),
                role=role,
                reused=reused,
            )
        self._waiting += 1
        if self._waiting == 1:
            self._port.suspend(self._work.task_id)
        try:
            result = await self._port.wait_result(child_id)
        finally:
            self._waiting -= 1
            if self._waiting == 0:
                self._port.resume(self._work.task_id)
        self._ledger.charge_child(subtree_usage(self._port, child_id, result.usage))
        text = result.output.decode("utf-8", errors="replace")
        if result.outcome != "ok":
            raise ChildFailed(role, result.outcome, text)
        output = AgentOutput.decode(result.output)
        return output.answer if output is not None else text

    def _share(self, asked: Budget | None) -> Budget:
        """The child's budget: what is left, or `asked` when it is tighter."""
        spent = self._ledger.exhausted()
        if spent is not None:
            raise DelegationRefused(spent)
        left = self._ledger.split(1, 0.0)
        if isinstance(left, str):
            raise DelegationRefused(left)
        if asked is None:
            return left
        return Budget(
            tighter_limit(asked.tokens, left.tokens),
            tighter_limit(asked.cost_micro, left.cost_micro),
        )
