"""A standby's asks to one peer are spaced ever further apart, and a peer reading one asker's
asks about one task in a row answers them once (decision 95)."""

from __future__ import annotations

import itertools

import pytest

from protocol.codec import encode_message
from protocol.tasks.claim_rule import ASK_BACKOFF_MAX, ASK_RETRY, ask_retry_after
from protocol.tasks.messages import Claim, TaskAsk
from protocol.wire import PeerState
from tests.protocol.fakes import Link, addr, envelope, node_id, opened
from tests.protocol.test_tasks import DELAY, passed_by_a_full_primary, starts


@pytest.mark.parametrize(("asks", "spans"), [(1, 1), (2, 2), (3, 4), (4, 4), (40, 4)])
def test_the_wait_after_each_ask_in_a_row_doubles_up_to_its_cap(asks: int, spans: int) -> None:
    assert ASK_BACKOFF_MAX == 4
    assert ask_retry_after(asks) == spans


def _standby_left_asking() -> tuple[Link, bytes, int, int]:
    """Two serving peers, one slot each, both busy, and a third task the primary passes. Then
    the primary frees its slot and claims the task, but neither its claim nor its free slot
    reaches the standby, nor does any ask the standby sends (campaign seed 601's losses, and
    the asks lost too): the standby, its own slot freed, asks and asks again."""
    link, task_id, running, primary, standby = passed_by_a_full_primary()

    def lost(src: str, dst: str, data: bytes) -> bool:
        msgs = opened(data)
        if dst == addr(primary):
            return any(isinstance(m, TaskAsk) for m in msgs)
        return dst == addr(standby) and (
            src == addr(primary) or any(isinstance(m, Claim | PeerState) for m in msgs)
        )

    link.drop = lost
    link.run(primary, link.node(primary).complete(link.now, running[primary], 1, "ok", b""))
    assert starts(link, task_id) == [(primary, 1)]
    link.run(standby, link.node(standby).complete(link.now, running[standby], 1, "ok", b""))
    return link, task_id, primary, standby


def _asks(link: Link, standby: int, primary: int, since: float) -> list[float]:
    return [t - since for t in link.sent(standby, primary, TaskAsk) if t >= since]


def test_unanswered_asks_to_one_primary_are_spaced_twice_as_far_each_time() -> None:
    link, task_id, primary, standby = _standby_left_asking()
    start = link.now
    link.advance(start + 4 * DELAY)
    asked = _asks(link, standby, primary, start)
    assert asked[0] == 0.0  # its slot freed, it asks at once
    span = ASK_RETRY * DELAY
    gaps = [round((b - a) / span, 6) for a, b in itertools.pairwise(asked)]
    # Without the backoff it asked every span: 16 asks in these four delays.
    assert gaps[:4] == [1.0, 2.0, 4.0, 4.0]
    assert set(gaps[2:]) == {4.0}
    assert len(asked) < 16
    assert link.node(standby).tasks.tasks[task_id].claim is None


def test_looking_again_between_two_asks_sends_no_ask() -> None:
    link, task_id, primary, standby = _standby_left_asking()
    link.advance(link.now + DELAY)
    node = link.node(standby)
    before = len(link.sent(standby, primary, TaskAsk))
    grantor, in_a_row, next_at = node.tasks.asks_made[task_id]
    assert (grantor, in_a_row) == (node_id(primary), 3) and next_at > link.now
    # Anything the claim rule depends on changing makes it look at the task again.
    for _ in range(3):
        node.tasks.evaluate(link.now, node.tasks.tasks[task_id])
    link.run(standby, node.tick(link.now))
    assert len(link.sent(standby, primary, TaskAsk)) == before
    link.advance(next_at)
    assert len(link.sent(standby, primary, TaskAsk)) == before + 1


def test_the_claim_reaches_a_standby_within_one_delay_once_losses_end() -> None:
    link, task_id, primary, standby = _standby_left_asking()
    link.advance(link.now + 3 * DELAY)  # long enough for the asks to reach their cap
    link.drop = lambda src, dst, data: False
    link.advance(link.now + DELAY)
    assert link.node(standby).tasks.tasks[task_id].claim is not None
    assert task_id not in link.node(standby).tasks.asks_made
    assert starts(link, task_id) == [(primary, 1)]


def _answers(link: Link, primary: int, standby: int, task_id: bytes) -> int:
    """Envelopes `primary` sent `standby` carrying the task's claim (its answers to asks)."""
    return sum(
        1
        for _, src, send in link.log
        if src == addr(primary)
        and send.addr == addr(standby)
        and any(isinstance(m, Claim) and m.task_id == task_id for m in opened(send.data))
    )


def test_asks_read_in_a_row_are_answered_once_and_counted() -> None:
    link, task_id, primary, standby = _standby_left_asking()
    link.drop = lambda src, dst, data: False
    node = link.node(primary)
    before = _answers(link, primary, standby, task_id)
    ask = envelope(standby, encode_message(TaskAsk(task_id, 1)))
    for _ in range(5):  # a backlog read at once: the same ask, five times, at one instant
        link.run(primary, node.handle(link.now, addr(standby), ask))
    assert _answers(link, primary, standby, task_id) == before + 1
    assert node.tasks.counters["asks answered lately"] == 4
    link.now += ASK_RETRY * DELAY / 2  # half an ask interval later: answered again
    link.run(primary, node.handle(link.now, addr(standby), ask))
    assert _answers(link, primary, standby, task_id) == before + 2
