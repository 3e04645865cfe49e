"""Task event streams: GET /v1/tasks/watch (every task) and GET /v1/tasks/{id}/watch (one).

Invariants:
- `/v1/tasks/watch` shows the task hub's recent notes, or with `?follow=1` streams every task
  note and every step of an execution here (`peer.http.progress`) from the moment of the
  request; notes in the form of `task_event_json`, steps as "task-progress" events.
- Watching one task is driven by this peer's state, not only by notifications: the stream
  re-reads the task on each of its notes and steps and every `peer.http.task_views.WATCH_POLL`
  seconds and reports each fact once, in causal order (claim, executions, result, cancel),
  with the steps of its executions here in between as they happen. With `?tree=1` it does the
  same for every task below it known here, announcing each with a "task-child" event before
  its first fact. It ends once the watched task is final (done, failed or cancelled).
- Steps are local to the peer that runs the task: through another peer a watcher sees the
  signed facts only.
- Every stream is written by `peer.http.common.stream_events`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from peer.http.common import (
    EventSource,
    Json,
    bad_request,
    follow_requested,
    recent_json,
    stream_events,
)
from peer.http.progress import merged, new_steps, step_json, task_or_step_changes
from peer.http.task_views import FINAL_STATES, REFRESH_INTERVAL, WATCH_POLL, read_task
from peer.node_ids import node_id_text
from peer.runtime.driver import Driver
from peer.runtime.hub import Observed
from peer.runtime.progress import Step
from protocol.effects import (
    CancelExecution,
    ResultAccepted,
    StartExecution,
    TaskCancelled,
    TaskClaimed,
    TaskReplicated,
)
from protocol.tasks.state import TaskState

MAX_WATCHED = 1000
"""Tasks one stream follows at most (the watched task and those below it)."""


class WatchApi:
    """The task streams of one peer.

    Args:
        driver: the peer's driver (its task hub, its wall clock for event times).
        keepalive: seconds between keep-alive comments on an idle followed stream.
    """

    def __init__(self, driver: Driver, keepalive: float) -> None:
        self.driver = driver
        self.keepalive = keepalive

    def routes(self) -> list[web.RouteDef]:
        """The routes of this resource."""
        return [
            web.get("/v1/tasks/watch", self._watch_all),
            web.get("/v1/tasks/{id}/watch", self._watch_one),
        ]

    async def _watch_all(self, request: web.Request) -> web.StreamResponse:
        hub = self.driver.task_hub
        if not follow_requested(request):
            return web.json_response({"events": recent_json(hub, task_event_json)})
        # Subscribed before the stream opens: a client that saw it open misses nothing after.
        notes, steps = hub.subscribe(), self.driver.progress.subscribe()
        try:
            return await stream_events(request, self._everything(notes, steps))
        finally:
            hub.unsubscribe(notes)
            self.driver.progress.unsubscribe(steps)

    async def _everything(
        self, notes: asyncio.Queue[Observed | None], steps: asyncio.Queue[Step | None]
    ) -> EventSource:
        feed = merged(notes, steps, self.keepalive)
        async with contextlib.aclosing(feed):
            async for batch in feed:
                if batch is None:
                    yield None
                    continue
                events = [
                    step_json(item) if isinstance(item, Step) else task_event_json(item)
                    for item in batch
                ]
                yield [event for event in events if event is not None]

    async def _watch_one(self, request: web.Request) -> web.StreamResponse:
        tree = request.query.get("tree", "0")
        if tree not in ("0", "1"):
            raise bad_request(f"tree must be 0 or 1, got {tree[:20]!r}")
        st = await read_task(self.driver, request.match_info["id"])
        return await stream_events(request, self._facts(st, tree == "1"))

    async def _facts(self, root: TaskState, tree: bool) -> EventSource:
        seen: dict[bytes, set[tuple[Any, ...]]] = {}  # facts reported, per task
        shown: dict[bytes, int] = {}
        watched = [root]

        def ids() -> set[bytes]:  # read at each change: the tree grows
            return {st.task_id for st in watched}

        changes = task_or_step_changes(self.driver, ids, WATCH_POLL)
        async with contextlib.aclosing(changes):
            asked = 0.0
            async for _ in changes:
                # Everything is read before the first yield: the task may end while a yield
                # waits, and its end must not be skipped by the check below.
                final = root.state in FINAL_STATES
                when = round(self.driver.wall(), 3)
                events: list[Json] = []
                if tree:
                    for parent, child in self._new_children(watched):
                        watched.append(child)
                        events.append(child_event(when, parent, child))
                for st in watched:
                    events += new_facts(st, seen.setdefault(st.task_id, set()), when)
                    events += new_steps(self.driver.progress, st.task_id, shown)
                for event in events:
                    yield event
                if final:
                    return
                now = self.driver.wall()
                if now - asked >= REFRESH_INTERVAL:
                    asked = now  # not told of their news here: ask their holders now and then
                    node = self.driver.node
                    unheard = [st.task_id for st in watched if not node.told_of(st.task_id)]
                    if unheard:
                        await self.driver.fetch(unheard, 0.0)

    def _new_children(self, watched: list[TaskState]) -> list[tuple[TaskState, TaskState]]:
        """(parent, child) for each task below the watched ones, known here and not watched
        yet, parents first; at most `MAX_WATCHED` tasks are watched in all."""
        known = {st.task_id for st in watched}
        found: list[tuple[TaskState, TaskState]] = []
        level = list(watched)
        while level and len(known) < MAX_WATCHED:
            following: list[TaskState] = []
            for parent in level:
                for child in self.driver.children_of(parent.task_id):
                    if child.task_id in known or child.record is None:
                        continue
                    if len(known) >= MAX_WATCHED:
                        return found
                    known.add(child.task_id)
                    found.append((parent, child))
                    following.append(child)
            level = following
        return found


def task_event(kind: str, when: float, task_id: bytes, **fields: Any) -> Json:
    """Return a task event: its type, time and task id, then `fields` in the order given."""
    return {"type": kind, "time": when, "id": task_id.hex(), **fields}


def child_event(when: float, parent: TaskState, child: TaskState) -> Json:
    """A "task-child" event: a task below the watched one, first seen."""
    assert child.record is not None
    return task_event(
        "task-child", when, child.task_id, parent=parent.task_id.hex(), role=child.record.role
    )


def _claimed(when: float, task_id: bytes, owner: bytes, epoch: int) -> Json:
    return task_event("task-claimed", when, task_id, owner=node_id_text(owner), epoch=epoch)


def task_event_json(item: Observed) -> Json | None:
    """Return the API form of a task notification, or None if the API does not show it."""
    when = round(item.time, 3)
    match item.note:
        case TaskClaimed(task_id, owner, epoch):
            return _claimed(when, task_id, owner, epoch)
        case StartExecution(task_id=task_id, epoch=epoch, role=role):
            return task_event("task-started", when, task_id, epoch=epoch, role=role, here=True)
        case CancelExecution(task_id, epoch, reason):
            return task_event("task-stopped", when, task_id, epoch=epoch, reason=reason)
        case ResultAccepted(task_id, epoch, owner, outcome, flipped):
            return task_event(
                "task-result",
                when,
                task_id,
                owner=node_id_text(owner),
                epoch=epoch,
                outcome=outcome,
                flipped=flipped,
            )
        case TaskCancelled(task_id, by, reason, outcome):
            return task_event(
                "task-cancelled",
                when,
                task_id,
                by=node_id_text(by),
                reason=reason,
                outcome=outcome,
            )
        case TaskReplicated(task_id, holders):
            return task_event("task-replicated", when, task_id, holders=holders)
        case _:
            return None


def new_facts(st: TaskState, seen: set[tuple[Any, ...]], when: float) -> list[Json]:
    """The events about `st` not reported yet (recorded in `seen`), in causal order."""
    out: list[Json] = []
    claim = st.claim
    if claim is not None and ("claim", claim.epoch, claim.owner) not in seen:
        seen.add(("claim", claim.epoch, claim.owner))
        out.append(_claimed(when, st.task_id, claim.owner, claim.epoch))
    for run in st.runs():
        ident = (run.epoch, run.owner, run.incarnation)
        for phase in ("start",) if run.outcome is None else ("start", "end"):
            if ("execution", *ident, phase) in seen:
                continue
            seen.add(("execution", *ident, phase))
            kind = "task-started" if phase == "start" else "task-ended"
            owner = node_id_text(run.owner)
            event = task_event(kind, when, st.task_id, owner=owner, epoch=run.epoch)
            if phase == "end":
                event["outcome"] = run.outcome
            out.append(event)
    acc = st.accepted
    if acc is not None and ("result", acc.epoch, acc.owner) not in seen:
        seen.add(("result", acc.epoch, acc.owner))
        out.append(
            task_event(
                "task-result",
                when,
                st.task_id,
                owner=node_id_text(acc.owner),
                epoch=acc.epoch,
                outcome=acc.outcome,
                state=st.state,
            )
        )
    if st.cancel is not None and ("cancel",) not in seen:
        seen.add(("cancel",))
        out.append(
            task_event(
                "task-cancelled",
                when,
                st.task_id,
                by=node_id_text(st.cancel.by),
                reason=st.cancel.reason,
                outcome=st.cancel.outcome,
            )
        )
    return out
