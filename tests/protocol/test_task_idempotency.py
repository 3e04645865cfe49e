"""Network-wide idempotency: one key and spec name one task at every peer (decision 21)."""

from __future__ import annotations

import pytest

from protocol.effects import StartExecution, SubmissionConflicted
from protocol.tasks.idempotency import IdempotencyConflict, kept_record, record_order, spec_of
from protocol.tasks.messages import TaskRecord
from tests.protocol.fakes import Link, mesh

ROLE = "writer"


def cluster(n: int = 4) -> Link:
    link = mesh(n)
    for i in range(n):
        link.run(i, link.node(i).serve(link.now, (ROLE,), 4))
    link.advance(link.now + 2.0)
    return link


def submit(link: Link, at: int, data: bytes, key: str = "", nonce: bytes = b"") -> bytes:
    fx, task_id = link.node(at).submit(link.now, ROLE, data, idempotency_key=key, nonce=nonce)
    link.run(at, fx)
    link.advance(link.now + 1.0)
    return task_id


def records(link: Link, task_id: bytes) -> set[bytes | None]:
    out: set[bytes | None] = set()
    for node in link.nodes.values():
        st = node.tasks.tasks.get(task_id)
        if st is not None:
            out.add(st.record.sig if st.record is not None else None)
    return out


def starts(link: Link, task_id: bytes) -> int:
    return sum(
        1 for i in range(len(link.nodes)) for c in link.commands_of(i, StartExecution)
        if c.task_id == task_id
    )  # fmt: skip


def test_the_same_key_and_spec_at_two_peers_name_one_task_run_once() -> None:
    link = cluster()
    first = submit(link, 0, b"x", key="job-1")
    second = submit(link, 3, b"x", key="job-1")
    link.advance(link.now + 5.0)
    assert first == second
    assert starts(link, first) == 1
    assert len(records(link, first)) == 1  # every holder kept the same record


def test_the_same_key_with_another_spec_is_refused_where_the_task_is_held() -> None:
    link = cluster()
    task_id = submit(link, 0, b"x", key="job-2")
    holder = next(i for i, n in enumerate(link.nodes.values()) if n.tasks.tasks.get(task_id))
    with pytest.raises(IdempotencyConflict) as refused:
        link.node(holder).submit(link.now, ROLE, b"other", idempotency_key="job-2")
    assert refused.value.task_id == task_id


def test_a_peer_not_holding_the_task_learns_the_conflict_from_its_replicas() -> None:
    link = cluster(6)
    task_id = submit(link, 0, b"x", key="job-3")
    outsider = next(i for i in range(6) if link.node(i).tasks.tasks.get(task_id) is None)
    fx, other_id = link.node(outsider).submit(link.now, ROLE, b"y", idempotency_key="job-3")
    link.run(outsider, fx)
    link.advance(link.now + 3.0)
    assert other_id == task_id
    assert link.notes_of(outsider, SubmissionConflicted) == [SubmissionConflicted(task_id)]
    held = link.node(outsider).tasks.tasks[task_id]
    assert held.record is not None and held.record.input == b"x" and not held.replicated
    assert starts(link, task_id) == 1


def test_two_same_spec_records_converge_on_one_everywhere() -> None:
    link = cluster()
    a, ra = link.node(0).submit(link.now, ROLE, b"z", idempotency_key="job-4")
    b, rb = link.node(1).submit(link.now, ROLE, b"z", idempotency_key="job-4")
    assert ra == rb
    link.run(0, a)
    link.run(1, b)
    link.advance(link.now + 40.0)
    assert len(records(link, ra)) == 1 and None not in records(link, ra)
    assert starts(link, ra) == 1


def test_the_same_key_and_spec_under_two_trace_contexts_is_one_task_run_once() -> None:
    link = cluster()
    trace_a = "00-" + "a" * 32 + "-" + "1" * 16 + "-01"
    trace_b = "00-" + "b" * 32 + "-" + "2" * 16 + "-01"
    first, one = link.node(0).submit(
        link.now, ROLE, b"t", idempotency_key="job-5", traceparent=trace_a
    )
    link.run(0, first)
    link.advance(link.now + 1.0)
    again, two = link.node(3).submit(
        link.now, ROLE, b"t", idempotency_key="job-5", traceparent=trace_b
    )
    link.run(3, again)
    link.advance(link.now + 40.0)
    assert one == two
    assert link.notes_of(3, SubmissionConflicted) == []
    assert starts(link, one) == 1
    kept = {
        st.record.traceparent
        for n in link.nodes.values()
        if (st := n.tasks.tasks.get(one)) and st.record
    }
    assert len(kept) == 1 and kept <= {trace_a, trace_b}  # every holder kept one of them


def test_nonce_only_submissions_stay_distinct() -> None:
    link = cluster()
    one = submit(link, 0, b"n", nonce=b"1")
    two = submit(link, 1, b"n", nonce=b"2")
    assert one != two


def record(created: float, sig: bytes, data: bytes = b"d") -> TaskRecord:
    return TaskRecord(b"k" * 32, created, ROLE, data, 0, b"", "key", b"", 0.0, "", sig, b"", b"o")


@pytest.mark.parametrize(
    ("held", "received", "kept"),
    [
        (record(1.0, b"a"), record(2.0, b"b"), "received"),  # the later submission
        (record(2.0, b"a"), record(1.0, b"b"), "held"),
        (record(1.0, b"a"), record(1.0, b"a" * 2), "smaller signature digest"),
        (record(1.0, b"a"), record(2.0, b"b", b"other"), "held"),  # another spec: first wins
    ],
)
def test_kept_record(held: TaskRecord, received: TaskRecord, kept: str) -> None:
    result = kept_record(held, received)
    if kept == "smaller signature digest":
        assert result == min(held, received, key=record_order)
        assert kept_record(received, held) == result  # the same whatever the order
    else:
        assert result is (received if kept == "received" else held)
    assert spec_of(result) in (spec_of(held), spec_of(received))
