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
