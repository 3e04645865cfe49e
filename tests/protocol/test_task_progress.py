"""Progress reports (protocol/tasks/progress.py): the peer running a task tells the task's origin
of each step of its run; the origin accepts a report only from the current owner, under its
epoch, from that owner's address. Real Nodes on the in-memory link, one rule per test."""

from __future__ import annotations

import math

import pytest

from protocol.codec import decode_message, encode_message
from protocol.effects import Dropped, ProgressHeard, StartExecution
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.tasks.messages import MAX_PROGRESS_FIELDS, MAX_PROGRESS_TEXT, TaskProgress
from tests.protocol.fakes import Link, addr, envelope, mesh, node_id

ROLE = "writer"


def running(origin: int) -> tuple[Link, bytes, int]:
    """Four peers, only peer 3 serving ROLE; a task submitted at `origin`, claimed by 3."""
    link = mesh(4)
    link.run(3, link.node(3).serve(link.now, (ROLE,), 4))
    link.advance(link.now + 2.0)
    fx, task_id = link.node(origin).submit(link.now, ROLE, b"input", nonce=b"n")
    link.run(origin, fx)
    link.advance(link.now + 2.0)
    assert task_id in link.node(3).running_here()
    return link, task_id, 3


def heard(link: Link, at: int) -> list[ProgressHeard]:
    return link.notes_of(at, ProgressHeard)


def drops(link: Link, at: int) -> list[str]:
    return [d.reason for d in link.notes_of(at, Dropped)]


def test_a_step_of_a_run_reaches_the_origin() -> None:
    link, task_id, owner = running(origin=0)
    detail = [("model", "offline"), ("tokens", 12), ("cost", 0.5), ("done", True), ("x", None)]
    link.run(
        owner, link.node(owner).report_progress(link.now, task_id, 1, "model-call", 7.5, detail)
    )
    link.advance(link.now + 0.5)
    [note] = heard(link, 0)
    assert (note.task_id, note.epoch, note.owner, note.kind, note.time) == (
        task_id, 1, node_id(owner), "model-call", 7.5
    )  # fmt: skip
    assert note.detail == tuple(detail)
    assert all(not heard(link, i) for i in (1, 2, 3)), "only the origin hears it"


def test_nothing_is_sent_for_a_task_submitted_by_its_runner() -> None:
    link, task_id, owner = running(origin=3)
    fx = link.node(owner).report_progress(link.now, task_id, 1, "note", 1.0, [("text", "hi")])
    assert fx.sends == []


def test_only_the_running_peer_reports_and_only_under_its_epoch() -> None:
    link, task_id, owner = running(origin=0)
    with pytest.raises(LocalProtocolError):
        link.node(1).report_progress(link.now, task_id, 1, "note", 1.0, [])
    with pytest.raises(LocalProtocolError):
        link.node(owner).report_progress(link.now, task_id, 2, "note", 1.0, [])
    with pytest.raises(LocalProtocolError):
        link.node(owner).report_progress(link.now, task_id, 1, "", 1.0, [])


def test_the_sender_cuts_what_a_receiver_would_refuse() -> None:
    link, task_id, owner = running(origin=0)
    detail = [("text", "x" * 1000), ("nan", math.nan), ("big", 2**70), ("obj", object())]
    detail += [(f"f{i}", i) for i in range(40)]
    fx = link.node(owner).report_progress(link.now, task_id, 1, "note", math.inf, detail)
    link.run(owner, fx)
    link.advance(link.now + 0.5)
    [note] = heard(link, 0)
    fields = dict(note.detail)
    assert len(note.detail) == MAX_PROGRESS_FIELDS and note.time == 0.0
    assert fields["text"] == "x" * MAX_PROGRESS_TEXT
    assert (fields["nan"], fields["big"]) == (None, None)
    assert str(fields["obj"]).startswith("<object object")


@pytest.mark.parametrize(
    ("sender", "at", "epoch", "reason"),
    [
        (1, 0, 1, "progress from a peer not running the task"),  # a member that does not run it
        (3, 0, 2, "progress from a peer not running the task"),  # the owner, another epoch
        (3, 2, 1, "progress of a task not submitted here"),  # at a peer that is not its origin
    ],
)
def test_a_report_that_breaks_a_rule_changes_nothing_and_is_counted(
    sender: int, at: int, epoch: int, reason: str
) -> None:
    link, task_id, _ = running(origin=0)
    before = link.node(at).task_counters().get(reason, 0)
    forged = TaskProgress(task_id, epoch, "model-call", 1.0, (("model", "x"),))
    link.run(at, link.node(at).handle(link.now, addr(sender), envelope(sender, forged)))
    assert heard(link, at) == []
    assert reason in drops(link, at)
    assert link.node(at).task_counters()[reason] == before + 1


def test_a_report_from_a_sender_not_known_here_is_dropped() -> None:
    link, task_id, _ = running(origin=0)
    forged = TaskProgress(task_id, 1, "model-call", 1.0, ())
    link.run(0, link.node(0).handle(link.now, addr(9), envelope(9, forged)))
    assert heard(link, 0) == []
    assert "progress from a sender not known here" in drops(link, 0)


def test_the_runner_made_the_start_the_report_names() -> None:
    # The fixture's premise, checked once: peer 3 started the run that reports.
    link, task_id, owner = running(origin=0)
    starts = [s for s in link.commands_of(owner, StartExecution) if s.task_id == task_id]
    assert [s.epoch for s in starts] == [1]


@pytest.mark.parametrize(
    "detail",
    [
        [["k", [1]]],  # a nested value
        [["k", "x" * (MAX_PROGRESS_TEXT + 1)]],
        [["k", 1], ["k", 2]],  # a field twice
        [["", 1]],
        [["k"]],
        [[f"f{i}", i] for i in range(MAX_PROGRESS_FIELDS + 1)],
        [["k", math.inf]],
    ],
)
def test_a_malformed_report_does_not_decode(detail: list[list[object]]) -> None:
    import msgpack

    from protocol.wire import Kind

    raw = msgpack.packb([Kind.TASK_PROGRESS, bytes(32), 1, "note", 1.0, detail])
    with pytest.raises(RemoteProtocolError):
        decode_message(raw)


@pytest.mark.parametrize(
    "fields", [(0, "note", 1.0), (1, "note", -1.0), (1, "note", 1), (1, "", 1.0)]
)
def test_a_report_with_a_bad_epoch_time_or_kind_does_not_decode(
    fields: tuple[int, str, float],
) -> None:
    import msgpack

    from protocol.wire import Kind

    epoch, kind, time = fields
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb([Kind.TASK_PROGRESS, bytes(32), epoch, kind, time, []]))


def test_a_report_round_trips() -> None:
    msg = TaskProgress(bytes(32), 3, "tool-call", 2.5, (("tool", "search"), ("ok", False)))
    assert decode_message(encode_message(msg)) == msg


def tree(depth: int) -> tuple[Link, list[bytes]]:
    """Five peers; a root submitted at peer 0 and run by peer 1; below it a chain of `depth`
    children, each run by the next of peers 3, 2, 4 and submitted by its parent's runner."""
    roles, runners = ["lead", "writer", "reader", "checker"], [1, 3, 2, 4]
    link = mesh(5)
    for role, runner in zip(roles, runners, strict=True):
        link.run(runner, link.node(runner).serve(link.now, (role,), 4))
    link.advance(link.now + 2.0)
    fx, task_id = link.node(0).submit(link.now, roles[0], b"root", nonce=b"r")
    link.run(0, fx)
    link.advance(link.now + 2.0)
    ids = [task_id]
    for level in range(1, depth + 1):
        by = runners[level - 1]
        fx, task_id = link.node(by).submit(
            link.now, roles[level], b"child", nonce=bytes([level]), parent=ids[-1]
        )
        link.run(by, fx)
        link.advance(link.now + 2.0)
        assert task_id in link.node(runners[level]).running_here()
        ids.append(task_id)
    return link, ids


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_descendants_step_climbs_to_the_roots_origin(depth: int) -> None:
    link, ids = tree(depth)
    runner = [1, 3, 2, 4][depth]
    fx = link.node(runner).report_progress(link.now, ids[-1], 1, "model-call", 3.0, [("n", 1)])
    link.run(runner, fx)
    link.advance(link.now + 0.5)
    [note] = [n for n in heard(link, 0) if n.task_id == ids[-1]]
    assert (note.epoch, note.owner, note.kind, note.detail) == (
        1, node_id(runner), "model-call", (("n", 1),)
    )  # fmt: skip
    # Every origin on the way heard it once, and no one else.
    on_the_way = {0, *[1, 3, 2, 4][:depth]}  # the origin of each level up to the root
    for peer in range(5):
        got = [n for n in heard(link, peer) if n.task_id == ids[-1]]
        assert len(got) == (1 if peer in on_the_way else 0), peer


def test_a_step_of_a_child_run_where_its_parent_runs_reaches_the_parents_origin() -> None:
    link, [root] = tree(0)
    link.run(1, link.node(1).serve(link.now, ("lead", "helper"), 4))
    link.advance(link.now + 2.0)
    fx, child = link.node(1).submit(link.now, "helper", b"c", nonce=b"h", parent=root)
    link.run(1, fx)
    link.advance(link.now + 2.0)
    assert child in link.node(1).running_here()
    fx = link.node(1).report_progress(link.now, child, 1, "tool-call", 4.0, [])
    assert len(fx.sends) == 1  # submitted here: straight to the parent's origin
    link.run(1, fx)
    link.advance(link.now + 0.5)
    [note] = heard(link, 0)
    assert (note.task_id, note.owner, note.kind) == (child, node_id(1), "tool-call")


@pytest.mark.parametrize(
    ("sender", "via_epoch", "at", "reason"),
    [
        (2, 1, 0, "progress from a peer not running the task"),  # not the via task's runner
        (1, 2, 0, "progress from a peer not running the task"),  # its runner, another epoch
        (1, 1, 3, "progress relayed through a task not submitted here"),
    ],
)
def test_a_relayed_report_that_breaks_a_rule_changes_nothing_and_is_counted(
    sender: int, via_epoch: int, at: int, reason: str
) -> None:
    link, [root, child] = tree(1)
    before = link.node(at).task_counters().get(reason, 0)
    forged = TaskProgress(child, 1, "note", 1.0, (), node_id(3), root, via_epoch)
    link.run(at, link.node(at).handle(link.now, addr(sender), envelope(sender, forged)))
    assert [n for n in heard(link, at) if n.task_id == child] == []
    assert reason in drops(link, at)
    assert link.node(at).task_counters()[reason] == before + 1


def test_a_relayed_report_round_trips_and_a_bad_via_epoch_does_not_decode() -> None:
    import msgpack

    from protocol.wire import Kind

    msg = TaskProgress(bytes(32), 2, "note", 1.0, (), node_id(1), b"\x01" * 32, 3)
    assert decode_message(encode_message(msg)) == msg
    raw = [Kind.TASK_PROGRESS, bytes(32), 1, "note", 1.0, [], node_id(1), b"\x01" * 32, 0]
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb(raw))
