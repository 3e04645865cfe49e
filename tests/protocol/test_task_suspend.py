"""Suspending an execution that waits on its children (protocol/tasks/execution.py, `Node.suspend`).

A suspended execution holds no slot but stays owned and running for every other rule; these
tests drive real Nodes on the in-memory link, as tests/protocol/test_tasks.py does.
"""

from __future__ import annotations

from protocol.effects import CancelExecution, ResultAccepted, StartExecution, TaskCancelled
from protocol.node import Node
from tests.protocol.fakes import Link, node_id
from tests.protocol.test_tasks import (
    DELAY,
    ROLE,
    cluster,
    deliver,
    running_task,
    starts,
    submit,
    takeover,
)


def free_slots(link: Link, seen_by: int, of: int) -> int:
    """The free slots peer `of` advertises, as peer `seen_by` knows them."""
    return link.node(seen_by).peer_states()[node_id(of)].free_slots


def one_slot_server() -> tuple[Link, Node, bytes]:
    """Three peers, only peer 1 serves, with one slot, busy with one task."""
    link = cluster(3, serving=[1], max_running=1)
    busy = submit(link, key="parent")
    link.advance(link.now + DELAY)
    assert starts(link, busy) == [(1, 1)]
    return link, link.node(1), busy


def test_free_slots_advertised_rise_on_suspend_and_fall_on_resume() -> None:
    link, owner, busy = one_slot_server()
    assert free_slots(link, 1, 1) == 0 and free_slots(link, 0, 1) == 0
    link.run(1, owner.suspend(link.now, busy))
    link.advance(link.now + 1.0)
    assert owner.tasks.suspended == {busy} and owner.tasks.running == {busy: 1}
    assert free_slots(link, 1, 1) == 1 and free_slots(link, 0, 1) == 1
    link.run(1, owner.resume(link.now, busy))
    link.advance(link.now + 1.0)
    assert not owner.tasks.suspended and owner.tasks.running == {busy: 1}
    assert free_slots(link, 1, 1) == 0 and free_slots(link, 0, 1) == 0


def test_passed_task_is_claimed_once_the_only_running_task_suspends() -> None:
    link, owner, busy = one_slot_server()
    child = submit(link, key="child")
    link.advance(link.now + 3 * DELAY)
    assert not starts(link, child) and owner.tasks.passed == {child}
    link.run(1, owner.suspend(link.now, busy))
    # Others saw it full when the child appeared: it claims once its free slot has been
    # advertised for a standby delay (the rule of test_full_owner_claims_when_a_slot_frees...).
    link.advance(link.now + DELAY + 0.01)
    assert starts(link, child) == [(1, 1)]
    assert owner.tasks.running == {busy: 1, child: 1} and owner.tasks.slots.used() == 1


def test_resume_takes_the_slot_back_at_once_even_beyond_max_running() -> None:
    link, owner, busy = one_slot_server()
    link.run(1, owner.suspend(link.now, busy))
    child = submit(link, key="child")
    link.advance(link.now + 3 * DELAY)
    assert starts(link, child) == [(1, 1)]
    link.run(1, owner.resume(link.now, busy))
    assert owner.tasks.slots.used() == 2 > owner.tasks.max_running
    assert free_slots(link, 1, 1) == 0
    late = submit(link, key="late")
    link.advance(link.now + 3 * DELAY)
    assert not starts(link, late) and owner.tasks.passed == {late}
    link.run(1, owner.complete(link.now, child, 1, "ok", b"child done"))
    link.advance(link.now + 3 * DELAY)
    assert not starts(link, late), "one slot, still held by the resumed parent"
    link.run(1, owner.complete(link.now, busy, 1, "ok", b"parent done"))
    link.advance(link.now + 3 * DELAY)
    assert starts(link, late) == [(1, 1)]


def test_complete_of_a_suspended_execution_is_accepted_and_cleans_up() -> None:
    link, owner, busy = one_slot_server()
    link.run(1, owner.suspend(link.now, busy))
    link.run(1, owner.complete(link.now, busy, 1, "ok", b"combined"))
    link.advance(link.now + 1.0)
    assert not owner.tasks.running and not owner.tasks.suspended
    for i in range(3):
        [note] = link.notes_of(i, ResultAccepted)
        assert note == ResultAccepted(busy, 1, node_id(1), "ok", False)
        assert free_slots(link, i, 1) == 1


def test_fencing_a_suspended_execution_cleans_up() -> None:
    link, task_id, owner, order = running_task()
    node = link.node(owner)
    link.run(owner, node.suspend(link.now, task_id))
    assert node.tasks.suspended == {task_id}
    deliver(link, owner, order[1], *takeover(order[1], task_id, 2))
    assert link.commands_of(owner, CancelExecution) == [
        CancelExecution(task_id, 1, "superseded by a greater claim")
    ]
    assert not node.tasks.running and not node.tasks.suspended
    assert node.tasks.slots.used() == 0


def test_cancel_of_a_suspended_execution_stops_it_and_is_noted_everywhere() -> None:
    link, task_id, owner, _ = running_task()
    node = link.node(owner)
    link.run(owner, node.suspend(link.now, task_id))
    link.run(0, link.node(0).cancel(link.now, task_id, "user asked"))
    link.advance(link.now + 2.0)
    assert link.commands_of(owner, CancelExecution) == [CancelExecution(task_id, 1, "cancelled")]
    assert not node.tasks.running and not node.tasks.suspended
    holding = [i for i in range(4) if task_id in link.node(i).tasks.tasks]  # its audience
    assert {0, owner} <= set(holding)
    for i in holding:
        assert link.notes_of(i, TaskCancelled) == [TaskCancelled(task_id, node_id(0), "user asked")]


def test_suspend_and_resume_of_what_is_not_running_here_are_no_ops() -> None:
    link, owner, busy = one_slot_server()
    version = owner.peer_states()[owner.node_id].version
    for fx in (
        owner.suspend(link.now, b"\x07" * 32),
        owner.resume(link.now, b"\x07" * 32),
        owner.resume(link.now, busy),
        link.node(0).suspend(link.now, busy),  # known there, running elsewhere
    ):
        assert not fx.sends and not fx.notes and not fx.persists
    assert not owner.tasks.suspended and owner.peer_states()[owner.node_id].version == version
    link.run(1, owner.suspend(link.now, busy))
    version = owner.peer_states()[owner.node_id].version
    again = owner.suspend(link.now, busy)
    assert not again.notes and owner.peer_states()[owner.node_id].version == version
    assert not link.node(0).tasks.suspended


def test_suspended_execution_is_still_running_for_the_claim_rules() -> None:
    link, owner, busy = one_slot_server()
    link.run(1, owner.suspend(link.now, busy))
    link.advance(link.now + 5 * DELAY)
    assert starts(link, busy) == [(1, 1)], "never started twice"
    st = owner.tasks.tasks[busy]
    assert st.state == "running" and st.claim is not None and st.claim.owner == node_id(1)
    assert [s.task_id for s in link.commands_of(1, StartExecution)] == [busy]
    assert ROLE in owner.tasks.roles
