"""The task endpoints of the local HTTP API: submit, list, get, cancel, stats (/v1/tasks...).

docs/http-api.md is the contract; a task's JSON and the look-up of a task named in a URL are
in `peer.http.task_views` (shared with the tree, `peer.http.tree`, and the streams,
`peer.http.watch`), and the network scope of the listing (`?scope=network`) in
`peer.http.task_pages`.

Invariants:
- A submission is acknowledged (202) only after the task record is durable here (fsynced) and,
  when the network's replication is above 0, held by that many other peers (`TaskReplicated`);
  if that does not happen within `replication_timeout` the answer is 503 — the record exists
  here and keeps spreading by gossip, so the detail names its id. A record that could not be
  written here (disk full, I/O error: `NotDurable`) is answered 503 at once, never 2xx.
- A submission that fails validation creates nothing: every field is checked before the node
  is called. A role no live member advertises is refused (422, naming the roles served and the
  closest one) unless the body asks to `queue`: a typo fails at once instead of waiting
  forever. A queued task has a queue timeout (`queue_timeout`, by default
  `DEFAULT_QUEUE_TIMEOUT`; 0 for none), made durable here before the task is submitted: if no
  peer claimed it by then, this peer cancels it with the reason (`peer.runtime.queue_timeouts`).
  Without an idempotency key each submission gets a fresh random nonce (a new task), or a
  variant of it that makes this peer one of the task's replicas (decision 94);
  with one, resubmitting the same spec at any peer names the same task, and another spec under
  the same key is answered 409 with the existing task's id (`task` in the problem details).
  A W3C `traceparent` header puts the submission in the client's trace (an invalid one is
  ignored, as the specification says).
- A task whose record has not arrived here yet is "not known here yet" (404); one compacted
  here after its retention (`protocol.tasks.retention`) answers 410 Gone with its tombstone's
  fields (`peer.http.task_views.TaskCompacted`); stats count live tasks and tombstones held
  here.
- Blobs: with a blob service attached (`blobs`), an input over `MAX_INLINE_PAYLOAD` (up to
  `BLOB_LIMIT`) is stored here and at `replication` other live peers before the task is
  submitted with its reference as input; if they do not take it the answer is 503 and nothing
  is submitted. Task JSON shows references as they are. Without a service, inputs over the
  inline limit are refused (400).
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import math
import os
import sqlite3

from aiohttp import web

from peer.agents.model_calls import ModelCalls
from peer.http.common import (
    MAX_BODY_BYTES,
    PROBLEM_TYPE,
    Json,
    Problem,
    bad_request,
    json_object,
    parse_node_id,
)
from peer.http.task_pages import network_page
from peer.http.task_views import (
    FINAL_STATES,
    STATES,
    WATCH_POLL,
    TaskCompacted,
    duplicates,
    model_calls_json,
    model_calls_of,
    read_task,
    task_json,
)
from peer.runtime.blobs import BlobService, BlobUnavailable
from peer.runtime.driver import Driver
from peer.runtime.group_commit import NotDurable
from peer.runtime.queue_timeouts import DEFAULT_QUEUE_TIMEOUT, QueueTimeouts
from peer.runtime.task_listing import NetworkListing
from protocol.blobs import BLOB_LIMIT, blob_ref
from protocol.errors import LocalProtocolError
from protocol.node import Node
from protocol.tasks.idempotency import IdempotencyConflict, spec_for, spec_of
from protocol.tasks.messages import MAX_INLINE_PAYLOAD, is_traceparent
from protocol.tasks.state import TaskState
from protocol.wire import MAX_NAME_CHARS, MAX_UINT

REPLICATION_TIMEOUT = 5.0
"""Seconds a submission waits for the record to be held by other peers before answering 503."""
MAX_TIMEOUT = 7 * 24 * 3600.0
"""Largest task timeout accepted, in seconds (a week)."""
MAX_LIST = 10_000
DEFAULT_LIST = 100
MAX_SUBMIT_BYTES = 2 * BLOB_LIMIT + MAX_BODY_BYTES
"""Largest `POST /v1/tasks` body with a blob service attached: a `BLOB_LIMIT` input even if
JSON escaping doubles it (other routes keep the API's `MAX_BODY_BYTES`)."""


def _too_large(what: str) -> Problem:
    return Problem(
        413,
        "Content Too Large",
        f"{what}; a task input is at most {BLOB_LIMIT} bytes (inputs over "
        f"{MAX_INLINE_PAYLOAD} bytes travel as blobs), and the request body at most "
        f"{MAX_SUBMIT_BYTES} bytes",
    )


def _key_conflict(task_id: bytes) -> web.Response:
    # Problem details with an extension member, so a client reads the id without parsing text.
    body = {
        "type": "about:blank",
        "title": "Conflict",
        "status": 409,
        "detail": f"the idempotency key already names task {task_id.hex()}, submitted with "
        "another role, input, priority or timeout; nothing was submitted",
        "task": task_id.hex(),
    }
    return web.json_response(body, status=409, content_type=PROBLEM_TYPE)


def served_roles(node: Node) -> list[str]:
    """The roles the live members advertise (this peer's included), sorted."""
    return sorted(
        {
            role
            for node_id, state in node.peer_states().items()
            if not node.is_down(node_id)
            for role in state.roles
        }
    )


def unserved_role(role: str, served: list[str]) -> web.Response:
    """422 for a task no live peer can run: problem details naming the role, the roles served
    and the closest of them (a likely typo), also as the extension members `role`, `roles` and
    `suggestion` (null when none is close)."""
    close = difflib.get_close_matches(role, served, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    body: Json = {
        "type": "about:blank",
        "title": "Unprocessable Content",
        "status": 422,
        "detail": f"no live peer serves the role {role!r}{hint}; the network serves: "
        f"{', '.join(served) or 'no role'}. Nothing was submitted; to wait for a peer that "
        "serves it, submit with queue: true (grapevine submit --queue)",
        "role": role,
        "roles": served,
        "suggestion": close[0] if close else None,
    }
    return web.json_response(body, status=422, content_type=PROBLEM_TYPE)


def _seconds(body: Json, name: str, default: float) -> float:
    """The number of seconds `body` gives as `name` (`default` when absent).

    Raises:
        Problem: 400 for anything but a number from 0 (none) to `MAX_TIMEOUT`.
    """
    value = body.get(name, default)
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= MAX_TIMEOUT:
        raise bad_request(f"{name} must be a number of seconds from 0 (none) to {MAX_TIMEOUT:g}")
    return float(value)


def _traceparent(request: web.Request) -> str:
    """The client's W3C `traceparent` header; "" when absent or not one (the specification says
    to ignore an invalid one and start a trace of our own)."""
    header = request.headers.get("traceparent", "").strip()
    return header if is_traceparent(header) else ""


class TaskApi:
    """The /v1/tasks endpoints of one peer, except the tree and the streams.

    Args:
        driver: the peer's driver.
        blobs: stores large inputs; None refuses inputs over the inline limit.
        replication_timeout: see `REPLICATION_TIMEOUT`.
        queue_timeouts: where queued tasks' timeouts are kept and enforced.
    """

    def __init__(
        self,
        driver: Driver,
        blobs: BlobService | None,
        replication_timeout: float = REPLICATION_TIMEOUT,
        *,
        queue_timeouts: QueueTimeouts,
    ) -> None:
        self.driver = driver
        self.queue_timeouts = queue_timeouts
        self.blobs = blobs
        self.replication_timeout = replication_timeout
        self.listing = NetworkListing(driver)

    def routes(self) -> list[web.RouteDef]:
        """The routes, fixed paths before `{id}` so that they match first."""
        return [
            web.post("/v1/tasks", self._submit),
            web.get("/v1/tasks", self._list),
            web.get("/v1/tasks/stats", self._stats),
            web.get("/v1/tasks/{id}", self._get),
            web.post("/v1/tasks/{id}/cancel", self._cancel),
        ]

    def _held(self, task_id: bytes) -> TaskState:
        st = self.driver.node.task(task_id)
        assert st is not None, "a task submitted here is held here"
        return st

    async def _submit(self, request: web.Request) -> web.Response:
        blobs = self.blobs
        if blobs is not None:
            if (request.content_length or 0) > MAX_SUBMIT_BYTES:
                raise _too_large(f"the request body is {request.content_length} bytes")
            request = request.clone(client_max_size=MAX_SUBMIT_BYTES)
        try:
            body = await json_object(
                request,
                required={"role", "input"},
                optional={
                    "priority",
                    "idempotency_key",
                    "timeout",
                    "wait",
                    "queue",
                    "queue_timeout",
                },
            )
        except web.HTTPRequestEntityTooLarge:
            if blobs is None:
                raise
            raise _too_large("the request body is larger") from None
        role, text = body["role"], body["input"]
        if not isinstance(role, str) or not 0 < len(role) <= MAX_NAME_CHARS:
            raise bad_request(f"role must be a string of 1 to {MAX_NAME_CHARS} characters")
        if not isinstance(text, str):
            raise bad_request("input must be a string (UTF-8 text, may be empty)")
        data = text.encode("utf-8", errors="surrogatepass")
        if len(data) > MAX_INLINE_PAYLOAD and blobs is None:
            raise bad_request(
                f"input is {len(data)} bytes of UTF-8; at most {MAX_INLINE_PAYLOAD} allowed"
            )
        if len(data) > BLOB_LIMIT:
            raise _too_large(f"input is {len(data)} bytes of UTF-8")
        priority = body.get("priority", 0)
        if type(priority) is not int or not 0 <= priority <= MAX_UINT:
            raise bad_request(f"priority must be an integer from 0 to {MAX_UINT}")
        key = body.get("idempotency_key") or ""
        if not isinstance(key, str) or len(key) > MAX_NAME_CHARS:
            raise bad_request(
                f"idempotency_key must be a string of at most {MAX_NAME_CHARS} characters"
            )
        timeout = _seconds(body, "timeout", 0)
        wait = body.get("wait", False)
        if not isinstance(wait, bool):
            raise bad_request("wait must be true or false")
        queue = body.get("queue", False)
        if not isinstance(queue, bool):
            raise bad_request("queue must be true or false")
        if "queue_timeout" in body and not queue:
            raise bad_request("queue_timeout applies to a queued task: add queue: true")
        queue_timeout = _seconds(body, "queue_timeout", DEFAULT_QUEUE_TIMEOUT) if queue else 0
        if not queue and not self.driver.node.capable(role):
            return unserved_role(role, served_roles(self.driver.node))
        if blobs is not None and len(data) > MAX_INLINE_PAYLOAD:
            # The blob goes to its task's designated holders, so the task id comes first.
            ref = await asyncio.to_thread(blob_ref, data)
            nonce = self._nonce(key, role, ref, priority, timeout)
            task_id = self.driver.task_id_for(
                role, ref, priority=priority, idempotency_key=key, nonce=nonce, timeout=timeout
            )
            try:
                data = await blobs.store_input(data, task_id)
            except BlobUnavailable as exc:
                raise Problem(
                    503, "Service Unavailable", f"{exc}; nothing was submitted, try again"
                ) from None
            except OSError as exc:
                raise Problem(
                    503,
                    "Service Unavailable",
                    f"the input could not be stored on this peer's disk ({exc.strerror or exc}); "
                    "nothing was submitted, try again",
                ) from None
        else:
            nonce = self._nonce(key, role, data, priority, timeout)
        created = self.driver.wall()
        if queue_timeout:
            queued_id = self.driver.task_id_for(
                role, data, priority=priority, idempotency_key=key, nonce=nonce, timeout=timeout
            )
            try:  # before the task exists, so that no task runs without its timeout
                self.queue_timeouts.hold(queued_id, role, float(queue_timeout), created)
            except sqlite3.Error as exc:
                raise Problem(
                    503,
                    "Service Unavailable",
                    f"the queue timeout could not be stored on this peer's disk ({exc}); "
                    "nothing was submitted, try again",
                ) from None
        try:  # no await between `hold` and here: the task exists before the deadline is looked at
            task_id = await self.driver.submit_durably(
                role,
                data,
                priority=priority,
                idempotency_key=key,
                nonce=nonce,
                timeout=float(timeout),
                created=created,
                traceparent=_traceparent(request),
                queue_timeout=float(queue_timeout or 0),
            )
        except IdempotencyConflict as exc:
            return _key_conflict(exc.task_id)
        except LocalProtocolError as exc:
            raise bad_request(str(exc)) from None
        except NotDurable as exc:
            raise Problem(
                503,
                "Service Unavailable",
                f"{exc}; it is not acknowledged: this peer holds it in memory only and may "
                "still run it; with an idempotency_key, resubmitting here names the same task "
                "(GET /v1/health says when writes work again)",
            ) from None
        node = self.driver.node
        if not any(m.up for m in node.members() if m.node_id != node.node_id):
            raise Problem(
                503,
                "Service Unavailable",
                f"task {task_id.hex()} is durable at this peer, which is alone in its network: "
                "no other peer can hold a copy, so it is not acknowledged; it runs all the same "
                "if this peer serves its role (start more peers with --join to replicate)",
            )
        if not await self.driver.wait_replicated(task_id, self.replication_timeout):
            held = self._held(task_id).record
            assert held is not None
            if spec_of(held) != spec_for(role, data, priority, b"", timeout):
                return _key_conflict(task_id)  # the key's task, held elsewhere, told us
            wanted = self.driver.node.config.tasks.replication
            raise Problem(
                503,
                "Service Unavailable",
                f"task {task_id.hex()} is durable at this peer but was not held by {wanted} "
                f"other peer(s) within {self.replication_timeout:g} s; it keeps spreading by "
                "gossip (GET it to follow it, or resubmit with the same idempotency_key)",
            )
        if not wait:
            return web.json_response({"id": task_id.hex()}, status=202)
        while self._held(task_id).state not in FINAL_STATES:
            # A waiter keyed by this task, woken by its accepted result or cancel, and a
            # re-read every WATCH_POLL s. A subscription to every task's notes, as before,
            # woke each waiting submission for every note of every task (decision 78).
            await self.driver.notifications.wait_result(task_id, WATCH_POLL)
        return web.json_response(task_json(self._held(task_id)))

    def _nonce(self, key: str, role: str, data: bytes, priority: int, timeout: float) -> bytes:
        """Empty with an idempotency key (the key names the task); else a fresh random one,
        or a variant of it that puts this peer on top of the task's replica set while it has
        half its slots free (decision 96), else among its replicas (decision 94)."""
        if key:
            return b""
        digest = hashlib.sha256(data).digest()
        return self.driver.node.nonce_near_home(
            os.urandom(16), role, digest, priority=priority, timeout=float(timeout)
        )

    async def _get(self, request: web.Request) -> web.Response:
        try:
            st = await read_task(self.driver, request.match_info["id"])
        except TaskCompacted as gone:
            return gone.response()
        return web.json_response(task_json(st))

    async def _list(self, request: web.Request) -> web.Response:
        state = request.query.get("state", "")
        if state and state not in STATES:
            raise bad_request(f"state must be one of {', '.join(STATES)}, got {state!r}")
        role = request.query.get("role", "")
        owner_text = request.query.get("owner", "")
        owner = parse_node_id(owner_text, "owner") if owner_text else b""
        scope = request.query.get("scope", "local")
        if scope == "network":
            return await network_page(self.listing, request.query, state, role, owner)
        if scope != "local":
            raise bad_request(f"scope must be local or network, got {scope[:70]!r}")
        if "cursor" in request.query:
            raise bad_request("cursor pages a network listing: it needs scope=network")
        limit_text = request.query.get("limit", str(DEFAULT_LIST))
        if not limit_text.isdigit() or not 0 < int(limit_text) <= MAX_LIST:
            raise bad_request(f"limit must be an integer from 1 to {MAX_LIST}, got {limit_text!r}")
        chosen = [
            st
            for st in self.driver.node.held_tasks()
            if st.record is not None
            and (not state or st.state == state)
            and (not role or st.record.role == role)
            and (not owner or (st.claim is not None and st.claim.owner == owner))
        ]
        chosen.sort(key=lambda st: (-st.record.created if st.record else 0.0, st.task_id))
        return web.json_response({"tasks": [task_json(st) for st in chosen[: int(limit_text)]]})

    async def _cancel(self, request: web.Request) -> web.Response:
        st = await read_task(self.driver, request.match_info["id"])
        if st.state in FINAL_STATES:
            raise Problem(
                409, "Conflict", f"task {st.task_id.hex()} is already {st.state}; nothing to cancel"
            )
        try:
            self.driver.cancel_task(st.task_id, "cancelled through the API")
        except LocalProtocolError as exc:  # only the origin or the parent's owner may cancel
            raise Problem(403, "Forbidden", str(exc)) from None
        return web.json_response(task_json(st), status=202)

    async def _stats(self, request: web.Request) -> web.Response:
        totals = dict.fromkeys(
            ("tasks", *STATES, "executions", "duplicates", "takeovers", "fenced"), 0
        )
        totals.update(model_calls_json(ModelCalls()))
        node = self.driver.node
        for st in node.held_tasks():
            if st.record is None:
                continue
            totals["tasks"] += 1
            totals[st.state] += 1
            totals["executions"] += st.execution_count()
            totals["duplicates"] += duplicates(st)
            if st.claim is not None:
                totals["takeovers"] += st.claim.epoch - 1
            totals["fenced"] += sum(1 for run in st.runs() if run.outcome == "fenced")
            if st.checkpoints:
                calls = model_calls_json(model_calls_of(self.driver, st.task_id))
                for field, count in calls.items():
                    totals[field] += count
        counters = node.task_counters()
        totals["flips"] = counters.get("result flips", 0)
        totals["live"] = sum(1 for _ in node.held_tasks())
        totals["tombstones"] = node.tombstone_count()
        totals["signatures_verified"] = node.signatures_verified()
        executor = self.driver.executor
        here = {
            "running": len(node.running_here()),
            "suspended": len(node.suspended_here()),
            "executor_running": executor.running if executor is not None else 0,
            "executor_suspended": executor.suspended if executor is not None else 0,
            "executor_waiting": executor.waiting if executor is not None else 0,
            "counters": dict(sorted(counters.items())),
        }
        return web.json_response({"totals": totals, "here": here})
