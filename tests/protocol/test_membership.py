"""SWIM + Lifeguard rules of protocol/membership.py, one rule per test, on a recording port."""

from __future__ import annotations

import pytest

from protocol.config import lan, suspicion_min_timeout, suspicion_timeout
from protocol.effects import (
    Dropped,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    MemberSuspected,
    MemberUpdated,
)
from protocol.membership import Membership
from protocol.timers import SuspicionDue
from protocol.wire import Alive, Dead, IndirectPing, MemberEntry, Status, Suspect
from tests.protocol.fakes import RecordingPort, addr, alive, membership, node_id, of_type, probe

CFG = lan()
SWIM = CFG.swim
MIN = suspicion_min_timeout(SWIM.suspicion_mult, 5, SWIM.probe_interval)  # 4.0 s
MAX = MIN * SWIM.suspicion_max_timeout_mult  # 24.0 s
ME = node_id(0)


def suspect(m: Membership, port: RecordingPort, i: int, now: float, accuser: int = 1) -> None:
    m.apply_suspect(
        now, Suspect(node_id(i), m.members[node_id(i)].incarnation, node_id(accuser)), None
    )


def suspicion_timers(port: RecordingPort, i: int) -> list[float]:
    return [at for at, t in port.timers if isinstance(t, SuspicionDue) and t.node_id == node_id(i)]


# Suspicion.


def test_suspicion_starts_at_max_and_declares_dead_exactly_at_deadline() -> None:
    m, port = membership(members=4)
    suspect(m, port, 1, 10.0, accuser=0)
    ((at, timer),) = port.timers
    assert at == 10.0 + MAX == 34.0
    assert timer == SuspicionDue(node_id(1), m.members[node_id(1)].suspicion.generation)  # type: ignore[union-attr]
    port.clear()
    m.on_suspicion_due(at - 0.001, node_id(1), timer.generation)
    assert port.notes == [] and port.timers == [(at, timer)]
    m.on_suspicion_due(at, node_id(1), timer.generation)
    assert port.notes == [MemberDown(node_id(1), 0, left=False)]
    assert m.members[node_id(1)].status == Status.DEAD
    assert port.gossiped[("member", node_id(1))] == Dead(node_id(1), 0, ME)
    assert m.alive_count() == 4


def test_small_cluster_suspicion_uses_min_timeout() -> None:
    m, port = membership(members=2)  # n = 3: too few peers to confirm anything
    suspect(m, port, 1, 10.0, accuser=0)
    assert suspicion_timers(port, 1) == [10.0 + suspicion_min_timeout(4, 3, 1.0)]


def test_confirmations_from_distinct_accusers_shorten_suspicion() -> None:
    m, port = membership(members=4)
    suspect(m, port, 1, 10.0, accuser=0)
    port.clear()
    suspect(m, port, 1, 11.0, accuser=2)
    one = 10.0 + suspicion_timeout(MIN, MAX, 2, 1)
    assert suspicion_timers(port, 1) == [one]
    assert port.gossiped[("member", node_id(1))] == Suspect(node_id(1), 0, node_id(2))
    port.clear()
    suspect(m, port, 1, 12.0, accuser=2)
    suspect(m, port, 1, 12.0, accuser=0)
    assert port.timers == [] and port.gossiped == {}
    suspect(m, port, 1, 12.0, accuser=3)
    assert suspicion_timers(port, 1) == [10.0 + MIN]
    assert port.notes == []


def test_stale_suspicion_timer_is_ignored() -> None:
    m, port = membership(members=4)
    suspect(m, port, 1, 10.0)
    gen = port.timers[0][1].generation  # type: ignore[union-attr]
    m.apply_alive(11.0, alive(1, 1), addr(1), None)
    suspect(m, port, 1, 12.0)
    port.clear()
    m.on_suspicion_due(34.0, node_id(1), gen)
    assert port.notes == [] and m.members[node_id(1)].status == Status.SUSPECT


# Refutation and incarnations.


@pytest.mark.parametrize("accusation", [Suspect(ME, 0, node_id(1)), Dead(ME, 0, node_id(1))])
def test_refutation_bumps_incarnation_persists_and_gossips_alive(
    accusation: Suspect | Dead,
) -> None:
    m, port = membership(members=1)
    if isinstance(accusation, Suspect):
        m.apply_suspect(5.0, accusation, None)
    else:
        m.apply_dead(5.0, accusation, None)
    assert m.incarnation == 1
    assert port.persists[-1].kind == "incarnation"
    assert port.persists[-1].value == (1).to_bytes(8, "big")
    refuted = port.gossiped[("member", ME)]
    assert isinstance(refuted, Alive) and refuted.incarnation == 1 and refuted.node_id == ME
    assert m.awareness.score == 1 and m.false_refutations == 1
    assert m.members[ME].status == Status.ALIVE


def test_refutation_jumps_above_the_accused_incarnation() -> None:
    m, _ = membership()
    m.apply_suspect(5.0, Suspect(ME, 9, node_id(1)), None)
    assert m.incarnation == 10


def test_accusation_of_an_older_incarnation_is_not_refuted() -> None:
    m, port = membership()
    m.apply_suspect(5.0, Suspect(ME, 0, node_id(1)), None)
    port.clear()
    m.apply_suspect(6.0, Suspect(ME, 0, node_id(2)), None)
    m.apply_dead(6.0, Dead(ME, 0, node_id(2)), None)
    assert m.incarnation == 1 and port.persists == []


def test_alive_about_us_with_higher_incarnation_is_refuted() -> None:
    m, _ = membership()
    m.apply_alive(5.0, alive(0, 3, at="elsewhere:1"), addr(2), None)
    assert m.incarnation == 4
    assert m.members[ME].alive.addr == addr(0)


def test_higher_alive_clears_suspicion_as_member_updated() -> None:
    m, port = membership(members=4)
    suspect(m, port, 1, 10.0)
    port.clear()
    m.apply_alive(11.0, alive(1, 1), addr(1), None)
    assert port.notes == [MemberUpdated(node_id(1), addr(1), 1)]
    member = m.members[node_id(1)]
    assert member.status == Status.ALIVE and member.incarnation == 1 and member.suspicion is None
    assert port.gossiped[("member", node_id(1))] == alive(1, 1)


def test_higher_alive_revives_dead_member_as_recovered() -> None:
    m, port = membership(members=4)
    m.apply_dead(10.0, Dead(node_id(1), 0, node_id(2)), None)
    assert m.alive_count() == 4
    port.clear()
    m.apply_alive(11.0, alive(1, 1), addr(1), None)
    assert port.notes == [MemberRecovered(node_id(1), addr(1), 1)]
    assert m.alive_count() == 5


def test_alive_same_incarnation_does_not_override_suspect() -> None:
    m, port = membership(members=4)
    suspect(m, port, 1, 10.0)
    port.clear()
    m.apply_alive(11.0, alive(1, 0), addr(1), None)
    assert m.members[node_id(1)].status == Status.SUSPECT and port.notes == []


def test_old_alive_is_ignored() -> None:
    m, port = membership(members=1)
    m.apply_alive(1.0, alive(1, 2), addr(1), None)
    port.clear()
    m.apply_alive(2.0, alive(1, 1, at="moved:1"), addr(1), None)
    assert port.notes == [] and port.gossiped == {}
    assert m.members[node_id(1)].addr == addr(1)


def test_suspect_of_older_incarnation_is_ignored() -> None:
    m, port = membership(members=1)
    m.apply_alive(1.0, alive(1, 2), addr(1), None)
    port.clear()
    m.apply_suspect(2.0, Suspect(node_id(1), 1, node_id(2)), None)
    assert m.members[node_id(1)].status == Status.ALIVE and port.notes == []


def test_suspect_of_current_or_newer_incarnation_overrides_alive() -> None:
    m, port = membership(members=2)
    m.apply_suspect(2.0, Suspect(node_id(1), 0, node_id(2)), None)
    m.apply_suspect(2.0, Suspect(node_id(2), 5, node_id(1)), None)
    assert port.notes == [MemberSuspected(node_id(1), 0), MemberSuspected(node_id(2), 5)]


def test_dead_overrides_suspect_of_same_incarnation() -> None:
    m, port = membership(members=4)
    suspect(m, port, 1, 10.0)
    port.clear()
    m.apply_dead(11.0, Dead(node_id(1), 0, node_id(2)), None)
    assert port.notes == [MemberDown(node_id(1), 0, left=False)]
    assert m.members[node_id(1)].suspicion is None


def test_dead_of_older_incarnation_is_ignored() -> None:
    m, port = membership(members=1)
    m.apply_alive(1.0, alive(1, 2), addr(1), None)
    port.clear()
    m.apply_dead(2.0, Dead(node_id(1), 1, node_id(2)), None)
    assert m.members[node_id(1)].status == Status.ALIVE and port.notes == []


def test_suspect_of_dead_member_is_ignored() -> None:
    m, port = membership(members=4)
    m.apply_dead(10.0, Dead(node_id(1), 0, node_id(2)), None)
    port.clear()
    m.apply_suspect(11.0, Suspect(node_id(1), 0, node_id(3)), None)
    m.apply_dead(11.0, Dead(node_id(1), 0, node_id(3)), None)
    assert m.members[node_id(1)].status == Status.DEAD and port.notes == []


def test_news_about_unknown_members_is_ignored() -> None:
    m, port = membership()
    m.apply_suspect(1.0, Suspect(node_id(5), 0, node_id(6)), None)
    m.apply_dead(1.0, Dead(node_id(5), 0, node_id(6)), None)
    assert list(m.members) == [ME] and port.notes == [] and port.gossiped == {}


# Join, leave.


def test_new_member_is_noted_gossiped_and_probed() -> None:
    m, port = membership()
    m.apply_alive(1.0, alive(1), addr(1), None)
    assert port.notes == [MemberJoined(node_id(1), addr(1), 0)]
    assert port.gossiped[("member", node_id(1))] == alive(1)
    assert m.alive_count() == 2
    assert probe(m, port, 2.0)[1] == node_id(1)


def test_leave_is_recorded_as_left() -> None:
    m, port = membership(members=2)
    m.apply_dead(5.0, Dead(node_id(1), 0, node_id(1)), None)
    assert port.notes == [MemberDown(node_id(1), 0, left=True)]
    assert m.members[node_id(1)].status == Status.LEFT
    assert m.alive_count() == 2


def test_leaving_member_does_not_refute() -> None:
    m, port = membership(members=1)
    assert m.leave() is not None
    assert port.gossiped[("member", ME)] == Dead(ME, 0, ME)
    port.clear()
    m.apply_suspect(5.0, Suspect(ME, 0, node_id(1)), None)
    m.apply_dead(5.0, Dead(ME, 0, node_id(1)), None)
    assert m.incarnation == 0 and port.persists == [] and port.gossiped == {}


# Push-pull merge.


def entry(i: int, status: Status, incarnation: int = 0) -> MemberEntry:
    return MemberEntry(alive(i, incarnation), status, incarnation)


def test_merge_learns_new_members_and_regossips_them() -> None:
    m, port = membership()
    m.merge(1.0, (entry(1, Status.ALIVE), entry(2, Status.ALIVE)), addr(1))
    assert of_type(port.notes, MemberJoined) == [
        MemberJoined(node_id(1), addr(1), 0),
        MemberJoined(node_id(2), addr(2), 0),
    ]
    assert port.gossiped == {("member", node_id(i)): alive(i) for i in (1, 2)}


def test_merge_of_what_we_already_know_changes_nothing() -> None:
    m, port = membership(members=2)
    m.merge(1.0, (entry(0, Status.ALIVE), entry(1, Status.ALIVE), entry(2, Status.ALIVE)), addr(1))
    assert port.notes == [] and port.gossiped == {} and port.persists == []


def test_merge_gossips_updates_to_known_members() -> None:
    m, port = membership(members=1)
    m.merge(1.0, (entry(1, Status.ALIVE, 3),), addr(1))
    assert port.notes == [MemberUpdated(node_id(1), addr(1), 3)]
    assert port.gossiped[("member", node_id(1))] == alive(1, 3)


def test_merge_treats_remote_dead_as_suspect() -> None:
    m, port = membership(members=4)
    m.merge(1.0, (entry(1, Status.DEAD),), addr(2))
    assert port.notes == [MemberSuspected(node_id(1), 0)]
    assert m.members[node_id(1)].status == Status.SUSPECT
    assert suspicion_timers(port, 1) == [1.0 + MAX]


def test_merge_applies_remote_left_as_left() -> None:
    m, port = membership(members=4)
    m.merge(1.0, (entry(1, Status.LEFT),), addr(2))
    assert port.notes == [MemberDown(node_id(1), 0, left=True)]


def test_merge_records_unknown_departed_members_without_notes() -> None:
    m, port = membership()
    m.merge(1.0, (entry(1, Status.DEAD, 2), entry(2, Status.LEFT)), addr(3))
    assert m.members[node_id(1)].status == Status.DEAD
    assert m.members[node_id(1)].incarnation == 2
    assert m.members[node_id(2)].status == Status.LEFT
    assert port.notes == [] and port.gossiped == {}
    assert m.alive_count() == 1


def test_merge_of_our_own_death_is_refuted() -> None:
    m, _ = membership()
    m.merge(1.0, (entry(0, Status.DEAD),), addr(3))
    assert m.incarnation == 1


# Signatures.


@pytest.mark.parametrize(
    "forged",
    [
        # The alive record of peer 1, signed by peer 2.
        Alive(alive(1).public_key, addr(1), 0, alive(2).sig, node_id(1)),
        # Signed by peer 1, but for another network.
        alive(1, network_id=b"another-network"),
        # Signed by peer 1, then moved to another address.
        Alive(alive(1).public_key, "evil:1", 0, alive(1).sig, node_id(1)),
        # Signed by peer 1, then given a higher incarnation.
        Alive(alive(1).public_key, addr(1), 5, alive(1).sig, node_id(1)),
    ],
    ids=["other-key", "other-network", "tampered-addr", "tampered-incarnation"],
)
def test_forged_alive_is_dropped_without_state_change(forged: Alive) -> None:
    m, port = membership()
    m.apply_alive(1.0, forged, addr(7), None)
    m.merge(
        1.0, (MemberEntry(forged, Status.ALIVE, 0), MemberEntry(forged, Status.DEAD, 0)), addr(7)
    )
    assert list(m.members) == [ME]
    assert port.notes == [Dropped(addr(7), "alive record with a bad signature")] * 3
    assert port.gossiped == {}


def test_forged_update_of_known_member_is_dropped() -> None:
    m, port = membership(members=1)
    forged = Alive(alive(1).public_key, "evil:1", 1, alive(1).sig, node_id(1))
    m.apply_alive(1.0, forged, addr(7), None)
    assert m.members[node_id(1)].addr == addr(1) and m.members[node_id(1)].incarnation == 0
    assert of_type(port.notes, Dropped) and port.gossiped == {}


# Reaping, stalls.


def test_reap_forgets_departed_members_after_retention() -> None:
    m, _ = membership(members=3)
    m.apply_dead(10.0, Dead(node_id(1), 0, node_id(2)), None)
    m.apply_dead(20.0, Dead(node_id(2), 0, node_id(2)), None)
    retention = SWIM.dead_retention
    assert m.reap(10.0 + retention) == []
    assert m.reap(10.0 + retention + 0.001) == [node_id(1)]
    assert node_id(1) not in m.members and node_id(2) in m.members
    assert m.reap(20.0 + retention + 0.001) == [node_id(2)]
    assert sorted(m.members) == sorted([ME, node_id(3)])
    assert m.alive_count() == 2


def test_stall_restarts_suspicions_and_maxes_awareness() -> None:
    m, port = membership(members=4)
    suspect(m, port, 1, 10.0)
    port.clear()
    m.on_stall(100.0)
    assert m.awareness.score == SWIM.awareness_max_multiplier - 1
    assert suspicion_timers(port, 1) == [100.0 + MAX]
    gen = port.timers[0][1].generation  # type: ignore[union-attr]
    port.clear()
    m.on_suspicion_due(100.0, node_id(1), gen)  # the stale 34.0 timer firing late
    assert port.notes == [] and port.timers == [(100.0 + MAX, SuspicionDue(node_id(1), gen))]


def test_stall_forgets_running_probe_and_relays() -> None:
    m, port = membership(members=4)
    seq, target = probe(m, port, 10.0)
    m.probes.on_indirect_ping(10.1, addr(2), IndirectPing(9, node_id(3), addr(3)))
    relay_seq = port.timers[-1][1].seq  # type: ignore[union-attr]
    m.on_stall(100.0)
    port.clear()
    m.probes.on_probe_timeout(100.0, seq)
    m.probes.on_probe_round_end(100.0, seq)
    m.probes.on_relay_timeout(relay_seq)
    assert port.sends == [] and port.notes == []
    assert m.members[target].status == Status.ALIVE
