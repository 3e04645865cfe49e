"""HTTP transport: one POST endpoint receives sealed frames; one pooled client sends them.

Invariants:
- Nothing a remote sends can crash the server or reach the protocol unauthenticated: a body
  over the size limit, under a wrong key, replayed, stale or garbled is refused with a 4xx
  before any decoding, counted by reason in `rejected`, and logged at most once per source IP
  per `LOG_INTERVAL`. Only plaintext that `Opener.open` accepted reaches `on_receive`.
- `send` never blocks and never raises: it seals the frame and hands it to a fire-and-forget
  task. At most `max_in_flight` sends are outstanding; beyond that a send is dropped and
  counted in `sends_dropped`. A failed send (refused, timed out, non-2xx answer) is counted in
  `send_failures` and remembered per address in `last_failure`, never raised into the caller.
- Every frame is sealed with the current keyring's primary key under this process's boot id,
  with sequence numbers that keep increasing across keyring replacements (so receivers never
  see a replay from us after a rotation).

The endpoint answers 204 as soon as the frame is opened and handed to `on_receive`, which runs
inline on the event loop (the protocol call is short), so no queue builds up between them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

import aiohttp
from aiohttp import web

from peer.sealing import OVERHEAD, Keyring, Opener, Sealer, SealError
from protocol.wire import MAX_ENVELOPE_BYTES

log = logging.getLogger(__name__)

ENVELOPE_PATH: Final = "/gv/v1/envelope"
MAX_FRAME_BYTES: Final = MAX_ENVELOPE_BYTES + OVERHEAD
"""Largest request body accepted: the largest envelope the wire allows, sealed."""
LOG_INTERVAL: Final = 60.0
"""Seconds between two log lines about rejected frames from one source IP."""
_MAX_LOG_SOURCES = 4096

# 400 for frames that are not frames at all; 403 for frames that failed authentication or
# freshness (wrong key, tampered, replayed, skewed clock).
_STATUS_BY_REASON: Final = {
    "too_large": 413,
    "too_short": 400,
    "bad_magic": 400,
    "bad_version": 400,
}

ReceiveCallback = Callable[[str, bytes], None]


class Transport:
    """Sealed envelopes over HTTP between peers.

    Args:
        host: address to listen on ("0.0.0.0", "::", "127.0.0.1", ...).
        port: port to listen on; 0 picks a free one (see `port` after `start`).
        keyring: the network keyring; frames are sealed with its primary key.
        boot_id: 8 random bytes identifying this process to receivers' replay windows.
        on_receive: called with (source "ip:port", plaintext) for every accepted frame.
        clock: wall-clock seconds, stamped into frames and checked against theirs.
        max_in_flight: sends outstanding at once before new ones are dropped.
        send_timeout: seconds one send may take in total, connecting included.
        max_frame: largest request body accepted.
    """

    def __init__(
        self,
        host: str,
        port: int,
        keyring: Keyring,
        boot_id: bytes,
        on_receive: ReceiveCallback,
        *,
        clock: Callable[[], float] = time.time,
        max_in_flight: int = 256,
        send_timeout: float = 2.0,
        max_frame: int = MAX_FRAME_BYTES,
    ) -> None:
        self.host = host
        self.port = port
        self.on_receive = on_receive
        """Receives every accepted plaintext; may be replaced before `start`."""
        self._clock = clock
        self._keyring = keyring
        self._sealer = Sealer(keyring, boot_id)
        self._opener = Opener(keyring, max_frame=max_frame)
        self._max_frame = max_frame
        self._max_in_flight = max_in_flight
        self._send_timeout = send_timeout
        self._in_flight: set[asyncio.Task[None]] = set()
        self._logged_at: dict[str, float] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.send_failures = 0
        """Sends that did not get a 2xx answer (refused, timed out, rejected)."""
        self.sends_dropped = 0
        """Sends refused locally because `max_in_flight` were outstanding."""
        self.last_failure: dict[str, str] = {}
        """The most recent failure reason per destination address, cleared by a success."""

    # Lifecycle

    async def start(self) -> None:
        """Listen on (host, port) and open the sending pool.

        Raises:
            OSError: the address cannot be bound (in use, not local, no permission).
        """
        app = web.Application(client_max_size=self._max_frame)
        app.router.add_post(ENVELOPE_PATH, self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.port = int(bound[1])
        connector = aiohttp.TCPConnector(limit=self._max_in_flight, limit_per_host=8)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._send_timeout),
            skip_auto_headers=("User-Agent",),
        )

    async def stop(self, grace: float = 1.0) -> None:
        """Let outstanding sends finish for up to `grace` seconds, then close everything."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace)
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Keys and counters

    @property
    def keyring(self) -> Keyring:
        """The keyring frames are sealed and opened with."""
        return self._keyring

    def set_keyring(self, keyring: Keyring) -> None:
        """Seal and open with `keyring` from now on (key rotation), keeping replay state.

        Raises:
            ValueError: `keyring` belongs to a different network.
        """
        if keyring.network_id != self._keyring.network_id:
            raise ValueError("a keyring for a different network id cannot replace this one")
        sealer = Sealer(keyring, self._sealer.boot_id)
        sealer.seq = self._sealer.seq
        opener = Opener(keyring, max_frame=self._max_frame)
        # Keep the replay windows and counters: a new Opener would otherwise accept, within the
        # timestamp window, frames it already accepted under the old keyring.
        opener._senders = self._opener._senders
        opener.rejected = self._opener.rejected
        opener.accepted = self._opener.accepted
        self._keyring, self._sealer, self._opener = keyring, sealer, opener

    @property
    def rejected(self) -> Counter[str]:
        """Frames refused, by reason (`peer.sealing.SealError.reason`)."""
        return self._opener.rejected

    @property
    def in_flight(self) -> int:
        """Sends currently outstanding."""
        return len(self._in_flight)

    # Sending

    def send(self, addr: str, data: bytes) -> None:
        """Seal `data` and post it to the peer at `addr` ("host:port") in the background.

        Never blocks and never raises; failures are counted (see the class invariants).
        """
        session = self._session
        if session is None or session.closed:
            self.sends_dropped += 1
            return
        if len(self._in_flight) >= self._max_in_flight:
            self.sends_dropped += 1
            return
        try:
            frame = self._sealer.seal(data, self._clock())
        except OverflowError as exc:
            log.error("cannot seal a frame: %s", exc)
            self.sends_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._post(session, addr, frame))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _post(self, session: aiohttp.ClientSession, addr: str, frame: bytes) -> None:
        url = f"http://{addr}{ENVELOPE_PATH}"
        try:
            async with session.post(
                url, data=frame, headers={"Content-Type": "application/octet-stream"}
            ) as response:
                await response.read()
                if response.status >= 300:
                    self._failed(addr, f"HTTP {response.status}")
                    return
        except aiohttp.ClientConnectorError as exc:
            self._failed(addr, _connect_reason(exc))
            return
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            )
            self._failed(addr, reason)
            return
        self.messages_out += 1
        self.bytes_out += len(frame)
        self.last_failure.pop(addr, None)

    def _failed(self, addr: str, reason: str) -> None:
        self.send_failures += 1
        if addr not in self.last_failure and len(self.last_failure) >= _MAX_LOG_SOURCES:
            self.last_failure.clear()
        self.last_failure[addr] = reason
        log.debug("send to %s failed: %s", addr, reason)

    # Receiving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        source = _source(request)
        length = request.content_length
        if length is not None and length > self._max_frame:
            return self._refuse(source, "too_large", f"{length} bytes")
        try:
            frame = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(source, "too_large", "body over the limit")
        try:
            plaintext = self._opener.open(frame, self._clock())
        except SealError as exc:
            self._log_refusal(source, str(exc))
            return _problem(_STATUS_BY_REASON.get(exc.reason, 403), exc.reason)
        self.messages_in += 1
        self.bytes_in += len(frame)
        try:
            self.on_receive(source, plaintext)
        except Exception:  # the protocol never raises on input; this guards the host's bugs
            log.exception("handling a frame from %s failed", source)
            return _problem(500, "internal error")
        return web.Response(status=204)

    def _refuse(self, source: str, reason: str, detail: str) -> web.Response:
        self._opener.rejected[reason] += 1
        self._log_refusal(source, f"{reason}: {detail}")
        return _problem(_STATUS_BY_REASON.get(reason, 403), reason)

    def _log_refusal(self, source: str, why: str) -> None:
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


def _source(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = str(peer[0]), int(peer[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return request.remote or "unknown"


def _problem(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n")


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(os_error, TimeoutError):
        return "timed out"
    return os_error.strerror.lower() if os_error.strerror else str(os_error) or "cannot connect"
