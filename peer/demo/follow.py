"""Following the demo's job: the merged task lists of every peer, until the root task is final.

Invariants:
- No single peer has the whole picture while the job runs (records spread by gossip), so the
  demo merges every peer's task list, keeping each task in the most advanced state some peer
  reports (`merged_tasks`).
- The job's tasks are the root and every task whose parent chain reaches it (`descendants`).
- `follow` polls about four times a second, hands each `Snapshot` to its caller, and returns
  only when the root is done; a failed or cancelled root, a dead peer or the deadline raise a
  `DemoError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from peer.client import GrapevineError
from peer.demo.live_view import Json, PeerCounts, Snapshot
from peer.demo.network import POLL_INTERVAL, DemoError, DemoNetwork

FINAL_STATES = ("done", "failed", "cancelled")
_STATE_RANK = {"pending": 0, "running": 1, "done": 2, "failed": 2, "cancelled": 2}


async def follow(
    network: DemoNetwork, root_id: str, deadline: float, show: Callable[[Snapshot], None]
) -> None:
    """Poll every peer's task list until the root task is final; `show` each snapshot."""
    while True:
        network.check_alive()
        tasks = await merged_tasks(network)
        snapshot = _snapshot(network, descendants(tasks, root_id))
        show(snapshot)
        root = tasks.get(root_id)
        if root is not None and root["state"] in FINAL_STATES:
            if root["state"] != "done":
                result = root.get("result") or {}
                raise DemoError(
                    f"the job ended {root['state']}: {str(result.get('output', ''))[:300]}"
                )
            return
        if time.monotonic() > deadline:
            raise DemoError(
                f"the job did not finish in time: {snapshot.done} of {snapshot.total} tasks "
                f"done, {snapshot.running} running (raise --timeout?)"
            )
        await asyncio.sleep(POLL_INTERVAL)


async def merged_tasks(network: DemoNetwork) -> dict[str, Json]:
    """Every task any peer knows; each in the most advanced state some peer reports."""
    answers = await asyncio.gather(
        *(client.tasks(limit=1000) for client in network.clients), return_exceptions=True
    )
    merged: dict[str, Json] = {}
    for answer in answers:
        if isinstance(answer, GrapevineError):
            continue  # a slow peer this round; check_alive reports a dead one
        if isinstance(answer, BaseException):
            raise answer
        for task in answer:
            known = merged.get(task["id"])
            if known is None or _rank(task) > _rank(known):
                merged[task["id"]] = task
    return merged


def _rank(task: Json) -> tuple[int, bool]:
    return _STATE_RANK.get(task["state"], 0), task.get("owner") is not None


def descendants(tasks: dict[str, Json], root_id: str) -> list[Json]:
    """The tasks of the job: the root and every task whose parent chain reaches it."""
    inside: dict[str, bool] = {root_id: True}

    def belongs(task_id: str) -> bool:
        chain = []
        while task_id not in inside:
            chain.append(task_id)
            parent = tasks[task_id].get("parent") if task_id in tasks else None
            if parent is None:
                break
            task_id = parent
        verdict = inside.get(task_id, False)
        for visited in chain:
            inside[visited] = verdict
        return verdict

    return [task for task_id, task in tasks.items() if belongs(task_id)]


def _snapshot(network: DemoNetwork, tasks: list[Json]) -> Snapshot:
    counts = {p.name: {"queued": 0, "running": 0, "done": 0, "failed": 0} for p in network.peers}
    unclaimed = 0
    for task in tasks:
        state, owner = task["state"], task.get("owner")
        bucket = {"pending": "queued", "running": "running", "done": "done"}.get(state, "failed")
        name = network.names.get(owner or "")
        if name is None:
            unclaimed += bucket == "queued"
            continue
        counts[name][bucket] += 1
    peers = tuple(PeerCounts(name, **by_state) for name, by_state in counts.items())
    return Snapshot(
        peers=peers,
        unclaimed=unclaimed,
        total=len(tasks),
        done=sum(p.done for p in peers),
        running=sum(p.running for p in peers),
        failed=sum(p.failed for p in peers),
    )
