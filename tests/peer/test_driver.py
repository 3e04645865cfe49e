"""Driver: real nodes over real transports on 127.0.0.1; effects applied in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from typing import Any, cast

import pytest
import pytest_asyncio

from peer.runtime.driver import Driver
from peer.runtime.hub import NoteHub, Observed
from peer.runtime.transport import Transport
from protocol.effects import Effects, MemberDown, Persist, Send
from protocol.node import Node
from protocol.wire import Status
from tests.peer.inprocess import MemoryStore, in_process_peer

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))


class MemStore(MemoryStore):
    """A `MemoryStore` logging what it was asked to do, and failing on demand."""

    def __init__(self, log: list[str] | None = None) -> None:
        super().__init__()
        self.log = log if log is not None else []
        self.fail = False

    def put_many(self, records: Iterable[Persist]) -> None:
        if self.fail:
            raise OSError("disk full")
        batch = list(records)
        self.log.append(f"persist {len(batch)}")
        super().put_many(batch)


@pytest_asyncio.fixture
async def trio() -> AsyncIterator[list[tuple[Driver, Transport, MemStore]]]:
    async with AsyncExitStack() as stack:
        peers = []
        for index in range(3):
            store = MemStore()
            peer = await stack.enter_async_context(
                in_process_peer(index, KEY, store=store, seed_only=True)
            )
            peers.append((peer.driver, peer.transport, store))
        yield peers


def _alive(driver: Driver) -> int:
    return sum(1 for m in driver.node.members() if m.status == Status.ALIVE)


def _status(driver: Driver, node_id: bytes) -> Status | None:
    member = driver.node.member(node_id)
    return member.status if member is not None else None


async def _until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)


async def test_three_peers_join_see_each_other_and_a_leave(
    trio: list[tuple[Driver, Transport, MemStore]],
) -> None:
    (a, ta, _), (b, _, _), (c, _, store_c) = trio
    assert await b.join([a.node.addr], timeout=2.0) == a.node.addr
    assert await c.join([b.node.addr], timeout=2.0) == b.node.addr
    await _until(lambda: all(_alive(d) == 3 for d, _, _ in trio))

    events = a.hub.subscribe()
    # leave() returns once Node.leave_done() or after the timeout; either way the leave is out.
    await c.leave(timeout=1.0)
    await _until(lambda: all(_status(d, c.node.node_id) == Status.LEFT for d in (a, b)))
    seen = [events.get_nowait() for _ in range(events.qsize())]
    assert any(isinstance(o.note, MemberDown) and o.note.left for o in seen if o is not None)
    assert ta.messages_in > 0 and ta.send_failures == 0

    c.save_members()
    assert {addr for _, addr, _ in store_c.members} == {a.node.addr, b.node.addr}


async def test_join_reports_none_when_nobody_answers(
    trio: list[tuple[Driver, Transport, MemStore]],
) -> None:
    (a, _, _), _, _ = trio
    assert await a.join(["127.0.0.1:9"], timeout=0.3) is None


async def test_user_events_reach_every_peer(
    trio: list[tuple[Driver, Transport, MemStore]],
) -> None:
    (a, _, _), (b, _, _), (c, _, _) = trio
    await b.join([a.node.addr], 2.0)
    await c.join([a.node.addr], 2.0)
    await _until(lambda: all(_alive(d) == 3 for d, _, _ in trio))
    origin, ltime = b.broadcast("deploy", b"v2")
    assert origin == b.node.node_id and ltime == 1

    def delivered(d: Driver) -> bool:
        return any(getattr(o.note, "name", None) == "deploy" for o in d.hub.recent)

    await _until(lambda: all(delivered(d) for d, _, _ in trio))


class ScriptedNode:
    """Stands in for protocol.node.Node: returns prepared Effects."""

    def __init__(self, script: list[Effects]) -> None:
        self.script = script
        self.node_id = b"n" * 32

    def tick(self, now: float) -> Effects:
        return self.script.pop(0) if self.script else Effects()

    def handle(self, now: float, src: str, data: bytes) -> Effects:
        return self.script.pop(0)

    def members(self) -> list[Any]:
        return []

    def member(self, node_id: bytes) -> None:
        return None


class LoggingSender:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def send(self, addr: str, data: bytes, probe: bool = False) -> None:
        self.log.append(f"send {addr}")


async def test_persists_are_durable_before_sends_leave_and_failures_hold_sends() -> None:
    log: list[str] = []
    store = MemStore(log)
    loop = asyncio.get_running_loop()
    fx = Effects(
        sends=[Send("x:1", b"1"), Send("y:2", b"2")],
        persists=[Persist("incarnation", b"self", b"\x00" * 8), Persist("k", b"2", b"v")],
        wake_at=loop.time() + 100,
    )
    held = Effects(sends=[Send("z:3", b"3")], persists=[Persist("k", b"3", b"v")])
    node = ScriptedNode([Effects(), fx, held])
    driver = Driver(cast(Node, node), LoggingSender(log), store)
    driver.start()
    driver.receive("x:1", b"")
    assert log == []  # the group commit comes at the end of this turn of the loop
    await asyncio.sleep(0)
    assert log == ["persist 2", "send x:1", "send y:2"]
    assert driver._timer is not None and driver._timer.when() == fx.wake_at
    store.fail = True
    driver.receive("z:3", b"")
    await asyncio.sleep(0)
    assert log == ["persist 2", "send x:1", "send y:2"]  # nothing sent without durability
    assert driver._timer is None  # wake_at None disarms
    driver.stop()


async def test_one_group_commit_covers_every_envelope_of_a_turn_in_order() -> None:
    log: list[str] = []
    store = MemStore(log)
    first = Effects(sends=[Send("a:1", b"1")], persists=[Persist("k", b"1", b"v")])
    plain = Effects(sends=[Send("b:2", b"2")])  # persists nothing, but follows one that does
    second = Effects(sends=[Send("c:3", b"3")], persists=[Persist("k", b"2", b"v")])
    node = ScriptedNode([Effects(), first, plain, second])
    driver = Driver(cast(Node, node), LoggingSender(log), store)
    driver.start()
    for src in ("a:1", "b:2", "c:3"):
        driver.receive(src, b"")
    await asyncio.sleep(0)
    assert log == ["persist 2", "send a:1", "send b:2", "send c:3"]
    driver.stop()


async def test_hub_drops_a_lagging_subscriber_instead_of_blocking() -> None:
    hub = NoteHub(recent=5, queue_size=3)
    slow = hub.subscribe()
    note = MemberDown(b"m" * 32, 1, False)
    for i in range(6):
        hub.publish(Observed(float(i), note, None))
    items = [slow.get_nowait() for _ in range(slow.qsize())]
    assert items[-1] is None and len(items) == 4
    assert len(hub.recent) == 5
    hub.publish(Observed(9.0, note, None))
    assert slow.empty()  # dropped: receives nothing more
