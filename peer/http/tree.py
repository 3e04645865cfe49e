"""A task and its descendants with their totals: GET /v1/tasks/{id}/tree.

Invariants:
- A tree is this peer's view: children whose record has not arrived yet are missing.
- Each task appears once (a forged parent chain cannot loop) and the tree stops
  `MAX_TREE_DEPTH` levels below the root, saying so with `truncated`.
- Totals add up the tasks shown, so they match the tree a client draws.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from peer.agents.ports import AgentOutput
from peer.http.common import Json, node_id_text
from peer.http.tasks import duplicates, find_task, usage_json
from peer.runtime.driver import Driver
from protocol.task_state import TaskState

MAX_TREE_DEPTH = 64
"""Levels of a task tree shown below its root; deeper tasks are left out (`truncated`)."""


class TreeApi:
    """The /v1/tasks/{id}/tree endpoint of one peer.

    Args:
        driver: the peer's driver.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.get("/v1/tasks/{id}/tree", self._get)]

    async def _get(self, request: web.Request) -> web.Response:
        root = find_task(self.driver.node, request.match_info["id"])
        return web.json_response(tree_json(root, self.driver.node.children))


def tree_json(root: TaskState, children_of: Callable[[bytes], list[TaskState]]) -> Json:
    """Return the API form of the task tree below `root` (see docs/http-api.md).

    Args:
        root: a task this peer holds the record of.
        children_of: the known children of a task, oldest first (`Node.children`).
    """
    totals = dict.fromkeys(
        (
            "tasks",
            "executions",
            "duplicates",
            "prompt_tokens",
            "completion_tokens",
            "cost_microdollars",
        ),
        0,
    )
    seen = {root.task_id}
    truncated = False

    def node(st: TaskState, depth: int) -> Json:
        nonlocal truncated
        rec, claim, acc = st.record, st.claim, st.accepted
        totals["tasks"] += 1
        totals["executions"] += st.execution_count()
        totals["duplicates"] += duplicates(st)
        usage: Json | None = None
        agent: str | None = None
        if acc is not None:
            usage = usage_json(acc.usage)
            for field, amount in usage.items():
                totals[field] += amount
            output = AgentOutput.decode(acc.output)
            agent = output.agent if output is not None else None
        children: list[Json] = []
        for child in children_of(st.task_id):
            if child.task_id in seen or child.record is None:
                continue
            if depth >= MAX_TREE_DEPTH:
                truncated = True
                break
            seen.add(child.task_id)
            children.append(node(child, depth + 1))
        return {
            "id": st.task_id.hex(),
            "role": rec.role if rec is not None else None,
            "state": st.state,
            "peer": node_id_text(claim.owner) if claim is not None else None,
            "agent": agent,
            "usage": usage,
            "duplicates": duplicates(st),
            "children": children,
        }

    tree = node(root, 0)
    return {**tree, "totals": totals, "truncated": truncated}
