"""The local API's own connection limits over real sockets (issue 11, finding 3): half-sent
requests from a process without the token cannot keep the operator out, even from 127.0.0.1;
the excess is closed and counted; unproven connections time out; a slow body is cut off."""

from __future__ import annotations

import asyncio
import resource
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from peer.api_token import read_token_file, token_path
from peer.build import Peer, build_peer
from peer.client import GrapevineClient
from peer.http.guard import API_LIMITS
from peer.runtime.keyring import Keyring
from peer.runtime.serving import ServerLimits, serve, trust_connection
from peer.settings import AgentSettings
from tests.peer.inprocess import MemoryStore

KEY = bytes(range(32))
FLOOD = 600
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def serving(data_dir: Path) -> AsyncIterator[Peer]:
    """A peer serving its API on 127.0.0.1 (a free port), its state in memory."""
    settings = AgentSettings(
        bind="127.0.0.1:0", api="127.0.0.1:0", data_dir=data_dir, profile="local"
    )
    async with build_peer(
        settings, on_leave=lambda: None, keyring=Keyring(KEY), store=MemoryStore()
    ) as peer:
        yield peer


def api_of(peer: Peer, data_dir: Path) -> tuple[str, int, str]:
    """(address, port, token) of `peer`'s API (its token generated in `data_dir`)."""
    assert peer.api is not None
    address = peer.api.address
    token = read_token_file(token_path(data_dir))
    return address, int(address.rsplit(":", 1)[1]), token


async def half_sent(port: int, i: int) -> Connection:
    """A connection sending half a request: half a head, or (no token) half a body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if i % 2:
        writer.write(f"GET /v1/self HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    else:
        writer.write(
            f"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"role":'.encode()
        )
    return reader, writer


async def closed_by_server(connections: list[Connection], wait: float) -> list[bytes]:
    """The first line the server sent on each connection it closed within `wait` seconds."""
    reads = [asyncio.ensure_future(reader.read()) for reader, _ in connections]
    done, pending = await asyncio.wait(reads, timeout=wait)
    for read in pending:
        read.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return [read.result().partition(b"\r\n")[0] for read in done]


def close_all(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()


@pytest.fixture
def descriptors() -> None:
    """Room for the flood's sockets on both ends (the test process holds both)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(soft, hard) < 2 * FLOOD + 200:
        pytest.skip(f"needs {2 * FLOOD + 200} descriptors, the limit is {hard}")


async def test_half_sent_requests_do_not_keep_the_operator_out(
    tmp_path: Path, descriptors: None
) -> None:
    async with serving(tmp_path / "data") as peer:
        address, port, token = api_of(peer, tmp_path / "data")
        assert peer.api is not None
        refused = peer.api.guard.refused
        async with GrapevineClient(address, token=token) as operator:
            kept = await operator.self_info()  # a pooled connection, trusted from now on
            flood = [await half_sent(port, i) for i in range(FLOOD)]
            try:
                await asyncio.sleep(0.3)
                # The operator is answered at once, on its pooled connection and on new ones.
                assert (await operator.self_info())["id"] == kept["id"]
                async with GrapevineClient(address, token=token) as again:
                    assert (await again.tasks(limit=1)) == []
                assert refused["unproven_evicted"] >= FLOOD - API_LIMITS.max_per_source
                assert refused["too_many_connections_from_source"] == 0
                closed = await closed_by_server(flood, wait=1.0)
                assert len(closed) >= FLOOD - API_LIMITS.max_per_source
                assert set(closed) <= {
                    b"HTTP/1.1 503 Service Unavailable",
                    b"HTTP/1.1 401 Unauthorized",
                }
            finally:
                close_all(flood)


async def test_a_slow_body_from_the_operator_is_cut_off_with_408(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        address, port, token = api_of(peer, tmp_path / "data")
        assert peer.api is not None
        peer.api.guard.body_timeout = 0.5
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"POST /v1/tasks HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}"
                "\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
            )
            async with asyncio.timeout(5):
                assert await reader.readline() == b"HTTP/1.1 408 Request Timeout\r\n"
            assert peer.api.guard.refused["body_timeout"] == 1
            async with GrapevineClient(address, token=token) as operator:
                assert await operator.tasks(limit=5) == []  # nothing was submitted
        finally:
            writer.close()


@asynccontextmanager
async def small_server(limits: ServerLimits) -> AsyncIterator[tuple[int, Counter[str]]]:
    """A server whose /trust route vouches for its connection, under `limits`; yields its port
    and its refusal counters."""

    async def vouch(request: web.Request) -> web.Response:
        trust_connection(request)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/trust", vouch)
    refused: Counter[str] = Counter()
    runner, port = await serve(app, "127.0.0.1", 0, limits=limits, refused=refused)
    try:
        yield port, refused
    finally:
        await runner.cleanup()


async def request_on(connection: Connection, port: int) -> bytes:
    reader, writer = connection
    writer.write(f"GET /trust HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    async with asyncio.timeout(3):
        status = await reader.readline()
        while await reader.readline() not in (b"\r\n", b""):
            pass
        await reader.readexactly(2)  # "ok"
    return status


async def test_unproven_connections_time_out_and_trusted_ones_are_never_evicted() -> None:
    limits = ServerLimits(max_connections=10, max_per_source=3, prove_within=0.5)
    async with small_server(limits) as (port, refused):
        trusted = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for connection in trusted:
            assert await request_on(connection, port) == b"HTTP/1.1 200 OK\r\n"
        silent = await asyncio.open_connection("127.0.0.1", port)
        # The source is at its cap with two trusted connections: only `silent` may go.
        newcomer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(3):
            assert await silent[0].readline() == b"HTTP/1.1 503 Service Unavailable\r\n"
        assert refused == {"unproven_evicted": 1}
        # With every slot trusted or young, the next one is refused; none trusted is closed.
        assert await request_on(newcomer, port) == b"HTTP/1.1 200 OK\r\n"
        refused_one = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(3):
            assert await refused_one[0].readline() == b"HTTP/1.1 503 Service Unavailable\r\n"
        assert refused["too_many_connections_from_source"] == 1
        for connection in trusted:
            assert await request_on(connection, port) == b"HTTP/1.1 200 OK\r\n"
        # An unproven connection is closed after `prove_within`, a trusted one is kept.
        for connection in (*trusted, newcomer):
            connection[1].close()
        await asyncio.sleep(0.1)
        idle = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(3):
            assert await idle[0].readline() == b"HTTP/1.1 503 Service Unavailable\r\n"
        assert refused["unproven_timeout"] == 1
        for connection in (silent, refused_one, idle):
            connection[1].close()
