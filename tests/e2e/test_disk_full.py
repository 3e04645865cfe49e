"""A submitting peer's disk fills up: no acknowledged submission is lost (issue 11, finding 6).

Two real peers on 127.0.0.1 (replication 1 needs the second). The first one's disk is limited
in one of two ways: its data directory is a 1 MiB tmpfs (needs root; skipped otherwise), or
its running process gets RLIMIT_FSIZE through prlimit (any user; CPython ignores SIGXFSZ, so a
write past the limit fails with EFBIG). Tasks are submitted there until its writes fail, and:
- every answer is 202 or 503, and at least one 503 says the record could not be written;
- the peer keeps answering reads (each acknowledged task, its health, which counts the
  failed writes);
- after SIGKILL, its own database, read with the real `Store` before it restarts (so gossip
  cannot refill it), holds every acknowledged task;
- restarted with room again, it serves every acknowledged task and is not degraded.

The cluster ends every process it started, by pid; the tmpfs is unmounted after they ended.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from peer.client import ApiError
from peer.runtime.store import Store
from protocol.effects import PersistKind
from scripts.local_cluster import LocalCluster, Peer, wait_ready, wait_views
from tests.e2e.cluster_helpers import run_showing_logs

pytestmark = pytest.mark.e2e

INPUT = "x" * 8000
"""A few pages of the database per task, so the limit is reached in tens of submissions."""
MAX_SUBMISSIONS = 400
WRITE_FAILURES_WANTED = 5
TMPFS_SIZE = "1m"
FSIZE_ROOM = 256 * 1024
"""Bytes any file of the peer may still grow by once RLIMIT_FSIZE is set."""
NOT_WRITTEN = "could not be written to disk"


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[None]:
    """Mount a `TMPFS_SIZE` tmpfs at `path` (skip the test without root), unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(mode=0o700, parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False)


def limit_file_size(peer: Peer) -> None:
    """Let no file of `peer`'s process grow more than `FSIZE_ROOM` beyond its data files."""
    assert peer.pid is not None
    files = [path.stat().st_size for path in peer.data_dir.iterdir() if path.is_file()]
    _, hard = resource.prlimit(peer.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(peer.pid, resource.RLIMIT_FSIZE, (max(files) + FSIZE_ROOM, hard))


async def submit_until_writes_fail(peer: Peer) -> tuple[list[str], list[str]]:
    """Submit tasks at `peer` until `WRITE_FAILURES_WANTED` answers said the record could not
    be written; return the acknowledged ids and the 503 details."""
    acked: list[str] = []
    refused: list[str] = []
    async with peer.client() as client:
        for i in range(MAX_SUBMISSIONS):
            try:
                # No queue timeout: its own small database would fill first, and this test is
                # about the task store (a full queue database also answers 503, nothing kept).
                answer = await client.submit(
                    "echo", INPUT, idempotency_key=f"fill-{i}", queue=True, queue_timeout=0
                )
            except ApiError as exc:
                assert exc.status == 503 and exc.title == "Service Unavailable", exc
                refused.append(exc.detail)
                if sum(NOT_WRITTEN in detail for detail in refused) >= WRITE_FAILURES_WANTED:
                    break
            else:
                acked.append(str(answer["id"]))
    return acked, refused


async def reads_go_on(peer: Peer, acked: list[str], refused: list[str]) -> None:
    async with peer.client() as client:
        for task_id in acked:
            assert (await client.task(task_id))["id"] == task_id
        health = await client.health()
        me = await client.self_info()
    written_failures = sum(NOT_WRITTEN in detail for detail in refused)
    assert health["write_failures"] >= written_failures, health
    assert health["status"] == ("degraded" if health["degraded"] else "ok"), health
    assert {"degraded", "degraded_reason"} <= set(me), me


def assert_in_database(data_dir: Path, acked: list[str]) -> None:
    with Store.open(data_dir) as store:
        missing = [i for i in acked if store.get(PersistKind.TASK, bytes.fromhex(i)) is None]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged tasks missing: {missing}"


async def restarted_serves(cluster: LocalCluster, peer: Peer, acked: list[str]) -> None:
    cluster.start(peer)
    await wait_ready([peer], timeout=20)
    async with peer.client() as client:
        for task_id in acked:
            assert (await client.task(task_id))["id"] == task_id
        health = await client.health()
    assert health["degraded"] is False and health["write_failures"] == 0, health


@pytest.mark.parametrize("limit", ["tmpfs", "rlimit_fsize"])
def test_no_acknowledged_submission_is_lost_when_the_disk_fills(tmp_path: Path, limit: str) -> None:
    root = tmp_path / "cluster"
    with contextlib.ExitStack() as stack:
        if limit == "tmpfs":
            stack.enter_context(small_tmpfs(root / "p0"))  # the first peer's data directory
        cluster = stack.enter_context(LocalCluster(root))
        full = cluster.add()
        other = cluster.add(join=[full])
        peers = [full, other]

        async def scenario() -> None:
            await wait_ready(peers, timeout=20)
            await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=15)
            if limit == "rlimit_fsize":
                limit_file_size(full)
            acked, refused = await submit_until_writes_fail(full)
            assert acked, f"nothing was acknowledged before the disk filled: {refused[:3]}"
            assert any(NOT_WRITTEN in detail for detail in refused), refused[:3]
            await reads_go_on(full, acked, refused)

            cluster.kill(full, signal.SIGKILL)
            if limit == "tmpfs":
                subprocess.run(["mount", "-o", "remount,size=16m", str(full.data_dir)], check=True)
            assert_in_database(full.data_dir, acked)
            await restarted_serves(cluster, full, acked)

        run_showing_logs(scenario(), peers)
