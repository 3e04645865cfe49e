"""What the driver offers delegating agents (peer/runtime/driver.py): `submit(parent=)`,
`suspend` and `resume`, `wait_result`, `children_of`; real in-process peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio

from peer.runtime.driver import Driver
from peer.runtime.executor import Executor, RoleHandler, Work, builtin_roles
from tests.peer.inprocess import in_process_peer

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32, 64))


class Peers:
    def __init__(self, stack: AsyncExitStack) -> None:
        self.stack = stack
        self.executors: list[Executor] = []

    async def add(
        self, roles: dict[str, RoleHandler] | None = None, max_running: int = 4
    ) -> Driver:
        """A peer running `roles`, `max_running` at once; with None, one that serves none."""
        peer = await self.stack.enter_async_context(
            in_process_peer(
                len(self.executors) + 1,
                KEY,
                roles=roles,
                max_running=max_running,
                seed_only=roles is None,
            )
        )
        self.executors.append(peer.executor)
        return peer.driver


@pytest_asyncio.fixture
async def peers() -> AsyncIterator[Peers]:
    async with AsyncExitStack() as stack:
        yield Peers(stack)


async def _until(check: Callable[[], object], limit: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the limit"
        await asyncio.sleep(0.02)


async def _pair(peers: Peers) -> tuple[Driver, Driver]:
    """A serves the built-in roles; B serves nothing and joined A."""
    a = await peers.add(builtin_roles())
    b = await peers.add()
    assert await b.join([a.node.addr], timeout=5.0) is not None
    await _until(lambda: len(b.node.capable("echo")) == 1)
    return a, b


def _nonce() -> bytes:
    return os.urandom(16)


async def test_a_parent_that_suspends_lets_its_child_run_in_its_only_slot(peers: Peers) -> None:
    seen_suspended: list[set[bytes]] = []
    drivers: list[Driver] = []

    async def boss(work: Work) -> bytes:
        driver = drivers[0]
        driver.suspend(work.task_id)
        seen_suspended.append(set(driver.node.tasks.suspended))
        child = driver.submit("echo", b"part " + work.input, parent=work.task_id, nonce=_nonce())
        result = await driver.wait_result(child, timeout=10.0)
        driver.resume(work.task_id)
        assert result is not None
        return b"combined: " + result.output

    driver = await peers.add({**builtin_roles(), "boss": boss}, max_running=1)
    drivers.append(driver)
    parent = driver.submit("boss", b"one", nonce=_nonce())
    result = await driver.wait_result(parent, timeout=10.0)
    assert result is not None and result.outcome == "ok"
    assert result.output == b"combined: part one"
    assert seen_suspended == [{parent}]
    assert not driver.node.tasks.suspended and not driver.node.tasks.running
    [child] = driver.children_of(parent)
    assert child.record is not None and child.record.parent == parent
    assert child.state == "done"
    executor = peers.executors[0]
    assert executor is not None and executor.suspended == 0 and executor.running == 0


async def test_wait_result_at_once_later_on_cancel_and_on_timeout(peers: Peers) -> None:
    a, b = await _pair(peers)
    done = a.submit("echo", b"hi", nonce=_nonce())
    first = await b.wait_result(done, timeout=10.0)
    assert first is not None and first.output == b"hi"
    again = await asyncio.wait_for(b.wait_result(done), timeout=0.5)
    assert again == first, "a task with an accepted result answers at once"

    slow = b.submit("sleep", b"30", nonce=_nonce())
    assert await b.wait_result(slow, timeout=0.2) is None, "timed out"
    waiting = asyncio.ensure_future(b.wait_result(slow))
    await _until(lambda: slow in a.node.tasks.running)
    # Only its origin (B) may cancel it; A, running it, is in its audience and stops.
    b.cancel_task(slow, "no longer needed")
    assert await asyncio.wait_for(waiting, timeout=5.0) is None
    assert await asyncio.wait_for(b.wait_result(slow), timeout=0.5) is None
    assert b.notifications.results_awaited == 0


async def test_wait_result_for_a_task_not_known_yet_and_on_stop(peers: Peers) -> None:
    _, b = await _pair(peers)
    unknown = os.urandom(32)
    waiting = asyncio.ensure_future(b.wait_result(unknown))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    b.stop()
    assert await asyncio.wait_for(waiting, timeout=1.0) is None


async def test_children_of_lists_children_oldest_first_on_every_peer(peers: Peers) -> None:
    a, b = await _pair(peers)
    parent = a.submit("sleep", b"30", nonce=_nonce())
    late = a.submit("echo", b"late", parent=parent, created=2000.0, nonce=_nonce())
    early = b.submit("echo", b"early", parent=parent, created=1000.0, nonce=_nonce())
    a.submit("echo", b"unrelated", nonce=_nonce())
    for driver in (a, b):
        await _until(lambda d=driver: len(d.children_of(parent)) == 2)  # type: ignore[misc]
        assert [st.task_id for st in driver.children_of(parent)] == [early, late]
        assert driver.children_of(early) == [] and driver.children_of(os.urandom(32)) == []
    a.cancel_task(parent)


async def test_suspend_and_resume_reach_node_and_executor(peers: Peers) -> None:
    a = await peers.add(builtin_roles(), max_running=1)
    executor = peers.executors[0]
    assert executor is not None
    busy = a.submit("sleep", b"30", nonce=_nonce())
    await _until(lambda: executor.running == 1)
    assert a.node.peer_states()[a.node.node_id].free_slots == 0
    a.suspend(busy)
    assert a.node.tasks.suspended == {busy} and executor.suspended == 1
    assert a.node.peer_states()[a.node.node_id].free_slots == 1
    quick = a.submit("echo", b"meanwhile", nonce=_nonce())
    result = await a.wait_result(quick, timeout=5.0)
    assert result is not None and result.output == b"meanwhile"
    a.resume(busy)
    assert not a.node.tasks.suspended and executor.suspended == 0
    assert a.node.peer_states()[a.node.node_id].free_slots == 0
    a.suspend(os.urandom(32))  # not running here: nothing happens
    assert not a.node.tasks.suspended and executor.suspended == 0
    a.cancel_task(busy)
