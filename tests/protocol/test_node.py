"""Node-level protocol rules, driven through an in-memory link under a fake clock."""

from __future__ import annotations

import random
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import decode_message, encode_message
from protocol.config import GossipConfig, NodeConfig, SwimConfig, lan, suspicion_min_timeout
from protocol.dissemination import UNKNOWN_SENDER
from protocol.effects import (
    Dropped,
    EventReceived,
    JoinSucceeded,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    MemberSuspected,
    MemberUpdated,
    Persist,
    StallDetected,
)
from protocol.envelope import decode_envelope, encode_envelope
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.node import Node
from protocol.node_port import COUNT_REFRESH_INTERVAL, USAGE_GOSSIP_INTERVAL
from protocol.probing import RELAY_TIMEOUT_FRACTION
from protocol.wire import (
    MAX_NAME_CHARS,
    MAX_STATE_MODELS,
    MAX_UINT,
    RUN_COUNTS,
    Ack,
    Alive,
    Breaker,
    Dead,
    IndirectPing,
    ModelUsage,
    Nack,
    Ping,
    PushPull,
    Status,
    Suspect,
    UserEvent,
)
from tests.protocol.fakes import (
    Link,
    addr,
    alive,
    envelope,
    mesh,
    node_id,
    of_type,
    opened,
    peer_state,
    signer,
)

SWIM = lan().swim
QUIET = NodeConfig(
    swim=SwimConfig(gossip_to_the_dead=1000.0),
    gossip=GossipConfig(
        gossip_interval=1000.0, push_pull_interval=1000.0, reconnect_interval=1000.0
    ),
)


def table(node: Node) -> list[tuple[bytes, Status, int]]:
    return sorted((m.node_id, m.status, m.incarnation) for m in node.members())


def lone(config: NodeConfig = QUIET) -> Node:
    return Node(config, signer(0, config.network_id), addr(0), random.Random(5), 0.0)


# Construction.


@pytest.mark.parametrize(
    "config",
    [
        NodeConfig(network_id=b""),
        NodeConfig(swim=SwimConfig(probe_timeout=2.0)),
        NodeConfig(gossip=GossipConfig(gossip_fanout=0)),
    ],
)
def test_invalid_config_is_rejected(config: NodeConfig) -> None:
    with pytest.raises(LocalProtocolError):
        Node(config, signer(0, config.network_id), addr(0), random.Random(1), 0.0)


def test_signer_of_another_network_is_rejected() -> None:
    with pytest.raises(LocalProtocolError, match="different network"):
        Node(lan(), signer(0, b"elsewhere"), addr(0), random.Random(1), 0.0)


def test_first_call_persists_the_starting_incarnation() -> None:
    node = Node(lan(), signer(0), addr(0), random.Random(1), 0.0, incarnation=7)
    assert node.tick(0.0).persists == [Persist("incarnation", b"self", (7).to_bytes(8, "big"))]
    assert node.incarnation == 7


# Join.


def test_join_via_push_pull_both_sides_learn_each_other() -> None:
    link = Link(2)
    link.join(1)
    assert link.notes_of(1, JoinSucceeded) == [JoinSucceeded(addr(0), 2)]
    assert link.notes_of(1, MemberJoined) == [MemberJoined(node_id(0), addr(0), 0)]
    assert link.notes_of(0, MemberJoined) == [MemberJoined(node_id(1), addr(1), 0)]
    assert link.notes_of(0, JoinSucceeded) == []
    assert table(link.node(0)) == table(link.node(1))


def test_members_learned_by_push_pull_are_regossiped() -> None:
    link = Link(3)
    link.join(1)
    assert ("member", node_id(1)) in link.node(0).queue
    assert ("member", node_id(0)) in link.node(1).queue


def test_join_spreads_to_everyone_through_gossip() -> None:
    link = mesh(5)
    for i in range(5):
        node = link.node(i)
        assert node.membership.alive_count() == 5
        assert len(link.notes_of(i, MemberJoined)) == 4
        assert all(m.status == Status.ALIVE for m in node.members())


def test_a_joiner_exchanges_full_state_once_more_one_probe_interval_after_joining() -> None:
    # Members that joined while the seed answered us would otherwise reach us only by gossip
    # or by the periodic push-pull, which QUIET puts 1000 s away.
    config = replace(QUIET, swim=replace(QUIET.swim, probe_interval=1.0))
    link = Link(3, config)
    link.join(1)
    link.join(2)
    link.advance(5.0)
    pushes = [t for t, a, s in link.log if a == addr(1) and of_type(opened(s.data), PushPull)]
    settles = [t for t in pushes if t > 0.0]
    assert settles == [1.0]
    assert {m.node_id for m in link.node(1).members()} >= {node_id(0), node_id(2)}


def test_join_skips_our_own_address() -> None:
    link = Link(1)
    fx = link.node(0).join(0.0, [addr(0)])
    assert fx.sends == []


# Probing, with exact deadlines.


def test_probe_deadlines_on_the_wake_at() -> None:
    node = lone()
    node.handle(0.0, addr(1), envelope(1, alive(1)))
    t = node.tick(0.0).wake_at
    assert t is not None and t < SWIM.probe_interval
    fx = node.tick(t)
    [ping] = [m for s in fx.sends for m in opened(s.data) if isinstance(m, Ping)]
    assert fx.sends[0].addr == addr(1) and ping.target == node_id(1)
    assert fx.wake_at == t + SWIM.probe_timeout
    fx = node.tick(t + SWIM.probe_timeout)  # no helpers to ask in a two-member cluster
    assert fx.sends == [] and fx.wake_at == t + SWIM.probe_interval
    fx = node.tick(t + SWIM.probe_interval)
    assert fx.notes[0] == MemberSuspected(node_id(1), 0)
    # The next probe is due one (awareness-scaled) interval later.
    assert fx.wake_at == t + SWIM.probe_interval + SWIM.probe_timeout * 2


def test_ack_keeps_member_alive() -> None:
    link = mesh(3)
    link.advance(link.now + 30.0)
    for i in range(3):
        assert link.notes_of(i, MemberSuspected) == []
        assert link.node(i).membership.awareness.score == 0
    assert link.sent(0, 1, Ping) and link.sent(1, 0, Ack)


def test_unanswered_probe_goes_indirect_at_exactly_the_probe_timeout() -> None:
    link = mesh(4)
    link.crash(3)
    link.advance(link.now + 3.0)
    pings = link.sent(0, 3, Ping)
    indirect = sorted(set(link.sent(0, 1, IndirectPing) + link.sent(0, 2, IndirectPing)))
    assert pings and indirect
    assert indirect[0] == pings[0] + SWIM.probe_timeout


def test_helper_nacks_when_target_is_silent() -> None:
    link = mesh(4)
    link.crash(3)
    link.advance(link.now + 3.0)
    asked = link.sent(0, 1, IndirectPing)
    nacks = link.sent(1, 0, Nack)
    assert asked and nacks
    assert nacks[0] == pytest.approx(asked[0] + RELAY_TIMEOUT_FRACTION * SWIM.probe_timeout)


def test_nacks_in_time_spare_the_prober_awareness() -> None:
    link = mesh(4)
    link.crash(3)
    while not (link.sent(0, 1, IndirectPing) and link.sent(0, 2, IndirectPing)):
        link.advance(link.now + 0.05)
    link.advance(link.now + SWIM.probe_interval)  # past the end of that probe round
    assert link.sent(1, 0, Nack) and link.sent(2, 0, Nack)
    assert link.node(0).membership.awareness.score == 0


def test_helper_relays_ack_when_only_the_direct_path_is_broken() -> None:
    link = mesh(3)
    link.drop = lambda src, dst, data: {src, dst} == {addr(0), addr(1)}
    link.advance(link.now + 20.0)
    assert link.notes_of(0, MemberSuspected) == []
    assert link.sent(2, 0, Ack)
    assert link.node(0).member(node_id(1)).status == Status.ALIVE  # type: ignore[union-attr]


def test_crashed_member_suspected_then_down_at_the_computed_deadline() -> None:
    link = mesh(2)
    link.crash(1)
    link.advance(link.now + 10.0)
    [suspected] = link.when(0, MemberSuspected)
    [down] = link.when(0, MemberDown)
    assert down == suspected + suspicion_min_timeout(SWIM.suspicion_mult, 2, SWIM.probe_interval)
    assert link.notes_of(0, MemberDown) == [MemberDown(node_id(1), 0, left=False)]


def test_suspicion_in_larger_cluster_is_down_at_its_deadline() -> None:
    link = mesh(5)
    link.crash(4)
    deadlines: list[float] = []
    while not link.notes_of(0, MemberDown):
        link.advance(link.now + 0.05)
        m = link.node(0).member(node_id(4))
        if m is not None and m.suspicion is not None:
            deadlines.append(m.suspicion.deadline)
    [down] = link.when(0, MemberDown)
    assert down == deadlines[-1]
    # Others confirmed the suspicion, so it ended before the unconfirmed maximum.
    first = link.when(0, MemberSuspected)[0]
    low = suspicion_min_timeout(SWIM.suspicion_mult, 5, SWIM.probe_interval)
    assert first + low <= down < first + low * SWIM.suspicion_max_timeout_mult


# Refutation.


def test_suspected_member_refutes_and_is_seen_alive_with_higher_incarnation() -> None:
    link = mesh(3)
    target = link.node(1)
    fx = link.run(
        1, target.handle(link.now, addr(2), envelope(2, Suspect(node_id(1), 0, node_id(2))))
    )
    assert target.incarnation == 1
    assert Persist("incarnation", b"self", (1).to_bytes(8, "big")) in fx.persists
    assert ("member", node_id(1)) in target.queue
    link.advance(link.now + 2.0)
    for i in (0, 2):
        assert link.node(i).member(node_id(1)).incarnation == 1  # type: ignore[union-attr]
        assert MemberUpdated(node_id(1), addr(1), 1) in link.notes_of(i, MemberUpdated)


def test_muted_member_refutes_suspicion_once_heard_again() -> None:
    link = mesh(3)
    muted = [True]
    link.drop = lambda src, dst, data: src == addr(1) and muted[0]
    while not link.notes_of(0, MemberSuspected):
        link.advance(link.now + 0.1)
    muted[0] = False
    link.advance(link.now + 10.0)
    seen = link.node(0).member(node_id(1))
    assert seen is not None and seen.status == Status.ALIVE and seen.incarnation >= 1
    assert link.notes_of(0, MemberUpdated) or link.notes_of(0, MemberRecovered)
    assert link.node(1).membership.false_refutations >= 1


def test_declared_dead_member_recovers_after_refuting() -> None:
    link = mesh(3)
    link.run(0, link.node(0).handle(link.now, addr(2), envelope(2, _dead(1, 0, 2))))
    assert link.notes_of(0, MemberDown) == [MemberDown(node_id(1), 0, left=False)]
    link.advance(link.now + 3.0)
    assert link.notes_of(0, MemberRecovered) == [MemberRecovered(node_id(1), addr(1), 1)]


def test_a_member_back_from_dead_gets_a_full_state_exchange_within_a_probe_interval() -> None:
    # Whatever either side finished while apart (tasks too ride the push-pull) is repaired at
    # once, not when random push-pull pairing happens to join the two (QUIET: 1000 s away).
    config = replace(QUIET, swim=replace(QUIET.swim, probe_interval=1.0))
    link = mesh(3, config)
    link.run(0, link.node(0).handle(link.now, addr(2), envelope(2, _dead(1, 0, 2))))
    link.advance(link.now + 3.0)
    [recovered_at] = link.when(0, MemberRecovered)
    link.advance(link.now + 2.0)
    later = [t for t in link.sent(0, 1, PushPull) if t >= recovered_at]
    assert len(later) == 1 and later[0] <= recovered_at + 1.0
    assert not [t for t in link.sent(0, 2, PushPull) if t >= recovered_at]


def test_a_member_held_dead_hears_it_in_the_ack_to_its_probe_and_refutes() -> None:
    # The death's gossip transmissions may all go to other members (here: spent before any
    # went out) and push-pull is far off (QUIET); the member still learns it was declared dead
    # from the ack to its next probe of us, and refutes.
    link = mesh(3, QUIET)
    link.run(0, link.node(0).handle(link.now, addr(2), envelope(2, _dead(1, 0, 2))))
    link.node(0).queue.get(1 << 20, limit=1)  # every broadcast handed out once, elsewhere
    assert ("member", node_id(1)) not in link.node(0).queue
    link.advance(link.now + 3.0)
    assert link.node(1).incarnation == 1
    assert link.notes_of(0, MemberRecovered) == [MemberRecovered(node_id(1), addr(1), 1)]


def _dead(i: int, incarnation: int, accuser: int) -> Dead:
    return Dead(node_id(i), incarnation, node_id(accuser))


# Leave.


def test_graceful_leave_is_recorded_as_left_everywhere() -> None:
    link = mesh(4)
    leaver = link.node(3)
    assert not leaver.leave_done()
    link.run(3, leaver.leave(link.now))
    link.advance(link.now + 1.0)
    assert leaver.leave_done()
    for i in range(3):
        assert link.notes_of(i, MemberDown) == [MemberDown(node_id(3), 0, left=True)]
        assert link.node(i).member(node_id(3)).status == Status.LEFT  # type: ignore[union-attr]
    assert leaver.incarnation == 0 and leaver.membership.false_refutations == 0


def test_leave_is_done_at_once_with_nobody_to_tell() -> None:
    node = lone()
    node.leave(1.0)
    assert node.leave_done()


def test_leave_done_counts_transmissions_of_the_leave() -> None:
    link = mesh(5)
    fx = link.run(4, link.node(4).leave(link.now))
    carrying = [s for s in fx.sends if link.node(4).dissemination.leave_msg in opened_raw(s.data)]
    assert len(carrying) == link.config.gossip.gossip_fanout
    assert link.node(4).dissemination.leave_transmits == 3 and link.node(4).leave_done()


def opened_raw(data: bytes) -> list[bytes]:
    return list(decode_envelope(data).messages)


def test_left_member_is_not_suspected_or_probed() -> None:
    link = mesh(3)
    link.run(2, link.node(2).leave(link.now))
    link.advance(link.now + 1.0)
    link.crash(2)
    start = link.now
    link.advance(link.now + 30.0)
    assert link.notes_of(0, MemberSuspected) == []
    assert [t for t in link.sent(0, 2, Ping) if t > start] == []


# Peer input never raises.


def _garbage_inputs() -> list[bytes]:
    good = envelope(1, alive(1))
    return [
        b"",
        b"\xc1",
        b"\xff\x00garbage",
        good[:-3],
        good[: len(good) // 2],
        msgpack.packb([2, node_id(1), addr(1), []]),
        msgpack.packb([1, node_id(1), addr(1), [1, 2]]),
        msgpack.packb({"a": 1}),
        encode_envelope(node_id(1), addr(1), [msgpack.packb([99, 1])]),
        encode_envelope(node_id(1), addr(1), [msgpack.packb([1, 5])]),
        encode_envelope(node_id(0), addr(0), [encode_message(Ping(1, node_id(0)))]),
    ]


@pytest.mark.parametrize("data", _garbage_inputs())
def test_bad_input_is_dropped_with_no_state_change(data: bytes) -> None:
    node = lone()
    node.handle(0.0, addr(2), envelope(2, alive(2)))
    before = table(node)
    fx = node.handle(0.1, "x:1", data)
    assert fx.sends == [] and fx.persists == []
    assert [type(n) for n in fx.notes] == [Dropped]
    assert table(node) == before
    assert node.dropped == 1


def test_ping_for_another_node_is_dropped() -> None:
    node = lone()
    node.handle(0.0, addr(1), envelope(1, alive(1)))
    fx = node.handle(0.0, addr(1), envelope(1, Ping(1, node_id(9))))
    assert fx.notes == [Dropped(addr(1), "ping addressed to another node id")]
    assert fx.sends == []


def test_stray_acks_and_nacks_change_nothing() -> None:
    node = lone()
    node.handle(0.0, addr(2), envelope(2, alive(2)))
    before = table(node)
    fx = node.handle(0.1, addr(1), envelope(1, Ack(77), Nack(78)))
    assert fx.sends == [] and fx.notes == [] and table(node) == before


def test_forged_alive_in_an_envelope_is_dropped() -> None:
    node = lone()
    forged = Alive(alive(1).public_key, "evil:1", 0, alive(1).sig, node_id(1))
    fx = node.handle(0.0, addr(1), envelope(1, forged))
    label = UNKNOWN_SENDER + addr(1)  # sender 1 is not known yet
    assert fx.notes == [Dropped(label, "alive record with a bad signature")]
    assert node.member(node_id(1)) is None


def test_rejected_envelope_does_not_hide_its_good_messages_later() -> None:
    node = lone()
    bad = encode_envelope(node_id(1), addr(1), [encode_message(alive(1)), msgpack.packb([99])])
    assert of_type(node.handle(0.0, addr(1), bad).notes, Dropped)
    assert node.member(node_id(1)) is None
    fx = node.handle(0.1, addr(1), envelope(1, alive(1)))
    assert fx.notes == [MemberJoined(node_id(1), addr(1), 0)]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    node = lone()
    fx = node.handle(0.0, "x:1", data)
    assert fx.sends == [] and table(node) == [(node_id(0), Status.ALIVE, 0)]


# Stalls.


def test_stall_restarts_suspicion_instead_of_declaring_dead() -> None:
    link = mesh(2)
    link.crash(1)
    while not link.notes_of(0, MemberSuspected):
        link.advance(link.now + 0.1)
    node = link.node(0)
    deadline = node.member(node_id(1)).suspicion.deadline  # type: ignore[union-attr]
    link.now = deadline + 10.0
    fx = link.run(0, node.tick(link.now))
    gap = fx.notes[0]
    assert isinstance(gap, StallDetected) and gap.gap > SWIM.stall_threshold
    assert of_type(fx.notes, MemberDown) == []
    assert node.membership.awareness.score == SWIM.awareness_max_multiplier - 1
    link.advance(link.now + 10.0)
    [down] = link.when(0, MemberDown)
    assert down == deadline + 10.0 + suspicion_min_timeout(4, 2, SWIM.probe_interval)


def test_regular_calls_are_not_stalls() -> None:
    link = mesh(3)
    link.advance(link.now + 60.0)
    assert all(link.notes_of(i, StallDetected) == [] for i in range(3))


# User events.


def test_user_event_is_delivered_once_everywhere() -> None:
    link = mesh(4)
    link.run(0, link.node(0).broadcast(link.now, "deploy", b"v2"))
    link.advance(link.now + 3.0)
    for i in range(4):
        assert link.notes_of(i, EventReceived) == [EventReceived(node_id(0), 1, "deploy", b"v2")]
        assert link.node(i).ltime == 1


def test_duplicate_user_event_is_suppressed() -> None:
    node = lone()
    ev = UserEvent(node_id(1), 3, "x", b"1")
    assert node.handle(0.0, addr(1), envelope(1, ev)).notes == [
        EventReceived(node_id(1), 3, "x", b"1")
    ]
    assert node.handle(0.1, addr(1), envelope(1, ev)).notes == []
    same_id = UserEvent(node_id(1), 3, "x", b"other bytes")
    assert node.handle(0.2, addr(2), envelope(2, same_id)).notes == []


def test_user_event_advances_lamport_time() -> None:
    node = lone()
    node.handle(0.0, addr(1), envelope(1, UserEvent(node_id(1), 40, "x", b"")))
    assert node.ltime == 40
    fx = node.broadcast(0.1, "y", b"")
    assert fx.notes == [EventReceived(node_id(0), 41, "y", b"")]


def test_too_old_user_event_is_rejected() -> None:
    node = lone()
    window = QUIET.gossip.event_dedup
    node.handle(0.0, addr(1), envelope(1, UserEvent(node_id(1), 5000, "x", b"")))
    old = UserEvent(node_id(2), 5000 - window - 1, "x", b"")
    assert node.handle(0.1, addr(2), envelope(2, old)).notes == []
    edge = UserEvent(node_id(2), 5000 - window, "x", b"")
    assert node.handle(0.2, addr(2), envelope(2, edge)).notes != []


@pytest.mark.parametrize("name,payload", [("", b""), ("n" * 129, b""), ("n", b"x" * 8193)])
def test_broadcast_rejects_bad_arguments(name: str, payload: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        lone().broadcast(0.0, name, payload)


# Peer state.


def test_set_state_is_gossiped_and_stored_by_others() -> None:
    link = mesh(3)
    link.run(0, link.node(0).set_state(link.now, ("writer", "critic"), 2, 5, 0.25))
    link.advance(link.now + 2.0)
    mine = link.node(0).peer_states()[node_id(0)]
    assert (mine.roles, mine.free_slots, mine.queue_len, mine.load) == (
        ("writer", "critic"),
        2,
        5,
        0.25,
    )
    for i in (1, 2):
        assert link.node(i).peer_states()[node_id(0)] == mine


def test_usage_rides_our_state_to_others_at_a_bounded_rate() -> None:
    link = mesh(3)
    link.run(0, link.node(0).set_state(link.now, ("writer",), 2, 0, 0.0))
    link.advance(link.now + 2.0)
    link.run(0, link.node(0).set_usage(link.now, 3, 1_250))  # the first goes out at once
    link.advance(link.now + 1.0)
    for i in (1, 2):
        seen = link.node(i).peer_states()[node_id(0)]
        assert (seen.roles, seen.agents, seen.spend_micro) == (("writer",), 3, 1_250)
    # A second change within USAGE_GOSSIP_INTERVAL is ours at once, gossiped when due.
    link.run(0, link.node(0).set_usage(link.now, 3, 9_000))
    link.advance(link.now + 1.0)
    assert link.node(0).peer_states()[node_id(0)].spend_micro == 9_000
    assert link.node(1).peer_states()[node_id(0)].spend_micro == 1_250
    link.advance(link.now + USAGE_GOSSIP_INTERVAL)
    for i in (1, 2):
        assert link.node(i).peer_states()[node_id(0)].spend_micro == 9_000
    # The same usage again makes no new version.
    version = link.node(0).peer_states()[node_id(0)].version
    link.run(0, link.node(0).set_usage(link.now, 3, 9_000))
    assert link.node(0).peer_states()[node_id(0)].version == version


def test_a_push_pull_carries_only_our_gossiped_state() -> None:
    # A version made for our own reading was new to every peer a push-pull gave it to, and
    # each gossiped it on: one unplanned broadcast per member and exchange (decision 63).
    link = mesh(3)
    link.run(0, link.node(0).set_state(link.now, ("writer",), 2, 0, 0.0))
    link.run(0, link.node(0).set_usage(link.now, 3, 1_250))  # gossiped at once
    link.advance(link.now + 1.0)
    link.run(0, link.node(0).set_usage(link.now, 3, 9_000))  # ours now, gossiped when due
    assert link.node(0).peer_states()[node_id(0)].spend_micro == 9_000
    fx = link.node(0).join(link.now, [addr(1)])
    pulls = [m for s in fx.sends for m in opened(s.data) if isinstance(m, PushPull)]
    assert pulls
    ours = [st for st in pulls[0].states if st.node_id == node_id(0)]
    assert [st.spend_micro for st in ours] == [1_250]


def test_a_new_free_slot_count_alone_is_gossiped_at_most_every_refresh_interval() -> None:
    link = mesh(3)
    link.run(0, link.node(0).set_state(link.now, ("writer",), 4, 0, 0.0))
    link.advance(link.now + 2.0)
    ads = link.node(0).advertisements
    # The first new count goes out at once; the next waits for COUNT_REFRESH_INTERVAL.
    ads.advertise(("writer",), 3, 0, 0.0, gossip=False)
    link.run(0, link.node(0).tick(link.now))
    link.advance(link.now + 1.0)
    assert link.node(1).peer_states()[node_id(0)].free_slots == 3
    ads.advertise(("writer",), 2, 0, 0.0, gossip=False)
    link.run(0, link.node(0).tick(link.now))
    link.advance(link.now + COUNT_REFRESH_INTERVAL / 2)
    assert link.node(0).peer_states()[node_id(0)].free_slots == 2
    assert link.node(1).peer_states()[node_id(0)].free_slots == 3
    link.advance(link.now + COUNT_REFRESH_INTERVAL)
    for i in (1, 2):
        assert link.node(i).peer_states()[node_id(0)].free_slots == 2


def test_model_spend_and_breakers_ride_our_state_to_others() -> None:
    # Up to MAX_STATE_MODELS models with their spend and breaker (decision 54): a dashboard
    # at any peer shows the network's spend by model and every open breaker.
    link = mesh(3)
    link.run(0, link.node(0).set_state(link.now, ("writer",), 2, 0, 0.0))
    models = (
        ModelUsage("openai/gpt-4o", 5_000, Breaker.OPEN),
        ModelUsage("grapevine/offline", 0, Breaker.CLOSED),
    )
    link.run(0, link.node(0).set_usage(link.now, 1, 5_000, models))
    link.advance(link.now + 1.0)
    for i in (1, 2):
        seen = link.node(i).peer_states()[node_id(0)]
        assert (seen.spend_micro, seen.models) == (5_000, models)


@pytest.mark.parametrize(
    "models",
    [
        tuple(ModelUsage(f"m{n}", 0, Breaker.CLOSED) for n in range(MAX_STATE_MODELS + 1)),
        (ModelUsage("m", 0, Breaker.CLOSED), ModelUsage("m", 1, Breaker.OPEN)),
        (ModelUsage("", 0, Breaker.CLOSED),),
        (ModelUsage("m", -1, Breaker.CLOSED),),
        (ModelUsage("x" * (MAX_NAME_CHARS + 1), 0, Breaker.CLOSED),),
        (ModelUsage("m", 0, Breaker.CLOSED, tokens=-1),),
        (ModelUsage("m", 0, Breaker.CLOSED, waits=MAX_UINT + 1),),
    ],
)
def test_model_usage_the_wire_cannot_carry_is_refused(models: tuple[ModelUsage, ...]) -> None:
    with pytest.raises(LocalProtocolError):
        lone().set_usage(0.0, 1, 0, models)


def test_a_state_without_models_is_signed_and_encoded_as_before_them() -> None:
    # Decision 54 appends the models only when there are any: a state without them keeps
    # the ten fields (and the signed payload) of the states before, so mixed versions agree.
    plain = peer_state(1, 1, ("echo",), agents=1, spend_micro=3)
    assert len(msgpack.unpackb(encode_message(plain))) == 11  # kind + ten fields
    with_models = peer_state(1, 2, ("echo",), models=(ModelUsage("m", 1, Breaker.HALF_OPEN),))
    assert len(msgpack.unpackb(encode_message(with_models))) == 12
    assert decode_message(encode_message(with_models)) == with_models


def test_a_models_usage_travels_only_when_there_is_some_and_is_signed() -> None:
    # Decision 59: tokens, waits and calls waiting now follow [model, spend, breaker] only
    # when one is not 0, so an entry of decision 54's shape encodes and signs as before.
    idle = ModelUsage("m", 1, Breaker.CLOSED)
    busy = ModelUsage("m", 1, Breaker.CLOSED, tokens=1_500, waits=3, waiting=1)
    plain = peer_state(0, 1, ("echo",), models=(idle,))
    used = peer_state(0, 2, ("echo",), models=(busy,))
    assert msgpack.unpackb(encode_message(plain))[-1] == [["m", 1, 0]]
    assert msgpack.unpackb(encode_message(used))[-1] == [["m", 1, 0, 1_500, 3, 1]]
    assert decode_message(encode_message(used)) == used
    link = mesh(2)
    forged = replace(used, models=(replace(busy, waits=0),))  # signed with waits=3
    link.run(1, link.node(1).handle(link.now, addr(0), envelope(0, forged)))
    assert link.node(1).peer_states().get(node_id(0)) is None
    link.run(1, link.node(1).handle(link.now, addr(0), envelope(0, used)))
    assert link.node(1).peer_states()[node_id(0)].models == (busy,)


@pytest.mark.parametrize(
    "models",
    [
        [],  # present but empty: a state without models leaves the field out
        [["m", 1, 3]],  # no such breaker state
        [["m", 1, 0], ["m", 2, 0]],  # a model twice
        [["m", 1]],  # not [model, spend, breaker]
        [["", 1, 0]],  # no name
        [["m", -1, 0]],  # negative spend
        [["m", 1, 0, 0, 0, 0]],  # usage all 0: sent in the short form only
        [["m", 1, 0, 5, 1]],  # usage cut short
        [["m", 1, 0, 5, -1, 0]],  # negative waits
        [[f"m{n}", 0, 0] for n in range(MAX_STATE_MODELS + 1)],
    ],
)
def test_a_malformed_model_list_is_refused_by_the_decoder(models: list[object]) -> None:
    fields = msgpack.unpackb(encode_message(peer_state(1, 1, ("echo",))))
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb([*fields, models]))


RUNS = (9, 7, 1, 1, 1, 0, 1)


def test_run_counts_travel_after_the_models_and_are_signed() -> None:
    # Decision 64: run counts follow the models (an empty list when there are none) and only
    # when one is not 0, so a state without them encodes and signs as before.
    plain = peer_state(0, 1, ("echo",))
    counted = peer_state(0, 2, ("echo",), runs=RUNS)
    both = peer_state(0, 3, ("echo",), models=(ModelUsage("m", 1, Breaker.CLOSED),), runs=RUNS)
    assert len(msgpack.unpackb(encode_message(plain))) == 11
    assert msgpack.unpackb(encode_message(counted))[-2:] == [[], list(RUNS)]
    assert msgpack.unpackb(encode_message(both))[-2:] == [[["m", 1, 0]], list(RUNS)]
    assert [decode_message(encode_message(s)) for s in (counted, both)] == [counted, both]
    link = mesh(2)
    forged = replace(counted, runs=(9, 9, 0, 0, 0, 0, 0))  # signed with other counts
    link.run(1, link.node(1).handle(link.now, addr(0), envelope(0, forged)))
    assert link.node(1).peer_states().get(node_id(0)) is None
    link.run(1, link.node(1).handle(link.now, addr(0), envelope(0, counted)))
    assert link.node(1).peer_states()[node_id(0)].runs == RUNS


@pytest.mark.parametrize(
    "runs",
    [
        [0] * len(RUN_COUNTS),  # all 0: left out
        [1] * (len(RUN_COUNTS) - 1),  # one short
        [1] * (len(RUN_COUNTS) + 1),
        [1, -1, 0, 0, 0, 0, 0],
        [1, "x", 0, 0, 0, 0, 0],
        "1234567",
    ],
)
def test_malformed_run_counts_are_refused_by_the_decoder(runs: object) -> None:
    fields = msgpack.unpackb(encode_message(peer_state(1, 1, ("echo",))))
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb([*fields, [], runs]))


def test_a_peers_run_counts_reach_the_others_at_the_refresh_rate() -> None:
    link = mesh(3)
    link.run(0, link.node(0).set_state(link.now, ("writer",), 2, 0, 0.0))
    link.advance(link.now + 2.0)
    link.run(0, link.node(0).set_runs(link.now, RUNS))  # the first goes out at once
    link.advance(link.now + 1.0)
    assert [link.node(i).peer_states()[node_id(0)].runs for i in (1, 2)] == [RUNS, RUNS]
    later = (10, 8, 1, 1, 1, 0, 1)
    link.run(0, link.node(0).set_runs(link.now, later))
    link.advance(link.now + 1.0)
    assert link.node(0).peer_states()[node_id(0)].runs == later
    assert link.node(1).peer_states()[node_id(0)].runs == RUNS
    link.advance(link.now + COUNT_REFRESH_INTERVAL)
    assert link.node(1).peer_states()[node_id(0)].runs == later
    # No executions: no counts in the state.
    link.run(0, link.node(0).set_runs(link.now, (0,) * len(RUN_COUNTS)))
    assert link.node(0).peer_states()[node_id(0)].runs == ()


@pytest.mark.parametrize(
    "runs", [(1,) * (len(RUN_COUNTS) - 1), (-1, 0, 0, 0, 0, 0, 0), (MAX_UINT + 1, 0, 0, 0, 0, 0, 0)]
)
def test_run_counts_the_wire_cannot_carry_are_refused(runs: tuple[int, ...]) -> None:
    with pytest.raises(LocalProtocolError):
        lone().set_runs(0.0, runs)


@pytest.mark.parametrize("agents,spend", [(-1, 0), (0, -1), (MAX_UINT + 1, 0), (0, MAX_UINT + 1)])
def test_usage_out_of_the_wire_range_is_refused(agents: int, spend: int) -> None:
    with pytest.raises(LocalProtocolError):
        lone().set_usage(0.0, agents, spend)


def test_a_forged_usage_changes_nothing() -> None:
    node = lone()
    node.handle(0.0, addr(1), envelope(1, alive(1)))
    honest = peer_state(1, 1, ("echo",), agents=2, spend_micro=10)
    node.handle(0.1, addr(1), envelope(1, honest))
    forged = replace(peer_state(1, 2, ("echo",), agents=2, spend_micro=10), spend_micro=10**9)
    node.handle(0.2, addr(2), envelope(2, forged))
    assert node.peer_states()[node_id(1)] == honest


def test_peer_state_keeps_the_greatest_version() -> None:
    node = lone()
    node.handle(0.0, addr(1), envelope(1, alive(1)))
    newer = peer_state(1, 7, ("a",))
    older = peer_state(1, 6, ("b",))
    node.handle(0.1, addr(1), envelope(1, newer))
    node.handle(0.2, addr(1), envelope(1, older))
    assert node.peer_states()[node_id(1)] == newer
    newest = peer_state(1, 8, ("c",))
    node.handle(0.3, addr(1), envelope(1, newest))
    assert node.peer_states()[node_id(1)] == newest


def test_peer_state_of_unknown_member_waits_until_the_member_is_known() -> None:
    node = lone()
    state = peer_state(1, 1, ("echo",), 2)
    node.handle(0.0, addr(1), envelope(1, state))
    assert node_id(1) not in node.peer_states()
    node.handle(0.1, addr(2), envelope(2, state))  # a repeat is skipped as already seen
    node.handle(0.2, addr(2), envelope(2, alive(1)))
    assert node.peer_states()[node_id(1)] == state


def test_our_old_state_seen_again_is_superseded() -> None:
    node = lone()
    node.handle(0.0, addr(1), envelope(1, peer_state(0, 99, ("old",), 0)))
    assert node_id(0) not in node.peer_states()
    node.set_state(0.1, ("new",), 1, 0, 0.0)
    assert node.peer_states()[node_id(0)].version == 100


def test_state_versions_of_a_new_incarnation_beat_the_old_life() -> None:
    old = Node(lan(), signer(0), addr(0), random.Random(1), 0.0, incarnation=0)
    new = Node(lan(), signer(0), addr(0), random.Random(1), 0.0, incarnation=1)
    old.set_state(0.0, (), 0, 0, 0.0)
    new.set_state(0.0, (), 0, 0, 0.0)
    assert new.peer_states()[node_id(0)].order > old.peer_states()[node_id(0)].order


@pytest.mark.parametrize(
    "roles,free,queue,load",
    [
        (("r",) * 65, 0, 0, 0.0),
        (("",), 0, 0, 0.0),
        (("r" * 129,), 0, 0, 0.0),
        ((), -1, 0, 0.0),
        ((), 0, -1, 0.0),
        ((), 0, 0, -0.5),
        ((), 0, 0, float("nan")),
        ((), 0, 0, float("inf")),
    ],
)
def test_set_state_rejects_bad_arguments(
    roles: tuple[str, ...], free: int, queue: int, load: float
) -> None:
    node = lone()
    with pytest.raises(LocalProtocolError):
        node.set_state(0.0, roles, free, queue, load)
    assert node.peer_states() == {}


# Reconnect, reap.


def test_reconnect_contacts_dead_members() -> None:
    link = mesh(3)
    link.crash(2)
    while not link.notes_of(0, MemberDown):
        link.advance(link.now + 0.5)
    down = link.now
    link.advance(link.now + 2 * link.config.gossip.reconnect_interval)
    assert [t for t in link.sent(0, 2, PushPull) if t > down]


def test_reconnect_contacts_unreachable_seeds_and_heals() -> None:
    link = Link(2)
    link.crash(0)
    link.join(1)
    assert link.notes_of(1, JoinSucceeded) == []
    link.start(0)
    link.advance(link.now + 2 * link.config.gossip.reconnect_interval)
    assert link.sent(1, 0, PushPull)
    assert link.notes_of(1, JoinSucceeded) == [JoinSucceeded(addr(0), 2)]
    assert link.node(0).member(node_id(1)) is not None


def test_reap_forgets_dead_members_and_their_state() -> None:
    config = replace(lan(), swim=replace(SWIM, dead_retention=20.0, gossip_to_the_dead=5.0))
    link = mesh(3, config)
    link.run(2, link.node(2).set_state(link.now, ("r",), 1, 0, 0.0))
    link.advance(link.now + 1.0)
    assert node_id(2) in link.node(0).peer_states()
    link.crash(2)
    while not link.notes_of(0, MemberDown):
        link.advance(link.now + 0.5)
    down = link.node(0).member(node_id(2)).since  # type: ignore[union-attr]
    link.advance(down + 20.0)
    assert link.node(0).member(node_id(2)) is not None
    link.advance(down + 20.0 + 5.0)
    assert link.node(0).member(node_id(2)) is None
    assert node_id(2) not in link.node(0).peer_states()


# Determinism.


def _scenario(seed: int) -> list[object]:
    link = mesh(4, seed=seed)
    link.run(1, link.node(1).broadcast(link.now, "e", b"p"))
    link.crash(3)
    link.advance(link.now + 40.0)
    return [(a, fx.sends, fx.persists, fx.notes, fx.commands, fx.wake_at) for a, fx in link.effects]


def test_same_seed_gives_byte_identical_effects() -> None:
    assert _scenario(3) == _scenario(3)
    assert _scenario(3) != _scenario(4)
