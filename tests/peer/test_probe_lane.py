"""Probe lane: probes and acks never wait behind task traffic (issue 10, failure detection under
load): classified by kind, never coalesced, handled between the slices of task envelopes, and
acked within the probe timeout while two transports flood each other."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable

import pytest

from peer.runtime.keyring import Keyring
from peer.runtime.lanes import (
    FIRST_SLICE_MESSAGES,
    PROBE_ENVELOPE_BYTES,
    PROBE_KINDS,
    SLICE_BYTES,
    SLICE_SECONDS,
    BulkLane,
    is_probe_class,
    next_slice,
    resized,
)
from peer.runtime.transport import Transport
from protocol.codec import ARITY, encode_message
from protocol.config import NodeConfig
from protocol.envelope import decode_envelope, encode_envelope, merge_envelopes
from protocol.wire import Ack, IndirectPing, Kind, Nack, Ping, Suspect
from scripts.bench_probe_lane import FloodNode, flood, task_message

KEY = bytes(range(32))
SENDER = hashlib.sha256(b"sender").digest()
TARGET = hashlib.sha256(b"target").digest()


def envelope(*messages: bytes, sender: bytes = SENDER) -> bytes:
    return encode_envelope(sender, "127.0.0.1:1", list(messages))


def tasks(count: int, size: int = 150, first: int = 0) -> list[bytes]:
    return [task_message(first + i, size) for i in range(count)]


PING = encode_message(Ping(7, TARGET, 3))


@pytest.mark.parametrize(
    ("data", "probe"),
    [
        (envelope(PING), True),
        (envelope(encode_message(IndirectPing(1, TARGET, "127.0.0.1:2"))), True),
        (envelope(encode_message(Ack(7))), True),
        (envelope(encode_message(Nack(7))), True),
        (envelope(PING, encode_message(Suspect(TARGET, 3, SENDER)), *tasks(20)), True),
        (envelope(encode_message(Suspect(TARGET, 3, SENDER))), False),
        (envelope(*tasks(3)), False),
        (envelope(), False),
        (envelope(PING, *tasks(1, PROBE_ENVELOPE_BYTES)), False),  # too big for the lane
        (b"\x01" + PING, False),
        (b"", False),
    ],
    ids=[
        "ping",
        "indirect-ping",
        "ack",
        "nack",
        "ping-with-gossip",
        "suspect",
        "tasks",
        "empty",
        "oversize",
        "not-an-envelope",
        "nothing",
    ],
)
def test_probe_kinds_make_an_envelope_probe_class(data: bytes, probe: bool) -> None:
    assert is_probe_class(data) is probe


def test_probe_class_follows_the_kinds_inside_whatever_the_widths() -> None:
    rng = random.Random(10)
    for _ in range(300):
        kinds = [rng.choice(list(ARITY)) for _ in range(rng.choice([0, 1, 3, 15, 16, 40]))]
        pads = [rng.choice([0, 28, 253, 254, 298]) for _ in kinds]
        messages = [
            bytes([0x90 + ARITY[k], k]) + bytes(p) for k, p in zip(kinds, pads, strict=True)
        ]
        addr = "h" * rng.choice([5, 31, 32, 250]) + ":1"
        data = encode_envelope(SENDER, addr, messages)
        expected = len(data) <= PROBE_ENVELOPE_BYTES and bool(set(kinds) & PROBE_KINDS)
        assert is_probe_class(data) is expected
        mangled = bytearray(data)
        for _ in range(3):
            mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        is_probe_class(bytes(mangled))  # never raises
        assert not is_probe_class(data[: rng.randrange(len(data))])


def test_next_slice_cuts_by_count_and_bytes_keeping_sender_and_order() -> None:
    env = decode_envelope(envelope(*tasks(10, 100_000)))
    data, taken = next_slice(env, 2, 5)
    assert taken == 2 and 2 * 100_000 < SLICE_BYTES < 3 * 100_000
    part = decode_envelope(data)
    assert part.sender == SENDER and part.messages == env.messages[2:4]
    one = decode_envelope(envelope(*tasks(1, SLICE_BYTES + 1)))
    assert next_slice(one, 0, 5)[1] == 1  # a message larger than a slice goes alone
    assert next_slice(env, 9, 0)[1] == 1


@pytest.mark.parametrize(
    ("count", "taken", "elapsed", "after"),
    [
        (16, 16, 4 * SLICE_SECONDS, 4),  # four times too slow: a quarter of the messages
        (16, 16, SLICE_SECONDS / 10, 32),  # much too fast: grows, at most twofold
        (16, 16, SLICE_SECONDS, 16),
        (16, 5, 10.0, 16),  # cut short by the envelope's end: nothing learnt
        (1, 1, 1.0, 1),  # never below one
        (8, 8, 0.0, 16),
    ],
)
def test_slices_are_resized_towards_the_time_budget(
    count: int, taken: int, elapsed: float, after: int
) -> None:
    assert resized(count, taken, elapsed) == after


class Clock:
    """A fake clock that the deliveries advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_the_bulk_lane_hands_on_every_message_once_in_order_one_slice_per_turn() -> None:
    clock = Clock()
    turn = 0
    seen: list[tuple[int, bytes, list[bytes]]] = []

    def receive(source: str, data: bytes) -> None:
        if data == b"not msgpack":
            seen.append((turn, b"", []))
            return
        env = decode_envelope(data)
        seen.append((turn, env.sender, list(env.messages)))
        clock.now += len(env.messages) / 1024  # about a millisecond per message, exactly

    loop = asyncio.get_running_loop()
    stop = False

    def count_turns() -> None:
        nonlocal turn
        turn += 1
        if not stop:
            loop.call_soon(count_turns)

    loop.call_soon(count_turns)
    lane = BulkLane(receive, clock)
    other = hashlib.sha256(b"other").digest()
    first, second = envelope(*tasks(100)), envelope(*tasks(30, first=100), sender=other)
    async with asyncio.timeout(5):
        results = await asyncio.gather(
            lane.handle("a", first), lane.handle("b", second), lane.handle("c", b"not msgpack")
        )
    stop = True
    assert results == [True, True, True]
    sizes = [len(messages) for _, _, messages in seen[:-1]]
    budget = int(SLICE_SECONDS * 1024)  # messages that fit in one slice's time
    # The first slice is timed, and every later one is cut to the budget (the last one of
    # each envelope holds what is left).
    assert sizes == [FIRST_SLICE_MESSAGES, *[budget] * 21, *[budget] * 7, 2]
    handed = [m for _, sender, messages in seen[:-1] for m in messages]
    assert handed == tasks(130)
    assert [sender for _, sender, _ in seen[:-1]] == [SENDER] * 22 + [other] * 8
    assert seen[-1][2] == []
    turns = [t for t, _, _ in seen]
    assert len(set(turns)) == len(turns)  # never two slices in one loop turn
    assert lane.slices_in == len(seen) and lane.backlog == 0


async def test_a_slice_that_raises_fails_its_envelope_only_and_close_releases_waiters() -> None:
    def receive(source: str, data: bytes) -> None:
        if len(decode_envelope(data).messages) > 2:
            raise RuntimeError("a bug in the host")

    lane = BulkLane(receive)
    async with asyncio.timeout(5):
        assert not await lane.handle("a", envelope(*tasks(40)))
        assert await lane.handle("a", envelope(*tasks(2)))
        waiting = asyncio.ensure_future(lane.handle("a", envelope(*tasks(2))))
        await asyncio.sleep(0)  # queued, not yet handed on
        await lane.close()
        assert await waiting is False


class Inbox:
    def __init__(self) -> None:
        self.items: list[bytes] = []

    def __call__(self, src: str, data: bytes) -> None:
        self.items.append(data)


async def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_probe_is_never_coalesced_with_task_objects() -> None:
    inbox = Inbox()
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"A" * 8, Inbox(), coalesce=merge_envelopes)
    b = Transport("127.0.0.1", 0, Keyring(KEY), b"B" * 8, inbox, coalesce=merge_envelopes)
    await a.start()
    await b.start()
    try:
        to_b = f"127.0.0.1:{b.port}"
        for i in range(20):
            a.send(to_b, envelope(*tasks(50, first=50 * i)))
        ping = envelope(PING)
        a.send(to_b, ping, probe=True)
        ack = envelope(encode_message(Ack(7)))
        a.send(to_b, ack, probe=True)
        for i in range(20, 40):
            a.send(to_b, envelope(*tasks(50, first=50 * i)))
        # The bulk channel holds the task objects, to be merged; the probes wait on a channel
        # of their own.
        assert a.in_flight == 2 and a.probe_sends == 2
        await _wait(lambda: sum(len(decode_envelope(d).messages) for d in inbox.items) == 2002)
    finally:
        await a.stop()
        await b.stop()
    assert ping in inbox.items and ack in inbox.items  # each arrived alone, as sent
    rest = [d for d in inbox.items if d not in (ping, ack)]
    assert {raw[1] for d in rest for raw in decode_envelope(d).messages} == {Kind.TASK}
    # Both overtook the task objects queued before them, let alone those sent after them.
    first_merged = next(i for i, d in enumerate(inbox.items) if tasks(1, first=50)[0] in d)
    assert max(inbox.items.index(ping), inbox.items.index(ack)) < first_merged
    assert b.probe_receives == 2


async def test_a_probe_is_handled_between_the_slices_of_a_task_envelope() -> None:
    a = FloodNode(b"a", cost=0.0005)
    b = FloodNode(b"b", cost=0.0005)
    for node in (a, b):
        node.transport = Transport(
            "127.0.0.1", 0, Keyring(KEY), node.name * 8, node, coalesce=merge_envelopes
        )
        await node.transport.start()
    assert a.transport is not None and b.transport is not None
    try:
        a.transport.send(b.addr, a.envelope(tasks(1000)))  # half a second of work for b
        await _wait(lambda: b.tasks_handled > 0)
        a.ping(b, 1)
        await _wait(lambda: 1 in a.rtts)
        assert b.tasks_handled < 1000  # acked while the envelope was still being handled
        await _wait(lambda: b.tasks_handled == 1000)
    finally:
        await a.transport.stop()
        await b.transport.stop()


async def test_probes_are_acked_within_the_probe_timeout_during_a_flood() -> None:
    probe_timeout = NodeConfig().swim.probe_timeout
    result = await flood(6, 800, ping_interval=0.05, deadline=30.0)
    assert result.tasks == 2 * 6 * 800
    pings = len(result.rtts) + result.lost
    assert pings >= 10  # pinged throughout (each side handles ~0.5 s of task objects)
    assert result.lost == 0
    assert max(result.rtts) < probe_timeout, sorted(result.rtts)[-5:]
    assert result.probe_sends == 2 * pings  # every ping and every ack took the probe lane


async def test_a_probe_leaves_when_task_sends_fill_their_lane() -> None:
    inbox = Inbox()
    t = Transport("127.0.0.1", 0, Keyring(KEY), b"L" * 8, inbox, max_in_flight=1)
    await t.start()
    try:
        to_self = f"127.0.0.1:{t.port}"
        t.send(to_self, envelope(*tasks(2)))
        t.send("127.0.0.1:9", envelope(*tasks(2, first=2)))  # a second channel: over the limit
        t.send(to_self, envelope(PING), probe=True)
        assert t.sends_dropped == 1 and t.probe_sends == 1 and t.in_flight == 2
        await _wait(lambda: len(inbox.items) == 2)
        assert envelope(PING) in inbox.items
    finally:
        await t.stop()


async def test_probes_to_a_peer_share_one_channel_of_their_own() -> None:
    inbox = Inbox()
    a = Transport("127.0.0.1", 0, Keyring(KEY), b"P" * 8, Inbox())
    b = Transport("127.0.0.1", 0, Keyring(KEY), b"Q" * 8, inbox)
    await a.start()
    await b.start()
    try:
        to_b = f"127.0.0.1:{b.port}"
        for seq in range(5):
            a.send(to_b, envelope(encode_message(Ack(seq))), probe=True)
            await _wait(lambda n=seq + 1: len(inbox.items) == n)  # type: ignore[misc]
        # One connection, upgrade and hello for all five, not a request each.
        assert a.channels_opened == 1 and a.channels == (1, 0) and b.channels == (0, 1)
        assert a.probe_sends == 5 and b.probe_receives == 5
        a.send(to_b, envelope(*tasks(1)))
        await _wait(lambda: len(inbox.items) == 6)
        assert a.channels_opened == 2  # task objects travel on a channel of their own
    finally:
        await a.stop()
        await b.stop()
