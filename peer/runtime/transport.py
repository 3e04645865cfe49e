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

Blobs (`protocol.blobs`, docs/tasks.md "Blobs") travel over the same server, on two more routes,
sealed under the same network key but with their own `Sealer` and `Opener` (their own sequence
numbers and replay windows), so that a long blob transfer can never push envelope frames out of
a replay window or the reverse:
- ``POST /gv/v1/blob/push``: a sealed ``b"P" + digest + data``; the receiver checks that `data`
  hashes to `digest` and stores it (204), or drops it and counts
  ``rejected["blob_digest_mismatch"]`` (422).
- ``POST /gv/v1/blob/get``: a sealed ``b"G" + digest``; the answer is a sealed
  ``b"B" + digest + data`` (200) or 404 when the blob is not held here. The fetcher checks the
  digest too, so a copy from any peer is as good as the original.
Every blob request and answer is sealed on its own, so nobody without a network key can read,
inject or request a blob. The blob opener tolerates a clock skew of `BLOB_MAX_SKEW` (a large
blob on a slow link arrives long after it was sealed); replaying a captured blob frame gains
nothing, since content is checked by digest and answers are sealed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol

import aiohttp
from aiohttp import web

from peer.runtime.keyring import Keyring
from peer.runtime.sealing import OVERHEAD, Opener, Sealer, SealError
from peer.runtime.serving import serve
from protocol.blobs import BLOB_LIMIT, DIGEST_BYTES
from protocol.wire import MAX_ENVELOPE_BYTES

log = logging.getLogger(__name__)

ENVELOPE_PATH: Final = "/gv/v1/envelope"
MAX_FRAME_BYTES: Final = MAX_ENVELOPE_BYTES + OVERHEAD
"""Largest request body accepted: the largest envelope the wire allows, sealed."""
BLOB_PUSH_PATH: Final = "/gv/v1/blob/push"
BLOB_GET_PATH: Final = "/gv/v1/blob/get"
BLOB_FRAME_BYTES: Final = 1 + DIGEST_BYTES + BLOB_LIMIT + OVERHEAD
"""Largest blob frame: a kind byte, the digest and the largest blob, sealed."""
BLOB_MAX_SKEW: Final = 600.0
"""Seconds a blob frame's timestamp may differ from the receiver's clock (a 64 MiB blob at
1 MB/s takes about 67 s to arrive)."""
BLOB_TIMEOUT: Final = 120.0
"""Seconds one blob push or fetch may take in total, connecting included."""
_PUSH, _GET, _BLOB = b"P", b"G", b"B"
LOG_INTERVAL: Final = 60.0
"""Seconds between two log lines about rejected frames from one source IP."""
_MAX_LOG_SOURCES = 4096
_OUTBOX_BYTES: Final = 8 * 1024 * 1024
"""Most bytes waiting for one address (with `coalesce`); later sends to it are dropped."""

# 400 for frames that are not frames at all; 403 for frames that failed authentication or
# freshness (wrong key, tampered, replayed, skewed clock).
_STATUS_BY_REASON: Final = {
    "too_large": 413,
    "too_short": 400,
    "bad_magic": 400,
    "bad_version": 400,
}

ReceiveCallback = Callable[[str, bytes], None]


class BlobHolder(Protocol):
    """Where received blobs go and served blobs come from (`peer.runtime.blobs.BlobStore`).

    Both calls block on disk I/O and hashing; the transport runs them in a thread.
    """

    def get(self, digest: bytes) -> bytes | None: ...

    def receive(self, digest: bytes, data: bytes) -> bool: ...


class BlobTransferError(Exception):
    """A blob push or fetch failed; `reason` is short and lowercase ("connection refused",
    "HTTP 503", "digest mismatch", ...)."""

    def __init__(self, addr: str, reason: str) -> None:
        super().__init__(f"{addr}: {reason}")
        self.addr = addr
        self.reason = reason


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
        max_frame: largest envelope frame accepted.
        blob_timeout: seconds one blob push or fetch may take in total.
        coalesce: given, at most one send per address is outstanding; what is sent to that
            address meanwhile waits and leaves with the next request, merged by `coalesce`
            (a list of payloads, oldest first, to fewer payloads). Under load one HTTP
            request then carries many envelopes: each request costs far more CPU than the
            bytes it carries. Without it, every send is a request of its own.
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
        blob_timeout: float = BLOB_TIMEOUT,
        coalesce: Callable[[list[bytes]], list[bytes]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.on_receive = on_receive
        """Receives every accepted plaintext; may be replaced before `start`."""
        self._clock = clock
        self._keyring = keyring
        self._sealer = Sealer(keyring, boot_id)
        self._opener = Opener(keyring, max_frame=max_frame)
        self._blob_sealer = Sealer(keyring, boot_id)
        self._blob_opener = _blob_opener(keyring, self._opener.rejected)
        self.blob_store: BlobHolder | None = None
        """Serves and receives blobs; without one the blob routes answer 503."""
        self._max_frame = max_frame
        self._max_in_flight = max_in_flight
        self._send_timeout = send_timeout
        self._blob_timeout = blob_timeout
        self._in_flight: set[asyncio.Task[None]] = set()
        self._coalesce = coalesce
        self._outbox: dict[str, list[bytes]] = {}
        """Payloads waiting for the outstanding send to their address (with `coalesce`)."""
        self._outbox_bytes: dict[str, int] = {}
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
        self.blobs_in = 0
        """Blobs received (pushed to us, or fetched by us) whose digest matched."""
        self.blobs_out = 0
        """Blobs sent (pushed by us, or served to a fetcher)."""

    # Lifecycle

    async def start(self) -> None:
        """Listen on (host, port) and open the sending pool.

        Raises:
            OSError: the address cannot be bound (in use, not local, no permission).
        """
        app = web.Application(client_max_size=self._max_frame)
        app.router.add_post(ENVELOPE_PATH, self._handle)
        app.router.add_post(BLOB_PUSH_PATH, self._handle_blob)
        app.router.add_post(BLOB_GET_PATH, self._handle_blob)
        self._runner, self.port = await serve(app, self.host, self.port)
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
        self._keyring = keyring
        self._sealer = self._sealer.rekeyed(keyring)
        self._opener = self._opener.rekeyed(keyring)
        self._blob_sealer = self._blob_sealer.rekeyed(keyring)
        self._blob_opener = self._blob_opener.rekeyed(keyring)

    @property
    def rejected(self) -> Counter[str]:
        """Frames refused, by reason (`peer.runtime.sealing.SealError.reason`), envelope and blob
        frames alike, plus "blob_digest_mismatch": blobs dropped because their bytes did not
        hash to the digest they came under."""
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
        waiting = self._outbox.get(addr)
        if waiting is not None:
            # A send to this address is outstanding: ride the next request.
            if self._outbox_bytes[addr] + len(data) > _OUTBOX_BYTES:
                self.sends_dropped += 1
                return
            waiting.append(data)
            self._outbox_bytes[addr] += len(data)
            return
        if len(self._in_flight) >= self._max_in_flight:
            self.sends_dropped += 1
            return
        if self._coalesce is None:
            frame = self._seal(data)
            if frame is not None:
                self._spawn(self._post(session, addr, frame))
            return
        self._outbox[addr], self._outbox_bytes[addr] = [], 0
        self._spawn(self._drain(session, addr, [data]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def _seal(self, data: bytes) -> bytes | None:
        try:
            return self._sealer.seal(data, self._clock())
        except OverflowError as exc:
            log.error("cannot seal a frame: %s", exc)
            self.sends_dropped += 1
            return None

    async def _drain(self, session: aiohttp.ClientSession, addr: str, batch: list[bytes]) -> None:
        # One request to `addr` at a time; whatever queued meanwhile goes next, merged.
        assert self._coalesce is not None
        try:
            while batch:
                for payload in self._coalesce(batch) if len(batch) > 1 else batch:
                    frame = self._seal(payload)
                    if frame is not None:
                        await self._post(session, addr, frame)
                batch = self._outbox[addr]
                self._outbox[addr], self._outbox_bytes[addr] = [], 0
        finally:
            del self._outbox[addr], self._outbox_bytes[addr]

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

    # Blobs, client side

    async def push_blob(self, addr: str, digest: bytes, data: bytes) -> None:
        """Send the blob `data`, named `digest`, to the peer at `addr`; return once it is stored
        there.

        Raises:
            BlobTransferError: the peer could not be reached or did not store it.
        """
        await self._blob_request(addr, BLOB_PUSH_PATH, _PUSH + digest + data)
        self.blobs_out += 1

    async def fetch_blob(self, addr: str, digest: bytes) -> bytes | None:
        """Ask the peer at `addr` for the blob named `digest`.

        Returns:
            The blob, its digest checked; None if that peer does not hold it.

        Raises:
            BlobTransferError: the peer could not be reached, or its answer was refused
                (unsealed, or not the blob asked for).
        """
        status, body = await self._blob_request(addr, BLOB_GET_PATH, _GET + digest)
        if status == 404:
            return None
        try:
            plain = self._blob_opener.open(body, self._clock())
        except SealError as exc:
            raise BlobTransferError(addr, f"sealed answer refused: {exc.reason}") from None
        if plain[:1] != _BLOB or plain[1 : 1 + DIGEST_BYTES] != digest:
            raise BlobTransferError(addr, "the answer is not the blob asked for")
        data = plain[1 + DIGEST_BYTES :]
        if not await asyncio.to_thread(_matches, digest, data):
            self.rejected["blob_digest_mismatch"] += 1
            raise BlobTransferError(addr, "digest mismatch")
        self.blobs_in += 1
        return data

    async def _blob_request(self, addr: str, path: str, plain: bytes) -> tuple[int, bytes]:
        session = self._session
        if session is None or session.closed:
            raise BlobTransferError(addr, "the transport is stopped")
        try:
            frame = self._blob_sealer.seal(plain, self._clock())
        except OverflowError as exc:
            raise BlobTransferError(addr, f"cannot seal: {exc}") from None
        try:
            async with session.post(
                f"http://{addr}{path}",
                data=frame,
                headers={"Content-Type": "application/octet-stream"},
                timeout=aiohttp.ClientTimeout(total=self._blob_timeout),
            ) as response:
                body = await response.read()
                status = response.status
        except aiohttp.ClientConnectorError as exc:
            raise BlobTransferError(addr, _connect_reason(exc)) from None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            )
            raise BlobTransferError(addr, reason) from None
        self.bytes_out += len(frame)
        self.bytes_in += len(body)
        if status >= 300 and status != 404:
            text = body[:200].decode("utf-8", errors="replace").strip()
            raise BlobTransferError(addr, f"HTTP {status}" + (f" ({text})" if text else ""))
        return status, body

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

    async def _handle_blob(self, request: web.Request) -> web.StreamResponse:
        source = _source(request)
        length = request.content_length
        if length is not None and length > BLOB_FRAME_BYTES:
            return self._refuse(source, "too_large", f"{length} bytes")
        try:
            frame = await request.clone(client_max_size=BLOB_FRAME_BYTES).read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(source, "too_large", "body over the limit")
        try:
            plain = self._blob_opener.open(frame, self._clock())
        except SealError as exc:
            self._log_refusal(source, f"blob frame: {exc}")
            return _problem(_STATUS_BY_REASON.get(exc.reason, 403), exc.reason)
        self.bytes_in += len(frame)
        store = self.blob_store
        if store is None:
            return _problem(503, "this peer holds no blobs")
        kind, digest = plain[:1], plain[1 : 1 + DIGEST_BYTES]
        if request.path == BLOB_PUSH_PATH and kind == _PUSH and len(digest) == DIGEST_BYTES:
            if not await asyncio.to_thread(store.receive, digest, plain[1 + DIGEST_BYTES :]):
                self.rejected["blob_digest_mismatch"] += 1
                self._log_refusal(source, f"blob {digest.hex()[:12]}: digest mismatch")
                return _problem(422, "blob_digest_mismatch")
            self.blobs_in += 1
            return web.Response(status=204)
        if request.path == BLOB_GET_PATH and kind == _GET and len(plain) == 1 + DIGEST_BYTES:
            data = await asyncio.to_thread(store.get, digest)
            if data is None:
                return _problem(404, "not held here")
            answer = self._blob_sealer.seal(_BLOB + digest + data, self._clock())
            self.blobs_out += 1
            self.bytes_out += len(answer)
            return web.Response(body=answer, content_type="application/octet-stream")
        return _problem(400, "bad_blob_request")

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


def _blob_opener(keyring: Keyring, rejected: Counter[str]) -> Opener:
    opener = Opener(keyring, max_skew=BLOB_MAX_SKEW, max_frame=BLOB_FRAME_BYTES)
    opener.rejected = rejected  # one set of counters for every frame refused
    return opener


def _matches(digest: bytes, data: bytes) -> bool:
    return hashlib.sha256(data).digest() == digest


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
