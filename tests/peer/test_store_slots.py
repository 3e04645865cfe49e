"""Task rows sit in the store in the order they were first written (`peer.runtime.store_slots`,
decision 83): appended at one edge of the B-tree, compacted at the other, whatever the ids."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path

import pytest

from peer.runtime.store import DB_NAME, MIGRATIONS, Store
from protocol.effects import Persist, PersistKind
from tests.peer.old_stores import database_at_version


def tid(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(4, "big")).digest()


def stored_order(path: Path, table: str) -> list[tuple[int, bytes]]:
    column = "substr(key, 1, 32)" if table == "task_objects" else "task_id"
    db = sqlite3.connect(path / DB_NAME)
    try:
        return [
            (int(slot), bytes(task_id))
            for slot, task_id in db.execute(f"SELECT slot, {column} FROM {table} ORDER BY slot")
        ]
    finally:
        db.close()


def test_a_tasks_rows_share_one_slot_and_slots_follow_the_order_of_writing(tmp_path: Path) -> None:
    ids = [tid(n) for n in range(6)]
    with Store.open(tmp_path) as store:
        for task_id in ids:
            store.put_many([Persist(PersistKind.TASK, task_id, b"record")])
        # Later objects of the first task join its slot, whatever came in between.
        store.put_many([Persist(PersistKind.CLAIM, ids[0] + b"\x00" * 48, b"claim")])
        store.put_many([Persist(PersistKind.RESULT, ids[0] + b"\x01" * 48, b"result")])
        # A compaction: forget, then tombstone; tombstones take slots in compaction order.
        for task_id in (ids[3], ids[1]):
            store.put_many(
                [
                    Persist(PersistKind.FORGET_TASK, task_id, b""),
                    Persist(PersistKind.TOMBSTONE, task_id, b"stone"),
                ]
            )
    objects = stored_order(tmp_path, "task_objects")
    assert [task_id for _, task_id in objects] == [ids[0]] * 3 + [ids[2], ids[4], ids[5]]
    assert objects[0][0] == objects[1][0] == objects[2][0] < objects[3][0]
    stones = stored_order(tmp_path, "task_tombstones")
    assert [task_id for _, task_id in stones] == [ids[3], ids[1]]
    assert stones[0][0] > objects[-1][0]  # a slot is never shared between two tasks


def test_slots_are_read_back_at_open_and_new_ones_come_after_them(tmp_path: Path) -> None:
    ids = [tid(n) for n in range(4)]
    with Store.open(tmp_path) as store:
        store.put_many([Persist(PersistKind.TASK, task_id, b"record") for task_id in ids[:3]])
        store.put_many(
            [
                Persist(PersistKind.FORGET_TASK, ids[2], b""),
                Persist(PersistKind.TOMBSTONE, ids[2], b"stone"),
            ]
        )
    with Store.open(tmp_path) as store:
        store.put_many(
            [
                Persist(PersistKind.CHECKPOINT, ids[1] + b"\x02" * 60, b"step"),
                Persist(PersistKind.TASK, ids[3], b"later"),
                Persist(PersistKind.FORGET_TASK, ids[0], b""),
                Persist(PersistKind.FORGET_TOMBSTONE, ids[2], b""),
            ]
        )
        assert list(store.scan(PersistKind.TASK)) == sorted(
            [(ids[1], b"record"), (ids[3], b"later")]
        )
        assert store.get(PersistKind.CHECKPOINT, ids[1] + b"\x02" * 60) == b"step"
        assert list(store.scan(PersistKind.TOMBSTONE)) == []
    objects = stored_order(tmp_path, "task_objects")
    assert [task_id for _, task_id in objects] == [ids[1], ids[1], ids[3]]
    assert objects[0][0] == objects[1][0] < objects[2][0]


def test_a_failed_write_leaves_the_slots_as_committed(tmp_path: Path) -> None:
    old, new = tid(1), tid(2)
    with Store.open(tmp_path) as store:
        store.put_many([Persist(PersistKind.TASK, old, b"kept")])
        with pytest.raises(TypeError):
            store.put_many(
                [
                    Persist(PersistKind.TASK, new, b"never stored"),
                    Persist(PersistKind.FORGET_TASK, old, b""),
                    Persist(PersistKind.TASK, "not bytes", b"x"),  # type: ignore[arg-type]
                ]
            )
        assert list(store.scan(PersistKind.TASK)) == [(old, b"kept")]
        # Had the failed batch's forget been kept in memory, the old task's rows would now be
        # out of reach: a later forget would find no slot and leave them for ever.
        store.put_many([Persist(PersistKind.CLAIM, old + b"\x00" * 48, b"claim")])
        store.put_many([Persist(PersistKind.FORGET_TASK, old, b"")])
        assert list(store.scan(PersistKind.TASK)) == list(store.scan(PersistKind.CLAIM)) == []
        store.put_many([Persist(PersistKind.TASK, new, b"now")])
        assert store.get(PersistKind.TASK, new) == b"now"


def test_forgetting_whole_kinds_keeps_the_slots_of_what_is_left(tmp_path: Path) -> None:
    a, b = tid(1), tid(2)
    with Store.open(tmp_path) as store:
        store.put_many(
            [
                Persist(PersistKind.TASK, a, b"record"),
                Persist(PersistKind.GRANT, a + b"\x00" * 40, b"grant"),
                Persist(PersistKind.TOMBSTONE, b, b"stone"),
            ]
        )
        assert store.forget_kinds([PersistKind.TASK, PersistKind.TOMBSTONE]) == 2
        store.put_many([Persist(PersistKind.FORGET_TASK, a, b"")])
        assert list(store.scan(PersistKind.GRANT)) == []


def test_task_rows_and_tombstones_of_schema_3_move_to_the_slotted_tables(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live, other, stone = tid(1), tid(2), tid(3)
    insert = "INSERT INTO records VALUES (?, ?, ?)"
    database_at_version(
        tmp_path,
        3,
        [
            (insert, ("task", live, b"record")),
            (insert, ("claim", live + b"\x00" * 48, b"claim")),
            (insert, ("epoch-grant", other + b"\x00" * 40, b"grant")),
            (insert, ("incarnation", b"self", b"\x07")),
            ("INSERT INTO tombstones VALUES (?, ?)", (stone, b"stone")),
        ],
    )
    with caplog.at_level(logging.INFO, logger="peer.runtime.store"), Store.open(tmp_path) as store:
        assert f"from schema version 3 to {len(MIGRATIONS)}" in caplog.text
        assert store.schema_version() == len(MIGRATIONS)
        assert list(store.scan(PersistKind.TASK)) == [(live, b"record")]
        assert list(store.scan(PersistKind.CLAIM)) == [(live + b"\x00" * 48, b"claim")]
        assert list(store.scan(PersistKind.EPOCH_GRANT)) == [(other + b"\x00" * 40, b"grant")]
        assert list(store.scan(PersistKind.TOMBSTONE)) == [(stone, b"stone")]
        assert store.get(PersistKind.INCARNATION, b"self") == b"\x07"
        store.put_many(
            [
                Persist(PersistKind.FORGET_TASK, live, b""),
                Persist(PersistKind.FORGET_TOMBSTONE, stone, b""),
                Persist(PersistKind.TASK, tid(4), b"new"),
            ]
        )
        assert list(store.scan(PersistKind.CLAIM)) == list(store.scan(PersistKind.TOMBSTONE)) == []
    slots = dict((task_id, slot) for slot, task_id in stored_order(tmp_path, "task_objects"))
    assert set(slots) == {other, tid(4)} and slots[tid(4)] > slots[other]
    db = sqlite3.connect(tmp_path / DB_NAME)
    try:
        kinds = [row[0] for row in db.execute("SELECT kind FROM records")]
        assert kinds == ["incarnation"]
    finally:
        db.close()
