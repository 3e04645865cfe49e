"""A streamed model call: `litellm.acompletion(..., stream=True)` read to its end and rebuilt
into the response a non-streamed call returns, for `peer.agents.llm.ModelClient`.

Invariants:
- The reply is used only once the stream has ended well (litellm raises for a connection cut
  or a stream that ends before its finish reason). A failure at any point fails the whole
  attempt with a litellm exception, so the client classifies and retries it as it does a
  non-streamed call; no partial reply is ever returned.
- The whole stream, not only each read, must end within the call's timeout: a server that
  trickles tokens cannot hold a task past it. Overrunning raises `litellm.Timeout`
  (retryable, like a non-streamed call's timeout).
- The stream is closed on every way out (its HTTP connection goes back to the pool).
- Usage is asked of the server (`stream_options.include_usage`); litellm's
  `stream_chunk_builder` joins the chunks (content, tool calls split by index, usage), and
  counts the tokens itself when the server does not say.
"""

from __future__ import annotations

import asyncio
from typing import Any

STREAM_OPTIONS = {"include_usage": True}
"""Asked of every streamed call: the server's usage chunk (cost and limits need the usage);
litellm drops it for a provider that does not take it."""


async def streamed_completion(litellm: Any, kwargs: dict[str, Any], timeout: float) -> Any:
    """Make a streamed call and return the whole response, as `litellm.acompletion` without
    streaming would.

    Args:
        litellm: the litellm module.
        kwargs: the call's `litellm.acompletion` arguments (`stream` and its options added).
        timeout: seconds the call may take from the request to the stream's last chunk.

    Raises:
        Exception: what litellm raises for the request or the stream (e.g.
            `litellm.RateLimitError` before the first chunk, a `litellm.ServiceUnavailableError`
            for a connection cut mid-stream); `litellm.Timeout` past `timeout`.
    """
    kwargs = {**kwargs, "stream": True, "stream_options": STREAM_OPTIONS}
    model = str(kwargs.get("model", ""))
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            stream = await litellm.acompletion(**kwargs)
            try:
                chunks = [chunk async for chunk in stream]
            finally:
                await stream.aclose()
    except TimeoutError:
        if not deadline.expired():
            raise
        raise litellm.Timeout(
            message=f"the streamed reply did not end within {timeout:g} s",
            model=model,
            llm_provider="",
        ) from None
    response = litellm.stream_chunk_builder(chunks, messages=kwargs.get("messages"))
    if response is None:
        raise litellm.APIConnectionError(
            message="the stream ended without a chunk", llm_provider="", model=model
        )
    return response
