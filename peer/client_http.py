"""HTTP/1.1 exchanges for the API client (`peer.client`): byte streams framed by h11.

Why not aiohttp's client: importing it costs more than 100 ms (it builds TLS contexts at
import), which is most of the budget of a `grapevine` client command (150 ms in all, the
interpreter's start included). h11 is the sans-IO HTTP/1.1 state machine (the house model for
protocol code), so this module only moves bytes between it and a socket; `import h11` costs a
few milliseconds. The API is a peer on the operator's machine, so a small pool of keep-alive
connections is all the connection management it needs.

The bytes move through a `Streams`: asyncio's (`peer.client_streams`) for programs with an
event loop, or blocking sockets (`peer.client_blocking`) for the `grapevine` command's one-shot
commands, which then need no event loop and skip importing asyncio (about a third of their
start-up). The exchange logic here is the same for both.

Invariants:
- Every failure to exchange with the server, a timeout included, is a
  `peer.client_errors.ClientError` whose reason is a short lowercase phrase ("connection
  refused", "timed out", "the peer closed the connection"); nothing else escapes but
  cancellation and what the caller's own code raises.
- A connection goes back to the idle pool only after a complete exchange that both sides
  left reusable (h11 states DONE/DONE); an answer not read to its end closes its connection.
- A request sent on a pooled connection that the server had already closed (no byte of an
  answer came back) is sent once more on a new connection: a server drops idle keep-alive
  connections at any time, and such a request was never processed.
- `connect_timeout` bounds connecting, each request's `timeout` the whole exchange, body
  included (None: connecting only, so a followed event stream stays open for as long as the
  server keeps it).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import h11

from peer.client_errors import ClientError

if TYPE_CHECKING:
    import ssl

READ_BYTES = 64 * 1024
MAX_IDLE = 32
"""Idle keep-alive connections kept per client. A program sending requests concurrently
through one client opens a connection for each one in flight; with 4 kept, a bench sending
32 at once through three clients connected again for a quarter of its 4,000 submissions,
and the peer accepted and closed a connection each time. The server closes idle ones after
its keep-alive timeout; a dropped one is replaced (`_ClosedBeforeAnswer`)."""


class _Failed(Exception):
    """The server could not be reached, or broke off, or did not speak HTTP/1.1 (turned into
    a `ClientError` where a request ends).

    Attributes:
        reason: a short lowercase cause, e.g. "connection refused".
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Stream(Protocol):
    """One connection's bytes, both ways."""

    async def read(self, size: int) -> bytes:
        """At most `size` bytes as they come; b"" once the server closed its side."""

    async def write(self, data: bytes) -> None:
        """Send all of `data`."""

    def close(self) -> None:
        """Close the connection (at once; nothing is awaited)."""


class Streams(Protocol):
    """How connections are opened and exchanges bounded in time."""

    async def connect(self, host: str, port: int, tls: bool, timeout: float) -> Stream:
        """A new connection.

        Raises:
            TimeoutError: not connected within `timeout` seconds.
            OSError: the connection failed.
        """

    def deadline(self, seconds: float | None) -> contextlib.AbstractAsyncContextManager[object]:
        """A block whose reads and writes raise `TimeoutError` once `seconds` have passed
        (None: no bound)."""


@dataclass(slots=True)
class _Connection:
    stream: Stream
    state: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    received: int = 0
    """Bytes received since the current request was sent."""

    def close(self) -> None:
        self.stream.close()

    async def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self.state.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.read(READ_BYTES)
                self.received += len(data)
                self.state.receive_data(data)
                continue
            return event


@dataclass(slots=True)
class Response:
    """An answer's head, and its body as it arrives (`read`, `chunks`)."""

    status: int
    reason: str
    headers: dict[str, str]
    """Header names in lower case; a repeated header keeps its last value."""
    _connection: _Connection
    _done: bool = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body's bytes as they arrive, until its end."""
        while not self._done:
            event = await _answer_event(self._connection)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
            else:
                raise _Failed("the answer broke off")

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (at most `limit` bytes are kept; the rest is read and dropped)."""
        body = bytearray()
        async for chunk in self.chunks():
            if limit is None or len(body) < limit:
                body += chunk
        return bytes(body if limit is None else body[:limit])


class Connections:
    """Keep-alive HTTP/1.1 connections to one server.

    Args:
        api: the address as the user gave it, for the errors.
        host: the server's host name or IP address (without brackets).
        port: its port.
        host_header: the Host header to send ("host:port" as the user gave it).
        headers: sent with every request (the API token).
        streams: how to connect and bound exchanges in time (module docstring).
        tls: connect with TLS (an https:// address).
        connect_timeout: seconds to wait for a connection.
    """

    def __init__(
        self,
        api: str,
        host: str,
        port: int,
        host_header: str,
        headers: dict[str, str],
        streams: Streams,
        *,
        tls: bool = False,
        connect_timeout: float = 5.0,
    ) -> None:
        self.api = api
        self.host, self.port, self.tls = host, port, tls
        self.headers = [("Host", host_header), *headers.items()]
        self.connect_timeout = connect_timeout
        self.streams = streams
        self._idle: list[_Connection] = []

    async def close(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Response]:
        """Send a request and yield the answer's head; read its body from the `Response`
        inside the block.

        Args:
            method: "GET", "POST", ...
            target: the path and query, e.g. "/v1/tasks?limit=5".
            body: the request body; None for none.
            headers: more headers for this request.
            timeout: seconds for the whole exchange, the block included; None: no bound
                but `connect_timeout`.

        Raises:
            ClientError: as the module invariants say.
        """
        connection: _Connection | None = None
        reusable = False
        try:
            async with self.streams.deadline(timeout):
                response = await self._exchange(method, target, body, headers or {})
                connection = response._connection
                yield response
                reusable = response._done
        except _Failed as exc:
            raise ClientError(self.api, exc.reason) from None
        except TimeoutError:
            raise ClientError(self.api, "timed out") from None
        finally:
            if connection is not None:
                self._release(connection, reusable)

    async def _exchange(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> Response:
        fields = [*self.headers, *headers.items()]
        if body is not None:
            fields.append(("Content-Length", str(len(body))))
        request = h11.Request(method=method, target=target, headers=fields)
        while self._idle:
            connection = self._idle.pop()
            try:
                return await self._send(connection, request, body)
            except _ClosedBeforeAnswer:
                connection.close()  # dropped while idle: try the next one, then a new one
        connection = await self._connect()
        try:
            return await self._send(connection, request, body)
        except _ClosedBeforeAnswer:
            connection.close()
            raise _Failed("the peer closed the connection") from None

    async def _send(
        self, connection: _Connection, request: h11.Request, body: bytes | None
    ) -> Response:
        state = connection.state
        connection.received = 0
        try:
            data = state.send(request) or b""
            if body:
                data += state.send(h11.Data(data=body)) or b""
            data += state.send(h11.EndOfMessage()) or b""
            await connection.stream.write(data)
            event = await connection.next_event()
        except (ConnectionError, h11.RemoteProtocolError) as exc:
            if connection.received == 0:
                raise _ClosedBeforeAnswer from exc
            connection.close()
            raise _Failed(_reason(exc)) from None
        except BaseException:
            connection.close()
            raise
        if isinstance(event, h11.ConnectionClosed):
            raise _ClosedBeforeAnswer
        if not isinstance(event, h11.Response):
            connection.close()
            raise _Failed("the answer is not HTTP; is this a Grapevine API?")
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers
        }
        return Response(event.status_code, event.reason.decode("latin-1"), headers, connection)

    async def _connect(self) -> _Connection:
        try:
            stream = await self.streams.connect(
                self.host, self.port, self.tls, self.connect_timeout
            )
        except TimeoutError:
            raise _Failed("timed out") from None
        except OSError as exc:
            raise _Failed(_reason(exc)) from None
        return _Connection(stream)

    def _release(self, connection: _Connection, reusable: bool) -> None:
        state = connection.state
        if reusable and state.our_state is h11.DONE and state.their_state is h11.DONE:
            state.start_next_cycle()
            if len(self._idle) < MAX_IDLE:
                self._idle.append(connection)
                return
        connection.close()


class _ClosedBeforeAnswer(Exception):
    """The server closed the connection before any byte of an answer."""


async def _answer_event(
    connection: _Connection,
) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
    try:
        return await connection.next_event()
    except (ConnectionError, h11.RemoteProtocolError) as exc:
        connection.close()
        raise _Failed(_reason(exc)) from None


def _reason(exc: BaseException) -> str:
    """A short lowercase cause for a failed exchange."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, h11.RemoteProtocolError):
        if "closed" in str(exc):
            return "the peer closed the connection"
        return "the answer is not HTTP; is this a Grapevine API?"
    if isinstance(exc, ConnectionError):
        return "the peer closed the connection"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def tls_context() -> ssl.SSLContext:
    """The client side of TLS for https:// addresses, checking the server's certificate."""
    import ssl  # only for https:// addresses: it costs milliseconds the usual case saves

    return ssl.create_default_context()
