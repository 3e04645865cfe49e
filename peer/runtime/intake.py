"""Reading what a remote sends: bounded, timed, refused early, counted, logged sparingly.

Invariants:
- A body is refused from its first `PREFIX_BYTES` when they are not the network's (magic,
  version, key id): a stranger's body costs those bytes, never its announced length.
- Every read has a deadline: `read_timeout` seconds for each piece (a prefix, a stream's head,
  one chunk). A body that stalls is cut off and counted as "read_timeout".
- Bodies held in memory at once, all requests together, are at most `max_buffered` bytes; a
  request that would exceed it is refused ("busy", 503).
- Every refusal is counted once, by reason, in `rejected` (the transport's counters; a frame the
  opener refused is counted by the opener), and logged at most once per source IP per
  `LOG_INTERVAL`.
- A refusal closes the connection: the rest of the body is never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Final

import aiohttp
from aiohttp import web

from peer.runtime.sealing import PREFIX_BYTES, STREAM_HEAD_BYTES, Opener, SealError, StreamOpening

log = logging.getLogger(__name__)

READ_TIMEOUT: Final = 10.0
"""Seconds a request body (or an answer) may stall between two pieces, and an envelope's body
may take in all, before it is cut off. A 4 MiB envelope at 1 MB/s takes 4 s."""
MAX_BUFFERED: Final = 256 * 1024 * 1024
"""Bytes of request bodies held in memory at once, all requests together: four blobs of the
largest size, or 64 envelopes of the largest size."""
LOG_INTERVAL: Final = 60.0
"""Seconds between two log lines about refused requests from one source IP."""
_MAX_LOG_SOURCES = 4096

# 400 for bodies that are not frames at all; 403 for frames that failed authentication or
# freshness (wrong key, tampered, replayed, skewed clock).
_STATUS_BY_REASON: Final = {
    "too_large": 413,
    "too_short": 400,
    "bad_magic": 400,
    "bad_version": 400,
    "length_required": 411,
    "bad_length": 400,
    "truncated": 400,
    "read_timeout": 408,
    "busy": 503,
    "blob_over_quota": 507,
    "bad_blob_request": 400,
    "bad_channel_hello": 400,
    "bad_channel_message": 400,
}


class Busy(Exception):
    """Reading a body now would exceed `Intake.max_buffered`."""


BODY_ERRORS: Final = (Busy, TimeoutError, asyncio.IncompleteReadError, web.RequestPayloadError)
"""What reading a body can raise besides `SealError`; `Intake.refuse_body` answers each."""


class Intake:
    """Bounded reads of request bodies, and the refusals (see the module invariants).

    Args:
        rejected: where refusals are counted, by reason.
        read_timeout: seconds each piece of a body may take.
        max_buffered: bytes of bodies held in memory at once.
    """

    def __init__(
        self,
        rejected: Counter[str],
        *,
        read_timeout: float = READ_TIMEOUT,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self.rejected = rejected
        self.read_timeout = read_timeout
        self.max_buffered = max_buffered
        self.buffered = 0
        """Bytes of bodies counted against `max_buffered` now."""
        self._logged_at: dict[str, float] = {}

    # Reading

    async def read_exactly(self, content: aiohttp.StreamReader, size: int) -> bytes:
        """Read `size` bytes within `read_timeout`.

        Raises:
            TimeoutError: they did not arrive in time.
            asyncio.IncompleteReadError: the body ended first.
        """
        async with asyncio.timeout(self.read_timeout):
            return await content.readexactly(size)

    async def read_head(
        self, content: aiohttp.StreamReader, opener: Opener, route: bytes, max_size: int, now: float
    ) -> StreamOpening:
        """Read and admit a stream's head: the prefix alone first, so a stranger is refused
        after `PREFIX_BYTES`.

        Raises:
            SealError: the opener refused it (and counted it).
            TimeoutError, asyncio.IncompleteReadError: as for `read_exactly`.
        """
        prefix = await self.read_exactly(content, PREFIX_BYTES)
        opener.check_prefix(prefix)
        head = prefix + await self.read_exactly(content, STREAM_HEAD_BYTES - PREFIX_BYTES)
        return opener.open_stream(head, now, route, max_size)

    async def read_stream(self, content: aiohttp.StreamReader, opening: StreamOpening) -> bytes:
        """Read and open the chunks of an admitted stream, one at a time.

        Raises:
            SealError: a chunk did not open (counted).
            TimeoutError, asyncio.IncompleteReadError: as for `read_exactly`.
        """
        plain = bytearray()
        while sealed_bytes := opening.next_chunk_bytes:
            plain += opening.open_chunk(await self.read_exactly(content, sealed_bytes))
        return bytes(plain)

    @contextlib.contextmanager
    def buffering(self, size: int) -> Iterator[None]:
        """Count `size` bytes against `max_buffered` while a body is read and handled.

        Raises:
            Busy: they would not fit.
        """
        if self.buffered + size > self.max_buffered:
            raise Busy
        self.buffered += size
        try:
            yield
        finally:
            self.buffered -= size

    # Refusing

    def refuse(self, source: str, reason: str, detail: str) -> web.Response:
        """Count and log a refusal; the answer to send."""
        self.rejected[reason] += 1
        self.log_refusal(source, f"{reason}: {detail}")
        return problem(_STATUS_BY_REASON.get(reason, 403), reason, close=True)

    def refused_frame(self, source: str, exc: SealError, what: str = "") -> web.Response:
        """The answer to a frame or stream the opener refused (and counted already)."""
        self.log_refusal(source, f"{what}{exc}")
        return problem(_STATUS_BY_REASON.get(exc.reason, 403), exc.reason, close=True)

    def refuse_body(self, source: str, exc: Exception) -> web.Response:
        """The answer to a body one of `BODY_ERRORS` cut short."""
        if isinstance(exc, Busy):
            return self.refuse(source, "busy", "too many bodies being read")
        if isinstance(exc, TimeoutError):
            return self.refuse(source, "read_timeout", "the body stalled")
        return self.refuse(source, "truncated", "the body ended early")

    def log_refusal(self, source: str, why: str) -> None:
        """Log a refusal unless one from the same IP was logged in the last `LOG_INTERVAL`."""
        ip = source.rpartition(":")[0] or source
        now = time.monotonic()
        last = self._logged_at.get(ip)
        if last is not None and now - last < LOG_INTERVAL:
            return
        if len(self._logged_at) >= _MAX_LOG_SOURCES:
            self._logged_at.clear()
        self._logged_at[ip] = now
        log.warning(
            "refused a frame from %s (%s); further refusals from this address are counted, "
            "not logged, for %.0f s",
            ip,
            why,
            LOG_INTERVAL,
        )


def problem(status: int, reason: str, *, close: bool = False) -> web.Response:
    """A short plain-text answer; `close` ends the connection after it (the body was not read
    to its end, and reading the rest is what a refusal avoids)."""
    response = web.Response(status=status, text=reason + "\n")
    if close:
        response.force_close()
    return response


def source_of(request: web.Request) -> str:
    """The request's source as "ip:port" (IPv6 in brackets)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), int(peer[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return request.remote or "unknown"
