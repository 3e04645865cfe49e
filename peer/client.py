"""Async Python client for a peer's local HTTP API (docs/http-api.md).

Invariants:
- Every failure surfaces as one of two exceptions: `ClientError` when the peer could not be
  reached or answered something that is not HTTP/JSON at all, `ApiError` when it answered with
  an error status (RFC 9457 problem details). Both derive from `GrapevineError`.
- Answers are returned as the decoded JSON objects the API documents, field names unchanged, so
  `grapevine ... --json` and this client speak the same vocabulary.
- One `aiohttp.ClientSession` per `GrapevineClient`, opened by `async with` and closed on exit.
- Every request carries the peer's API token (`Authorization: Bearer`): the one given, else the
  one `peer.api_token.find_token` finds when the session opens (a token file or data directory
  given here, `$GRAPEVINE_API_TOKEN`, `$GRAPEVINE_API_TOKEN_FILE`, then `api.token` in
  `$GRAPEVINE_DATA_DIR` or the default data directory), so a client on the peer's machine
  needs no extra step. Without one the peer answers 401 (`ApiError`).

Example::

    async with GrapevineClient("127.0.0.1:8946", data_dir=Path("grapevine-data")) as peer:
        for member in await peer.members():
            print(member["short_id"], member["status"])
        async for event in peer.events(follow=True):
            print(event["type"])
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

from peer.api_token import check_token, find_token

DEFAULT_API = "127.0.0.1:8946"
"""Where `grapevine agent` serves its API unless told otherwise (`--api`)."""

JsonObject = dict[str, Any]

_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15.0, sock_connect=5.0)
# A followed event stream stays open indefinitely; only connecting is bounded.
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=None)
_BLOB_TIMEOUT = aiohttp.ClientTimeout(total=600.0, sock_connect=5.0)
"""A blob may be large and fetched from another peer first: minutes, not seconds."""


class GrapevineError(Exception):
    """Base of the errors this client raises."""


class ClientError(GrapevineError):
    """The peer's API could not be reached, or its answer was not valid HTTP/JSON.

    Attributes:
        api: the address the client was talking to, as given (e.g. "127.0.0.1:8946").
        reason: a short lowercase cause, e.g. "connection refused" or "timed out".
    """

    def __init__(self, api: str, reason: str) -> None:
        super().__init__(f"cannot reach the peer API at {api} ({reason})")
        self.api = api
        self.reason = reason


class ApiError(GrapevineError):
    """The peer answered with an error status and (usually) RFC 9457 problem details.

    Attributes:
        status: the HTTP status code.
        title: the problem's short summary (the reason phrase when the body had none).
        detail: the problem's explanation; may be empty.
    """

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        super().__init__(f"{title}: {detail}" if detail else title)
        self.status = status
        self.title = title
        self.detail = detail


def base_url(api: str) -> str:
    """Return the HTTP base URL for an API address.

    Args:
        api: "host:port", "[v6addr]:port" or a full "http://host:port" URL.

    Returns:
        The URL without a trailing slash, e.g. "http://127.0.0.1:8946".

    Raises:
        ValueError: the address has no port or an unsupported scheme.
    """
    text = api.strip().rstrip("/")
    if "://" in text:
        if not text.startswith(("http://", "https://")):
            raise ValueError(f"the API address {api!r} must use http:// or https://")
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the API address {api!r} must be host:port, e.g. {DEFAULT_API}")
    return f"http://{text}"


class GrapevineClient:
    """A connection to one peer's local HTTP API; use it as an async context manager.

    Args:
        api: the API address (`--api` of `grapevine agent`), "host:port" or an http URL.
        token: the peer's API token; None: found when the client opens (module invariants).
        data_dir: the peer's data directory, whose `api.token` to send (when no `token`).
        token_file: a file holding the token to send (when no `token`; wins over `data_dir`).

    Raises:
        ValueError: `api` is not a usable address or `token` not a usable token (raised by
            the constructor); `peer.api_token.TokenError` (a ValueError, raised on opening):
            the token file or data directory given holds no usable token.
    """

    def __init__(
        self,
        api: str = DEFAULT_API,
        token: str | None = None,
        *,
        data_dir: Path | None = None,
        token_file: Path | None = None,
    ) -> None:
        self.api = api
        self._base = base_url(api)
        self._token = None if token is None else check_token(token, "the token given")
        self._data_dir = data_dir
        self._token_file = token_file
        self.token_source: str | None = None if token is None else "the token given"
        """Where the token sent came from (set on opening); None: no token was found."""
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        token = self._token
        if token is None:
            found = find_token(self._token_file, self._data_dir)
            if found is not None:
                token, self.token_source = found.value, found.source
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        self._session = aiohttp.ClientSession(timeout=_REQUEST_TIMEOUT, headers=headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def self_info(self) -> JsonObject:
        """Return this peer's identity: id, short_id, address, api, incarnation, network_id,
        version and uptime (`GET /v1/self`)."""
        return await self._request("GET", "/v1/self")

    async def health(self) -> JsonObject:
        """Return `{status, members_alive, uptime}`; status is "ok" or "leaving"."""
        return await self._request("GET", "/v1/health")

    async def members(self) -> list[JsonObject]:
        """Return every member this peer knows, itself included (`self: true`).

        Each has id, short_id, address, status (alive, suspect, dead or left), incarnation,
        self, roles, free_slots, queue_len and load.
        """
        answer = await self._request("GET", "/v1/members")
        return _list_field(answer, "members", self.api)

    async def leave(self) -> JsonObject:
        """Ask the peer to leave the network gracefully; it gossips the leave, then exits 0."""
        return await self._request("POST", "/v1/leave")

    async def send_event(self, name: str, payload: str = "") -> JsonObject:
        """Broadcast a user event to every peer; returns `{origin, ltime}`.

        Args:
            name: the event name.
            payload: a UTF-8 string, possibly empty; the peer enforces the size limit.
        """
        return await self._request("POST", "/v1/events", {"name": name, "payload": payload})

    async def recent_events(self) -> list[JsonObject]:
        """Return the peer's buffer of recent events and membership changes (up to 1,000)."""
        answer = await self._request("GET", "/v1/events")
        return _list_field(answer, "events", self.api)

    async def events(self, follow: bool = True) -> AsyncIterator[JsonObject]:
        """Yield events as the peer receives them (`GET /v1/events?follow=1`, server-sent events).

        Each is `{type, time, ...}` as docs/http-api.md lists. With `follow=False`, yields the
        recent buffer and stops. A followed stream ends only when the peer closes it.

        Raises:
            ClientError: the peer could not be reached or the stream broke off mid-event.
            ApiError: the peer refused the request.
        """
        if not follow:
            for event in await self.recent_events():
                yield event
            return
        async for event in self._sse("/v1/events", {"follow": "1"}):
            yield event

    async def metrics(self) -> JsonObject:
        """Return the peer's counters: rejected (by reason), dropped, messages and bytes in and
        out, signatures verified and signature cache hits."""
        return await self._request("GET", "/v1/metrics")

    async def keys(self) -> JsonObject:
        """Return `{primary, accepted}` as key ids in hex; the keys themselves never leave."""
        return await self._request("GET", "/v1/keys")

    async def install_key(self, key: str) -> JsonObject:
        """Add `key` (base64) to the keyring as accepted; returns the keyring as `keys()` does."""
        return await self._keys_action("install", key)

    async def use_key(self, key: str) -> JsonObject:
        """Make the installed `key` (base64) the primary key that seals outgoing traffic."""
        return await self._keys_action("use", key)

    async def remove_key(self, key: str) -> JsonObject:
        """Remove `key` (base64) from the keyring; the peer refuses to remove its primary."""
        return await self._keys_action("remove", key)

    # Tasks

    async def submit(
        self,
        role: str,
        input: str,
        *,
        priority: int = 0,
        idempotency_key: str | None = None,
        timeout: float = 0.0,
        wait: bool = False,
    ) -> JsonObject:
        """Submit a task (`POST /v1/tasks`); returns `{id}` once the peer made it durable and
        replicated, or with `wait` the task (as `task()` returns it) once it is final.

        Args:
            role: the role that must run it ("echo", "sleep", an agent's role).
            input: the task's input text.
            priority: higher runs first (0 or more).
            idempotency_key: resubmitting the same task with the same key at the same peer
                names the same task instead of creating another.
            timeout: seconds one execution may run (0: no limit); then its outcome is "timeout".
            wait: answer only when the task is done, failed or cancelled (no client timeout).
        """
        body: JsonObject = {"role": role, "input": input, "priority": priority, "timeout": timeout}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if wait:
            body["wait"] = True
        return await self._request("POST", "/v1/tasks", body, _STREAM_TIMEOUT if wait else None)

    async def task(self, task_id: str) -> JsonObject:
        """Return one task: id, role, state (pending, running, done, failed, cancelled), owner,
        epoch, result, executions, duplicates, priority, parent, created, idempotency_key, ...

        Args:
            task_id: 64 hex digits, or a unique prefix of at least 6.
        """
        return await self._request("GET", f"/v1/tasks/{_task_path(task_id)}")

    async def tasks(
        self, state: str | None = None, role: str | None = None, limit: int | None = None
    ) -> list[JsonObject]:
        """Return the tasks this peer knows, newest first, optionally filtered by state/role."""
        query = {k: str(v) for k, v in (("state", state), ("role", role), ("limit", limit)) if v}
        answer = await self._request("GET", "/v1/tasks", params=query)
        return _list_field(answer, "tasks", self.api)

    async def list_tasks(
        self,
        scope: str = "local",
        *,
        state: str | None = None,
        role: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JsonObject:
        """Return the listing answer (`GET /v1/tasks`) as the API gives it.

        With scope "local", `{tasks}`: the tasks this peer holds, newest first. With scope
        "network", one page gathered from every live member's replica sets: `{tasks,
        next_cursor, partial, missing}`, tasks in id order (`id, role, state, outcome, origin,
        owner, epoch, created`); pass `next_cursor` back as `cursor` for the next page (null
        on the last); `partial` is true when the members in `missing` did not answer.

        Args:
            scope: "local" or "network".
            state: only tasks in this state (pending, running, done, failed, cancelled).
            role: only tasks of this role.
            limit: at most this many (local 1-10,000, network 1-500 a page).
            cursor: network only: list the tasks whose id is above this one.
        """
        params = {"scope": scope}
        for name, value in (("state", state), ("role", role), ("limit", limit)):
            if value:
                params[name] = str(value)
        if cursor:
            params["cursor"] = cursor
        answer = await self._request("GET", "/v1/tasks", params=params)
        _list_field(answer, "tasks", self.api)
        return answer

    async def network_task_pages(
        self,
        *,
        state: str | None = None,
        role: str | None = None,
        page_size: int | None = None,
        cursor: str | None = None,
    ) -> AsyncIterator[JsonObject]:
        """Yield the pages of the network listing from `cursor` on (the first by default),
        following `next_cursor` until the last page (see `list_tasks`)."""
        while True:
            page = await self.list_tasks(
                "network", state=state, role=role, limit=page_size, cursor=cursor
            )
            yield page
            following = page.get("next_cursor")
            if not isinstance(following, str) or not following:
                return
            cursor = following

    async def cancel(self, task_id: str) -> JsonObject:
        """Cancel a task network-wide; returns the task. Refused (409) once it is final."""
        return await self._request("POST", f"/v1/tasks/{_task_path(task_id)}/cancel")

    async def tree(self, task_id: str) -> JsonObject:
        """Return the task tree rooted at a task, as this peer knows it: the root's
        `{id, role, state, peer, agent, usage, duplicates, children: [...]}` (each child the
        same shape), plus `totals` over the tree and `truncated`.

        Args:
            task_id: 64 hex digits, or a unique prefix of at least 6.
        """
        return await self._request("GET", f"/v1/tasks/{_task_path(task_id)}/tree")

    async def task_stats(self) -> JsonObject:
        """Return `{totals: {tasks, pending, running, done, failed, cancelled, executions,
        duplicates, takeovers, fenced, flips, signatures_verified}, here: {...}}`."""
        return await self._request("GET", "/v1/tasks/stats")

    async def watch_task(self, task_id: str) -> AsyncIterator[JsonObject]:
        """Yield a task's events (task-claimed, task-started, task-ended, task-result,
        task-cancelled), history first; ends once the task is final."""
        async for event in self._sse(f"/v1/tasks/{_task_path(task_id)}/watch", {}):
            yield event

    async def task_events(self, follow: bool = True) -> AsyncIterator[JsonObject]:
        """Yield task events as this peer observes them (`GET /v1/tasks/watch?follow=1`); with
        `follow=False` the recent buffer, then stop."""
        if not follow:
            answer = await self._request("GET", "/v1/tasks/watch")
            for event in _list_field(answer, "events", self.api):
                yield event
            return
        async for event in self._sse("/v1/tasks/watch", {"follow": "1"}):
            yield event

    async def wait_task(self, task_id: str) -> JsonObject:
        """Wait until the task is final (following its watch stream); return the task."""
        async for _ in self.watch_task(task_id):
            pass
        return await self.task(task_id)

    async def blob(self, digest: str) -> bytes:
        """The bytes of a blob (`GET /v1/blobs/{digest}`, digest in hex); the peer fetches it
        from the peers that hold it if it has no copy.

        Raises:
            ClientError: the peer could not be reached.
            ApiError: the peer answered an error (404: no peer asked held the blob).
        """
        session = self._require_session()
        try:
            async with session.get(
                f"{self._base}/v1/blobs/{digest}", timeout=_BLOB_TIMEOUT
            ) as response:
                if response.status >= 400:
                    raise await _api_error(response)
                return await response.read()
        except aiohttp.ClientError as exc:
            raise ClientError(self.api, _reason(exc)) from exc
        except TimeoutError as exc:
            raise ClientError(self.api, "timed out") from exc

    async def _keys_action(self, action: str, key: str) -> JsonObject:
        return await self._request("POST", "/v1/keys", {"action": action, "key": key})

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use GrapevineClient as `async with GrapevineClient(api) as c:`")
        return self._session

    async def _sse(self, path: str, params: dict[str, str]) -> AsyncIterator[JsonObject]:
        """Yield the JSON objects of a server-sent event stream until the peer ends it."""
        session = self._require_session()
        try:
            async with session.get(
                self._base + path,
                params=params,
                timeout=_STREAM_TIMEOUT,
                headers={"Accept": "text/event-stream"},
            ) as response:
                if response.status >= 400:
                    raise await _api_error(response)
                data: list[str] = []
                async for raw in response.content:
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif not line and data:
                        yield _decode_event("\n".join(data), self.api)
                        data = []
                    # Comments (":" keep-alives), "event:", "id:" and "retry:" carry nothing
                    # the API defines, so they are skipped.
        except aiohttp.ClientError as exc:
            raise ClientError(self.api, _reason(exc)) from exc

    async def _request(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        params: dict[str, str] | None = None,
    ) -> JsonObject:
        session = self._require_session()
        try:
            async with session.request(
                method,
                self._base + path,
                json=body,
                params=params,
                timeout=timeout or _REQUEST_TIMEOUT,
            ) as response:
                if response.status >= 400:
                    raise await _api_error(response)
                text = await response.text()
        except aiohttp.ClientError as exc:
            raise ClientError(self.api, _reason(exc)) from exc
        except TimeoutError as exc:
            raise ClientError(self.api, "timed out") from exc
        try:
            answer = json.loads(text) if text else {}
        except ValueError:
            raise ClientError(
                self.api, "the answer is not JSON; is this a Grapevine API?"
            ) from None
        if not isinstance(answer, dict):
            raise ClientError(self.api, "the answer is not a JSON object")
        return answer


def _task_path(task_id: str) -> str:
    text = task_id.strip()
    if not text or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"a task id is hex digits, got {task_id[:70]!r}")
    return text.lower()


def _list_field(answer: JsonObject, name: str, api: str) -> list[JsonObject]:
    items = answer.get(name)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ClientError(api, f"the answer has no list of objects named {name!r}")
    return items


def _decode_event(text: str, api: str) -> JsonObject:
    try:
        event = json.loads(text)
    except ValueError:
        raise ClientError(api, "the event stream carried a line that is not JSON") from None
    if not isinstance(event, dict):
        raise ClientError(api, "the event stream carried something other than a JSON object")
    return event


async def _api_error(response: aiohttp.ClientResponse) -> ApiError:
    title = response.reason or f"HTTP {response.status}"
    detail = ""
    try:
        body = await response.text()
    except aiohttp.ClientError:
        body = ""
    try:
        problem = json.loads(body)
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        title = str(problem.get("title") or title)
        detail = str(problem.get("detail") or "")
    elif body.strip():
        detail = body.strip()[:200]
    return ApiError(response.status, title, detail)


def _reason(exc: aiohttp.ClientError) -> str:
    """A short lowercase cause for a transport failure, e.g. "connection refused"."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        code = exc.os_error.errno
        if code == errno.ECONNREFUSED:
            return "connection refused"
        if code is not None:
            return os.strerror(code).lower()
        return str(exc.os_error) or "cannot connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the peer closed the connection"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
