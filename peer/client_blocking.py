"""Blocking sockets under the API client's HTTP exchanges (`peer.client_http.Streams`), and
`run_blocking`, which runs the client's coroutines with no event loop.

Why: a `grapevine` client command makes one or two requests and exits. Importing asyncio costs
about a third of such a command's start-up (scripts/bench_cli.py; issue 13 wants the whole
command under 150 ms), and an event loop buys it nothing. With these streams the client's
coroutines never suspend, so `run_blocking` completes them with a single step.

Invariants:
- Nothing here imports asyncio (tests/peer/test_cli_imports.py holds it for the commands).
- A coroutine of a `GrapevineClient(blocking=True)` never suspends: every read, write and
  connect blocks the thread instead. `run_blocking` refuses (RuntimeError) a coroutine that
  does suspend, so a command that needs an event loop fails loudly in tests, not silently.
- Deadlines nest: a block's reads and writes end at the nearest enclosing deadline, with
  `TimeoutError` (as `asyncio.timeout` raises it), so the exchange code is the same for both
  kinds of streams.
- Ctrl-C interrupts a blocked read or write: Python's default SIGINT handler raises
  `KeyboardInterrupt` in the main thread, which `grapevine` turns into exit 130.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from peer.client_http import Stream, tls_context

T = TypeVar("T")


def run_blocking(main: Coroutine[Any, Any, T]) -> T:
    """Run `main`, a coroutine that never suspends (module invariants), to its end; return its
    value or raise what it raised.

    Raises:
        RuntimeError: `main` suspended, i.e. it awaited something only an event loop completes;
            it is closed first.
    """
    try:
        main.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    main.close()
    raise RuntimeError("the coroutine suspended: it needs an event loop (asyncio.run)")


class BlockingStreams:
    """Connections as blocking sockets, bounded by the nearest enclosing `deadline`."""

    def __init__(self) -> None:
        self._deadline: float | None = None
        """`time.monotonic()` at which the innermost open deadline ends; None: no bound."""

    async def connect(self, host: str, port: int, tls: bool, timeout: float) -> Stream:
        left = self.seconds_left()
        sock = socket.create_connection(
            (host, port), timeout if left is None else min(timeout, left)
        )
        try:
            if tls:
                sock = tls_context().wrap_socket(sock, server_hostname=host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return _BlockingStream(sock, self)

    @contextlib.asynccontextmanager
    async def deadline(self, seconds: float | None) -> AsyncIterator[None]:
        outer = self._deadline
        if seconds is not None:
            ends = time.monotonic() + seconds
            self._deadline = ends if outer is None else min(outer, ends)
        try:
            yield
        finally:
            self._deadline = outer

    def seconds_left(self) -> float | None:
        """Seconds until the innermost deadline (None: none is open).

        Raises:
            TimeoutError: it has passed.
        """
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


class _BlockingStream:
    def __init__(self, sock: socket.socket, streams: BlockingStreams) -> None:
        self._sock, self._streams = sock, streams

    async def read(self, size: int) -> bytes:
        self._sock.settimeout(self._streams.seconds_left())
        return self._sock.recv(size)

    async def write(self, data: bytes) -> None:
        self._sock.settimeout(self._streams.seconds_left())
        self._sock.sendall(data)

    def close(self) -> None:
        self._sock.close()
