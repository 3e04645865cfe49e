"""Blobs are deleted with the last task that references them (issue 10, "Retention"): the rule
(`collectable`) and the references index, then in-process peers whose tasks are compacted
after a short `--task-retention`, and a restart."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from peer.build import Peer
from peer.http.app import PeerApi
from peer.runtime.blob_references import BlobReferences, collectable
from peer.runtime.executor import Work, builtin_roles
from protocol.blobs import blob_ref
from tests.peer.inprocess import API_HEADERS, API_TOKEN, MemoryStore, in_process_peer

KEY = bytes(range(32))
RETENTION = 0.5
GRACE = 60.0


@pytest.mark.parametrize(
    ("stored_ago", "released", "expected"),
    [
        (0.0, True, True),  # its last task was forgotten: at once
        (GRACE + 1, True, True),
        (0.0, False, False),  # waiting for its task (a push, an input being submitted)
        (GRACE - 1, False, False),
        (GRACE, False, True),  # nobody came for it within the grace period
        (GRACE * 100, False, True),  # e.g. a task forgotten before a restart
    ],
)
def test_collectable(stored_ago: float, released: bool, expected: bool) -> None:
    now = 1_000_000.0
    assert collectable(now - stored_ago, now, GRACE, released=released) is expected


def test_references_release_a_blob_with_the_last_task_that_needs_it() -> None:
    refs = BlobReferences()
    x, y = b"x" * 32, b"y" * 32
    t1, t2, t3 = b"1" * 32, b"2" * 32, b"3" * 32
    refs.note(t1, [x, y], now=0.0)
    refs.note(t2, [x], now=0.0)
    refs.forget(t1)
    assert refs.take_released() == {y}
    assert refs.needed(x) and not refs.needed(y)
    refs.forget(t2)
    refs.forget(t2)  # forgetting again (a tombstone expiring) changes nothing
    assert refs.released == {x} and not refs.needed(x)
    refs.note(t3, [x], now=1.0)  # needed again before a collection took it
    assert refs.take_released() == set() and refs.needed(x)

    # A rebuild keeps the held tasks' references and, within the grace period, the blobs
    # stored for tasks still on their way; the rest is released.
    refs.note(t1, [y], now=10.0)
    refs.rebuild([(t2, [x])], now=10.0 + GRACE - 1, grace=GRACE)
    assert refs.needed(x) and refs.needed(y) and refs.released == set()
    refs.rebuild([(t2, [x])], now=10.0 + GRACE, grace=GRACE)
    assert refs.needed(x) and not refs.needed(y) and refs.take_released() == {y}
    refs.rebuild([], now=10.0 + 2 * GRACE, grace=GRACE)  # no task held needs it any more
    assert refs.take_released() == {x} and not refs.needed(x)


def _text(size: int) -> str:
    return base64.b64encode(os.urandom(size))[:size].decode()


class Holding:
    """A role that runs until the test lets it end."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, work: Work) -> bytes:
        await self.release.wait()
        return b"held"


async def _until(check: Callable[[], bool], what: str, limit: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


class Pair:
    """Peer A (the API; serves no role) and peer B (echo and hold), retention `RETENTION`."""

    def __init__(self, a: Peer, b: Peer, client: TestClient[Any, Any], hold: Holding) -> None:
        self.a, self.b, self.client, self.hold = a, b, client, hold

    async def submit(self, role: str, text: str) -> bytes:
        r = await self.client.post("/v1/tasks", json={"role": role, "input": text})
        assert r.status == 202, await r.text()
        return bytes.fromhex((await r.json())["id"])

    async def compacted(self, task_id: bytes) -> None:
        def gone() -> bool:
            return all(p.driver.node.tombstone(task_id) is not None for p in (self.a, self.b))

        await _until(gone, f"task {task_id.hex()[:12]} was not compacted at both peers")

    def holding(self, data: str) -> list[bool]:
        digest = hashlib.sha256(data.encode()).digest()
        return [p.blobs.store.has(digest) for p in (self.a, self.b)]


async def _pair(stack: AsyncExitStack, root: Path) -> Pair:
    hold = Holding()
    roles = {**builtin_roles(), "hold": hold}
    a = await stack.enter_async_context(
        in_process_peer(1, KEY, data_dir=root / "a", seed_only=True, task_retention=RETENTION)
    )
    b = await stack.enter_async_context(
        in_process_peer(2, KEY, data_dir=root / "b", roles=roles, task_retention=RETENTION)
    )
    assert await b.driver.join([a.driver.node.addr], timeout=5.0) is not None
    await _until(lambda: len(a.driver.node.capable("hold")) == 1, "B's roles did not reach A")
    api = PeerApi(a.driver, a.transport, root, lambda: None, token=API_TOKEN, blobs=a.blobs)
    client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
    await client.start_server()
    stack.push_async_callback(client.close)
    return Pair(a, b, client, hold)


@pytest.mark.asyncio
async def test_a_blob_goes_with_the_last_task_that_references_it(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        pair = await _pair(stack, tmp_path)
        alone, shared, running = _text(200_000), _text(200_000), _text(200_000)
        first = await pair.submit("echo", alone)
        shared_done = await pair.submit("echo", shared)
        shared_held = await pair.submit("hold", shared)  # the same input, a task still running
        held = await pair.submit("hold", running)
        assert pair.holding(alone) == pair.holding(shared) == pair.holding(running) == [True] * 2

        await pair.compacted(first)
        await pair.compacted(shared_done)
        await _until(lambda: pair.holding(alone) == [False, False], "the blob outlived its task")
        # A blob another live task references stays, at both peers.
        assert pair.holding(shared) == pair.holding(running) == [True, True]
        assert pair.a.blobs.counters["deleted with tasks"] == 1
        assert pair.b.blobs.counters["deleted with tasks"] == 1

        pair.hold.release.set()
        await pair.compacted(shared_held)
        await pair.compacted(held)
        await _until(lambda: pair.holding(shared) == [False, False], "shared blob outlived")
        await _until(lambda: pair.holding(running) == [False, False], "held blob outlived")
        for peer in (pair.a, pair.b):
            assert peer.blobs.store.held() == {} and peer.blobs.store.held_for_others == 0
            assert peer.blobs.counters["swept"] == 0  # all went with their tasks, at once


@pytest.mark.asyncio
async def test_after_a_restart_orphans_go_and_referenced_blobs_stay(tmp_path: Path) -> None:
    store = MemoryStore()
    kept, orphan, fresh = (os.urandom(100_000 + i) for i in range(3))
    async with in_process_peer(1, KEY, store=store, data_dir=tmp_path, seed_only=True) as p:
        p.blobs.store.put(kept)
        p.driver.submit("nobody-serves-this", blob_ref(kept), idempotency_key="kept")
        for data in (orphan, fresh):
            p.blobs.store.put(data)
    # Stopped. One blob's task was forgotten before a crash took the peer: it is old now.
    orphan_digest = hashlib.sha256(orphan).digest()
    old = time.time() - 2 * 3600
    os.utime(tmp_path / "blobs" / orphan_digest.hex(), (old, old))

    async with in_process_peer(1, KEY, store=store, data_dir=tmp_path, seed_only=True) as p:
        await _until(lambda: not p.blobs.store.has(orphan_digest), "the orphan was kept")
        assert p.blobs.store.get(hashlib.sha256(kept).digest()) == kept  # a held task's
        assert p.blobs.store.has(hashlib.sha256(fresh).digest())  # within its grace period
        assert p.blobs.counters["swept"] == 1
