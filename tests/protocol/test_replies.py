"""Node-level boundaries: where answers go, how often a full state is sent to one address, and
signed peer states; driven through real `Node`s on a fake clock, one rule per test."""

from __future__ import annotations

import random
from dataclasses import replace

from protocol.codec import encode_message
from protocol.config import GossipConfig, NodeConfig, SwimConfig
from protocol.dissemination import PUSH_PULL_ANSWER_INTERVAL, UNKNOWN_SENDER
from protocol.effects import Dropped, Effects
from protocol.envelope import encode_envelope
from protocol.node import Node
from protocol.wire import (
    INCARNATION_STEP,
    Ack,
    Dead,
    IndirectPing,
    MemberEntry,
    Message,
    Nack,
    Ping,
    PushPull,
    Status,
    Suspect,
)
from tests.protocol.fakes import addr, alive, envelope, node_id, of_type, opened, peer_state, signer

QUIET = NodeConfig(
    swim=SwimConfig(gossip_to_the_dead=1000.0),
    gossip=GossipConfig(
        gossip_interval=1000.0, push_pull_interval=1000.0, reconnect_interval=1000.0
    ),
)


def lone() -> Node:
    return Node(QUIET, signer(0, QUIET.network_id), addr(0), random.Random(5), 0.0)


def knowing(*peers: int) -> Node:
    """Peer 0, already knowing `peers` at their own addresses."""
    node = lone()
    for i in peers:
        node.handle(0.0, addr(i), envelope(i, alive(i)))
    return node


def claiming(i: int, at: str, *messages: Message) -> bytes:
    """An envelope from peer `i` that claims to come from `at`."""
    return encode_envelope(node_id(i), at, [encode_message(m) for m in messages])


def destinations(fx: Effects) -> list[str]:
    return [s.addr for s in fx.sends]


# Replies go to the sender's known address.


def test_an_ack_goes_to_the_members_known_address_not_the_claimed_one() -> None:
    node = knowing(1)
    fx = node.handle(1.0, "10.9.9.9:1", claiming(1, "victim:1", Ping(7, node_id(0))))
    assert destinations(fx) == [addr(1)]
    assert Ack(7) in opened(fx.sends[0].data)


def test_an_unknown_senders_ping_gets_no_answer_and_is_counted() -> None:
    node = lone()
    before = node.port.dropped
    fx = node.handle(1.0, "10.9.9.9:1", claiming(1, "victim:1", Ping(7, node_id(0))))
    assert fx.sends == []
    assert fx.notes == [
        Dropped(UNKNOWN_SENDER + "victim:1", "no answer to a sender not known here")
    ]
    assert node.port.dropped == before + 1


def test_a_push_pull_answer_goes_to_the_known_address() -> None:
    node = knowing(1)
    fx = node.handle(1.0, "x", claiming(1, "victim:1", PushPull(False, False, (), ())))
    assert destinations(fx) == [addr(1)]
    assert any(isinstance(m, PushPull) and m.reply for m in opened(fx.sends[0].data))


def test_an_unknown_senders_anti_entropy_request_gets_no_answer() -> None:
    node = lone()
    fx = node.handle(1.0, "x", claiming(1, "victim:1", PushPull(False, False, (), ())))
    assert fx.sends == []
    assert of_type(fx.notes, Dropped)


def test_a_join_request_from_a_stranger_is_answered_at_the_claimed_address() -> None:
    node = lone()
    fx = node.handle(1.0, "x", claiming(1, "new:1", PushPull(True, False, (), ())))
    assert destinations(fx) == ["new:1"]


def test_a_joiner_that_introduces_itself_is_answered_at_its_signed_address() -> None:
    node = lone()
    hello = PushPull(True, False, (MemberEntry(alive(1), Status.ALIVE, 0),), ())
    fx = node.handle(1.0, "x", claiming(1, "victim:1", hello))
    assert destinations(fx) == [addr(1)]


def test_an_indirect_probe_pings_the_target_where_it_is_known() -> None:
    node = knowing(1, 2)
    request = IndirectPing(3, node_id(2), "victim:1")
    fx = node.handle(1.0, "x", claiming(1, "elsewhere:1", request))
    assert destinations(fx) == [addr(2)]
    assert any(isinstance(m, Ping) and m.target == node_id(2) for m in opened(fx.sends[0].data))


def test_an_indirect_probe_of_a_stranger_is_nacked_at_once() -> None:
    node = knowing(1)
    fx = node.handle(1.0, "x", envelope(1, IndirectPing(3, node_id(5), "victim:1")))
    assert destinations(fx) == [addr(1)]
    assert opened(fx.sends[0].data)[0] == Nack(3)


# Anti-entropy answers are rate-limited per address.


def test_push_pull_answers_are_rate_limited_per_address() -> None:
    node = knowing(1, 2)
    request = envelope(1, PushPull(False, False, (), ()))
    assert destinations(node.handle(1.0, "x", request)) == [addr(1)]
    again = node.handle(1.0 + PUSH_PULL_ANSWER_INTERVAL / 2, "x", request)
    assert again.sends == []
    assert again.notes == [Dropped(addr(1), "push-pull answer rate-limited")]
    other = node.handle(
        1.0 + PUSH_PULL_ANSWER_INTERVAL / 2, "x", envelope(2, PushPull(False, False, (), ()))
    )
    assert destinations(other) == [addr(2)]
    later = node.handle(1.0 + PUSH_PULL_ANSWER_INTERVAL, "x", request)
    assert destinations(later) == [addr(1)]


def test_join_answers_to_one_claimed_address_are_rate_limited_too() -> None:
    node = lone()
    joins = [claiming(i, "victim:1", PushPull(True, False, (), ())) for i in (1, 2, 3)]
    sent = [node.handle(1.0, "x", data).sends for data in joins]
    assert [len(s) for s in sent] == [1, 0, 0]


# Peer states are signed by their peer.


def test_a_peer_state_signed_by_another_key_is_dropped_and_counted() -> None:
    node = knowing(1, 2)
    forged = replace(peer_state(2, 5, ()), node_id=node_id(1))  # 2 speaks for 1
    before = node.port.dropped
    fx = node.handle(1.0, addr(2), envelope(2, forged))
    assert fx.notes == [Dropped(addr(2), "peer state with a bad signature")]
    assert node.port.dropped == before + 1
    assert node_id(1) not in node.peer_states()


def test_a_forged_high_version_cannot_pin_a_peers_advertisement() -> None:
    node = knowing(1, 2)
    node.handle(1.0, addr(1), envelope(1, peer_state(1, 3, ("writer",))))
    pin = replace(peer_state(1, 3, ("writer",)), version=2**63 - 1, roles=())
    node.handle(2.0, addr(2), envelope(2, pin))
    assert node.peer_states()[node_id(1)].roles == ("writer",)
    node.handle(3.0, addr(1), envelope(1, peer_state(1, 4, ("critic",))))
    assert node.peer_states()[node_id(1)].roles == ("critic",)


def test_a_peer_state_of_an_unknown_member_is_verified_once_it_is_known() -> None:
    node = knowing(2)
    forged = replace(peer_state(1, 5, ("writer",)), roles=("spy",))
    node.handle(1.0, addr(2), envelope(2, forged))
    fx = node.handle(2.0, addr(1), envelope(1, alive(1)))
    assert Dropped(addr(2), "peer state with a bad signature") in fx.notes
    assert node_id(1) not in node.peer_states()


def test_a_peer_state_from_an_incarnation_far_ahead_of_the_member_is_dropped() -> None:
    node = knowing(1)
    state = peer_state(1, 1, ("writer",), incarnation=INCARNATION_STEP + 1)
    fx = node.handle(1.0, addr(1), envelope(1, state))
    assert fx.notes == [Dropped(addr(1), "peer state with an incarnation beyond the member's")]
    assert node_id(1) not in node.peer_states()


def test_our_own_states_are_signed_and_verify_elsewhere() -> None:
    a, b = lone(), Node(QUIET, signer(1, QUIET.network_id), addr(1), random.Random(6), 0.0)
    b.handle(0.0, addr(0), envelope(0, alive(0)))
    fx = a.set_state(0.0, ("writer",), 2, 0, 0.0)
    state = a.peer_states()[node_id(0)]
    b.handle(0.5, addr(0), envelope(0, state))
    assert b.peer_states()[node_id(0)] == state
    assert not of_type(fx.notes, Dropped)


# A forged suspicion leaves a member alive, refutable and restartable.


def test_a_huge_forged_suspicion_is_dropped_and_we_stay_encodable() -> None:
    node = knowing(1)
    fx = node.handle(1.0, addr(1), envelope(1, Suspect(node_id(0), 2**63 - 1, node_id(1))))
    assert fx.persists == [] and node.incarnation == 0
    assert of_type(fx.notes, Dropped)
    restarted = Node(QUIET, signer(0, QUIET.network_id), addr(0), random.Random(5), 0.0, 1)
    assert restarted.incarnation == 1


# The task plane's failure-detector query.


def test_confirmed_down_needs_this_peers_own_probe_to_fail() -> None:
    node = knowing(1, 2)
    node.handle(0.5, addr(1), envelope(1, Dead(node_id(2), 0, node_id(1))))
    assert node.port.is_down(node_id(2)) and not node.port.confirmed_down(node_id(2))
    now, pinged = 0.5, False
    while not node.port.confirmed_down(node_id(2)) and now < 5.0:
        fx = node.tick(now)  # nothing answers: every probe of ours goes unanswered
        pinged = pinged or addr(2) in destinations(fx)
        assert fx.wake_at is not None
        now = fx.wake_at
    assert pinged and node.port.confirmed_down(node_id(2))
    assert now <= 0.5 + 3 * QUIET.swim.probe_interval
