"""The checker's own definitions, on small runs and hand-made notifications."""

from __future__ import annotations

from protocol.effects import EventReceived, MemberDown, MemberSuspected
from protocol.sim.checker import Checker
from protocol.sim.simulator import Simulator


def small(n: int = 5) -> tuple[Simulator, Checker]:
    sim = Simulator(n, seed=1)
    checker = Checker(sim)
    sim.start_all(0.01)
    sim.run_until(5.0)
    return sim, checker


def down(sim: Simulator, checker: Checker, observer: int, subject: int) -> None:
    node_id = sim.peers[subject].signer.node_id
    checker(sim.now, sim.peers[observer], MemberDown(node_id, 0, left=False))


def test_a_small_network_converges_and_the_diagnostic_counts_disagreements() -> None:
    _, checker = small()
    assert checker.converged() and checker.is_converged()
    checker.crash(4)
    report = checker.converged()
    assert not report and not checker.is_converged()
    assert (report.views, report.missing, report.not_alive, report.stale) == (4, 0, 0, 4)
    assert "4 stopped peers still up" in str(report)


def test_a_verdict_about_a_live_reachable_peer_is_false() -> None:
    sim, checker = small()
    down(sim, checker, 1, 2)
    checker(sim.now, sim.peers[1], MemberSuspected(sim.peers[3].signer.node_id, 0))
    assert [(v.observer, v.subject) for v in checker.false_positives] == [(1, 2)]
    assert [(v.observer, v.subject) for v in checker.false_suspicions] == [(1, 3)]


def test_verdicts_about_crashed_or_earlier_lives_or_near_partitions_are_not_false() -> None:
    sim, checker = small()
    checker.crash(2)
    down(sim, checker, 1, 2)
    checker.restart(2)
    node = sim.peers[2].node
    assert node is not None and node.incarnation > 0
    down(sim, checker, 1, 2)  # about incarnation 0, the life before the crash
    checker.partition([[0, 1], [2, 3, 4]])
    down(sim, checker, 1, 3)
    checker.heal()
    sim.run_until(sim.now + checker.evidence_window / 2)
    down(sim, checker, 4, 3)  # same side, but the verdict may come from across the cut
    assert len(checker.downs) == 4 and checker.false_positives == []
    sim.run_until(sim.now + checker.evidence_window)
    down(sim, checker, 4, 3)
    assert len(checker.false_positives) == 1


def test_detection_waits_for_every_survivor() -> None:
    sim, checker = small()
    checker.crash(3)
    assert checker.detection(0) is None
    for observer in (0, 1, 2):
        down(sim, checker, observer, 3)
    assert checker.detection(0) is None  # peer 4 has not declared it yet
    sim.run_until(sim.now + 1.5)
    down(sim, checker, 4, 3)
    assert checker.detection(0) == 1.5


def test_dissemination_fractions_over_the_peers_running_when_sent() -> None:
    sim, checker = small(4)
    origin, ltime, t0 = checker.broadcast(0, "e", b"")
    checker.crash(3)  # no longer a target
    sim.run_until(t0 + 10.0)
    spread = checker.dissemination(origin, ltime, (0.3, 1.0))
    assert (spread.target, spread.received, spread.missing) == (3, 3, 0)
    assert spread.seconds[0.3] == 0.0  # the origin delivers to itself at once
    assert spread.seconds[1.0] is not None and 0.0 < spread.seconds[1.0] < 2.0
    late = EventReceived(origin, ltime, "e", b"")
    checker(sim.now, sim.peers[1], late)  # a second delivery does not move the first
    assert checker.dissemination(origin, ltime, (1.0,)).seconds == {1.0: spread.seconds[1.0]}
