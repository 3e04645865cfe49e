"""Inventories: repair of a task both peers hold sends only the objects one side lacks.

Before decision 44 a differing digest was answered with every object of the task, both ways:
a long-running task's whole history of checkpoints travelled again at each comparison. These
tests drive real Nodes on the in-memory link and count what crosses it.
"""

from __future__ import annotations

from dataclasses import replace

from protocol.tasks.inventory import holds_more, missing_from, parse_keys
from protocol.tasks.messages import (
    INVENTORY_KEY,
    KEY_STEPS,
    Checkpoint,
    Claim,
    TaskHave,
    TaskRecord,
)
from protocol.tasks.repair import SYNC_TICK
from protocol.tasks.state import TaskState
from protocol.wire import Message
from tests.protocol.fakes import Link, addr, envelope, opened
from tests.protocol.test_checkpoints import running
from tests.protocol.test_tasks import holders, replicas


def steps(link: Link, owner: int, task_id: bytes, count: int) -> None:
    for k in range(count):
        link.run(owner, link.node(owner).checkpoint(link.now, task_id, 1, b"step %d" % k)[0])


def sent_since(link: Link, since: int, to: int | None = None) -> list[Message]:
    """Every message sent (to peer `to`, or to anyone) since the link's `since`-th send."""
    return [
        m
        for _, _, send in link.log[since:]
        if to is None or send.addr == addr(to)
        for m in opened(send.data)
    ]


def test_an_inventory_lists_exactly_what_a_task_holds() -> None:
    link, task_id, owner = running()
    steps(link, owner, task_id, 5)
    link.advance(link.now + 1.0)
    full = link.node(owner).tasks.tasks[task_id]
    inv = full.inventory()
    assert parse_keys(inv).checkpoints == ((1, full.claim.owner if full.claim else b"", 1, 5),)
    assert inv.digest == full.digest()
    assert missing_from(full, inv) == [] and not holds_more(inv, full)
    # A state missing steps 2 and 4 lacks exactly those, and its inventory shows the gaps.
    partial = TaskState(task_id, 0.0)
    partial.record, partial.claims = full.record, dict(full.claims)
    partial.checkpoints = {k: c for k, c in full.checkpoints.items() if k[2] in (1, 3, 5)}
    lacks = missing_from(full, partial.inventory())
    assert [c.seq for c in lacks if isinstance(c, Checkpoint)] == [2, 4] and len(lacks) == 2
    assert holds_more(full.inventory(), partial)
    assert not holds_more(partial.inventory(), full)
    assert parse_keys(partial.inventory()).checkpoints == tuple(
        (1, full.claim.owner if full.claim else b"", n, n) for n in (1, 3, 5)
    )
    # Nothing held: everything is missing, in the order a receiver applies it.
    empty = TaskState(task_id, 0.0).inventory()
    assert missing_from(full, empty) == full.objects()


def test_a_lost_step_is_repaired_alone_not_with_the_whole_task() -> None:
    link, task_id, owner = running()
    steps(link, owner, task_id, 10)
    link.advance(link.now + 40.0)  # every replica sync of the first steps is over
    victim = next(i for i in replicas(task_id, list(range(5))) if i != owner)
    link.drop = lambda src, dst, data: (
        dst == addr(victim) and any(isinstance(m, Checkpoint) for m in opened(data))
    )
    steps(link, owner, task_id, 1)
    link.advance(link.now + 0.5)
    assert len(link.node(victim).checkpoints(task_id)) == 10
    link.drop = lambda src, dst, data: False
    since = len(link.log)
    # The first sync comes 2 s after the change; alone, it waits up to a tick more for an
    # envelope to ride on (decision 63).
    link.advance(link.now + 5.0)
    assert len(link.node(victim).checkpoints(task_id)) == 11
    got = sent_since(link, since, victim)
    # Each holder whose sync reached the victim before the repair did sends the step.
    assert {m.seq for m in got if isinstance(m, Checkpoint)} == {11}
    assert not [m for m in got if isinstance(m, TaskRecord | Claim)]
    assert any(isinstance(m, TaskHave) for m in sent_since(link, since))


def test_two_replicas_missing_different_steps_each_get_only_theirs() -> None:
    link, task_id, owner = running()
    link.advance(link.now + SYNC_TICK)  # the origin's relayed claim is out (decision 63)
    a, b = [i for i in replicas(task_id, list(range(5))) if i != owner][:2]
    # Step 1 is lost on its way to a, step 2 on its way to b; the owner is then cut off, so
    # only a and b can repair each other.
    for lost_at in (a, b):
        link.drop = lambda src, dst, data, lost_at=lost_at: (
            dst == addr(lost_at) and any(isinstance(m, Checkpoint) for m in opened(data))
        )
        steps(link, owner, task_id, 1)
        link.advance(link.now + 0.1)
    link.drop = lambda src, dst, data: addr(owner) in (src, dst)
    since = len(link.log)
    link.advance(link.now + 5.0)  # the first syncs, well before the owner is declared dead
    for i in (a, b):
        assert [c.seq for c in link.node(i).checkpoints(task_id)] == [1, 2]
    sent = [
        m
        for _, src, send in link.log[since:]
        if addr(owner) not in (src, send.addr)
        for m in opened(send.data)
    ]
    # Each step goes only to the peer that lacks it (from each peer that holds it).
    assert {m.seq for m in sent if isinstance(m, Checkpoint)} == {1, 2}
    assert not [m for m in sent if isinstance(m, TaskRecord | Claim)]
    assert all(
        [c.seq for c in n.checkpoints(task_id)] == [1, 2]
        for n in holders(link, task_id)
        if n.node_id != link.node(owner).node_id
    )


def test_a_malformed_inventory_is_counted_and_changes_nothing() -> None:
    link, task_id, owner = running()
    victim = next(i for i in replicas(task_id, list(range(5))) if i != owner)
    node = link.node(victim)
    held = node.tasks.tasks[task_id].inventory()
    key = INVENTORY_KEY.pack(KEY_STEPS, 1, bytes(32), 5, 4)  # a range running backwards
    bad = replace(held, digest=bytes(8), keys=held.keys + key)
    before = node.tasks.tasks[task_id].digest()
    fx = node.handle(link.now, addr(owner), envelope(owner, TaskHave((bad,), True)))
    assert node.tasks.counters["malformed inventories"] == 1
    assert node.tasks.tasks[task_id].digest() == before
    assert not [m for s in fx.sends for m in opened(s.data) if isinstance(m, Checkpoint)]


def test_an_inventory_held_alike_is_settled_by_its_digest_alone() -> None:
    link, task_id, owner = running()
    victim = next(i for i in replicas(task_id, list(range(5))) if i != owner)
    node = link.node(victim)
    held = node.tasks.tasks[task_id].inventory()
    # Keys that would not even parse: the equal digest stops the comparison before them.
    odd = replace(held, keys=b"\xff" * INVENTORY_KEY.size)
    fx = node.handle(link.now, addr(owner), envelope(owner, TaskHave((odd,), True)))
    assert node.tasks.counters["malformed inventories"] == 0
    assert not [m for s in fx.sends for m in opened(s.data) if isinstance(m, TaskHave)]
