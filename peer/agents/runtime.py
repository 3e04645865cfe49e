"""One agent task as a loop: ask the model, run the tools it calls, until it answers.

Theory of operation. `AgentRuntime.run` decodes the task's `AgentInput`, starts the
conversation with the agent's system prompt and the request, and repeats at most `max_steps`
times: check the budget, call the model, record its reply, run the tools it called and give
their results back. A `final_answer` call (or a reply with text and no tool calls) ends the
task with an `AgentOutput`. Within one turn the local tools run first, in order; then the
calls that wait on child tasks (`delegate`, `spawn_agent`) run concurrently, with the task
suspended (its slot freed) around the wait, exactly once per turn.

Invariants:
- Tool failures, refusals and failed children are tool results the model reads; only a spent
  budget, the step limit, a bad input or a `ModelError` end the task as "failed".
- A delegate first looks for an existing child of this task with the same role and request
  (`tree.find_child`): a parent re-run after a takeover waits for the children its
  predecessor created instead of paying for them twice. Asking twice within one execution is
  refused instead.
- The usage reported is that of the model calls of the conversation this execution finished,
  those it resumed included (the run that made them never reported them); children report
  theirs on their own results. The budget check also counts what the children spent.
- Each model call and each tool call is a span of the execution's trace, and the agent's
  name is on the execution's span (`peer.observability.tracing`; nothing when untraced).
- Each model call answered, tool call returned and child asked for is reported to `progress`
  at once (`peer.runtime.progress`), so a watcher at this peer follows the run as it goes.
- Durable steps (`peer.agents.checkpoints`): before each model call a "call" checkpoint, after
  it a "reply" checkpoint, after each tool a "tool" checkpoint and before waiting on a child a
  "child" checkpoint. A run that finds checkpoints of an earlier run (a takeover, or its own
  run before a restart) records them again under its epoch, then replays their model answers
  and tool results instead of calling again: its ledger, its `asked` and `created` sets and its
  conversation are those the earlier run had, so a delegation it redoes carries the same input
  and names the same child, and a child recorded is waited on, never submitted again.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peer.agents.checkpoints import CheckpointPort, Journal, Resume, reply_entry
from peer.agents.ports import (
    AgentInput,
    AgentOutput,
    Budget,
    Completion,
    Model,
    ModelError,
    TaskPort,
    ToolCall,
    Usage,
)
from peer.agents.spec import AgentSpec, TreeLimits
from peer.agents.tools import CHILD_TOOLS, Toolbox, ToolContext
from peer.agents.tree import (
    Ledger,
    budget_for,
    check_depth,
    check_fan_out,
    find_child,
    find_loop,
    subtree_usage,
)
from peer.observability.tracing import annotate_agent, model_call, tool_call
from peer.runtime.executor import Outcome, Work
from peer.runtime.progress import Detail, ProgressLog

SPAWN_ROLE = "grapevine.spawn"
"""The role of the task `spawn_agent` submits; the peers' agent hosts serve it."""
MAX_CHILD_FAILURE = 500
"""Characters of a failed child's output quoted back to the model."""
NUDGE = "Reply with your final answer, or call a tool."


@dataclass(slots=True)
class _Run:
    """The state of one execution (`AgentRuntime.run`)."""

    work: Work
    request: str
    depth: int
    ledger: Ledger
    asked: set[tuple[str, str]]
    """(role, request) of every child this execution asked for."""
    created: set[bytes]
    """Children this execution submitted or reused."""
    journal: Journal
    resume: Resume | None
    """What an earlier run of the task left to take over; None when starting afresh."""
    charged: dict[tuple[str, str], Usage]
    """(role, request) → what that child's subtree was charged, for its "tool" checkpoint."""


class AgentRuntime:
    """Runs tasks of one agent.

    Args:
        spec: the agent.
        model: makes the model calls.
        port: the task network (children, suspend and resume).
        toolbox: the agent's tools (`Toolbox.load(spec.tools)`).
        limits: the tree limits.
        workspace: the directory `read_file` and `write_file` are jailed in.
        progress: where each model call, tool call and delegation is reported as it happens
            (the peer's `Driver.progress`); None reports nothing.
        checkpoints: where each step is recorded and an earlier run's steps are read (the
            peer's `Driver`); None records nothing and resumes nothing.
    """

    def __init__(
        self,
        spec: AgentSpec,
        model: Model,
        port: TaskPort,
        toolbox: Toolbox,
        limits: TreeLimits,
        workspace: Path,
        progress: ProgressLog | None = None,
        checkpoints: CheckpointPort | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.port = port
        self.toolbox = toolbox
        self.limits = limits
        self.workspace = workspace
        self.progress = progress
        self.checkpoints = checkpoints

    async def run(self, work: Work) -> Outcome:
        """Run one execution of an agent task (a `peer.runtime.executor.RoleHandler`).

        Returns:
            "ok" with an encoded `AgentOutput`, or "failed" with a message; either way the
            usage of its conversation's model calls (resumed ones included).
        """
        try:
            given = AgentInput.decode(work.input)
        except ValueError as exc:
            return Outcome(f"bad agent input: {exc}".encode(), "failed")
        annotate_agent(self.spec.name)
        journal = Journal(self.checkpoints, work.task_id, work.epoch)
        run = _Run(
            work=work,
            request=given.request,
            depth=given.depth,
            ledger=Ledger(budget_for(given.budget, self.spec, self.limits)),
            asked=set(),
            created=set(),
            journal=journal,
            resume=journal.load(),
            charged={},
        )
        if run.resume is not None:
            journal.carry(run.resume)
            self._report(
                run,
                "note",
                message=f"resumed {len(run.resume.replies)} model call(s) "
                f"from epoch {run.resume.epoch}",
            )
        messages: list[dict[str, Any]] = []
        if self.spec.system:
            messages.append({"role": "system", "content": self.spec.system})
        messages.append({"role": "user", "content": given.request})
        model_name = self.spec.model
        for step in range(1, self.limits.max_steps + 1):
            resumed = run.resume.replies if run.resume is not None else []
            if step <= len(resumed):
                reply = resumed[step - 1]
            else:
                spent = run.ledger.exhausted()
                if spent is not None:
                    return self._failed(run, spent)
                try:
                    reply = await self._complete(run, step, messages)
                except ModelError as exc:
                    return self._failed(run, f"model call failed: {exc}")
            model_name = reply.model or model_name
            run.ledger.charge_call(reply.prompt_tokens, reply.completion_tokens, reply.cost_micro)
            messages.append(_assistant_message(reply))
            if not reply.tool_calls:
                if reply.content.strip():
                    return self._done(run, reply.content, model_name, step)
                messages.append({"role": "user", "content": NUDGE})
                continue
            results = await self._run_tools(run, step, reply)
            answer: str | None = None
            for call, result in zip(reply.tool_calls, results, strict=True):
                messages.append(
                    {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}
                )
                if answer is None and call.name == "final_answer":
                    given_answer = call.arguments.get("answer")
                    if isinstance(given_answer, str) and set(call.arguments) == {"answer"}:
                        answer = given_answer
            if answer is not None:
                return self._done(run, answer, model_name, step)
        return self._failed(
            run,
            f"step limit: no final answer after {self.limits.max_steps} model calls",
        )

    async def _complete(self, run: _Run, step: int, messages: list[dict[str, Any]]) -> Completion:
        """Make model call `step`, recorded before ("call") and after ("reply")."""
        run.journal.record({"k": "call", "step": step})
        with model_call(self.spec.model) as traced:
            reply = await self.model.complete(
                self.spec.model,
                messages,
                self.toolbox.schemas,
                temperature=self.spec.temperature,
                max_tokens=self.spec.max_tokens,
            )
            traced.completed(
                reply.model or self.spec.model,
                reply.prompt_tokens,
                reply.completion_tokens,
                reply.cost_micro,
            )
        run.journal.record(reply_entry(step, reply))
        await run.journal.saved()  # a step shown is one a takeover resumes from
        self._report(
            run,
            "model-call",
            model=reply.model or self.spec.model,
            tokens=reply.prompt_tokens + reply.completion_tokens,
            tool_calls=", ".join(call.name for call in reply.tool_calls),
        )
        return reply

    def _done(self, run: _Run, answer: str, model: str, steps: int) -> Outcome:
        output = AgentOutput(answer, agent=self.spec.name, model=model, steps=steps)
        return Outcome(output.encode(), "ok", run.ledger.own)

    def _failed(self, run: _Run, message: str) -> Outcome:
        return Outcome(message.encode(), "failed", run.ledger.own)

    async def _run_tools(self, run: _Run, step: int, reply: Completion) -> list[str]:
        calls = reply.tool_calls
        delegates = sum(1 for call in calls if call.name == "delegate")
        # The shares are split before any resumed child is charged, as the earlier run split
        # them before its children ended: a redone delegation carries the same input.
        context = self._context(run, delegates)
        results: list[str | None] = [_resumed(run, step, call) for call in calls]
        for i, call in enumerate(calls):
            if call.name not in CHILD_TOOLS and results[i] is None:
                results[i] = await self._call(run, step, call, context)
        waiting = [
            i for i, call in enumerate(calls) if call.name in CHILD_TOOLS and results[i] is None
        ]
        if waiting:
            self.port.suspend(run.work.task_id)
            try:
                calling = (self._call(run, step, calls[i], context) for i in waiting)
                answers = await asyncio.gather(*calling)
            finally:
                self.port.resume(run.work.task_id)
            for i, answer in zip(waiting, answers, strict=True):
                results[i] = answer
        return [result or "" for result in results]

    async def _call(self, run: _Run, step: int, call: ToolCall, context: ToolContext) -> str:
        with tool_call(call.name, call.id):
            answer = await self.toolbox.call(call.name, call.arguments, context)
        entry: dict[str, Any] = {"k": "tool", "step": step, "call": call.id, "result": answer}
        asked = child_request(call)
        if asked is not None and asked in run.charged:
            entry["charged"] = list(run.charged[asked])
        run.journal.record(entry)
        await run.journal.saved()
        self._report(run, "tool-call", tool=call.name, chars=len(answer))
        return answer

    def _report(self, run: _Run, kind: str, **detail: Detail) -> None:
        if self.progress is not None:
            self.progress.report(run.work.task_id, run.work.epoch, kind, **detail)

    def _context(self, run: _Run, delegates: int) -> ToolContext:
        share = run.ledger.split(delegates, self.limits.parent_reserve) if delegates else ""

        async def delegate(role: str, request: str) -> str:
            if isinstance(share, str):
                return f"refused: {share}"
            return await self._delegate(run, role, request, share)

        async def spawn(role: str, system: str, model: str) -> str:
            request = spawn_request(role, system, model)
            return await self._child(run, SPAWN_ROLE, request, request.encode(), None)

        return ToolContext(self.workspace, delegate, spawn)

    async def _delegate(self, run: _Run, role: str, request: str, share: Budget) -> str:
        refusal = check_depth(run.depth, self.limits) or find_loop(
            self.port, run.work.parent, (run.work.role, run.request), (role, request)
        )
        if refusal is not None:
            return f"refused: {refusal}"
        data = AgentInput(request, share, run.depth + 1).encode()
        return await self._child(run, role, request, data, share)

    async def _child(
        self, run: _Run, role: str, request: str, data: bytes, share: Budget | None
    ) -> str:
        """Submit (or reuse) one child, wait for it, charge it, and describe its result.

        Everything up to the first await is synchronous, so the concurrent calls of one turn
        see each other's `asked` and `created` entries in call order.
        """
        if (role, request) in run.asked:
            return f"refused: {role!r} was already asked for exactly this by this task"
        recorded = run.resume.children.get((role, request)) if run.resume is not None else None
        existing = None if recorded else find_child(self.port, run.work.task_id, role, request)
        if recorded is not None:
            child_id = recorded
        elif existing is not None:
            child_id = existing.task_id
        else:
            if not self.port.role_available(role):
                return f"refused: no live peer serves the role {role!r}"
            known = {child.task_id for child in self.port.children(run.work.task_id)}
            refusal = check_fan_out(len(known | run.created), self.limits)
            if refusal is not None:
                return f"refused: {refusal}"
            child_id = self.port.submit_child(run.work.task_id, role, data, run.work.priority)
        run.asked.add((role, request))
        run.created.add(child_id)
        child = {"k": "child", "role": role, "request": request, "child": child_id.hex()}
        run.journal.record(child)
        reused = recorded is not None or existing is not None
        self._report(run, "delegation", child=child_id.hex(), role=role, reused=reused)
        result = await self.port.wait_result(child_id)
        if share is not None:
            charge = subtree_usage(self.port, child_id, result.usage)
            run.ledger.charge_child(charge)
            run.charged[(role, request)] = charge
        text = result.output.decode("utf-8", errors="replace")
        if result.outcome != "ok":
            return f"child task failed: {result.outcome}: {text[:MAX_CHILD_FAILURE]}"
        output = AgentOutput.decode(result.output)
        return output.answer if output is not None else text


def spawn_request(role: str, system: str, model: str) -> str:
    """The request (and input) of the `grapevine.spawn` task a `spawn_agent` call submits."""
    body = {"role": role, "system": system, "model": model}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def child_request(call: ToolCall) -> tuple[str, str] | None:
    """The (role, request) of the child a `delegate` or `spawn_agent` call asks for."""
    args = call.arguments
    role, request = args.get("role"), args.get("request")
    if call.name == "delegate" and isinstance(role, str) and isinstance(request, str):
        return role, request
    if call.name == "spawn_agent":
        fields = (args.get("role"), args.get("system"), args.get("model"))
        if all(isinstance(value, str) for value in fields):
            return SPAWN_ROLE, spawn_request(*(str(value) for value in fields))
    return None


def _resumed(run: _Run, step: int, call: ToolCall) -> str | None:
    """The result an earlier run recorded for this call, taken over with what it charged and
    the child it asked for; None when the call is still to be made."""
    if run.resume is None or (step, call.id) not in run.resume.results:
        return None
    result, charged = run.resume.results[(step, call.id)]
    if charged is not None:
        run.ledger.charge_child(charged)
    asked = child_request(call)
    child = run.resume.children.get(asked) if asked is not None else None
    if asked is not None and child is not None:
        run.asked.add(asked)
        run.created.add(child)
    return result


def _assistant_message(reply: Completion) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in reply.tool_calls
        ]
    return message
