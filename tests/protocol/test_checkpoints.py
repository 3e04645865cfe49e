"""Checkpoints: the signed steps of a run, kept with the task so a takeover resumes from them.

Each test names the rule it checks, driven through real Nodes on the in-memory link: only the
peer running a task under an epoch records its steps, numbered from 1 and bounded; they reach
the task's replicas and the peer that takes it over; a forged or premature one changes
nothing; a lost one is repaired; the store gets each under its own key.
"""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from protocol.codec import decode_message, encode_message
from protocol.effects import Persist, PersistKind
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.tasks.messages import (
    DOMAIN_CHECKPOINT,
    MAX_CHECKPOINT_BYTES,
    MAX_CHECKPOINTS,
    Checkpoint,
)
from protocol.wire import Kind
from tests.protocol.fakes import Link, addr, envelope, opened, signer
from tests.protocol.test_tasks import cluster, holders, replicas, starts, submit


def checkpoint(
    i: int, task_id: bytes, epoch: int, seq: int, key_of: int | None = None
) -> Checkpoint:
    """Peer `i`'s checkpoint, signed by peer `key_of` (a forgery when it differs from `i`)."""
    owner = signer(i)
    unsigned = Checkpoint(task_id, epoch, seq, owner.public_key, b"step", b"", owner.node_id)
    sig = signer(i if key_of is None else key_of).sign(DOMAIN_CHECKPOINT, unsigned.signed_payload())
    return replace(unsigned, sig=sig)


def running(n: int = 5) -> tuple[Link, bytes, int]:
    link = cluster(n)
    for k in range(20):
        task_id = submit(link, key=f"steps{k}")
        [(owner, epoch)] = starts(link, task_id)
        if owner != 0:  # keep the submitter (everyone's join seed) alive for takeovers
            assert epoch == 1
            return link, task_id, owner
    raise AssertionError("no task preferred a peer other than 0")


def test_the_runner_numbers_its_steps_and_they_reach_every_replica() -> None:
    link, task_id, owner = running()
    node = link.node(owner)
    seqs = []
    for data in (b"call 1", b"tool 1", b"call 2"):
        fx, made = node.checkpoint(link.now, task_id, 1, data)
        link.run(owner, fx)
        seqs.append(made.seq)
        kinds = {p.kind for p in fx.persists}
        assert kinds == {PersistKind.CHECKPOINT}
    assert seqs == [1, 2, 3]
    link.advance(link.now + 1.0)
    for i in replicas(task_id, list(range(5))):
        steps = link.node(i).checkpoints(task_id)
        assert [(c.epoch, c.seq, c.data) for c in steps] == [
            (1, 1, b"call 1"),
            (1, 2, b"tool 1"),
            (1, 3, b"call 2"),
        ]


def test_only_the_runner_checkpoints_within_the_bounds() -> None:
    link, task_id, owner = running()
    other = next(i for i in range(5) if i != owner)
    with pytest.raises(LocalProtocolError, match="does not run the task"):
        link.node(other).checkpoint(link.now, task_id, 1, b"x")
    with pytest.raises(LocalProtocolError, match="does not run the task"):
        link.node(owner).checkpoint(link.now, task_id, 2, b"x")
    with pytest.raises(LocalProtocolError, match="at most"):
        link.node(owner).checkpoint(link.now, task_id, 1, b"x" * (MAX_CHECKPOINT_BYTES + 1))
    node = link.node(owner)
    for _ in range(MAX_CHECKPOINTS):
        link.run(owner, node.checkpoint(link.now, task_id, 1, b"s")[0])
    with pytest.raises(LocalProtocolError, match=f"at most {MAX_CHECKPOINTS}"):
        node.checkpoint(link.now, task_id, 1, b"one too many")
    link.run(owner, node.complete(link.now, task_id, 1, "ok", b"done"))
    with pytest.raises(LocalProtocolError, match="does not run the task"):
        node.checkpoint(link.now, task_id, 1, b"after the end")


def test_a_forged_or_premature_checkpoint_changes_nothing() -> None:
    link, task_id, owner = running()
    replica = next(i for i in replicas(task_id, list(range(5))) if i != owner)
    node = link.node(replica)
    forged = checkpoint(owner, task_id, 1, 1, key_of=replica)
    link.run(replica, node.handle(link.now, addr(owner), envelope(owner, forged)))
    assert node.checkpoints(task_id) == []
    # A checkpoint of a run nobody claimed (epoch 2 here) waits for its claim; none comes.
    early = checkpoint(owner, task_id, 2, 1)
    link.run(replica, node.handle(link.now, addr(owner), envelope(owner, early)))
    assert node.checkpoints(task_id) == []
    assert node.tasks.counters["checkpoint without its claim"] == 1


def test_the_peer_that_takes_over_holds_the_dead_owners_steps() -> None:
    link, task_id, owner = running()
    node = link.node(owner)
    for data in (b"call 1", b"call 2"):
        link.run(owner, node.checkpoint(link.now, task_id, 1, data)[0])
    link.advance(link.now + 0.5)
    link.crash(owner)
    link.advance(link.now + 60.0)
    [(heir, epoch)] = [(i, e) for i, e in starts(link, task_id) if e == 2]
    steps = link.node(heir).checkpoints(task_id)
    assert [(c.epoch, c.owner, c.data) for c in steps] == [
        (1, signer(owner).node_id, b"call 1"),
        (1, signer(owner).node_id, b"call 2"),
    ]
    # The heir's own steps are numbered afresh under its epoch.
    fx, made = link.node(heir).checkpoint(link.now, task_id, epoch, b"resumed")
    link.run(heir, fx)
    assert (made.epoch, made.seq) == (2, 1)


def test_a_lost_checkpoint_reaches_the_replica_through_the_replicas_sync() -> None:
    link, task_id, owner = running()
    victim = next(i for i in replicas(task_id, list(range(5))) if i != owner)
    link.drop = lambda src, dst, data: (
        dst == addr(victim) and any(isinstance(m, Checkpoint) for m in opened(data))
    )
    link.run(owner, link.node(owner).checkpoint(link.now, task_id, 1, b"lost")[0])
    link.advance(link.now + 0.5)
    assert link.node(victim).checkpoints(task_id) == []
    link.drop = lambda src, dst, data: False
    link.advance(link.now + 3.0)  # the first sync comes 2 s after the change
    assert [c.data for c in link.node(victim).checkpoints(task_id)] == [b"lost"]
    assert all(
        [c.data for c in n.checkpoints(task_id)] == [b"lost"] for n in holders(link, task_id)
    )


def test_a_stored_checkpoint_is_restored_after_its_claim() -> None:
    link, task_id, owner = running()
    replica = next(i for i in replicas(task_id, list(range(5))) if i != owner)
    fx, made = link.node(owner).checkpoint(link.now, task_id, 1, b"kept")
    link.run(owner, fx)
    [stored] = [p for p in fx.persists if p.kind == PersistKind.CHECKPOINT]
    assert stored == Persist(
        PersistKind.CHECKPOINT,
        task_id + (1).to_bytes(8, "big") + signer(owner).node_id + (1).to_bytes(4, "big"),
        encode_message(made),
    )
    link.advance(link.now + 1.0)
    assert [c.data for c in link.node(replica).checkpoints(task_id)] == [b"kept"]


@pytest.mark.parametrize(
    ("epoch", "seq", "data", "problem"),
    [
        (0, 1, b"x", "epoch 1 or more"),
        (1, 0, b"x", "sequence number"),
        (1, MAX_CHECKPOINTS + 1, b"x", "sequence number"),
        (1, 1, b"x" * (MAX_CHECKPOINT_BYTES + 1), "at most"),
    ],
)
def test_decoding_refuses_checkpoints_out_of_bounds(
    epoch: int, seq: int, data: bytes, problem: str
) -> None:
    owner = signer(1)
    row = [Kind.CHECKPOINT, bytes(32), epoch, seq, owner.public_key, data, bytes(64)]
    with pytest.raises(RemoteProtocolError, match=problem):
        decode_message(msgpack.packb(row))
