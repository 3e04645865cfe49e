"""The executor (peer/runtime/executor.py): built-in roles, timeouts, cancellation, concurrency."""

from __future__ import annotations

import asyncio

import pytest

from peer.runtime.executor import Executor, Outcome, Work, builtin_roles
from protocol.tasks.messages import MAX_INLINE_PAYLOAD

pytestmark = pytest.mark.asyncio

Report = tuple[bytes, int, str, bytes, tuple[int, int, int]]


def _executor(max_running: int = 4, **extra: object) -> tuple[Executor, list[Report]]:
    done: list[Report] = []
    roles = {**builtin_roles(), **extra}
    executor = Executor(roles, max_running, lambda *report: done.append(report))  # type: ignore[arg-type]
    return executor, done


async def _until(check: object, limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "not within the limit"
        await asyncio.sleep(0.01)


async def test_echo_returns_its_input() -> None:
    executor, done = _executor()
    executor.start(Work(b"t" * 32, 1, "echo", b"hello \xff"))
    await _until(lambda: done)
    assert done == [(b"t" * 32, 1, "ok", b"hello \xff", (0, 0, 0))]
    assert executor.roles == ("echo", "sleep") and executor.running == 0


async def test_sleep_sleeps_and_is_cancellable_unreported() -> None:
    executor, done = _executor()
    executor.start(Work(b"a" * 32, 1, "sleep", b"0.05"))
    executor.start(Work(b"b" * 32, 2, "sleep", b"30"))
    await _until(lambda: done)
    assert done[0][2:4] == ("ok", b"slept 0.05 s")
    assert executor.running == 1
    assert not executor.cancel(b"b" * 32, 1), "another epoch is not cancelled"
    assert executor.cancel(b"b" * 32, 2)
    await _until(lambda: executor.running == 0)
    await asyncio.sleep(0.05)
    assert len(done) == 1, "a cancelled execution is not reported"


async def test_timeout_outcome() -> None:
    executor, done = _executor()
    executor.start(Work(b"t" * 32, 1, "sleep", b"10", timeout=0.05))
    await _until(lambda: done, limit=2.0)
    assert done[0][2] == "timeout" and b"0.05" in done[0][3]


async def test_failures_become_failed_outcomes() -> None:
    async def raises(work: Work) -> bytes:
        raise RuntimeError("model unavailable")

    async def huge(work: Work) -> bytes:
        return b"x" * (MAX_INLINE_PAYLOAD + 1)

    async def with_usage(work: Work) -> Outcome:
        return Outcome(b"answer", usage=(10, 20, 30))

    executor, done = _executor(raises=raises, huge=huge, usage=with_usage)
    for i, role in enumerate(("raises", "huge", "usage", "nope", "sleep")):
        data = b"not a number" if role == "sleep" else b""
        executor.start(Work(bytes([i]) * 32, 1, role, data))
    await _until(lambda: len(done) == 5)
    by_id = {report[0][0]: report for report in done}
    assert by_id[0][2:4] == ("failed", b"RuntimeError: model unavailable")
    assert by_id[1][2] == "failed" and b"exceeds the limit" in by_id[1][3]
    assert by_id[2][2:] == ("ok", b"answer", (10, 20, 30))
    assert by_id[3][2] == "failed" and b"does not serve role 'nope'" in by_id[3][3]
    assert by_id[4][2] == "failed" and b"sleep wants a number" in by_id[4][3]


async def test_concurrency_is_bounded_and_waiting_runs_by_priority() -> None:
    started: list[int] = []
    gate = asyncio.Event()

    async def gated(work: Work) -> bytes:
        started.append(work.priority)
        await gate.wait()
        return b""

    executor, done = _executor(max_running=2, gated=gated)
    for i, priority in enumerate((0, 0, 1, 5, 3)):
        executor.start(Work(bytes([i]) * 32, 1, "gated", b"", priority=priority))
    executor.start(Work(bytes([0]) * 32, 1, "gated", b""))  # a repeated start is ignored
    await _until(lambda: len(started) == 2)
    await asyncio.sleep(0.02)
    assert executor.running == 2 and executor.waiting == 3
    assert executor.cancel(bytes([4]) * 32, 1), "a waiting execution can be cancelled"
    gate.set()
    await _until(lambda: len(done) == 4)
    assert started == [0, 0, 5, 1]
    await executor.close()


async def test_close_cancels_everything() -> None:
    executor, done = _executor(max_running=1)
    executor.start(Work(b"a" * 32, 1, "sleep", b"30"))
    executor.start(Work(b"b" * 32, 1, "sleep", b"30"))
    await _until(lambda: executor.running == 1)
    await executor.close()
    assert executor.running == 0 and executor.waiting == 0 and done == []
    executor.start(Work(b"c" * 32, 1, "echo", b""))
    assert executor.running == 0, "a closed executor starts nothing"


async def test_suspended_execution_frees_its_slot_and_resume_takes_it_back() -> None:
    gates = {i: asyncio.Event() for i in range(3)}
    started: list[int] = []

    async def gated(work: Work) -> bytes:
        started.append(work.task_id[0])
        await gates[work.task_id[0]].wait()
        return bytes([work.task_id[0]])

    executor, done = _executor(max_running=1, gated=gated)
    parent, child, other = (bytes([i]) * 32 for i in range(3))
    executor.start(Work(parent, 1, "gated", b""))
    executor.start(Work(child, 1, "gated", b""))
    await _until(lambda: started == [0])
    assert executor.running == 1 and executor.waiting == 1
    assert not executor.suspend(child), "a waiting execution is not suspended"
    assert executor.suspend(parent) and not executor.suspend(parent)
    await _until(lambda: started == [0, 1])
    assert executor.running == 2 and executor.suspended == 1 and executor.waiting == 0
    assert executor.resume(parent) and not executor.resume(parent)
    assert executor.running == 2 and executor.suspended == 0, "resumed at once, over the bound"
    executor.start(Work(other, 1, "gated", b""))
    gates[1].set()
    await _until(lambda: len(done) == 1)
    await asyncio.sleep(0.02)
    assert started == [0, 1], "the resumed parent still holds the only slot"
    gates[0].set()
    await _until(lambda: started == [0, 1, 2])
    gates[2].set()
    await _until(lambda: len(done) == 3)
    assert [d[3] for d in done] == [b"\x01", b"\x00", b"\x02"]
    assert executor.running == 0 and executor.suspended == 0


async def test_suspended_execution_can_finish_or_be_cancelled_and_is_forgotten() -> None:
    executor, done = _executor(max_running=1)
    executor.start(Work(b"a" * 32, 1, "sleep", b"0.05"))
    await _until(lambda: executor.running == 1)
    assert executor.suspend(b"a" * 32)
    await _until(lambda: done)
    assert done[0][2] == "ok" and executor.suspended == 0 and not executor.resume(b"a" * 32)
    executor.start(Work(b"b" * 32, 1, "sleep", b"30"))
    await _until(lambda: executor.running == 1)
    assert executor.suspend(b"b" * 32)
    assert executor.cancel(b"b" * 32, 1)
    assert executor.running == 0 and executor.suspended == 0
    await asyncio.sleep(0.02)
    assert len(done) == 1 and not executor.resume(b"b" * 32)
    await executor.close()
