"""Endpoints (peer/agents/endpoints.py), their levels in `[llm]`, and the reading of a
provider's Retry-After (peer/agents/provider_errors.py): table-driven, no network."""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import pytest

from peer.agents.endpoints import MissingCredential, ModelEndpoint, parse_endpoint
from peer.agents.model_settings import (
    OFFLINE_PREFIX,
    LlmSettings,
    check_credentials,
    unset_provider_keys,
)
from peer.agents.offline import PROVIDER as OFFLINE_PROVIDER
from peer.agents.provider_errors import retry_after
from peer.agents.spec import AgentSpec, parse_agents

NOW = 1_900_000_000.0


class Response:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


class ProviderError(Exception):
    def __init__(self, headers: dict[str, str] | None) -> None:
        super().__init__("scripted")
        self.response = None if headers is None else Response(headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, None),
        ({}, None),
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"Retry-After": formatdate(NOW + 3, usegmt=True)}, 3.0),
        ({"Retry-After": formatdate(NOW - 3, usegmt=True)}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "nan"}, None),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
    ],
)
def test_retry_after(headers: dict[str, str] | None, expected: float | None) -> None:
    assert retry_after(ProviderError(headers), NOW) == expected


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"api_base": 3}, "x.api_base: must be a URL string"),
        ({"api_base": " "}, "x.api_base: must be a URL string"),
        ({"api_key_env": "sk-abc123-secret"}, "x.api_key_env: must be the NAME"),
        ({"api_key_env": 5}, "x.api_key_env: must be the NAME"),
        ({"params": 1}, "x.params: must be a table"),
        ({"params": {"api_key": "k"}}, "x.params.api_key: set by `api_key_env`"),
        ({"params": {"max_retries": 2}}, "x.params.max_retries: set by `[llm] retries`"),
        ({"params": {"stream_options": {}}}, "x.params.stream_options: set by the model client"),
        ({"params": {"stream": "yes"}}, "x.params.stream: must be true or false"),
        ({"params": {"mock_response": "hi"}}, "x.params.mock_response: litellm's internal"),
    ],
)
def test_parse_endpoint_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        parse_endpoint("x", table)


def test_a_pasted_key_is_never_echoed() -> None:
    with pytest.raises(ValueError) as info:
        parse_endpoint("x", {"api_key_env": "sk-abc123-secret"})
    assert "sk-abc123" not in str(info.value)


def test_levels_agent_over_model_over_llm() -> None:
    llm = LlmSettings.from_table(
        {
            "api_base": "http://llm",
            "api_key_env": "LLM_KEY",
            "params": {"top_p": 0.1, "seed": 1},
            "models": {"m": {"api_base": "http://model", "params": {"top_p": 0.2}}},
        }
    )
    assert llm.endpoint_for("other") == ModelEndpoint(
        "http://llm", "LLM_KEY", {"top_p": 0.1, "seed": 1}
    )
    assert llm.endpoint_for("m") == ModelEndpoint(
        "http://model", "LLM_KEY", {"top_p": 0.2, "seed": 1}
    )
    agent = ModelEndpoint(None, "AGENT_KEY", {"seed": 9})
    assert llm.endpoint_for("m", agent) == ModelEndpoint(
        "http://model", "AGENT_KEY", {"top_p": 0.2, "seed": 9}
    )
    kwargs = llm.endpoint_for("m", agent).call_kwargs({"AGENT_KEY": "k"})
    assert kwargs == {"api_base": "http://model", "api_key": "k", "top_p": 0.2, "seed": 9}
    with pytest.raises(MissingCredential):
        llm.endpoint_for("m", agent).call_kwargs({"AGENT_KEY": ""})


def test_agent_tables_take_endpoint_keys() -> None:
    [spec] = parse_agents(
        [{"name": "a", "roles": ["r"], "api_base": "http://s", "params": {"seed": 3}}]
    )
    assert spec.endpoint == ModelEndpoint("http://s", None, {"seed": 3})
    with pytest.raises(ValueError, match=r"^agents\[0\]\.params\.temperature: set by the agent"):
        parse_agents([{"name": "a", "roles": ["r"], "params": {"temperature": 1}}])
    with pytest.raises(ValueError, match=r"llm\.models\.'m'\.colour: unknown key"):
        LlmSettings.from_table({"models": {"m": {"colour": 1}}})


def test_check_credentials_names_each_model_and_variable_in_one_line() -> None:
    agents = (
        AgentSpec("a", ("r",), model="openai/x", api_key_env="A_KEY"),
        AgentSpec("b", ("s",), model="anthropic/y"),
        AgentSpec("c", ("t",), model="openai/z", api_key_env="SET_KEY"),
    )
    llm = LlmSettings.from_table({"models": {"anthropic/y": {"api_key_env": "B_KEY"}}})
    with pytest.raises(ValueError) as info:
        check_credentials(agents, llm, {"SET_KEY": "k"})
    assert str(info.value) == (
        "agents[0] (model openai/x): api_key_env A_KEY is not set; "
        "agents[1] (model anthropic/y): api_key_env B_KEY is not set; "
        "llm.models.'anthropic/y' (model anthropic/y): api_key_env B_KEY is not set"
    )
    check_credentials(agents, llm, {"A_KEY": "1", "B_KEY": "2", "SET_KEY": "3"})


def test_unset_provider_keys_names_each_model_whose_usual_key_is_missing() -> None:
    # What litellm.validate_environment answers with no key in the environment.
    answers: dict[str, dict[str, object]] = {
        "openai/gpt-4o-mini": {"keys_in_environment": False, "missing_keys": ["OPENAI_API_KEY"]},
        "gemini/g": {
            "keys_in_environment": False,
            "missing_keys": ["GOOGLE_API_KEY", "GEMINI_API_KEY"],
        },
        "ollama/llama3": {"keys_in_environment": False, "missing_keys": ["OLLAMA_API_BASE"]},
        "anthropic/set": {"keys_in_environment": True, "missing_keys": []},
    }
    asked: list[str] = []

    def validate(model: str) -> dict[str, object]:
        asked.append(model)
        if model not in answers:
            raise ValueError("unknown provider")
        return answers[model]

    agents = (
        AgentSpec("a", ("r",), model="openai/gpt-4o-mini"),
        AgentSpec("b", ("s",), model="gemini/g"),
        AgentSpec("c", ("t",), model="ollama/llama3"),  # a server, not a key: no warning
        AgentSpec("d", ("u",), model="anthropic/set"),
        AgentSpec("e", ("v",), model="openai/own", api_key_env="MINE"),  # check_credentials'
        AgentSpec("f", ("w",), model="openai/local", api_base="http://127.0.0.1:8000/v1"),
        AgentSpec("g", ("x",), model="grapevine/offline"),
        AgentSpec("h", ("y",), model="nowhere/x"),  # litellm knows no such provider
    )
    lines = unset_provider_keys(agents, LlmSettings(), validate)
    assert lines == [
        "agents[0] (model openai/gpt-4o-mini): OPENAI_API_KEY is not set, so its calls will "
        "fail with an authentication error; set it, or name the variable that holds the key "
        "with api_key_env",
        "agents[1] (model gemini/g): GOOGLE_API_KEY or GEMINI_API_KEY is not set, so its calls "
        "will fail with an authentication error; set it, or name the variable that holds the "
        "key with api_key_env",
    ]
    assert asked == [
        "openai/gpt-4o-mini",
        "gemini/g",
        "ollama/llama3",
        "anthropic/set",
        "nowhere/x",
    ]
    assert f"{OFFLINE_PROVIDER}/" == OFFLINE_PREFIX
