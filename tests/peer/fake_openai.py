"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for driving litellm's real
HTTP path (the same wire format vLLM, Ollama's /v1 and llama.cpp's server speak).

Invariants:
- Each request takes the next scripted answer (`Reply` or `Failure`); with the script empty
  it answers `Reply("ok")`. Every request is recorded (arrival time on the loop's clock,
  headers, JSON body) before it is answered, so a test can assert what was sent and when.
- Usage in a reply is exactly the scripted token counts, so cost is checkable against
  litellm's price list.
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


@dataclass(frozen=True, slots=True)
class Failure:
    """An error answer with an OpenAI-style error body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Request:
    """One request the server received."""

    at: float
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI:
    """The server's state: the script and what arrived."""

    def __init__(self) -> None:
        self.script: list[Reply | Failure] = []
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
        message: dict[str, Any] = {"role": "assistant", "content": answer.content or None}
        if answer.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{len(self.requests)}_{i}",
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
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if answer.tool_calls else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": answer.prompt_tokens,
                    "completion_tokens": answer.completion_tokens,
                    "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                },
            }
        )


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
