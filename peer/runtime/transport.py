"""The peer transport: sealed frames between peers, on channels and in requests.

Invariants:
- Nothing a remote sends can crash the server or reach the protocol unauthenticated: a body
  over the size limit, under a wrong key, replayed, stale, garbled, too slow or cut short is
  refused with a 4xx before any decoding, counted by reason in `rejected`, and logged at most
  once per source IP per `LOG_INTERVAL`. Only plaintext that `Opener.open` accepted reaches
  `on_receive`.
- A stranger without the network key costs a peer a few bytes per request: every body's first
  `PREFIX_BYTES` (magic, version, key id) are checked before the rest is read, and the length
  it announces before any of it is buffered. Every read has a deadline (`read_timeout` between
  two pieces; `blob_timeout` in all for a blob), the server holds at most `ServerLimits`
  connections (per source IP and in all), and request bodies buffered at once are bounded by
  `max_buffered` bytes; beyond a limit a request gets 503 and is counted.
- `send` never blocks and never raises. An envelope joins what waits for its destination's
  channel (`peer.runtime.channels`: a WebSocket per destination, decision 46): a bulk one
  the destination's bulk channel, a probe-class one its probe channel (decision 76). At most
  `max_in_flight` channels of each lane are open; beyond, a send is dropped and counted in
  `sends_dropped`. A failed send (a channel refused, reset or timed out) is counted in
  `send_failures` and remembered per address in `last_failure`, never raised into the
  caller.
- Every frame is sealed with the current keyring's primary key under this process's boot id,
  with sequence numbers that keep increasing across keyring replacements (so receivers never
  see a replay from us after a rotation), for the route it travels on (a frame captured on one
  route does not open on another).

Probe traffic has a lane of its own (`peer.runtime.lanes`): a probe-class envelope leaves at
once on the destination's probe channel, a WebSocket of its own over a connection pool of its
own (never merged with task objects, never queued behind task objects written to its address,
never waiting for a pooled connection), and on receipt is handed to `on_receive` as soon as it
is read. A probe channel costs each probe some 20 us at both ends where a request of its own
cost half a millisecond and, with each member probed every N seconds, mostly a new TCP
connection too (decision 76). Envelopes posted as requests (`ENVELOPE_PATH`) are still
accepted, probe-class ones handed on at once as well. Every other
envelope goes to `on_receive` in slices, one per event-loop turn (`peer.runtime.lanes.BulkLane`),
so a probe or ack read meanwhile waits at most one slice. A channel stops reading while more
than `channels.PENDING_BYTES` of its messages wait for the lane, so a slow receiver slows its
senders (TCP flow control).

Blobs travel over the same server, on two more routes, as sealed streams
(`peer.runtime.blob_routes`); `push_blob` and `fetch_blob` are their client side.
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

from peer.runtime.blob_routes import (
    BLOB_TIMEOUT,
    NO_TASK,
    BlobHolder,
    BlobRoutes,
    BlobTransferError,
)
from peer.runtime.channel_receiver import ChannelReceiver
from peer.runtime.channels import OPEN_TIMEOUT, ChannelSender
from peer.runtime.contact import LastContact
from peer.runtime.intake import (
    BODY_ERRORS,
    MAX_BUFFERED,
    READ_TIMEOUT,
    Intake,
    problem,
    source_of,
)
from peer.runtime.keyring import Keyring
from peer.runtime.lanes import PROBE_ENVELOPE_BYTES, BulkLane, hand_on, is_probe_class
from peer.runtime.sealing import OVERHEAD, PREFIX_BYTES, ROUTE_ENVELOPE, Opener, Sealer, SealError
from peer.runtime.serving import ServerLimits, open_connections, serve, trust_connection
from protocol.wire import MAX_ENVELOPE_BYTES

log = logging.getLogger(__name__)

ENVELOPE_PATH: Final = "/gv/v1/envelope"
MAX_FRAME_BYTES: Final = MAX_ENVELOPE_BYTES + OVERHEAD
"""Largest request body accepted: the largest envelope the wire allows, sealed."""
TRANSPORT_LIMITS: Final = ServerLimits(per_source_counts_vouched=False)
"""The transport server's connection caps and idle timeout, by default."""
_MAX_FAILURE_ADDRS = 4096
BULK_CONNECTIONS_PER_PEER: Final = 6
PROBE_CONNECTIONS_PER_PEER: Final = 2
"""Connections the bulk lane (its channel and blobs) and the probe lane open to one address
at most: 8 in all, as `peer.runtime.serving.ServerLimits.max_per_source` assumes. A probe
channel holds one; the second lets a new one open while one closed idle is still closing."""

ReceiveCallback = Callable[[str, bytes], None]

_REFUSALS: Final = {
    "unknown_key": "it refused our network key: it belongs to another network, or has not "
    "installed ours (grapevine keys)",
    "decrypt_failed": "it refused our network key: it belongs to another network, or has not "
    "installed ours (grapevine keys)",
    "stale_timestamp": "it refused our clock: the two machines' clocks differ (use NTP)",
    "future_timestamp": "it refused our clock: the two machines' clocks differ (use NTP)",
}


_NOT_GOSSIP = "not a peer's gossip port (is it a peer's API address?)"


def is_final_refusal(reason: str) -> bool:
    """Whether a failure `reason` (`last_failure`'s) is a peer's answer refusing us that
    retrying soon will not change: our network key, our clock, or an address that is not a
    gossip port. The initial join stops retrying on it (`bootstrap.join`)."""
    return reason in _REFUSALS.values() or reason.endswith(_NOT_GOSSIP)


def refusal_reason(status: int, answer: bytes) -> str:
    """Why a peer refused an envelope, in words (what `last_failure` and the join report say),
    from the status and the reason our intake answers with (`peer.runtime.intake`)."""
    reason = answer.decode("ascii", errors="replace").strip()
    if status == 403 and reason in _REFUSALS:
        return _REFUSALS[reason]
    if status in (401, 404, 405):
        # Our intake answers none of these: another server, most often a peer's API (401).
        return f"HTTP {status}: {_NOT_GOSSIP}"
    return f"HTTP {status} ({reason})" if reason and reason.isidentifier() else f"HTTP {status}"


class Transport:
    """Sealed envelopes over HTTP between peers.

    Args:
        host: address to listen on ("0.0.0.0", "::", "127.0.0.1", ...).
        port: port to listen on; 0 picks a free one (see `port` after `start`).
        keyring: the network keyring; frames are sealed with its primary key.
        boot_id: 8 random bytes identifying this process to receivers' replay windows.
        on_receive: called with (source "ip:port", plaintext) for every accepted frame.
        clock: wall-clock seconds, stamped into frames and checked against theirs.
        max_in_flight: sends outstanding at once, per lane, before new ones are dropped.
        send_timeout: seconds writing one batch of envelopes to a channel may take.
        open_timeout: seconds opening a channel may take (`peer.runtime.channels.OPEN_TIMEOUT`).
        max_frame: largest envelope frame accepted.
        blob_timeout: seconds one blob push or fetch may take in total.
        read_timeout: seconds a body may stall between two pieces (see `READ_TIMEOUT`).
        limits: the server's connection caps and idle timeout.
        max_buffered: bytes of request bodies held in memory at once (see `MAX_BUFFERED`).
        coalesce: merges what waited for an address's channel (a list of payloads, oldest
            first) into fewer payloads; without it, every send is a channel message of its
            own. Probe-class envelopes are never coalesced.
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
        open_timeout: float = OPEN_TIMEOUT,
        max_frame: int = MAX_FRAME_BYTES,
        blob_timeout: float = BLOB_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        limits: ServerLimits = TRANSPORT_LIMITS,
        max_buffered: int = MAX_BUFFERED,
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
        self._intake = Intake(
            self._opener.rejected, read_timeout=read_timeout, max_buffered=max_buffered
        )
        self._blobs = BlobRoutes(keyring, boot_id, self._intake, clock, blob_timeout)
        self._max_frame = max_frame
        self._max_in_flight = max_in_flight
        self._open_timeout = open_timeout
        self._limits = limits
        self._bulk = BulkLane(lambda source, data: self.on_receive(source, data))

        def channels(
            session: Callable[[], aiohttp.ClientSession | None],
            merge: Callable[[list[bytes]], list[bytes]] | None,
        ) -> ChannelSender:
            return ChannelSender(
                keyring,
                boot_id,
                lambda: self._sealer,
                session,
                clock,
                send_timeout,
                merge,
                self._sent,
                self._failed,
                refusal_reason,
                max_in_flight,
                open_timeout,
            )

        self._channels_out = channels(lambda: self._session, coalesce)
        # A probe-class envelope is never merged: each is a message of its own.
        self._probe_channels = channels(lambda: self._probe_session, None)
        self._channels_in = ChannelReceiver(
            lambda: self._opener,
            keyring,
            self._intake,
            self._bulk,
            lambda source, data: self.on_receive(source, data),
            self._accepted,
            clock,
            max_frame,
        )
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._probe_session: aiohttp.ClientSession | None = None
        self.messages_in = 0
        self.messages_out = 0
        self._envelope_bytes_in = 0
        self._envelope_bytes_out = 0
        self.send_failures = 0
        """Sends that did not get a 2xx answer (refused, timed out, rejected)."""
        self._dropped = 0
        self.last_failure: dict[str, str] = {}
        """The most recent failure reason per destination address, cleared by a success."""
        self.probe_sends = 0
        """Sends that took the probe lane: sent at once, alone, on a probe channel."""
        self._probe_posts_in = 0
        self.last_contact = LastContact()
        """When each sender's last accepted envelope arrived (`GET /v1/members` last_seen)."""

    # Lifecycle

    async def start(self) -> None:
        """Listen on (host, port) and open the sending pool.

        Raises:
            OSError: the address cannot be bound (in use, not local, no permission).
        """
        app = web.Application(client_max_size=self._max_frame)
        app.router.add_post(ENVELOPE_PATH, self._handle)
        self._channels_in.add_to(app)
        self._blobs.add_to(app)
        self._runner, self.port = await serve(
            app, self.host, self.port, limits=self._limits, refused=self.rejected
        )
        self._session = self._client(BULK_CONNECTIONS_PER_PEER)
        self._probe_session = self._client(PROBE_CONNECTIONS_PER_PEER)

    def _client(self, per_host: int) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_in_flight, limit_per_host=per_host)
        return aiohttp.ClientSession(
            connector=connector,
            # The channels' upgrade requests take this; the blobs' requests set their own.
            timeout=aiohttp.ClientTimeout(total=self._open_timeout),
            skip_auto_headers=("User-Agent",),
        )

    async def stop(self, grace: float = 1.0) -> None:
        """Let outstanding sends finish for up to `grace` seconds, then close everything."""
        await asyncio.gather(self._channels_out.close(grace), self._probe_channels.close(grace))
        for session in (self._session, self._probe_session):
            if session is not None:
                await session.close()
        self._session = self._probe_session = None
        await self._channels_in.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._bulk.close()

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
        self._blobs.rekey(keyring)
        self._channels_out.rekey(keyring)
        self._probe_channels.rekey(keyring)
        self._channels_in.rekey(keyring)

    @property
    def rejected(self) -> Counter[str]:
        """Requests refused, by reason: `peer.runtime.sealing.SealError.reason` for envelope
        and blob frames alike; the connection caps' reasons (`peer.runtime.serving.serve`);
        "length_required", "bad_length", "truncated", "read_timeout" and "busy" (over
        `max_buffered`) for bodies; "bad_blob_request", "blob_over_quota" and
        "blob_digest_mismatch" (bytes that did not hash to the digest they came under) for
        blobs; "bad_channel_hello" and "bad_channel_message" for channels
        (`peer.runtime.channels`), whose frames are counted by their `SealError.reason`."""
        return self._opener.rejected

    @property
    def blob_store(self) -> BlobHolder | None:
        """Serves and receives blobs; without one the blob routes answer 503."""
        return self._blobs.store

    @blob_store.setter
    def blob_store(self, store: BlobHolder | None) -> None:
        self._blobs.store = store

    @property
    def bytes_in(self) -> int:
        """Bytes of envelope frames and blob streams accepted (and blob answers read)."""
        return self._envelope_bytes_in + self._blobs.bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes of envelope frames and blob streams sent (and blob answers served)."""
        return self._envelope_bytes_out + self._blobs.bytes_out

    @property
    def blobs_in(self) -> int:
        """Blobs received (pushed to us, or fetched by us) whose digest matched."""
        return self._blobs.blobs_in

    @property
    def blobs_out(self) -> int:
        """Blobs sent (pushed by us, or served to a fetcher)."""
        return self._blobs.blobs_out

    @property
    def connections(self) -> int:
        """Connections the server holds now (at most `ServerLimits.max_connections`)."""
        return open_connections(self._runner) if self._runner is not None else 0

    @property
    def in_flight(self) -> int:
        """Sends outstanding: channels (of either lane) with envelopes waiting."""
        return self._channels_out.waiting + self._probe_channels.waiting

    @property
    def sends_dropped(self) -> int:
        """Sends refused locally: `max_in_flight` channels of the lane open and busy, or a
        channel's outbox full."""
        return self._dropped + self._channels_out.dropped + self._probe_channels.dropped

    @property
    def probe_receives(self) -> int:
        """Probe-class envelopes received: handed on at once, ahead of bulk slices."""
        return self._probe_posts_in + self._channels_in.probes

    @property
    def channels(self) -> tuple[int, int]:
        """Channels open now, both lanes: (to other peers, from other peers)."""
        out = self._channels_out.open_channels + self._probe_channels.open_channels
        return out, self._channels_in.open_channels

    @property
    def channels_opened(self) -> int:
        """Channels this peer has opened to others so far, both lanes (each costs a connection,
        an upgrade and a hello: a count rising as fast as envelopes leave means channels do not
        last)."""
        return self._channels_out.opened + self._probe_channels.opened

    @property
    def backlog(self) -> int:
        """Received envelopes not yet fully handed on (the bulk lane's queue)."""
        return self._bulk.backlog

    # Sending

    def send(self, addr: str, data: bytes, probe: bool = False) -> None:
        """Seal `data` and send it to the peer at `addr` ("host:port") in the background.

        Never blocks and never raises; failures are counted (see the class invariants). A
        `probe` envelope (the node says so: `protocol.effects.Send.probe`) of at most
        `PROBE_ENVELOPE_BYTES` leaves at once on the probe lane, alone on `addr`'s probe
        channel; anything else joins what waits for `addr`'s bulk channel
        (`peer.runtime.channels`), merged with it by `coalesce`. (Telling rather than decoding
        each envelope to look: that cost a twentieth of a busy peer's CPU.)
        """
        session = self._session
        if session is None or session.closed:
            self._dropped += 1
            return
        if probe and len(data) <= PROBE_ENVELOPE_BYTES:
            self._send_probe(addr, data)
            return
        self._channels_out.send(addr, data)

    def _send_probe(self, addr: str, data: bytes) -> None:
        if self._probe_channels.send(addr, data):
            self.probe_sends += 1

    def _sent(self, addr: str, frame_bytes: int) -> None:
        self.messages_out += 1
        self._envelope_bytes_out += frame_bytes
        if self.last_failure:
            self.last_failure.pop(addr, None)

    def _accepted(self, frame_bytes: int, plaintext: bytes) -> None:
        self.last_contact.heard(plaintext, self._clock())
        self.messages_in += 1
        self._envelope_bytes_in += frame_bytes

    def _failed(self, addr: str, reason: str) -> None:
        self.send_failures += 1
        if addr not in self.last_failure and len(self.last_failure) >= _MAX_FAILURE_ADDRS:
            self.last_failure.clear()
        self.last_failure[addr] = reason
        log.debug("send to %s failed: %s", addr, reason)

    # Blobs, client side

    async def push_blob(
        self, addr: str, digest: bytes, data: bytes, task_id: bytes = NO_TASK
    ) -> None:
        """Send the blob `data`, named `digest`, to the peer at `addr` for the task `task_id`
        (whose input or output it is: the receiver takes it only as one of that task's
        designated holders); return once it is stored there.

        Raises:
            BlobTransferError: the peer could not be reached or did not store it.
        """
        await self._blobs.push(self._live_session(addr), addr, digest, data, task_id)

    async def fetch_blob(self, addr: str, digest: bytes, size: int) -> bytes | None:
        """Ask the peer at `addr` for the blob named `digest`, of at most `size` bytes (the
        size its reference gives); no longer answer is read.

        Returns:
            The blob, its digest checked; None if that peer does not hold it.

        Raises:
            BlobTransferError: the peer could not be reached, or its answer was refused
                (unsealed, longer than `size`, or not the blob asked for).
        """
        return await self._blobs.fetch(self._live_session(addr), addr, digest, size)

    def _live_session(self, addr: str) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            raise BlobTransferError(addr, "the transport is stopped")
        return session

    # Receiving

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        source = source_of(request)
        intake = self._intake
        length = request.content_length
        if length is None:
            return intake.refuse(source, "length_required", "no Content-Length")
        if length > self._max_frame:
            return intake.refuse(source, "too_large", f"{length} bytes")
        if length < OVERHEAD:
            return intake.refuse(source, "too_short", f"{length} bytes")
        try:
            prefix = await intake.read_exactly(request.content, PREFIX_BYTES)
            self._opener.check_prefix(prefix)
            # Held (and counted against `max_buffered`) until handed on, queue wait included.
            with intake.buffering(length):
                body = await intake.read_exactly(request.content, length - PREFIX_BYTES)
                plaintext = self._opener.open(prefix + body, self._clock(), ROUTE_ENVELOPE)
                del body
                trust_connection(request)  # a keyholder's: exempt from the per-source cap
                self._accepted(length, plaintext)
                if is_probe_class(plaintext):
                    self._probe_posts_in += 1
                    handled = hand_on(self.on_receive, source, plaintext)
                else:
                    handled = await self._bulk.handle(source, plaintext)
        except SealError as exc:
            return intake.refused_frame(source, exc)
        except BODY_ERRORS as exc:
            return intake.refuse_body(source, exc)
        if not handled:
            return problem(500, "internal error")
        return web.Response(status=204)
