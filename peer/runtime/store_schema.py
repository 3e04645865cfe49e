"""The database file of a peer's store: its schema migrations, and opening it checked.

See `peer.runtime.store` for the guarantees; this is what a database looks like on disk.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from peer.runtime.store_errors import StoreError

WAL_SIZE_LIMIT = 4 * 1024 * 1024
"""Bytes the write-ahead log file is cut back to each time SQLite starts it over after a
checkpoint (`PRAGMA journal_size_limit`). SQLite checkpoints at about 4 MB of log (1,000
pages) but otherwise keeps the file at the largest size it ever reached: one large batch (a
burst of compactions, a replica sync) left it there for the rest of the run, and the data
directory crept up by megabytes per peer over a long soak."""
SYNCHRONOUS_NAMES = {0: "off", 1: "normal", 2: "full", 3: "extra"}
"""SQLite's `PRAGMA synchronous` levels by number."""

_V4_TASK_KINDS = (
    "'task', 'claim', 'checkpoint', 'result', 'cancel', 'execution', 'epoch-grant', 'grant'"
)
"""The kinds of task object stored when version 4 moved them to `task_objects` (literal: a
released migration never changes)."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
        (
            "CREATE TABLE members ("
            " node_id BLOB PRIMARY KEY, addr TEXT NOT NULL, last_seen INTEGER NOT NULL"
            ") WITHOUT ROWID"
        ),
        (
            "CREATE TABLE records ("
            " kind TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,"
            " PRIMARY KEY (kind, key)"
            ") WITHOUT ROWID"
        ),
    ),
    (
        # Model usage totals per model and server (calls, tokens, spend), kept across
        # restarts so what the network cost does not start over at zero (decision 52).
        "CREATE TABLE model_usage (key TEXT PRIMARY KEY, totals TEXT NOT NULL) WITHOUT ROWID",
    ),
    (
        # Tombstones in a table of their own, keyed by task id alone: a peer keeps one for
        # every task it compacted within the grace period, and the kind name repeated in each
        # row of `records` was a tenth of a tombstone's size (decision 57).
        ("CREATE TABLE tombstones ( task_id BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"),
        "INSERT INTO tombstones SELECT key, value FROM records WHERE kind = 'tombstone'",
        "DELETE FROM records WHERE kind = 'tombstone'",
    ),
    (
        # Task objects and tombstones keyed first by a slot number that grows with time, so
        # writes append at one edge of the B-tree and compaction deletes at the other
        # (`peer.runtime.store_slots`, decision 83). Rows already stored get slots in the
        # order of their task ids: their arrival order was never kept.
        (
            "CREATE TABLE task_objects ("
            " slot INTEGER NOT NULL, kind TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,"
            " PRIMARY KEY (slot, kind, key)"
            ") WITHOUT ROWID"
        ),
        (
            "CREATE TABLE task_tombstones ("
            " slot INTEGER NOT NULL, task_id BLOB NOT NULL, value BLOB NOT NULL,"
            " PRIMARY KEY (slot, task_id)"
            ") WITHOUT ROWID"
        ),
        "CREATE TEMP TABLE object_slots (task_id BLOB PRIMARY KEY, slot INTEGER) WITHOUT ROWID",
        (
            "INSERT INTO object_slots SELECT task_id, row_number() OVER (ORDER BY task_id)"
            " FROM (SELECT DISTINCT substr(key, 1, 32) AS task_id FROM records"
            f" WHERE kind IN ({_V4_TASK_KINDS}))"
        ),
        (
            "INSERT INTO task_objects SELECT s.slot, r.kind, r.key, r.value"
            " FROM records AS r JOIN object_slots AS s ON s.task_id = substr(r.key, 1, 32)"
            f" WHERE r.kind IN ({_V4_TASK_KINDS})"
        ),
        (
            "INSERT INTO task_tombstones SELECT"
            " (SELECT count(*) FROM object_slots) + row_number() OVER (ORDER BY task_id),"
            " task_id, value FROM tombstones"
        ),
        f"DELETE FROM records WHERE kind IN ({_V4_TASK_KINDS})",
        "DROP TABLE object_slots",
        "DROP TABLE tombstones",
    ),
)
"""Append-only schema migrations; each entry is the statements of one version step."""


def connect(path: Path) -> sqlite3.Connection:
    """Open the database at `path` in WAL mode with ``synchronous=FULL``, checked.

    Raises:
        StoreError: it cannot be opened or read, or `PRAGMA quick_check` finds damage; the
            message names the file and says what to do.
    """
    try:
        # Used from the writer thread too, one call at a time (`_mutex`).
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(unusable(path, str(exc))) from exc
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path}: cannot enable WAL (got {mode!r})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        problems = [str(row[0]) for row in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise StoreError(unusable(path, "; ".join(problems)))
    except sqlite3.Error as exc:
        db.close()
        raise StoreError(unusable(path, str(exc))) from exc
    except BaseException:
        db.close()
        raise
    return db


def unusable(path: Path, why: str) -> str:
    """The one line that says a database cannot be used, why, and what to do about it."""
    # The -wal and -shm files must go too: SQLite would replay an old log into a new database.
    return (
        f"the database {path} cannot be used ({why}); if it is damaged, move it and its -wal "
        f"and -shm files out of {path.parent} and start again: the peer keeps its identity "
        "and gets the network's tasks again"
    )
