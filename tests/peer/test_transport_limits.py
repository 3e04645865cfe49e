"""Transport limits over real sockets on 127.0.0.1 (issue 11, findings 3, 4 and 7): strangers
are refused after a frame's first bytes, slow senders are cut off, connections are capped per
source without starving another server, frames do not cross routes, blob answers and pushes
are bounded."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import ClientSession, web

from peer.runtime.blob_routes import BLOB_GET_PATH, BLOB_PUSH_PATH, BlobTransferError
from peer.runtime.blob_store import BlobStore
from peer.runtime.keyring import Keyring, key_id_of
from peer.runtime.sealing import (
    MAGIC,
    ROUTE_BLOB_ANSWER,
    VERSION,
    Sealer,
    stream_bytes,
)
from peer.runtime.serving import ServerLimits, serve
from peer.runtime.transport import ENVELOPE_PATH, Transport
from protocol.blobs import DIGEST_BYTES

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KIB, MIB = 1024, 1024 * 1024


def _drop(source: str, data: bytes) -> None:
    pass


@pytest_asyncio.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Transport, Transport]]:
    """Sender A and receiver B (holding blobs under a 300 KiB quota), same network key."""
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"A" * 8, _drop)
    b = Transport("127.0.0.1", 0, Keyring(KEY), b"B" * 8, _drop)
    a.blob_store = BlobStore(tmp_path / "a")
    b.blob_store = BlobStore(tmp_path / "b", quota=300 * KIB)
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


async def _raw_request(port: int, path: str, length: int, first: bytes) -> bytes:
    """Send a POST announcing `length` body bytes but only `first`; return the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_headers(path, length) + first)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.readline()
    finally:
        writer.close()


def _headers(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _peak_rss() -> int:
    """Peak resident bytes since the last `_reset_peak` (the current ones if it cannot)."""
    field = "VmHWM:" if _reset_peak() else "VmRSS:"
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise AssertionError("no " + field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


async def test_a_keyless_60_mib_blob_upload_is_refused_after_its_first_bytes(
    pair: tuple[Transport, Transport],
) -> None:
    _, b = pair
    length = stream_bytes(DIGEST_BYTES + 60 * MIB)
    junk = os.urandom(MIB)
    stranger_prefix = MAGIC + bytes((VERSION,)) + key_id_of(OTHER_KEY)
    # One who saw a frame knows the key id; its forged head fails at the 67th byte.
    forged_head = MAGIC + bytes((VERSION,)) + key_id_of(KEY) + bytes(60)
    _reset_peak()
    before = _peak_rss()
    for _ in range(3):
        status = await _raw_request(b.port, BLOB_PUSH_PATH, length, stranger_prefix + junk)
        assert status.startswith(b"HTTP/1.1 403")
    status = await _raw_request(b.port, BLOB_PUSH_PATH, length, forged_head + junk)
    assert status.startswith(b"HTTP/1.1 403")
    assert _peak_rss() - before < 8 * MIB
    assert b.rejected == {"unknown_key": 3, "decrypt_failed": 1}
    assert b.blob_store is not None and b.blob_store.held_for_others == 0


async def test_half_sent_requests_are_capped_and_cut_off_and_another_server_still_answers(
    tmp_path: Path,
) -> None:
    limits = ServerLimits(max_connections=512, max_per_source=128, idle_timeout=2.0, linger=0.5)
    transport = Transport(
        "127.0.0.1", 0, Keyring(KEY), b"T" * 8, _drop, read_timeout=1.0, limits=limits
    )
    await transport.start()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    api = web.Application()
    api.router.add_get("/v1/health", health)
    api_runner, api_port = await serve(api, "127.0.0.1", 0)  # served as the local API is

    # Descriptors for these 300 sockets, the 128 the transport may hold, and some slack:
    # a transport holding all 300 would exhaust them and the API would stop accepting.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, in_use + 300 + 128 + 120), hard))
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(300):
            _, writer = await asyncio.open_connection("127.0.0.1", transport.port)
            writer.write(_headers(ENVELOPE_PATH, 1000) + b"GV")  # headers, then 2 of 1000 bytes
            writers.append(writer)
        await asyncio.sleep(0.2)
        assert transport.connections == 128
        assert transport.rejected["too_many_connections_from_source"] == 172
        async with (
            ClientSession() as http,
            http.get(f"http://127.0.0.1:{api_port}/v1/health") as response,
        ):
            assert response.status == 200
        # The slow senders are cut off after the read timeout.
        async with asyncio.timeout(5):
            while transport.connections:
                await asyncio.sleep(0.1)
        assert transport.rejected["read_timeout"] == 128
    finally:
        for writer in writers:
            writer.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await api_runner.cleanup()
        await transport.stop()


async def test_a_connection_sending_nothing_is_closed_after_the_idle_timeout() -> None:
    limits = ServerLimits(idle_timeout=0.5)
    transport = Transport("127.0.0.1", 0, Keyring(KEY), b"T" * 8, _drop, limits=limits)
    await transport.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", transport.port)
        writer.write(b"POST /gv/v1/envelope HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a header
        async with asyncio.timeout(3):
            assert await reader.read() == b""  # closed by the server
        assert transport.connections == 0
        writer.close()
    finally:
        await transport.stop()


async def test_an_envelope_frame_replayed_to_the_blob_routes_is_refused_and_harmless(
    pair: tuple[Transport, Transport],
) -> None:
    a, b = pair
    # A frame as A sends it (A's boot id, a sequence number far ahead), captured on the wire.
    captured_sealer = Sealer(Keyring(KEY), b"A" * 8)
    captured_sealer.seq = 100_000
    frame = captured_sealer.seal(os.urandom(100), _now())
    async with ClientSession() as http:
        url = f"http://127.0.0.1:{b.port}"
        async with http.post(url + ENVELOPE_PATH, data=frame) as response:
            assert response.status == 204
        for path in (BLOB_PUSH_PATH, BLOB_GET_PATH):
            async with http.post(url + path, data=frame) as response:
                assert response.status == 403
    assert b.rejected == {"decrypt_failed": 2}
    data = os.urandom(100 * KIB)
    digest = hashlib.sha256(data).digest()
    await a.push_blob(f"127.0.0.1:{b.port}", digest, data)  # A's blob window is untouched
    assert b.blobs_in == 1 and b.rejected == {"decrypt_failed": 2}


async def test_a_blob_answer_longer_than_the_referenced_size_is_refused(
    pair: tuple[Transport, Transport],
) -> None:
    a, b = pair
    data = os.urandom(100 * KIB)
    digest = hashlib.sha256(data).digest()
    addr_b = f"127.0.0.1:{b.port}"
    await a.push_blob(addr_b, digest, data)
    with pytest.raises(BlobTransferError, match="exceeds the blob's size"):
        await a.fetch_blob(addr_b, digest, len(data) - 1)
    assert a.rejected == {"too_large": 1}
    assert await a.fetch_blob(addr_b, digest, len(data)) == data


async def test_an_oversized_answer_without_a_length_is_refused_at_its_head(
    pair: tuple[Transport, Transport],
) -> None:
    a, _ = pair
    data = os.urandom(200 * KIB)
    digest = hashlib.sha256(data).digest()
    sealer = Sealer(Keyring(KEY), b"M" * 8)
    sent = 0

    async def chunked_answer(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        await request.read()
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        stream = sealer.seal_stream(digest + data, _now(), ROUTE_BLOB_ANSWER)
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(stream), 16 * KIB):
                await response.write(stream[start : start + 16 * KIB])
                sent += 16 * KIB
        return response

    app = web.Application()
    app.router.add_post(BLOB_GET_PATH, chunked_answer)
    runner, port = await serve(app, "127.0.0.1", 0)
    try:
        with pytest.raises(BlobTransferError, match="sealed answer refused: too_large"):
            await a.fetch_blob(f"127.0.0.1:{port}", digest, 10 * KIB)
    finally:
        await runner.cleanup()
    assert a.rejected == {"too_large": 1}


async def test_pushes_over_the_quota_are_refused_and_counted(
    pair: tuple[Transport, Transport],
) -> None:
    a, b = pair
    store = b.blob_store
    assert isinstance(store, BlobStore)
    addr_b = f"127.0.0.1:{b.port}"
    first, second = os.urandom(200 * KIB), os.urandom(200 * KIB)
    await a.push_blob(addr_b, hashlib.sha256(first).digest(), first)
    with pytest.raises(BlobTransferError, match="HTTP 507"):
        await a.push_blob(addr_b, hashlib.sha256(second).digest(), second)
    assert b.rejected == {"blob_over_quota": 1}
    assert store.held_for_others == len(first)
    assert not store.has(hashlib.sha256(second).digest())
    # What this peer holds as its own does not count against what it holds for others.
    store.put(second)
    assert store.held_for_others == len(first)


def _now() -> float:
    return time.time()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_a_request_that_is_not_http_is_answered_400_and_counted(garbage: bytes) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    refused: Counter[str] = Counter()
    runner, port = await serve(app, "127.0.0.1", 0, refused=refused)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(garbage)
        await writer.drain()
        async with asyncio.timeout(5):
            status = await reader.readline()
        writer.close()
        assert status.split()[1] == b"400", status
        async with asyncio.timeout(5):
            while not refused["malformed_http"]:  # counted as the answer is logged
                await asyncio.sleep(0.01)
        assert refused == Counter(malformed_http=1)
        async with (
            ClientSession() as session,  # a well-formed request is not counted
            session.get(f"http://127.0.0.1:{port}/") as answer,
        ):
            assert answer.status == 200
        assert refused == Counter(malformed_http=1)
    finally:
        await runner.cleanup()
