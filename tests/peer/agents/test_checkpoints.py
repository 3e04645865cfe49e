"""Durable agent steps (peer/agents/checkpoints.py, model_calls.py, runtime.py): a run taken
over resumes from the checkpoints of the one before, against an in-memory checkpoint store."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from peer.agents.checkpoints import Resume, decode, encode
from peer.agents.model_calls import RunCalls, count_model_calls
from peer.agents.ports import AgentInput, AgentOutput, Budget, ChildResult, Completion
from peer.agents.runtime import AgentRuntime
from peer.agents.spec import AgentSpec, TreeLimits
from peer.agents.tools import Toolbox
from peer.runtime.executor import Outcome, Work
from protocol.errors import LocalProtocolError
from protocol.tasks.messages import MAX_CHECKPOINT_BYTES, MAX_CHECKPOINTS
from tests.peer.agents.test_runtime import MemoryPort, answer, reply, tool_results

STEP_TOOL = "tests.peer.agents.test_checkpoints:step"
ROUNDS_RUN: list[int] = []
"""The rounds `step` ran, in order (cleared by each test), in the module the toolbox imports
(pytest may have imported this file under another name): read it through `rounds_run`."""


def rounds_run() -> list[int]:
    module = importlib.import_module(STEP_TOOL.partition(":")[0])
    rounds: list[int] = module.ROUNDS_RUN
    return rounds


def step(round: int) -> str:
    """Do one round of the work.

    Args:
        round: which round, from 1.
    """
    ROUNDS_RUN.append(round)
    return f"round {round} done"


@dataclass(frozen=True, slots=True)
class Held:
    """A checkpoint as the fake store holds it (the fields agents read)."""

    task_id: bytes
    epoch: int
    seq: int
    owner: bytes
    data: bytes


@dataclass
class MemoryCheckpoints:
    """The driver's checkpoint methods over a list shared by every peer of a test."""

    held: list[Held]
    owner: bytes
    refuse: Callable[[bytes], bool] = lambda data: False

    def checkpoint(self, task_id: bytes, epoch: int, data: bytes) -> int:
        seq = 1 + sum(
            1 for c in self.held if (c.task_id, c.epoch, c.owner) == (task_id, epoch, self.owner)
        )
        if len(data) > MAX_CHECKPOINT_BYTES or seq > MAX_CHECKPOINTS or self.refuse(data):
            raise LocalProtocolError("refused")
        self.held.append(Held(task_id, epoch, seq, self.owner, data))
        return seq

    def checkpoints(self, task_id: bytes) -> list[Held]:
        return sorted(
            (c for c in self.held if c.task_id == task_id), key=lambda c: (c.epoch, c.seq)
        )

    async def saved(self) -> bool:
        return True  # held in memory at once


@dataclass
class GatedModel:
    """Answers from a script; call number `hang_at` never answers (the peer dies in it)."""

    script: list[Completion | Callable[[list[dict[str, Any]]], Completion]]
    hang_at: int = 0
    seen: list[list[dict[str, Any]]] = field(default_factory=list)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)

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
        if len(self.seen) == self.hang_at:
            self.hanging.set()
            await asyncio.Event().wait()
        assert self.script, "the model was called more often than scripted"
        nxt = self.script.pop(0)
        return nxt(messages) if callable(nxt) else nxt


def five_calls() -> list[Completion | Callable[[list[dict[str, Any]]], Completion]]:
    """Four rounds of the `step` tool, then an answer joining their results (tokens 10 + i)."""
    rounds: list[Completion | Callable[[list[dict[str, Any]]], Completion]] = [
        reply("", ("step", {"round": i}), tokens=10 + i) for i in range(1, 5)
    ]
    rounds.append(lambda messages: answer(" + ".join(tool_results(messages))))
    return rounds


def agent(model: GatedModel, port: MemoryPort, store: MemoryCheckpoints, tmp: Path) -> AgentRuntime:
    tools = (STEP_TOOL, "delegate", "final_answer")
    spec = AgentSpec("stepper", ("boss",), system="Work in rounds.", tools=tools)
    return AgentRuntime(
        spec, model, port, Toolbox.load(tools), TreeLimits(), tmp / "ws", checkpoints=store
    )


def work(epoch: int, request: str = "four rounds") -> Work:
    return Work(b"root", epoch, "boss", AgentInput(request, Budget(tokens=10_000)).encode())


async def die_in_flight(runtime: AgentRuntime, model: GatedModel, epoch: int) -> None:
    """Run until the model hangs, then end the run as a SIGKILL would."""
    running = asyncio.ensure_future(runtime.run(work(epoch)))
    await asyncio.wait_for(model.hanging.wait(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


@pytest.fixture(autouse=True)
def fresh_rounds() -> None:
    rounds_run().clear()


async def test_a_takeover_resumes_from_the_last_completed_step(tmp_path: Path) -> None:
    held: list[Held] = []
    first = GatedModel(five_calls(), hang_at=4)
    await die_in_flight(
        agent(first, MemoryPort(), MemoryCheckpoints(held, b"A"), tmp_path), first, 1
    )
    assert rounds_run() == [1, 2, 3]

    second = GatedModel(five_calls()[3:])
    outcome = await agent(second, MemoryPort(), MemoryCheckpoints(held, b"B"), tmp_path).run(
        work(2)
    )

    assert outcome.outcome == "ok", outcome.output
    output = AgentOutput.decode(outcome.output)
    assert output is not None and output.steps == 5
    assert output.answer == "round 1 done + round 2 done + round 3 done + round 4 done"
    assert len(second.seen) == 2, "only calls 4 and 5 are made again"
    assert second.seen[0] == first.seen[3], "call 4 sees the conversation call 4 saw before"
    assert rounds_run() == [1, 2, 3, 4]
    # The result carries the whole conversation's calls, resumed ones included.
    assert outcome.usage == (11 + 12 + 13 + 14 + 10, 11 + 12 + 13 + 14 + 10, 1 + 1 + 1 + 1 + 1)

    calls = count_model_calls(held)
    assert calls.runs == [
        RunCalls(1, b"A", model_calls=4, model_tokens=2 * (11 + 12 + 13)),
        RunCalls(
            2,
            b"B",
            model_calls=2,
            model_calls_repeated=1,
            model_calls_resumed=3,
            model_tokens=2 * (14 + 10),
            repeated_tokens=2 * 14,
        ),
    ]
    assert (calls.model_calls, calls.model_calls_repeated, calls.repeated_tokens) == (6, 1, 28)
    kinds = [decode(c.data)["k"] for c in held if c.epoch == 2]  # type: ignore[index]
    assert kinds == ["reply", "tool"] * 3 + ["call", "reply", "tool", "call", "reply", "tool"]
    copies = [decode(c.data) for c in held if c.epoch == 2][:6]
    assert all(entry is not None and entry["copy"] is True for entry in copies)


async def test_a_second_takeover_resumes_from_the_first_takeovers_checkpoints(
    tmp_path: Path,
) -> None:
    held: list[Held] = []
    port = MemoryPort()
    first = GatedModel(five_calls(), hang_at=2)
    await die_in_flight(agent(first, port, MemoryCheckpoints(held, b"A"), tmp_path), first, 1)
    second = GatedModel(five_calls()[1:], hang_at=3)  # calls 2 and 3, then hangs in call 4
    await die_in_flight(agent(second, port, MemoryCheckpoints(held, b"B"), tmp_path), second, 2)
    third = GatedModel(five_calls()[3:])
    outcome = await agent(third, port, MemoryCheckpoints(held, b"C"), tmp_path).run(work(3))

    assert outcome.outcome == "ok", outcome.output
    assert len(third.seen) == 2 and rounds_run() == [1, 2, 3, 4]
    calls = count_model_calls(held)
    assert [
        (r.epoch, r.model_calls, r.model_calls_repeated, r.model_calls_resumed) for r in calls.runs
    ] == [
        (1, 2, 0, 0),
        (2, 3, 1, 1),
        (3, 2, 1, 3),
    ]


async def test_a_rerun_parent_waits_on_the_child_it_recorded_without_its_record(
    tmp_path: Path,
) -> None:
    held: list[Held] = []
    asked = asyncio.Event()

    async def never(work: Work) -> Outcome:
        asked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    script = [
        reply("", ("delegate", {"role": "worker", "request": "part A"})),
        lambda messages: answer(tool_results(messages)[0]),
    ]
    first_port = MemoryPort(handlers={"worker": never})
    first = GatedModel(list(script))
    running = asyncio.ensure_future(
        agent(first, first_port, MemoryCheckpoints(held, b"A"), tmp_path).run(work(1))
    )
    await asyncio.wait_for(asked.wait(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    [(_, _, data)] = first_port.submitted
    child = next(iter(first_port.views))

    # The new owner has not seen the child's record: it must wait on the recorded child.
    second_port = MemoryPort(handlers={"worker": never})
    second_port.results[child] = ChildResult(
        "ok", AgentOutput("A", "w", "m", 1).encode(), (1, 1, 0)
    )
    second = GatedModel(list(script)[1:])
    outcome = await agent(second, second_port, MemoryCheckpoints(held, b"B"), tmp_path).run(work(2))
    assert outcome.outcome == "ok" and AgentOutput.decode(outcome.output).answer == "A"  # type: ignore[union-attr]
    assert second_port.submitted == [], "a second child was created"
    assert AgentInput.decode(data).budget.tokens == (10_000 - 20) * 3 // 4


async def test_without_its_child_checkpoint_a_rerun_parent_submits_the_same_child(
    tmp_path: Path,
) -> None:
    """The child checkpoint was refused: the re-run delegates again with the same input (the
    ledger replayed), so the child's idempotency key, hence its id, is the same."""
    held: list[Held] = []
    asked = asyncio.Event()

    async def never(work: Work) -> Outcome:
        asked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    script = [
        reply("", ("step", {"round": 1}), tokens=500),
        reply("", ("delegate", {"role": "worker", "request": "part A"})),
        lambda messages: answer(tool_results(messages)[-1]),
    ]
    no_children = MemoryCheckpoints(held, b"A", refuse=lambda data: b'"k":"child"' in data)
    first_port = MemoryPort(handlers={"worker": never})
    running = asyncio.ensure_future(
        agent(GatedModel(list(script)), first_port, no_children, tmp_path).run(work(1))
    )
    await asyncio.wait_for(asked.wait(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    [(_, _, first_data)] = first_port.submitted
    assert AgentInput.decode(first_data).budget.tokens == (10_000 - 1000 - 20) * 3 // 4

    second_port = MemoryPort(handlers={"worker": never})
    second = GatedModel(list(script)[2:])
    running = asyncio.ensure_future(
        agent(second, second_port, MemoryCheckpoints(held, b"B"), tmp_path).run(work(2))
    )
    asked.clear()
    await asyncio.wait_for(asked.wait(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert [data for _, _, data in second_port.submitted] == [first_data]
    assert second.seen == [], "no model call: steps 1 and 2 were recorded"


async def test_recording_stops_at_the_first_refused_checkpoint(tmp_path: Path) -> None:
    held: list[Held] = []
    store = MemoryCheckpoints(held, b"A", refuse=lambda data: b"round 2 done" in data)
    outcome = await agent(GatedModel(five_calls()), MemoryPort(), store, tmp_path).run(work(1))
    assert outcome.outcome == "ok"
    entries = [decode(c.data) for c in held]
    # call, reply, tool of round 1; call, reply of round 2; then nothing (a prefix of the run).
    assert [e["k"] for e in entries if e is not None] == ["call", "reply", "tool", "call", "reply"]
    resume = Resume.load(held, 2)
    assert resume is not None and len(resume.replies) == 2 and len(resume.results) == 1


def test_resume_reads_only_the_latest_epoch_and_later_answers_win() -> None:
    def held(epoch: int, seq: int, entry: dict[str, Any]) -> Held:
        return Held(b"t", epoch, seq, b"A", encode(entry))

    def answered(step: int, content: str) -> dict[str, Any]:
        return {
            "k": "reply",
            "step": step,
            "content": content,
            "tools": [],
            "usage": [1, 1, 0],
            "model": "m",
        }

    log = [
        held(1, 1, answered(1, "old one")),
        held(2, 1, answered(1, "one")),
        held(2, 2, answered(2, "two")),
        held(2, 3, answered(2, "two again")),  # a restart redid step 2
        held(
            2,
            4,
            {"k": "reply", "step": 4, "content": "", "tools": [], "usage": [1, 1, 0], "model": "m"},
        ),
        held(2, 5, {"k": "unknown"}),
        Held(b"t", 2, 6, b"A", b"not json"),
        held(3, 1, answered(1, "from a later epoch")),
    ]
    resume = Resume.load(log, 2)
    assert resume is not None and resume.epoch == 2
    assert [r.content for r in resume.replies] == ["one", "two again"], "step 4 is not contiguous"
    assert Resume.load(log[:1], 1) is not None and Resume.load([], 5) is None


def test_count_model_calls_without_resume_repeats_every_step() -> None:
    def call(epoch: int, seq: int, step: int) -> Held:
        return Held(
            b"t", epoch, seq, b"A" if epoch == 1 else b"B", encode({"k": "call", "step": step})
        )

    log = [call(1, 1, 1), call(1, 2, 2), call(2, 1, 1), call(2, 2, 2), call(2, 3, 3)]
    calls = count_model_calls(log)
    assert (calls.model_calls, calls.model_calls_repeated) == (5, 2)
    assert count_model_calls([]).runs == []
