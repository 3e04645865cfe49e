"""The designated-holder rule for blobs (issue 11, finding 7): a peer takes a pushed blob only
for a task it is a designated holder of (`protocol.blobs.designated_holders`: the task's replica
set and `HOLDER_SLACK` more, in its own view), and an input blob goes to its task's holders.
Six in-process peers over loopback, so that most task ids leave out a given peer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.build import Peer
from peer.http.app import PeerApi
from peer.runtime.blob_routes import BlobTransferError
from protocol.blobs import HOLDER_SLACK, blob_holders, designated_holders
from protocol.tasks.placement import top_by_score
from tests.peer.inprocess import API_HEADERS, API_TOKEN, in_process_peer

KEY = bytes(range(32))
PEERS = 6
REPLICATION = 2  # the default `TaskConfig.replication`


def test_designated_holders_are_the_replica_set_then_the_slack() -> None:
    members = [bytes([i]) * 32 for i in range(10)]
    task_id = hashlib.sha256(b"task").digest()
    holders = designated_holders(task_id, members, REPLICATION)
    assert len(holders) == REPLICATION + 1 + HOLDER_SLACK
    assert holders[: REPLICATION + 1] == top_by_score(task_id, members, REPLICATION + 1)
    assert holders == blob_holders(task_id, members, len(members))[: len(holders)]
    assert designated_holders(task_id, members[:3], REPLICATION) == blob_holders(
        task_id, members[:3], 3
    )  # a small network: every member


async def _joined(stack: AsyncExitStack, root: Path, serving: set[int]) -> list[Peer]:
    """`PEERS` peers, each seeing all up; those in `serving` run the built-in roles."""
    peers = [
        await stack.enter_async_context(
            in_process_peer(i, KEY, data_dir=root / f"peer{i}", seed_only=i not in serving)
        )
        for i in range(PEERS)
    ]
    for i, peer in enumerate(peers[1:], 1):
        seeds = [p.driver.node.addr for p in peers[:i]]
        assert await peer.driver.join(seeds, timeout=5.0) is not None
    deadline = asyncio.get_running_loop().time() + 15
    while any(sum(m.up for m in p.driver.node.members()) < PEERS for p in peers):
        assert asyncio.get_running_loop().time() < deadline, "the peers did not all meet"
        await asyncio.sleep(0.05)
    return peers


@pytest_asyncio.fixture
async def peers(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    async with AsyncExitStack() as stack:
        yield await _joined(stack, tmp_path, serving={1})


def _up(peer: Peer) -> list[bytes]:
    return [m.node_id for m in peer.driver.node.members() if m.up]


@pytest.mark.asyncio
async def test_a_push_for_a_task_this_peer_is_not_a_holder_of_is_refused_and_stores_nothing(
    peers: list[Peer], tmp_path: Path
) -> None:
    b, member = peers[0], peers[1]
    addr_b = b.driver.node.addr
    b_id = b.driver.node.node_id
    data = os.urandom(300 * 1024)
    digest = hashlib.sha256(data).digest()
    foreign = next(
        tid
        for i in range(1000)
        if b_id not in designated_holders(tid := hashlib.sha256(b"%d" % i).digest(), _up(b), 2)
    )
    with pytest.raises(BlobTransferError, match=r"HTTP 403 \(blob_not_holder\)"):
        await member.transport.push_blob(addr_b, digest, data, foreign)
    with pytest.raises(BlobTransferError, match=r"HTTP 403 \(blob_not_holder\)"):
        await member.transport.push_blob(addr_b, digest, data)  # naming no task
    assert b.transport.rejected["blob_not_holder"] == 2
    assert b.blobs.store.held() == {} and b.blobs.store.held_for_others == 0
    assert list((tmp_path / "peer0" / "blobs").iterdir()) == []  # no temporary file either
    assert not b.blobs.references.needed(digest)

    # A task B holds (B is in its replica set): the same push is taken.
    for i in range(1000):
        key = f"held-{i}"
        task_id = member.driver.task_id_for("nobody-serves-this", b"x", idempotency_key=key)
        if b_id in top_by_score(task_id, _up(b), REPLICATION + 1):
            break
    assert member.driver.submit("nobody-serves-this", b"x", idempotency_key=key) == task_id
    nonce = os.urandom(16)  # the id an input blob is pushed under is the one submit gives
    expected = member.driver.task_id_for("r", b"y", priority=3, nonce=nonce, timeout=5)
    assert member.driver.submit("r", b"y", priority=3, nonce=nonce, timeout=5) == expected
    deadline = asyncio.get_running_loop().time() + 10
    while b.driver.node.task(task_id) is None:
        assert asyncio.get_running_loop().time() < deadline, "B never held the task"
        await asyncio.sleep(0.05)
    await member.transport.push_blob(addr_b, digest, data, task_id)
    assert b.blobs.store.get(digest) == data
    assert b.blobs.store.held_for_others == len(data)
    assert b.transport.rejected["blob_not_holder"] == 2
    assert b.blobs.references.needed(digest)  # kept until that task is forgotten here


@pytest.mark.asyncio
async def test_an_input_blob_goes_to_its_tasks_designated_holders_and_runs(
    peers: list[Peer], tmp_path: Path
) -> None:
    origin = peers[0]
    api = PeerApi(
        origin.driver,
        origin.transport,
        tmp_path,
        lambda: None,
        token=API_TOKEN,
        blobs=origin.blobs,
    )
    client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
    await client.start_server()
    try:
        text = base64.b64encode(os.urandom(300_000)).decode()
        r = await client.post("/v1/tasks", json={"role": "echo", "input": text, "wait": True})
        assert r.status == 200, await r.text()
        task = await r.json()
    finally:
        await client.close()
    assert task["state"] == "done", task
    task_id = bytes.fromhex(task["id"])
    digest = hashlib.sha256(text.encode()).digest()
    holders = set(designated_holders(task_id, _up(origin), REPLICATION))
    state = origin.driver.node.task(task_id)
    assert state is not None and state.accepted is not None
    owner = state.accepted.owner
    holding = {p.driver.node.node_id for p in peers[1:] if p.blobs.store.has(digest)}
    # Pushed to holders only; the executor, if not one, fetched it to run the task.
    assert len(holding & holders) >= REPLICATION and holding <= holders | {owner}
    assert origin.blobs.counters["pushed"] == REPLICATION
    assert sum(p.transport.rejected["blob_not_holder"] for p in peers) == 0
