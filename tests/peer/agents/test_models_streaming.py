"""Streamed model calls (`params.stream = true`): litellm's real streaming HTTP path against the
server-sent events of tests/peer/fake_openai.py on 127.0.0.1.

Nothing of litellm is mocked. The rule under test: a streamed call returns exactly the
`Completion` the same reply unstreamed gives (content, tool calls, usage, cost), and retries,
`Retry-After`, the breaker, rejected keys and timeouts treat it as one whole attempt, including
a connection cut mid-stream.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from peer.agents.endpoints import ModelEndpoint, parse_endpoint
from peer.agents.host import AgentHost
from peer.agents.llm import ModelClient, import_litellm
from peer.agents.model_settings import LlmSettings
from peer.agents.offline import OFFLINE_MODEL
from peer.agents.peer_port import DriverTaskPort
from peer.agents.ports import AgentOutput, ModelError, ToolCall
from peer.agents.provider_errors import ErrorKind, classify, retry_after
from peer.settings import load_settings
from protocol.identity import Signer
from tests.peer.agents.test_models_http import KEY, KEY_ENV, MESSAGES, MODEL, TOOL, key_of
from tests.peer.fake_openai import Cut, Failure, FakeOpenAI, Reply, fake_openai, stream_events
from tests.peer.inprocess import in_process_peer

STREAM = {"stream": True}


@pytest.fixture(scope="module")
def litellm() -> Any:
    return import_litellm()


@pytest_asyncio.fixture
async def server(litellm: Any) -> AsyncIterator[FakeOpenAI]:
    async with fake_openai() as fake:
        yield fake


def streaming_client(
    server: FakeOpenAI, params: dict[str, Any] = STREAM, **settings: Any
) -> ModelClient:
    llm = LlmSettings(
        backoff_base=0.01,
        backoff_max=0.02,
        endpoint=ModelEndpoint(server.base_url, KEY_ENV, params),
        **settings,
    )
    return ModelClient(llm, env={KEY_ENV: KEY}, rng=random.Random(3))


async def test_a_streamed_answer_is_the_answer_unstreamed(litellm: Any, server: FakeOpenAI) -> None:
    answer = Reply("Hello there, streamed world.", prompt_tokens=120, completion_tokens=30)
    assert len(stream_events(answer, 1, {})) > 5, "the content really comes in pieces"
    server.script = [answer, answer]
    streamed = await streaming_client(server, {"stream": True, "top_p": 0.5}).complete(
        MODEL, MESSAGES, [], max_tokens=50
    )
    whole = await streaming_client(server, {}).complete(MODEL, MESSAGES, [], max_tokens=50)
    assert streamed == whole
    assert streamed.content == "Hello there, streamed world."
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (120, 30)
    prompt_price, completion_price = litellm.cost_per_token(
        model=MODEL, prompt_tokens=120, completion_tokens=30
    )
    assert streamed.cost_micro == round((prompt_price + completion_price) * 1_000_000) > 0
    sent, unstreamed = server.requests
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["top_p"] == 0.5 and sent.body["max_tokens"] == 50
    assert not unstreamed.body.get("stream") and "stream_options" not in unstreamed.body


async def test_streamed_tool_calls_are_joined_from_their_pieces(server: FakeOpenAI) -> None:
    calls = (("add", {"a": 2, "b": 3}), ("add", {"a": 40, "b": 2}))
    server.script = [Reply("Adding.", tool_calls=calls), Reply("Adding.", tool_calls=calls)]
    streamed = await streaming_client(server).complete(MODEL, MESSAGES, [TOOL])
    assert streamed.content == "Adding."
    assert streamed.tool_calls == (
        ToolCall("call_1_0", "add", {"a": 2, "b": 3}),
        ToolCall("call_1_1", "add", {"a": 40, "b": 2}),
    )
    whole = await streaming_client(server, {}).complete(MODEL, MESSAGES, [TOOL])
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [
        (c.name, c.arguments) for c in streamed.tool_calls
    ]
    assert server.requests[0].body["tools"] == [TOOL]


async def test_a_429_before_the_stream_waits_for_retry_after(server: FakeOpenAI) -> None:
    server.script = [Failure(429, {"Retry-After": "1"}), Reply("finally")]
    client = streaming_client(server)
    assert (await client.complete(MODEL, MESSAGES, [])).content == "finally"
    first, second = server.requests
    assert 0.95 <= second.at - first.at < 2.0
    assert second.body["stream"] is True
    status = client.status()[key_of(server)]
    assert status["retries"] == 1 and status["errors"] == 1 and status["ok"] == 1


async def test_a_stream_cut_midway_is_retried_whole(server: FakeOpenAI) -> None:
    server.script = [
        Cut(Reply("This part is lost.", tool_calls=(("add", {"a": 1, "b": 1}),)), chunks=4),
        Reply("Whole.", prompt_tokens=20, completion_tokens=5),
    ]
    client = streaming_client(server)
    reply = await client.complete(MODEL, MESSAGES, [TOOL])
    assert reply.content == "Whole." and reply.tool_calls == ()
    assert (reply.prompt_tokens, reply.completion_tokens) == (20, 5)
    assert len(server.requests) == 2
    status = client.status()[key_of(server)]
    assert status["errors"] == 1 and status["retries"] == 1
    # Only the answer counts: nothing of the lost part is in the tokens.
    assert (status["prompt_tokens"], status["completion_tokens"]) == (20, 5)


async def test_streams_cut_every_time_exhaust_retries_and_open_the_breaker(
    server: FakeOpenAI,
) -> None:
    server.script = [Cut(Reply("lost"), chunks=2)] * 3
    client = streaming_client(server, retries=2, breaker_errors=3, breaker_cooldown=60.0)
    with pytest.raises(ModelError, match="gave up after 3 attempts"):
        await client.complete(MODEL, MESSAGES, [])
    assert len(server.requests) == 3
    status = client.status()[key_of(server)]
    assert status["breaker"] == "open" and status["ok"] == 0


async def test_a_rejected_key_fails_a_streamed_call_at_once(server: FakeOpenAI) -> None:
    server.script = [Failure(401), Reply("fine")]
    client = streaming_client(server, breaker_errors=1)
    with pytest.raises(ModelError, match="rejected the credential \\(HTTP 401\\)") as info:
        await client.complete(MODEL, MESSAGES, [])
    assert KEY_ENV in str(info.value) and KEY not in str(info.value)
    assert len(server.requests) == 1, "never retried"
    status = client.status()[key_of(server)]
    assert status["retries"] == 0 and status["breaker"] == "closed"
    assert (await client.complete(MODEL, MESSAGES, [])).content == "fine"


async def test_a_stream_slower_than_the_timeout_is_a_retried_timeout(server: FakeOpenAI) -> None:
    # Each event is well within the timeout; the whole stream is not.
    server.script = [Reply("slow and steady wins nothing", event_gap=0.1), Reply("quick")]
    client = streaming_client(server, timeout=0.4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await client.complete(MODEL, MESSAGES, [])).content == "quick"
    assert loop.time() - started < 1.5
    assert len(server.requests) == 2
    assert client.status()[key_of(server)]["retries"] == 1

    server.script = [Reply("slow", event_gap=0.2)] * 2
    client = streaming_client(server, timeout=0.3, retries=1)
    with pytest.raises(ModelError, match=r"gave up after 2 attempts: Timeout: .*within 0\.3 s"):
        await client.complete(MODEL, MESSAGES, [])


async def test_the_offline_model_answers_whole_when_streaming_is_on(litellm: Any) -> None:
    client = ModelClient(LlmSettings(endpoint=ModelEndpoint(params=STREAM)))
    reply = await client.complete(OFFLINE_MODEL, MESSAGES, [])
    assert reply.content and reply.model == OFFLINE_MODEL


def test_stream_is_a_params_key_at_every_level() -> None:
    assert parse_endpoint("x", {"params": {"stream": True}}).streams
    assert not parse_endpoint("x", {"params": {"stream": False}}).streams
    assert not parse_endpoint("x", {}).streams
    llm = LlmSettings.from_table(
        {"params": {"stream": True}, "models": {"m": {"params": {"seed": 1}}}}
    )
    assert llm.endpoint_for("m").streams
    agent = ModelEndpoint(params={"stream": False})
    assert not llm.endpoint_for("m", agent).streams
    # The client sets `stream` itself, with its options: never passed through twice.
    assert llm.endpoint_for("m").call_kwargs({}) == {"seed": 1}
    with pytest.raises(ValueError, match=r"^llm\.params\.stream: must be true or false"):
        LlmSettings.from_table({"params": {"stream": 1}})


class WrappedError(Exception):
    def __init__(self, original: BaseException) -> None:
        super().__init__("wrapped")
        self.original_exception = original


async def test_a_wrapped_rate_limit_keeps_its_retry_after(litellm: Any) -> None:
    response = httpx.Response(
        429,
        headers={"retry-after": "3"},
        request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"),
    )
    limited = litellm.RateLimitError("slow down", "openai", MODEL, response=response)
    # What litellm raises for a stream that fails after its first chunk.
    wrapper = litellm.exceptions.MidStreamFallbackError
    midway = wrapper("cut", MODEL, "openai", original_exception=limited)
    assert classify(litellm, midway) is ErrorKind.RETRY
    assert retry_after(midway, 0.0) == 3.0
    assert retry_after(WrappedError(ValueError("no headers")), 0.0) is None


def _config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "peer.toml"
    path.write_text(
        f"""
[llm]
backoff_base = 0.01
backoff_max = 0.02
params = {{ stream = true }}

[[agents]]
name = "adder"
roles = ["adder"]
model = "{MODEL}"
api_base = "{base_url}"
api_key_env = "{KEY_ENV}"
tools = ["tests.peer.agents.test_models_http:add", "final_answer"]
""",
        encoding="utf-8",
    )
    return path


async def test_a_configured_agent_streams_its_tool_loop(server: FakeOpenAI, tmp_path: Path) -> None:
    settings = load_settings({}, {KEY_ENV: KEY}, _config(tmp_path, server.base_url))
    assert settings.llm is not None
    server.script = [
        Cut(Reply(tool_calls=(("add", {"a": 9, "b": 9}),)), chunks=3),
        Reply(tool_calls=(("add", {"a": 2, "b": 3}),), prompt_tokens=100, completion_tokens=10),
        Reply(tool_calls=(("final_answer", {"answer": "2 + 3 = 5"}),), prompt_tokens=150),
    ]
    async with in_process_peer(1, bytes(range(32)), seed_only=True) as built:
        driver = built.driver
        client = ModelClient(settings.llm, env={KEY_ENV: KEY})
        host = AgentHost(
            driver,
            settings.agents,
            client,
            DriverTaskPort(driver),
            signer=Signer(built.store.load_or_create_identity(), driver.node.config.network_id),
            limits=settings.limits,
            pool_settings=settings.pool,
            workspace=tmp_path / "workspace",
        )
        try:
            host.start()
            driver.join_now([driver.node.addr])
            task = driver.submit("adder", b"What is 2 + 3?", idempotency_key="sum", timeout=30.0)
            result = await driver.wait_result(task, 20.0)
        finally:
            await host.close()
    assert result is not None and result.outcome == "ok", result
    output = AgentOutput.decode(result.output)
    assert output is not None and output.answer == "2 + 3 = 5" and output.steps == 2
    assert result.usage[:2] == (250, 17)
    assert result.usage[2] > 0, "cost from litellm's price list"
    assert [r.body.get("stream") for r in server.requests] == [True] * 3
    tool_result = server.requests[2].body["messages"][-1]
    assert tool_result["role"] == "tool" and tool_result["content"] == "5"
    status = client.status()[key_of(server)]
    assert status["retries"] == 1 and status["ok"] == 2
