"""Spawn requests and the operator's allow-lists (peer/agents/spawning.py)."""

from __future__ import annotations

import pytest

from peer.agents.offline import OFFLINE_MODEL
from peer.agents.spawning import SpawnAllowList, SpawnRequest
from peer.agents.spec import AgentSpec, PoolSettings

DECLARED = (
    AgentSpec("boss", ("boss",), model="openai/gpt-4o-mini", tools=("delegate", "final_answer")),
    AgentSpec("tooled", ("t",), tools=("read_file", "mytools:search", "final_answer")),
)


def _request(model: str, *tools: str) -> SpawnRequest:
    return SpawnRequest("helper", "", model, (*tools, "final_answer"))


def test_defaults_are_the_declared_agents_models_and_builtin_tools() -> None:
    allowed = SpawnAllowList.of(PoolSettings(), DECLARED)
    assert allowed.models == {"openai/gpt-4o-mini", OFFLINE_MODEL}
    assert allowed.tools == {"delegate", "read_file", "final_answer"}
    assert SpawnAllowList.of(PoolSettings(), ()).models == {OFFLINE_MODEL}
    assert SpawnAllowList.of(PoolSettings(), ()).tools == {"final_answer"}


def test_the_operators_lists_replace_the_defaults() -> None:
    settings = PoolSettings(models=("ollama/llama3",), tools=("write_file",))
    allowed = SpawnAllowList.of(settings, DECLARED)
    assert allowed.models == {"ollama/llama3"}
    assert allowed.tools == {"write_file", "final_answer"}


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (_request(OFFLINE_MODEL), None),
        (_request("openai/gpt-4o-mini", "delegate", "read_file"), None),
        (
            _request("anthropic/claude-opus"),
            "spawn refused: model 'anthropic/claude-opus' is not allowed on this peer "
            "(pool.models: grapevine/offline, openai/gpt-4o-mini)",
        ),
        (
            _request(OFFLINE_MODEL, "write_file", "spawn_agent"),
            "spawn refused: tool(s) 'write_file', 'spawn_agent' not allowed on this peer "
            "(pool.tools: delegate, final_answer, read_file)",
        ),
    ],
)
def test_refusal(request_: SpawnRequest, reason: str | None) -> None:
    assert SpawnAllowList.of(PoolSettings(), DECLARED).refusal(request_) == reason


def test_an_empty_model_list_refuses_every_spawn() -> None:
    allowed = SpawnAllowList.of(PoolSettings(models=()), DECLARED)
    assert allowed.refusal(_request(OFFLINE_MODEL)) == (
        f"spawn refused: model {OFFLINE_MODEL!r} is not allowed on this peer (pool.models: none)"
    )
