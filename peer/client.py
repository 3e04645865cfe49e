"""Async Python client for a peer's local HTTP API (docs/http-api.md).

Invariants:
- Every failure surfaces as one of two exceptions: `ClientError` when the peer could not be
  reached or answered something that is not HTTP/JSON at all, `ApiError` when it answered with
  an error status (RFC 9457 problem details). Both derive from `GrapevineError`.
- Answers are returned as the decoded JSON objects the API documents, field names unchanged, so
  `grapevine ... --json` and this client speak the same vocabulary.
- A `GrapevineClient` holds a few keep-alive connections (`peer.client_http`), opened as
  needed inside `async with` and closed on exit. The HTTP layer is h11, not aiohttp's client,
  so importing this module stays cheap for the `grapevine` command (its imports are measured:
  tests/peer/test_cli_imports.py).
- A 404 that is not the API's own problem answer, from a server that serves the peers' gossip
  route, is `WrongPort`: the address is a peer's gossip port (`--bind`), not its API.
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

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlencode, urlsplit

from peer.api_token import check_token, find_token
from peer.client_errors import (
    DEFAULT_API,
    ApiError,
    ClientError,
    GrapevineError,
    WrongPort,
    api_error,
)

if TYPE_CHECKING:
    from peer.client_http import Connections, Response

__all__ = [
    "DEFAULT_API",
    "ApiError",
    "ClientError",
    "GrapevineClient",
    "GrapevineError",
    "JsonObject",
    "WrongPort",
    "base_url",
]

JsonObject = dict[str, Any]

REQUEST_TIMEOUT = 15.0
"""Seconds a request may take in all (connecting is bounded at `CONNECT_TIMEOUT`); a followed
stream and a `wait` are bounded by connecting only."""
CONNECT_TIMEOUT = 5.0
BLOB_TIMEOUT = 600.0
"""A blob may be large and fetched from another peer first: minutes, not seconds."""
_ERROR_BYTES = 64 * 1024
GOSSIP_PATH = "/gv/v1/envelope"
"""The route a peer's gossip port serves (`peer.runtime.transport.ENVELOPE_PATH`, which a test
holds equal to this): a server that has it is a gossip port, not the API."""


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
        blocking: use blocking sockets, with no event loop: the coroutines then never suspend,
            and `peer.client_blocking.run_blocking` runs them (for one-shot programs such as
            the `grapevine` client commands, which thereby skip importing asyncio). Such a
            client serves one request at a time.

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
        blocking: bool = False,
    ) -> None:
        self.api = api
        self._blocking = blocking
        url = urlsplit(base_url(api))
        self._prefix = url.path.rstrip("/")
        self._host = url.hostname or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._tls = url.scheme == "https"
        self._host_header = url.netloc
        self._token = None if token is None else check_token(token, "the token given")
        self._data_dir = data_dir
        self._token_file = token_file
        self.token_source: str | None = None if token is None else "the token given"
        """Where the token sent came from (set on opening); None: no token was found."""
        self._connections: Connections | None = None

    async def __aenter__(self) -> Self:
        token = self._token
        if token is None:
            found = find_token(self._token_file, self._data_dir)
            if found is not None:
                token, self.token_source = found.value, found.source
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        # The HTTP layer loads when a client opens, not when this module is imported: the
        # `grapevine` command imports it to build its parser (`grapevine --help`).
        from peer.client_http import Connections, Streams

        streams: Streams
        if self._blocking:
            from peer.client_blocking import BlockingStreams

            streams = BlockingStreams()
        else:
            from peer.client_streams import AsyncioStreams

            streams = AsyncioStreams()
        self._connections = Connections(
            self.api,
            self._host,
            self._port,
            self._host_header,
            headers,
            streams,
            tls=self._tls,
            connect_timeout=CONNECT_TIMEOUT,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connections is not None:
            await self._connections.close()
            self._connections = None

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

    async def join(self, seeds: list[str]) -> JsonObject:
        """Ask the peer to join more seeds ("host:port" each, `POST /v1/join`); returns
        `{joined}`, the address that answered. The peer keeps the seeds and retries them.

        Raises:
            ApiError: 502 when no seed answered (the detail names each and why), 400 for an
                address that is not one.
        """
        return await self._request("POST", "/v1/join", {"seeds": seeds})

    async def agents(self) -> JsonObject:
        """Return the peer's agents and the roles it serves (`GET /v1/agents`):
        `{agents: [...], roles: [...]}`."""
        return await self._request("GET", "/v1/agents")

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
        queue: bool = False,
        queue_timeout: float | None = None,
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
            queue: submit it even if no live peer serves `role` yet (otherwise refused, 422).
            queue_timeout: with `queue`, seconds it may wait for a first claim before it ends
                (cancelled, reason "queue timeout: ..."); None for the peer's default (600),
                0 for no limit.
        """
        body: JsonObject = {"role": role, "input": input, "priority": priority, "timeout": timeout}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if wait:
            body["wait"] = True
        if queue:
            body["queue"] = True
        if queue_timeout is not None:
            body["queue_timeout"] = queue_timeout
        return await self._request("POST", "/v1/tasks", body, None if wait else REQUEST_TIMEOUT)

    async def task(self, task_id: str) -> JsonObject:
        """Return one task: id, role, state (pending, running, done, failed, cancelled), owner,
        epoch, result, executions, duplicates, priority, parent, created, idempotency_key, ...

        Args:
            task_id: 64 hex digits, or a unique prefix of at least 6.
        """
        return await self._request("GET", f"/v1/tasks/{_task_path(task_id)}")

    async def tasks(
        self,
        state: str | None = None,
        role: str | None = None,
        limit: int | None = None,
        owner: str | None = None,
    ) -> list[JsonObject]:
        """Return the tasks this peer knows, newest first, optionally filtered by state, role
        and owner (a member's id)."""
        pairs = (("state", state), ("role", role), ("limit", limit), ("owner", owner))
        query = {k: str(v) for k, v in pairs if v}
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
        owner: str | None = None,
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
            owner: only tasks claimed by this member (its id as `members` shows it).
        """
        params = {"scope": scope}
        for name, value in (("state", state), ("role", role), ("limit", limit), ("owner", owner)):
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
        owner: str | None = None,
    ) -> AsyncIterator[JsonObject]:
        """Yield the pages of the network listing from `cursor` on (the first by default),
        following `next_cursor` until the last page (see `list_tasks`)."""
        while True:
            page = await self.list_tasks(
                "network", state=state, role=role, limit=page_size, cursor=cursor, owner=owner
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

    async def watch_task(self, task_id: str, tree: bool = False) -> AsyncIterator[JsonObject]:
        """Yield a task's events (task-claimed, task-started, task-ended, task-result,
        task-cancelled, and task-progress for each step of its executions at this peer),
        history first; ends once the task is final.

        Args:
            task_id: 64 hex digits, or a unique prefix of at least 6.
            tree: also the events of every task below it known at this peer, each announced
                by a task-child event.
        """
        params = {"tree": "1"} if tree else {}
        async for event in self._sse(f"/v1/tasks/{_task_path(task_id)}/watch", params):
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
        async with self._exchange("GET", f"/v1/blobs/{digest}", timeout=BLOB_TIMEOUT) as answer:
            return await answer.read()

    async def _keys_action(self, action: str, key: str) -> JsonObject:
        return await self._request("POST", "/v1/keys", {"action": action, "key": key})

    @contextlib.asynccontextmanager
    async def _exchange(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = REQUEST_TIMEOUT,
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[Response]:
        """Send a request; yield a successful answer's head, raise `ApiError` for an error one.

        `timeout` bounds the whole exchange (None: connecting only, for streams and waits).
        """
        if self._connections is None:
            raise RuntimeError("use GrapevineClient as `async with GrapevineClient(api) as c:`")
        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body).encode("utf-8", "surrogatepass")
        extra = {"Content-Type": "application/json"} if data is not None else {}
        headers = {**extra, **(headers or {})}
        async with self._connections.request(method, target, data, headers, timeout) as answer:
            if answer.status >= 400:
                raise await self._api_error(answer)
            yield answer

    async def _sse(self, path: str, params: dict[str, str]) -> AsyncIterator[JsonObject]:
        """Yield the JSON objects of a server-sent event stream until the peer ends it."""
        accept = {"Accept": "text/event-stream"}
        async with self._exchange("GET", path, params=params, timeout=None, headers=accept) as r:
            data: list[str] = []
            pending = b""
            async for chunk in r.chunks():
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", errors="replace").rstrip("\r")
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif not line and data:
                        yield _decode_event("\n".join(data), self.api)
                        data = []
                    # Comments (":" keep-alives), "event:", "id:" and "retry:" carry nothing
                    # the API defines, so they are skipped.

    async def _request(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        timeout: float | None = REQUEST_TIMEOUT,
        params: dict[str, str] | None = None,
    ) -> JsonObject:
        async with self._exchange(method, path, body, params, timeout) as answer:
            text = (await answer.read()).decode("utf-8", errors="replace")
        try:
            answer_json = json.loads(text) if text else {}
        except ValueError:
            raise ClientError(
                self.api, "the answer is not JSON; is this a Grapevine API?"
            ) from None
        if not isinstance(answer_json, dict):
            raise ClientError(self.api, "the answer is not a JSON object")
        return answer_json

    async def _api_error(self, answer: Response) -> GrapevineError:
        """The error an error answer stands for: `ApiError`, or `WrongPort` for a gossip port."""
        body = (await answer.read(_ERROR_BYTES)).decode("utf-8", errors="replace")
        problem = answer.headers.get("content-type", "").startswith("application/problem+json")
        if answer.status == 404 and not problem and await self._is_gossip_port():
            return WrongPort(self.api)
        return api_error(answer.status, answer.reason, body)

    async def _is_gossip_port(self) -> bool:
        """Whether the server serves the peers' gossip route (it allows only POST there)."""
        assert self._connections is not None
        try:
            async with self._connections.request(
                "GET", GOSSIP_PATH, timeout=REQUEST_TIMEOUT
            ) as answer:
                await answer.read(_ERROR_BYTES)
                return answer.status == 405 and "POST" in answer.headers.get("allow", "")
        except ClientError:
            return False


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
