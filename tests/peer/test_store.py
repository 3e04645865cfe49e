"""SQLite store: identity file, counters, membership hints, records, crash durability."""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from peer.runtime.store import (
    DB_NAME,
    IDENTITY_NAME,
    MAX_MEMBERS,
    MIGRATIONS,
    WAL_SIZE_LIMIT,
    Store,
    StoreError,
)
from protocol.effects import Persist
from protocol.identity import Signer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "peer-data"


def test_open_creates_private_directory_and_wal_database(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
        assert (data_dir / DB_NAME).exists()
        assert store.journal_mode() == "wal"
        assert store.schema_version() == len(MIGRATIONS)


def test_every_commit_is_fsynced_synchronous_full(data_dir: Path) -> None:
    for _ in range(2):  # created, then reopened
        with Store.open(data_dir) as store:
            assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert store.synchronous() == "full"


def test_the_write_ahead_log_shrinks_back_after_a_large_batch(data_dir: Path) -> None:
    # Without a size limit SQLite keeps the -wal file at the largest size it ever reached.
    with Store.open(data_dir) as store:
        assert store._db.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_SIZE_LIMIT
        big = [Persist("task", i.to_bytes(4, "big"), os.urandom(4000)) for i in range(3000)]
        store.put_many(big)  # about 12 MB of log in one transaction
        wal = data_dir / f"{DB_NAME}-wal"
        assert wal.stat().st_size > 2 * WAL_SIZE_LIMIT
        for i in range(10):  # the log starts over at the next writes, and is cut back
            store.put("incarnation", b"self", i.to_bytes(8, "big"))
        assert wal.stat().st_size <= WAL_SIZE_LIMIT


def test_reopen_keeps_schema_and_refuses_newer_schema(data_dir: Path) -> None:
    Store.open(data_dir).close()
    with Store.open(data_dir) as store:
        assert store.schema_version() == len(MIGRATIONS)
    db = sqlite3.connect(data_dir / DB_NAME)
    with db:
        db.execute("UPDATE schema_version SET version = 99")
    db.close()
    with pytest.raises(StoreError, match=r"schema version 99.*upgrade Grapevine"):
        Store.open(data_dir)


def test_second_process_cannot_open_the_same_directory(data_dir: Path) -> None:
    with Store.open(data_dir), pytest.raises(StoreError, match="in use by another process"):
        Store.open(data_dir)
    Store.open(data_dir).close()  # released on close


def test_close_is_idempotent(data_dir: Path) -> None:
    store = Store.open(data_dir)
    store.close()
    store.close()


# Identity


def test_identity_created_once_and_reloaded(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        key = store.load_or_create_identity()
        assert len(key) == 32
        assert store.load_or_create_identity() == key
    with Store.open(data_dir) as store:
        assert store.load_or_create_identity() == key
    Signer(key, bytes(16))  # a usable Ed25519 private key
    assert [p.name for p in data_dir.iterdir() if p.name.startswith(IDENTITY_NAME)] == [
        IDENTITY_NAME
    ]


def test_identity_file_is_mode_0600_whatever_the_umask(data_dir: Path) -> None:
    old = os.umask(0)
    try:
        with Store.open(data_dir) as store:
            store.load_or_create_identity()
    finally:
        os.umask(old)
    assert stat.S_IMODE((data_dir / IDENTITY_NAME).stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_identity_readable_by_others(data_dir: Path, mode: int) -> None:
    with Store.open(data_dir) as store:
        key = store.load_or_create_identity()
        path = data_dir / IDENTITY_NAME
        path.chmod(mode)
        with pytest.raises(StoreError, match=f"chmod 600 {path}"):
            store.load_or_create_identity()
        path.chmod(0o600)
        assert store.load_or_create_identity() == key


def test_refuses_corrupt_identity(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        path = data_dir / IDENTITY_NAME
        for content in (b"not base64!!\n", base64.b64encode(bytes(31))):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, content)
            os.close(fd)
            with pytest.raises(StoreError, match="32-byte Ed25519 private key"):
                store.load_or_create_identity()


def test_stale_temporary_identity_file_is_ignored(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    stale = data_dir / f"{IDENTITY_NAME}.tmp-{os.getpid()}"
    stale.write_bytes(b"garbage")
    stale.chmod(0o644)
    with Store.open(data_dir) as store:
        key = store.load_or_create_identity()
    assert not stale.exists()
    assert base64.b64decode((data_dir / IDENTITY_NAME).read_bytes()) == key


# Counters


def test_boot_counter_is_monotonic_across_reopen(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        assert [store.next_boot() for _ in range(3)] == [1, 2, 3]
    with Store.open(data_dir) as store:
        assert store.next_boot() == 4


def test_incarnation_never_decreases(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        assert store.load_incarnation() == 0
        store.save_incarnation(5)
        store.save_incarnation(3)
        assert store.load_incarnation() == 5
        store.save_incarnation(9)
    with Store.open(data_dir) as store:
        assert store.load_incarnation() == 9
        store.save_incarnation(0)
        assert store.load_incarnation() == 9
        with pytest.raises(ValueError):
            store.save_incarnation(-1)
        with pytest.raises(ValueError):
            store.save_incarnation(2**63)


def test_boot_counter_and_incarnation_are_independent(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        store.save_incarnation(100)
        assert store.next_boot() == 1
        assert store.load_incarnation() == 100


# Membership hints


def test_members_round_trip_most_recent_first(data_dir: Path) -> None:
    rows = [(b"a" * 32, "10.0.0.1:7946", 100), (b"b" * 32, "[::1]:7946", 300)]
    with Store.open(data_dir) as store:
        store.save_members(rows)
    with Store.open(data_dir) as store:
        assert store.load_members() == [rows[1], rows[0]]
        store.save_members([rows[0]])
        assert store.load_members() == [rows[0]]  # replaced, not merged


def test_members_duplicate_node_keeps_latest(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        store.save_members(
            [(b"a" * 32, "old:1", 5), (b"a" * 32, "new:1", 9), (b"a" * 32, "x:1", 7)]
        )
        assert store.load_members() == [(b"a" * 32, "new:1", 9)]


def test_members_bounded_to_most_recent(data_dir: Path) -> None:
    rows = [(i.to_bytes(32, "big"), f"10.0.{i // 256}.{i % 256}:7946", i) for i in range(3000)]
    with Store.open(data_dir) as store:
        store.save_members(reversed(rows))
        loaded = store.load_members()
    assert len(loaded) == MAX_MEMBERS
    assert loaded == sorted(rows, key=lambda row: -row[2])[:MAX_MEMBERS]


# Records


def test_put_get_scan(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        assert store.get("task", b"k1") is None
        store.put("task", b"k2", b"v2")
        store.put("task", b"k1", b"v1")
        store.put("claim", b"k1", b"c1")
        store.put("task", b"k2", b"v2'")
        assert store.get("task", b"k2") == b"v2'"
        iterator = store.scan("task")
        store.put("task", b"k3", b"v3")  # writing while iterating is safe
        assert list(iterator) == [(b"k1", b"v1"), (b"k2", b"v2'")]
        assert list(store.scan("claim")) == [(b"k1", b"c1")]
        assert list(store.scan("none")) == []
    with Store.open(data_dir) as store:
        assert store.get("task", b"k3") == b"v3"


def test_put_many_applies_persist_effects_in_order(data_dir: Path) -> None:
    with Store.open(data_dir) as store:
        store.put_many(
            [
                Persist("task", b"t", b"1"),
                Persist("result", b"r", b"x"),
                Persist("task", b"t", b"2"),
            ]
        )
        assert store.get("task", b"t") == b"2"
        assert store.get("result", b"r") == b"x"
        store.put_many([])


@pytest.mark.parametrize(
    "bad",
    [
        Persist("task", b"b", "a str value"),  # type: ignore[arg-type]
        Persist("task", b"b", None),  # type: ignore[arg-type]
        Persist("task", "str key", b"v"),  # type: ignore[arg-type]
        Persist(7, b"b", b"v"),  # type: ignore[arg-type]
    ],
)
def test_put_many_is_atomic(data_dir: Path, bad: Persist) -> None:
    with Store.open(data_dir) as store:
        store.put("task", b"a", b"old")
        with pytest.raises(TypeError):
            store.put_many([Persist("task", b"a", b"new"), Persist("task", b"c", b"new"), bad])
        assert store.get("task", b"a") == b"old"
        assert store.get("task", b"c") is None
        assert list(store.scan("task")) == [(b"a", b"old")]
        store.put("task", b"d", b"after")  # the store is still usable
    with Store.open(data_dir) as store:
        assert list(store.scan("task")) == [(b"a", b"old"), (b"d", b"after")]


def test_put_many_rolls_back_when_the_iterable_fails(data_dir: Path) -> None:
    def records() -> Any:
        yield Persist("task", b"a", b"1")
        raise RuntimeError("producer failed")

    with Store.open(data_dir) as store:
        with pytest.raises(RuntimeError):
            store.put_many(records())
        assert store.get("task", b"a") is None


# Crash durability


def test_committed_put_survives_sigkill(data_dir: Path) -> None:
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from peer.runtime.store import Store
        store = Store.open(Path({str(data_dir)!r}))
        store.next_boot()
        store.put("task", b"key", b"durable")
        store.save_incarnation(42)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", child], check=False, env=env, cwd=REPO, timeout=60
    )
    assert result.returncode == -signal.SIGKILL
    with Store.open(data_dir) as store:  # the lock died with the child
        assert store.get("task", b"key") == b"durable"
        assert store.load_incarnation() == 42
        assert store.next_boot() == 2
