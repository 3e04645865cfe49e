"""Real and local models: the model client over litellm's real HTTP path, against an
OpenAI-compatible server each test starts on 127.0.0.1 (tests/peer/fake_openai.py).

Nothing of litellm is mocked: requests go through litellm, the OpenAI SDK and httpx to the
fake server. Time is the real loop clock, with backoffs of milliseconds; waits the provider
asks for are 1 s. litellm is imported once for the module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from peer.agents.endpoints import ModelEndpoint
from peer.agents.host import AgentHost
from peer.agents.llm import ModelClient, import_litellm
from peer.agents.model_settings import LlmSettings
from peer.agents.peer_port import DriverTaskPort
from peer.agents.ports import AgentOutput, ModelError, ToolCall
from peer.settings import SettingsError, load_settings
from protocol.identity import Signer
from tests.peer.fake_openai import Failure, FakeOpenAI, Reply, fake_openai
from tests.peer.inprocess import in_process_peer

MODEL = "openai/gpt-4o-mini"
KEY_ENV = "GRAPEVINE_TEST_MODEL_KEY"
KEY = "sk-test-not-a-real-key"
MESSAGES = [{"role": "user", "content": "Say hello"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def add(a: int, b: int) -> str:
    """Add two numbers.

    Args:
        a: the first.
        b: the second.
    """
    return str(a + b)


@pytest.fixture(scope="module")
def litellm() -> Any:
    return import_litellm()


@pytest_asyncio.fixture
async def server(litellm: Any) -> AsyncIterator[FakeOpenAI]:
    async with fake_openai() as fake:
        yield fake


def make_client(
    server: FakeOpenAI, env: dict[str, str] | None = None, **settings: Any
) -> ModelClient:
    llm = LlmSettings(
        backoff_base=0.01,
        backoff_max=0.02,
        endpoint=ModelEndpoint(server.base_url, KEY_ENV),
        **settings,
    )
    return ModelClient(llm, env={KEY_ENV: KEY} if env is None else env, rng=random.Random(3))


def key_of(server: FakeOpenAI) -> str:
    return f"{MODEL}@{server.base_url}"


async def test_chat_completion_usage_cost_key_and_params(litellm: Any, server: FakeOpenAI) -> None:
    server.script = [Reply("hello", prompt_tokens=120, completion_tokens=30)]
    client = ModelClient(
        LlmSettings(
            endpoint=ModelEndpoint(server.base_url, KEY_ENV, {"top_p": 0.5, "user": "grapevine"})
        ),
        env={KEY_ENV: KEY},
    )
    reply = await client.complete(MODEL, MESSAGES, [], temperature=0.2, max_tokens=50)
    assert reply.content == "hello" and reply.tool_calls == () and reply.model == MODEL
    assert (reply.prompt_tokens, reply.completion_tokens) == (120, 30)
    prompt_price, completion_price = litellm.cost_per_token(
        model=MODEL, prompt_tokens=120, completion_tokens=30
    )
    assert reply.cost_micro == round((prompt_price + completion_price) * 1_000_000) > 0
    [sent] = server.requests
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["messages"] == MESSAGES
    assert sent.body["temperature"] == 0.2 and sent.body["max_tokens"] == 50
    assert sent.body["top_p"] == 0.5 and sent.body["user"] == "grapevine"
    assert "tools" not in sent.body and not sent.body.get("stream")
    status = client.status()[key_of(server)]
    assert status["calls"] == status["ok"] == 1 and status["retries"] == 0
    assert status["prompt_tokens"] == 120 and status["cost_micro"] == reply.cost_micro


async def test_tool_calls_go_out_and_come_back(server: FakeOpenAI) -> None:
    server.script = [Reply(tool_calls=(("add", {"a": 2, "b": 3}),))]
    reply = await make_client(server).complete(MODEL, MESSAGES, [TOOL])
    assert reply.content == ""
    assert reply.tool_calls == (ToolCall("call_1_0", "add", {"a": 2, "b": 3}),)
    assert server.requests[0].body["tools"] == [TOOL]


async def test_a_500_is_retried_and_counted_by_the_breaker(server: FakeOpenAI) -> None:
    server.script = [Failure(500), Reply("back")]
    client = make_client(server)
    reply = await client.complete(MODEL, MESSAGES, [])
    assert reply.content == "back" and len(server.requests) == 2
    status = client.status()[key_of(server)]
    assert status["errors"] == 1 and status["retries"] == 1 and status["breaker"] == "closed"

    server.script = [Failure(500)] * 3
    client = make_client(server, retries=2, breaker_errors=3, breaker_cooldown=60.0)
    before = len(server.requests)
    with pytest.raises(ModelError, match="gave up after 3 attempts: InternalServerError"):
        await client.complete(MODEL, MESSAGES, [])
    # One request per attempt: the SDK under litellm does not retry on its own.
    assert len(server.requests) - before == 3
    status = client.status()[key_of(server)]
    assert status["breaker"] == "open" and status["breaker_opened"] == 1


@pytest.mark.parametrize("header", ["seconds", "http-date"])
async def test_a_429_waits_as_long_as_retry_after_says(server: FakeOpenAI, header: str) -> None:
    wall = 1_900_000_000.0
    value = "1" if header == "seconds" else formatdate(wall + 1, usegmt=True)
    server.script = [Failure(429, {"Retry-After": value}), Reply("finally")]
    llm = LlmSettings(
        backoff_base=0.01, backoff_max=0.02, endpoint=ModelEndpoint(server.base_url, KEY_ENV)
    )
    client = ModelClient(llm, env={KEY_ENV: KEY}, wall_clock=lambda: wall)
    reply = await client.complete(MODEL, MESSAGES, [])
    assert reply.content == "finally"
    first, second = server.requests
    # The backoff alone is at most 0.02 s: the gap is the provider's second.
    assert 0.95 <= second.at - first.at < 2.0
    status = client.status()[key_of(server)]
    assert status["retries"] == 1 and status["errors"] == 1


async def test_a_retry_after_past_the_task_deadline_fails_at_once(server: FakeOpenAI) -> None:
    server.script = [Failure(429, {"Retry-After": "30"})]
    client = make_client(server)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with client.task_deadline(5.0), pytest.raises(ModelError, match="past the task's deadline"):
        await client.complete(MODEL, MESSAGES, [])
    assert loop.time() - started < 2.0 and len(server.requests) == 1


@pytest.mark.parametrize("status_code", [401, 403])
async def test_a_rejected_key_fails_at_once_and_spares_the_breaker(
    server: FakeOpenAI, status_code: int, caplog: pytest.LogCaptureFixture
) -> None:
    server.script = [Failure(status_code)] * 2 + [Reply("fine")]
    client = make_client(server, breaker_errors=1)
    with caplog.at_level(logging.ERROR, logger="peer.agents.llm"):
        for _ in range(2):
            with pytest.raises(ModelError) as info:
                await client.complete(MODEL, MESSAGES, [])
            message = str(info.value)
            assert f"rejected the credential (HTTP {status_code})" in message
            assert KEY_ENV in message and KEY not in message
    assert len(server.requests) == 2, "never retried"
    # Said once per model and server, in one line.
    reported = [
        r.getMessage() for r in caplog.records if "rejected the credential" in r.getMessage()
    ]
    assert len(reported) == 1 and "\n" not in reported[0]
    status = client.status()[key_of(server)]
    assert status["retries"] == 0 and status["breaker"] == "closed"
    # A breaker that opens after one outage error is still closed: the next call goes out.
    assert (await client.complete(MODEL, MESSAGES, [])).content == "fine"


async def test_a_missing_key_variable_fails_before_any_request(server: FakeOpenAI) -> None:
    client = make_client(server, env={})
    with pytest.raises(ModelError, match=f"{KEY_ENV} \\(api_key_env\\) is not set"):
        await client.complete(MODEL, MESSAGES, [])
    assert server.requests == []


async def test_two_servers_side_by_side_keep_their_keys_and_breakers(server: FakeOpenAI) -> None:
    async with fake_openai() as other:
        client = ModelClient(
            LlmSettings(
                backoff_base=0.01, backoff_max=0.02, breaker_errors=1, breaker_cooldown=0.05
            ),
            env={"KEY_A": "sk-a", "KEY_B": "sk-b"},
        )
        first = client.with_endpoint(ModelEndpoint(server.base_url, "KEY_A"))
        second = client.with_endpoint(ModelEndpoint(other.base_url, "KEY_B", {"seed": 7}))
        server.script = [Failure(503), Reply("a")]
        other.script = [Reply("b")]
        assert (await first.complete(MODEL, MESSAGES, [])).content == "a"
        assert (await second.complete(MODEL, MESSAGES, [])).content == "b"
        assert [r.headers["Authorization"] for r in server.requests] == ["Bearer sk-a"] * 2
        assert [r.headers["Authorization"] for r in other.requests] == ["Bearer sk-b"]
        assert "seed" not in server.requests[0].body and other.requests[0].body["seed"] == 7
        status = client.status()
        assert status[key_of(server)]["breaker_opened"] == 1
        assert status[f"{MODEL}@{other.base_url}"]["breaker_opened"] == 0


def _config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "peer.toml"
    path.write_text(
        f"""
[llm]
backoff_base = 0.01
backoff_max = 0.02

[[agents]]
name = "adder"
roles = ["adder"]
model = "{MODEL}"
api_base = "{base_url}"
api_key_env = "{KEY_ENV}"
params = {{ top_p = 0.9 }}
tools = ["tests.peer.agents.test_models_http:add", "final_answer"]
""",
        encoding="utf-8",
    )
    return path


async def test_a_configured_agent_runs_its_tool_loop_over_http(
    server: FakeOpenAI, tmp_path: Path
) -> None:
    settings = load_settings({}, {KEY_ENV: KEY}, _config(tmp_path, server.base_url))
    assert settings.llm is not None
    server.script = [
        Failure(500),
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
    assert len(server.requests) == 3
    assert all(r.body["top_p"] == 0.9 for r in server.requests)
    tool_result = server.requests[2].body["messages"][-1]
    assert tool_result["role"] == "tool" and tool_result["content"] == "5"
    status = client.status()[key_of(server)]
    assert status["retries"] == 1 and status["ok"] == 2


def test_grapevine_agent_refuses_to_start_without_the_key(tmp_path: Path) -> None:
    path = _config(tmp_path, "http://127.0.0.1:9/v1")
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "peer.cli", "agent", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert f"agents[0] (model {MODEL}): api_key_env {KEY_ENV} is not set" in done.stderr


def test_an_unset_key_variable_is_a_one_line_configuration_error(tmp_path: Path) -> None:
    path = _config(tmp_path, "http://127.0.0.1:9/v1")
    with pytest.raises(SettingsError) as info:
        load_settings({}, {}, path)
    message = str(info.value)
    assert message == (
        f"config file {path}: agents[0] (model {MODEL}): api_key_env {KEY_ENV} is not set"
    )


async def test_credentials_in_the_server_url_never_show(server: FakeOpenAI) -> None:
    """A server URL may carry a password (`user:password@`; the OpenAI client refuses it next
    to a key, so the call fails): neither the stats key (metrics labels, `/v1/agents`, the
    dashboard, saved totals) nor the task's failure message shows it."""
    host = server.base_url.split("://", 1)[1]
    client = make_client(server, retries=0)
    model = client.with_endpoint(ModelEndpoint(f"http://agent:hunter2@{host}", KEY_ENV))
    with pytest.raises(ModelError) as info:
        await model.complete(MODEL, MESSAGES, [])
    assert "hunter2" not in str(info.value)
    assert list(client.status()) == [f"{MODEL}@http://{host}"]
    assert "hunter2" not in repr(client.status()) + repr(client.usage_totals())
