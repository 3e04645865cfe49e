"""Channels, the receiving side: the route that accepts a channel and hands on its messages.

The invariants are `peer.runtime.channels`' (the sending side, and what both sides share):
a channel is accepted only with a valid hello, every message opens under the channel's own
route and window or ends the channel, and a message fully received is handed to the bulk
lane before the receiver yields.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from aiohttp import WSMessage, WSMsgType, web

from peer.runtime.channels import (
    CHANNEL_ID_BYTES,
    CHANNEL_PATH,
    HELLO_HEADER,
    PENDING_BYTES,
    RECEIVE_IDLE_SECONDS,
    RECEIVE_SWEEP_SECONDS,
    REFUSAL_CODE,
    REFUSED_HEADER,
    ROUTE_CHANNEL_HELLO,
    channel_route,
)
from peer.runtime.intake import Intake, source_of
from peer.runtime.keyring import Keyring
from peer.runtime.lanes import BulkLane, hand_on, is_probe_class
from peer.runtime.sealing import Opener, SealError
from peer.runtime.serving import trust_connection

log = logging.getLogger(__name__)

_MAX_HELLO_TEXT = 256
"""Longest hello header taken (a sealed 16-byte channel id, base64)."""


class _Inbound:
    """One accepted channel: its socket, its own opener, and when it last brought a message
    (loop time)."""

    __slots__ = ("ws", "opener", "heard")

    def __init__(self, ws: web.WebSocketResponse, opener: Opener, heard: float) -> None:
        self.ws = ws
        self.opener = opener
        self.heard = heard


class ChannelReceiver:
    """The receiving side: the `CHANNEL_PATH` route of the transport's server.

    Args:
        opener: the transport's opener (hellos are opened, and every refusal counted, there).
        keyring: builds each channel's own opener (`rekey` replaces it).
        intake: the transport's intake (refusals, logging, buffered bytes).
        bulk: hands on bulk envelopes in slices.
        on_receive: where probe-class envelopes go at once.
        on_accepted: called with (frame length, plaintext) for every message accepted.
        clock: wall-clock seconds.
        max_frame: the largest message taken.
    """

    def __init__(
        self,
        opener: Callable[[], Opener],
        keyring: Keyring,
        intake: Intake,
        bulk: BulkLane,
        on_receive: Callable[[str, bytes], None],
        on_accepted: Callable[[int, bytes], None],
        clock: Callable[[], float],
        max_frame: int,
    ) -> None:
        self._opener = opener
        self._keyring = keyring
        self._intake = intake
        self._bulk = bulk
        self._on_receive = on_receive
        self._on_accepted = on_accepted
        self._clock = clock
        self._max_frame = max_frame
        self._open: set[_Inbound] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[bool]] = set()
        self.accepted = 0
        """Channels accepted so far."""
        self.lost_before_accepted = 0
        """Upgrades whose sender was gone before the answer could be written."""
        self.probes = 0
        """Probe-class envelopes received (handed on at once, not through the bulk lane)."""

    @property
    def open_channels(self) -> int:
        """Channels open now."""
        return len(self._open)

    def add_to(self, app: web.Application) -> None:
        """Serve the channel route on `app`."""
        app.router.add_get(CHANNEL_PATH, self.handle)

    def rekey(self, keyring: Keyring) -> None:
        """Open with `keyring` from now on, on open channels too (keeping their windows)."""
        self._keyring = keyring
        for channel in self._open:
            channel.opener = channel.opener.rekeyed(keyring)

    async def close(self) -> None:
        """End every open channel, all at once (each waits at most 1 s for its sender)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        closes = [asyncio.wait_for(channel.ws.close(), 1.0) for channel in list(self._open)]
        if closes:
            await asyncio.gather(*closes, return_exceptions=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Accept a channel with a valid hello, then hand on its messages one by one."""
        source = source_of(request)
        channel_id = self._hello(request, source)
        if isinstance(channel_id, web.Response):
            return channel_id
        trust_connection(request)  # a keyholder's: exempt from the per-source cap
        # No receive timeout: a timer per message; `_sweep_channels` closes silent channels.
        ws = web.WebSocketResponse(
            max_msg_size=self._max_frame,
            autoping=True,
            compress=False,
        )
        try:
            await ws.prepare(request)
        except ConnectionError:
            # The sender went away before the upgrade was answered (it stopped, or its wait
            # ran out): nothing was accepted. aiohttp writes the stand-in answer to a closed
            # connection and ignores that; only a count is worth keeping.
            self.lost_before_accepted += 1
            return web.Response(status=499)
        shared = self._opener()
        opener = Opener(
            self._keyring,
            max_skew=shared.max_skew,
            window=shared.window,
            max_frame=self._max_frame,
            max_senders=1,
        )
        opener.rejected = shared.rejected
        loop = asyncio.get_running_loop()
        channel = _Inbound(ws, opener, loop.time())
        self._open.add(channel)
        if self._sweep is None:
            self._sweep = loop.call_later(RECEIVE_SWEEP_SECONDS, self._sweep_channels)
        self.accepted += 1
        try:
            await self._receive(channel, source, channel_route(channel_id))
        finally:
            self._open.discard(channel)
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await ws.close()
        return ws

    def _sweep_channels(self) -> None:
        """Close the channels silent for `RECEIVE_IDLE_SECONDS` (their senders have gone);
        again in `RECEIVE_SWEEP_SECONDS` while any is open."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for channel in self._open:
            if now - channel.heard >= RECEIVE_IDLE_SECONDS and not channel.ws.closed:
                # Its `_receive` is handed a closing message and ends.
                closing = loop.create_task(channel.ws.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        self._sweep = (
            loop.call_later(RECEIVE_SWEEP_SECONDS, self._sweep_channels) if self._open else None
        )

    def _hello(self, request: web.Request, source: str) -> bytes | web.Response:
        text = request.headers.get(HELLO_HEADER)
        if text is None or len(text) > _MAX_HELLO_TEXT:
            return _tagged(self._intake.refuse(source, "bad_channel_hello", "no hello header"))
        try:
            hello = base64.urlsafe_b64decode(text.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return _tagged(self._intake.refuse(source, "bad_channel_hello", "not base64"))
        try:
            channel_id = self._opener().open(hello, self._clock(), ROUTE_CHANNEL_HELLO)
        except SealError as exc:
            return _tagged(self._intake.refused_frame(source, exc, "channel hello: "))
        if len(channel_id) != CHANNEL_ID_BYTES:
            return _tagged(self._intake.refuse(source, "bad_channel_hello", "bad channel id"))
        return channel_id

    async def _receive(self, channel: _Inbound, source: str, route: bytes) -> None:
        # Messages are taken off the socket without a pause while any are buffered: aiohttp
        # drops what it buffered once the connection is lost (a SIGKILLed sender), so a
        # message fully received must be handed to the bulk lane before this task yields.
        # The lane hands them on in order; this task waits for it only when more than
        # `PENDING_BYTES` wait there, which is what slows a fast sender down (TCP).
        pending: deque[tuple[asyncio.Future[bool], int]] = deque()
        waiting = 0
        ws = channel.ws
        loop = asyncio.get_running_loop()
        try:
            while True:
                message = await ws.receive()
                channel.heard = loop.time()
                frame = self._frame(source, message)
                if frame is None:
                    if not ws.closed and message.type == WSMsgType.TEXT:
                        await ws.close(code=REFUSAL_CODE, message=b"bad_channel_message")
                    return
                plaintext = self._open_frame(channel.opener, source, frame, route)
                if isinstance(plaintext, SealError):
                    await ws.close(code=REFUSAL_CODE, message=plaintext.reason.encode())
                    return
                self._on_accepted(len(frame), plaintext)
                if is_probe_class(plaintext):
                    self.probes += 1
                    hand_on(self._on_receive, source, plaintext)
                    continue
                if self._intake.buffered + len(frame) > self._intake.max_buffered:
                    self._intake.refuse(source, "busy", "too many bodies being read")
                    await ws.close(code=REFUSAL_CODE, message=b"busy")
                    return
                pending.append((self._submit(source, plaintext, len(frame)), len(frame)))
                waiting += len(frame)
                while pending and (pending[0][0].done() or waiting > PENDING_BYTES):
                    done, size = pending.popleft()
                    waiting -= size
                    if not await asyncio.shield(done):
                        log.warning("an envelope from %s failed to be handed on", source)
        finally:
            pending.clear()  # the lane hands on what it holds, in order, whatever happens here

    def _frame(self, source: str, message: WSMessage) -> bytes | None:
        if message.type == WSMsgType.BINARY:
            return bytes(message.data)
        if message.type == WSMsgType.ERROR:
            # aiohttp refused it already (too large, a protocol violation)
            self._intake.refuse(source, "bad_channel_message", str(message.data)[:80])
        elif message.type not in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            self._intake.refuse(source, "bad_channel_message", message.type.name)
        return None

    def _open_frame(
        self, opener: Opener, source: str, frame: bytes, route: bytes
    ) -> bytes | SealError:
        try:
            return opener.open(frame, self._clock(), route)
        except SealError as exc:
            self._intake.log_refusal(source, f"channel message: {exc}")
            return exc

    def _submit(self, source: str, plaintext: bytes, size: int) -> asyncio.Future[bool]:
        # Counted against the intake's `max_buffered` until handed on, like a request body.
        intake = self._intake
        intake.buffered += size
        done = self._bulk.submit(source, plaintext)

        def release(_: asyncio.Future[bool]) -> None:
            intake.buffered -= size

        done.add_done_callback(release)
        return done


def _tagged(response: web.Response) -> web.Response:
    """`response` (a refusal) with its reason in `REFUSED_HEADER` too."""
    response.headers[REFUSED_HEADER] = response.text.strip() if response.text else ""
    return response
