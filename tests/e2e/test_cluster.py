"""Five real peer processes on 127.0.0.1: joining, events, admission, failure, restart, leave.

The tests share one cluster and run in file order, each leaving it in the state the next
expects. Every wait is bounded; the cluster fixture kills every process it started, by pid.
Uses the "local" protocol profile so failure detection takes seconds, not tens of seconds.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from scripts.local_cluster import (
    LocalCluster,
    Peer,
    child_env,
    grapevine_command,
    keygen,
    members_of,
    query,
    statuses,
    wait_for,
    wait_ready,
    wait_views,
)

pytestmark = pytest.mark.e2e

T = TypeVar("T")
SIZE = 5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster"), profile="local") as c:
        seed = c.add()
        for _ in range(SIZE - 1):
            c.add(join=[seed])
        run(c, wait_ready(c.peers, timeout=30))
        yield c


def run(cluster: LocalCluster, step: Coroutine[Any, Any, T]) -> T:
    """Run one async step; if it fails, add the tail of every peer's log to the error."""
    try:
        return asyncio.run(step)
    except (TimeoutError, RuntimeError, AssertionError) as exc:
        logs = "\n".join(f"--- {p.name} ({p.bind}):\n{p.log_tail()}" for p in cluster.peers)
        raise AssertionError(f"{exc}\n{logs}") from exc


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*grapevine_command(), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
    )


def members(cluster: LocalCluster) -> list[Peer]:
    return cluster.peers[:SIZE]


def all_alive(peers: list[Peer]) -> dict[str, str]:
    return {p.node_id: "alive" for p in peers}


def test_five_peers_join_through_one_seed_and_agree(cluster: LocalCluster) -> None:
    peers = members(cluster)
    run(cluster, wait_views(peers, all_alive(peers), timeout=20, exact=True))
    view = run(cluster, members_of(peers[0]))
    assert [m["self"] for m in view].count(True) == 1
    assert {m["address"] for m in view} == {p.bind for p in peers}


def test_user_event_reaches_every_peer(cluster: LocalCluster) -> None:
    peers = members(cluster)
    sent = cli("event", "e2e-hello", "from p1", *peers[1].cli_flags())
    assert sent.returncode == 0, sent.stderr

    async def delivered() -> tuple[bool, object]:
        missing = []
        for peer in peers:
            events = await query(peer, lambda c: c.recent_events())
            if not any(
                e.get("type") == "event"
                and e.get("name") == "e2e-hello"
                and e.get("payload") == "from p1"
                and e.get("origin") == peers[1].node_id
                for e in events
            ):
                missing.append(peer.name)
        return not missing, missing

    # Gossip alone reaches everyone most of the time, but with the local profile each peer
    # sends an event only twice, so in a 5-peer cluster a peer is missed now and then (seen
    # in CI); push-pull, which carries recent events, is the guarantee: allow two rounds.
    run(cluster, wait_for("event delivered everywhere", delivered, timeout=35))


def test_a_peer_with_the_wrong_key_is_rejected_and_never_listed(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    peers = members(cluster)
    seed = peers[0]
    stranger = cluster.add(join=[seed], key_file=keygen(tmp_path / "wrong.key"))
    try:
        run(cluster, wait_ready([stranger], timeout=20))

        async def rejected() -> tuple[bool, object]:
            counts = (await query(seed, lambda c: c.metrics()))["rejected"]
            return sum(counts.values()) > 0, counts

        run(cluster, wait_for("the seed rejects the stranger", rejected, timeout=15))

        async def views() -> list[dict[str, str]]:
            await asyncio.sleep(3)  # give any leak time to spread
            return list(await asyncio.gather(*(statuses(p) for p in peers)))

        for view in run(cluster, views()):
            assert stranger.node_id not in view
            assert set(view) == {p.node_id for p in peers}
        assert set(run(cluster, statuses(stranger))) == {stranger.node_id}
    finally:
        cluster.kill(stranger)


def test_sigkill_is_detected_and_a_restart_rejoins_with_a_higher_incarnation(
    cluster: LocalCluster,
) -> None:
    peers = members(cluster)
    victim, survivors = peers[-1], peers[:-1]
    cluster.kill(victim, signal.SIGKILL)
    expected = {**all_alive(survivors), victim.node_id: "dead"}
    run(cluster, wait_views(survivors, expected, timeout=30))
    dead_incarnation = max(
        m["incarnation"]
        for p in survivors
        for m in run(cluster, members_of(p))
        if m["id"] == victim.node_id
    )

    cluster.start(victim)
    old_id = victim.node_id
    run(cluster, wait_ready([victim], timeout=20))
    assert victim.node_id == old_id, "the same data directory keeps the same identity"
    run(cluster, wait_views(peers, all_alive(peers), timeout=30))
    for peer in peers:
        view = {m["id"]: m for m in run(cluster, members_of(peer))}
        assert view[victim.node_id]["incarnation"] > dead_incarnation


def test_graceful_leave_exits_zero_and_others_show_left(cluster: LocalCluster) -> None:
    peers = members(cluster)
    leaver, stayers = peers[3], [p for i, p in enumerate(peers) if i != 3]
    result = cli("leave", *leaver.cli_flags())
    assert result.returncode == 0, result.stderr
    assert leaver.process is not None
    assert leaver.process.wait(timeout=20) == 0
    expected = {**all_alive(stayers), leaver.node_id: "left"}
    run(cluster, wait_views(stayers, expected, timeout=15))
