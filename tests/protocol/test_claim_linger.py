"""A claim or checkpoint made here waits up to LINGER for its run's next objects and travels
with them, to every member of its audience alike (protocol.tasks.core; decisions 50, 85 and
97)."""

from __future__ import annotations

from protocol.effects import Dropped, ProgressHeard
from protocol.tasks.core import LINGER
from protocol.tasks.messages import Checkpoint, Claim, Result, TaskProgress
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
    link.advance(link.now + 2 * LINGER)
    assert sends_of(link, owner, task_id) == sent  # nothing more goes alone


def test_a_claim_goes_alone_once_its_time_is_up() -> None:
    link, task_id, owner = started("long")
    link.advance(link.now + LINGER / 2)
    assert sends_of(link, owner, task_id) == []
    link.advance(link.now + LINGER)
    sent = sends_of(link, owner, task_id)
    assert sent and all(kinds == [Claim] for _, kinds in sent)
    assert len({to for to, _ in sent}) == len(sent)  # once to each
    assert link.node(0).tasks.tasks[task_id].claim is not None
    assert not link.node(owner).tasks.lingering


def test_a_checkpoint_joins_the_waiting_claim_behind_it() -> None:
    link, task_id, owner = started("step")
    link.run(owner, link.node(owner).checkpoint(link.now, task_id, 1, b"call 1")[0])
    assert sends_of(link, owner, task_id) == []  # the claim's time is not up
    link.advance(link.now + LINGER)
    sent = sends_of(link, owner, task_id)
    assert sent and all(kinds == [Claim, Checkpoint] for _, kinds in sent)
    assert len({to for to, _ in sent}) == len(sent)  # one envelope to each
    # Every replica took the step at once: its claim came first, nothing was parked.
    assert all(
        node.tasks.counters["checkpoint without its claim"] == 0 for node in link.nodes.values()
    )
    holders = [i for i in range(4) if addr(i) in {to for to, _ in sent}]
    assert all(len(link.node(i).tasks.tasks[task_id].checkpoints) == 1 for i in holders)


def test_a_short_runs_claim_steps_and_result_go_in_one_envelope_to_each() -> None:
    link, task_id, owner = started("steps")
    node = link.node(owner)
    for step in (b"call 1", b"reply 1", b"call 2"):
        link.run(owner, node.checkpoint(link.now, task_id, 1, step)[0])
    link.advance(link.now + LINGER / 2)
    assert sends_of(link, owner, task_id) == []
    link.run(owner, node.complete(link.now, task_id, 1, "ok", b"done"))
    sent = sends_of(link, owner, task_id)
    assert sent and all(kinds == [Claim, *[Checkpoint] * 3, Result] for _, kinds in sent)
    assert len({to for to, _ in sent}) == len(sent)
    assert link.node(0).tasks.tasks[task_id].accepted is not None
    assert len(link.node(0).tasks.tasks[task_id].checkpoints) == 3
    link.advance(link.now + 2 * LINGER)
    assert sends_of(link, owner, task_id) == sent  # nothing more goes alone


def test_a_later_step_waits_its_own_linger_and_goes_alone() -> None:
    link, task_id, owner = started("later")
    link.advance(link.now + 2 * LINGER)  # the claim went alone
    first = sends_of(link, owner, task_id)
    link.run(owner, link.node(owner).checkpoint(link.now, task_id, 1, b"call 1")[0])
    link.advance(link.now + LINGER / 2)
    assert sends_of(link, owner, task_id) == first
    link.advance(link.now + LINGER)
    later = sends_of(link, owner, task_id)[len(first) :]
    assert later and all(kinds == [Checkpoint] for _, kinds in later)
    assert {to for to, _ in later} == {to for to, _ in first}  # the same audience
    assert not link.node(owner).tasks.lingering


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


def test_a_report_of_a_step_travels_to_the_origin_behind_the_steps_checkpoint() -> None:
    # Sent ahead, a report cost an envelope of its own and reached the origin before the
    # claim it is checked against (decision 97).
    link, task_id, owner = started("report")
    node = link.node(owner)
    link.run(owner, node.checkpoint(link.now, task_id, 1, b"reply 1")[0])
    link.run(owner, node.report_progress(link.now, task_id, 1, "model-call", 1.0, []))
    assert sends_of(link, owner, task_id) == []
    link.advance(link.now + LINGER)
    to_origin = [
        [type(m) for m in opened(send.data)]
        for _, src, send in link.log
        if src == addr(owner) and send.addr == addr(0)
    ]
    assert [Claim, Checkpoint, TaskProgress] in to_origin
    assert [m for m in to_origin if TaskProgress in m] == [[Claim, Checkpoint, TaskProgress]]
    [note] = link.notes_of(0, ProgressHeard)
    assert (note.task_id, note.kind) == (task_id, "model-call")
    assert not link.notes_of(0, Dropped)


def test_what_lingers_goes_at_once_when_the_host_asks() -> None:
    # `Driver.saved`: a step shown must survive our death, so its checkpoint goes now.
    link, task_id, owner = started("saved")
    node = link.node(owner)
    link.run(owner, node.checkpoint(link.now, task_id, 1, b"call 1")[0])
    link.run(owner, node.send_lingering(link.now))
    sent = sends_of(link, owner, task_id)
    assert sent and all(kinds == [Claim, Checkpoint] for _, kinds in sent)
    assert not node.tasks.lingering
    link.advance(link.now + 2 * LINGER)
    assert sends_of(link, owner, task_id) == sent  # nothing goes twice
