"""The SWIM probe cycle of protocol/probing.py, one rule per test, on a recording port.

The prober runs inside a bare `Membership` (which owns it), so a silent target is suspected by
the real membership rules.
"""

from __future__ import annotations

from protocol.config import lan
from protocol.effects import Dropped, MemberSuspected
from protocol.probing import RELAY_TIMEOUT_FRACTION
from protocol.timers import ProbeDue, ProbeRoundEnd, ProbeTimeout, RelayTimeout
from protocol.wire import Ack, Dead, IndirectPing, Nack, Ping, Status, Suspect
from tests.protocol.fakes import addr, membership, node_id, probe

CFG = lan()
SWIM = CFG.swim
ME = node_id(0)


# Probing.


def test_probe_pings_a_member_and_arms_timeout_and_next_probe_exactly() -> None:
    m, port = membership(members=4)
    seq, target = probe(m, port, 10.0)
    dst, msgs, piggyback = port.sends[0]
    assert dst == m.members[target].addr and piggyback
    assert msgs == [Ping(seq, target)]
    assert sorted(port.timers, key=lambda x: x[0]) == [
        (10.0 + SWIM.probe_timeout, ProbeTimeout(seq)),
        (10.0 + SWIM.probe_interval, ProbeDue()),
    ]


def test_probe_round_robin_visits_every_member_once_per_round() -> None:
    m, port = membership(members=4)
    targets = [probe(m, port, float(t))[1] for t in range(4)]
    assert sorted(targets) == sorted(node_id(i) for i in range(1, 5))


def test_ack_ends_probe_and_lowers_awareness() -> None:
    m, port = membership(members=4)
    m.awareness.apply(2)
    seq, target = probe(m, port, 10.0)
    m.probes.on_ack(Ack(seq))
    assert m.awareness.score == 1
    port.clear()
    m.probes.on_probe_timeout(10.5, seq)
    m.probes.on_probe_round_end(11.0, seq)
    assert port.sends == [] and port.timers == [] and port.notes == []
    assert m.members[target].status == Status.ALIVE


def test_ack_with_unknown_seq_changes_nothing() -> None:
    m, port = membership(members=4)
    seq, _ = probe(m, port, 10.0)
    m.awareness.apply(3)
    m.probes.on_ack(Ack(seq + 100))
    m.probes.on_nack(Nack(seq + 100))
    assert m.awareness.score == 3


def test_no_ack_by_probe_timeout_sends_indirect_pings_to_k_members() -> None:
    m, port = membership(members=5)
    seq, target = probe(m, port, 10.0)
    port.clear()
    m.probes.on_probe_timeout(10.5, seq)
    helpers = [dst for dst, msgs, _ in port.sends]
    assert len(helpers) == SWIM.indirect_checks == len(set(helpers))
    assert m.members[target].addr not in helpers
    for _, msgs, piggyback in port.sends:
        assert msgs == [IndirectPing(seq, target, m.members[target].addr)] and not piggyback
    assert port.timers == [(10.0 + SWIM.probe_interval, ProbeRoundEnd(seq))]


def test_indirect_helpers_are_alive_members_only() -> None:
    m, port = membership(members=3)
    seq, target = probe(m, port, 10.0)
    other = next(n for n in (node_id(i) for i in (1, 2, 3)) if n != target)
    m.apply_suspect(10.1, Suspect(other, 0, node_id(4)), None)
    port.clear()
    m.probes.on_probe_timeout(10.5, seq)
    assert len(port.sends) == 1
    assert port.sends[0][0] not in (m.members[target].addr, m.members[other].addr)


def test_no_ack_by_interval_end_suspects_target() -> None:
    m, port = membership(members=4)
    seq, target = probe(m, port, 10.0)
    m.probes.on_probe_timeout(10.5, seq)
    port.clear()
    m.probes.on_probe_round_end(11.0, seq)
    assert port.notes == [MemberSuspected(target, 0)]
    assert m.members[target].status == Status.SUSPECT
    assert port.gossiped[("member", target)] == Suspect(target, 0, ME)


def test_next_probe_concludes_an_unanswered_probe() -> None:
    # The round end and the next ProbeDue fall on the same instant; the probe must still count.
    m, port = membership(members=4)
    seq, target = probe(m, port, 10.0)
    m.probes.on_probe_timeout(10.5, seq)
    port.clear()
    m.probes.on_probe_due(11.0)
    assert port.notes == [MemberSuspected(target, 0)]
    m.probes.on_probe_round_end(11.0, seq)
    assert port.notes == [MemberSuspected(target, 0)]


def test_next_probe_after_an_ack_suspects_nobody() -> None:
    m, port = membership(members=4)
    seq, _ = probe(m, port, 10.0)
    m.probes.on_ack(Ack(seq))
    port.clear()
    m.probes.on_probe_due(11.0)
    assert port.notes == []


def test_missed_nacks_raise_awareness_received_nacks_do_not() -> None:
    m, port = membership(members=5)
    seq, _ = probe(m, port, 10.0)
    m.probes.on_probe_timeout(10.5, seq)
    m.probes.on_nack(Nack(seq))
    m.probes.on_probe_round_end(11.0, seq)
    assert m.awareness.score == SWIM.indirect_checks - 1


def test_failed_probe_without_helpers_raises_awareness_by_one() -> None:
    m, port = membership(members=1)
    seq, _ = probe(m, port, 10.0)
    m.probes.on_probe_timeout(10.5, seq)
    assert len(port.sends) == 1  # only the ping: nobody to ask
    m.probes.on_probe_round_end(11.0, seq)
    assert m.awareness.score == 1


def test_awareness_scales_probe_interval_and_timeout() -> None:
    m, port = membership(members=4)
    m.awareness.apply(2)
    seq, _ = probe(m, port, 10.0)
    assert sorted(port.timers, key=lambda x: x[0]) == [
        (10.0 + 3 * SWIM.probe_timeout, ProbeTimeout(seq)),
        (10.0 + 3 * SWIM.probe_interval, ProbeDue()),
    ]


def test_probe_of_suspect_member_tells_it_so() -> None:
    m, port = membership(members=1)
    m.apply_suspect(5.0, Suspect(node_id(1), m.members[node_id(1)].incarnation, node_id(2)), None)
    _, target = probe(m, port, 10.0)
    assert port.sends[0][1][1] == Suspect(target, 0, ME)


def test_ping_is_acked_to_sender() -> None:
    m, port = membership()
    m.probes.on_ping(addr(3), Ping(42, ME))
    assert port.sends == [(addr(3), [Ack(42)], True)]


def test_ping_from_a_member_held_dead_is_acked_with_its_death_first() -> None:
    m, port = membership(members=4)
    prober = m.members[node_id(3)]
    m.apply_dead(5.0, Dead(node_id(3), prober.incarnation, node_id(2)), None)
    port.clear()
    m.dispatch(6.0, addr(3), Ping(42, ME), b"", node_id(3))
    assert port.sends == [(addr(3), [Dead(node_id(3), prober.incarnation, ME), Ack(42)], True)]


def test_ping_from_a_member_alive_or_left_is_acked_alone() -> None:
    m, port = membership(members=4)
    m.apply_dead(5.0, Dead(node_id(2), 0, node_id(2)), None)  # left
    port.clear()
    m.dispatch(6.0, addr(2), Ping(1, ME), b"", node_id(2))
    m.dispatch(6.0, addr(3), Ping(2, ME), b"", node_id(3))
    assert port.sends == [(addr(2), [Ack(1)], True), (addr(3), [Ack(2)], True)]


def test_ping_for_another_node_id_is_dropped() -> None:
    m, port = membership()
    m.probes.on_ping(addr(3), Ping(42, node_id(9)))
    assert port.sends == []
    assert port.notes == [Dropped(addr(3), "ping addressed to another node id")]


# Indirect probing, from the helper's side.


def test_indirect_helper_pings_target_and_relays_ack() -> None:
    m, port = membership(members=2)
    m.probes.on_indirect_ping(20.0, addr(1), IndirectPing(7, node_id(2), addr(2)))
    ((dst, [ping], _),) = port.sends
    assert dst == addr(2) and isinstance(ping, Ping) and ping.target == node_id(2)
    expected = 20.0 + RELAY_TIMEOUT_FRACTION * SWIM.probe_timeout
    assert port.timers == [(expected, RelayTimeout(ping.seq))]
    port.clear()
    m.probes.on_ack(Ack(ping.seq))
    assert port.sends == [(addr(1), [Ack(7)], False)]
    port.clear()
    m.probes.on_relay_timeout(ping.seq)
    assert port.sends == []


def test_indirect_helper_nacks_after_its_timeout() -> None:
    m, port = membership(members=2)
    m.probes.on_indirect_ping(20.0, addr(1), IndirectPing(7, node_id(2), addr(2)))
    relay_seq = port.timers[0][1].seq  # type: ignore[union-attr]
    port.clear()
    m.probes.on_relay_timeout(relay_seq)
    assert port.sends == [(addr(1), [Nack(7)], False)]
    port.clear()
    m.probes.on_ack(Ack(relay_seq))  # too late: nothing left to relay
    assert port.sends == []


def test_indirect_ping_naming_us_is_acked_directly() -> None:
    m, port = membership(members=1)
    m.probes.on_indirect_ping(20.0, addr(1), IndirectPing(7, ME, addr(0)))
    assert port.sends == [(addr(1), [Ack(7)], False)]
    assert port.timers == []
