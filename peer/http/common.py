"""What every resource of the local HTTP API shares: errors, bodies, event streams, id text.

Invariants:
- Every error is an RFC 9457 problem (`application/problem+json`) with a `detail` that says
  what was wrong, naming the field: handlers raise `Problem`, `problems` answers it; an
  unexpected exception is logged and answered 500 without internals.
- A JSON body is read and checked completely (an object, required fields present, no unknown
  field, every string valid UTF-8) before a handler acts on it, so a request that fails
  validation changes nothing; who may send one is `peer.http.guard`'s business.
- Every server-sent-events stream is written by `stream_events`: it opens with a comment, sends
  each event as one `data:` line of JSON, and ends quietly when the client goes away.
- A followed notification stream never blocks the driver: it reads a bounded subscriber queue
  (`peer.runtime.hub.NoteHub`) and ends when the hub drops it for lagging or closes.
- Node ids are lowercase base32 without padding (52 characters); `short_id` is the first 10.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from aiohttp import web

from peer.node_ids import NODE_ID_CHARS, node_id_from_text
from peer.runtime.hub import NoteHub, Observed
from peer.version import installed_version

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
"""Largest request body; anything bigger is refused with 413 before it is read. Room for a
task input at the protocol's 64 KiB limit even when JSON escaping doubles or triples it."""
KEEPALIVE_INTERVAL = 15.0
"""Seconds between SSE keep-alive comments on an idle followed stream."""
PROBLEM_TYPE = "application/problem+json"

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EventSource = AsyncGenerator[Json | list[Json] | None, None]
"""What a stream sends: an event, events that were waiting together (written in one go), or
None for a keep-alive comment."""


def version() -> str:
    """Return the installed Grapevine version (`peer.version.installed_version`)."""
    return installed_version()


def parse_node_id(text: str, name: str) -> bytes:
    """The node id whose API form (`node_id_text`) is `text`, named `name` in the error.

    Raises:
        Problem: 400, when `text` is not a node id's API form.
    """
    raw = node_id_from_text(text)
    if raw is not None:
        return raw
    raise bad_request(
        f"{name} must be a node id as the API shows it ({NODE_ID_CHARS} base32 "
        f"characters, e.g. a member's id), got {text[:70]!r}"
    )


class Problem(Exception):
    """An error answer; raised inside handlers, turned into problem+json by `problems`."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


def bad_request(detail: str) -> Problem:
    """A 400 answer saying what was wrong with the request."""
    return Problem(400, "Bad Request", detail)


def problem_response(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Return an RFC 9457 problem details answer."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    response = web.json_response(body, status=status, content_type=PROBLEM_TYPE)
    if headers:
        response.headers.update(headers)
    return response


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as a problem: `Problem`s, aiohttp's own (404, 405, 413) and crashes."""
    try:
        return await handler(request)
    except Problem as exc:
        return problem_response(exc.status, exc.title, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        details = {
            404: f"no such endpoint: {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body exceeds {MAX_BODY_BYTES} bytes",
        }
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem_response(
            exc.status, exc.reason, details.get(exc.status, exc.text or exc.reason), headers
        )
    except Exception:
        log.exception("API request %s %s failed", request.method, request.path)
        return problem_response(
            500, "Internal Server Error", "the peer failed to answer; see its log"
        )


async def json_object(request: web.Request, required: set[str], optional: set[str]) -> Json:
    """Read the body as a JSON object with every `required` field and no field outside both sets.

    Raises:
        Problem: 400 naming what is wrong with the body.
        web.HTTPRequestEntityTooLarge: the body exceeds the request's size limit.
    """
    raw = await request.read()
    try:
        # Bad bytes survive decoding as lone surrogates, so `invalid_text_at` can name the
        # field that holds them (with those of `\ud800` escapes); outside strings they are
        # invalid JSON.
        body = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except (ValueError, RecursionError):
        raise bad_request("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    where = invalid_text_at(body)
    if where is not None:
        raise bad_request(
            f"{where} is not valid UTF-8 text (it holds invalid bytes or a lone surrogate)"
        )
    missing = sorted(required - set(body))
    if missing:
        raise bad_request(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(body) - required - optional)
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}")
    return body


def invalid_text_at(value: object) -> str | None:
    """Name the first string in a decoded JSON value that is not valid Unicode, or None.

    A lone surrogate (from a `\\ud800` escape or an invalid byte) cannot be encoded as UTF-8,
    so it would fail far from the request (a 500) if it got past the boundary. The walk keeps
    its own stack, so nesting as deep as the JSON decoder accepts cannot exhaust Python's.

    Returns:
        "field 'role'", "field 'tags[2]'", "a field name in 'meta'", or None when all is text.
    """
    pending: list[tuple[object, str]] = [(value, "")]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str) and not _is_text(item):
            return f"field {path!r}"
        if isinstance(item, list):
            pending.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            bad_keys = [key for key in item if not _is_text(key)]
            if bad_keys:
                return f"a field name in {path!r}" if path else "a field name"
            pending.extend((v, f"{path}.{k}" if path else k) for k, v in reversed(item.items()))
    return None


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def follow_requested(request: web.Request) -> bool:
    """Whether `?follow=` asks for a stream rather than the recent items.

    Raises:
        Problem: 400 when the value is not a yes/no word.
    """
    follow = request.query.get("follow", "0").strip().lower()
    if follow not in ("0", "1", "true", "false", "yes", "no", ""):
        raise bad_request(f"follow must be 1 or 0, got {follow!r}")
    return follow in ("1", "true", "yes")


def recent_json(hub: NoteHub, to_json: Callable[[Observed], Json | None]) -> list[Json]:
    """The API form of the hub's buffered notes that the API shows, oldest first."""
    return [e for e in map(to_json, hub.recent) if e is not None]


async def stream_events(request: web.Request, events: EventSource) -> web.StreamResponse:
    """Answer with a server-sent-events stream of `events` until it ends or the client leaves.

    The source is closed in every case, so its clean-up (an unsubscribe) always runs.
    """
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    async with contextlib.aclosing(events):
        try:
            await response.prepare(request)
            await response.write(b": stream open\n\n")
            async for event in events:
                if event is None:
                    await response.write(b": keep-alive\n\n")
                elif isinstance(event, list):
                    # One write (one chunk, one send) for what waited together: a write per
                    # event cost a watched busy peer a system call per event.
                    if event:
                        await response.write("".join(map(_event_text, event)).encode())
                else:
                    await response.write(_event_text(event).encode())
        except ConnectionError:
            pass  # the client went away
    return response


def _event_text(event: Json) -> str:
    return f"data: {json.dumps(event)}\n\n"


async def stream_hub(
    request: web.Request,
    hub: NoteHub,
    to_json: Callable[[Observed], Json | None],
    keepalive: float,
) -> web.StreamResponse:
    """Stream every note published to `hub` from now on that `to_json` shows.

    The subscription is taken before the stream opens, so a client that saw the stream open
    misses no note published after that.
    """
    queue = hub.subscribe()
    try:
        return await stream_events(request, _queued(queue, to_json, keepalive))
    finally:
        hub.unsubscribe(queue)


async def _queued(
    queue: asyncio.Queue[Observed | None],
    to_json: Callable[[Observed], Json | None],
    keepalive: float,
) -> EventSource:
    """The shown notes of `queue`, and None after each `keepalive` seconds of silence."""
    async for item in notes_or_silence(queue, keepalive):
        if item is None:
            yield None
        elif (event := to_json(item)) is not None:
            yield event


async def notes_or_silence(
    queue: asyncio.Queue[Observed | None], silence: float
) -> AsyncGenerator[Observed | None, None]:
    """Yield each note of a hub subscription, or None after `silence` seconds without one.

    Ends when the subscription does (the hub dropped it or closed).
    """
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), silence)
        except TimeoutError:
            yield None
            continue
        if item is None:
            return
        yield item
