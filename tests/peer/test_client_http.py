"""The API client's HTTP layer (peer/client_http.py) against a raw socket server that answers
as told: keep-alive reuse, a pooled connection the server dropped, silence, and not-HTTP. Each
runs on both kinds of streams: asyncio's (an event loop) and blocking sockets with no loop
(`peer.client_blocking`, what the `grapevine` client commands use)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from peer.client import GOSSIP_PATH, ClientError, GrapevineClient
from peer.client_blocking import run_blocking
from peer.runtime.transport import ENVELOPE_PATH

T = TypeVar("T")
MODES = ("asyncio", "blocking")


@dataclass
class RawServer:
    """Answers each request with `answer`, then closes the connection when `close_after`.

    It runs in threads of its own, so a blocking client in the test's thread can reach it."""

    answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    close_after: bool = False
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    def handle(self, conn: socket.socket) -> None:
        self.connections += 1
        buffer = b""
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(65536):
                    buffer += data
                    while b"\r\n\r\n" in buffer:
                        head, buffer = buffer.split(b"\r\n\r\n", 1)
                        self.requests.append(head.split(b"\r\n", 1)[0])
                        if self.answer:
                            conn.sendall(self.answer)
                        if self.close_after:
                            return
            except OSError:
                pass


@contextmanager
def serving(server: RawServer) -> Iterator[str]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=server.handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def drive(mode: str, body: Callable[[bool], Coroutine[Any, Any, T]]) -> T:
    """Run `body(blocking)` as the mode says: under an event loop, or with none."""
    if mode == "blocking":
        return run_blocking(body(True))
    return asyncio.run(body(False))


def test_the_gossip_route_the_client_recognises_is_the_transports() -> None:
    assert GOSSIP_PATH == ENVELOPE_PATH


@pytest.mark.parametrize("mode", MODES)
def test_requests_reuse_one_kept_alive_connection(mode: str) -> None:
    server = RawServer()

    async def body(blocking: bool) -> None:
        async with GrapevineClient(api, token="t" * 32, blocking=blocking) as client:
            for _ in range(3):
                assert await client.health() == {}

    with serving(server) as api:
        drive(mode, body)
    assert (server.connections, len(server.requests)) == (1, 3)
    assert server.requests[0] == b"GET /v1/health HTTP/1.1"


def test_concurrent_requests_keep_their_connections_for_the_next_wave() -> None:
    # A program sending 16 requests at once through one client: each wave after the first
    # reuses the connections the last one opened, rather than connecting again for most of
    # its requests (a peer accepting and closing a connection per request).
    server = RawServer()
    waves, width = 4, 16

    async def body(blocking: bool) -> None:
        async with GrapevineClient(api, token="t" * 32, blocking=blocking) as client:
            for _ in range(waves):
                answers = await asyncio.gather(*(client.health() for _ in range(width)))
                assert answers == [{}] * width

    with serving(server) as api:
        drive("asyncio", body)
    assert len(server.requests) == waves * width
    assert server.connections == width


@pytest.mark.parametrize("mode", MODES)
def test_a_pooled_connection_the_server_dropped_is_replaced(mode: str) -> None:
    server = RawServer(close_after=True)

    async def body(blocking: bool) -> None:
        async with GrapevineClient(api, token="t" * 32, blocking=blocking) as client:
            assert await client.health() == {}
            time.sleep(0.05)  # the server has closed the idle connection by now
            assert await client.health() == {}

    with serving(server) as api:
        drive(mode, body)
    assert (server.connections, len(server.requests)) == (2, 2)


@pytest.mark.parametrize("mode", MODES)
def test_a_silent_server_times_out_with_a_reason(mode: str) -> None:
    server = RawServer(answer=b"")

    async def body(blocking: bool) -> float:
        async with GrapevineClient(api, token="t" * 32, blocking=blocking) as client:
            started = time.monotonic()
            with pytest.raises(ClientError) as caught:
                await client._request("GET", "/v1/health", timeout=0.3)
            assert caught.value.reason == "timed out"
            return time.monotonic() - started

    with serving(server) as api:
        waited = drive(mode, body)
    assert 0.25 < waited < 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "the answer is not HTTP; is this a Grapevine API?"),
        (b"", "the peer closed the connection"),
    ],
)
def test_what_is_not_an_http_answer_is_a_client_error(
    mode: str, answer: bytes, reason: str
) -> None:
    server = RawServer(answer=answer, close_after=True)

    async def body(blocking: bool) -> None:
        async with GrapevineClient(api, token="t" * 32, blocking=blocking) as client:
            with pytest.raises(ClientError) as caught:
                await client.health()
            assert caught.value.reason == reason

    with serving(server) as api:
        drive(mode, body)


@pytest.mark.parametrize("mode", MODES)
def test_nobody_listening_is_connection_refused(mode: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused

        async def body(blocking: bool) -> None:
            async with GrapevineClient(f"127.0.0.1:{port}", "t" * 32, blocking=blocking) as c:
                with pytest.raises(ClientError) as caught:
                    await c.health()
                assert caught.value.reason == "connection refused"

        drive(mode, body)


def test_a_deadline_inside_another_ends_at_the_nearer_one() -> None:
    from peer.client_blocking import BlockingStreams

    streams = BlockingStreams()

    async def body() -> tuple[float | None, float | None, float | None]:
        async with streams.deadline(10):
            async with streams.deadline(0.5):
                inner = streams.seconds_left()
            async with streams.deadline(60):
                nearer = streams.seconds_left()
        return inner, nearer, streams.seconds_left()

    inner, nearer, after = run_blocking(body())
    assert inner is not None and 0 < inner <= 0.5
    assert nearer is not None and 9 < nearer <= 10
    assert after is None


def test_run_blocking_returns_and_raises_what_the_coroutine_does() -> None:
    async def value() -> int:
        return 7

    async def failing() -> None:
        raise ValueError("bad")

    assert run_blocking(value()) == 7
    with pytest.raises(ValueError, match="bad"):
        run_blocking(failing())


def test_run_blocking_refuses_a_coroutine_that_needs_an_event_loop() -> None:
    closed = []

    class Suspends:
        def __await__(self) -> Iterator[None]:
            yield None

    async def waits() -> None:
        try:
            await Suspends()
        finally:
            closed.append(True)

    with pytest.raises(RuntimeError, match="needs an event loop"):
        run_blocking(waits())
    assert closed == [True]
