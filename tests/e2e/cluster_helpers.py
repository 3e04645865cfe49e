"""What the e2e cluster tests share: peers from config texts, the wait until a team of agents
is known everywhere, every peer's task list, and failing with the peers' logs.

Invariants:
- Every wait is bounded (scripts.local_cluster.wait_for and friends).
- A failure of the test body run by `run_showing_logs` becomes an AssertionError carrying the
  tail of every peer's log, so a red test says what the peers saw.
- The processes belong to the caller's `LocalCluster`, which ends them by pid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

from scripts.local_cluster import (
    GrapevineError,
    LocalCluster,
    Peer,
    wait_for,
    wait_ready,
    wait_views,
)

OFFLINE_LLM = """
[llm]
offline_via_litellm = false
"""
"""The `[llm]` table of the agent tests' configs: the offline model called directly, so no
peer process imports litellm (peer.agents.llm.LlmSettings.offline_via_litellm)."""


def add_configured(cluster: LocalCluster, configs: Sequence[tuple[str, str]]) -> list[Peer]:
    """Start one peer per (file name, config text) in `cluster`, all joining through the first.

    Each config is written under the cluster's root with `OFFLINE_LLM` appended.
    """
    peers: list[Peer] = []
    for file_name, text in configs:
        config = cluster.root / file_name
        config.write_text(text + OFFLINE_LLM)
        peers.append(cluster.add(join=peers[:1], extra_args=("--config", str(config))))
    return peers


def run_showing_logs(test: Coroutine[Any, Any, None], peers: Sequence[Peer]) -> None:
    """Run `test`; a timeout, failed assertion or API error fails with every peer's log."""
    try:
        asyncio.run(test)
    except (TimeoutError, AssertionError, GrapevineError) as exc:
        logs = "\n".join(f"--- {p.name}:\n{p.log_tail(25)}" for p in peers)
        raise AssertionError(f"{exc}\n{logs}") from exc


async def wait_team_known(peers: Sequence[Peer]) -> None:
    """Wait until every peer answers, sees every peer alive and sees every role of the team.

    Claims rank the peers advertising a role: until every advert is everywhere, peers would
    rank the first tasks on different views.
    """
    await wait_ready(peers, timeout=20)
    await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=15)
    await wait_for("roles known everywhere", lambda: _team_roles_seen(peers), timeout=15)


async def _team_roles_seen(peers: Sequence[Peer]) -> tuple[bool, object]:
    wanted = {"boss", "admin", "worker"}
    seen = {}
    for peer in peers:
        async with peer.client() as client:
            members = await client.members()
        seen[peer.name] = sorted({r for m in members if m["status"] == "alive" for r in m["roles"]})
    return all(wanted <= set(roles) for roles in seen.values()), seen


async def task_views(peers: Sequence[Peer], limit: int) -> list[dict[str, dict[str, Any]]]:
    """Each peer's task list (up to `limit` tasks) as {task id: task}, in `peers` order."""

    async def one(peer: Peer) -> dict[str, dict[str, Any]]:
        async with peer.client() as client:
            return {t["id"]: t for t in await client.tasks(limit=limit)}

    return list(await asyncio.gather(*(one(p) for p in peers)))
