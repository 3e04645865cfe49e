"""Replica sets, audiences and the rules every receiver enforces (docs/design.md section 5).

Each test drives real nodes over the fake link: objects go to a task's audience, nothing else;
a claim from a peer not serving the role, a cancel from anyone but the origin or the parent's
owner, and forged objects for unknown tasks change nothing and are counted; a lost result
reaches a replica through the replicas' sync; the origin relays claims to every peer it sent
the record to, and syncs with every holder it knows of.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from protocol.effects import TaskCancelled
from protocol.errors import LocalProtocolError
from protocol.tasks.messages import DOMAIN_CANCEL, Cancel, Claim, Result, TaskHave, TaskHeld
from protocol.tasks.placement import ReplicaSets, members_above, scored, top_by_score
from protocol.tasks.repair import SYNC_TICK
from protocol.tasks.state import hrw_score
from tests.protocol.fakes import Link, addr, envelope, node_id, opened, signer
from tests.protocol.test_tasks import (
    ROLE,
    claim,
    cluster,
    deliver,
    keyed_id,
    ranked,
    replicas,
    result,
    starts,
    submit,
)


def test_replica_set_is_the_top_k_by_score_and_moves_only_with_its_members() -> None:
    members = tuple(sorted(node_id(i) for i in range(10)))
    sets = ReplicaSets(3)
    task_id = bytes(range(32))
    chosen = sets.of(task_id, members)
    assert chosen == top_by_score(task_id, members, 3) and len(chosen) == 3
    outsider = next(m for m in members if m not in chosen)
    fewer = tuple(m for m in members if m != outsider)
    assert sets.of(task_id, fewer) == chosen, "a member outside the set leaving moves nothing"
    without_first = tuple(m for m in members if m != chosen[0])
    assert sets.of(task_id, without_first)[:2] == chosen[1:]


def test_the_inlined_scores_are_the_hrw_scores() -> None:
    members = [node_id(i) for i in range(12)]
    for task_id in (bytes(32), bytes(range(32)), b"\xff" * 32):
        assert scored(task_id, members) == [(hrw_score(task_id, n), n) for n in members]
        by_key = sorted(members, key=lambda n: hrw_score(task_id, n), reverse=True)
        assert top_by_score(task_id, members, 4) == by_key[:4]


def test_capable_peers_follow_roles_and_deaths_through_the_cache() -> None:
    link = cluster(5, serving=[1, 2, 3, 4])
    observer = link.node(0)
    assert sorted(observer.capable(ROLE)) == sorted(node_id(i) for i in (1, 2, 3, 4))
    first = observer.capable(ROLE)
    first.clear()  # a caller's copy: the next answer is whole
    assert len(observer.capable(ROLE)) == 4
    link.run(2, link.node(2).serve(link.now, ("other",), 4))  # stops serving ROLE
    link.advance(link.now + 5.0)
    assert sorted(observer.capable(ROLE)) == sorted(node_id(i) for i in (1, 3, 4))
    assert observer.capable("other") == [node_id(2)]
    link.crash(3)
    link.advance(link.now + 60.0)
    assert observer.is_down(node_id(3))
    assert sorted(observer.capable(ROLE)) == sorted(node_id(i) for i in (1, 4))
    link.run(0, observer.serve(link.now, (ROLE,), 4))  # this peer serves it too now
    assert sorted(observer.capable(ROLE)) == sorted(node_id(i) for i in (0, 1, 4))


def test_members_above_counts_the_better_scores_up_to_k() -> None:
    members = [node_id(i) for i in range(12)]
    for task_id in (bytes(32), bytes(range(32)), b"\x07" * 32):
        order = top_by_score(task_id, members, len(members))
        for rank, member in enumerate(order):
            assert members_above(task_id, member, members, 3) == min(rank, 3)


def test_a_task_without_a_key_runs_at_its_origin_while_half_its_slots_are_free() -> None:
    link = cluster(10)  # every peer serves ROLE with 4 slots; the fake runs never end
    origin = link.node(0)
    digest = hashlib.sha256(b"input").digest()
    at_top, below, ids = [], [], []
    for n in range(20):
        first = origin.tasks.runs_here_first(ROLE)
        drawn = hashlib.sha256(b"drawn %d" % n).digest()[:16]
        nonce = origin.nonce_near_home(drawn, ROLE, digest)
        assert nonce == origin.nonce_near_home(drawn, ROLE, digest), "a pure function"
        assert len(nonce) == 16
        fx, task_id = origin.submit(link.now, ROLE, b"input", nonce=nonce)
        link.run(0, fx)
        ids.append(task_id)
        home = origin.replica_set(task_id)
        if home[0] == node_id(0):
            assert first, "the top only while half the slots are free"
            at_top.append(task_id)
        elif node_id(0) in home:
            assert not first or nonce == drawn, "the top when it was free, if a try found it"
            below.append(task_id)
    # 4 slots: the first three runs leave 4, 3 and 2 free when placed; the fourth finds 1.
    assert len(at_top) == 3 and len(below) >= 16  # 64 tries at 1 in 4: a miss is rare
    counted = origin.task_counters()  # two calls per submission
    assert counted["task ids placed to run at their origin"] == 6
    assert counted["task ids placed with their origin among the replicas"] >= 32
    link.advance(link.now + 5.0)
    runner = {task_id: peer for task_id in ids for peer, _ in starts(link, task_id)}
    assert len(runner) == 20
    assert all(runner[t] == 0 for t in at_top), "run where it was submitted, at once"
    elsewhere = {runner[t] for t in below}
    assert 0 not in elsewhere and len(elsewhere) > 3, "the rest run across the network"


def test_an_origin_not_serving_the_role_places_its_tasks_below_the_arbiter() -> None:
    link = cluster(10, serving=range(1, 10))
    origin = link.node(0)
    assert not origin.tasks.runs_here_first(ROLE)
    placed = 0
    for n in range(10):
        drawn = hashlib.sha256(b"drawn %d" % n).digest()[:16]
        nonce = origin.nonce_near_home(drawn, ROLE, hashlib.sha256(b"x").digest())
        fx, task_id = origin.submit(link.now, ROLE, b"x", nonce=nonce)
        link.run(0, fx)
        home = origin.replica_set(task_id)
        assert home[0] != node_id(0), "never the arbiter of what it cannot run"
        placed += node_id(0) in home
    assert placed >= 8, "still among the replicas, below the arbiter"


def test_a_network_of_two_or_three_places_at_the_origin_only_to_run_there() -> None:
    link = cluster(3)
    origin = link.node(0)
    nonce = origin.nonce_near_home(b"d" * 16, ROLE, hashlib.sha256(b"x").digest())
    fx, task_id = origin.submit(link.now, ROLE, b"x", nonce=nonce)
    link.run(0, fx)
    assert origin.replica_set(task_id)[0] == node_id(0)
    assert [peer for peer, _ in starts(link, task_id)] == [0]


def test_a_network_no_larger_than_a_replica_set_keeps_the_drawn_nonce() -> None:
    link = cluster(3, serving=[1, 2])
    drawn = b"d" * 16
    assert link.node(0).nonce_near_home(drawn, ROLE, bytes(32)) == drawn


def test_objects_reach_only_the_audience_in_a_larger_network() -> None:
    link = cluster(9, serving=[1, 2, 3, 4, 5, 6, 7, 8])
    task_id = submit(link, at=0, key="few")
    link.advance(link.now + 5.0)
    [(owner, _)] = starts(link, task_id)
    # Its replicas, its origin, the two first in line for epoch 1 and, once claimed, the two
    # first in line to take over from the owner.
    expected = set(replicas(task_id, list(range(9)))) | set(ranked(task_id, list(range(1, 9)))[:3])
    holders = {i for i in range(9) if task_id in link.node(i).tasks.tasks}
    assert holders == expected | {0, owner}
    assert len(holders) < 9


def test_a_claim_from_a_peer_not_serving_the_role_changes_nothing() -> None:
    link = cluster(4, serving=[1, 2])
    outsider = 3  # advertises another role only
    link.run(outsider, link.node(outsider).serve(link.now, ("other",), 4))
    link.advance(link.now + 2.0)
    task_id = submit(link, key="role")
    node = link.node(1)
    before = dict(node.tasks.tasks[task_id].claims)
    deliver(link, 1, outsider, claim(outsider, task_id, 1))
    assert node.tasks.tasks[task_id].claims == before
    assert node.tasks.counters["claim from a peer not serving the role"] == 1


def test_a_forged_claim_or_result_for_an_unknown_task_creates_no_state() -> None:
    link = cluster(3)
    unknown = bytes([7]) * 32
    deliver(link, 1, 2, claim(2, unknown, 1, key_of=0))
    deliver(link, 1, 2, result(2, unknown, 1, key_of=0))
    assert unknown not in link.node(1).tasks.tasks
    assert link.node(1).tasks.counters["bad signature: claim"] == 1


def _cancel(by: int, task_id: bytes) -> Cancel:
    s = signer(by)
    unsigned = Cancel(task_id, s.public_key, "stop", b"", s.node_id)
    return replace(unsigned, sig=s.sign(DOMAIN_CANCEL, unsigned.signed_payload()))


def test_a_cancel_from_anyone_but_the_origin_is_refused() -> None:
    link = cluster(3, serving=[1, 2])
    task_id = submit(link, at=0, key="cancel")
    [(owner, _)] = starts(link, task_id)
    deliver(link, owner, 3 - owner, _cancel(3 - owner, task_id))  # a member, not the origin
    st = link.node(owner).tasks.tasks[task_id]
    assert st.cancel is None and st.task_id in link.node(owner).tasks.running
    assert link.node(owner).tasks.counters["cancel by neither origin nor parent owner"] == 1
    with pytest.raises(LocalProtocolError, match="origin"):
        link.node(owner).cancel(link.now, task_id)
    link.run(0, link.node(0).cancel(link.now, task_id))
    link.advance(link.now + 1.0)
    assert link.notes_of(owner, TaskCancelled)


def test_a_cancel_by_the_parents_owner_is_honoured() -> None:
    link = cluster(3, serving=[1, 2])
    parent = submit(link, at=0, key="parent")
    [(parent_owner, _)] = starts(link, parent)
    fx, child = link.node(0).submit(link.now, ROLE, b"c", parent=parent, idempotency_key="child")
    link.run(0, fx)
    link.advance(link.now + 1.0)
    holder = 0  # the origin of both: it holds the parent's claim and the child
    assert link.node(holder).tasks.tasks[parent].claim is not None
    deliver(link, holder, parent_owner, _cancel(parent_owner, child))
    assert link.node(holder).tasks.tasks[child].cancel is not None


def test_a_replica_that_lost_a_result_gets_it_from_the_replicas_sync() -> None:
    link = cluster(5, serving=[1, 2, 3, 4])
    task_id = submit(link, at=0, key="sync")
    [(owner, epoch)] = starts(link, task_id)
    victim = next(i for i in replicas(task_id, list(range(5))) if i not in (0, owner))
    link.drop = lambda src, dst, data: (
        dst == addr(victim) and any(isinstance(m, Result) for m in opened(data))
    )
    link.run(owner, link.node(owner).complete(link.now, task_id, epoch, "ok", b"r"))
    link.advance(link.now + 0.5)
    assert link.node(victim).tasks.tasks[task_id].accepted is None
    link.drop = lambda src, dst, data: False
    link.advance(link.now + 5.0)  # the first sync, 2 s after the change, may wait a tick
    assert link.node(victim).tasks.tasks[task_id].accepted is not None
    assert any(link.sent(i, victim, TaskHave) for i in range(5))


def claim_missed_by_origin(key: str) -> tuple[Link, bytes, int]:
    """Six peers, 0 the origin serving nothing; a task whose claim missed the origin on its
    way (its owner holds it, the origin does not)."""
    link = cluster(6, serving=[1, 2, 3, 4, 5])
    link.drop = lambda src, dst, data: (
        dst == addr(0) and any(isinstance(m, Claim) for m in opened(data))
    )
    fx, task_id = link.node(0).submit(link.now, ROLE, b"x", idempotency_key=key)
    link.run(0, fx)
    link.advance(link.now + 1.0)
    link.drop = lambda src, dst, data: False
    [(owner, _)] = starts(link, task_id)
    assert link.node(0).tasks.tasks[task_id].claim is None
    return link, task_id, owner


def test_the_origin_relays_a_claim_to_every_peer_it_sent_the_record_to() -> None:
    # When the claim reaches the origin later, the origin hands it on.
    link, task_id, owner = claim_missed_by_origin("relay")
    made = link.node(owner).tasks.tasks[task_id].claim
    assert made is not None
    mark = link.now
    deliver(link, 0, owner, made)
    link.advance(link.now + SYNC_TICK)  # a relayed copy waits at most a tick (decision 63)
    relayed = {j for j in range(6) if any(t >= mark for t in link.sent(0, j, Claim)) and j != owner}
    sent_to = link.node(0).tasks.tasks[task_id].sent_to
    assert relayed == {i for i in range(6) if node_id(i) in sent_to} - {owner}
    assert relayed


def test_the_origin_syncs_with_a_holder_outside_the_home_that_missed_the_result() -> None:
    # A former replica outside the home once the views agree gets the result through the
    # origin's sync even when the relay's one copy is lost (decision 51).
    link, task_id, owner = claim_missed_by_origin("sync-holder")
    origin_state = link.node(0).tasks.tasks[task_id]
    home = set(replicas(task_id, list(range(6))))
    outsider = next(
        i
        for i in range(1, 6)
        if i not in home and node_id(i) not in origin_state.sent_to | {node_id(owner)}
    )
    made = link.node(owner).tasks.tasks[task_id].claim
    record = origin_state.record
    assert made is not None and record is not None
    deliver(link, outsider, 0, record, made)
    link.run(
        0, link.node(0).handle(link.now, addr(outsider), envelope(outsider, TaskHeld(task_id)))
    )
    link.advance(link.now + 60.0)  # the outsider's own syncs (2, 8, 32 s) are over
    link.drop = lambda src, dst, data: (
        dst == addr(outsider) and any(isinstance(m, Result) for m in opened(data))
    )
    epoch = made.epoch
    link.run(owner, link.node(owner).complete(link.now, task_id, epoch, "ok", b"r"))
    link.advance(link.now + 0.5)
    assert link.node(outsider).tasks.tasks[task_id].accepted is None
    link.drop = lambda src, dst, data: False
    # The origin's first sync comes 2 s after its change, then waits up to a tick for an
    # envelope to ride on (decision 63).
    link.advance(link.now + 5.0)
    assert link.node(outsider).tasks.tasks[task_id].accepted is not None
    assert link.sent(0, outsider, TaskHave)


def test_the_origin_relays_a_claim_to_a_peer_that_told_it_it_holds_the_record() -> None:
    # A peer that was a replica in the view of a partition told the origin it holds the record;
    # once the views agree it is outside the home and gets no replica sync: only the relay
    # keeps its copy from holding a superseded claim for good (task campaign, seed 899).
    link, task_id, owner = claim_missed_by_origin("held")
    origin_state = link.node(0).tasks.tasks[task_id]
    outsider = next(
        i for i in range(1, 6) if node_id(i) not in origin_state.sent_to | {node_id(owner)}
    )
    link.run(
        0, link.node(0).handle(link.now, addr(outsider), envelope(outsider, TaskHeld(task_id)))
    )
    assert node_id(outsider) in origin_state.holders
    made = link.node(owner).tasks.tasks[task_id].claim
    assert made is not None
    mark = link.now
    deliver(link, 0, owner, made)
    link.advance(link.now + SYNC_TICK)  # a relayed copy waits at most a tick (decision 63)
    assert any(t >= mark for t in link.sent(0, outsider, Claim))


def test_a_former_replica_compares_its_copy_with_the_home_after_a_member_joins() -> None:
    # A replica whose copy missed the result, and whose own syncs are over, is pushed out of
    # the home by a member that joins: no replica syncs with it any more, so it compares its
    # copy with the new home itself (task campaign, seeds 773 and 2903; decision 51).
    link = cluster(5, serving=[0, 1, 2, 3])
    link.crash(4)
    link.advance(link.now + 30.0)  # peer 4 is dead everywhere
    key, task_id, former = next(
        (key, tid, ranked(tid, [0, 1, 2, 3])[2])
        for key in (f"former{n}" for n in range(500))
        for tid in [keyed_id(key)]
        if ranked(tid, [0, 1, 2, 3])[2] != 0
        and ranked(tid, list(range(5)))[:3].count(4)
        and ranked(tid, [0, 1, 2, 3])[2] not in ranked(tid, list(range(5)))[:3]
    )
    link.drop = lambda src, dst, data: (
        dst == addr(former) and any(isinstance(m, Result) for m in opened(data))
    )
    submit(link, at=0, key=key)
    [(owner, epoch)] = starts(link, task_id)
    link.run(owner, link.node(owner).complete(link.now, task_id, epoch, "ok", b"r"))
    link.advance(link.now + 60.0)  # every sync of the change is over, each result dropped
    assert link.node(former).tasks.tasks[task_id].accepted is None
    link.drop = lambda src, dst, data: False
    link.start(4, incarnation=1)
    link.join(4)
    link.advance(link.now + 7.0)  # the join spreads, then a sync (2 s) that may wait a tick
    assert link.node(former).tasks.tasks[task_id].accepted is not None
    assert link.node(former).tasks.counters["copies outside the home synced again"] >= 1
