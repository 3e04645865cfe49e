"""A cancel that ends its task `failed` (decision 45): its origin gave up on it (a queued task
no peer claimed in time). The outcome is signed; a plain cancel keeps its old shape."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from protocol.codec import decode_message, encode_message
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.tasks.messages import DOMAIN_CANCEL, Cancel
from protocol.wire import Kind
from tests.protocol.fakes import envelope, signer
from tests.protocol.test_tasks import cluster as task_cluster
from tests.protocol.test_tasks import holders, submit


def signed(outcome: str, by: int = 0) -> Cancel:
    s = signer(by)
    unsigned = Cancel(bytes(32), s.public_key, "queue timeout", b"", s.node_id, outcome)
    return replace(unsigned, sig=s.sign(DOMAIN_CANCEL, unsigned.signed_payload()))


def test_a_plain_cancel_keeps_its_shape_and_a_failed_one_carries_its_outcome() -> None:
    plain, failed = signed("cancelled"), signed("failed")
    assert len(msgpack.unpackb(encode_message(plain))) == 5
    assert msgpack.unpackb(encode_message(failed))[-1] == "failed"
    assert decode_message(encode_message(plain)) == plain
    assert decode_message(encode_message(failed)) == failed
    assert plain.signed_payload() == msgpack.packb([bytes(32), plain.by_key, "queue timeout"])
    assert failed.signed_payload() != plain.signed_payload()


@pytest.mark.parametrize("outcome", ["cancelled", "done", "", 1])
def test_decoding_refuses_an_outcome_other_than_failed(outcome: object) -> None:
    fields = msgpack.unpackb(encode_message(signed("cancelled")))
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb([*fields, outcome]))
    assert fields[0] == Kind.CANCEL


def test_the_origin_ends_a_task_failed_and_every_holder_agrees() -> None:
    link = task_cluster(4, serving=[])  # nobody serves the role: the task stays pending
    task_id = submit(link)
    with pytest.raises(LocalProtocolError):
        link.node(0).tasks.cancel(link.now, task_id, "x", outcome="done")
    link.run(0, link.node(0).cancel(link.now, task_id, "queue timeout", outcome="failed"))
    link.advance(link.now + 2.0)
    assert {n.tasks.tasks[task_id].state for n in holders(link, task_id)} == {"failed"}
    assert all(n.tasks.tasks[task_id].cancel.outcome == "failed" for n in holders(link, task_id))


def test_a_cancel_whose_outcome_was_changed_on_the_way_is_refused() -> None:
    link = task_cluster(4, serving=[])
    task_id = submit(link)
    s = signer(0)
    unsigned = Cancel(task_id, s.public_key, "gave up", b"", s.node_id, "failed")
    genuine = replace(unsigned, sig=s.sign(DOMAIN_CANCEL, unsigned.signed_payload()))
    forged = replace(genuine, outcome="cancelled")  # the signature covers the outcome
    target = next(n for n in holders(link, task_id) if n.node_id != s.node_id)
    target.handle(link.now, "n0:1", envelope(0, forged))
    st = target.tasks.tasks[task_id]
    assert st.cancel is None and target.tasks.counters["bad signature: cancel"] == 1


def test_a_cancel_that_came_before_its_record_is_applied_when_it_comes_again() -> None:
    # Copies of broadcast kinds seen recently are skipped unread; a cancel must not be, or one
    # dropped for lack of its record would be skipped for good at a quiet peer (a simulated
    # run with loss left a replica pending next to two that held the task failed).
    link = task_cluster(6, serving=[])
    task_id = submit(link)
    late = next(n for n in link.nodes.values() if task_id not in n.tasks.tasks)
    s = signer(0)  # the origin
    unsigned = Cancel(task_id, s.public_key, "gave up", b"", s.node_id, "failed")
    cancel = replace(unsigned, sig=s.sign(DOMAIN_CANCEL, unsigned.signed_payload()))
    record = link.node(0).tasks.tasks[task_id].record
    assert record is not None
    late.handle(link.now, "n0:1", envelope(0, cancel))
    assert late.tasks.counters["cancel before its record"] == 1
    late.handle(link.now, "n0:1", envelope(0, record))
    late.handle(link.now, "n0:1", envelope(0, cancel))  # the very same bytes, again
    assert late.tasks.tasks[task_id].state == "failed"
