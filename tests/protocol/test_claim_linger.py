"""A claim made here waits up to CLAIM_LINGER for its run's next object and travels with it
(protocol.tasks.core; decision 50)."""

from __future__ import annotations

from protocol.tasks.core import CLAIM_LINGER
from protocol.tasks.messages import Checkpoint, Claim, Result
from protocol.wire import Message
from tests.protocol.fakes import Link, addr, opened
from tests.protocol.test_tasks import ROLE, cluster, ranked, starts


def started(key: str) -> tuple[Link, bytes, int]:
    """Four peers and a task just claimed and started at a peer other than its origin (0),
    with no time passed since the claim."""
    link = cluster(4)
    for k in range(20):
        fx, task_id = link.node(0).submit(link.now, ROLE, b"x", idempotency_key=f"{key}{k}")
        link.run(0, fx)  # the record arrives, the executor claims and starts at once
        [(owner, _)] = starts(link, task_id)
        if owner != 0:
            return link, task_id, owner
    raise AssertionError("no task preferred a peer other than 0")


def next_in_line(task_id: bytes, owner: int) -> str:
    """The address of the candidate ranked right after `owner` (every peer serves)."""
    order = ranked(task_id, list(range(4)))
    return addr(order[order.index(owner) + 1])


def sends_of(link: Link, owner: int, task_id: bytes) -> list[tuple[str, list[type[Message]]]]:
    """(destination, kinds in order) of each send by `owner` carrying an object of the task."""
    out = []
    for _, src, send in link.log:
        if src != addr(owner):
            continue
        kinds = [
            type(m)
            for m in opened(send.data)
            if isinstance(m, Claim | Result | Checkpoint) and m.task_id == task_id
        ]
        if kinds:
            out.append((send.addr, kinds))
    return out


def test_a_short_runs_claim_travels_with_its_result() -> None:
    link, task_id, owner = started("short")
    nearest = next_in_line(task_id, owner)
    # Only the candidate next in line has the claim at once (it would claim first were we
    # declared dead); the rest of the audience waits for the result.
    assert sends_of(link, owner, task_id) == [(nearest, [Claim])]
    link.run(owner, link.node(owner).complete(link.now, task_id, 1, "ok", b"done"))
    sent = sends_of(link, owner, task_id)
    rest = [(to, kinds) for to, kinds in sent[1:] if to != nearest]
    assert rest and all(kinds == [Claim, Result] for _, kinds in rest)
    assert [kinds for to, kinds in sent[1:] if to == nearest] in ([[Result]], [])
    assert link.node(0).tasks.tasks[task_id].accepted is not None
    link.advance(link.now + 2 * CLAIM_LINGER)
    assert sends_of(link, owner, task_id) == sent  # nothing more goes alone


def test_a_claim_goes_alone_once_its_time_is_up() -> None:
    link, task_id, owner = started("long")
    link.advance(link.now + CLAIM_LINGER / 2)
    first = sends_of(link, owner, task_id)
    assert first == [(next_in_line(task_id, owner), [Claim])]
    link.advance(link.now + CLAIM_LINGER)
    later = sends_of(link, owner, task_id)[1:]
    assert later and all(kinds == [Claim] for _, kinds in later)
    assert {to for to, _ in later}.isdisjoint({to for to, _ in first})  # once to each
    assert link.node(0).tasks.tasks[task_id].claim is not None
    assert not link.node(owner).tasks.lingering


def test_a_checkpoint_takes_the_waiting_claim_ahead_of_it() -> None:
    link, task_id, owner = started("step")
    nearest = next_in_line(task_id, owner)
    link.run(owner, link.node(owner).checkpoint(link.now, task_id, 1, b"call 1")[0])
    sent = sends_of(link, owner, task_id)[1:]
    assert all(kinds == [Claim, Checkpoint] for to, kinds in sent if to != nearest)
    assert [kinds for to, kinds in sent if to == nearest] == [[Checkpoint]]
    # Every replica took the step at once: its claim came first, nothing was parked.
    assert all(
        node.tasks.counters["checkpoint without its claim"] == 0 for node in link.nodes.values()
    )
