"""Blobs (peer/runtime/blobs.py, the blob routes of peer/runtime/transport.py, the executor's
blob port, the API's large inputs and `GET /v1/blobs/{digest}`): the store on disk, sealed
transfers between real transports, and two in-process peers over loopback wired as
`peer/build.py` wires them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.build import Peer
from peer.cli import tasks as cli_tasks
from peer.client import GrapevineClient
from peer.http.app import PeerApi
from peer.runtime.blob_routes import BlobTransferError
from peer.runtime.blob_store import BlobStore
from peer.runtime.blobs import BlobService, BlobUnavailable, referenced_blobs
from peer.runtime.executor import Executor, Outcome, Work, builtin_roles
from peer.runtime.keyring import Keyring
from peer.runtime.transport import Transport
from protocol.blobs import BLOB_LIMIT, blob_ref, make_ref, parse_blob_ref
from protocol.tasks.messages import MAX_INLINE_PAYLOAD
from tests.peer.inprocess import API_HEADERS, API_TOKEN, in_process_peer

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
MIB = 1024 * 1024


def _text(size: int) -> str:
    """`size` ASCII characters, different every call."""
    return base64.b64encode(os.urandom(size))[:size].decode()


# --- the store -----------------------------------------------------------------------------------


def test_store_put_get_has_and_survives_a_reopen(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(MAX_INLINE_PAYLOAD + 10)
    digest = store.put(data)
    assert digest == hashlib.sha256(data).digest()
    assert store.has(digest) and store.get(digest) == data
    assert store.put(data) == digest  # idempotent
    assert (tmp_path / "blobs").stat().st_mode & 0o777 == 0o700
    assert store.path(digest).stat().st_mode & 0o777 == 0o600
    # A crash mid-write leaves a temporary file: the next open removes it.
    (tmp_path / "blobs" / f"{digest.hex()}.tmp-1-abcd").write_bytes(b"partial")
    reopened = BlobStore(tmp_path / "blobs")
    assert reopened.get(digest) == data
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [digest.hex()]
    assert reopened.get(b"\0" * 32) is None and not reopened.has(b"\0" * 32)
    assert reopened.get(b"short") is None and not reopened.has(b"short")


def test_store_verifies_on_read_and_on_receive(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"a" * (MAX_INLINE_PAYLOAD + 1)
    digest = store.put(data)
    store.path(digest).write_bytes(b"b" * len(data))  # corrupted on disk
    assert store.get(digest) is None
    assert store.corrupt == 1 and not store.has(digest)
    assert not store.receive(digest, b"c" * len(data))
    assert not store.has(digest)
    assert store.receive(digest, data) and store.get(digest) == data


def _push(store: BlobStore, data: bytes, digest: bytes | None = None) -> bool:
    """Receive `data` as a push of `digest` (its own by default), in 64 KiB pieces."""
    assert store.admit_push(b"t" * 32, digest or hashlib.sha256(data).digest(), len(data)) is None
    try:
        writer = store.open_push(digest or hashlib.sha256(data).digest())
        for at in range(0, len(data), 64 * 1024):
            writer.write(data[at : at + 64 * 1024])
        return writer.commit()
    finally:
        store.release_push(len(data))


def test_pushed_blobs_are_streamed_to_disk_and_counted_against_the_quota(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path, quota=MIB)
    kept, other, own = (os.urandom(100 * 1024) for _ in range(3))
    kept_digest, other_digest = hashlib.sha256(kept).digest(), hashlib.sha256(other).digest()
    assert _push(store, kept) and _push(store, other)
    assert store.get(kept_digest) == kept and store.get(other_digest) == other
    assert store.path(kept_digest).stat().st_mode & 0o777 == 0o600
    # Bytes that are not the name: nothing stored, no temporary file left behind.
    assert not _push(store, own, digest=b"\3" * 32)
    assert not store.has(b"\3" * 32)
    # A push that fails on the way (cut short, disk full) is aborted: nothing is left either.
    writer = store.open_push(hashlib.sha256(own).digest())
    writer.write(own[:1000])
    writer.abort()
    own_digest = store.put(own)
    assert store.held_for_others == len(kept) + len(other)
    # The quota counts what is held for others and what pushes being read set aside.
    assert store.admit_push(b"t" * 32, b"\4" * 32, MIB - 200 * 1024) is None
    assert store.admit_push(b"t" * 32, b"\4" * 32, 1) == "blob_over_quota"
    store.release_push(MIB - 200 * 1024)

    reopened = BlobStore(tmp_path, quota=MIB)  # the markers carry the accounting over
    assert reopened.held_for_others == len(kept) + len(other)
    assert set(reopened.held()) == {kept_digest, other_digest, own_digest}
    assert reopened.delete(other_digest) == len(other) and not reopened.has(other_digest)
    assert reopened.held_for_others == len(kept)
    assert reopened.delete(other_digest) == 0
    # Stored as this peer's own, a pushed blob is no longer held for others.
    reopened.put(kept)
    assert reopened.held_for_others == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [kept_digest.hex(), own_digest.hex()]
    )
    # Storing a blob held already refreshes its time: a new use's grace counts from then.
    os.utime(reopened.path(kept_digest), (1000.0, 1000.0))
    assert reopened.stored_at(kept_digest) == 1000.0
    assert _push(reopened, kept)
    refreshed = reopened.stored_at(kept_digest)
    assert refreshed is not None and refreshed > time.time() - 60
    assert reopened.held_for_others == 0  # still this peer's own
    # A marker whose blob never made it into place (a crash) is dropped at the next open.
    (tmp_path / f"{'ab' * 32}.pushed").touch()
    assert BlobStore(tmp_path).held_for_others == 0
    assert not (tmp_path / f"{'ab' * 32}.pushed").exists()


@pytest.mark.asyncio
async def test_the_service_sweeps_the_blobs_no_held_task_references(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    inputs = [os.urandom(MAX_INLINE_PAYLOAD + 1 + i) for i in range(4)]
    digests = [hashlib.sha256(data).digest() for data in inputs]
    for data in inputs[:3]:
        assert _push(store, data)
    store.put(inputs[3])  # this peer's own, say an input whose submission failed
    input_ref, output_ref = blob_ref(inputs[0]), blob_ref(inputs[1])
    held = SimpleNamespace(
        task_id=b"h" * 32,
        record=SimpleNamespace(input=input_ref, origin=b"o"),
        results={1: SimpleNamespace(output=output_ref, owner=b"w")},
        accepted=None,
    )
    driver = SimpleNamespace(node=SimpleNamespace(held_tasks=lambda: iter([held])))
    assert referenced_blobs(driver) == {  # type: ignore[arg-type]
        digests[0]: len(inputs[0]),
        digests[1]: len(inputs[1]),
    }
    clock = [time.time()]
    service = BlobService(
        store,
        transport=None,  # type: ignore[arg-type]
        driver=driver,  # type: ignore[arg-type]
        grace=30.0,
        wall=lambda: clock[0],
    )
    assert await service.sweep() == []
    clock[0] += 31.0
    assert sorted(await service.sweep()) == sorted([digests[2], digests[3]])
    assert service.counters["swept"] == 2
    assert store.held_for_others == len(inputs[0]) + len(inputs[1])
    assert set(store.held()) == {digests[0], digests[1]}


# --- sealed transfers ----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def transports(tmp_path: Path) -> AsyncIterator[tuple[Transport, Transport, Transport]]:
    made = [
        Transport("127.0.0.1", 0, Keyring(key), bytes([i]) * 8, lambda s, d: None)
        for i, key in enumerate((KEY, KEY, OTHER_KEY))
    ]
    for i, transport in enumerate(made):
        transport.blob_store = BlobStore(tmp_path / str(i))
        await transport.start()
    yield made[0], made[1], made[2]
    for transport in made:
        await transport.stop()


@pytest.mark.asyncio
async def test_push_and_fetch_are_sealed_and_checked(
    transports: tuple[Transport, Transport, Transport],
) -> None:
    a, b, outsider = transports
    addr_b, addr_a = f"127.0.0.1:{b.port}", f"127.0.0.1:{a.port}"
    data = os.urandom(2 * MIB)
    digest = hashlib.sha256(data).digest()
    await a.push_blob(addr_b, digest, data)
    assert b.blob_store is not None and b.blob_store.get(digest) == data
    assert await a.fetch_blob(addr_b, digest, len(data)) == data
    assert await a.fetch_blob(addr_b, b"\1" * 32, len(data)) is None  # not held there
    assert (a.blobs_out, a.blobs_in, b.blobs_in, b.blobs_out) == (1, 1, 1, 1)

    # A blob whose bytes do not hash to its name is dropped and counted.
    with pytest.raises(BlobTransferError, match="HTTP 422"):
        await a.push_blob(addr_b, b"\2" * 32, data)
    assert b.rejected["blob_digest_mismatch"] == 1
    assert not b.blob_store.has(b"\2" * 32)

    # Without the network key nothing gets in or out.
    with pytest.raises(BlobTransferError, match="HTTP 403"):
        await outsider.push_blob(addr_a, digest, data)
    with pytest.raises(BlobTransferError, match="HTTP 403"):
        await outsider.fetch_blob(addr_b, digest, len(data))
    assert a.rejected["unknown_key"] == 1 and b.rejected["unknown_key"] == 1

    # A peer holding no blob store answers 503; an unreachable one is a clear failure.
    a.blob_store = None
    with pytest.raises(BlobTransferError, match="HTTP 503"):
        await b.fetch_blob(addr_a, digest, len(data))
    await a.stop()
    with pytest.raises(BlobTransferError, match="the transport is stopped"):
        await a.fetch_blob(addr_b, digest, len(data))
    with pytest.raises(BlobTransferError):  # refused, or a pooled connection found closed
        await b.fetch_blob(addr_a, digest, len(data))


@pytest.mark.asyncio
async def test_a_rotated_key_keeps_blobs_flowing(
    transports: tuple[Transport, Transport, Transport],
) -> None:
    a, b, _ = transports
    rotated = a.keyring.rotate(OTHER_KEY)
    b.set_keyring(Keyring(KEY, (OTHER_KEY,), a.keyring.network_id))
    a.set_keyring(rotated)
    data = os.urandom(MAX_INLINE_PAYLOAD + 1)
    digest = hashlib.sha256(data).digest()
    await a.push_blob(f"127.0.0.1:{b.port}", digest, data)
    assert await b.fetch_blob(f"127.0.0.1:{a.port}", digest, len(data)) is None
    assert await a.fetch_blob(f"127.0.0.1:{b.port}", digest, len(data)) == data


# --- the executor's blob port --------------------------------------------------------------------


class FakePort:
    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}

    async def resolve_input(self, work: Work) -> bytes:
        ref = parse_blob_ref(work.input)
        assert ref is not None
        if ref[0] not in self.blobs:
            raise BlobUnavailable(f"input blob {ref[0].hex()} unavailable: nowhere")
        return self.blobs[ref[0]]

    async def store_output(self, work: Work, output: bytes) -> bytes:
        ref = blob_ref(output)
        self.blobs[hashlib.sha256(output).digest()] = output
        return ref


async def _run(executor: Executor, work: Work) -> tuple[str, bytes]:
    done: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
    executor.on_done = lambda t, e, outcome, output, u: done.set_result((outcome, output))
    executor.start(work)
    return await asyncio.wait_for(done, 5)


@pytest.mark.asyncio
async def test_executor_resolves_inputs_and_stores_large_outputs() -> None:
    port = FakePort()
    seen: list[bytes] = []

    async def record(work: Work) -> bytes:
        seen.append(work.input)
        return work.input

    async def huge(work: Work) -> Outcome:
        return Outcome(b"h" * (BLOB_LIMIT + 1), usage=(1, 2, 3))

    executor = Executor({**builtin_roles(), "record": record, "huge": huge}, 2, blobs=port)
    data = os.urandom(MAX_INLINE_PAYLOAD + 5)
    ref = blob_ref(data)
    port.blobs[hashlib.sha256(data).digest()] = data
    assert await _run(executor, Work(b"t1", 1, "record", ref)) == ("ok", ref)
    assert seen == [data]  # the handler saw the bytes; the result carries the reference
    missing = make_ref(b"\7" * 32, MAX_INLINE_PAYLOAD + 1)
    outcome, output = await _run(executor, Work(b"t2", 1, "echo", missing))
    assert outcome == "failed"
    assert output == f"input blob {'07' * 32} unavailable: nowhere".encode()
    malformed = missing.replace(b"v1", b"v9")
    assert await _run(executor, Work(b"t3", 1, "echo", malformed)) == ("ok", malformed)
    outcome, output = await _run(executor, Work(b"t4", 1, "huge", b""))
    assert outcome == "failed" and output.startswith(b"output of 67108865 bytes exceeds")

    plain = Executor(builtin_roles(), 1)  # without a port: references pass, large fails
    assert await _run(plain, Work(b"t5", 1, "echo", ref)) == ("ok", ref)
    outcome, output = await _run(plain, Work(b"t6", 1, "echo", b"x" * (MAX_INLINE_PAYLOAD + 1)))
    assert outcome == "failed" and b"exceeds the limit of 65536" in output
    await executor.close()
    await plain.close()


# --- two peers over loopback -----------------------------------------------------------------


@asynccontextmanager
async def _blob_peer(index: int, root: Path, roles: bool = True) -> AsyncIterator[Peer]:
    """A peer keeping its blobs under `root/peer<index>`, running the built-in roles or none."""
    async with in_process_peer(
        index, KEY, data_dir=root / f"peer{index}", seed_only=not roles
    ) as peer:
        peer.blobs.fetch_backoff = 0.01
        yield peer


class Env:
    def __init__(self, client: TestClient[Any, Any], api: PeerApi, peers: list[Peer]) -> None:
        self.client = client
        self.api = api
        self.peers = peers

    async def until_final(self, task_id: str, limit: float = 20.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + limit
        while True:
            task: dict[str, Any] = await (await self.client.get(f"/v1/tasks/{task_id}")).json()
            if task["state"] in ("done", "failed", "cancelled"):
                return task
            assert asyncio.get_running_loop().time() < deadline, task
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """Peer A (API, serves no role) and peer B (runs echo), joined."""
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(_blob_peer(1, tmp_path, roles=False))
        b = await stack.enter_async_context(_blob_peer(2, tmp_path))
        assert await b.driver.join([a.driver.node.addr], timeout=5.0) is not None
        deadline = asyncio.get_running_loop().time() + 10
        while len(a.driver.node.capable("echo")) < 1:
            assert asyncio.get_running_loop().time() < deadline, "B's roles did not reach A"
            await asyncio.sleep(0.05)
        api = PeerApi(
            a.driver,
            a.transport,
            tmp_path,
            lambda: None,
            token=API_TOKEN,
            keepalive=0.2,
            blobs=a.blobs,
        )
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        stack.push_async_callback(client.close)
        yield Env(client, api, [a, b])


@pytest.mark.asyncio
async def test_a_large_input_runs_on_another_peer_and_its_output_comes_back(
    env: Env, tmp_path: Path
) -> None:
    a, b = env.peers
    text = _text(MIB)
    data = text.encode()
    r = await env.client.post("/v1/tasks", json={"role": "echo", "input": text})
    assert r.status == 202, await r.text()
    task_id = (await r.json())["id"]
    digest = hashlib.sha256(data).digest()
    assert a.blobs.store.get(digest) == data and b.blobs.store.get(digest) == data
    task = await env.until_final(task_id)
    ref = blob_ref(data).decode()
    assert task["state"] == "done", task
    assert task["input"] == ref and task["result"]["output"] == ref  # references, as stored
    assert task["owner"] == task["result"]["owner"] != task["origin"]  # ran on B
    r = await env.client.get(f"/v1/blobs/{digest.hex()}")
    assert r.status == 200 and r.content_type == "application/octet-stream"
    assert await r.read() == data

    # A copy lost here is fetched from its holder and kept.
    a.blobs.store.path(digest).unlink()
    r = await env.client.get(f"/v1/blobs/{digest.hex().upper()}")
    assert r.status == 200 and await r.read() == data
    assert a.blobs.counters["fetched"] == 1 and a.blobs.store.has(digest)

    # The blob survives a restart of the store.
    assert BlobStore(tmp_path / "peer1" / "blobs").get(digest) == data

    r = await env.client.get(f"/v1/blobs/{'ab' * 32}")
    assert r.status == 404
    assert "not held here; asked 1 peer(s)" in (await r.json(content_type=None))["detail"]
    r = await env.client.get("/v1/blobs/xyz")
    assert r.status == 400 and "64 hex digits" in (await r.json(content_type=None))["detail"]


@pytest.mark.asyncio
async def test_an_output_blob_is_replicated_and_a_lost_input_fails_clearly(env: Env) -> None:
    a, b = env.peers
    marker = "tail"
    # A small input making a large output: B holds it and pushes it to A, its only peer.
    b.executor.handlers["grow"] = _grow
    b.driver.serve(b.executor.roles, b.executor.max_running)
    deadline = asyncio.get_running_loop().time() + 10
    while len(a.driver.node.capable("grow")) < 1:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    r = await env.client.post("/v1/tasks", json={"role": "grow", "input": marker})
    assert r.status == 202, await r.text()
    task = await env.until_final((await r.json())["id"])
    ref = parse_blob_ref(task["result"]["output"].encode())
    assert ref is not None and ref[1] == 3 * MIB
    assert a.blobs.store.get(ref[0]) == b"g" * (3 * MIB - 4) + b"tail"
    assert b.blobs.counters["pushed"] == 1

    # A well-formed reference nobody holds: the execution fails, naming the blob.
    missing = make_ref(b"\5" * 32, 2 * MIB).decode()
    r = await env.client.post("/v1/tasks", json={"role": "echo", "input": missing})
    task = await env.until_final((await r.json())["id"])
    assert task["state"] == "failed", task
    output = task["result"]["output"]
    assert output.startswith(f"input blob {'05' * 32} unavailable: not held here; asked")
    # A malformed one is an ordinary input.
    odd = missing.replace(":v1:", ":V1:")
    r = await env.client.post("/v1/tasks", json={"role": "echo", "input": odd})
    task = await env.until_final((await r.json())["id"])
    assert task["state"] == "done" and task["result"]["output"] == odd


async def _grow(work: Work) -> bytes:
    return b"g" * (3 * MIB - len(work.input)) + work.input


@pytest.mark.asyncio
async def test_cli_result_prints_the_blob_bytes(env: Env, capsysbinary: Any) -> None:
    text = _text(MAX_INLINE_PAYLOAD + 100)
    r = await env.client.post("/v1/tasks", json={"role": "echo", "input": text, "wait": True})
    task = await r.json()
    assert task["state"] == "done", task
    await env.api.start("127.0.0.1", 0)
    try:
        args = argparse.Namespace(id=task["id"], json=False, prog="grapevine result")
        async with GrapevineClient(env.api.address, API_TOKEN) as client:
            assert await cli_tasks._result(client, args) == 0
            assert capsysbinary.readouterr().out == text.encode()
            args.json = True
            assert await cli_tasks._result(client, args) == 0
            assert blob_ref(text.encode()) in capsysbinary.readouterr().out
    finally:
        await env.api.stop()


@pytest.mark.asyncio
async def test_a_large_input_nobody_else_takes_is_refused_and_nothing_is_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncExitStack() as stack:
        alone = await stack.enter_async_context(_blob_peer(3, tmp_path))
        api = PeerApi(
            alone.driver,
            alone.transport,
            tmp_path,
            lambda: None,
            token=API_TOKEN,
            blobs=alone.blobs,
        )
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        stack.push_async_callback(client.close)
        r = await client.post("/v1/tasks", json={"role": "echo", "input": _text(200_000)})
        assert r.status == 503
        detail = (await r.json(content_type=None))["detail"]
        assert "held here but by 0 of the 1 other peer(s)" in detail
        assert "no other live peer" in detail and "nothing was submitted" in detail
        assert alone.driver.node.tasks.tasks == {}

        monkeypatch.setattr("peer.http.tasks.BLOB_LIMIT", 150_000)
        r = await client.post("/v1/tasks", json={"role": "echo", "input": _text(150_001)})
        assert r.status == 413
        assert "input is 150001 bytes" in (await r.json(content_type=None))["detail"]
        monkeypatch.setattr("peer.http.tasks.MAX_SUBMIT_BYTES", 100_000)
        r = await client.post("/v1/tasks", json={"role": "echo", "input": _text(120_000)})
        assert r.status == 413
        assert "the request body is" in (await r.json(content_type=None))["detail"]
        assert alone.driver.node.tasks.tasks == {}
