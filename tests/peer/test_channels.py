"""Channels (peer.runtime.channels): bulk envelopes over one WebSocket per destination.

Driven over real sockets on 127.0.0.1, as a hostile sender would: no hello, a forged or
replayed hello, messages that do not open, replayed or moved between channels, and text
frames are refused, counted by reason, and hand nothing on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import WSMessage, WSMsgType

from peer.runtime import channel_receiver, channels
from peer.runtime.channel_receiver import _Inbound
from peer.runtime.channels import (
    CHANNEL_PATH,
    HELLO_HEADER,
    REFUSAL_CODE,
    REFUSED_HEADER,
    ROUTE_CHANNEL_HELLO,
    channel_route,
)
from peer.runtime.keyring import Keyring
from peer.runtime.sealing import Opener, Sealer
from peer.runtime.serving import ServerLimits
from peer.runtime.transport import Transport

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


class Inbox:
    def __init__(self) -> None:
        self.items: list[bytes] = []

    def __call__(self, src: str, data: bytes) -> None:
        self.items.append(data)


async def _until(check: object, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[Transport, Inbox]]:
    inbox = Inbox()
    t = Transport("127.0.0.1", 0, Keyring(KEY), b"R" * 8, inbox)
    await t.start()
    yield t, inbox
    await t.stop()


def _hello(sealer: Sealer, channel_id: bytes, at: float | None = None) -> dict[str, str]:
    frame = sealer.seal(channel_id, time.time() if at is None else at, ROUTE_CHANNEL_HELLO)
    return {HELLO_HEADER: base64.urlsafe_b64encode(frame).decode()}


async def _closing_after(
    url: str, hello: dict[str, str], *messages: bytes | str
) -> tuple[int | None, str]:
    """Open a channel with `hello`, send `messages`, and return how the receiver closed it
    (code, reason)."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=hello) as ws:
        for message in messages:
            if isinstance(message, str):
                await ws.send_str(message)
            else:
                await ws.send_bytes(message)
        closing = await ws.receive(timeout=3)
        return closing.data, str(closing.extra)


async def test_envelopes_travel_in_order_on_one_channel_that_closes_when_idle(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[Transport, Inbox]
) -> None:
    monkeypatch.setattr(channels, "IDLE_SECONDS", 0.3)
    b, inbox = receiver
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"A" * 8, Inbox())
    await a.start()
    try:
        addr = f"127.0.0.1:{b.port}"
        for i in range(20):
            a.send(addr, b"m%d" % i)
        await _until(lambda: len(inbox.items) == 20)
        assert inbox.items == [b"m%d" % i for i in range(20)]
        assert a.channels == (1, 0) and b.channels == (0, 1)
        await _until(lambda: a.channels == (0, 0) and b.channels == (0, 0))  # idle: closed
        a.send(addr, b"again")  # the next send opens a new channel
        await _until(lambda: inbox.items[-1:] == [b"again"])
        assert a._channels_out.opened == 2 and a.send_failures == 0
    finally:
        await a.stop()


async def test_a_sender_with_another_key_is_refused_at_the_upgrade_and_told_why(
    receiver: tuple[Transport, Inbox],
) -> None:
    b, inbox = receiver
    network = Keyring(KEY).network_id
    a = Transport("127.0.0.1", 0, Keyring(OTHER_KEY, network_id=network), b"A" * 8, Inbox())
    await a.start()
    try:
        addr = f"127.0.0.1:{b.port}"
        a.send(addr, b"let me in")
        await _until(lambda: a.send_failures == 1)
        assert "refused our network key" in a.last_failure[addr]
        assert b.rejected["unknown_key"] == 1 and b.channels == (0, 0) and inbox.items == []
    finally:
        await a.stop()


async def test_upgrades_without_a_valid_hello_are_refused_and_counted(
    receiver: tuple[Transport, Inbox],
) -> None:
    b, inbox = receiver
    url = f"http://127.0.0.1:{b.port}{CHANNEL_PATH}"
    friend = Sealer(Keyring(KEY), b"F" * 8)
    replayed = _hello(friend, b"c" * 16)
    attempts = [
        ({}, 400, "bad_channel_hello"),
        ({HELLO_HEADER: "!!not base64!!"}, 400, "bad_channel_hello"),
        ({HELLO_HEADER: "A" * 400}, 400, "bad_channel_hello"),
        (_hello(friend, b"short"), 400, "bad_channel_hello"),
        (_hello(friend, b"c" * 16, at=time.time() - 3600), 403, "stale_timestamp"),
        (replayed, 101, ""),
        (replayed, 403, "replay"),
    ]
    async with aiohttp.ClientSession() as http:
        for headers, status, reason in attempts:
            try:
                async with http.ws_connect(url, headers=headers) as ws:
                    assert status == 101
                    await ws.close()
            except aiohttp.WSServerHandshakeError as exc:
                assert (exc.status, exc.headers and exc.headers[REFUSED_HEADER]) == (
                    status,
                    reason,
                )
    assert b.rejected == {"bad_channel_hello": 4, "stale_timestamp": 1, "replay": 1}
    assert inbox.items == []


async def test_channel_messages_that_do_not_open_end_the_channel_and_change_nothing(
    receiver: tuple[Transport, Inbox],
) -> None:
    b, inbox = receiver
    url = f"http://127.0.0.1:{b.port}{CHANNEL_PATH}"
    friend = Sealer(Keyring(KEY), b"F" * 8)

    async def refused(channel_id: bytes, message: bytes | str) -> tuple[int | None, str]:
        return await _closing_after(url, _hello(friend, channel_id), message)

    first, second = b"1" * 16, b"2" * 16
    in_first = Sealer(Keyring(KEY), b"F" * 8).seal(b"mine", time.time(), channel_route(first))
    assert await refused(second, in_first) == (REFUSAL_CODE, "decrypt_failed")  # moved
    assert await refused(b"3" * 16, b"garbage" * 20) == (REFUSAL_CODE, "bad_magic")
    assert await refused(b"4" * 16, "text") == (REFUSAL_CODE, "bad_channel_message")
    assert b.rejected == {"decrypt_failed": 1, "bad_magic": 1, "bad_channel_message": 1}
    assert inbox.items == []


async def test_a_message_replayed_within_its_channel_is_refused(
    receiver: tuple[Transport, Inbox],
) -> None:
    b, inbox = receiver
    url = f"http://127.0.0.1:{b.port}{CHANNEL_PATH}"
    channel_id = b"9" * 16
    message = Sealer(Keyring(KEY), b"F" * 8).seal(b"once", time.time(), channel_route(channel_id))
    hello = _hello(Sealer(Keyring(KEY), b"F" * 8), channel_id)
    closing = await _closing_after(url, hello, message, message)
    assert closing == (REFUSAL_CODE, "replay")
    assert inbox.items == [b"once"] and b.rejected == {"replay": 1}


async def test_a_receiver_that_stops_costs_its_sender_one_failure_and_a_new_channel() -> None:
    c_inbox = Inbox()
    c = Transport("127.0.0.1", 0, Keyring(KEY), b"C" * 8, c_inbox)
    await c.start()
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"A" * 8, Inbox())
    await a.start()
    try:
        addr = f"127.0.0.1:{c.port}"
        a.send(addr, b"before")
        await _until(lambda: c_inbox.items == [b"before"])
        await c.stop()
        a.send(addr, b"lost")
        await _until(lambda: a.channels[0] == 0)
        a.send(addr, b"refused")
        await _until(lambda: a.last_failure.get(addr) == "connection refused")
        assert a.send_failures >= 1
    finally:
        await a.stop()


async def test_proven_channels_do_not_count_against_the_per_source_cap() -> None:
    # Peers on one machine share 127.0.0.1: once a connection carried an authenticated hello
    # it no longer counts against the source's cap, which still bounds silent strangers.
    inbox = Inbox()
    limits = ServerLimits(max_connections=10, max_per_source=2, per_source_counts_vouched=False)
    b = Transport("127.0.0.1", 0, Keyring(KEY), b"B" * 8, inbox, limits=limits)
    await b.start()
    senders = [
        Transport("127.0.0.1", 0, Keyring(KEY), bytes([65 + i]) * 8, Inbox()) for i in range(4)
    ]
    try:
        for i, sender in enumerate(senders):
            await sender.start()
            sender.send(f"127.0.0.1:{b.port}", b"from %d" % i)
            await _until(lambda i=i: len(inbox.items) == i + 1)
        assert b.channels == (0, 4)
        silent = [await asyncio.open_connection("127.0.0.1", b.port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        async with asyncio.timeout(3):
            assert await reader.readline() == b"HTTP/1.1 503 Service Unavailable\r\n"
        assert b.rejected["too_many_connections_from_source"] == 1
        for _, w in [*silent, (reader, writer)]:
            w.close()
    finally:
        for sender in senders:
            await sender.stop()
        await b.stop()


class _LosingWs:
    """A channel's server side whose connection is lost at the next turn of the loop, with
    `frames` already received: aiohttp then answers CLOSING and drops what it buffered."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = list(frames)
        self.closing = False
        self.closed = False
        asyncio.get_running_loop().call_soon(setattr, self, "closing", True)

    async def receive(self) -> WSMessage:
        if self.closing:
            return WSMessage(WSMsgType.CLOSING, None, None)
        if self.frames:
            return WSMessage(WSMsgType.BINARY, self.frames.pop(0), None)
        while not self.closing:  # nothing more arrives; the connection is lost
            await asyncio.sleep(0.01)
        return WSMessage(WSMsgType.CLOSING, None, None)

    async def close(self, **_: object) -> None:
        self.closed = True


async def test_messages_received_before_the_connection_is_lost_are_all_handed_on() -> None:
    # A SIGKILLed sender's last messages: received, buffered by aiohttp, then the connection
    # goes. Each must reach the bulk lane before the receiver yields to the loop.
    inbox = Inbox()
    t = Transport("127.0.0.1", 0, Keyring(KEY), b"R" * 8, inbox)
    channel_id = b"7" * 16
    sealer = Sealer(Keyring(KEY), b"F" * 8)
    frames = [sealer.seal(b"m%d" % i, time.time(), channel_route(channel_id)) for i in range(3)]
    ws = _LosingWs(frames)
    channel = _Inbound(ws, Opener(Keyring(KEY)), 0.0)  # type: ignore[arg-type]
    await t._channels_in._receive(channel, "127.0.0.1:1", channel_route(channel_id))
    await _until(lambda: len(inbox.items) == 3)
    assert inbox.items == [b"m0", b"m1", b"m2"]


async def test_a_connection_lost_during_the_upgrade_costs_one_failure_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[Transport, Inbox]
) -> None:
    # Seen when a network stops: aiohttp's client asserts on a connection the receiver closed
    # right after answering the upgrade. The sender counts a failure and opens a new channel
    # on the next send; nothing escapes into the event loop as an unretrieved exception.
    b, inbox = receiver
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"A" * 8, Inbox())
    await a.start()
    real_connect = aiohttp.ClientSession.ws_connect
    unretrieved: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unretrieved.append(ctx))

    def tripping(self: aiohttp.ClientSession, *args: object, **kwargs: object) -> object:
        async def trip() -> None:
            raise AssertionError

        return trip()

    try:
        addr = f"127.0.0.1:{b.port}"
        monkeypatch.setattr(aiohttp.ClientSession, "ws_connect", tripping)
        a.send(addr, b"lost")
        await _until(lambda: a.send_failures == 1)
        assert a.last_failure[addr] == "the connection closed during the upgrade"
        assert a.channels == (0, 0)
        monkeypatch.setattr(aiohttp.ClientSession, "ws_connect", real_connect)
        a.send(addr, b"again")
        await _until(lambda: inbox.items == [b"again"])
        assert a.send_failures == 1 and unretrieved == []
    finally:
        await a.stop()


async def test_a_sender_gone_before_the_upgrade_is_answered_is_counted_not_logged(
    monkeypatch: pytest.MonkeyPatch,
    receiver: tuple[Transport, Inbox],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The receiver's side of a stopping network: writing the upgrade's answer finds the
    # connection closed. aiohttp logged that as an error with a traceback; it is counted.
    b, inbox = receiver

    async def gone(self: aiohttp.web.WebSocketResponse, request: object) -> None:
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    monkeypatch.setattr(aiohttp.web.WebSocketResponse, "prepare", gone)
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"A" * 8, Inbox())
    await a.start()
    try:
        a.send(f"127.0.0.1:{b.port}", b"hello?")
        await _until(lambda: a.send_failures == 1)
        assert b._channels_in.lost_before_accepted == 1 and b.channels == (0, 0)
        assert inbox.items == []
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await a.stop()


async def test_at_the_channel_cap_the_least_recently_used_idle_channel_makes_room() -> None:
    inboxes = [Inbox(), Inbox(), Inbox()]
    receivers = [
        Transport("127.0.0.1", 0, Keyring(KEY), b"%d" % i * 8, inboxes[i]) for i in range(3)
    ]
    for r in receivers:
        await r.start()
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"A" * 8, Inbox(), max_in_flight=2)
    await a.start()
    try:
        addrs = [f"127.0.0.1:{r.port}" for r in receivers]
        a.send(addrs[0], b"first")
        await _until(lambda: inboxes[0].items == [b"first"])
        a.send(addrs[1], b"second")
        await _until(lambda: inboxes[1].items == [b"second"])
        a.send(addrs[0], b"first again")  # the channel to 0 is now the more recently used
        await _until(lambda: inboxes[0].items[-1:] == [b"first again"])
        a.send(addrs[2], b"third")  # at the cap of 2: the channel to 1 is closed for it
        await _until(lambda: inboxes[2].items == [b"third"])
        await _until(lambda: receivers[1].channels == (0, 0))
        assert a._channels_out.evicted == 1 and a.sends_dropped == 0
        assert a.channels == (2, 0) and a.channels_opened == 3
        a.send(addrs[1], b"second again")  # evicts the channel to 0, least recently used now
        await _until(lambda: inboxes[1].items[-1:] == [b"second again"])
        assert a._channels_out.evicted == 2 and a.sends_dropped == 0 and a.send_failures == 0
    finally:
        await a.stop()
        for r in receivers:
            await r.stop()


@pytest.mark.parametrize(("open_timeout", "delivered"), [(3.0, True), (0.2, False)])
async def test_a_slow_upgrade_is_waited_for_up_to_the_open_timeout_not_the_send_timeout(
    monkeypatch: pytest.MonkeyPatch,
    receiver: tuple[Transport, Inbox],
    open_timeout: float,
    delivered: bool,
) -> None:
    # A receiver slowed by load answers the upgrade after 0.5 s, past the 0.2 s a write may
    # take: the sender keeps waiting (what waits stays in the outbox) rather than abandon the
    # work both sides did and open again at the next send (decision 90).
    b, inbox = receiver
    real_prepare = aiohttp.web.WebSocketResponse.prepare

    async def slow(self: aiohttp.web.WebSocketResponse, request: aiohttp.web.Request) -> object:
        await asyncio.sleep(0.5)
        return await real_prepare(self, request)

    monkeypatch.setattr(aiohttp.web.WebSocketResponse, "prepare", slow)
    a = Transport(
        "127.0.0.1", 0, Keyring(KEY), b"A" * 8, Inbox(), send_timeout=0.2, open_timeout=open_timeout
    )
    await a.start()
    try:
        addr = f"127.0.0.1:{b.port}"
        for i in range(3):
            a.send(addr, b"m%d" % i)
        if delivered:
            await _until(lambda: len(inbox.items) == 3)
            assert inbox.items == [b"m0", b"m1", b"m2"]
            assert a.send_failures == 0 and a._channels_out.opened == 1
        else:
            await _until(lambda: a.send_failures == 1)
            assert a.last_failure[addr] == "timed out" and a._channels_out.opened == 0
    finally:
        await a.stop()


async def test_a_batch_written_past_the_send_timeout_ends_its_channel_with_one_failure(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[Transport, Inbox]
) -> None:
    # The receiver accepts the channel and never reads: the socket's buffers fill and the
    # write blocks. The sender's sweep (no timer per batch, decision 93) ends that write
    # once the send timeout has passed: one failure, "timed out", and the channel is gone.
    monkeypatch.setattr(channels, "SWEEP_SECONDS", 0.05)
    b, _ = receiver

    async def never_reads(*_: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(b._channels_in, "_receive", never_reads)
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"A" * 8, Inbox(), send_timeout=0.3)
    await a.start()
    try:
        addr = f"127.0.0.1:{b.port}"
        async with asyncio.timeout(10):
            while a.send_failures == 0:
                a.send(addr, b"x" * 1024 * 1024)
                await asyncio.sleep(0.02)
        assert a.last_failure[addr] == "timed out"
        await _until(lambda: a.channels == (0, 0))
    finally:
        await a.stop()


async def test_a_receiver_closes_a_channel_that_stays_silent(
    monkeypatch: pytest.MonkeyPatch, receiver: tuple[Transport, Inbox]
) -> None:
    monkeypatch.setattr(channel_receiver, "RECEIVE_IDLE_SECONDS", 0.3)
    monkeypatch.setattr(channel_receiver, "RECEIVE_SWEEP_SECONDS", 0.1)
    b, _ = receiver
    url = f"http://127.0.0.1:{b.port}{CHANNEL_PATH}"
    hello = _hello(Sealer(Keyring(KEY), b"S" * 8), b"s" * 16)
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=hello) as ws:
        await _until(lambda: b.channels == (0, 1))
        closing = await ws.receive(timeout=3)  # nothing sent: the receiver ends it
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    await _until(lambda: b.channels == (0, 0))
    assert sum(b.rejected.values()) == 0
