"""A task and its descendants with their totals: GET /v1/tasks/{id}/tree.

Invariants:
- A tree is this peer's view: children whose record has not arrived yet are missing.
- Each task appears once (a forged parent chain cannot loop) and the tree stops
  `MAX_TREE_DEPTH` levels below the root, saying so with `truncated`.
- Totals add up the tasks shown, so they match the tree a client draws.
- A task that made steps at this peer (model calls, tool calls, delegations: it runs or ran
  here) has their counts and its last step as `progress`; elsewhere `progress` is null.
- Model calls (made, repeated after a takeover, their tokens, per run) are counted from the
  task's checkpoints held here (`peer.agents.model_calls`): the same wherever they are held.
- `created` is the origin's wall clock in the record; `ended` is when this peer learned the
  task was final (its wall clock), null while it is not: a node's duration is the difference,
  give or take the clocks' skew and the result's way here.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from peer.agents.model_calls import ModelCalls
from peer.agents.ports import AgentOutput
from peer.http.common import Json
from peer.http.progress import progress_json
from peer.http.task_views import (
    FINAL_STATES,
    READ_TIMEOUT,
    duplicates,
    model_calls_json,
    model_calls_of,
    read_task,
    usage_json,
)
from peer.node_ids import node_id_text
from peer.runtime.driver import Driver
from protocol.tasks.state import TaskState

MAX_TREE_DEPTH = 64
"""Levels of a task tree shown below its root; deeper tasks are left out (`truncated`)."""
CHILDREN_POLL = 0.05
CHILDREN_WAIT = 1.0
"""Seconds a tree read waits, per level, for the children its holders send."""
SETTLED_KEPT = 65_536
"""Tasks remembered as read, final or open (see `TreeApi._fetch_tree`)."""
REREAD_OPEN = 10.0
"""Least seconds between two reads of an open task for trees (see `TreeApi._fetch_tree`)."""


class TreeApi:
    """The /v1/tasks/{id}/tree endpoint of one peer.

    Args:
        driver: the peer's driver.
    """

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self._settled: OrderedDict[bytes, None] = OrderedDict()
        """Final tasks whose children were read here after they ended (at most
        `SETTLED_KEPT`, oldest forgotten first)."""
        self._read_at: OrderedDict[bytes, float] = OrderedDict()
        """When each open task was last read for a tree (at most `SETTLED_KEPT`)."""

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [web.get("/v1/tasks/{id}/tree", self._get)]

    async def _get(self, request: web.Request) -> web.Response:
        root = await read_task(self.driver, request.match_info["id"])
        await self._fetch_tree(root.task_id)
        progress = self.driver.progress
        return web.json_response(
            tree_json(
                root,
                self.driver.node.children,
                lambda t: progress_json(progress, t),
                lambda t: model_calls_of(self.driver, t),
                self._ended,
            )
        )

    def _ended(self, task_id: bytes) -> float | None:
        final = self.driver.node.final_since(task_id)
        return None if final is None else self.driver.wall_of(final)

    async def _fetch_tree(self, root: bytes) -> None:
        # The children of a task are held by the peers that ran it (their origin) and their
        # replicas, not necessarily here: ask level by level, each level once. A read answers
        # with every object of the task and its children, so only what may have changed is
        # asked: not a task that ended and was read here since (its children are all made),
        # nor an open one this peer owns (it made every child itself), nor an open one read
        # less than `REREAD_OPEN` seconds ago. A dashboard or a script polling a thousand-task
        # tree every two seconds otherwise made the network re-send the whole tree each time
        # (bench_agents).
        node = self.driver.node
        level, depth = [root], 0
        while level and depth < MAX_TREE_DEPTH:
            now = asyncio.get_running_loop().time()
            ask = [t for t in level if self._needs_read(t, now)]
            ended = [t for t in ask if _final(node.task(t))]
            for t in ask:
                self._read_at[t] = now
                self._read_at.move_to_end(t)
                if len(self._read_at) > SETTLED_KEPT:
                    self._read_at.popitem(last=False)
            if ask:
                await self.driver.fetch(ask, READ_TIMEOUT)
                # Children arrive after the answer's first objects: wait until their number
                # holds still for a few looks (at most CHILDREN_WAIT).
                counts: list[int] = []
                for _ in range(int(CHILDREN_WAIT / CHILDREN_POLL)):
                    counts.append(sum(len(node.children(t)) for t in ask))
                    if len(counts) >= 3 and counts[-1] == counts[-3]:
                        break
                    await asyncio.sleep(CHILDREN_POLL)
            for t in ended:
                self._read_at.pop(t, None)
                self._settled[t] = None
                if len(self._settled) > SETTLED_KEPT:
                    self._settled.popitem(last=False)
            level = [c.task_id for t in level for c in node.children(t)]
            depth += 1

    def _needs_read(self, task_id: bytes, now: float) -> bool:
        st = self.driver.node.task(task_id)
        if st is None:
            return True
        if task_id in self._settled:
            return False
        if _final(st):
            return True
        if st.claim is not None and st.claim.owner == self.driver.node.node_id:
            return False
        return now - self._read_at.get(task_id, -REREAD_OPEN) >= REREAD_OPEN


def _final(st: TaskState | None) -> bool:
    return st is not None and st.state in FINAL_STATES


def tree_json(
    root: TaskState,
    children_of: Callable[[bytes], list[TaskState]],
    progress_of: Callable[[bytes], Json | None] = lambda _: None,
    model_calls_of: Callable[[bytes], ModelCalls] = lambda _: ModelCalls(),
    ended_of: Callable[[bytes], float | None] = lambda _: None,
) -> Json:
    """Return the API form of the task tree below `root` (see docs/http-api.md).

    Args:
        root: a task this peer holds the record of.
        children_of: the known children of a task, oldest first (`Node.children`).
        progress_of: a task's steps here (`peer.http.progress.progress_json`); none by default.
        model_calls_of: a task's model calls from its checkpoints (`model_calls_of`); none by
            default.
        ended_of: when (wall clock) this peer learned a task was final; unknown by default.
    """
    totals = dict.fromkeys(
        (
            "tasks",
            "executions",
            "duplicates",
            "prompt_tokens",
            "completion_tokens",
            "cost_microdollars",
            *model_calls_json(ModelCalls()),
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
        calls = model_calls_of(st.task_id)
        for field, count in model_calls_json(calls).items():
            totals[field] += count
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
            "created": rec.created if rec is not None else None,
            "ended": ended_of(st.task_id),
            "peer": node_id_text(claim.owner) if claim is not None else None,
            "agent": agent,
            "usage": usage,
            "duplicates": duplicates(st),
            "progress": progress_of(st.task_id),
            **model_calls_json(calls),
            "model_calls_by_run": [
                {
                    "epoch": run.epoch,
                    "owner": node_id_text(run.owner),
                    "model_calls": run.model_calls,
                    "model_calls_repeated": run.model_calls_repeated,
                    "model_calls_resumed": run.model_calls_resumed,
                    "model_tokens": run.model_tokens,
                    "repeated_tokens": run.repeated_tokens,
                }
                for run in calls.runs
            ],
            "children": children,
        }

    tree = node(root, 0)
    return {**tree, "totals": totals, "truncated": truncated}
