"""Durable steps of Python roles (issue 13, `peer.python_api.steps`): `await task.step(...)`
runs its function once per task; a re-run after a takeover (epoch + 1) or a restart replays
the recorded results, carries them forward, and runs afresh from the first step whose name
differs. Driven through the real `Task` over a checkpoint port that keeps what it is given,
and through a real in-process peer whose driver records the steps as signed checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import peer
from peer.agents.checkpoints import decode
from peer.agents.ports import AgentInput, Budget
from peer.agents.spec import TreeLimits
from peer.build import build_peer
from peer.python_api.steps import STEP_KIND
from peer.python_api.task import Task
from peer.runtime.executor import Work
from peer.runtime.keyring import Keyring
from peer.runtime.progress import ProgressLog
from peer.settings import AgentSettings
from protocol.errors import LocalProtocolError
from tests.peer.inprocess import MemoryStore
from tests.peer.test_python_api import Network

TASK = b"t" * 32
OWNER = b"o" * 32


@dataclass(frozen=True)
class Kept:
    epoch: int
    seq: int
    owner: bytes
    data: bytes


@dataclass
class Port:
    """A checkpoint port keeping every checkpoint; refuses once `room` is used up."""

    kept: list[Kept] = field(default_factory=list)
    room: int = 1000

    def checkpoint(self, task_id: bytes, epoch: int, data: bytes) -> int:
        if len(self.kept) >= self.room:
            raise LocalProtocolError("a run keeps at most so many checkpoints")
        seq = 1 + sum(1 for k in self.kept if k.epoch == epoch)
        self.kept.append(Kept(epoch, seq, OWNER, data))
        return seq

    def checkpoints(self, task_id: bytes) -> list[Kept]:
        return sorted(self.kept, key=lambda k: (k.epoch, k.owner, k.seq))

    async def saved(self) -> bool:
        return True  # kept in memory at once

    def steps(self, epoch: int) -> list[tuple[int, str, bool]]:
        entries = [decode(k.data) for k in self.kept if k.epoch == epoch]
        return [(e["n"], e["name"], bool(e.get("copy"))) for e in entries if e]


def task(port: Port | None, epoch: int) -> Task:
    work = Work(TASK, epoch, "r", b"go")
    return Task(work, AgentInput("go"), Network(), TreeLimits(), Budget(), None, port)


class Calls:
    def __init__(self) -> None:
        self.made: list[str] = []

    def make(self, name: str) -> Any:
        async def call(x: int) -> dict[str, int]:
            self.made.append(name)
            return {name: x}

        return call


async def test_a_takeover_replays_recorded_steps_and_runs_the_rest() -> None:
    port, calls = Port(), Calls()
    first = task(port, 1)
    assert await first.step("plan", calls.make("plan"), 1) == {"plan": 1}
    assert await first.step("draft", calls.make("draft"), 2) == {"draft": 2}
    # The owner dies here; the takeover (epoch 2) runs the same function from the start.
    second = task(port, 2)
    assert await second.step("plan", calls.make("plan"), 1) == {"plan": 1}
    assert await second.step("draft", calls.make("draft"), 2) == {"draft": 2}
    assert await second.step("polish", calls.make("polish"), 3) == {"polish": 3}
    assert calls.made == ["plan", "draft", "polish"]  # nothing paid for twice
    # Replayed steps are carried under epoch 2, so a second takeover needs only epoch 2.
    assert port.steps(2) == [(1, "plan", True), (2, "draft", True), (3, "polish", False)]
    third = task(port, 3)
    for n, name in enumerate(("plan", "draft", "polish"), 1):
        assert await third.step(name, calls.make(name), n) == {name: n}
    assert calls.made == ["plan", "draft", "polish"]


async def test_each_step_is_reported_as_it_completes_saying_whether_it_was_replayed() -> None:
    # Steps appear in the watch stream and the tree as they happen (`ProgressLog`).
    port, calls, log = Port(), Calls(), ProgressLog(lambda: 0.0)
    work = Work(TASK, 1, "r", b"go")
    first = Task(work, AgentInput("go"), Network(), TreeLimits(), Budget(), log, port)
    await first.step("plan", calls.make("plan"), 1)
    second = Task(
        Work(TASK, 2, "r", b"go"), AgentInput("go"), Network(), TreeLimits(), Budget(), log, port
    )
    await second.step("plan", calls.make("plan"), 1)
    await second.step("draft", calls.make("draft"), 2)
    reported = [(s.epoch, s.kind, dict(s.detail)) for s in log.steps(TASK)]
    assert reported == [
        (1, "step", {"name": "plan", "replayed": False}),
        (2, "step", {"name": "plan", "replayed": True}),
        (2, "step", {"name": "draft", "replayed": False}),
    ]
    assert (log.counts(TASK) or {})["step"] == 3


async def test_a_step_that_differs_runs_afresh_with_every_step_after_it() -> None:
    port, calls = Port(), Calls()
    first = task(port, 1)
    for name in ("a", "b", "c"):
        await first.step(name, calls.make(name), 0)
    second = task(port, 2)
    await second.step("a", calls.make("a"), 0)
    await second.step("x", calls.make("x"), 0)  # another path: x runs, and so does c
    await second.step("c", calls.make("c"), 0)
    assert calls.made == ["a", "b", "c", "x", "c"]
    # Epoch 2's records are the branch taken: a third run replays a, x, c.
    third = task(port, 3)
    for name in ("a", "x", "c"):
        await third.step(name, calls.make(name), 0)
    assert calls.made == ["a", "b", "c", "x", "c"]


async def test_a_re_run_of_the_same_epoch_after_a_restart_replays_without_copies() -> None:
    port, calls = Port(), Calls()
    await task(port, 1).step("a", calls.make("a"), 0)
    again = task(port, 1)  # the owner restarted and resumes its own epoch
    assert await again.step("a", calls.make("a"), 0) == {"a": 0}
    assert calls.made == ["a"] and port.steps(1) == [(1, "a", False)]


async def test_results_must_be_json_and_names_text() -> None:
    port = Port()
    t = task(port, 1)
    with pytest.raises(TypeError, match="not JSON"):
        await t.step("s", lambda: object())
    with pytest.raises(TypeError, match="name"):
        await t.step("", lambda: 1)
    assert await t.step("plain", lambda: [1, "two", None]) == [1, "two", None]  # sync works


async def test_a_refused_checkpoint_stops_recording_not_the_task() -> None:
    port, calls = Port(room=1), Calls()
    first = task(port, 1)
    for name in ("a", "b"):
        assert await first.step(name, calls.make(name), 0) == {name: 0}
    second = task(port, 2)
    for name in ("a", "b"):
        await second.step(name, calls.make(name), 0)
    assert calls.made == ["a", "b", "b"]  # b was never recorded: it runs again


async def test_without_a_port_every_step_runs() -> None:
    calls = Calls()
    for epoch in (1, 2):
        await task(None, epoch).step("a", calls.make("a"), 0)
    assert calls.made == ["a", "a"]


@peer.role("stepper")
async def stepper(t: peer.Task) -> str:
    first = await t.step("fetch", lambda: {"words": t.input.split()})
    return str(await t.step("count", lambda: len(first["words"])))


async def test_a_peer_records_a_python_roles_steps_as_checkpoints_of_the_task(
    tmp_path: Path,
) -> None:
    settings = AgentSettings(bind="127.0.0.1:0", data_dir=tmp_path, profile="local")
    async with build_peer(
        settings,
        keyring=Keyring(bytes(range(72, 104))),
        store=MemoryStore(),
        python_roles=[stepper],
    ) as p:
        task_id = p.driver.submit("stepper", b"one two three", nonce=os.urandom(16))
        result = await p.driver.wait_result(task_id, timeout=20)
        assert result is not None and result.output == b"3"
        entries = [decode(c.data) for c in p.driver.checkpoints(task_id)]
    assert [(e["k"], e["n"], e["name"]) for e in entries if e] == [
        (STEP_KIND, 1, "fetch"),
        (STEP_KIND, 2, "count"),
    ]
    first = entries[0]
    assert first is not None and first["result"] == {"words": ["one", "two", "three"]}
