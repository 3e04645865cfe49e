"""Channels: long-lived WebSockets, one per destination and lane, carry the envelopes.

The transport keeps two `ChannelSender`s: one for the bulk lane (task objects, gossip, merged
by `coalesce`) and one for the probe lane (pings and acks, each a message of its own, so they
never wait behind task objects in a socket: `peer.runtime.lanes`, decision 76).

An HTTP request per envelope costs both peers about half a millisecond of CPU (aiohttp's
client and server, measured at 260 and 214 us on this project's 2-core machine) against
some 20 us for a message on an open WebSocket. With the task plane's objects addressed to a
task's few holders, a network of 30 peers sent about 33 envelopes per task, so requests,
not the task plane, were most of a task's CPU (decision 46). A channel is opened once per
destination, on the transport's own port, and carries every bulk envelope to it in order.

Invariants:
- A channel is opened only by a peer holding the network key: the upgrade request carries a
  hello, a frame sealed for `ROUTE_CHANNEL_HELLO` with the sender's ordinary sealer (so the
  receiver's replay window and clock check apply), whose plaintext is a fresh random
  channel id. Without a valid hello the upgrade is refused (403 or 400, with the reason in
  the `REFUSED_HEADER` header and the body) before any WebSocket exists.
- Every message on a channel is a frame sealed for the route `ROUTE_CHANNEL` + channel id,
  numbered by a sealer of its own from 1. The receiver opens it with an opener of its own per
  channel: a frame captured on one channel does not open on another, and a replayed one is
  refused by that channel's window. A message that does not open ends the channel (close
  code `REFUSAL_CODE`, the reason as the close message), counted by reason like any frame.
- A message fully received is handed to the bulk lane before the receiver yields (aiohttp
  drops what it buffered when a connection is lost, so a SIGKILLed sender's last messages
  would go otherwise); the lane hands them on in order. The receiver stops reading while more
  than `PENDING_BYTES` of a channel's messages wait there, so a slow receiver slows its
  senders through TCP's flow control (as the answer to a request did).
- A sender never waits on a channel: `ChannelSender.send` appends to the channel's outbox
  (bounded in bytes; beyond, the send is dropped and counted) and wakes its writer, which
  seals and writes what waited, merged by `coalesce`. A channel that fails (refused, reset,
  timed out) counts one failure, drops what waited (the protocol repairs lost envelopes, as
  with a failed request) and is gone; the next send opens a new one.
- A channel idle for `IDLE_SECONDS` is closed by its sender; the receiver closes one silent
  for `RECEIVE_IDLE_SECONDS`, so a channel holds a descriptor only while it is used. Both,
  and the sender's limit on writing a batch, are checked by one sweep per side every
  `SWEEP_SECONDS` (`RECEIVE_SWEEP_SECONDS`), not by a timer per message (decision 93). At
  `max_channels` open, a send to a further address closes the least recently used channel
  with nothing waiting (counted in `evicted`) rather than being dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import WSMsgType

from peer.runtime.blob_routes import connect_reason
from peer.runtime.keyring import Keyring
from peer.runtime.sealing import Sealer

CHANNEL_PATH: Final = "/gv/v1/channel"
HELLO_HEADER: Final = "X-Grapevine-Hello"
REFUSED_HEADER: Final = "X-Grapevine-Refused"
"""Why an upgrade was refused, in the words of `peer.runtime.intake` (the body says it too,
but a WebSocket client sees only the status and headers of a refused handshake)."""
ROUTE_CHANNEL_HELLO: Final = b"channel/hello"
ROUTE_CHANNEL: Final = b"channel/"
CHANNEL_ID_BYTES: Final = 16
REFUSAL_CODE: Final = 4403
"""Close code a receiver ends a channel with when a message was refused (reason in the
message); 4000-4999 are the codes RFC 6455 leaves to applications."""
IDLE_SECONDS: Final = 120.0
"""Seconds a channel with nothing to send stays open. Gossip goes to random members, so at
100 peers each pair exchanges an envelope every ~12 s on average; with 30 s, one gossip
envelope in ten found its channel closed and opened a new one (connection, upgrade, hello:
some 70 opens a second in all, a fifth of a busy peer's CPU; decision 67)."""
OPEN_TIMEOUT: Final = 10.0
"""Seconds opening a channel (connection, upgrade, hello) may take before it is abandoned.
Above the send timeout on purpose: on a machine that runs many peers, the first tasks between
peers that never exchanged a message open channels by the thousand at once, and opens slowed
by that load past 2 s were abandoned after both sides had done most of their work, their
envelopes dropped, and opened again by the next send: at 100 peers on 2 cores, 23,000 opens
of which 8,700 were abandoned, in a storm that took the first minute of the job (decision 90).
What waits for a channel being opened stays in its outbox meanwhile."""
RECEIVE_IDLE_SECONDS: Final = 180.0
"""Seconds a receiver keeps a silent channel: above `IDLE_SECONDS`, so the sender, which knows
it has nothing to send, is the one that closes."""
SWEEP_SECONDS: Final = 0.5
"""How often a sender looks for channels idle too long and batches written too long, while it
has channels. A timer per message (the send timeout around each batch, the idle wait after
it) and a receive timeout per message were a third of a 30-peer network's timers, each
costing a heap push, a cancel and a cleanup on the event loop (decision 93); one sweep costs
a comparison per channel."""
RECEIVE_SWEEP_SECONDS: Final = 15.0
"""How often a receiver looks for channels silent for `RECEIVE_IDLE_SECONDS`."""
OUTBOX_BYTES: Final = 8 * 1024 * 1024
"""Most bytes waiting for one channel's writer; later sends to it are dropped."""
PENDING_BYTES: Final = 4 * 1024 * 1024
"""Bytes of a channel's messages waiting in the bulk lane before its receiver stops reading
more (and TCP slows the sender)."""

Coalesce = Callable[[list[bytes]], list[bytes]]


def _identity(batch: list[bytes]) -> list[bytes]:
    return batch


def channel_route(channel_id: bytes) -> bytes:
    """The route a channel's messages are sealed for."""
    return ROUTE_CHANNEL + channel_id


@dataclass(eq=False)
class _Channel:
    addr: str
    outbox: list[bytes] = field(default_factory=list)
    outbox_bytes: int = 0
    waker: asyncio.Future[bool] | None = None
    """What the idle writer awaits: True when woken, False when its idle time ran out."""
    writing: asyncio.Timeout | None = None
    """The scope of the batch being written, ended by the sweep once `send_timeout` passes."""
    writing_since: float = 0.0
    """Loop time the batch being written started."""

    def wake(self) -> None:
        """Let the writer run at the next turn of the loop (a plain future: one hop, so what
        was sent leaves before anything this turn's callers scheduled after it)."""
        _resolve(self.waker, True)

    sealer: Sealer | None = None
    closing: bool = False
    used: float = 0.0
    """Loop time of the last send to this channel (the least recently used is evicted)."""
    refused: str | None = None


class ChannelRefused(Exception):
    """A channel could not be opened or was ended by its receiver; `reason` says why in words
    (`peer.runtime.transport.refusal_reason`'s)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChannelSender:
    """The sending side: one channel per destination address, opened on first use.

    Args:
        keyring: seals every channel's hello and messages (`rekey` replaces it).
        boot_id: this process's boot id (the hello's sender and every channel's).
        hello_sealer: the transport's sealer, for hellos (they share its sequence numbers).
        session: returns the pooled client session channels are opened with (None: stopped).
        clock: wall-clock seconds.
        send_timeout: seconds to write one batch.
        open_timeout: seconds to open a channel (see `OPEN_TIMEOUT`).
        coalesce: merges what waited for a channel into fewer envelopes.
        on_sent: called with (address, frame length) for each frame once it is written.
        on_failed: called with (address, reason) for each channel that failed.
        refusal_reason: words for a refused upgrade's (status, reason text).
        max_channels: channels open at once; a send to a further address closes the least
            recently used idle one, or is dropped when every open channel has envelopes
            waiting.
    """

    def __init__(
        self,
        keyring: Keyring,
        boot_id: bytes,
        hello_sealer: Callable[[], Sealer],
        session: Callable[[], aiohttp.ClientSession | None],
        clock: Callable[[], float],
        send_timeout: float,
        coalesce: Coalesce | None,
        on_sent: Callable[[str, int], None],
        on_failed: Callable[[str, str], None],
        refusal_reason: Callable[[int, bytes], str],
        max_channels: int,
        open_timeout: float = OPEN_TIMEOUT,
    ) -> None:
        self._keyring = keyring
        self._boot_id = boot_id
        self._hello_sealer = hello_sealer
        self._session = session
        self._clock = clock
        self._send_timeout = send_timeout
        self._open_timeout = open_timeout
        self._coalesce = coalesce or _identity
        self._on_sent = on_sent
        self._on_failed = on_failed
        self._refusal_reason = refusal_reason
        self._max_channels = max_channels
        self._channels: dict[str, _Channel] = {}
        self.dropped = 0
        """Sends dropped: the outbox was full, or too many channels were busy."""
        self.opened = 0
        """Channels opened so far."""
        self.evicted = 0
        """Idle channels closed to make room for a channel to another address."""
        self._running: set[asyncio.Task[None]] = set()
        self._writing: set[_Channel] = set()
        """Channels writing a batch now (an evicted one may still be writing)."""
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def open_channels(self) -> int:
        """Channels open or opening now."""
        return len(self._channels)

    @property
    def waiting(self) -> int:
        """Channels with envelopes waiting to be written."""
        return sum(1 for channel in self._channels.values() if channel.outbox)

    def send(self, addr: str, data: bytes) -> bool:
        """Queue `data` for the channel to `addr`, opening one if none is open; False if it was
        dropped instead (counted in `dropped`)."""
        channel = self._channels.get(addr)
        loop = asyncio.get_running_loop()
        if channel is None:
            if len(self._channels) >= self._max_channels and not self._evict_one():
                self.dropped += 1
                return False
            channel = self._channels[addr] = _Channel(addr)
            task = loop.create_task(self._run(channel))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            if self._sweep is None:
                self._sweep = loop.call_later(SWEEP_SECONDS, self._sweep_channels)
        if channel.outbox_bytes + len(data) > OUTBOX_BYTES:
            self.dropped += 1
            return False
        channel.used = loop.time()
        channel.outbox.append(data)
        channel.outbox_bytes += len(data)
        channel.wake()
        return True

    def _sweep_channels(self) -> None:
        """End the batches written for longer than the send timeout, and wake the writers
        idle for `IDLE_SECONDS` to close; again in `SWEEP_SECONDS` while any channel is left."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for channel in self._writing:
            if channel.writing is not None and now - channel.writing_since >= self._send_timeout:
                channel.writing.reschedule(now)  # the writer sees TimeoutError, as at a timer
        for channel in self._channels.values():
            if channel.waker is not None and now - channel.used >= IDLE_SECONDS:
                _resolve(channel.waker, False)
        self._sweep = (
            loop.call_later(SWEEP_SECONDS, self._sweep_channels)
            if self._channels or self._writing
            else None
        )

    def _evict_one(self) -> bool:
        """Close the least recently used channel with nothing waiting; False if there is none.
        Its writer ends at its next turn; its address is free for a new channel at once."""
        idle = [c for c in self._channels.values() if not c.outbox and not c.closing]
        if not idle:
            return False
        channel = min(idle, key=lambda c: c.used)
        channel.closing = True
        del self._channels[channel.addr]
        channel.wake()
        self.evicted += 1
        return True

    def rekey(self, keyring: Keyring) -> None:
        """Seal with `keyring` from now on, on open channels too (they keep their numbers)."""
        self._keyring = keyring
        for channel in self._channels.values():
            if channel.sealer is not None:
                channel.sealer = channel.sealer.rekeyed(keyring)

    async def close(self, grace: float) -> None:
        """Let every channel write what waits for up to `grace` seconds, then end them all."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        tasks = list(self._running)  # evicted channels still closing too
        for channel in self._channels.values():
            channel.closing = True
            channel.wake()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, channel: _Channel) -> None:
        ws: aiohttp.ClientWebSocketResponse | None = None
        reader: asyncio.Task[None] | None = None
        try:
            ws, channel_id = await self._open(channel.addr)
            self.opened += 1
            channel.sealer = Sealer(self._keyring, self._boot_id)
            reader = asyncio.get_running_loop().create_task(self._read(ws, channel))
            await self._write(ws, channel, channel_route(channel_id))
            if ws.closed:
                await asyncio.wait({reader}, timeout=1.0)  # the close's reason, if any
                if channel.refused is not None:
                    raise ChannelRefused(channel.refused)
                if channel.outbox:
                    raise ChannelRefused("the channel was closed")
        except ChannelRefused as exc:
            self._on_failed(channel.addr, exc.reason)
        except aiohttp.ClientConnectorError as exc:
            self._on_failed(channel.addr, connect_reason(exc))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            )
            self._on_failed(channel.addr, reason)
        except AssertionError:
            # aiohttp's client asserts that the connection still has a transport after the
            # upgrade's answer (3.14): a receiver that closes right then (it is stopping) trips
            # it. That is a lost connection like any other, not a fault of ours.
            self._on_failed(channel.addr, "the connection closed during the upgrade")
        finally:
            if self._channels.get(channel.addr) is channel:
                del self._channels[channel.addr]
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1.0)
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _open(self, addr: str) -> tuple[aiohttp.ClientWebSocketResponse, bytes]:
        session = self._session()
        if session is None or session.closed:
            raise ChannelRefused("the transport is stopped")
        channel_id = os.urandom(CHANNEL_ID_BYTES)
        hello = self._hello_sealer().seal(channel_id, self._clock(), ROUTE_CHANNEL_HELLO)
        try:
            async with asyncio.timeout(self._open_timeout):
                ws = await session.ws_connect(
                    f"http://{addr}{CHANNEL_PATH}",
                    headers={HELLO_HEADER: base64.urlsafe_b64encode(hello).decode("ascii")},
                    autoclose=True,
                    autoping=True,
                    max_msg_size=1024,
                )
        except aiohttp.WSServerHandshakeError as exc:
            why = exc.headers.get(REFUSED_HEADER, "") if exc.headers is not None else ""
            raise ChannelRefused(self._refusal_reason(exc.status, why.encode())) from None
        return ws, channel_id

    async def _write(
        self, ws: aiohttp.ClientWebSocketResponse, channel: _Channel, route: bytes
    ) -> None:
        while not ws.closed:
            if not channel.outbox:
                if channel.closing:
                    return
                waker = channel.waker = asyncio.get_running_loop().create_future()
                try:
                    woken = await waker  # False: the sweep found it idle
                finally:
                    channel.waker = None
                if not woken and not channel.outbox:
                    return  # idle: close; the next send opens a new channel
                continue
            batch, channel.outbox, channel.outbox_bytes = channel.outbox, [], 0
            sealer = channel.sealer
            assert sealer is not None
            # No deadline of its own: the sweep ends the scope once the send timeout passes.
            async with asyncio.timeout(None) as scope:
                channel.writing, channel.writing_since = scope, asyncio.get_running_loop().time()
                self._writing.add(channel)
                try:
                    for payload in self._coalesce(batch) if len(batch) > 1 else batch:
                        frame = sealer.seal(payload, self._clock(), route)
                        await ws.send_bytes(frame)
                        self._on_sent(channel.addr, len(frame))
                finally:
                    channel.writing = None
                    self._writing.discard(channel)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, channel: _Channel) -> None:
        # The receiver sends nothing but control frames; reading is what processes them. A
        # close with `REFUSAL_CODE` says why it refused a message.
        while True:
            message = await ws.receive()
            if message.type == WSMsgType.CLOSE and message.data == REFUSAL_CODE:
                why = str(message.extra or "")[:80]
                channel.refused = self._refusal_reason(403, why.encode())
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
            if message.type == WSMsgType.ERROR:
                break
        channel.wake()


def _resolve(future: asyncio.Future[bool] | None, value: bool) -> None:
    if future is not None and not future.done():
        future.set_result(value)
