"""The issue's simulated guarantees, each on a seeded run of the real protocol.

Bounds are the protocol's own formulas with slack, not tuned to a seed: detection within the
maximum suspicion timeout plus a few probe rounds, dissemination within Serf's ~3 s at 1,000
peers, a healed partition merged within three minutes (reconnect runs every 30 s).
"""

from __future__ import annotations

import functools

import pytest

from protocol.config import suspicion_min_timeout
from protocol.sim.checker import Checker
from protocol.sim.network import LinkModel
from protocol.sim.simulator import Simulator
from protocol.wire import Status


def converge(sim: Simulator, checker: Checker, limit: float, suspect_ok: bool = False) -> float:
    """Run until the views agree; return the virtual time it took (fails past `limit`)."""
    start = sim.now
    while sim.now - start < limit:
        sim.run_until(sim.now + 0.5)
        if checker.is_converged(suspect_ok):
            return sim.now - start
    pytest.fail(f"no convergence within {limit} s: {checker.converged(suspect_ok)}")


def joined(n: int, seed: int, link: LinkModel | None = None) -> tuple[Simulator, Checker]:
    sim = Simulator(n, seed, link=link)
    checker = Checker(sim)
    sim.start_all(min(0.01, 10.0 / n))
    sim.run_until(min(10.0, 0.01 * n))
    converge(sim, checker, 60.0)
    return sim, checker


def min_timeout(sim: Simulator) -> float:
    swim = sim.config.swim
    return suspicion_min_timeout(swim.suspicion_mult, len(sim.peers), swim.probe_interval)


@pytest.mark.slow
def test_thousand_peers_join_through_one_seed_and_a_broadcast_reaches_all() -> None:
    sim, checker = joined(1000, seed=1)
    assert sim.now < 40.0
    assert checker.downs == [] and checker.suspicions == []

    origin, ltime, _ = checker.broadcast(517, "news", b"to everyone")
    sim.run_until(sim.now + 10.0)
    spread = checker.dissemination(origin, ltime)
    assert spread.target == 1000 and spread.missing == 0
    reached_all = spread.seconds[1.0]
    assert reached_all is not None and reached_all < 3.0


def test_three_crashes_among_200_are_detected_by_every_survivor() -> None:
    sim, checker = joined(200, seed=2)
    for i, victim in enumerate((13, 77, 150)):
        sim.at(sim.now + 1.0 + 2.0 * i, functools.partial(checker.crash, victim))
    sim.run_until(sim.now + 60.0)
    swim = sim.config.swim
    bound = min_timeout(sim) * swim.suspicion_max_timeout_mult + 3 * swim.probe_interval
    detections = [checker.detection(k) for k in range(3)]
    assert all(d is not None and d < bound for d in detections), detections
    assert checker.false_positives == []
    assert checker.converged()


@pytest.mark.slow
def test_no_false_positives_among_100_peers_at_20_percent_loss_for_ten_minutes() -> None:
    sim = Simulator(100, seed=3, link=LinkModel(loss=0.2))
    checker = Checker(sim)
    sim.start_all(0.01)
    sim.run_until(600.0)
    assert len(checker.suspicions) > 1000  # the loss is real: many suspicions, all refuted
    assert checker.false_positives == []


def test_a_partition_splits_the_views_and_heals_into_one() -> None:
    sim, checker = joined(100, seed=4)
    left, right = list(range(0, 100, 2)), list(range(1, 100, 2))
    checker.partition([left, right])
    sim.run_until(sim.now + 90.0)
    for a, b in ((left, right), (right, left)):
        for i in a:
            node = sim.peers[i].node
            assert node is not None
            for j in b:
                m = node.member(sim.peers[j].signer.node_id)
                assert m is not None and m.status == Status.DEAD, (i, j)
            for j in a:
                if j != i:
                    m = node.member(sim.peers[j].signer.node_id)
                    assert m is not None and m.status == Status.ALIVE, (i, j)
    assert checker.false_positives == []

    checker.heal()
    converge(sim, checker, 180.0)
    assert checker.false_positives == []


def test_a_pause_below_the_detection_time_gets_nobody_declared_dead() -> None:
    sim, checker = joined(100, seed=5)
    stall = sim.config.swim.stall_threshold
    length = (stall + min_timeout(sim)) / 2  # a stall the peer notices, below detection
    assert stall < length < min_timeout(sim)
    paused = 42
    checker.pause(paused, length)
    sim.run_until(sim.now + length + 60.0)
    assert [p for _, p, _ in checker.stalls] == [paused]
    assert checker.downs == []  # neither of the paused peer, nor by it
    assert checker.converged()


def test_a_restarted_peer_comes_back_with_a_higher_incarnation() -> None:
    sim, checker = joined(50, seed=6)
    victim = 9
    node_id = sim.peers[victim].signer.node_id
    before = sim.peers[victim].node
    assert before is not None
    old = before.incarnation
    checker.crash(victim)
    sim.run_until(sim.now + 40.0)
    assert checker.detection(0) is not None
    checker.restart(victim)
    restarted = sim.peers[victim].node
    assert restarted is not None and restarted.incarnation > old
    converge(sim, checker, 60.0)
    for p in sim.peers:
        if p.index != victim:
            assert p.node is not None
            m = p.node.member(node_id)
            assert m is not None and m.status == Status.ALIVE
            assert m.incarnation == restarted.incarnation
    assert checker.false_positives == []


def test_duplication_and_reordering_do_not_break_convergence() -> None:
    # Jitter of 20 ms against 1 ms latency reorders most back-to-back messages.
    link = LinkModel(latency=0.001, jitter=0.02, duplicate=0.3)
    sim, checker = joined(100, seed=7, link=link)
    origin, ltime, _ = checker.broadcast(3, "dup", b"")
    checker.crash(61)
    sim.run_until(sim.now + 40.0)
    assert sim.network.duplicated > 1_000
    assert checker.dissemination(origin, ltime).missing == 0
    assert checker.detection(0) is not None
    assert checker.false_positives == []
    assert checker.converged()
