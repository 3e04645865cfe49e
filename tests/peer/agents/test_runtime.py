"""The agent loop (peer/agents/runtime.py) against a scripted model and an in-memory port."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from peer.agents.ports import (
    AgentInput,
    AgentOutput,
    Budget,
    ChildResult,
    Completion,
    ModelError,
    TaskView,
    ToolCall,
)
from peer.agents.runtime import SPAWN_ROLE, AgentRuntime
from peer.agents.spec import AgentSpec, TreeLimits
from peer.agents.tools import Toolbox
from peer.runtime.executor import Outcome, Work

Handler = Callable[[Work], Awaitable[Outcome]]
Step = Completion | Callable[[list[dict[str, Any]]], Completion]


def reply(content: str = "", *calls: tuple[str, dict[str, Any]], tokens: int = 10) -> Completion:
    """A completion calling `calls` (name, arguments) with ids c0, c1, ..."""
    tool_calls = tuple(ToolCall(f"c{i}", name, args) for i, (name, args) in enumerate(calls))
    return Completion(content, tool_calls, tokens, tokens, tokens // 10, "scripted/model")


def answer(text: str) -> Completion:
    return reply("", ("final_answer", {"answer": text}))


class ScriptedModel:
    """Returns its script's completions in order and records every call's messages."""

    def __init__(self, *script: Step | ModelError) -> None:
        self.script = list(script)
        self.seen: list[list[dict[str, Any]]] = []
        self.tools: list[list[dict[str, Any]]] = []

    async def complete(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Completion:
        self.seen.append([dict(m) for m in messages])
        self.tools.append(tools)
        assert self.script, "the model was called more often than scripted"
        step = self.script.pop(0)
        if isinstance(step, ModelError):
            raise step
        return step(messages) if callable(step) else step


@dataclass
class MemoryPort:
    """An in-memory task network: children run (once) when first waited for."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    views: dict[bytes, TaskView] = field(default_factory=dict)
    results: dict[bytes, ChildResult] = field(default_factory=dict)
    priorities: dict[bytes, int] = field(default_factory=dict)
    events: list[tuple[str, bytes]] = field(default_factory=list)
    submitted: list[tuple[bytes, str, bytes]] = field(default_factory=list)
    unavailable: set[str] = field(default_factory=set)
    _running: dict[bytes, asyncio.Task[ChildResult]] = field(default_factory=dict)

    def add(self, view: TaskView, result: ChildResult | None = None) -> None:
        self.views[view.task_id] = view
        if result is not None:
            self.results[view.task_id] = result

    def submit_child(self, parent: bytes, role: str, data: bytes, priority: int) -> bytes:
        task_id = hashlib.sha256(parent + role.encode() + b"\0" + data).digest()[:8]
        if task_id not in self.views:
            self.views[task_id] = TaskView(task_id, parent, role, data, "pending", (0, 0, 0))
            self.priorities[task_id] = priority
            self.submitted.append((parent, role, data))
        return task_id

    async def wait_result(self, task_id: bytes) -> ChildResult:
        if task_id in self.results:
            return self.results[task_id]
        if task_id not in self._running:
            self._running[task_id] = asyncio.ensure_future(self._execute(task_id))
        return await asyncio.shield(self._running[task_id])

    async def _execute(self, task_id: bytes) -> ChildResult:
        view = self.views[task_id]
        work = Work(
            task_id, 1, view.role, view.input, self.priorities.get(task_id, 0), 0.0, view.parent
        )
        outcome = await self.handlers[view.role](work)
        result = ChildResult(outcome.outcome, outcome.output, outcome.usage)
        self.results[task_id] = result
        state = "done" if outcome.outcome == "ok" else "failed"
        self.views[task_id] = replace(view, state=state, usage=outcome.usage)
        return result

    def suspend(self, task_id: bytes) -> None:
        self.events.append(("suspend", task_id))

    def resume(self, task_id: bytes) -> None:
        self.events.append(("resume", task_id))

    def task(self, task_id: bytes) -> TaskView | None:
        return self.views.get(task_id)

    def children(self, task_id: bytes) -> list[TaskView]:
        return [v for v in self.views.values() if v.parent == task_id]

    def role_available(self, role: str) -> bool:
        return role not in self.unavailable and (role in self.handlers or role == "anything")


TOOLS = ("delegate", "spawn_agent", "read_file", "write_file", "final_answer")


def runtime(
    model: ScriptedModel,
    port: MemoryPort,
    tmp_path: Path,
    *,
    role: str = "boss",
    limits: TreeLimits | None = None,
    tools: tuple[str, ...] = TOOLS,
    **spec: Any,
) -> AgentRuntime:
    spec.setdefault("system", f"You are the {role}.")
    agent = AgentSpec(f"{role}-agent", (role,), tools=tools, **spec)
    return AgentRuntime(
        agent, model, port, Toolbox.load(tools), limits or TreeLimits(), tmp_path / "ws"
    )


def root_work(request: str = "write a brief", role: str = "boss", **extra: Any) -> Work:
    data = extra.pop("data", AgentInput(request, Budget(tokens=10_000)).encode())
    port_view = extra.pop("port", None)
    work = Work(b"root", 1, role, data, **extra)
    if port_view is not None:
        port_view.add(TaskView(b"root", work.parent, role, data, "running", (0, 0, 0)))
    return work


def tool_results(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "tool"]


async def test_two_level_tree(tmp_path: Path) -> None:
    port = MemoryPort()
    arrived = 0
    both = asyncio.Event()

    async def worker(work: Work) -> Outcome:
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 2)  # both children run at once
        request = AgentInput.decode(work.input).request
        model = ScriptedModel(reply(f"notes on {request}"))
        return await runtime(model, port, tmp_path, role="worker").run(work)

    port.handlers["worker"] = worker
    boss_model = ScriptedModel(
        reply(
            "splitting",
            ("delegate", {"role": "worker", "request": "part A"}),
            ("delegate", {"role": "worker", "request": "part B"}),
        ),
        lambda messages: answer(" + ".join(tool_results(messages))),
    )
    work = root_work(priority=7, port=port)
    outcome = await runtime(boss_model, port, tmp_path).run(work)

    assert outcome.outcome == "ok", outcome.output
    output = AgentOutput.decode(outcome.output)
    assert output == AgentOutput(
        "notes on part A + notes on part B", "boss-agent", "scripted/model", 2
    )
    assert outcome.usage == (20, 20, 2), "only the boss's own two calls"
    first = boss_model.seen[0]
    assert first == [
        {"role": "system", "content": "You are the boss."},
        {"role": "user", "content": "write a brief"},
    ]
    assistant = boss_model.seen[1][2]
    assert assistant["role"] == "assistant" and assistant["content"] == "splitting"
    assert assistant["tool_calls"][1] == {
        "id": "c1",
        "type": "function",
        "function": {
            "name": "delegate",
            "arguments": json.dumps({"role": "worker", "request": "part B"}),
        },
    }
    tool_messages = [m for m in boss_model.seen[1] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["c0", "c1"]
    assert {s["function"]["name"] for s in boss_model.tools[0]} == set(TOOLS)

    children = port.children(b"root")
    inputs = [AgentInput.decode(child.input) for child in children]
    # 10,000 tokens, 20 spent by the first call: 9,980 * 0.75 / 2 each.
    assert inputs == [
        AgentInput("part A", Budget(tokens=3742), 1),
        AgentInput("part B", Budget(tokens=3742), 1),
    ]
    assert all(port.priorities[child.task_id] == 7 for child in children)
    assert port.events == [("suspend", b"root"), ("resume", b"root")]


async def test_suspend_resume_once_per_turn_even_when_cancelled(tmp_path: Path) -> None:
    port = MemoryPort()
    started = asyncio.Event()

    async def stuck(work: Work) -> Outcome:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    port.handlers["worker"] = stuck
    model = ScriptedModel(
        reply(
            "",
            ("delegate", {"role": "worker", "request": "a"}),
            ("delegate", {"role": "worker", "request": "b"}),
            ("read_file", {"path": "x"}),
        )
    )
    task = asyncio.ensure_future(runtime(model, port, tmp_path).run(root_work(port=port)))
    await asyncio.wait_for(started.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert port.events == [("suspend", b"root"), ("resume", b"root")]


async def test_no_suspend_without_children(tmp_path: Path) -> None:
    port = MemoryPort()
    model = ScriptedModel(
        reply("", ("write_file", {"path": "n.txt", "content": "hi"})),
        reply("", ("read_file", {"path": "n.txt"})),
        lambda messages: answer(tool_results(messages)[-1]),
    )
    outcome = await runtime(model, port, tmp_path).run(root_work(port=port))
    assert AgentOutput.decode(outcome.output) == AgentOutput(
        "hi", "boss-agent", "scripted/model", 3
    )
    assert port.events == [] and (tmp_path / "ws" / "n.txt").read_text() == "hi"


async def test_budget_exhaustion(tmp_path: Path) -> None:
    port = MemoryPort()
    model = ScriptedModel(
        reply("", ("read_file", {"path": "missing"}), tokens=30),
        reply("", ("read_file", {"path": "missing"}), tokens=30),
    )
    data = AgentInput("q", Budget(tokens=100)).encode()
    outcome = await runtime(model, port, tmp_path).run(root_work(data=data, port=port))
    assert outcome.outcome == "failed"
    assert outcome.output == b"budget exhausted: used 120 of 100 tokens"
    assert outcome.usage == (60, 60, 6) and len(model.seen) == 2


async def test_a_task_cannot_raise_the_operators_budget(tmp_path: Path) -> None:
    """A task asking 10^12 tokens under an operator cap of 10k gets 10k, for its own calls
    and for what it hands its children."""
    port = MemoryPort()
    seen: list[Budget] = []

    async def worker(work: Work) -> Outcome:
        seen.append(AgentInput.decode(work.input).budget)
        return Outcome(AgentOutput("done", "w", "m", 1).encode(), "ok", (0, 0, 0))

    port.handlers["worker"] = worker
    model = ScriptedModel(
        reply("", ("delegate", {"role": "worker", "request": "all"}), tokens=10),
        *(reply("", ("read_file", {"path": "missing"}), tokens=2_000) for _ in range(3)),
    )
    data = AgentInput("q", Budget(tokens=10**12)).encode()
    capped = runtime(model, port, tmp_path, budget=Budget(tokens=10_000))
    outcome = await capped.run(root_work(data=data, port=port))
    assert seen == [Budget(tokens=(10_000 - 20) * 3 // 4)]
    assert outcome.output == b"budget exhausted: used 12020 of 10000 tokens"
    # The tree limits' default budget is the cap of an agent that sets none.
    model = ScriptedModel(reply("", ("read_file", {"path": "missing"}), tokens=6_000))
    limits = TreeLimits(default_budget=Budget(tokens=10_000))
    outcome = await runtime(model, MemoryPort(), tmp_path, limits=limits).run(
        root_work(data=data, port=MemoryPort())
    )
    assert outcome.output == b"budget exhausted: used 12000 of 10000 tokens"


async def test_children_usage_counts_against_the_budget(tmp_path: Path) -> None:
    port = MemoryPort()

    async def greedy(work: Work) -> Outcome:
        budget = AgentInput.decode(work.input).budget
        assert budget == Budget(tokens=(1000 - 20) * 3 // 4)
        out = AgentOutput("done", "w", "m", 1).encode()
        return Outcome(out, "ok", (budget.tokens, extra, 0))  # overshoots its share

    port.handlers["worker"] = greedy
    script = (reply("", ("delegate", {"role": "worker", "request": "all"})), answer("fine"))
    data = AgentInput("q", Budget(tokens=1000)).encode()

    extra = 100  # 20 own + 735 + 100 < 1000: the parent answers from its reserve
    model = ScriptedModel(*script)
    outcome = await runtime(model, port, tmp_path).run(root_work(data=data, port=port))
    assert outcome.outcome == "ok" and len(model.seen) == 2

    extra, port = 300, MemoryPort(handlers={"worker": greedy})
    model = ScriptedModel(*script)
    outcome = await runtime(model, port, tmp_path).run(root_work(data=data, port=port))
    assert outcome.output == b"budget exhausted: used 1055 of 1000 tokens"
    assert outcome.usage == (10, 10, 1), "the children's usage is on their own results"


async def test_no_budget_left_to_split_is_refused(tmp_path: Path) -> None:
    port = MemoryPort(handlers={"worker": lambda work: pytest.fail("not submitted")})
    model = ScriptedModel(
        reply("", ("delegate", {"role": "worker", "request": "x"}), tokens=49),
        lambda messages: answer(tool_results(messages)[0]),
    )
    data = AgentInput("q", Budget(tokens=99)).encode()
    outcome = await runtime(model, port, tmp_path).run(root_work(data=data, port=port))
    answer_text = AgentOutput.decode(outcome.output)
    assert answer_text is not None
    assert answer_text.answer.startswith("refused: budget: 1 of 99 tokens remain")
    assert port.submitted == []


async def test_loop_guard_refusals(tmp_path: Path) -> None:
    port = MemoryPort()
    port.add(
        TaskView(b"grand", b"", "boss", AgentInput("the project").encode(), "running", (0,) * 3)
    )
    port.handlers = {"boss": lambda w: pytest.fail("no loop"), "writer": lambda w: pytest.fail()}

    async def checker(work: Work) -> Outcome:
        return Outcome(AgentOutput("checked", "c", "m", 1).encode())

    port.handlers["checker"] = checker
    model = ScriptedModel(
        reply(
            "",
            ("delegate", {"role": "writer", "request": "draft it"}),  # itself
            ("delegate", {"role": "boss", "request": "the project"}),  # its parent
            ("delegate", {"role": "checker", "request": "check"}),
            ("delegate", {"role": "checker", "request": "check"}),  # twice in one turn
        ),
        reply("", ("delegate", {"role": "checker", "request": "check"})),  # again, later
        lambda messages: answer("\n".join(tool_results(messages))),
    )
    work = Work(b"root", 1, "writer", AgentInput("draft it", depth=1).encode(), parent=b"grand")
    port.add(TaskView(b"root", b"grand", "writer", work.input, "running", (0,) * 3))
    outcome = await runtime(model, port, tmp_path, role="writer").run(work)
    results = AgentOutput.decode(outcome.output)
    assert results is not None
    lines = results.answer.splitlines()
    assert lines[0] == "refused: loop: this task is itself 'writer' with that request"
    assert (
        lines[1] == "refused: loop: an ancestor 1 level(s) up is already 'boss' with that request"
    )
    assert lines[2] == "checked"
    assert lines[3] == "refused: 'checker' was already asked for exactly this by this task"
    assert lines[4] == lines[3]
    assert [role for _, role, _ in port.submitted] == ["checker"]


async def test_depth_fan_out_and_unserved_role_refusals(tmp_path: Path) -> None:
    port = MemoryPort()

    async def worker(work: Work) -> Outcome:
        return Outcome(b"plain text result")

    port.handlers["worker"] = worker
    model = ScriptedModel(
        reply(
            "",
            ("delegate", {"role": "worker", "request": "one"}),
            ("delegate", {"role": "worker", "request": "two"}),
            ("delegate", {"role": "nobody", "request": "three"}),
        ),
        lambda messages: answer("\n".join(tool_results(messages))),
    )
    limits = TreeLimits(max_children=1)
    outcome = await runtime(model, port, tmp_path, limits=limits).run(root_work(port=port))
    result = AgentOutput.decode(outcome.output)
    assert result is not None
    assert result.answer.splitlines() == [
        "plain text result",
        "refused: fan-out limit: this task already has 1 of 1 children",
        "refused: no live peer serves the role 'nobody'",
    ]

    deep = ScriptedModel(
        reply("", ("delegate", {"role": "worker", "request": "deeper"})),
        lambda messages: answer(tool_results(messages)[0]),
    )
    data = AgentInput("q", depth=4).encode()
    outcome = await runtime(deep, MemoryPort(), tmp_path).run(root_work(data=data))
    result = AgentOutput.decode(outcome.output)
    assert result is not None
    assert (
        result.answer == "refused: depth limit: a child would be at depth 5, the tree's limit is 4"
    )


async def test_child_failure_is_a_tool_result(tmp_path: Path) -> None:
    port = MemoryPort()

    async def failing(work: Work) -> Outcome:
        return Outcome(b"model call failed: provider down", "failed", (3, 0, 0))

    port.handlers["worker"] = failing
    model = ScriptedModel(
        reply("", ("delegate", {"role": "worker", "request": "x"})),
        lambda messages: answer(tool_results(messages)[0]),
    )
    outcome = await runtime(model, port, tmp_path).run(root_work(port=port))
    assert outcome.outcome == "ok"
    result = AgentOutput.decode(outcome.output)
    assert result is not None
    assert result.answer == "child task failed: failed: model call failed: provider down"


async def test_existing_children_are_reused_after_a_takeover(tmp_path: Path) -> None:
    port = MemoryPort(handlers={"worker": lambda w: pytest.fail("must not run again")})
    old_input = AgentInput("part A", Budget(tokens=1234), 1).encode()  # another split then
    port.add(
        TaskView(b"old-child", b"root", "worker", old_input, "done", (5, 5, 0)),
        ChildResult("ok", AgentOutput("A from before", "w", "m", 1).encode(), (5, 5, 0)),
    )
    model = ScriptedModel(
        reply("", ("delegate", {"role": "worker", "request": "part A"})),
        lambda messages: answer(tool_results(messages)[0]),
    )
    outcome = await runtime(model, port, tmp_path).run(root_work(port=port))
    result = AgentOutput.decode(outcome.output)
    assert result is not None and result.answer == "A from before"
    assert port.submitted == []


async def test_spawn_agent_submits_a_spawn_task(tmp_path: Path) -> None:
    port = MemoryPort()
    seen: list[bytes] = []

    async def spawner(work: Work) -> Outcome:
        seen.append(work.input)
        return Outcome(b"spawned translator on peer 1a2b")

    port.handlers[SPAWN_ROLE] = spawner
    args = {"role": "translator", "system": "Translate.", "model": "grapevine/offline"}
    model = ScriptedModel(
        reply("", ("spawn_agent", args)),
        lambda messages: answer(tool_results(messages)[0]),
    )
    outcome = await runtime(model, port, tmp_path).run(root_work(port=port))
    result = AgentOutput.decode(outcome.output)
    assert result is not None and result.answer == "spawned translator on peer 1a2b"
    assert json.loads(seen[0]) == args
    assert port.events == [("suspend", b"root"), ("resume", b"root")]


async def test_max_steps(tmp_path: Path) -> None:
    busy = [reply("", ("read_file", {"path": "x"})) for _ in range(3)]
    model = ScriptedModel(*busy)
    limits = TreeLimits(max_steps=3)
    outcome = await runtime(model, MemoryPort(), tmp_path, limits=limits).run(root_work())
    assert outcome == Outcome(
        b"step limit: no final answer after 3 model calls", "failed", (30, 30, 3)
    )


async def test_plain_reply_answers_and_an_empty_one_is_nudged(tmp_path: Path) -> None:
    model = ScriptedModel(reply(""), reply("forty-two"))
    outcome = await runtime(model, MemoryPort(), tmp_path, system="").run(root_work())
    assert AgentOutput.decode(outcome.output) == AgentOutput(
        "forty-two", "boss-agent", "scripted/model", 2
    )
    assert model.seen[0] == [{"role": "user", "content": "write a brief"}], "no empty system"
    assert model.seen[1][-1] == {
        "role": "user",
        "content": "Reply with your final answer, or call a tool.",
    }


async def test_bad_tool_calls_reach_the_model(tmp_path: Path) -> None:
    model = ScriptedModel(
        reply("", ("final_answer", {}), ("shell", {"cmd": "rm -rf /"})),
        lambda messages: answer(" | ".join(tool_results(messages))),
    )
    outcome = await runtime(model, MemoryPort(), tmp_path).run(root_work())
    result = AgentOutput.decode(outcome.output)
    assert result is not None
    assert result.answer.startswith(
        "error: final_answer: missing argument(s) answer | error: there is no tool 'shell'"
    )


async def test_failures(tmp_path: Path) -> None:
    model = ScriptedModel(ModelError("rate limited for good"))
    outcome = await runtime(model, MemoryPort(), tmp_path).run(root_work())
    assert outcome == Outcome(b"model call failed: rate limited for good", "failed", (0, 0, 0))

    bad = root_work(data=b'{"request": "x", "depth": -1}')
    outcome = await runtime(ScriptedModel(), MemoryPort(), tmp_path).run(bad)
    assert outcome.outcome == "failed" and outcome.output.startswith(b"bad agent input: ")

    plain = root_work(data=b"just text")
    model = ScriptedModel(answer("ok"))
    outcome = await runtime(model, MemoryPort(), tmp_path).run(plain)
    assert outcome.outcome == "ok" and model.seen[0][-1]["content"] == "just text"
