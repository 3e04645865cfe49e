"""The task endpoints of the local HTTP API (/v1/tasks...; docs/http-api.md is the contract).

Invariants:
- A submission is acknowledged (202) only after the task record is durable here and, when the
  network's replication is above 0, held by that many other peers (`TaskReplicated`); if that
  does not happen within `replication_timeout` the answer is 503 — the record exists here and
  keeps spreading by gossip, so the detail names its id.
- A submission that fails validation creates nothing: every field is checked before the node
  is called. Without an idempotency key each submission gets a fresh random nonce (a new task);
  with one, resubmitting the same spec at the same peer names the same task.
- Task JSON is computed from this peer's CRDT state (`protocol.tasks.TaskState`), so once
  gossip has converged every peer answers the same for the same task (except `input` of tasks
  whose record has not arrived yet: such tasks are "not known here yet", 404).
- Watching one task is driven by this peer's state, not only by notifications: the node notes
  claims, accepted results and cancels, but not an execution-log entry received from another
  peer, so the stream also re-reads the state every `WATCH_POLL` seconds. It ends once the task
  is final (done, failed or cancelled).
- Blobs: with a blob service attached (`blobs`), an input over `MAX_INLINE_PAYLOAD` (up to
  `BLOB_LIMIT`) is stored here and at `replication` other live peers before the task is
  submitted with its reference as input; if they do not take it the answer is 503 and nothing
  is submitted. Task JSON shows references as they are; `GET /v1/blobs/{digest}` returns a
  blob's bytes, fetched from its holders if this peer has none. Without a service, inputs over
  the inline limit are refused (400), as before.
- A task tree (`/v1/tasks/{id}/tree`) is this peer's view: children whose record has not
  arrived yet are missing. Each task appears once (a forged parent chain cannot loop) and the
  tree stops `MAX_TREE_DEPTH` levels below the root.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from peer.agents.ports import AgentOutput
from peer.http.app import MAX_BODY_BYTES, Json, Problem, _json_object, node_id_text
from peer.runtime.blobs import BlobService, BlobUnavailable, blob_hints, digest_of_text
from peer.runtime.driver import Driver, Observed
from protocol.blobs import BLOB_LIMIT
from protocol.effects import (
    CancelExecution,
    ResultAccepted,
    StartExecution,
    TaskCancelled,
    TaskClaimed,
    TaskReplicated,
)
from protocol.errors import LocalProtocolError
from protocol.tasks import START, TaskState
from protocol.wire import MAX_INLINE_PAYLOAD, MAX_NAME_CHARS, MAX_UINT

REPLICATION_TIMEOUT = 5.0
"""Seconds a submission waits for the record to be held by other peers before answering 503."""
WATCH_POLL = 0.25
"""Seconds between re-reads of a watched task's state when no notification arrives."""
MAX_TIMEOUT = 7 * 24 * 3600.0
"""Largest task timeout accepted, in seconds (a week)."""
MAX_LIST = 10_000
DEFAULT_LIST = 100
MIN_ID_PREFIX = 6
MAX_TREE_DEPTH = 64
"""Levels of a task tree shown below its root; deeper tasks are left out (`truncated`)."""
MAX_SUBMIT_BYTES = 2 * BLOB_LIMIT + MAX_BODY_BYTES
"""Largest `POST /v1/tasks` body with a blob service attached: a `BLOB_LIMIT` input even if
JSON escaping doubles it (other routes keep the API's `MAX_BODY_BYTES`)."""
STATES = ("pending", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")


def _bad(detail: str) -> Problem:
    return Problem(400, "Bad Request", detail)


def _too_large(what: str) -> Problem:
    return Problem(
        413,
        "Content Too Large",
        f"{what}; a task input is at most {BLOB_LIMIT} bytes (inputs over "
        f"{MAX_INLINE_PAYLOAD} bytes travel as blobs), and the request body at most "
        f"{MAX_SUBMIT_BYTES} bytes",
    )


def task_json(st: TaskState) -> Json:
    """Return the API form of a task this peer holds the record of."""
    rec = st.record
    assert rec is not None
    claim, acc = st.claim, st.accepted
    result: Json | None = None
    if acc is not None:
        result = {
            "outcome": acc.outcome,
            "output": acc.output.decode("utf-8", errors="replace"),
            "epoch": acc.epoch,
            "owner": node_id_text(acc.owner),
            "usage": {
                "prompt_tokens": acc.usage[0],
                "completion_tokens": acc.usage[1],
                "cost_microdollars": acc.usage[2],
            },
        }
    executions = [
        {
            "epoch": epoch,
            "owner": node_id_text(owner),
            "phase": "start" if phase == START else "end",
            "outcome": None if phase == START else entry.outcome,
        }
        for (epoch, owner, phase), entry in sorted(st.executions.items())
    ]
    cancel = st.cancel
    return {
        "id": st.task_id.hex(),
        "role": rec.role,
        "state": st.state,
        "owner": node_id_text(claim.owner) if claim is not None else None,
        "epoch": claim.epoch if claim is not None else 0,
        "priority": rec.priority,
        "parent": rec.parent.hex() if rec.parent else None,
        "created": rec.created,
        "idempotency_key": rec.idempotency_key or None,
        "timeout": rec.timeout,
        "origin": node_id_text(rec.origin),
        "input": rec.input.decode("utf-8", errors="replace"),
        "result": result,
        "executions": executions,
        "duplicates": max(0, st.execution_count() - 1),
        "cancel": (
            {"by": node_id_text(cancel.by), "reason": cancel.reason} if cancel is not None else None
        ),
    }


def tree_json(root: TaskState, children_of: Callable[[bytes], list[TaskState]]) -> Json:
    """Return the API form of the task tree below `root` (see docs/http-api.md).

    Args:
        root: a task this peer holds the record of.
        children_of: the known children of a task, oldest first (`Driver.children_of`).
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
        started = st.execution_count()
        totals["tasks"] += 1
        totals["executions"] += started
        totals["duplicates"] += max(0, started - 1)
        usage: Json | None = None
        agent: str | None = None
        if acc is not None:
            prompt, completion, cost = acc.usage
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cost_microdollars": cost,
            }
            totals["prompt_tokens"] += prompt
            totals["completion_tokens"] += completion
            totals["cost_microdollars"] += cost
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
            "duplicates": max(0, started - 1),
            "children": children,
        }

    tree = node(root, 0)
    return {**tree, "totals": totals, "truncated": truncated}


def task_event_json(item: Observed) -> Json | None:
    """Return the API form of a task notification, or None if the API does not show it."""
    when = round(item.time, 3)
    match item.note:
        case TaskClaimed(task_id, owner, epoch):
            return {
                "type": "task-claimed",
                "time": when,
                "id": task_id.hex(),
                "owner": node_id_text(owner),
                "epoch": epoch,
            }
        case StartExecution(task_id=task_id, epoch=epoch, role=role):
            return {
                "type": "task-started",
                "time": when,
                "id": task_id.hex(),
                "epoch": epoch,
                "role": role,
                "here": True,
            }
        case CancelExecution(task_id, epoch, reason):
            return {
                "type": "task-stopped",
                "time": when,
                "id": task_id.hex(),
                "epoch": epoch,
                "reason": reason,
            }
        case ResultAccepted(task_id, epoch, owner, outcome, flipped):
            return {
                "type": "task-result",
                "time": when,
                "id": task_id.hex(),
                "owner": node_id_text(owner),
                "epoch": epoch,
                "outcome": outcome,
                "flipped": flipped,
            }
        case TaskCancelled(task_id, by, reason):
            return {
                "type": "task-cancelled",
                "time": when,
                "id": task_id.hex(),
                "by": node_id_text(by),
                "reason": reason,
            }
        case TaskReplicated(task_id, holders):
            return {
                "type": "task-replicated",
                "time": when,
                "id": task_id.hex(),
                "holders": holders,
            }
        case _:
            return None


class TaskApi:
    """The /v1/tasks endpoints of one peer.

    Args:
        driver: the peer's driver.
        wall: wall-clock seconds, for event timestamps.
        keepalive: seconds between keep-alive comments on idle streams.
        replication_timeout: see `REPLICATION_TIMEOUT`.
    """

    def __init__(
        self,
        driver: Driver,
        keepalive: float,
        replication_timeout: float = REPLICATION_TIMEOUT,
    ) -> None:
        self.driver = driver
        self.keepalive = keepalive
        self.replication_timeout = replication_timeout
        self.blobs: BlobService | None = None
        """Stores large inputs and serves blobs; None refuses inputs over the inline limit."""
        self._loop = asyncio.get_running_loop()

    def routes(self) -> list[web.RouteDef]:
        """The routes, fixed paths before `{id}` so that they match first."""
        return [
            web.post("/v1/tasks", self._submit),
            web.get("/v1/tasks", self._list),
            web.get("/v1/tasks/stats", self._stats),
            web.get("/v1/tasks/watch", self._watch_all),
            web.get("/v1/tasks/{id}", self._get),
            web.post("/v1/tasks/{id}/cancel", self._cancel),
            web.get("/v1/tasks/{id}/watch", self._watch_one),
            web.get("/v1/tasks/{id}/tree", self._tree),
            web.get("/v1/blobs/{digest}", self._blob),
        ]

    @property
    def _tasks(self) -> dict[bytes, TaskState]:
        return self.driver.node.tasks.tasks

    # Handlers

    async def _submit(self, request: web.Request) -> web.Response:
        blobs = self.blobs
        if blobs is not None:
            if (request.content_length or 0) > MAX_SUBMIT_BYTES:
                raise _too_large(f"the request body is {request.content_length} bytes")
            request = request.clone(client_max_size=MAX_SUBMIT_BYTES)
        try:
            body = await _json_object(
                request,
                required={"role", "input"},
                optional={"priority", "idempotency_key", "timeout", "wait"},
            )
        except web.HTTPRequestEntityTooLarge:
            if blobs is None:
                raise
            raise _too_large("the request body is larger") from None
        role, text = body["role"], body["input"]
        if not isinstance(role, str) or not 0 < len(role) <= MAX_NAME_CHARS:
            raise _bad(f"role must be a string of 1 to {MAX_NAME_CHARS} characters")
        if not isinstance(text, str):
            raise _bad("input must be a string (UTF-8 text, may be empty)")
        data = text.encode("utf-8", errors="surrogatepass")
        if len(data) > MAX_INLINE_PAYLOAD and blobs is None:
            raise _bad(f"input is {len(data)} bytes of UTF-8; at most {MAX_INLINE_PAYLOAD} allowed")
        if len(data) > BLOB_LIMIT:
            raise _too_large(f"input is {len(data)} bytes of UTF-8")
        priority = body.get("priority", 0)
        if type(priority) is not int or not 0 <= priority <= MAX_UINT:
            raise _bad(f"priority must be an integer from 0 to {MAX_UINT}")
        key = body.get("idempotency_key") or ""
        if not isinstance(key, str) or len(key) > MAX_NAME_CHARS:
            raise _bad(f"idempotency_key must be a string of at most {MAX_NAME_CHARS} characters")
        timeout = body.get("timeout", 0)
        if (
            type(timeout) not in (int, float)
            or not math.isfinite(timeout)
            or not 0 <= timeout <= MAX_TIMEOUT
        ):
            raise _bad(f"timeout must be a number of seconds from 0 (none) to {MAX_TIMEOUT:g}")
        wait = body.get("wait", False)
        if not isinstance(wait, bool):
            raise _bad("wait must be true or false")
        if blobs is not None and len(data) > MAX_INLINE_PAYLOAD:
            try:
                data = await blobs.store_input(data)
            except BlobUnavailable as exc:
                raise Problem(
                    503, "Service Unavailable", f"{exc}; nothing was submitted, try again"
                ) from None
        try:
            task_id = self.driver.submit(
                role,
                data,
                priority=priority,
                idempotency_key=key,
                nonce=b"" if key else os.urandom(16),
                timeout=float(timeout),
            )
        except LocalProtocolError as exc:
            raise _bad(str(exc)) from None
        if not await self.driver.wait_replicated(task_id, self.replication_timeout):
            wanted = self.driver.node.config.tasks.replication
            raise Problem(
                503,
                "Service Unavailable",
                f"task {task_id.hex()} is durable at this peer but was not held by {wanted} "
                f"other peer(s) within {self.replication_timeout:g} s; it keeps spreading by "
                "gossip (GET it to follow it, or resubmit with the same idempotency_key)",
            )
        if wait:
            async for _ in self._changes(task_id):
                if self._tasks[task_id].state in FINAL_STATES:
                    break
            return web.json_response(task_json(self._tasks[task_id]))
        return web.json_response({"id": task_id.hex()}, status=202)

    async def _blob(self, request: web.Request) -> web.Response:
        text = request.match_info["digest"]
        digest = digest_of_text(text)
        if digest is None:
            raise _bad(f"a blob digest is 64 hex digits (SHA-256), got {text[:70]!r}")
        if self.blobs is None:
            raise Problem(503, "Service Unavailable", "this peer does not serve blobs")
        try:
            data = await self.blobs.get(digest, blob_hints(self.driver, digest))
        except BlobUnavailable as exc:
            raise Problem(404, "Not Found", f"blob {digest.hex()}: {exc}") from None
        return web.Response(body=data, content_type="application/octet-stream")

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(task_json(self._find(request.match_info["id"])))

    async def _list(self, request: web.Request) -> web.Response:
        state = request.query.get("state", "")
        if state and state not in STATES:
            raise _bad(f"state must be one of {', '.join(STATES)}, got {state!r}")
        role = request.query.get("role", "")
        limit_text = request.query.get("limit", str(DEFAULT_LIST))
        if not limit_text.isdigit() or not 0 < int(limit_text) <= MAX_LIST:
            raise _bad(f"limit must be an integer from 1 to {MAX_LIST}, got {limit_text!r}")
        chosen = [
            st
            for st in self._tasks.values()
            if st.record is not None
            and (not state or st.state == state)
            and (not role or st.record.role == role)
        ]
        chosen.sort(key=lambda st: (-st.record.created if st.record else 0.0, st.task_id))
        return web.json_response({"tasks": [task_json(st) for st in chosen[: int(limit_text)]]})

    async def _cancel(self, request: web.Request) -> web.Response:
        st = self._find(request.match_info["id"])
        if st.state in FINAL_STATES:
            raise Problem(
                409, "Conflict", f"task {st.task_id.hex()} is already {st.state}; nothing to cancel"
            )
        self.driver.cancel_task(st.task_id, "cancelled through the API")
        return web.json_response(task_json(st), status=202)

    async def _tree(self, request: web.Request) -> web.Response:
        root = self._find(request.match_info["id"])
        return web.json_response(tree_json(root, self.driver.children_of))

    async def _stats(self, request: web.Request) -> web.Response:
        totals = dict.fromkeys(
            ("tasks", *STATES, "executions", "duplicates", "takeovers", "fenced"), 0
        )
        for st in self._tasks.values():
            if st.record is None:
                continue
            totals["tasks"] += 1
            totals[st.state] += 1
            started = st.execution_count()
            totals["executions"] += started
            totals["duplicates"] += max(0, started - 1)
            if st.claim is not None:
                totals["takeovers"] += st.claim.epoch - 1
            totals["fenced"] += sum(
                1 for e in st.executions.values() if e.phase != START and e.outcome == "fenced"
            )
        node = self.driver.node
        totals["flips"] = node.tasks.counters["result flips"]
        totals["signatures_verified"] = node.cache.verified
        executor = self.driver.executor
        here = {
            "running": len(node.tasks.running),
            "suspended": len(node.tasks.suspended),
            "executor_running": executor.running if executor is not None else 0,
            "executor_suspended": executor.suspended if executor is not None else 0,
            "executor_waiting": executor.waiting if executor is not None else 0,
            "counters": dict(sorted(node.tasks.counters.items())),
        }
        return web.json_response({"totals": totals, "here": here})

    async def _watch_one(self, request: web.Request) -> web.StreamResponse:
        st = self._find(request.match_info["id"])
        response = await self._open_stream(request)
        seen: set[tuple[Any, ...]] = set()
        try:
            async for _ in self._changes(st.task_id):
                for event in _new_facts(st, seen, round(self._wall(), 3)):
                    await response.write(f"data: {json.dumps(event)}\n\n".encode())
                if st.state in FINAL_STATES:
                    break
        except ConnectionError:
            pass
        return response

    async def _watch_all(self, request: web.Request) -> web.StreamResponse:
        follow = request.query.get("follow", "0").strip().lower()
        if follow not in ("0", "1", "true", "false", "yes", "no", ""):
            raise _bad(f"follow must be 1 or 0, got {follow!r}")
        hub = self.driver.task_hub
        if follow not in ("1", "true", "yes"):
            events = [e for e in map(task_event_json, hub.recent) if e is not None]
            return web.json_response({"events": events})
        queue = hub.subscribe()
        try:
            response = await self._open_stream(request)
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self.keepalive)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if item is None:
                    break
                event = task_event_json(item)
                if event is not None:
                    await response.write(f"data: {json.dumps(event)}\n\n".encode())
        except ConnectionError:
            pass
        finally:
            hub.unsubscribe(queue)
        return response

    # Helpers

    def _wall(self) -> float:
        return self.driver.wall()

    def _find(self, text: str) -> TaskState:
        text = text.strip().lower()
        if not text or any(c not in "0123456789abcdef" for c in text) or len(text) > 64:
            raise _bad(f"a task id is 64 hex digits (or a unique prefix), got {text[:70]!r}")
        if len(text) == 64:
            st = self._tasks.get(bytes.fromhex(text))
            matches = [st] if st is not None and st.record is not None else []
        elif len(text) < MIN_ID_PREFIX:
            raise _bad(f"a task id prefix needs at least {MIN_ID_PREFIX} hex digits")
        else:
            matches = [
                st
                for tid, st in self._tasks.items()
                if st.record is not None and tid.hex().startswith(text)
            ][:2]
        if not matches:
            raise Problem(404, "Not Found", f"task {text} is not known to this peer (yet)")
        if len(matches) > 1:
            raise _bad(f"task id prefix {text} is ambiguous; give more digits")
        return matches[0]

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b": stream open\n\n")
        return response

    async def _changes(self, task_id: bytes) -> AsyncIterator[None]:
        """Yield now, then whenever a note about `task_id` arrives or `WATCH_POLL` passed.

        Ends when the peer shuts down (its task notes stop)."""
        queue = self.driver.task_hub.subscribe()
        try:
            yield None
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), WATCH_POLL)
                except TimeoutError:
                    yield None
                    continue
                if item is None:
                    return
                if getattr(item.note, "task_id", None) == task_id:
                    yield None
        finally:
            self.driver.task_hub.unsubscribe(queue)


def _new_facts(st: TaskState, seen: set[tuple[Any, ...]], when: float) -> list[Json]:
    """The events about `st` not reported yet (recorded in `seen`), in causal order."""
    tid = st.task_id.hex()
    out: list[Json] = []
    claim = st.claim
    if claim is not None and ("claim", claim.epoch, claim.owner) not in seen:
        seen.add(("claim", claim.epoch, claim.owner))
        out.append(
            {
                "type": "task-claimed",
                "time": when,
                "id": tid,
                "owner": node_id_text(claim.owner),
                "epoch": claim.epoch,
            }
        )
    for (epoch, owner, phase), entry in sorted(st.executions.items()):
        if ("execution", epoch, owner, phase) in seen:
            continue
        seen.add(("execution", epoch, owner, phase))
        event: Json = {
            "type": "task-started" if phase == START else "task-ended",
            "time": when,
            "id": tid,
            "owner": node_id_text(owner),
            "epoch": epoch,
        }
        if phase != START:
            event["outcome"] = entry.outcome
        out.append(event)
    acc = st.accepted
    if acc is not None and ("result", acc.epoch, acc.owner) not in seen:
        seen.add(("result", acc.epoch, acc.owner))
        out.append(
            {
                "type": "task-result",
                "time": when,
                "id": tid,
                "owner": node_id_text(acc.owner),
                "epoch": acc.epoch,
                "outcome": acc.outcome,
                "state": st.state,
            }
        )
    if st.cancel is not None and ("cancel",) not in seen:
        seen.add(("cancel",))
        out.append(
            {
                "type": "task-cancelled",
                "time": when,
                "id": tid,
                "by": node_id_text(st.cancel.by),
                "reason": st.cancel.reason,
            }
        )
    return out
