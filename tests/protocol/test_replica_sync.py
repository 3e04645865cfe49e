"""Replica syncs: a partner whose inventory showed what we hold gets none of ours that round
(protocol.tasks.repair; decision 86)."""

from __future__ import annotations

from protocol.tasks.messages import TaskHave
from protocol.tasks.repair import SYNC_BACKOFF, SYNC_FIRST, SYNC_TICK
from tests.protocol.fakes import Link, addr, envelope, opened
from tests.protocol.test_tasks import cluster, keyed_id, replicas, starts, submit


def inventories_sent(link: Link, src: int, dst: int, task_id: bytes, since: float) -> int:
    """How many inventories of the task peer `src` sent to peer `dst` from `since` on."""
    return sum(
        1
        for t, a, send in link.log
        if t >= since and a == addr(src) and send.addr == addr(dst)
        for m in opened(send.data)
        if isinstance(m, TaskHave) and any(e.task_id == task_id for e in m.entries)
    )


def no_inventories_delivered(link: Link) -> None:
    """Lose every inventory on the way: each peer's syncs are its own, not answers to others'
    (the log still shows what each peer sent)."""
    link.drop = lambda src, dst, data: any(isinstance(m, TaskHave) for m in opened(data))


def running(prefix: str) -> tuple[Link, bytes, int, int, int, int]:
    """Five peers (0, the origin, serves nothing) and a task (its key `prefix` and a number,
    kept out of 0's replicas) claimed by its owner: (link, task id, owner, epoch, its two
    replicas other than the owner)."""
    link = cluster(5, serving=[1, 2, 3, 4])
    key = next(
        f"{prefix}{k}"
        for k in range(50)
        if 0 not in replicas(keyed_id(f"{prefix}{k}"), list(range(5)))
    )
    task_id = submit(link, at=0, key=key)
    [(owner, epoch)] = starts(link, task_id)
    one, other = [i for i in replicas(task_id, list(range(5))) if i != owner][:2]
    return link, task_id, owner, epoch, one, other


def show(link: Link, src: int, dst: int, task_id: bytes) -> None:
    """Deliver peer `src`'s inventory of the task to peer `dst`, as its replica sync would."""
    inventory = link.node(src).tasks.tasks[task_id].inventory()
    link.run(
        dst, link.node(dst).handle(link.now, addr(src), envelope(src, TaskHave((inventory,), True)))
    )


def test_a_partner_that_showed_what_we_hold_gets_no_inventory_of_ours_that_round() -> None:
    link, task_id, owner, _, one, other = finished("alike")
    no_inventories_delivered(link)
    start = link.now
    show(link, other, one, task_id)
    link.advance(start + SYNC_FIRST + 2 * SYNC_TICK)
    assert inventories_sent(link, one, other, task_id, start) == 0
    assert inventories_sent(link, one, owner, task_id, start) == 1  # the rest as before
    # One round only: the next one compares with it again (it may have changed since).
    first_round_over = link.now
    link.advance(first_round_over + SYNC_FIRST * SYNC_BACKOFF)
    assert inventories_sent(link, one, other, task_id, first_round_over) == 1


def test_a_partner_that_showed_what_we_held_before_a_change_still_gets_our_inventory() -> None:
    link, task_id, owner, epoch, one, other = running("changed")
    link.advance(link.now + 0.5)  # the claim has spread
    no_inventories_delivered(link)
    start = link.now
    show(link, other, one, task_id)
    link.run(owner, link.node(owner).complete(link.now, task_id, epoch, "ok", b"r"))
    assert link.node(one).tasks.tasks[task_id].accepted is not None
    link.advance(start + SYNC_FIRST + 2 * SYNC_TICK)
    assert inventories_sent(link, one, other, task_id, start) == 1


def finished(prefix: str) -> tuple[Link, bytes, int, int, int, int]:
    """`running`, then its result made and spread, with no time passed since."""
    link, task_id, owner, epoch, one, other = running(prefix)
    link.run(owner, link.node(owner).complete(link.now, task_id, epoch, "ok", b"r"))
    assert all(link.node(i).tasks.tasks[task_id].accepted is not None for i in (one, other))
    return link, task_id, owner, epoch, one, other
