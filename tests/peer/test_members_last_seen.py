"""`last_seen` in `GET /v1/members` (issue 12): the unix time this peer last received an envelope
from each member, read over a real socket from whole peers gossiping on 127.0.0.1; and the
table that keeps it (`peer.runtime.contact`)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from peer.api_token import load_or_create_token
from peer.build import Peer, build_peer
from peer.node_ids import node_id_text
from peer.runtime.contact import LastContact
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings
from protocol.envelope import encode_envelope, peek_sender
from tests.peer.inprocess import MemoryStore

KEY = bytes(range(140, 172))


@asynccontextmanager
async def api_peer(data_dir: Path, index: int) -> AsyncIterator[Peer]:
    settings = AgentSettings(
        bind="127.0.0.1:0", api="127.0.0.1:0", data_dir=data_dir, profile="local"
    )
    async with build_peer(
        settings,
        on_leave=lambda: None,
        keyring=Keyring(KEY),
        store=MemoryStore(),
        rng=random.Random(index),
    ) as peer:
        yield peer


async def members(peer: Peer, token: str) -> dict[str, dict[str, Any]]:
    """`GET /v1/members` over a socket, by member id."""
    assert peer.api is not None
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session,
        session.get(f"http://{peer.api.address}/v1/members") as response,
    ):
        assert response.status == 200
        body = await response.json()
    return {m["id"]: m for m in body["members"]}


async def until(check: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "not within the limit"
        await asyncio.sleep(0.02)


async def test_last_seen_is_the_last_contact_and_stops_when_a_member_stops(
    tmp_path: Path,
) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(api_peer(tmp_path / "a", 1))
        b_stack = AsyncExitStack()
        b = await b_stack.enter_async_context(api_peer(tmp_path / "b", 2))
        try:
            started = time.time()
            assert await b.driver.join([a.node.addr], timeout=5.0) == a.node.addr
            await until(lambda: len(a.node.members()) == 2)
            a_id, b_id = node_id_text(a.node.node_id), node_id_text(b.node.node_id)
            token = load_or_create_token(tmp_path / "a")

            shown = await members(a, token)
            assert shown[a_id]["self"] and shown[a_id]["last_seen"] is None
            first = shown[b_id]["last_seen"]
            assert isinstance(first, float) and started <= first <= time.time()

            # Gossip and probes go on: the time moves with them.
            deadline = time.monotonic() + 10
            while (later := (await members(a, token))[b_id]["last_seen"]) == first:
                assert time.monotonic() < deadline, "last_seen never moved"
                await asyncio.sleep(0.1)
            assert first < later <= time.time()
        finally:
            await b_stack.aclose()

        # B is gone: A's last contact with it stays where it was, whatever its status.
        stopped = time.time()
        await asyncio.sleep(1.0)
        final = (await members(a, token))[b_id]["last_seen"]
        assert final <= stopped
        await asyncio.sleep(0.5)
        assert (await members(a, token))[b_id]["last_seen"] == final


def test_the_sender_is_read_from_the_head_of_any_envelope() -> None:
    sender = os.urandom(32)
    small = encode_envelope(sender, "127.0.0.1:1", [b"m"])
    large = encode_envelope(sender, "127.0.0.1:1", [os.urandom(4000) for _ in range(100)])
    assert peek_sender(small) == peek_sender(large) == sender
    wrong_version = b"\x94\x7f" + small[2:]
    short_id = encode_envelope(sender, "127.0.0.1:1", [])[:20]
    for not_one in (b"", b"\x93\x01", b"\xc0" * 10, b"\xdc\xff\xff", wrong_version, short_id):
        assert peek_sender(not_one) is None


def test_the_table_keeps_the_latest_time_and_forgets_the_least_recent_sender() -> None:
    table = LastContact(max_senders=2)
    ids = [bytes([i]) * 32 for i in range(3)]
    table.heard(encode_envelope(ids[0], "a:1", []), 10.0)
    table.heard(encode_envelope(ids[0], "a:1", []), 9.0)  # an older clock reading never wins
    assert table.get(ids[0]) == 10.0
    table.heard(encode_envelope(ids[1], "b:1", []), 11.0)
    table.heard(encode_envelope(ids[0], "a:1", []), 12.0)
    table.heard(encode_envelope(ids[2], "c:1", []), 13.0)  # past the bound: ids[1] goes
    assert [table.get(i) for i in ids] == [12.0, None, 13.0]
    table.heard(b"not an envelope", 14.0)
    assert [table.get(i) for i in ids] == [12.0, None, 13.0]


async def test_a_restarted_peer_remembers_the_members_it_saved(tmp_path: Path) -> None:
    # The saved membership hints also tell the node who was a member before the restart, so
    # it ranks tasks' homes among them until it hears of them again (decision 51).
    store = MemoryStore()
    now = int(time.time())
    recent, stale = os.urandom(32), os.urandom(32)
    store.save_members([(recent, "127.0.0.1:9", now - 5), (stale, "127.0.0.1:10", 0)])
    settings = AgentSettings(
        bind="127.0.0.1:0", api="127.0.0.1:0", data_dir=tmp_path, profile="local"
    )
    async with build_peer(
        settings, on_leave=lambda: None, keyring=Keyring(KEY), store=store, rng=random.Random(1)
    ) as peer:
        assert recent in peer.node.port.remembered
        assert stale not in peer.node.port.remembered  # last seen before any retention
        assert recent in peer.node.port.known_members()
