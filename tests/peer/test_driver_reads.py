"""Waiting on a task from outside its audience: real in-process peers over loopback.

A task's news goes to its audience only (replicas, origin, owner). A peer outside it that waits
for the result (the new owner of a parent taken over, waiting on a child its dead owner
submitted) must ask for it: `Driver.wait_result` reads the task from its holders now and then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
import pytest_asyncio

from tests.peer.inprocess import Peer, joined_peers

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
PEERS = 6


@pytest_asyncio.fixture
async def six() -> AsyncIterator[list[Peer]]:
    async with AsyncExitStack() as stack:
        yield await joined_peers(stack, PEERS, KEY)


async def test_a_peer_outside_the_audience_gets_the_result_it_waits_for(six: list[Peer]) -> None:
    origin = six[0].driver
    for k in range(20):
        task_id = origin.submit("echo", b"hello %d" % k, idempotency_key=f"outside-{k}")
        done = await origin.wait_result(task_id, timeout=10)
        assert done is not None and done.outcome == "ok"
        outsiders = [p for p in six if p.driver.node.task(task_id) is None]
        if outsiders:
            break
    else:
        pytest.fail("every task's audience covered all six peers")
    waiter = outsiders[0].driver
    result = await waiter.wait_result(task_id, timeout=10)
    assert result is not None and result.output == done.output
    assert not waiter.node.told_of(task_id)


async def test_a_wait_from_outside_ends_with_its_timeout_when_nobody_holds_the_task(
    six: list[Peer],
) -> None:
    waiter = six[1].driver
    started = asyncio.get_running_loop().time()
    assert await waiter.wait_result(bytes(32), timeout=1.5) is None
    assert 1.4 <= asyncio.get_running_loop().time() - started < 5
