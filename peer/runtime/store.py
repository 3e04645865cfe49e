"""Durable state of one peer: SQLite (WAL) in its data directory, plus its identity key file.

Invariants:
- One process owns a data directory at a time: `Store.open` takes an exclusive `flock` on
  ``<data_dir>/lock`` and refuses a directory another process holds. The kernel drops the lock
  when the process dies, even by SIGKILL.
- Every public write is one transaction: it is wholly on disk or wholly absent, and it is
  committed and fsynced before the method returns. A write that fails (disk full, I/O error)
  raises `StoreWriteError` and leaves nothing of itself behind, and the store stays usable.
- A database that cannot be read (corrupt, not a database, unreadable) is refused at `open`
  with a `StoreError` naming the file and what to do; `PRAGMA quick_check` runs at every open,
  so a damaged page is found then, not in the middle of a run.
- The identity key file is created once, atomically, and never rewritten; a key file
  readable by group or others is refused, not used (`peer.runtime.identity_file`).
- The boot counter only increases, and the stored incarnation never decreases.
- At most `MAX_MEMBERS` membership hints are kept, the most recently seen.

Durability. Acknowledged means fsynced (docs/decisions.md, "Acknowledged means fsynced"):
the database runs with ``journal_mode=WAL`` and ``synchronous=FULL``, so SQLite fsyncs the
write-ahead log at every commit and a committed transaction survives power loss and OS
crashes, not only the death of the process. That costs one fsync per commit (about 0.15 ms on
this project's test machine, milliseconds on slow disks); no setting lowers it, so that an
acknowledgement means the same on every peer.

Threading. A `Store` may be called from several threads, one call at a time: a lock
serializes every use of the connection, so a transaction never interleaves with another. The
peer writes its task records from one writer thread (`peer.runtime.group_commit`, decision
66), so that fsyncs do not stall the event loop; its other calls (membership hints, usage) are
few and run on the loop, waiting at most for the write in flight.

Layout. Task objects (`task_objects`) and tombstones (`task_tombstones`) are keyed first by a
slot, a number given in the order a task's rows are first written (`peer.runtime.store_slots`):
writes append at one edge of each B-tree and compaction deletes at the other, so a commit
touches a few pages however many tasks are held (decision 83). Other records (`records`) are
keyed by kind and key.

Schema. `MIGRATIONS` is append-only: entry *i* brings the database from version *i* to *i + 1*.
Add tables by appending an entry; never edit a released one. A database newer than this code
is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Concatenate, ParamSpec, Self, TypeVar

from peer.runtime.identity_file import IDENTITY_NAME, load_or_create_identity
from peer.runtime.store_errors import StoreError, StoreWriteError
from peer.runtime.store_schema import MIGRATIONS, SYNCHRONOUS_NAMES, WAL_SIZE_LIMIT, connect
from peer.runtime.store_slots import TASK_ID_BYTES, Slots
from protocol.effects import Persist, PersistKind

__all__ = [
    "IDENTITY_NAME",
    "MIGRATIONS",
    "WAL_SIZE_LIMIT",
    "Store",
    "StoreError",
    "StoreWriteError",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

DB_NAME = "grapevine.db"
LOCK_NAME = "lock"
MAX_MEMBERS = 1024
"""Membership hints kept for re-joining after a restart; enough to find a live peer among
a large network's most recently seen members."""


def _serialized(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    """`method`, holding the store's lock (see Threading in the module docstring)."""

    def serialized(store: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with store._mutex:
            return method(store, *args, **kwargs)

    serialized.__name__, serialized.__qualname__ = method.__name__, method.__qualname__
    serialized.__doc__ = method.__doc__
    return serialized


class Store:
    """A peer's durable state; see the module docstring for its guarantees."""

    __slots__ = ("_db", "_lock_fd", "_mutex", "_slots", "data_dir", "on_write")

    def __init__(self, data_dir: Path, db: sqlite3.Connection, lock_fd: int) -> None:
        """Wrap an already-open database; use `Store.open` instead."""
        self.data_dir = data_dir
        self._db = db
        self._lock_fd = lock_fd
        self._mutex = threading.RLock()
        """Held by every use of `_db` (see Threading in the module docstring)."""
        self._slots = Slots()
        """Where each task's rows sit (`peer.runtime.store_slots`); read at `open`."""
        self.on_write: Callable[[float], None] | None = None
        """Called with the seconds each committed write transaction took (fsync included):
        the peer's `grapevine_store_write_seconds`."""

    @classmethod
    def open(cls, data_dir: Path) -> Store:
        """Open (creating if needed) the store in `data_dir`.

        Args:
            data_dir: the peer's data directory; created with mode 0700 if missing.

        Returns:
            The open store, checked (`PRAGMA quick_check`) and its schema migrated to the
            current version.

        Raises:
            StoreError: another process holds the directory; the database is corrupt, not a
                database or unreadable; or it was written by a newer version of Grapevine.
            StoreWriteError: the migration could not be written (disk full, I/O error).
            OSError: the directory or its lock file cannot be created or opened.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreError(
                f"data directory {data_dir} is in use by another process; "
                "stop it or choose another --data-dir"
            ) from None
        try:
            store = cls(data_dir, connect(data_dir / DB_NAME), lock_fd)
            try:
                store._migrate()
                store._slots.load(store._db)
            except BaseException:
                store._db.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        return store

    def _migrate(self) -> None:
        with self._transaction():
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.data_dir / DB_NAME} has schema version {version}, newer than this "
                    f"Grapevine understands ({len(MIGRATIONS)}); upgrade Grapevine"
                )
            if version == len(MIGRATIONS):
                return  # nothing to write, so a store on a full disk still opens for reading
            if version > 0:
                # Moving rows to new tables takes seconds per 100,000 tasks held: say why the
                # peer is not up yet.
                log.info(
                    "upgrading %s from schema version %d to %d (once; a large store takes a while)",
                    self.data_dir / DB_NAME,
                    version,
                    len(MIGRATIONS),
                )
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    self._db.execute(statement)
            self._db.execute("DELETE FROM schema_version")
            self._db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))

    @_serialized
    def schema_version(self) -> int:
        """Return the database's schema version (`len(MIGRATIONS)` once open)."""
        return int(self._db.execute("SELECT version FROM schema_version").fetchone()[0])

    @_serialized
    def journal_mode(self) -> str:
        """Return SQLite's journal mode for the database ("wal")."""
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    @_serialized
    def synchronous(self) -> str:
        """Return SQLite's synchronous setting for the connection ("full")."""
        level = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        return SYNCHRONOUS_NAMES.get(level, str(level))

    # Identity

    def load_or_create_identity(self) -> bytes:
        """Return this peer's raw 32-byte Ed25519 private key, creating it on first use
        (`peer.runtime.identity_file`)."""
        return load_or_create_identity(self.data_dir)

    # Boot counter and incarnation

    def next_boot(self) -> int:
        """Increment and return the persisted boot counter (1 on the first boot).

        Returns:
            A number greater than any earlier call on this data directory returned.
        """
        with self._transaction():
            row = self._db.execute(
                "INSERT INTO counters VALUES ('boot', 1)"
                " ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
            ).fetchone()
        return int(row[0])

    def save_incarnation(self, incarnation: int) -> None:
        """Record `incarnation` unless a greater one is already stored (max-merge).

        Raises:
            ValueError: `incarnation` is negative or does not fit in 63 bits.
        """
        if not 0 <= incarnation < 2**63:
            raise ValueError(f"an incarnation is a non-negative 63-bit integer, got {incarnation}")
        with self._transaction():
            self._db.execute(
                "INSERT INTO counters VALUES ('incarnation', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                (incarnation,),
            )

    @_serialized
    def load_incarnation(self) -> int:
        """Return the greatest incarnation ever saved, or 0."""
        row = self._db.execute("SELECT value FROM counters WHERE name = 'incarnation'").fetchone()
        return 0 if row is None else int(row[0])

    # Membership hints

    def save_members(self, rows: Iterable[tuple[bytes, str, int]]) -> None:
        """Replace the membership hints with `rows`, keeping the `MAX_MEMBERS` most recent.

        Args:
            rows: ``(node_id, addr, last_seen_unix)``; for a node id given twice, the most
                recently seen row wins.
        """
        latest: dict[bytes, tuple[bytes, str, int]] = {}
        for node_id, addr, last_seen in rows:
            known = latest.get(node_id)
            if known is None or last_seen > known[2]:
                latest[node_id] = (bytes(node_id), addr, int(last_seen))
        kept = sorted(latest.values(), key=lambda row: row[2], reverse=True)[:MAX_MEMBERS]
        with self._transaction():
            self._db.execute("DELETE FROM members")
            self._db.executemany("INSERT INTO members VALUES (?, ?, ?)", kept)

    @_serialized
    def load_members(self) -> list[tuple[bytes, str, int]]:
        """Return the membership hints, most recently seen first."""
        return [
            (bytes(node_id), str(addr), int(last_seen))
            for node_id, addr, last_seen in self._db.execute(
                "SELECT node_id, addr, last_seen FROM members ORDER BY last_seen DESC, node_id"
            )
        ]

    # Model usage

    def save_model_usage(self, usage: Mapping[str, Mapping[str, object]]) -> None:
        """Replace the saved model usage totals with `usage` (stats key -> JSON-able totals,
        `peer.agents.llm.ModelClient.usage_totals`)."""
        rows = [(key, json.dumps(dict(totals), sort_keys=True)) for key, totals in usage.items()]
        with self._transaction():
            self._db.execute("DELETE FROM model_usage")
            self._db.executemany("INSERT INTO model_usage VALUES (?, ?)", rows)

    @_serialized
    def load_model_usage(self) -> dict[str, dict[str, object]]:
        """Return the saved model usage totals; a row that is not a JSON object is skipped
        (logged): usage is a tally, not worth refusing to start over."""
        out: dict[str, dict[str, object]] = {}
        for key, text in self._db.execute("SELECT key, totals FROM model_usage ORDER BY key"):
            try:
                totals = json.loads(text)
            except ValueError:
                totals = None
            if not isinstance(totals, dict):
                log.warning("ignoring unreadable saved model usage of %r", key)
                continue
            out[str(key)] = totals
        return out

    # Records: the durable key-value space behind protocol.effects.Persist

    def put(self, kind: PersistKind, key: bytes, value: bytes) -> None:
        """Store `value` under (`kind`, `key`), replacing any earlier value, and commit.

        Raises:
            TypeError: `kind` is not a str or `key`/`value` are not bytes.
        """
        self.put_many([Persist(kind, key, value)])

    def put_many(self, records: Iterable[Persist]) -> None:
        """Store every record in one transaction: all of them are committed, or none.

        Args:
            records: the `Persist` effects to apply, in order (a later record for the same
                kind and key wins). A `PersistKind.FORGET_TASK` record is a deletion: every
                record whose key starts with its key (a task id) is removed, in the same
                transaction, at its place in the order; a `PersistKind.FORGET_TOMBSTONE` one
                removes the tombstone stored under its key.

        Raises:
            TypeError: a record has a non-str kind or non-bytes key or value; nothing of the
                batch is written.
            StoreWriteError: the batch could not be committed (disk full, I/O error); nothing
                of it is written.
        """
        with self._transaction():
            for record in records:
                kind, key, value = record.kind, record.key, record.value
                if not isinstance(kind, str) or not isinstance(key, bytes | bytearray):
                    raise TypeError(f"a record is (str kind, bytes key, ...), got {record!r:.200}")
                if not isinstance(value, bytes | bytearray):
                    raise TypeError(f"a record's value must be bytes, got {type(value).__name__}")
                if kind == PersistKind.FORGET_TASK:
                    self._forget_task(bytes(key))
                    continue
                if kind == PersistKind.FORGET_TOMBSTONE:
                    slot = self._slots.forget_tombstone(bytes(key))
                    if slot is not None:
                        self._db.execute(FORGET_TOMBSTONE_STATEMENT, (slot,))
                    continue
                if kind == PersistKind.TOMBSTONE:
                    key = bytes(key)
                    self._db.execute(
                        "INSERT OR REPLACE INTO task_tombstones VALUES (?, ?, ?)",
                        (self._slots.tombstone_slot(key), key, bytes(value)),
                    )
                    continue
                if kind in TASK_KIND_NAMES:
                    key = bytes(key)
                    self._db.execute(
                        "INSERT OR REPLACE INTO task_objects VALUES (?, ?, ?, ?)",
                        (self._slots.object_slot(key[:TASK_ID_BYTES]), kind, key, bytes(value)),
                    )
                    continue
                self._db.execute(
                    "INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                    (kind, bytes(key), bytes(value)),
                )

    def _forget_task(self, task_id: bytes) -> None:
        # A task's objects share its slot: one search of the primary key finds them all,
        # at the old edge of the table where compaction works (decision 83).
        slot = self._slots.forget_objects(task_id)
        if slot is not None:
            self._db.execute(FORGET_TASK_STATEMENT, (slot,))

    @_serialized
    def last_contact(self) -> int | None:
        """When this peer last saw another member up (the newest membership hint, wall-clock
        seconds), or None if it never saw one."""
        row = self._db.execute("SELECT max(last_seen) FROM members").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def forget_kinds(self, kinds: Iterable[str]) -> int:
        """Delete every record of these kinds in one transaction; return how many."""
        names = [str(kind) for kind in kinds]
        marks = ", ".join("?" * len(names))
        with self._transaction():
            count = int(
                self._db.execute(f"DELETE FROM records WHERE kind IN ({marks})", names).rowcount
            )
            count += int(
                self._db.execute(
                    f"DELETE FROM task_objects WHERE kind IN ({marks})", names
                ).rowcount
            )
            if PersistKind.TOMBSTONE in names:
                count += int(self._db.execute("DELETE FROM task_tombstones").rowcount)
        with self._mutex:  # read back once committed: the slots describe what is on disk
            self._slots.load(self._db)
        return count

    @_serialized
    def get(self, kind: str, key: bytes) -> bytes | None:
        """Return the value stored under (`kind`, a `PersistKind`, and `key`), or None."""
        key = bytes(key)
        params: tuple[object, ...]
        if kind == PersistKind.TOMBSTONE:
            slot = self._slots.tombstones.get(key)
            if slot is None:
                return None
            query = "SELECT value FROM task_tombstones WHERE slot = ? AND task_id = ?"
            params = (slot, key)
        elif kind in TASK_KIND_NAMES:
            slot = self._slots.objects.get(key[:TASK_ID_BYTES])
            if slot is None:
                return None
            query = "SELECT value FROM task_objects WHERE slot = ? AND kind = ? AND key = ?"
            params = (slot, kind, key)
        else:
            query = "SELECT value FROM records WHERE kind = ? AND key = ?"
            params = (kind, key)
        row = self._db.execute(query, params).fetchone()
        return None if row is None else bytes(row[0])

    @_serialized
    def scan(self, kind: str) -> Iterator[tuple[bytes, bytes]]:
        """Return every (key, value) of `kind`, ordered by key.

        The rows are read when this is called, so writing to the store while iterating is
        safe and does not affect the iteration.
        """
        if kind == PersistKind.TOMBSTONE:
            rows = self._db.execute(
                "SELECT task_id, value FROM task_tombstones ORDER BY task_id"
            ).fetchall()
        elif kind in TASK_KIND_NAMES:
            rows = self._db.execute(
                "SELECT key, value FROM task_objects WHERE kind = ? ORDER BY key", (kind,)
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT key, value FROM records WHERE kind = ? ORDER BY key", (kind,)
            ).fetchall()
        return iter([(bytes(key), bytes(value)) for key, value in rows])

    # Lifecycle

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # The connection runs with isolation_level=None so that transactions are exactly
        # the ones opened here, never implicit ones from the sqlite3 module.
        with self._mutex:
            began = time.perf_counter()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield
                    self._db.execute("COMMIT")
                except BaseException:
                    self._slots.rollback()
                    # A COMMIT that failed on a full disk may or may not have rolled back already
                    # (SQLite's documentation); left open, it would fail every later BEGIN.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                self._slots.commit()
            except sqlite3.Error as exc:
                raise StoreWriteError(
                    f"writing {self.data_dir / DB_NAME} failed: {exc}; nothing of it was stored"
                ) from exc
            if self.on_write is not None:
                self.on_write(time.perf_counter() - began)

    @_serialized
    def close(self) -> None:
        """Close the database and release the data directory; idempotent."""
        if self._lock_fd < 0:
            return
        self._db.close()
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


_TASK_KINDS = (
    PersistKind.TASK,
    PersistKind.CLAIM,
    PersistKind.CHECKPOINT,
    PersistKind.RESULT,
    PersistKind.CANCEL,
    PersistKind.EXECUTION,
    PersistKind.EPOCH_GRANT,
    PersistKind.GRANT,
)
"""The kinds of task object: stored in `task_objects` under their task's slot, and deleted
together when the task is forgotten (its tombstone is kept in a table of its own)."""
TASK_KIND_NAMES = frozenset(kind.value for kind in _TASK_KINDS)
"""The stored names of those kinds."""
FORGET_TASK_STATEMENT = "DELETE FROM task_objects WHERE slot = ?"
"""Forgetting a task: every object in its slot, one primary-key search."""
FORGET_TOMBSTONE_STATEMENT = "DELETE FROM task_tombstones WHERE slot = ?"
"""Forgetting a tombstone: its slot, one primary-key search."""
