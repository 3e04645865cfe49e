"""Lazy messages (decision 63): replica syncs wait for the next envelope to their partner and
ride in front of it, or go alone at the next sync tick."""

from __future__ import annotations

from protocol.codec import encode_message
from protocol.dissemination import LAZY_RIDE_BYTES, UNKNOWN_SENDER
from protocol.effects import Dropped, Send
from protocol.envelope import decode_envelope
from protocol.node import Node
from protocol.tasks.messages import TaskHave, TaskHeld, TaskRecord
from protocol.tasks.repair import SYNC_FIRST, SYNC_TICK
from protocol.wire import Ping
from tests.protocol.fakes import addr, mesh, node_id, opened
from tests.protocol.test_tasks import ROLE, cluster


def _capture(node: Node) -> list[Send]:
    sent: list[Send] = []
    node.dissemination.sink = sent.append
    return sent


def _held(n: int) -> bytes:
    return encode_message(TaskHeld(bytes([n]) * 32))


def test_a_lazy_message_rides_in_front_of_the_next_envelope_to_its_address() -> None:
    node = mesh(3).node(0)
    sent = _capture(node)
    d = node.dissemination
    d.send_lazy(addr(1), [_held(1)])
    assert sent == []
    d.send(addr(2), [_held(2)], piggyback=False)  # another address: nothing rides
    d.send(addr(1), [_held(3)], piggyback=False)
    assert [list(decode_envelope(s.data).messages) for s in sent] == [
        [_held(2)],
        [_held(1), _held(3)],
    ]
    d.flush_lazy()
    assert len(sent) == 2  # nothing was left to flush


def test_a_probe_class_envelope_carries_no_lazy_message() -> None:
    node = mesh(3).node(0)
    sent = _capture(node)
    d = node.dissemination
    d.send_lazy(addr(1), [_held(1)])
    ping = encode_message(Ping(7, node_id(1)))
    d.send(addr(1), [ping], piggyback=False)
    assert list(decode_envelope(sent[0].data).messages) == [ping]
    d.flush_lazy()
    assert [s.addr for s in sent] == [addr(1), addr(1)]
    assert [s.probe for s in sent] == [True, False]  # the host's probe lane takes the first
    assert list(decode_envelope(sent[1].data).messages) == [_held(1)]


def test_flush_sends_what_waits_alone_within_the_ride_limit() -> None:
    node = mesh(3).node(0)
    sent = _capture(node)
    d = node.dissemination
    big = [bytes([0x91, 0x10]) + bytes([n]) * (LAZY_RIDE_BYTES // 2) for n in range(3)]
    d.send_lazy(addr(1), big)
    d.send(addr(1), [_held(9)], piggyback=False)  # one big message rides, then no more fits
    assert list(decode_envelope(sent[0].data).messages) == [big[0], _held(9)]
    d.flush_lazy()
    assert [list(decode_envelope(s.data).messages) for s in sent[1:]] == [[big[1]], [big[2]]]


def test_a_lazy_message_to_an_unknown_sender_is_dropped_and_reported() -> None:
    node = mesh(3).node(0)
    sent = _capture(node)
    node.dissemination.send_lazy(UNKNOWN_SENDER + "10.0.0.9:1", [_held(1)])
    node.dissemination.flush_lazy()
    assert sent == []
    assert any(isinstance(n, Dropped) for n in node.port.take().notes)


def test_a_replica_sync_rides_with_a_task_record_sent_to_its_partner() -> None:
    link = cluster(3, serving=[])  # nobody runs the role: only records and syncs travel
    fx, first = link.node(0).submit(link.now, ROLE, b"first", idempotency_key="first")
    link.run(0, fx)
    # The first task's syncs fall due; they wait for the next envelope to each partner.
    link.advance(link.now + SYNC_FIRST + SYNC_TICK - 0.1)
    since = len(link.log)
    fx, second = link.node(0).submit(link.now, ROLE, b"second", idempotency_key="second")
    link.run(0, fx)
    carried = [
        opened(s.data) for _, src, s in link.log[since:] if src == addr(0) and s.addr == addr(1)
    ]
    assert any(
        any(isinstance(m, TaskHave) and m.entries[0].task_id == first for m in msgs)
        and any(isinstance(m, TaskRecord) and m.task_id == second for m in msgs)
        for msgs in carried
    ), carried
