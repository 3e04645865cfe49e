"""Two real peer processes on 127.0.0.1, joined and seeing each other: the cluster the CLI
tests drive as a user would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scripts.local_cluster import LocalCluster, Peer, wait_ready, wait_views


@contextmanager
def joined_pair(root: Path) -> Iterator[Peer]:
    """Start two peers under `root`, wait until each sees the other alive, yield the seed;
    both processes end on exit."""
    with LocalCluster(root, extra_args=()) as cluster:
        seed = cluster.add()
        cluster.add(join=[seed])
        asyncio.run(wait_ready(cluster.peers, timeout=30))
        alive = {p.node_id: "alive" for p in cluster.peers}
        asyncio.run(wait_views(cluster.peers, alive, timeout=20))
        yield seed
