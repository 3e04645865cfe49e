"""Run counts (decision 64): a peer counts its own executions and its peer state carries them,
so any dashboard sums the network's totals."""

from __future__ import annotations

import asyncio
import os

from peer.runtime.driver import RUNS_INTERVAL
from peer.runtime.executor import Outcome, Work, builtin_roles
from protocol.wire import RUN_COUNTS
from tests.peer.inprocess import in_process_peer

KEY = bytes(range(64, 96))


async def failing(work: Work) -> Outcome:
    return Outcome(b"no", outcome="failed")


async def test_a_peer_counts_its_executions_and_advertises_them() -> None:
    roles = {**builtin_roles(), "fails": failing}
    async with in_process_peer(3, KEY, roles=roles) as peer:
        driver = peer.driver
        ids = [driver.submit("echo", b"x%d" % n, nonce=os.urandom(16)) for n in range(2)]
        ids.append(driver.submit("fails", b"y", nonce=os.urandom(16)))
        for task_id in ids:
            assert await driver.wait_result(task_id, timeout=10) is not None
        counts = dict(zip(RUN_COUNTS, driver.lifecycle.runs(), strict=True))
        assert counts == {
            "started": 3,
            "ok": 2,
            "failed": 1,
            "duplicates": 0,
            "takeovers": 0,
            "fenced": 0,
            "cancelled": 0,
        }
        # Read every RUNS_INTERVAL into our own state (a lone peer's first count goes at once).
        await asyncio.sleep(RUNS_INTERVAL + 0.5)
        own = driver.node.peer_states()[driver.node.node_id]
        assert own.runs == driver.lifecycle.runs()
