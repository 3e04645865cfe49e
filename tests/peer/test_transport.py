"""Transport: sealed envelopes over real HTTP on 127.0.0.1; refusals are counted, never fatal."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import pytest_asyncio

from peer.runtime.channels import OUTBOX_BYTES
from peer.runtime.keyring import Keyring
from peer.runtime.sealing import Sealer
from peer.runtime.transport import ENVELOPE_PATH, Transport

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.arrived = asyncio.Event()

    def __call__(self, src: str, data: bytes) -> None:
        self.items.append((src, data))
        self.arrived.set()

    async def wait(self, count: int, timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def _transport(keyring: Keyring, inbox: Inbox, boot: bytes, **kw: object) -> Transport:
    t = Transport("127.0.0.1", 0, keyring, boot, inbox, **kw)  # type: ignore[arg-type]
    await t.start()
    return t


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[tuple[Transport, Inbox, Transport, Inbox]]:
    inbox_a, inbox_b = Inbox(), Inbox()
    a = await _transport(Keyring(KEY), inbox_a, b"A" * 8)
    b = await _transport(Keyring(KEY), inbox_b, b"B" * 8)
    yield a, inbox_a, b, inbox_b
    await a.stop()
    await b.stop()


def _url(t: Transport) -> str:
    return f"http://127.0.0.1:{t.port}{ENVELOPE_PATH}"


async def test_sealed_envelopes_cross_both_ways(
    pair: tuple[Transport, Inbox, Transport, Inbox],
) -> None:
    a, inbox_a, b, inbox_b = pair
    a.send(f"127.0.0.1:{b.port}", b"hello b")
    b.send(f"127.0.0.1:{a.port}", b"hello a")
    await inbox_b.wait(1)
    await inbox_a.wait(1)
    assert inbox_b.items[0][1] == b"hello b"
    assert inbox_b.items[0][0].startswith("127.0.0.1:")
    assert inbox_a.items[0][1] == b"hello a"
    await asyncio.sleep(0.05)
    assert a.messages_out == 1 and b.messages_in == 1 and b.bytes_in > len(b"hello b")
    assert a.send_failures == 0


async def test_send_to_a_closed_port_is_counted_not_raised(
    pair: tuple[Transport, Inbox, Transport, Inbox],
) -> None:
    a, *_ = pair
    with socket_port() as port:
        pass
    a.send(f"127.0.0.1:{port}", b"nobody")
    async with asyncio.timeout(3):
        while a.send_failures == 0:
            await asyncio.sleep(0.01)
    assert a.last_failure[f"127.0.0.1:{port}"] == "connection refused"


async def test_wrong_key_replay_and_oversize_are_refused_and_counted(
    pair: tuple[Transport, Inbox, Transport, Inbox],
) -> None:
    _, _, b, inbox_b = pair
    stranger = Sealer(Keyring(OTHER_KEY, network_id=Keyring(KEY).network_id), b"S" * 8)
    friend = Sealer(Keyring(KEY), b"F" * 8)
    async with aiohttp.ClientSession() as http:
        async with http.post(_url(b), data=stranger.seal(b"let me in", _now())) as r:
            assert r.status == 403
        frame = friend.seal(b"once", _now())
        async with http.post(_url(b), data=frame) as r:
            assert r.status == 204
        async with http.post(_url(b), data=frame) as r:
            assert r.status == 403
        async with http.post(_url(b), data=friend.seal(b"old", _now() - 3600)) as r:
            assert r.status == 403
        async with http.post(_url(b), data=b"x" * (b._max_frame + 1)) as r:
            assert r.status == 413
    assert b.rejected == {"unknown_key": 1, "replay": 1, "stale_timestamp": 1, "too_large": 1}
    assert [data for _, data in inbox_b.items] == [b"once"]


async def test_fuzzed_bodies_never_break_the_server(
    pair: tuple[Transport, Inbox, Transport, Inbox],
) -> None:
    a, _, b, inbox_b = pair
    rng = random.Random(7)
    sealer = Sealer(Keyring(KEY), b"Z" * 8)
    statuses: set[int] = set()
    async with aiohttp.ClientSession() as http:
        for i in range(300):
            if i % 2:
                body = rng.randbytes(rng.randrange(0, 300))
            else:
                frame = bytearray(sealer.seal(rng.randbytes(rng.randrange(0, 100)), _now()))
                for _ in range(rng.randrange(1, 4)):
                    frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
                body = bytes(frame)
            async with http.post(_url(b), data=body) as r:
                statuses.add(r.status)
    assert statuses <= {400, 403}
    assert sum(b.rejected.values()) == 300
    assert inbox_b.items == []
    a.send(f"127.0.0.1:{b.port}", b"still works")
    await inbox_b.wait(1)
    assert inbox_b.items[0][1] == b"still works"


async def test_only_post_on_the_envelope_path_is_served(
    pair: tuple[Transport, Inbox, Transport, Inbox],
) -> None:
    _, _, b, _ = pair
    async with aiohttp.ClientSession() as http:
        async with http.get(_url(b)) as r:
            assert r.status == 405
        async with http.post(f"http://127.0.0.1:{b.port}/other", data=b"x") as r:
            assert r.status == 404


async def test_key_rotation_keeps_traffic_and_replay_state(
    pair: tuple[Transport, Inbox, Transport, Inbox],
) -> None:
    a, _, b, inbox_b = pair
    old = Keyring(KEY)
    new_key = bytes(32 * [9])
    friend = Sealer(old, b"F" * 8)
    frame = friend.seal(b"before rotation", _now())
    async with aiohttp.ClientSession() as http:
        async with http.post(_url(b), data=frame) as r:
            assert r.status == 204
        # Step 1: everyone accepts the new key; step 2: a seals with it.
        b.set_keyring(Keyring(KEY, [new_key], old.network_id))
        a.set_keyring(old.rotate(new_key))
        async with http.post(_url(b), data=frame) as r:
            assert r.status == 403  # still a replay after the keyring changed
    a.send(f"127.0.0.1:{b.port}", b"after rotation")
    await inbox_b.wait(2)
    assert inbox_b.items[-1][1] == b"after rotation"
    with pytest.raises(ValueError, match="different network"):
        a.set_keyring(Keyring(OTHER_KEY))


async def test_channels_beyond_the_limit_and_a_full_outbox_drop_and_count() -> None:
    inbox = Inbox()
    t = await _transport(Keyring(KEY), inbox, b"L" * 8, max_in_flight=2)
    try:
        # Two channels may be open at once: sends to three more addresses are dropped.
        for addr in [f"127.0.0.1:{t.port}", "127.0.0.1:9", "127.0.0.1:7", "127.0.0.1:5"]:
            t.send(addr, b"x")
        t.send("127.0.0.1:3", b"x")
        assert t.sends_dropped == 3 and t.channels[0] == 2
        # What waits for one channel is bounded in bytes.
        t.send(f"127.0.0.1:{t.port}", b"y" * OUTBOX_BYTES)
        assert t.sends_dropped == 4
        await inbox.wait(1)
    finally:
        await t.stop()


def _now() -> float:
    return time.time()


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """Reserve a free local port, then release it so nothing listens on it afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def test_with_coalesce_sends_to_one_peer_share_channel_messages_in_order() -> None:
    inbox_b = Inbox()
    merged: list[int] = []

    def join(batch: list[bytes]) -> list[bytes]:
        merged.append(len(batch))
        return [b"|".join(batch)]

    a = await _transport(Keyring(KEY), Inbox(), b"A" * 8, coalesce=join)
    b = await _transport(Keyring(KEY), inbox_b, b"B" * 8)
    try:
        for i in range(50):
            a.send(f"127.0.0.1:{b.port}", b"m%d" % i)
        assert a.in_flight == 1  # one channel opening; everything waits for it
        await inbox_b.wait(1)
        arrived = b"|".join(data for _, data in inbox_b.items).split(b"|")
        assert arrived == [b"m%d" % i for i in range(50)]
        await asyncio.sleep(0.05)
        assert merged == [50] and a.messages_out == 1 and a.channels == (1, 0)
        assert b.channels == (0, 1)
    finally:
        await a.stop()
        await b.stop()
