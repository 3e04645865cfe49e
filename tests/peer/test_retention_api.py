"""Retention over HTTP: a task compacted after `--task-retention` answers 410 with its
tombstone; stats count live tasks and tombstones; the store applies the compaction's deletion
and the tombstone in one transaction."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from peer.http.app import PeerApi
from peer.runtime.store import (
    DB_NAME,
    FORGET_TASK_STATEMENT,
    MIGRATIONS,
    Store,
)
from protocol.effects import Persist, PersistKind
from tests.peer.inprocess import API_HEADERS, API_TOKEN, MemoryStore, in_process_peer
from tests.peer.old_stores import database_at_version

KEY = bytes(range(32))
RETENTION = 0.5


@pytest.mark.asyncio
async def test_a_compacted_task_answers_410_with_its_tombstone(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        store = MemoryStore()
        first = await stack.enter_async_context(
            in_process_peer(1, KEY, store=store, task_retention=RETENTION)
        )
        second = await stack.enter_async_context(in_process_peer(2, KEY, task_retention=RETENTION))
        a = first.driver
        assert await second.driver.join([a.node.addr], timeout=5.0) is not None
        api = PeerApi(a, first.transport, tmp_path, lambda: None, token=API_TOKEN)
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        stack.push_async_callback(client.close)

        r = await client.post(
            "/v1/tasks", json={"role": "echo", "input": "hi", "idempotency_key": "k1"}
        )
        assert r.status == 202, await r.text()
        task_id = (await r.json())["id"]
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            r = await client.get(f"/v1/tasks/{task_id}")
            if r.status == 410:
                break
            assert r.status == 200, await r.text()
            assert asyncio.get_running_loop().time() < deadline, await r.text()
            await asyncio.sleep(0.05)
        assert r.headers["Content-Type"].startswith("application/problem+json")
        body = await r.json(content_type=None)
        assert body["status"] == 410 and body["title"] == "Gone"
        assert body["id"] == task_id and body["state"] == "done" and body["outcome"] == "ok"
        assert body["epoch"] == 1 and body["compacted"] is True
        assert len(body["output_digest"]) == 32 and body["owner"]  # 16 bytes of SHA-256
        assert len(body["idempotency_key_digest"]) == 32

        stats = (await (await client.get("/v1/tasks/stats")).json())["totals"]
        assert stats["tombstones"] == 1 and stats["live"] == 0
        tid = bytes.fromhex(task_id)
        kinds = {kind for kind, key in store.records if key.startswith(tid)}
        assert kinds == {PersistKind.TOMBSTONE}

        # Without --tombstone-grace the tombstone lives as long as the retention (decision
        # 37): then the task is unknown, and its last stored trace is gone.
        while (r := await client.get(f"/v1/tasks/{task_id}")).status == 410:
            assert asyncio.get_running_loop().time() < deadline + 15, await r.text()
            await asyncio.sleep(0.05)
        assert r.status == 404, await r.text()
        stats = (await (await client.get("/v1/tasks/stats")).json())["totals"]
        assert stats["tombstones"] == 0
        assert not any(key.startswith(tid) for _, key in store.records)


def test_the_store_forgets_a_task_and_stores_its_tombstone_in_one_transaction(
    tmp_path: Path,
) -> None:
    tid, other = b"\x07" * 32, b"\x08" * 32
    with Store.open(tmp_path) as store:
        store.put_many(
            [
                Persist(PersistKind.TASK, tid, b"record"),
                Persist(PersistKind.CLAIM, tid + (1).to_bytes(8, "big") + b"o" * 32, b"claim"),
                Persist(PersistKind.GRANT, tid + (2).to_bytes(8, "big"), b"grant"),
                Persist(PersistKind.TASK, other, b"other record"),
                Persist(PersistKind.INCARNATION, b"self", b"\x01"),
            ]
        )
        store.put_many(
            [
                Persist(PersistKind.FORGET_TASK, tid, b""),
                Persist(PersistKind.TOMBSTONE, tid, b"stone"),
            ]
        )
        assert list(store.scan(PersistKind.TASK)) == [(other, b"other record")]
        assert list(store.scan(PersistKind.CLAIM)) == list(store.scan(PersistKind.GRANT)) == []
        assert list(store.scan(PersistKind.TOMBSTONE)) == [(tid, b"stone")]
        # Forgetting the task again leaves its tombstone; the tombstone goes on its own.
        store.put_many([Persist(PersistKind.FORGET_TASK, tid, b"")])
        assert list(store.scan(PersistKind.TOMBSTONE)) == [(tid, b"stone")]
        store.put_many([Persist(PersistKind.FORGET_TOMBSTONE, tid, b"")])
        assert list(store.scan(PersistKind.TOMBSTONE)) == []
        assert store.get(PersistKind.INCARNATION, b"self") == b"\x01"
        assert store.last_contact() is None
        store.save_members([(b"n" * 32, "127.0.0.1:1", 100), (b"m" * 32, "127.0.0.1:2", 200)])
        assert store.last_contact() == 200
        assert store.forget_kinds([PersistKind.TASK, PersistKind.TOMBSTONE]) == 1
        assert list(store.scan(PersistKind.TASK)) == []


def test_forgetting_a_task_searches_the_primary_key_and_spares_its_neighbours(
    tmp_path: Path,
) -> None:
    # A forget that scanned the whole table stalled a busy peer for seconds (decision 22).
    tid, after = b"\x07" * 32, b"\x07" * 31 + b"\x08"
    with Store.open(tmp_path) as store:
        store.put_many(
            [
                Persist(PersistKind.CHECKPOINT, tid + b"\x00" * 44, b"step"),
                Persist(PersistKind.TOMBSTONE, tid, b"stone"),
                Persist(PersistKind.TASK, after, b"the next id"),
            ]
        )
        plan = sqlite3.connect(tmp_path / DB_NAME).execute(
            "EXPLAIN QUERY PLAN " + FORGET_TASK_STATEMENT, (1,)
        )
        assert all("USING PRIMARY KEY" in row[3] for row in plan)
        store.put_many([Persist(PersistKind.FORGET_TASK, tid, b"")])
        assert store.get(PersistKind.CHECKPOINT, tid + b"\x00" * 44) is None
        assert store.get(PersistKind.TOMBSTONE, tid) == b"stone"
        assert store.get(PersistKind.TASK, after) == b"the next id"


def test_tombstones_stored_by_the_previous_schema_move_to_their_own_table(
    tmp_path: Path,
) -> None:
    # A data dir of schema version 2 kept tombstones among the records (decision 57).
    tid = b"\x05" * 32
    database_at_version(
        tmp_path,
        2,
        [
            ("INSERT INTO records VALUES ('tombstone', ?, ?)", (tid, b"stone")),
            ("INSERT INTO records VALUES ('task', ?, ?)", (tid[:31] + b"\x06", b"live")),
        ],
    )
    with Store.open(tmp_path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert list(store.scan(PersistKind.TOMBSTONE)) == [(tid, b"stone")]
        assert store.get(PersistKind.TOMBSTONE, tid) == b"stone"
        assert list(store.scan(PersistKind.TASK)) == [(tid[:31] + b"\x06", b"live")]
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("SELECT count(*) FROM records WHERE kind = 'tombstone'").fetchone() == (0,)
    db.close()
