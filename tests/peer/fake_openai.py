"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for driving litellm's real
HTTP path (the same wire format vLLM, Ollama's /v1 and llama.cpp's server speak).

Invariants:
- Each request takes the next scripted answer (`Reply` or `Failure`); with the script empty
  it answers `Reply("ok")`. Every request is recorded (arrival time on the loop's clock,
  headers, JSON body) before it is answered, so a test can assert what was sent and when.
- Usage in a reply is exactly the scripted token counts, so cost is checkable against
  litellm's price list.
- A request with `"stream": true` gets the same answer as server-sent events in OpenAI's chunk
  format: the role, the content in pieces of `STREAM_PIECE` characters, each tool call as a
  first delta (index, id, name) and its arguments in pieces, a last chunk with the finish
  reason, a usage chunk when `stream_options.include_usage` asks, then `data: [DONE]`.
  A `Cut` sends the first chunks of its reply and then drops the connection mid-body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Reply:
    """A 200 answer: text and/or tool calls (name, arguments) and its token usage."""

    content: str = ""
    tool_calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    prompt_tokens: int = 11
    completion_tokens: int = 7
    event_gap: float = 0.0
    """Seconds between streamed events (a slow model); unstreamed, the answer is not late."""


@dataclass(frozen=True, slots=True)
class Failure:
    """An error answer with an OpenAI-style error body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Cut:
    """A streamed answer cut off: `chunks` events of `reply`, then the connection is dropped
    (no last chunk, no usage, no `[DONE]`)."""

    reply: Reply
    chunks: int = 2


STREAM_PIECE = 4
"""Characters of content, or of a tool call's arguments, per streamed delta."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request the server received."""

    at: float
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI:
    """The server's state: the script and what arrived."""

    def __init__(self) -> None:
        self.script: list[Reply | Failure | Cut] = []
        self.requests: list[Request] = []
        self.base_url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            Request(asyncio.get_running_loop().time(), dict(request.headers), body)
        )
        answer = self.script.pop(0) if self.script else Reply("ok")
        if isinstance(answer, Failure):
            error = {"message": f"scripted {answer.status}", "type": "error", "code": None}
            return web.json_response({"error": error}, status=answer.status, headers=answer.headers)
        if isinstance(answer, Cut):
            events = stream_events(answer.reply, len(self.requests), body)[: answer.chunks]
            return await _send_events(request, events, cut=True)
        if body.get("stream"):
            events = stream_events(answer, len(self.requests), body)
            return await _send_events(request, events, gap=answer.event_gap)
        message: dict[str, Any] = {"role": "assistant", "content": answer.content or None}
        if answer.tool_calls:
            message["tool_calls"] = [
                {
                    "id": _call_id(len(self.requests), i),
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
                for i, (name, arguments) in enumerate(answer.tool_calls)
            ]
        return web.json_response(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": body.get("model", ""),
                "choices": [
                    {"index": 0, "message": message, "finish_reason": _finish_reason(answer)}
                ],
                "usage": _usage(answer),
            }
        )


def stream_events(answer: Reply, number: int, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of `answer` streamed as the `number`th answer to a request `body`."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": body.get("model", ""),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in _pieces(answer.content)]
    for i, (name, arguments) in enumerate(answer.tool_calls):
        first = {
            "index": i,
            "id": _call_id(number, i),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        events.append(chunk({"tool_calls": [first]}))
        events += [
            chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
            for piece in _pieces(json.dumps(arguments))
        ]
    events.append(chunk({}, _finish_reason(answer)))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**chunk({}), "choices": [], "usage": _usage(answer)})
    return events


async def _send_events(
    request: web.Request, events: list[dict[str, Any]], cut: bool = False, gap: float = 0.0
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
        # One event per TCP write, as a real server sends them while the model generates.
        await asyncio.sleep(gap)
    if cut:
        # Mid-body: the chunked encoding never gets its last chunk, so the client sees the
        # connection end in the middle of the response.
        assert request.transport is not None
        request.transport.abort()
        return response
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _pieces(text: str) -> list[str]:
    return [text[i : i + STREAM_PIECE] for i in range(0, len(text), STREAM_PIECE)]


def _call_id(number: int, index: int) -> str:
    return f"call_{number}_{index}"


def _finish_reason(answer: Reply) -> str:
    return "tool_calls" if answer.tool_calls else "stop"


def _usage(answer: Reply) -> dict[str, int]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


@asynccontextmanager
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """Serve a `FakeOpenAI` on 127.0.0.1 (a free port); `base_url` ends in /v1."""
    fake = FakeOpenAI()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield fake
    finally:
        await runner.cleanup()
