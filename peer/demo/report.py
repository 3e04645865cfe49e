"""The demo's final figures: p1's task tree of the job, its answer, tokens and the audit.

Invariants:
- Every figure comes from the peers' own APIs: the tree and its totals from p1 (where the boss
  ran), the signatures verified from every peer's metrics.
- The root's result can reach p1 before a grandchild's record or execution log does (they
  spread by gossip from other peers), so the tree is read again until it holds every task
  some peer knows in the job, each final with its executions logged, or `SETTLE_TIME` passed.
"""

from __future__ import annotations

import asyncio
import time

from peer.agents.ports import AgentOutput
from peer.demo.follow import FINAL_STATES, descendants, merged_tasks
from peer.demo.live_view import Json, Report
from peer.demo.network import POLL_INTERVAL, DemoNetwork

SETTLE_TIME = 10.0
"""Seconds to wait after the root's result for p1 to hear every node's result."""


async def final_report(
    network: DemoNetwork, root_id: str, model: str, seconds: float, deadline: float
) -> Report:
    """The report of the finished job rooted at `root_id`, once p1 holds every node's result.

    Args:
        model: the model the agents were given, shown when the answer does not name one.
        seconds: how long the job took, from submission to the root's result.
        deadline: the demo's deadline; settling never waits past it.
    """
    client = network.clients[0]
    settle = min(deadline, time.monotonic() + SETTLE_TIME)
    while True:
        job = {task["id"] for task in descendants(await merged_tasks(network), root_id)}
        tree = await client.tree(root_id)
        totals = tree["totals"]
        settled = job <= set(_ids(tree)) and totals["executions"] >= totals["tasks"]
        if (settled and _complete(tree)) or time.monotonic() > settle:
            break
        await asyncio.sleep(POLL_INTERVAL)
    task = await client.task(root_id)
    output = str((task.get("result") or {}).get("output", ""))
    decoded = AgentOutput.decode(output.encode())
    metrics = await asyncio.gather(*(c.metrics() for c in network.clients))
    prompt, completion = int(totals["prompt_tokens"]), int(totals["completion_tokens"])
    audit = {
        "tasks": int(totals["tasks"]),
        "executions": int(totals["executions"]),
        "duplicates": int(totals["duplicates"]),
        "signatures_verified": sum(int(m.get("signatures_verified", 0)) for m in metrics),
        "tokens": prompt + completion,
    }
    return Report(
        answer=decoded.answer if decoded is not None else output,
        tree=_node(tree, network),
        audit=audit,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_microdollars=int(totals.get("cost_microdollars", 0)),
        model=decoded.model if decoded is not None and decoded.model else model,
        seconds=seconds,
    )


def _ids(node: Json) -> list[str]:
    return [node["id"], *(i for child in node.get("children", []) for i in _ids(child))]


def _complete(node: Json) -> bool:
    return node.get("state") in FINAL_STATES and all(_complete(c) for c in node.get("children", []))


def _node(raw: Json, network: DemoNetwork) -> Json:
    usage = raw.get("usage") or {}
    return {
        "id": raw["id"],
        "role": raw["role"],
        "state": raw["state"],
        "peer": network.name_of(raw.get("peer")),
        "node": raw.get("peer"),
        "agent": raw.get("agent") or "",
        "tokens": int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0)),
        "children": [_node(child, network) for child in raw.get("children", [])],
    }
