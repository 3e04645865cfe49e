"""Members remembered across a restart (decision 51).

A peer restarted where it reaches only part of the network used to rank a task's home among
the few members it had met since, take itself for the task's arbiter and grant a takeover
that the rest of the network refuses (task campaign, seeds 77 and 1355). It now ranks homes
among the members it knew before the restart too (the host's saved membership hints), until
its table learns of them again or they would have been forgotten as dead.
"""

from __future__ import annotations

from protocol.tasks.state import TaskState
from tests.protocol.fakes import mesh, node_id
from tests.protocol.test_tasks import ranked

PEERS = 6


def _task_outside_home_of(peer: int) -> bytes:
    """A task id whose home (top 3 of all peers) leaves `peer` out."""
    for n in range(200):
        task_id = n.to_bytes(32, "big")
        if peer not in ranked(task_id, list(range(PEERS)))[:3]:
            return task_id
    raise AssertionError("no such task id among the first 200")


def test_a_restarted_peer_ranks_a_tasks_home_among_the_members_it_remembers() -> None:
    link = mesh(PEERS)
    peer = 5
    task_id = _task_outside_home_of(peer)
    saved = [(node_id(i), 1.0) for i in range(PEERS) if i != peer]
    # Restarted where its seeds are out of reach, it has met no one yet: it takes itself for
    # the task's arbiter.
    link.crash(peer)
    forgetful = link.start(peer, incarnation=1)
    assert forgetful.tasks.may_arbitrate(task_id, node_id(peer))

    link.crash(peer)
    restarted = link.start(peer, incarnation=2)
    restarted.remember_members(link.now, saved)
    home = {node_id(i) for i in ranked(task_id, list(range(PEERS)))[:3]}
    assert set(restarted.port.known_members()) >= home
    assert not restarted.tasks.may_arbitrate(task_id, node_id(peer))
    # Every member of the home is down here (unknown): no takeover is granted by anyone here.
    assert restarted.tasks.arbiter(TaskState(task_id, link.now)) is None


def test_remembered_members_are_dropped_once_known_or_after_the_dead_retention() -> None:
    link = mesh(3)
    node = link.node(2)
    keep = node.config.swim.dead_retention
    stranger, old = b"s" * 32, b"o" * 32
    node.remember_members(link.now, [(node_id(0), 0.0), (stranger, 10.0), (old, keep + 1.0)])
    assert old not in node.port.remembered  # last seen longer ago than a dead member is kept
    assert stranger in node.port.known_members()
    assert node.port.known_members().count(node_id(0)) == 1  # in the table: counted once
    node.port.forget_remembered(link.now)
    assert list(node.port.remembered) == [stranger]
    node.port.forget_remembered(link.now + keep - 10.0)
    assert not node.port.remembered
    assert stranger not in node.port.known_members()


def test_a_peer_never_remembers_itself() -> None:
    link = mesh(2)
    node = link.node(1)
    node.remember_members(link.now, [(node_id(1), 0.0)])
    assert not node.port.remembered
