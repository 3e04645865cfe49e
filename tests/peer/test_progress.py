"""Task progress as it happens (issue 13): the log (peer/runtime/progress.py), what the agent
loop reports to it (peer/agents/runtime.py), and how the API shows it — the one-task stream
(`GET /v1/tasks/{id}/watch`, with `?tree=1` the tasks below it), the all-tasks stream and the
tree — over a socket, while the task runs."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.build import Peer
from peer.http import progress as http_progress
from peer.http.app import PeerApi
from peer.http.progress import merged
from peer.runtime import progress as progress_module
from peer.runtime.executor import Outcome, Work, builtin_roles
from peer.runtime.progress import ProgressLog, Step
from tests.peer.agents.test_runtime import MemoryPort, ScriptedModel, answer, reply, root_work
from tests.peer.agents.test_runtime import runtime as agent_runtime
from tests.peer.inprocess import API_HEADERS, API_TOKEN, in_process_peer

KEY = bytes(range(96, 128))


# --- the log -------------------------------------------------------------------------------------


async def test_steps_are_numbered_counted_and_handed_to_subscribers() -> None:
    log = ProgressLog(lambda: 12.5)
    queue = log.subscribe()
    first = log.report(b"a", 1, "model-call", model="m", tokens=3)
    log.report(b"b", 1, "tool-call", tool="read_file")
    second = log.report(b"a", 2, "delegation", child="cc", role="worker", reused=False)
    assert first == Step(b"a", 1, 1, "model-call", 12.5, (("model", "m"), ("tokens", 3)))
    assert (second.seq, second.epoch) == (2, 2)
    assert [s.kind for s in log.steps(b"a")] == ["model-call", "delegation"]
    assert log.counts(b"a") == {
        "model-call": 1,
        "tool-call": 0,
        "delegation": 1,
        "note": 0,
        "step": 0,
    }
    assert log.counts(b"never") is None and log.steps(b"never") == []
    assert [queue.get_nowait() for _ in range(3)] == [first, log.steps(b"b")[0], second]
    log.close()
    assert queue.get_nowait() is None
    with pytest.raises(ValueError, match="not 'thinking'"):
        log.report(b"a", 1, "thinking")


async def test_merged_feeds_take_all_that_is_queued_at_once_then_wait_then_end() -> None:
    notes: asyncio.Queue[Any] = asyncio.Queue()
    steps: asyncio.Queue[Any] = asyncio.Queue()
    for item in ("n1", "n2"):
        notes.put_nowait(item)
    steps.put_nowait("s1")
    feed = merged(notes, steps, silence=0.05)
    assert await anext(feed) == ["n1", "n2", "s1"]  # one batch: one write for a stream
    assert await anext(feed) is None  # silence
    asyncio.get_running_loop().call_later(0.01, steps.put_nowait, "s2")
    assert await anext(feed) == ["s2"]  # a wait that an item ends
    notes.put_nowait("n3")
    notes.put_nowait(None)  # the hub closed the subscription: what came before still goes
    assert await anext(feed) == ["n3"]
    with pytest.raises(StopAsyncIteration):
        await anext(feed)
    assert notes.empty() and steps.empty()


async def test_a_busy_merged_feed_gathers_what_comes_within_its_interval() -> None:
    # A stream written as events came wrote about 5 events at a time at 2,000 events a second;
    # a feed yields at most one batch per interval, and the first event of a quiet one at once.
    notes: asyncio.Queue[Any] = asyncio.Queue()
    steps: asyncio.Queue[Any] = asyncio.Queue()
    feed = merged(notes, steps, silence=5.0, gather=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    notes.put_nowait("n1")
    assert await anext(feed) == ["n1"]
    assert loop.time() - started < 0.9  # not held back: nothing was yielded before
    loop.call_later(0.05, notes.put_nowait, "n2")
    loop.call_later(0.1, steps.put_nowait, "s1")
    assert await anext(feed) == ["n2", "s1"]  # one batch, though they came 50 ms apart
    assert loop.time() - started >= 1.0
    await feed.aclose()


async def test_merged_batches_are_bounded_and_keep_each_queue_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_progress, "MERGED_BATCH", 2)
    notes: asyncio.Queue[Any] = asyncio.Queue()
    steps: asyncio.Queue[Any] = asyncio.Queue()
    for item in ("n1", "n2", "n3"):
        notes.put_nowait(item)
    steps.put_nowait("s1")
    feed = merged(notes, steps, silence=0.05)
    assert await anext(feed) == ["n1", "n2", "s1"]
    assert await anext(feed) == ["n3"]
    assert await anext(feed) is None


async def test_memory_is_bounded_and_a_lagging_subscriber_is_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(progress_module, "TASKS_KEPT", 2)
    monkeypatch.setattr(progress_module, "STEPS_KEPT", 3)
    monkeypatch.setattr(progress_module, "SUBSCRIBER_QUEUE", 4)
    log = ProgressLog(lambda: 0.0)
    lagging = log.subscribe()
    for _ in range(5):
        log.report(b"a", 1, "tool-call")
    assert [s.seq for s in log.steps(b"a")] == [3, 4, 5]
    assert log.counts(b"a") == {
        "model-call": 0,
        "tool-call": 5,
        "delegation": 0,
        "note": 0,
        "step": 0,
    }
    log.report(b"b", 1, "tool-call")
    log.report(b"a", 1, "tool-call")  # a is the most recent again
    log.report(b"c", 1, "tool-call")  # b, the least recently reported, is forgotten
    assert log.steps(b"b") == [] and len(log.steps(b"a")) == 3
    items = [lagging.get_nowait() for _ in range(lagging.qsize())]
    assert len(items) == 5 and items[-1] is None  # four steps, then its end


# --- the agent loop ------------------------------------------------------------------------------


async def test_the_agent_loop_reports_each_model_call_tool_call_and_delegation(
    tmp_path: Path,
) -> None:
    port = MemoryPort()

    async def worker(work: Work) -> Outcome:
        return Outcome(b"notes")

    port.handlers["worker"] = worker
    model = ScriptedModel(
        reply(
            "",
            ("read_file", {"path": "missing.txt"}),
            ("delegate", {"role": "worker", "request": "part A"}),
        ),
        answer("done"),
    )
    log = ProgressLog(lambda: 0.0)
    run = agent_runtime(model, port, tmp_path)
    run.progress = log
    outcome = await run.run(root_work(port=port))
    assert outcome.outcome == "ok", outcome.output
    child = port.children(b"root")[0].task_id.hex()
    steps = [(s.kind, dict(s.detail)) for s in log.steps(b"root")]
    assert [kind for kind, _ in steps] == [
        "model-call",
        "tool-call",
        "delegation",
        "tool-call",
        "model-call",
        "tool-call",
    ]
    assert steps[0][1] == {
        "model": "scripted/model",
        "tokens": 20,
        "tool_calls": "read_file, delegate",
    }
    assert steps[1][1]["tool"] == "read_file" and isinstance(steps[1][1]["chars"], int)
    assert steps[2][1] == {"child": child, "role": "worker", "reused": False}
    assert steps[3][1] == {"tool": "delegate", "chars": len("notes")}
    assert steps[4][1]["tool_calls"] == "final_answer"
    assert steps[5][1]["tool"] == "final_answer"


# --- the API -------------------------------------------------------------------------------------


class Stepper:
    """A role that makes steps as an agent does, each when the test says so."""

    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.go = asyncio.Queue[str]()

    async def __call__(self, work: Work) -> Outcome:
        assert self.peer is not None
        while (kind := await self.go.get()) != "end":
            if kind == "delegation":
                driver = self.peer.driver
                child = driver.submit("echo", b"hi", parent=work.task_id, nonce=os.urandom(16))
                driver.progress.report(
                    work.task_id, work.epoch, kind, child=child.hex(), role="echo", reused=False
                )
            else:
                self.peer.driver.progress.report(work.task_id, work.epoch, kind, tool="t")
        return Outcome(b"finished")


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Stepper, TestClient[Any, Any]]]:
    stepper = Stepper()
    roles = {**builtin_roles(), "stepper": stepper}
    async with in_process_peer(1, KEY, roles=roles) as first, in_process_peer(2, KEY) as second:
        stepper.peer = first
        assert await second.driver.join([first.driver.node.addr], timeout=5.0) is not None
        api = PeerApi(first.driver, first.transport, tmp_path, lambda: None, token=API_TOKEN)
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        try:
            yield stepper, client
        finally:
            await client.close()
            await api.stop()


async def _events(response: Any) -> AsyncIterator[dict[str, Any]]:
    async for line in response.content:
        text = line.decode().strip()
        if text.startswith("data:"):
            yield json.loads(text[5:])


async def _next(events: AsyncIterator[dict[str, Any]], kind: str) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        async for event in events:
            if event["type"] == kind:
                return event
        raise AssertionError(f"the stream ended before a {kind} event")

    return await asyncio.wait_for(find(), 5)


async def _submit(client: TestClient[Any, Any]) -> str:
    body = {"role": "stepper", "input": os.urandom(4).hex()}
    r = await client.post("/v1/tasks", json=body)
    assert r.status == 202, await r.text()
    return str((await r.json())["id"])


async def test_the_task_stream_shows_each_step_while_the_task_runs(
    served: tuple[Stepper, TestClient[Any, Any]],
) -> None:
    stepper, client = served
    task_id = await _submit(client)
    response = await client.get(f"/v1/tasks/{task_id}/watch", params={"tree": "1"})
    events = _events(response)
    await _next(events, "task-claimed")
    await stepper.go.put("model-call")
    step = await _next(events, "task-progress")  # while the task still runs
    assert (step["id"], step["seq"], step["step"], step["detail"]) == (
        task_id,
        1,
        "model-call",
        {"tool": "t"},
    )
    tree = await (await client.get(f"/v1/tasks/{task_id}/tree")).json()
    assert tree["state"] == "running"
    assert tree["progress"]["model-call"] == 1 and tree["progress"]["last"]["seq"] == 1
    await stepper.go.put("delegation")
    child = await _next(events, "task-child")  # the tree stream follows the child too
    delegation = await _next(events, "task-progress")
    assert child["id"] == delegation["detail"]["child"]
    assert (child["parent"], child["role"]) == (task_id, "echo")
    await _next(events, "task-result")  # the echo child's
    await stepper.go.put("tool-call")
    assert (await _next(events, "task-progress"))["step"] == "tool-call"
    await stepper.go.put("end")
    results = [e async for e in events if e["type"] == "task-result"]
    assert results[-1]["id"] == task_id and results[-1]["state"] == "done"
    tree = await (await client.get(f"/v1/tasks/{task_id}/tree")).json()
    assert tree["progress"] == {
        "model-call": 1,
        "tool-call": 1,
        "delegation": 1,
        "note": 0,
        "step": 0,
        "last": tree["progress"]["last"],
    }
    assert all(child["progress"] is None for child in tree["children"])  # echo made no step


async def test_the_all_tasks_stream_shows_steps(
    served: tuple[Stepper, TestClient[Any, Any]],
) -> None:
    stepper, client = served
    response = await client.get("/v1/tasks/watch", params={"follow": "1"})
    events = _events(response)
    task_id = await _submit(client)
    await _next(events, "task-claimed")
    await stepper.go.put("tool-call")
    step = await _next(events, "task-progress")
    assert (step["id"], step["step"]) == (task_id, "tool-call")
    await stepper.go.put("end")
    response.close()


async def test_a_watch_without_tree_shows_only_that_task(
    served: tuple[Stepper, TestClient[Any, Any]],
) -> None:
    stepper, client = served
    task_id = await _submit(client)
    response = await client.get(f"/v1/tasks/{task_id}/watch")
    for kind in ("delegation", "end"):
        await stepper.go.put(kind)
    events = [e async for e in _events(response)]
    assert {e["id"] for e in events} == {task_id}
    assert [e["step"] for e in events if e["type"] == "task-progress"] == ["delegation"]
    r = await client.get(f"/v1/tasks/{task_id}/watch", params={"tree": "yes"})
    assert r.status == 400
