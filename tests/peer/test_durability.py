"""Acknowledged means fsynced (issue 11, finding 6): the store's writes under a file size
limit, the driver and the API when a write fails, and a corrupt database at start.

The file-size tests run the real `Store` in a child process under RLIMIT_FSIZE (CPython ignores
SIGXFSZ, so a write past the limit fails with EFBIG as on a full disk) and need no root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from peer.demo.processes import child_env, grapevine_command
from peer.http.app import PeerApi
from peer.runtime.group_commit import NotDurable
from peer.runtime.store import DB_NAME, Store
from protocol.effects import Persist, PersistKind
from scripts.local_cluster import keygen
from tests.peer.inprocess import API_HEADERS, API_TOKEN, MemoryStore, in_process_peer

KEY = bytes(range(32))

FILL_UNDER_LIMIT = textwrap.dedent(
    """
    import json, os, resource, sys
    from pathlib import Path
    from peer.runtime.store import Store, StoreWriteError
    from protocol.effects import Persist

    data_dir = Path(sys.argv[1])
    store = Store.open(data_dir)
    sizes = [path.stat().st_size for path in data_dir.iterdir() if path.is_file()]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(sizes) + 256 * 1024, hard))
    acked, failed, errors = [], [], []
    for i in range(5000):
        key = b"%08d" % i
        try:
            store.put_many([Persist("task", key, os.urandom(1000)), Persist("claim", key, b"c")])
        except StoreWriteError as exc:
            failed.append(i)
            errors.append(str(exc))
            if len(failed) == 5:
                break
        else:
            acked.append(i)
    reads = store.get("task", b"%08d" % acked[-1]) is not None
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    store.put("task", b"after", b"the limit was lifted")
    store.close()
    print(json.dumps({"acked": acked, "failed": failed, "errors": errors, "reads": reads}))
    """
)


def test_store_defaults_to_wal_with_synchronous_full(tmp_path: Path) -> None:
    with Store.open(tmp_path / "data") as store:
        assert (store.journal_mode(), store.synchronous()) == ("wal", "full")


def test_a_write_past_the_file_size_limit_fails_whole_and_the_store_goes_on(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    Store.open(data_dir).close()
    run = subprocess.run(
        [sys.executable, "-c", FILL_UNDER_LIMIT, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    assert outcome["acked"] and len(outcome["failed"]) == 5, outcome["errors"]
    assert outcome["reads"], "the store answers reads while writes fail"
    assert all(str(data_dir / DB_NAME) in error for error in outcome["errors"])
    with Store.open(data_dir) as store:
        for i in outcome["acked"]:
            assert store.get("task", b"%08d" % i) is not None, f"committed write {i} lost"
            assert store.get("claim", b"%08d" % i) == b"c"
        for i in outcome["failed"]:
            assert store.get("task", b"%08d" % i) is None, f"failed write {i} half stored"
            assert store.get("claim", b"%08d" % i) is None
        assert store.get("task", b"after") == b"the limit was lifted"


class FailingStore(MemoryStore):
    """A `MemoryStore` whose writes of records fail while `fail` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def put_many(self, records: Iterable[Persist]) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        super().put_many(records)


@pytest.mark.asyncio
async def test_a_submit_not_written_raises_and_is_written_with_the_next_write() -> None:
    store = FailingStore()
    async with in_process_peer(1, KEY, store=store, seed_only=True) as peer:
        driver = peer.driver
        store.fail = True
        with pytest.raises(NotDurable, match="No space left on device") as raised:
            driver.submit("echo", b"x", idempotency_key="k")
        task_id = raised.value.task_id
        assert "No space left" in str(driver.disk.degraded)
        assert driver.disk.write_failures == 1
        assert (PersistKind.TASK, task_id) not in store.records
        assert driver.node.task(task_id) is not None, "the node holds it in memory"

        with pytest.raises(NotDurable):  # a resubmission persists nothing, yet is not durable
            driver.submit("echo", b"x", idempotency_key="k")
        store.fail = False
        assert driver.submit("echo", b"x", idempotency_key="k") == task_id
        assert (PersistKind.TASK, task_id) in store.records
        assert driver.disk.degraded is None and driver.disk.write_failures == 2


@pytest.mark.asyncio
async def test_the_api_answers_503_and_reports_degraded_while_writes_fail(tmp_path: Path) -> None:
    store = FailingStore()
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(in_process_peer(1, KEY, store=store))
        second = await stack.enter_async_context(in_process_peer(2, KEY))
        a = first.driver
        assert await second.driver.join([a.node.addr], timeout=5.0) is not None
        api = PeerApi(a, first.transport, tmp_path, lambda: None, token=API_TOKEN)
        client: TestClient[Any, Any] = TestClient(TestServer(api.app), headers=API_HEADERS)
        await client.start_server()
        stack.push_async_callback(client.close)
        spec = {"role": "echo", "input": "kept?", "idempotency_key": "disk-full"}

        assert (await (await client.get("/v1/health")).json())["degraded"] is False
        store.fail = True
        answer = await client.post("/v1/tasks", json=spec)
        assert answer.status == 503, await answer.text()
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        problem = await answer.json(content_type=None)
        assert problem["status"] == 503 and problem["title"] == "Service Unavailable"
        assert "could not be written to disk" in problem["detail"]
        assert "not acknowledged" in problem["detail"]

        health = await (await client.get("/v1/health")).json()
        assert health["status"] == "degraded" and health["degraded"] is True
        assert "No space left" in health["degraded_reason"] and health["write_failures"] >= 1
        assert {"members_alive", "uptime"} <= set(health)
        me = await (await client.get("/v1/self")).json()
        assert me["degraded"] is True and "No space left" in me["degraded_reason"]
        assert {"id", "address", "incarnation", "version"} <= set(me)
        listed = await client.get("/v1/tasks")
        assert listed.status == 200, "reads go on while writes fail"

        store.fail = False
        answer = await client.post("/v1/tasks", json=spec)
        assert answer.status == 202, await answer.text()
        task_id = bytes.fromhex((await answer.json())["id"])
        assert (PersistKind.TASK, task_id) in store.records
        health = await (await client.get("/v1/health")).json()
        assert (health["status"], health["degraded"], health["degraded_reason"]) == (
            "ok",
            False,
            None,
        )


def _corrupt(data_dir: Path, how: str) -> Path:
    db = data_dir / DB_NAME
    if how == "garbage":
        data_dir.mkdir(mode=0o700)
        db.write_bytes(os.urandom(8192))
    else:
        with Store.open(data_dir) as store:
            store.put_many(
                Persist(PersistKind.TASK, os.urandom(32), os.urandom(600)) for _ in range(2000)
            )
        with db.open("r+b") as file:
            file.truncate(db.stat().st_size // 2)
    return db


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_corrupt_database_stops_the_agent_with_one_line(tmp_path: Path, how: str) -> None:
    db = _corrupt(tmp_path / "data", how)
    key = keygen(tmp_path / "network.key")
    flags = ["--data-dir", str(db.parent), "--network-key-file", str(key)]
    flags += ["--bind", "127.0.0.1:0", "--api", "127.0.0.1:0", "--no-agents"]
    run = subprocess.run(
        [*grapevine_command(), "agent", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("grapevine agent: ") and str(db) in lines[0]
    assert "move it and its -wal and -shm files out of" in lines[0]
    assert "Traceback" not in run.stderr
