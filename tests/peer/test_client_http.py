"""The API client's HTTP layer (peer/client_http.py) against a raw socket server that answers
as told: keep-alive reuse, a pooled connection the server dropped, silence, and not-HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from peer.client import GOSSIP_PATH, ClientError, GrapevineClient
from peer.runtime.transport import ENVELOPE_PATH


@dataclass
class RawServer:
    """Answers each request with `answer`, then closes the connection when `close_after`."""

    answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    close_after: bool = False
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.requests.append(head.split(b"\r\n", 1)[0])
                if self.answer:
                    writer.write(self.answer)
                    await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(server: RawServer) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()


def test_the_gossip_route_the_client_recognises_is_the_transports() -> None:
    assert GOSSIP_PATH == ENVELOPE_PATH


async def test_requests_reuse_one_kept_alive_connection() -> None:
    server = RawServer()
    async with serving(server) as api, GrapevineClient(api, token="t" * 32) as client:
        for _ in range(3):
            assert await client.health() == {}
    assert (server.connections, len(server.requests)) == (1, 3)
    assert server.requests[0] == b"GET /v1/health HTTP/1.1"


async def test_a_pooled_connection_the_server_dropped_is_replaced() -> None:
    server = RawServer(close_after=True)
    async with serving(server) as api, GrapevineClient(api, token="t" * 32) as client:
        assert await client.health() == {}
        await asyncio.sleep(0.05)  # the server has closed the idle connection by now
        assert await client.health() == {}
    assert (server.connections, len(server.requests)) == (2, 2)


async def test_a_silent_server_times_out_with_a_reason() -> None:
    server = RawServer(answer=b"")
    async with serving(server) as api, GrapevineClient(api, token="t" * 32) as client:
        with pytest.raises(ClientError) as caught:
            await client._request("GET", "/v1/health", timeout=0.3)
    assert caught.value.reason == "timed out"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "the answer is not HTTP; is this a Grapevine API?"),
        (b"", "the peer closed the connection"),
    ],
)
async def test_what_is_not_an_http_answer_is_a_client_error(answer: bytes, reason: str) -> None:
    server = RawServer(answer=answer, close_after=True)
    async with serving(server) as api, GrapevineClient(api, token="t" * 32) as client:
        with pytest.raises(ClientError) as caught:
            await client.health()
    assert caught.value.reason == reason
