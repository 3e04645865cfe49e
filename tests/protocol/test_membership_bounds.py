"""Membership that no single message can break: bounded incarnations and this peer's own
failure-detector verdicts (`confirmed_down`), one rule per test, on a recording port."""

from __future__ import annotations

import random

import pytest

from protocol.codec import decode_message, encode_message
from protocol.config import lan
from protocol.effects import Dropped, MemberDown, PersistKind
from protocol.identity import VerifiedCache
from protocol.membership import Membership
from protocol.wire import (
    INCARNATION_STEP,
    MAX_INCARNATION,
    MAX_UINT,
    Ack,
    Alive,
    Dead,
    MemberEntry,
    Ping,
    Status,
    Suspect,
)
from tests.protocol.fakes import RecordingPort, addr, alive, membership, node_id, probe, signer

CFG = lan()
ME = node_id(0)


def refuted_with(port: RecordingPort) -> int | None:
    """The incarnation of the alive record of ours gossiped, if any."""
    a = port.gossiped.get(("member", ME))
    return a.incarnation if isinstance(a, Alive) else None


def restartable(port: RecordingPort) -> None:
    """Every incarnation we persisted restarts (+1) to one the wire still carries."""
    for p in port.persists:
        if p.kind == PersistKind.INCARNATION:
            restarted = int.from_bytes(p.value, "big") + 1
            assert restarted <= MAX_UINT
            decode_message(encode_message(alive(0, restarted)))


# Incarnation bounds.


@pytest.mark.parametrize("claim", [MAX_UINT, MAX_INCARNATION, INCARNATION_STEP + 1])
def test_forged_suspicion_of_us_far_beyond_our_incarnation_is_dropped(claim: int) -> None:
    m, port = membership(members=2)
    m.dispatch(1.0, addr(1), Suspect(ME, claim, node_id(1)), b"")
    assert port.notes == [Dropped(addr(1), f"claim of incarnation {claim}, 0 known")]
    assert m.incarnation == 0 and refuted_with(port) is None and port.persists == []
    assert m.members[ME].status == Status.ALIVE


def test_suspicion_of_us_within_the_step_is_refuted_and_stays_encodable() -> None:
    m, port = membership(members=2)
    m.dispatch(1.0, addr(1), Suspect(ME, INCARNATION_STEP, node_id(1)), b"")
    assert m.incarnation == INCARNATION_STEP + 1 == refuted_with(port)
    restartable(port)


def test_refutation_at_the_top_of_the_range_never_exceeds_it() -> None:
    port = RecordingPort()
    top = MAX_INCARNATION - 1
    m = Membership(CFG, signer(0), addr(0), top, random.Random(1), VerifiedCache(), port)
    port.clear()
    m.dispatch(1.0, addr(1), Suspect(ME, top, node_id(1)), b"")
    assert m.incarnation == MAX_INCARNATION == refuted_with(port)
    restartable(port)
    port.clear()
    m.dispatch(2.0, addr(1), Dead(ME, MAX_INCARNATION, node_id(1)), b"")
    assert of_dropped(port) and m.incarnation == MAX_INCARNATION


def test_a_restart_above_the_range_starts_at_its_top() -> None:
    port = RecordingPort()
    m = Membership(
        CFG, signer(0), addr(0), MAX_INCARNATION + 1, random.Random(1), VerifiedCache(), port
    )
    assert m.incarnation == MAX_INCARNATION
    assert decode_message(encode_message(m.members[ME].alive)) == m.members[ME].alive
    restartable(port)


def test_forged_suspicion_of_a_member_far_beyond_its_incarnation_keeps_it_alive() -> None:
    m, port = membership(members=2)
    m.dispatch(1.0, addr(2), Suspect(node_id(1), 2**63 - 1, node_id(2)), b"")
    m.dispatch(1.0, addr(2), Dead(node_id(1), INCARNATION_STEP + 1, node_id(2)), b"")
    assert len(of_dropped(port)) == 2
    assert m.members[node_id(1)].status == Status.ALIVE
    assert m.members[node_id(1)].incarnation == 0
    assert port.gossiped == {}


def test_push_pull_rows_far_beyond_known_incarnations_are_dropped() -> None:
    m, port = membership(members=1)
    rows = (
        MemberEntry(alive(1), Status.DEAD, MAX_INCARNATION),
        MemberEntry(alive(0), Status.SUSPECT, INCARNATION_STEP + 1),
        MemberEntry(alive(3), Status.DEAD, INCARNATION_STEP + 1),  # new to us
    )
    m.merge(1.0, rows, addr(2))
    assert len(of_dropped(port)) == 3
    assert m.members[node_id(1)].status == Status.ALIVE and m.incarnation == 0
    assert node_id(3) not in m.members


def test_alive_record_above_the_range_is_dropped() -> None:
    m, port = membership(members=0)
    m.apply_alive(1.0, alive(1, MAX_INCARNATION + 1), addr(1), None)
    assert port.notes == [Dropped(addr(1), f"alive record above incarnation {MAX_INCARNATION}")]
    assert node_id(1) not in m.members


def of_dropped(port: RecordingPort) -> list[Dropped]:
    return [n for n in port.notes if isinstance(n, Dropped)]


# This peer's own verdicts.


def fail_probe(m: Membership, port: RecordingPort, now: float, target: int) -> None:
    """Probe until `target` is picked, then let the whole round pass unanswered."""
    for step in range(20):
        seq, picked = probe(m, port, now + step)
        if picked == node_id(target):
            m.probes.on_probe_timeout(now + step + 0.5, seq)
            m.probes.on_probe_round_end(now + step + 1.0, seq)
            return
        m.probes.on_ack(Ack(seq))
    pytest.fail("target never probed")


def test_a_death_declared_by_another_peer_is_not_confirmed_here() -> None:
    m, port = membership(members=3)
    m.dispatch(1.0, addr(2), Dead(node_id(1), 0, node_id(2)), b"")
    assert port.notes == [MemberDown(node_id(1), 0, left=False)]
    assert not m.confirmed_down(node_id(1))
    forged_leave = Dead(node_id(3), 0, node_id(3))
    m.dispatch(1.0, addr(2), forged_leave, b"")
    assert not m.confirmed_down(node_id(3))


def test_a_member_declared_dead_elsewhere_is_probed_here_and_confirmed_when_silent() -> None:
    m, port = membership(members=3)
    m.dispatch(1.0, addr(2), Dead(node_id(1), 0, node_id(2)), b"")
    port.clear()
    m.probes.on_probe_due(2.0)  # the first probe after the death rechecks the dead member
    ((dst, [ping, *_], _), *_) = port.sends
    assert dst == addr(1) and isinstance(ping, Ping) and ping.target == node_id(1)
    m.probes.on_probe_timeout(2.5, ping.seq)
    m.probes.on_probe_round_end(3.0, ping.seq)
    assert m.confirmed_down(node_id(1))
    assert port.confirmed_down == [node_id(1)]
    port.clear()
    m.probes.on_probe_due(3.0)
    m.probes.on_probe_due(4.0)
    assert all(dst != addr(1) for dst, _, _ in port.sends)  # checked once, not again


def test_an_answer_to_the_recheck_keeps_it_unconfirmed() -> None:
    m, port = membership(members=3)
    m.dispatch(1.0, addr(2), Dead(node_id(1), 0, node_id(2)), b"")
    seq, target = probe(m, port, 2.0)
    assert target == node_id(1)
    m.probes.on_ack(Ack(seq))
    m.probes.on_probe_round_end(3.0, seq)
    assert not m.confirmed_down(node_id(1)) and port.confirmed_down == []


def test_our_own_failed_probe_and_expired_suspicion_confirm_a_death() -> None:
    m, port = membership(members=3)
    fail_probe(m, port, 1.0, target=1)
    assert m.members[node_id(1)].status == Status.SUSPECT
    assert not m.confirmed_down(node_id(1))  # suspected, not down yet
    s = m.members[node_id(1)].suspicion
    assert s is not None
    m.on_suspicion_due(s.deadline, node_id(1), s.generation)
    assert m.members[node_id(1)].status == Status.DEAD
    assert m.confirmed_down(node_id(1))
    assert port.confirmed_down == []  # the MemberDown itself carries the confirmed verdict


def test_a_suspicion_raised_elsewhere_that_runs_out_here_is_confirmed() -> None:
    m, _ = membership(members=3)
    m.dispatch(1.0, addr(2), Suspect(node_id(1), 0, node_id(2)), b"")
    s = m.members[node_id(1)].suspicion
    assert s is not None
    m.on_suspicion_due(s.deadline, node_id(1), s.generation)
    assert m.confirmed_down(node_id(1))


def test_a_newer_alive_record_clears_our_verdict() -> None:
    m, port = membership(members=3)
    fail_probe(m, port, 1.0, target=1)
    s = m.members[node_id(1)].suspicion
    assert s is not None
    m.on_suspicion_due(s.deadline, node_id(1), s.generation)
    m.apply_alive(100.0, alive(1, 1), addr(1), None)
    m.dispatch(101.0, addr(2), Dead(node_id(1), 1, node_id(2)), b"")
    assert not m.confirmed_down(node_id(1))


def test_members_not_known_count_as_confirmed_and_we_never_do() -> None:
    m, _ = membership(members=1)
    assert m.confirmed_down(node_id(9))
    assert not m.confirmed_down(ME)
