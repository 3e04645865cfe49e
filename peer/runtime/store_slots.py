"""Slots: where a task's rows sit in the store, numbered in the order they were first written.

A task id is a SHA-256 digest, so rows keyed by it land on random pages of SQLite's B-trees:
every commit of a busy peer dirtied a page per row written or deleted, and as the tables grew
past the page cache each commit wrote and fsynced more. A 3-peer soak's commits cost twice as
much in its steady state as on its empty start (decision 82). Rows keyed first by a number
that grows with time are appended at one edge of the tree and compacted away at the other,
so a commit touches a few pages whatever the table's size (decision 83).

Invariants:
- Every task with rows in `task_objects` has exactly one object slot here, and every task with
  a tombstone in `task_tombstones` exactly one tombstone slot; no two tasks hold one slot.
- A change made within a transaction is undone if the transaction fails (`rollback`), so what
  is here always describes what is committed.
"""

from __future__ import annotations

import sqlite3
from typing import Final

TASK_ID_BYTES: Final = 32
"""A task id is a SHA-256 digest (`protocol.tasks.messages.task_id_of`); the key of every
task object starts with it."""


class Slots:
    """Object and tombstone slots of the tasks a store holds (see the module invariants)."""

    __slots__ = ("_next", "_undo", "objects", "tombstones")

    def __init__(self) -> None:
        self.objects: dict[bytes, int] = {}
        """Task id -> the slot of its objects (its record, claims, results, grants, ...)."""
        self.tombstones: dict[bytes, int] = {}
        """Task id -> the slot of its tombstone."""
        self._next = 1
        self._undo: list[tuple[dict[bytes, int], bytes, int | None]] = []

    def load(self, db: sqlite3.Connection) -> None:
        """Read the slots of what `db` holds (at open, or after a bulk delete)."""
        self.objects = {
            bytes(task_id): int(slot)
            for slot, task_id in db.execute(
                f"SELECT DISTINCT slot, substr(key, 1, {TASK_ID_BYTES}) FROM task_objects"
            )
        }
        self.tombstones = {
            bytes(task_id): int(slot)
            for slot, task_id in db.execute("SELECT slot, task_id FROM task_tombstones")
        }
        highest = db.execute(
            "SELECT max(coalesce((SELECT max(slot) FROM task_objects), 0),"
            " coalesce((SELECT max(slot) FROM task_tombstones), 0))"
        ).fetchone()[0]
        self._next = int(highest) + 1
        self._undo.clear()

    def object_slot(self, task_id: bytes) -> int:
        """The slot of the task's objects, a new one (the next) if it has none."""
        return self._slot(self.objects, task_id)

    def tombstone_slot(self, task_id: bytes) -> int:
        """The slot of the task's tombstone, a new one (the next) if it has none."""
        return self._slot(self.tombstones, task_id)

    def forget_objects(self, task_id: bytes) -> int | None:
        """Remove and return the slot of the task's objects (None: it has none)."""
        return self._pop(self.objects, task_id)

    def forget_tombstone(self, task_id: bytes) -> int | None:
        """Remove and return the slot of the task's tombstone (None: it has none)."""
        return self._pop(self.tombstones, task_id)

    def _pop(self, slots: dict[bytes, int], task_id: bytes) -> int | None:
        slot = slots.pop(task_id, None)
        if slot is not None:
            self._undo.append((slots, task_id, slot))
        return slot

    def _slot(self, slots: dict[bytes, int], task_id: bytes) -> int:
        slot = slots.get(task_id)
        if slot is None:
            slot = slots[task_id] = self._next
            self._next += 1
            self._undo.append((slots, task_id, None))
        return slot

    def commit(self) -> None:
        """The transaction's changes are on disk: forget how to undo them."""
        self._undo.clear()

    def rollback(self) -> None:
        """The transaction failed: undo its changes, latest first. Slots handed out stay used
        (a later write takes the next), so none is given twice."""
        for slots, task_id, slot in reversed(self._undo):
            if slot is None:
                slots.pop(task_id, None)
            else:
                slots[task_id] = slot
        self._undo.clear()
