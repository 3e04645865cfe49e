"""The memory one held task costs: a peer holds every task it is a replica, origin or executor
of until retention compacts it (a day by default), so what one `TaskState` costs decides how
much memory a long-running peer needs.

A state starts its maps and sets as shared, read-only empties and gets containers of its own
only as it fills them; these tests check that no state writes into another's through them, and
bound what a fresh state costs.
"""

from __future__ import annotations

import sys
from collections.abc import Collection

from protocol.tasks.messages import Checkpoint, Claim, EpochGrant, Result
from protocol.tasks.repair import SYNC_BACKOFF, SYNC_FIRST, SYNC_LAST
from protocol.tasks.state import TaskState
from tests.protocol.test_checkpoints import running
from tests.protocol.test_inventory import steps
from tests.protocol.test_tasks import holders

TASK = b"t" * 32
OWNER = b"o" * 32
PEERS = (b"a" * 32, b"b" * 32, b"c" * 32)
CONTAINERS = ("claims", "epoch_grants", "checkpoints", "results", "grants", "holders", "sent_to")


def containers(st: TaskState) -> list[Collection[object]]:
    return [getattr(st, name) for name in CONTAINERS]


def own_bytes(st: TaskState, other: TaskState) -> int:
    """What `st` and the containers it does not share with `other` cost (sys.getsizeof)."""
    shared = {id(c) for c in containers(other)}
    return sys.getsizeof(st) + sum(sys.getsizeof(c) for c in containers(st) if id(c) not in shared)


def claim(epoch: int = 1, owner: bytes = OWNER) -> Claim:
    return Claim(TASK, b"k", 1, epoch, b"", owner)


def test_fresh_states_share_their_empty_containers() -> None:
    one, two = TaskState(TASK, 0.0), TaskState(TASK, 0.0)
    for name, a, b in zip(CONTAINERS, containers(one), containers(two), strict=True):
        assert a is b, name
        assert len(a) == 0, name


def test_a_fresh_state_costs_little_more_than_its_slots() -> None:
    # Five empty dicts and two empty sets of its own cost 752 bytes more than its slots (936
    # in all on CPython 3.11): shared, they cost nothing per task.
    one, two = TaskState(TASK, 0.0), TaskState(TASK, 0.0)
    assert own_bytes(one, two) == sys.getsizeof(one) < 300


def test_writing_one_state_leaves_another_and_the_shared_empties_alone() -> None:
    one, two = TaskState(TASK, 0.0), TaskState(TASK, 0.0)
    one.add_holder(PEERS[0])
    one.add_sent_to({PEERS[1], PEERS[2]})
    one.add_claim(claim())
    one.add_epoch_grant(EpochGrant(TASK, 2, OWNER, b"k", b"", PEERS[0]))
    one.add_checkpoint(Checkpoint(TASK, 1, 1, b"k", b"step", b"", OWNER))
    one.add_result(Result(TASK, 1, b"k", "ok", b"", (0, 0, 0), b"", OWNER))
    one.set_grant(1, OWNER)
    assert one.holders == {PEERS[0]} and one.sent_to == {PEERS[1], PEERS[2]}
    assert list(one.claims) == [(1, OWNER, 1)] and list(one.epoch_grants) == [(2, OWNER)]
    assert list(one.checkpoints) == [(1, OWNER, 1)] and list(one.results) == [(1, OWNER)]
    assert dict(one.grants) == {1: OWNER}
    three = TaskState(TASK, 0.0)
    for name, a, b in zip(CONTAINERS, containers(two), containers(three), strict=True):
        assert a is b and len(a) == 0, name


def test_later_entries_go_into_the_state_own_containers() -> None:
    st = TaskState(TASK, 0.0)
    for peer in PEERS:
        st.add_holder(peer)
    st.add_sent_to(())  # nothing sent: the shared empty stays
    assert st.holders == set(PEERS) and st.sent_to == TaskState(TASK, 0.0).sent_to
    st.add_claim(claim(1))
    st.add_claim(claim(2))
    st.add_claim(claim(2))  # the same run again: one entry
    assert sorted(st.claims) == [(1, OWNER, 1), (2, OWNER, 1)]
    st.set_grant(1, PEERS[0])
    st.set_grant(1, PEERS[1])  # a greater grantee replaces the one known
    assert dict(st.grants) == {1: PEERS[1]}


def test_a_task_of_one_run_holds_each_object_in_a_small_map() -> None:
    # Most held tasks ran once: one claim, one result, a step or none, one grantee. A dict of
    # one entry costs 224 bytes on CPython 3.11; four of them are most of what such a task
    # cost before its objects.
    st = TaskState(TASK, 0.0)
    st.add_claim(claim())
    st.add_checkpoint(Checkpoint(TASK, 1, 1, b"k", b"step", b"", OWNER))
    st.add_result(Result(TASK, 1, b"k", "ok", b"", (0, 0, 0), b"", OWNER))
    st.set_grant(1, OWNER)
    maps = (st.claims, st.checkpoints, st.results, st.grants)
    assert sum(sys.getsizeof(m) for m in maps) < 4 * 100
    assert st.claims == {(1, OWNER, 1): st.claims[(1, OWNER, 1)]}
    assert (1, OWNER) in st.results and (2, OWNER) not in st.results
    assert st.grants.get(1) == OWNER and st.grants.get(2) is None
    assert [k for k, _ in sorted(st.checkpoints.items())] == [(1, OWNER, 1)]


def test_a_second_key_turns_a_one_entry_map_into_a_dict_of_both() -> None:
    st = TaskState(TASK, 0.0)
    first, second = claim(1), claim(2, PEERS[0])
    st.add_claim(first)
    st.add_claim(second)
    assert dict(st.claims) == {(1, OWNER, 1): first, (2, PEERS[0], 1): second}
    third = claim(3)
    st.add_claim(third)  # written in place now
    assert len(st.claims) == 3 and st.claims[(3, OWNER, 1)] is third


def test_an_inventory_is_kept_while_the_replicas_compare_the_task_not_after() -> None:
    # The replicas of a changed task compare it three times within a minute, so its inventory
    # is kept meanwhile; a settled task is held for a day and rarely compared, so it is not.
    # Kept, `inventory()` returns one object each time; not kept, an equal one built anew.
    link, task_id, owner = running()
    steps(link, owner, task_id, 3)
    link.advance(link.now + 1.0 + SYNC_FIRST)
    comparing = [n for n in holders(link, task_id) if task_id in n.tasks.sync_due]
    assert comparing
    for node in comparing:
        st = node.tasks.tasks[task_id]
        assert st.inventory() is st.inventory()
    last_sync = SYNC_FIRST * (1 + SYNC_BACKOFF) + SYNC_LAST
    link.advance(link.now + last_sync + SYNC_FIRST)
    settled = [n for n in holders(link, task_id) if task_id not in n.tasks.sync_due]
    assert settled  # all but the origin, which waits for the result
    for node in settled:
        st = node.tasks.tasks[task_id]
        first, second = st.inventory(keep=False), st.inventory(keep=False)
        assert first == second and first is not second
