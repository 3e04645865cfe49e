"""The model client (peer/agents/llm.py) on litellm's real code path, mocked by litellm itself.

Provider calls use litellm's `mock_response` / `mock_tool_calls` (passed through
`extra_kwargs`), so everything from `litellm.acompletion` down to its exception mapping runs;
nothing leaves the machine. Time is a fake clock advanced by the injected sleep.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from peer.agents.llm import LlmSettings, ModelClient, import_litellm
from peer.agents.offline import OFFLINE_MODEL, OfflineModel
from peer.agents.ports import Completion, ModelError, ToolCall

MODEL = "openai/gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hello"}]


class FakeTime:
    """A clock that only moves when the client sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.after_sleep: Callable[[], None] = lambda: None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.after_sleep()


def client(
    settings: LlmSettings | None = None, extra: dict[str, Any] | None = None, **kwargs: Any
) -> tuple[ModelClient, FakeTime]:
    time = FakeTime()
    model_client = ModelClient(
        settings,
        clock=time.clock,
        sleep=time.sleep,
        rng=random.Random(7),
        extra_kwargs=extra,
        **kwargs,
    )
    return model_client, time


@pytest.fixture(scope="module")
def litellm() -> Any:
    return import_litellm()


async def test_usage_and_cost_recorded(litellm: Any) -> None:
    model_client, _ = client(extra={"mock_response": "hello"})
    reply = await model_client.complete(MODEL, MESSAGES, [], temperature=0.2, max_tokens=50)
    assert reply.content == "hello" and reply.tool_calls == () and reply.model == MODEL
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    # litellm's own price list (the local copy) for gpt-4o-mini, in micro-dollars.
    prompt_price, completion_price = litellm.cost_per_token(
        model=MODEL, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens
    )
    assert reply.cost_micro == round((prompt_price + completion_price) * 1_000_000) > 0
    status = model_client.status()[MODEL]
    assert status["calls"] == 1 and status["errors"] == 0 and status["breaker"] == "closed"
    assert status["prompt_tokens"] == reply.prompt_tokens
    assert status["cost_micro"] == reply.cost_micro
    json.dumps(model_client.status())


async def test_tool_calls_decoded_and_bad_json_kept_raw(litellm: Any) -> None:
    mock_calls = [
        {"id": "c1", "type": "function", "function": {"name": "delegate", "arguments": '{"a": 1}'}},
        {"id": "c2", "type": "function", "function": {"name": "final_answer", "arguments": "{ba"}},
        {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "[1]"}},
    ]
    extra = {"mock_response": "", "mock_tool_calls": mock_calls}
    model_client, _ = client(extra=extra)
    reply = await model_client.complete(MODEL, MESSAGES, [])
    assert reply.tool_calls == (
        ToolCall("c1", "delegate", {"a": 1}),
        ToolCall("c2", "final_answer", {"_raw": "{ba"}),
        ToolCall("c3", "f", {"_raw": "[1]"}),
    )


async def test_retries_with_backoff_then_success(litellm: Any) -> None:
    extra: dict[str, Any] = {"mock_response": "litellm.RateLimitError"}
    model_client, time = client(LlmSettings(retries=3), extra)

    def recover_after_two() -> None:
        if len(time.sleeps) == 2:
            extra["mock_response"] = "recovered"

    time.after_sleep = recover_after_two
    reply = await model_client.complete(MODEL, MESSAGES, [])
    assert reply.content == "recovered"
    # Equal jitter: attempt n waits between half and all of min(8, 0.5 × 2^n).
    assert len(time.sleeps) == 2
    for n, slept in enumerate(time.sleeps):
        assert 0.25 * 2**n <= slept <= 0.5 * 2**n
    status = model_client.status()[MODEL]
    assert (status["calls"], status["errors"], status["retries"]) == (3, 2, 2)


@pytest.mark.parametrize(
    "error", ["litellm.RateLimitError", "litellm.InternalServerError", "timeout", "connection"]
)
async def test_gives_up_after_retries(litellm: Any, error: str) -> None:
    mock: Any = error
    if error == "timeout":
        mock = litellm.Timeout(message="slow", llm_provider="openai", model="gpt-4o-mini")
    elif error == "connection":
        mock = litellm.APIConnectionError(message="no", llm_provider="openai", model="gpt-4o")
    model_client, time = client(LlmSettings(retries=2, breaker_errors=10), {"mock_response": mock})
    with pytest.raises(ModelError, match="gave up after 3 attempts"):
        await model_client.complete(MODEL, MESSAGES, [])
    assert len(time.sleeps) == 2


@pytest.mark.parametrize("kind", ["AuthenticationError", "BadRequestError", "NotFoundError"])
async def test_non_retryable_error_fails_at_once(litellm: Any, kind: str) -> None:
    error = getattr(litellm, kind)(message="no", llm_provider="openai", model="gpt-4o-mini")
    model_client, time = client(LlmSettings(breaker_errors=1), {"mock_response": error})
    with pytest.raises(ModelError, match=kind):
        await model_client.complete(MODEL, MESSAGES, [])
    assert time.sleeps == []
    assert model_client.status()[MODEL]["breaker"] == "closed"  # the provider did answer


async def test_breaker_opens_then_a_probe_closes_it(litellm: Any) -> None:
    settings = LlmSettings(retries=0, breaker_errors=2, breaker_cooldown=10)
    extra: dict[str, Any] = {"mock_response": "litellm.InternalServerError"}
    model_client, time = client(settings, extra)
    for _ in range(2):
        with pytest.raises(ModelError):
            await model_client.complete(MODEL, MESSAGES, [])
    assert model_client.status()[MODEL]["breaker"] == "open"
    opened_at = time.now
    extra["mock_response"] = "back"
    reply = await model_client.complete(MODEL, MESSAGES, [])  # waits, then is the probe
    assert reply.content == "back"
    assert time.now - opened_at == pytest.approx(10.0)
    status = model_client.status()[MODEL]
    assert status["breaker"] == "closed" and status["breaker_opened"] == 1
    assert status["waits"] == 1 and status["wait_seconds"] == pytest.approx(10.0)


async def test_failed_probe_reopens_with_doubled_cooldown(litellm: Any) -> None:
    settings = LlmSettings(retries=1, breaker_errors=1, breaker_cooldown=4, backoff_base=0.1)
    extra: dict[str, Any] = {"mock_response": "litellm.RateLimitError"}
    model_client, time = client(settings, extra)
    with pytest.raises(ModelError):
        await model_client.complete(MODEL, MESSAGES, [])
    # Attempt 1 failed and opened the breaker; the retry waited the cooldown (4 s) and
    # probed; the probe failed and re-opened it with 8 s.
    status = model_client.status()[MODEL]
    assert status["breaker"] == "open" and status["breaker_cooldown"] == 8
    # The backoff counts towards the cooldown: 4 s from opening to the probe in all.
    assert sum(time.sleeps) == pytest.approx(4.0)


async def test_offline_through_litellm_equals_direct(litellm: Any) -> None:
    offered = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("delegate", "final_answer")
    ]
    messages = [
        {"role": "system", "content": "Delegate to: worker\nParts: 3"},
        {"role": "user", "content": "A plan for cleaner rivers"},
    ]
    via, _ = client(LlmSettings(offline_via_litellm=True))
    direct, _ = client(LlmSettings(offline_via_litellm=False))
    one = await via.complete(OFFLINE_MODEL, messages, offered)
    two = await direct.complete(OFFLINE_MODEL, messages, offered)
    assert one == two
    assert len(one.tool_calls) == 3 and one.cost_micro == 0
    reply = OfflineModel().reply(messages, offered)
    assert one == Completion(
        "", reply.tool_calls, reply.prompt_tokens, reply.completion_tokens, 0, OFFLINE_MODEL
    )


async def test_rate_limit_makes_the_second_call_wait(litellm: Any) -> None:
    # 6 requests per minute: a burst of one, then one every 10 s.
    settings = LlmSettings(limits={MODEL: (6, 0)})
    model_client, time = client(settings, {"mock_response": "hi"})
    await model_client.complete(MODEL, MESSAGES, [])
    assert time.sleeps == []
    await model_client.complete(MODEL, MESSAGES, [])
    assert sum(time.sleeps) == pytest.approx(10.0)
    assert model_client.status()[MODEL]["waits"] == 1
    assert model_client.demand() == {MODEL: 2.0}


async def test_network_share_caps_requests(litellm: Any) -> None:
    shares: list[str] = []

    def share(model: str) -> float:
        shares.append(model)
        return 3.0  # 3 requests per minute: burst 1, then one every 20 s

    settings = LlmSettings(network_requests_per_minute=100)
    model_client, time = client(settings, {"mock_response": "hi"}, network_share=share)
    await model_client.complete(MODEL, MESSAGES, [])
    await model_client.complete(MODEL, MESSAGES, [])
    assert sum(time.sleeps) == pytest.approx(20.0) and set(shares) == {MODEL}


def test_settings_from_table() -> None:
    table = {
        "retries": 5,
        "backoff_base": 1,
        "backoff_max": 30.0,
        "breaker_errors": 3,
        "breaker_cooldown": 20,
        "requests_per_minute": 100,
        "tokens_per_minute": 50_000,
        "network_requests_per_minute": 500,
        "offline_via_litellm": False,
        "timeout": 30,
        "models": {MODEL: {"requests_per_minute": 10}},
    }
    settings = LlmSettings.from_table(table)
    assert settings == LlmSettings(
        retries=5,
        backoff_base=1.0,
        backoff_max=30.0,
        breaker_errors=3,
        breaker_cooldown=20.0,
        limits={MODEL: (10.0, 0.0)},
        default_limits=(100.0, 50_000.0),
        network_requests_per_minute=500.0,
        offline_via_litellm=False,
        timeout=30.0,
    )
    assert LlmSettings.from_table({}) == LlmSettings()


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"retry": 3}, "llm.retry"),
        ({"retries": "3"}, "llm.retries"),
        ({"retries": 2.5}, "llm.retries"),
        ({"retries": -1}, "llm.retries"),
        ({"breaker_errors": 0}, "llm.breaker_errors"),
        ({"backoff_base": True}, "llm.backoff_base"),
        ({"breaker_cooldown": -1}, "llm.breaker_cooldown"),
        ({"timeout": 0}, "llm.timeout"),
        ({"offline_via_litellm": "yes"}, "llm.offline_via_litellm"),
        ({"models": []}, "llm.models"),
        ({"models": {MODEL: 5}}, "llm.models"),
        ({"models": {MODEL: {"rpm": 5}}}, "rpm"),
        ({"models": {MODEL: {"tokens_per_minute": "x"}}}, "tokens_per_minute"),
    ],
)
def test_settings_from_table_rejects(table: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        LlmSettings.from_table(table)


def test_the_first_calls_import_litellm_once_off_the_event_loop() -> None:
    # A fresh interpreter, so the import really happens. A ticker on the loop measures the
    # longest stall while two first calls wait for one import: an import on the loop stalls
    # it for the whole import (seconds), one in a worker thread for a GIL switch at a time.
    code = textwrap.dedent(
        """
        import asyncio, sys, time
        from peer.agents.llm import LlmSettings, ModelClient

        async def main():
            client = ModelClient(LlmSettings(offline_via_litellm=True))
            msgs = [{"role": "user", "content": "hi"}]
            gaps, last = [], time.monotonic()
            stop = False

            async def tick():
                nonlocal last
                while not stop:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            began = time.monotonic()
            replies = await asyncio.gather(
                client.complete("grapevine/offline", msgs, []),
                client.complete("grapevine/offline", msgs, []),
            )
            took = time.monotonic() - began
            stop = True
            await ticker
            assert all(r.content.startswith("[offline stand-in model] ") for r in replies)
            assert "litellm" in sys.modules
            print(f"import {took:.2f} s, longest stall {max(gaps):.3f} s")
            assert max(gaps) < took / 2, (max(gaps), took)

        asyncio.run(main())
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_importing_the_model_layer_does_not_import_litellm() -> None:
    # A fresh interpreter: this test process has litellm loaded already.
    code = textwrap.dedent(
        """
        import asyncio, sys
        from peer.agents.llm import LlmSettings, ModelClient
        import peer.agents.limits, peer.agents.offline
        assert "litellm" not in sys.modules
        client = ModelClient(LlmSettings(offline_via_litellm=False))
        msgs = [{"role": "user", "content": "hi"}]
        reply = asyncio.run(client.complete("grapevine/offline", msgs, []))
        assert reply.content.startswith("[offline stand-in model] ")
        assert "litellm" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
