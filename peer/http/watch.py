"""Task event streams: GET /v1/tasks/watch (every task) and GET /v1/tasks/{id}/watch (one).

Invariants:
- `/v1/tasks/watch` shows the task hub's recent notes, or with `?follow=1` streams every task
  note from the moment of the request; both in the form of `task_event_json`.
- Watching one task is driven by this peer's state, not only by notifications: the stream
  re-reads the task on each of its notes and every `peer.http.tasks.WATCH_POLL` seconds
  (`task_changes`) and reports each fact once, in causal order (claim, executions, result,
  cancel). It ends once the task is final (done, failed or cancelled).
- Every stream is written by `peer.http.common.stream_events`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web

from peer.http.common import (
    EventSource,
    Json,
    follow_requested,
    node_id_text,
    recent_json,
    stream_events,
    stream_hub,
)
from peer.http.tasks import FINAL_STATES, REFRESH_INTERVAL, read_task, task_changes
from peer.runtime.driver import Driver
from peer.runtime.hub import Observed
from protocol.effects import (
    CancelExecution,
    ResultAccepted,
    StartExecution,
    TaskCancelled,
    TaskClaimed,
    TaskReplicated,
)
from protocol.tasks.state import TaskState


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
        return await stream_hub(request, hub, task_event_json, self.keepalive)

    async def _watch_one(self, request: web.Request) -> web.StreamResponse:
        st = await read_task(self.driver, request.match_info["id"])
        return await stream_events(request, self._facts(st))

    async def _facts(self, st: TaskState) -> EventSource:
        seen: set[tuple[Any, ...]] = set()
        changes = task_changes(self.driver.task_hub, st.task_id)
        async with contextlib.aclosing(changes):
            asked = 0.0
            async for _ in changes:
                for event in new_facts(st, seen, round(self.driver.wall(), 3)):
                    yield event
                if st.state in FINAL_STATES:
                    return
                now = self.driver.wall()
                if now - asked >= REFRESH_INTERVAL and not self.driver.node.told_of(st.task_id):
                    asked = now  # not told of its news here: ask its holders now and then
                    await self.driver.fetch([st.task_id], 0.0)


def task_event(kind: str, when: float, task_id: bytes, **fields: Any) -> Json:
    """Return a task event: its type, time and task id, then `fields` in the order given."""
    return {"type": kind, "time": when, "id": task_id.hex(), **fields}


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
        case TaskCancelled(task_id, by, reason):
            return task_event("task-cancelled", when, task_id, by=node_id_text(by), reason=reason)
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
            )
        )
    return out
