"""A pushed blob is streamed to disk as its chunks are authenticated (issue 11, findings 3 and
7): the receiver holds a few chunks in memory whatever the blob's size, and a push that fails
on the way leaves nothing behind. Real transports on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from peer.runtime.blob_routes import BLOB_PUSH_PATH
from peer.runtime.blob_store import BlobStore
from peer.runtime.keyring import Keyring
from peer.runtime.sealing import ROUTE_BLOB_PUSH, STREAM_CHUNK, Sealer
from peer.runtime.transport import Transport

KEY = bytes(range(32))
MIB = 1024 * 1024
TASK = b"t" * 32


@pytest_asyncio.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Transport]:
    transport = Transport("127.0.0.1", 0, Keyring(KEY), b"r" * 8, lambda s, d: None)
    transport.blob_store = BlobStore(tmp_path / "blobs")
    await transport.start()
    yield transport
    await transport.stop()


def _sealed_push(digest: bytes, data: bytes) -> bytes:
    """A push stream as a member sends it, sealed before any measuring starts."""
    return Sealer(Keyring(KEY), os.urandom(8)).seal_stream(
        digest + TASK + data, time.time(), ROUTE_BLOB_PUSH
    )


async def _post(port: int, body: bytes, cut_at: int | None = None) -> int:
    """Post `body` in chunk-sized pieces (as a socket delivers it), or only its first `cut_at`
    bytes before the connection ends; the answer's status (0 if none came)."""

    async def pieces() -> AsyncIterator[bytes]:
        view = memoryview(body)[:cut_at]
        for at in range(0, len(view), STREAM_CHUNK):
            yield bytes(view[at : at + STREAM_CHUNK])

    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(
                f"http://127.0.0.1:{port}{BLOB_PUSH_PATH}",
                data=pieces(),
                headers={"Content-Type": "application/octet-stream"},
            ) as response:
                return response.status
        except aiohttp.ClientError:
            return 0


@pytest.mark.asyncio
async def test_a_20_mib_push_is_received_in_bounded_memory(
    receiver: Transport, tmp_path: Path
) -> None:
    data = os.urandom(20 * MIB)
    digest = hashlib.sha256(data).digest()
    body = _sealed_push(digest, data)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        started = time.monotonic()
        status = await asyncio.wait_for(_post(receiver.port, body), 30)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 204
    assert peak < 2 * MIB, f"a 20 MiB push peaked at {peak / MIB:.2f} MiB"
    assert elapsed < 20
    store = receiver.blob_store
    assert isinstance(store, BlobStore)
    assert store.get(digest) == data and store.held_for_others == len(data)
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted(
        [digest.hex(), f"{digest.hex()}.pushed"]
    )


@pytest.mark.asyncio
async def test_a_push_cut_short_or_not_matching_its_digest_leaves_nothing(
    receiver: Transport, tmp_path: Path
) -> None:
    data = os.urandom(3 * MIB)
    digest = hashlib.sha256(data).digest()
    body = _sealed_push(digest, data)
    await _post(receiver.port, body, cut_at=len(body) // 2)
    deadline = asyncio.get_running_loop().time() + 15
    while not receiver.rejected["truncated"] and not receiver.rejected["read_timeout"]:
        assert asyncio.get_running_loop().time() < deadline, receiver.rejected
        await asyncio.sleep(0.05)
    assert await _post(receiver.port, _sealed_push(b"\1" * 32, data)) == 422
    assert receiver.rejected["blob_digest_mismatch"] == 1
    assert list((tmp_path / "blobs").iterdir()) == []  # no blob, marker or temporary file
    store = receiver.blob_store
    assert isinstance(store, BlobStore)
    assert store.held_for_others == 0
    assert store.admit_push(TASK, digest, store.quota) is None  # nothing left set aside
