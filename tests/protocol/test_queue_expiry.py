"""A queued task's home ends it when its origin cannot (decision 58).

The record carries the queue timeout, signed by the origin; once it passed (the host's wall
clock decides when, `peer.runtime.queue_timeouts`), the task's arbiter signs a `failed`
cancel, and every receiver honours a failed cancel from a member of the task's home for a
record with a queue timeout, and nothing more.
"""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from protocol.codec import decode_message, encode_message
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.tasks.messages import DOMAIN_CANCEL, Cancel, TaskRecord
from protocol.tasks.placement import top_by_score
from tests.protocol.fakes import Link, signer
from tests.protocol.test_tasks import ROLE, cluster, deliver, holders

PEERS = 5


def queued(link: Link, at: int = 0, key: str = "queued", seconds: float = 30.0) -> bytes:
    """Submit a task with a queue timeout at peer `at`; nobody serves its role."""
    fx, task_id = link.node(at).submit(
        link.now, ROLE, b"input", idempotency_key=key, queue_timeout=seconds
    )
    link.run(at, fx)
    link.advance(link.now + 1.0)
    return task_id


def home(link: Link, task_id: bytes) -> list[int]:
    """The task's home (top k by HRW among every peer), as peer numbers, arbiter first."""
    by_id = {link.node(i).node_id: i for i in range(PEERS)}
    return [by_id[n] for n in top_by_score(task_id, tuple(by_id), 3)]


def failed_cancel(by: int, task_id: bytes, outcome: str = "failed") -> Cancel:
    s = signer(by)
    unsigned = Cancel(task_id, s.public_key, "queue timeout", b"", s.node_id, outcome)
    return replace(unsigned, sig=s.sign(DOMAIN_CANCEL, unsigned.signed_payload()))


def record_of(link: Link, task_id: bytes) -> TaskRecord:
    st = link.node(0).tasks.tasks[task_id]
    assert st.record is not None
    return st.record


def test_a_record_carries_its_queue_timeout_signed_and_a_plain_one_keeps_its_shape() -> None:
    link = cluster(PEERS, serving=[])
    with_timeout = record_of(link, queued(link))
    plain = record_of(link, queued(link, key="plain", seconds=0.0))
    assert with_timeout.queue_timeout == 30.0 and plain.queue_timeout == 0.0
    assert len(msgpack.unpackb(encode_message(plain))) == 12
    assert msgpack.unpackb(encode_message(with_timeout))[-1] == 30.0
    assert decode_message(encode_message(with_timeout)) == with_timeout
    assert decode_message(encode_message(plain)) == plain
    assert (
        with_timeout.signed_payload() != replace(with_timeout, queue_timeout=0.0).signed_payload()
    )


@pytest.mark.parametrize("value", [0.0, -1.0, 30, "30", 2e9])
def test_decoding_refuses_a_queue_timeout_that_is_not_a_positive_float(value: object) -> None:
    link = cluster(PEERS, serving=[])
    fields = msgpack.unpackb(encode_message(record_of(link, queued(link))))
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb([*fields[:-1], value]))


def test_a_changed_queue_timeout_fails_the_origins_signature() -> None:
    link = cluster(PEERS, serving=[])
    task_id = queued(link)
    forged = replace(record_of(link, task_id), queue_timeout=1.0)
    fresh = cluster(PEERS, serving=[])
    deliver(fresh, 1, 0, forged)
    assert task_id not in fresh.node(1).tasks.tasks
    assert fresh.node(1).tasks.counters["bad signature: task record"] == 1


def test_the_arbiter_ends_a_queued_task_whose_origin_is_gone_and_every_holder_agrees() -> None:
    link = cluster(PEERS, serving=[])
    task_id = queued(link, at=0)
    arbiter, *others = home(link, task_id)
    if arbiter == 0:  # the origin is its own arbiter: take another key
        task_id = queued(link, at=0, key="queued-2")
        arbiter, *others = home(link, task_id)
    assert arbiter != 0
    link.crash(0)  # the origin is gone: it will never end the task
    link.advance(link.now + 30.0)  # declared dead; the arbiter is the first live home member
    for other in others:
        if other != 0:
            assert not link.node(other).tasks.expire(link.now, task_id, "queue timeout")
    link.run(arbiter, link.node(arbiter).expire(link.now, task_id, "queue timeout")[0])
    link.advance(link.now + 2.0)
    live = holders(link, task_id)  # the running ones
    assert live and {n.tasks.tasks[task_id].state for n in live} == {"failed"}
    assert {n.tasks.tasks[task_id].cancel.by for n in live} == {link.node(arbiter).node_id}


def test_only_a_home_members_failed_cancel_of_a_queued_task_is_honoured() -> None:
    link = cluster(PEERS, serving=[])
    task_id = queued(link)
    plain_id = queued(link, key="no-timeout", seconds=0.0)
    member, receiver = home(link, task_id)[1:3]
    outsider = next(i for i in range(1, PEERS) if i not in home(link, task_id))
    refusals = link.node(receiver).tasks.counters
    for cancel in (
        failed_cancel(outsider, task_id),  # not in the task's home
        failed_cancel(member, task_id, outcome="cancelled"),  # a home member may only fail it
    ):
        deliver(link, receiver, member, cancel)
        assert link.node(receiver).tasks.tasks[task_id].cancel is None
    assert refusals["cancel by neither origin nor parent owner"] == 2
    plain_member = home(link, plain_id)[1]
    plain_receiver = home(link, plain_id)[2]
    deliver(link, plain_receiver, plain_member, failed_cancel(plain_member, plain_id))
    assert link.node(plain_receiver).tasks.tasks[plain_id].cancel is None  # no queue timeout
    deliver(link, receiver, member, failed_cancel(member, task_id))
    assert link.node(receiver).tasks.tasks[task_id].state == "failed"


def test_expire_does_nothing_for_a_claimed_task_one_without_a_timeout_or_a_non_arbiter() -> None:
    link = cluster(PEERS, serving=[1, 2, 3, 4])
    claimed = queued(link, key="claimed")
    link.advance(link.now + 5.0)
    arbiter = home(link, claimed)[0]
    assert link.node(arbiter).tasks.tasks[claimed].state == "running"
    assert not link.node(arbiter).tasks.expire(link.now, claimed, "queue timeout")
    idle = cluster(PEERS, serving=[])
    plain = queued(idle, key="plain", seconds=0.0)
    assert not idle.node(home(idle, plain)[0]).tasks.expire(idle.now, plain, "queue timeout")
    waiting = queued(idle)
    assert not idle.node(home(idle, waiting)[1]).tasks.expire(idle.now, waiting, "x")
    assert idle.node(home(idle, waiting)[0]).tasks.expire(idle.now, waiting, "x")


def test_a_queue_timeout_out_of_range_is_refused_at_submit() -> None:
    link = cluster(PEERS, serving=[])
    with pytest.raises(LocalProtocolError, match="queue timeout"):
        link.node(0).submit(link.now, ROLE, b"x", idempotency_key="bad", queue_timeout=-1.0)
