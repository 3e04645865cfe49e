"""asyncio's streams under the API client's HTTP exchanges (`peer.client_http.Streams`), for
programs that run an event loop: the default of `peer.client.GrapevineClient`.

Invariants:
- A deadline is `asyncio.timeout`: it cancels whatever the block awaits and raises
  `TimeoutError`, as the exchange code expects of every `Streams`.
"""

from __future__ import annotations

import asyncio
import contextlib

from peer.client_http import Stream, tls_context


class AsyncioStreams:
    """Connections as asyncio stream pairs."""

    async def connect(self, host: str, port: int, tls: bool, timeout: float) -> Stream:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls_context() if tls else None
            )
        return _AsyncioStream(reader, writer)

    def deadline(self, seconds: float | None) -> contextlib.AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)


class _AsyncioStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, size: int) -> bytes:
        return await self._reader.read(size)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()
