"""Retention (protocol/tasks/retention.py): final task trees compacted to tombstones after the
retention, exactly then; tombstones dominating every late object; their expiry after the grace;
restore order. Real Nodes on the in-memory link, a fake clock, exact deadlines."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import msgpack
import pytest

from protocol.codec import encode_message
from protocol.config import NodeConfig, TaskConfig, lan
from protocol.effects import Dropped, Persist, PersistKind, StartExecution
from protocol.node import Node
from protocol.tasks.retention import copies_outlived
from protocol.tasks.tombstone import Tombstone, TombstoneError, decode_tombstone
from tests.protocol.fakes import Link, addr, envelope, mesh, node_id, signer
from tests.protocol.test_tasks import ROLE, claim, result

RETENTION, GRACE = 60.0, 300.0
CONFIG: NodeConfig = replace(
    lan(), tasks=TaskConfig(replication=1, retention=RETENTION, tombstone_grace=GRACE)
)


def pair() -> Link:
    """Two joined peers serving ROLE, retention 60 s and grace 300 s."""
    link = mesh(2, CONFIG)
    for i in range(2):
        link.run(i, link.node(i).serve(link.now, (ROLE,), 4))
    link.advance(link.now + 2.0)
    return link


def run_task(link: Link, key: str, parent: bytes = b"") -> tuple[bytes, int, float]:
    """Submit a task at peer 0; return its id, its owner and the time its execution started."""
    fx, task_id = link.node(0).submit(
        link.now, ROLE, key.encode(), idempotency_key=key, parent=parent
    )
    link.run(0, fx)
    link.advance(link.now + 1.0)
    [owner] = [
        i for i in range(2) for s in link.commands_of(i, StartExecution) if s.task_id == task_id
    ]
    return task_id, owner, link.now


def complete(link: Link, owner: int, task_id: bytes, output: bytes = b"answer") -> float:
    """Complete the execution; return when (the time the task became final at its owner)."""
    link.run(owner, link.node(owner).complete(link.now, task_id, 1, "ok", output))
    return link.now


def persists(link: Link, i: int) -> list[Persist]:
    return [p for a, fx in link.effects if a == addr(i) for p in fx.persists]


def test_a_final_task_is_compacted_exactly_after_the_retention() -> None:
    link = pair()
    task_id, owner, _ = run_task(link, "a")
    done = complete(link, owner, task_id)
    link.advance(done + RETENTION - 0.001)
    assert link.node(owner).task(task_id) is not None
    assert link.node(owner).tombstone(task_id) is None
    link.advance(done + RETENTION)
    node = link.node(owner)
    assert node.task(task_id) is None
    stone = node.tombstone(task_id)
    assert stone is not None
    assert (stone.state, stone.outcome, stone.epoch, stone.owner) == (
        "done",
        "ok",
        1,
        node_id(owner),
    )
    assert stone.output_digest == hashlib.sha256(b"answer").digest()[:16]
    assert stone.compacted_at == done + RETENTION
    assert node.task_counters()["tasks compacted"] == 1
    # The objects go and the tombstone comes in the same call (one transaction at the host).
    last = [p for p in persists(link, owner) if p.key.startswith(task_id)][-2:]
    assert [p.kind for p in last] == [PersistKind.FORGET_TASK, PersistKind.TOMBSTONE]
    assert decode_tombstone(task_id, last[1].value) == replace(
        stone, compacted_at=math.ceil(stone.compacted_at)
    )
    # The other peer became final a little later (the result's trip): it compacts on its own.
    link.advance(link.now + 1.0)
    assert link.node(1 - owner).tombstone(task_id) is not None


def test_a_non_final_parent_keeps_its_final_children() -> None:
    link = pair()
    parent, parent_owner, _ = run_task(link, "parent")
    child, child_owner, _ = run_task(link, "child", parent=parent)
    complete(link, child_owner, child)
    link.advance(link.now + 3 * RETENTION)
    for i in range(2):
        assert link.node(i).task(child) is not None
        assert link.node(i).tombstone(child) is None
    done = complete(link, parent_owner, parent)
    link.advance(done + RETENTION - 0.001)
    assert link.node(parent_owner).task(child) is not None
    link.advance(done + RETENTION)
    node = link.node(parent_owner)
    assert node.task(parent) is None and node.task(child) is None
    assert node.tombstone(child) is not None and node.tombstone(parent) is not None
    assert node.tombstone(child).parent == parent  # type: ignore[union-attr]


def test_late_objects_of_a_compacted_task_change_nothing_and_are_counted() -> None:
    link = pair()
    task_id, owner, _ = run_task(link, "late")
    record = link.node(0).task(task_id).record  # type: ignore[union-attr]
    assert record is not None
    done = complete(link, owner, task_id)
    link.advance(done + RETENTION + 1.0)
    for i in range(2):
        assert link.node(i).tombstone(task_id) is not None
    # A third, forgotten peer's copies arrive at peer 0: record, claim and result.
    late = (record, claim(2, task_id, 1), result(2, task_id, 1))
    fx = link.node(0).handle(link.now, addr(2), envelope(2, *late))
    assert link.node(0).task(task_id) is None
    assert link.node(0).task_counters()["object of a compacted task"] == 3
    dropped = [n.reason for n in fx.notes if isinstance(n, Dropped)]
    assert dropped == ["object of a compacted task"] * 3
    assert not [p for p in fx.persists if p.key.startswith(task_id)]


def test_a_tombstone_is_forgotten_exactly_after_the_grace() -> None:
    link = pair()
    task_id, owner, _ = run_task(link, "grace")
    done = complete(link, owner, task_id)
    compacted = done + RETENTION
    link.advance(compacted + GRACE - 0.001)
    assert link.node(owner).tombstone(task_id) is not None
    link.advance(compacted + GRACE)
    assert link.node(owner).tombstone(task_id) is None
    assert link.node(owner).task_counters()["tombstones forgotten"] == 1
    assert persists(link, owner)[-1] == Persist(PersistKind.FORGET_TOMBSTONE, task_id, b"")


def test_tombstones_take_no_part_in_anti_entropy_and_differ_from_any_live_state() -> None:
    link = pair()
    task_id, owner, _ = run_task(link, "digest")
    done = complete(link, owner, task_id)
    live = link.node(owner).task(task_id)
    assert live is not None
    live_digest = live.digest()
    link.advance(done + RETENTION + 1.0)
    node = link.node(owner)
    stone = node.tombstone(task_id)
    assert stone is not None and stone.digest() != live_digest
    other = link.node(1 - owner)
    assert stone.digest() == other.tombstone(task_id).digest()  # type: ignore[union-attr]
    summary = node.tasks.shard_summary(node_id(1 - owner))
    assert summary == other.tasks.shard_summary(node_id(owner))  # both compacted it
    assert task_id[0] not in dict(summary.shards)  # never compared: nothing would be sent


def test_restore_replays_tombstones_first_and_drops_the_compacted_tasks_objects() -> None:
    link = pair()
    task_id, owner, _ = run_task(link, "restore")
    record = link.node(0).task(task_id).record  # type: ignore[union-attr]
    assert record is not None
    done = complete(link, owner, task_id)
    link.advance(done + RETENTION)
    [stored] = [p.value for p in persists(link, owner) if p.kind == PersistKind.TOMBSTONE]
    now = link.now + 10.0
    node = Node(CONFIG, signer(owner), addr(owner), __import__("random").Random(1), now, 1)
    node.restore_tombstone(now, task_id, stored)
    fx = node.restore(now, encode_message(record))
    assert node.task(task_id) is None
    assert node.task_counters()["object of a compacted task"] == 1
    assert not fx.persists
    # Its grace still counts from the compaction (stored in whole seconds, rounded up): the
    # timer is armed for that moment.
    compacted = math.ceil(done + RETENTION)
    assert node.tombstone(task_id).compacted_at == compacted  # type: ignore[union-attr]
    assert node.tick(compacted + GRACE - 0.001) is not None
    assert node.tombstone(task_id) is not None
    node.tick(compacted + GRACE)
    assert node.tombstone(task_id) is None


def test_a_tombstone_from_before_a_clock_restart_counts_its_grace_from_the_restore() -> None:
    link = pair()
    task_id, owner, _ = run_task(link, "reboot")
    link.advance(complete(link, owner, task_id) + RETENTION)
    [stored] = [p.value for p in persists(link, owner) if p.kind == PersistKind.TOMBSTONE]
    now = 5.0  # the host's monotonic clock restarted with its machine
    node = Node(CONFIG, signer(owner), addr(owner), __import__("random").Random(1), now, 1)
    node.restore_tombstone(now, task_id, stored)
    assert node.tombstone(task_id).compacted_at == now  # type: ignore[union-attr]
    node.tick(now + GRACE - 0.001)
    assert node.tombstone(task_id) is not None
    node.tick(now + GRACE)
    assert node.tombstone(task_id) is None


def test_an_unreadable_stored_tombstone_is_dropped() -> None:
    node = Node(CONFIG, signer(0), addr(0), __import__("random").Random(1), 0.0)
    fx = node.restore_tombstone(0.0, bytes(32), b"\x93\x01\x02\x03")
    assert [n.reason for n in fx.notes if isinstance(n, Dropped)] == [
        "unreadable stored tombstone: a tombstone of format 1 with 3 fields"
    ]
    with pytest.raises(TombstoneError):
        decode_tombstone(bytes(32), b"\xc1")


STONE = Tombstone(
    bytes(range(32)), "failed", "error", 3, b"o" * 32, b"d" * 16, b"i" * 16, b"p" * 32, 7.0
)


def test_a_tombstone_is_stored_without_its_task_id_and_read_back_under_it() -> None:
    raw = STONE.encode()
    assert STONE.task_id not in raw and len(raw) < 120
    assert decode_tombstone(STONE.task_id, raw) == STONE


def test_a_format_one_tombstone_is_still_read_with_its_digests_cut_to_the_kept_length() -> None:
    # What the previous release stored: the task id inside, full SHA-256 digests, float time.
    old = msgpack.packb(
        [1, STONE.task_id, "failed", "error", 3, b"o" * 32, b"d" * 32, b"i" * 32, b"p" * 32, 7.0]
    )
    stone = decode_tombstone(STONE.task_id, old)
    assert stone == STONE and stone.digest() == STONE.digest()
    with pytest.raises(TombstoneError, match="another task"):
        decode_tombstone(bytes(32), old)


@pytest.mark.parametrize(
    "fields",
    [
        [2, 3, "error", 3, b"", b"", b"", b"", 7],  # no fourth state
        [2, True, "error", 3, b"", b"", b"", b"", 7],  # a bool is not a state's position
        [2, 0, 5, 3, b"", b"", b"", b"", 7],  # outcome not text
        [2, 0, "ok", 3, b"", b"", b"", b"", "later"],  # time not a number
        [2, 0, "ok", 3, b"", b"", b"", b""],  # a field short
        [3, 0, "ok", 3, b"", b"", b"", b"", 7],  # a format from the future
    ],
)
def test_a_malformed_stored_tombstone_is_refused(fields: list[object]) -> None:
    with pytest.raises(TombstoneError):
        decode_tombstone(STONE.task_id, msgpack.packb(fields))


@pytest.mark.parametrize(
    ("last_contact", "now", "outlived"),
    [
        (None, 1e9, False),  # never saw another member: a network of one keeps its tasks
        (1000.0, 1000.0, False),
        (1000.0, 1000.0 + RETENTION + GRACE, False),  # exactly the window: still remembered
        (1000.0, 1000.0 + RETENTION + GRACE + 1, True),
    ],
)
def test_copies_outlive_the_network_after_retention_plus_grace_away(
    last_contact: float | None, now: float, outlived: bool
) -> None:
    assert copies_outlived(last_contact, now, RETENTION, GRACE) is outlived


def test_retention_and_grace_must_be_positive() -> None:
    for field in ("retention", "tombstone_grace"):
        with pytest.raises(Exception, match=field):
            replace(lan(), tasks=replace(TaskConfig(), **{field: 0.0})).validate()
