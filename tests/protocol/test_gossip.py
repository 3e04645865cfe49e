"""The transmit-limited broadcast queue and the event de-duplicator (protocol/gossip.py)."""

from __future__ import annotations

from protocol.gossip import MESSAGE_OVERHEAD, BroadcastQueue, EventDedup

BIG = 1 << 20
ORIGIN = b"o" * 32


def msg(tag: str, size: int = 10) -> bytes:
    return tag.encode().ljust(size, b".")


def test_newest_first_among_never_transmitted() -> None:
    q = BroadcastQueue()
    q.queue("a", msg("a"))
    q.queue("b", msg("b"))
    q.queue("c", msg("c"))
    assert q.get(BIG, limit=10) == [msg("c"), msg("b"), msg("a")]


def test_fewest_transmitted_first() -> None:
    q = BroadcastQueue()
    one = len(msg("x")) + MESSAGE_OVERHEAD
    q.queue("a", msg("a"))
    q.queue("b", msg("b"))
    assert q.get(one, limit=10) == [msg("b")]
    assert q.get(one, limit=10) == [msg("a")]
    q.queue("c", msg("c"))
    assert q.get(BIG, limit=10)[0] == msg("c")
    assert q.transmits("c") == 1 and q.transmits("a") == 2 and q.transmits("b") == 2


def test_retransmit_limit_drops_item_after_limit_hand_outs() -> None:
    q = BroadcastQueue()
    q.queue("a", msg("a"))
    for sent in range(1, 3):
        assert q.get(BIG, limit=3) == [msg("a")]
        assert q.transmits("a") == sent
    assert q.get(BIG, limit=3) == [msg("a")]
    assert "a" not in q and len(q) == 0
    assert q.get(BIG, limit=3) == []


def test_limit_is_applied_at_hand_out_time() -> None:
    q = BroadcastQueue()
    q.queue("a", msg("a"))
    q.get(BIG, limit=5)
    q.get(BIG, limit=5)
    # The cluster shrank: the limit drops below what was already sent.
    assert q.get(BIG, limit=2) == [msg("a")]
    assert "a" not in q


def test_newer_item_under_same_key_replaces_older() -> None:
    q = BroadcastQueue()
    q.queue("k", msg("old"))
    q.get(BIG, limit=10)
    q.queue("k", msg("new"))
    assert len(q) == 1
    assert q.transmits("k") == 0
    assert q.get(BIG, limit=10) == [msg("new")]


def test_budget_counts_message_overhead() -> None:
    q = BroadcastQueue()
    for tag in "abc":
        q.queue(tag, msg(tag))
    per = 10 + MESSAGE_OVERHEAD
    assert q.get(2 * per, limit=10) == [msg("c"), msg("b")]
    q2 = BroadcastQueue()
    for tag in "abc":
        q2.queue(tag, msg(tag))
    assert q2.get(2 * per - 1, limit=10) == [msg("c")]
    assert q2.get(MESSAGE_OVERHEAD + 9, limit=10) == []
    assert q2.transmits("a") == 0 and q2.transmits("b") == 0


def test_too_big_broadcast_does_not_block_smaller_ones() -> None:
    q = BroadcastQueue()
    q.queue("small", msg("s"))
    q.queue("big", msg("b", 100))
    assert q.get(50, limit=10) == [msg("s")]
    assert q.transmits("big") == 0


def test_capacity_drops_most_transmitted_first_and_counts() -> None:
    q = BroadcastQueue(capacity=2)
    q.queue("a", msg("a"))
    q.get(BIG, limit=10)
    q.get(BIG, limit=10)
    q.queue("b", msg("b"))
    assert q.dropped == 0
    q.queue("c", msg("c"))
    assert "a" not in q and "b" in q and "c" in q
    assert len(q) == 2
    assert q.dropped == 1


def test_requeue_under_same_key_at_capacity_drops_nothing() -> None:
    q = BroadcastQueue(capacity=1)
    q.queue("a", msg("a"))
    q.queue("a", msg("a2"))
    assert q.dropped == 0 and len(q) == 1


def test_event_dedup_reports_first_time_once() -> None:
    d = EventDedup(capacity=4)
    assert d.first_time(ORIGIN, 1)
    assert not d.first_time(ORIGIN, 1)
    assert d.first_time(ORIGIN, 2)
    assert d.first_time(b"p" * 32, 1)


def test_event_dedup_is_bounded_and_forgets_oldest() -> None:
    d = EventDedup(capacity=2)
    for ltime in (1, 2, 3):
        assert d.first_time(ORIGIN, ltime)
    assert len(d._seen) == 2
    assert not d.first_time(ORIGIN, 3)
    assert d.first_time(ORIGIN, 1)


def test_broadcast_bigger_than_any_packet_never_leaves_without_solo() -> None:
    q = BroadcastQueue()
    q.queue("big", b"x" * 10_000)
    assert q.get(8192, limit=3) == []
    assert q.transmits("big") == 0


def test_solo_hands_out_a_big_broadcast_alone_when_met_first() -> None:
    q = BroadcastQueue()
    q.queue("small", b"s")
    q.queue("big", b"x" * 10_000)  # newest: met first
    assert q.get(8192, limit=3, solo=True) == [b"x" * 10_000]
    assert q.transmits("big") == 1 and q.transmits("small") == 0
    assert q.get(8192, limit=3, solo=True) == [b"s"]  # the big one has been sent once already


def test_solo_does_not_add_a_big_broadcast_to_a_packet_already_holding_others() -> None:
    q = BroadcastQueue()
    q.queue("big", b"x" * 10_000)
    q.queue("small", b"s")  # newest: taken first
    assert q.get(8192, limit=3, solo=True) == [b"s"]
    assert q.get(8192, limit=3, solo=True) == [b"x" * 10_000]
