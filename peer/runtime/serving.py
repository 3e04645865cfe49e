"""Serving an aiohttp application on one TCP address: the one place the runner is set up.

The peer serves two applications (the sealed transport and the local API) with the same
lifecycle: set up a runner, bind one listener, read back the port the OS picked for port 0,
and clean up the runner if binding fails so no half-started server is left behind.

Invariants:
- A server given `ServerLimits` never holds more than `max_connections` connections, nor more
  than `max_per_source` from one IP address (unless `per_source_counts_vouched` is off: then
  only those not yet vouched for count): a connection beyond either
  (unless an unproven one makes room, below) is answered a canned 503 and closed at once,
  before aiohttp sees a byte of it, and counted in the `refused` counter given. A connection
  that has not completed a request within `idle_timeout` is closed (a stranger opening
  connections and sending half a header holds each one that long at most), and one whose
  request was answered before its body was read is closed within `linger` seconds.
- A server whose limits set `prove_within` (the local API) holds a connection unproven until a
  handler vouches for it (`trust_connection`, after the API token checked out): an unproven one
  is closed `prove_within` seconds after it opened, and when a new connection would exceed a
  cap the oldest unproven one (of the same source, else of any) is closed in its place with
  the same 503, counted as "unproven_evicted". So connections that never send a whole
  authenticated request cannot keep out a client that does, even from the same address.
- A request that does not parse as HTTP (a bad request line, header or chunk) is answered 400
  by aiohttp before any handler runs; it is counted "malformed_http" in the `refused` counter
  (through an access-log hook that logs nothing: aiohttp has no other).
- Every server counts against its own limits only: the transport's strangers cannot use up the
  local API's connections, or the reverse. Descriptors are the one resource they share, so
  the transport's `max_connections` stays far below the usual descriptor limit (1024).

aiohttp has no connection cap of its own, so the listener is created here (`asyncio`'s
`create_server`) with a protocol factory that counts connections and hands the admitted ones
to aiohttp's request handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import ERROR as _UNPARSED
from aiohttp.web_request import BaseRequest

SHUTDOWN_TIMEOUT = 1.0
"""Seconds in-flight requests get to finish when a server stops."""
CONNECTION_REFUSALS = (
    "too_many_connections",
    "too_many_connections_from_source",
    "unproven_evicted",
    "unproven_timeout",
    "malformed_http",
)
"""The reasons a server counts under itself: connections refused or closed over its
`ServerLimits` (the third and fourth only with `prove_within`), and requests that did not
parse as HTTP (aiohttp answers them 400 before any handler runs)."""

_BUSY_TEXT = b"too_many_connections\n"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_TEXT), _BUSY_TEXT)
)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Caps on the connections one server holds (see the module invariants)."""

    max_connections: int = 512
    """Connections open at once. Each holds a descriptor, so keep it well below the process's
    descriptor limit (``ulimit -n``, often 1024) minus what the store, the blobs, the local API
    and outgoing connections need. Too low, and a busy network's peers get 503s."""
    max_per_source: int = 128
    """Connections open at once from one IP address (see `per_source_counts_vouched`): a
    single stranger holds at most a quarter of `max_connections`."""
    per_source_counts_vouched: bool = True
    """Whether connections a handler vouched for (`trust_connection`) count against
    `max_per_source`. The local API: yes, a client holding the token is still one client.
    The transport: no, it vouches once a frame on the connection authenticated, and peers on
    one machine share 127.0.0.1 (100 of them keep some 300 connections to each other)."""
    idle_timeout: float = 30.0
    """Seconds a connection may wait for its next complete request (its headers) before it is
    closed. Above the sending pools' 15 s keep-alive, so a pooled connection is closed by its
    client first; lower frees a silent stranger's descriptors sooner."""
    linger: float = 2.0
    """Seconds the unread rest of a refused request's body is read and dropped (never kept)
    before the connection closes, so that its sender reads the refusal instead of a reset.
    Longer lets slower senders see why; it is also how long a refused stranger keeps its
    connection."""
    prove_within: float | None = None
    """Seconds a new connection has to be vouched for (`trust_connection`) before it is closed;
    until then it is also the first closed to make room at a cap. None: connections need not
    prove anything (the transport, whose every frame is authenticated on its own). Shorter
    frees a silent client's descriptor sooner; it must exceed the time an honest client takes
    to send a request head."""


class _Admission:
    """Counts open connections per source IP against `ServerLimits`; closes unproven ones to
    make room when the limits say so."""

    def __init__(self, limits: ServerLimits, refused: Counter[str]) -> None:
        self.limits = limits
        self.refused = refused
        self.total = 0
        self.by_source: Counter[str] = Counter()
        self.gates: dict[asyncio.BaseTransport, _Gate] = {}
        """Admitted connections, oldest first."""

    def admit(self, source: str) -> bool:
        if self.total >= self.limits.max_connections and not (
            self._evict_unproven(source) or self._evict_unproven(None)
        ):
            self.refused["too_many_connections"] += 1
            return False
        if self.by_source[source] >= self.limits.max_per_source and not self._evict_unproven(
            source
        ):
            self.refused["too_many_connections_from_source"] += 1
            return False
        self.total += 1
        self.by_source[source] += 1
        return True

    def _evict_unproven(self, source: str | None) -> bool:
        """Close the oldest unproven connection of `source` (None: of any); False if none."""
        if self.limits.prove_within is None:
            return False
        for gate in self.gates.values():
            if source in (None, gate.source) and not gate.trusted:
                gate.close("unproven_evicted")
                return True
        return False

    def vouched(self, source: str) -> None:
        """A connection of `source` was vouched for: it no longer counts against the source."""
        self.by_source[source] -= 1
        if self.by_source[source] <= 0:
            del self.by_source[source]

    def release(self, source: str, vouched: bool) -> None:
        self.total -= 1
        if not vouched:
            self.vouched(source)


class _Gate(asyncio.Protocol):
    """One accepted connection: refused at once over the limits, else aiohttp's from then on."""

    def __init__(self, make_handler: Callable[[], asyncio.Protocol], admission: _Admission):
        self._make_handler = make_handler
        self._admission = admission
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.source = ""
        self.trusted = False
        self._exempt = not admission.limits.per_source_counts_vouched

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if not self._admission.admit(self.source):
            _refuse(transport)
            return
        self._transport = transport
        self._admission.gates[transport] = self
        _GATE_OF[transport] = self
        prove_within = self._admission.limits.prove_within
        if prove_within is not None:
            self._deadline = asyncio.get_running_loop().call_later(
                prove_within, self.close, "unproven_timeout"
            )
        self._inner = self._make_handler()
        self._inner.connection_made(transport)

    def trust(self) -> None:
        """A handler vouched for this connection: it is no longer closed to make room, nor
        counted against its source's `max_per_source`."""
        if not self.trusted and self._transport is not None and self._exempt:
            self._admission.vouched(self.source)
        self.trusted = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def close(self, reason: str) -> None:
        """Close an unproven connection now, counted under `reason`; its slot is free at once."""
        if self._transport is None or self.trusted:
            return
        self._admission.refused[reason] += 1
        transport = self._transport
        self._forget()
        _refuse(transport)

    def _forget(self) -> None:
        if self._transport is not None:
            self._admission.gates.pop(self._transport, None)
            _GATE_OF.pop(self._transport, None)
            self._admission.release(self.source, self.trusted and self._exempt)
            self._transport = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self._inner is not None:
            self._inner.connection_lost(exc)
            self._inner = None

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


_GATE_OF: dict[asyncio.BaseTransport, _Gate] = {}
"""The gate of every connection admitted under limits, in this process (`trust_connection`
finds a request's gate by its transport)."""


def _refuse(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.WriteTransport):
        transport.write(_BUSY)
    transport.close()


class _Runner(web.AppRunner):
    """An `AppRunner` that also closes the listener `serve` created for it."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.listener: asyncio.Server | None = None
        self.admission: _Admission | None = None

    async def cleanup(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        await super().cleanup()


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    limits: ServerLimits | None = None,
    refused: Counter[str] | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on (host, port).

    Args:
        app: the application.
        host: address to listen on.
        port: port to listen on; 0 picks a free one.
        limits: connection caps and the idle timeout; None: neither.
        refused: where connections refused or closed over `limits` are counted, by reason
            ("too_many_connections", "too_many_connections_from_source", and with
            `prove_within`: "unproven_evicted", "unproven_timeout"), and requests that did
            not parse as HTTP ("malformed_http"), with or without `limits`.

    Returns:
        The running runner (call `cleanup()` to stop) and the bound port (the OS's choice when
        `port` is 0).

    Raises:
        OSError: the address cannot be bound (in use, not local, no permission).
    """
    counted = Counter[str]() if refused is None else refused
    handler_args: dict[str, Any] = {}
    if limits is not None:
        handler_args["keepalive_timeout"] = limits.idle_timeout
        handler_args["lingering_time"] = limits.linger
    runner = _Runner(
        app,
        access_log=logging.getLogger(__name__),
        access_log_class=_malformed_counter(counted),
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        **handler_args,
    )
    await runner.setup()
    server = runner.server
    assert server is not None  # set by setup()
    factory: Callable[[], asyncio.Protocol] = server
    if limits is not None:
        admission = runner.admission = _Admission(limits, counted)

        def factory() -> asyncio.Protocol:
            return _Gate(server, admission)

    try:
        runner.listener = await asyncio.get_running_loop().create_server(factory, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.listener.sockets[0].getsockname()[1])


def _malformed_counter(refused: Counter[str]) -> type[AbstractAccessLogger]:
    """An access logger that logs nothing and counts the requests aiohttp could not parse: it
    answers them 400 with its stand-in request (`aiohttp.web_protocol.ERROR`, relied on and so
    pinned in pyproject.toml), whatever bytes came."""

    class MalformedCounter(AbstractAccessLogger):
        def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
            # The stand-in's own headers object (`Request.message` itself is deprecated).
            if request.raw_headers is _UNPARSED.raw_headers:
                refused["malformed_http"] += 1

    return MalformedCounter


def trust_connection(request: web.Request) -> None:
    """Vouch for the connection `request` arrived on (see `ServerLimits.prove_within` and
    `max_per_source`): it is kept until it is idle for `idle_timeout`, never closed to make
    room for another, and no longer counted against its source IP's cap."""
    gate = _GATE_OF.get(request.transport) if request.transport is not None else None
    if gate is not None:
        gate.trust()


def open_connections(runner: web.AppRunner) -> int:
    """Connections a server started with `ServerLimits` holds now (0 without limits)."""
    admission = runner.admission if isinstance(runner, _Runner) else None
    return admission.total if admission is not None else 0


def host_port(host: str, port: int) -> str:
    """The address as "host:port", with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
