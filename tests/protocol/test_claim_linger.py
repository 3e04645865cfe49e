"""A claim made here waits up to CLAIM_LINGER for its run's next object and travels with it,
to every member of its audience alike (protocol.tasks.core; decisions 50 and 85)."""

from __future__ import annotations

from protocol.tasks.core import CLAIM_LINGER
from protocol.tasks.messages import Checkpoint, Claim, Result
from protocol.wire import Dead, Message
from tests.protocol.fakes import Link, addr, node_id, opened
from tests.protocol.test_tasks import ROLE, cluster, deliver, ranked, starts


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
    # Nothing goes before the result: not even to the candidate next in line, which, were we
    # declared dead meanwhile, asks us before it claims (decision 80).
    assert sends_of(link, owner, task_id) == []
    link.run(owner, link.node(owner).complete(link.now, task_id, 1, "ok", b"done"))
    sent = sends_of(link, owner, task_id)
    assert sent and all(kinds == [Claim, Result] for _, kinds in sent)
    assert len({to for to, _ in sent}) == len(sent)  # one envelope to each
    assert link.node(0).tasks.tasks[task_id].accepted is not None
    link.advance(link.now + 2 * CLAIM_LINGER)
    assert sends_of(link, owner, task_id) == sent  # nothing more goes alone


def test_a_claim_goes_alone_once_its_time_is_up() -> None:
    link, task_id, owner = started("long")
    link.advance(link.now + CLAIM_LINGER / 2)
    assert sends_of(link, owner, task_id) == []
    link.advance(link.now + CLAIM_LINGER)
    sent = sends_of(link, owner, task_id)
    assert sent and all(kinds == [Claim] for _, kinds in sent)
    assert len({to for to, _ in sent}) == len(sent)  # once to each
    assert link.node(0).tasks.tasks[task_id].claim is not None
    assert not link.node(owner).tasks.lingering


def test_a_checkpoint_takes_the_waiting_claim_ahead_of_it() -> None:
    link, task_id, owner = started("step")
    link.run(owner, link.node(owner).checkpoint(link.now, task_id, 1, b"call 1")[0])
    sent = sends_of(link, owner, task_id)
    assert sent and all(kinds == [Claim, Checkpoint] for _, kinds in sent)
    # Every replica took the step at once: its claim came first, nothing was parked.
    assert all(
        node.tasks.counters["checkpoint without its claim"] == 0 for node in link.nodes.values()
    )


def test_the_next_in_line_that_hears_of_our_death_within_the_linger_asks_and_does_not_claim() -> (
    None
):
    # Decision 50's case, now answered by decision 80: the candidate next in line holds the
    # record, not yet our claim (it waits for the result), and hears that we died.
    link, task_id, owner = started("rumour")
    order = ranked(task_id, list(range(4)))
    nxt = order[order.index(owner) + 1]
    accuser = next(i for i in range(4) if i not in (owner, nxt))
    assert link.node(nxt).tasks.tasks[task_id].claim is None
    incarnation = link.node(owner).membership.incarnation
    deliver(link, nxt, accuser, Dead(node_id(owner), incarnation, node_id(accuser)))
    assert link.node(nxt).is_down(node_id(owner))
    link.advance(link.now + 30.0)
    assert starts(link, task_id) == [(owner, 1)]
    assert link.node(nxt).tasks.tasks[task_id].claim == link.node(owner).tasks.tasks[task_id].claim
