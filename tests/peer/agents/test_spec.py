"""Agent specs, tree limits and pool settings from TOML (peer/agents/spec.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from peer.agents.ports import Budget
from peer.agents.spec import (
    AgentSpec,
    PoolSettings,
    TreeLimits,
    parse_agents,
    parse_limits,
    parse_pool,
)
from peer.settings import SettingsError, load_settings


def _agents(text: str) -> tuple[AgentSpec, ...]:
    return parse_agents(tomllib.loads(text)["agents"])


def test_defaults_and_full_spec() -> None:
    (minimal, full) = _agents(
        """
[[agents]]
name = "w"
roles = ["writer"]

[[agents]]
name = "boss-1"
roles = ["boss", "planner.v2"]
model = "ollama/llama3"
system = "Plan."
tools = ["delegate", "spawn_agent", "read_file", "write_file", "final_answer", "json:dumps"]
max_concurrent = 3
temperature = 1
max_tokens = 512
budget = 9000
"""
    )
    assert minimal == AgentSpec("w", ("writer",))
    assert minimal.model == "grapevine/offline" and minimal.tools == ("final_answer",)
    assert minimal.budget == Budget() and minimal.temperature is None
    assert full.roles == ("boss", "planner.v2") and full.tools[-1] == "json:dumps"
    assert full.temperature == 1.0 and isinstance(full.temperature, float)
    assert full.max_tokens == 512 and full.budget == Budget(tokens=9000)
    assert _agents("[[agents]]\nname='a'\nroles=['r']\nbudget={cost_micro=5}\n")[0].budget == (
        Budget(cost_micro=5)
    )
    assert parse_agents([]) == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("roles = ['r']", "agents[0].name: required"),
        ("name = 'a'", "agents[0].roles: required"),
        ("name = 'a'\nroles = []", "agents[0].roles: must be a non-empty array"),
        ("name = 'a b'\nroles = ['r']", "agents[0].name: must be 1..64"),
        (f"name = '{'x' * 65}'\nroles = ['r']", "agents[0].name: must be 1..64"),
        ("name = 'a'\nroles = ['']", "agents[0].roles[0]: must be 1..64"),
        ("name = 'a'\nroles = ['r', 'r']", "agents[0].roles[1]: 'r' is listed twice"),
        ("name = 'a'\nroles = ['echo']", "agents[0].roles[0]: 'echo' is reserved"),
        ("name = 'a'\nroles = ['grapevine.spawn']", "is reserved"),
        (
            "name = 'a'\nroles = ['r']\nmax_concurrent = 0",
            "agents[0].max_concurrent: must be an integer >= 1, got 0",
        ),
        ("name = 'a'\nroles = ['r']\nmax_concurrent = true", "agents[0].max_concurrent"),
        (
            "name = 'a'\nroles = ['r']\ntemperature = 2.5",
            "agents[0].temperature: must be a number from 0 to 2, got 2.5",
        ),
        ("name = 'a'\nroles = ['r']\nmax_tokens = 0", "agents[0].max_tokens"),
        ("name = 'a'\nroles = ['r']\nmodel = ''", "agents[0].model"),
        ("name = 'a'\nroles = ['r']\nsystem = 3", "agents[0].system: must be a string"),
        ("name = 'a'\nroles = ['r']\ntools = ['shell']", "agents[0].tools[0]: 'shell' is neither"),
        ("name = 'a'\nroles = ['r']\ntools = 'delegate'", "agents[0].tools: must be an array"),
        ("name = 'a'\nroles = ['r']\ntools = ['delegate', 'delegate']", "listed twice"),
        ("name = 'a'\nroles = ['r']\nbudget = -1", "agents[0].budget: must be an integer >= 0"),
        ("name = 'a'\nroles = ['r']\nbudget = 'lots'", "agents[0].budget: must be a number of"),
        (
            "name = 'a'\nroles = ['r']\nbudget = {tokens = 1, dollars = 2}",
            "agents[0].budget: unknown key(s) dollars",
        ),
        ("name = 'a'\nroles = ['r']\nbudget = {cost_micro = -2}", "agents[0].budget.cost_micro"),
        ("name = 'a'\nroles = ['r']\nrole = 'x'", "agents[0]: unknown key(s) role (known: name"),
    ],
)
def test_agent_errors_name_index_and_key(body: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        _agents(f"[[agents]]\n{body}\n")
    assert message in str(info.value)


def test_names_unique_across_agents_but_roles_may_be_shared() -> None:
    two = "[[agents]]\nname = 'a'\nroles = ['r']\n[[agents]]\nname = '{}'\nroles = ['{}']\n"
    with pytest.raises(
        ValueError, match=r"agents\[1\].name: 'a' is already the name of agents\[0\]"
    ):
        _agents(two.format("a", "s"))
    assert [spec.roles for spec in _agents(two.format("b", "r"))] == [("r",), ("r",)]
    with pytest.raises(ValueError, match=r"agents: must be an array of tables"):
        parse_agents({"name": "a"})
    with pytest.raises(ValueError, match=r"agents\[0\]: must be a table"):
        parse_agents(["a"])


def test_limits() -> None:
    assert parse_limits({}) == TreeLimits()
    assert TreeLimits().default_budget == Budget(tokens=200_000)
    limits = parse_limits(
        {
            "max_depth": 0,
            "max_children": 3,
            "max_steps": 5,
            "parent_reserve": 0,
            "default_budget": {"tokens": 10, "cost_micro": 20},
        }
    )
    assert limits == TreeLimits(0, 3, 5, 0.0, Budget(10, 20))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_depth": -1}, "limits.max_depth: must be an integer >= 0, got -1"),
        ({"max_steps": 0}, "limits.max_steps: must be an integer >= 1, got 0"),
        ({"parent_reserve": 1}, "limits.parent_reserve: must be a number >= 0 and < 1"),
        ({"parent_reserve": -0.1}, "limits.parent_reserve: must be a number from 0 to 1"),
        ({"default_budget": "x"}, "limits.default_budget: must be a number of tokens"),
        ({"depth": 3}, "limits: unknown key(s) depth"),
    ],
)
def test_limit_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_limits(table)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="limits: must be a table"):
        parse_limits([1])


def test_pool() -> None:
    assert parse_pool({}) == PoolSettings()
    assert parse_pool({"max_spawned": 0, "idle_retire": 5, "grow_after": 0}) == PoolSettings(
        0, 5.0, 0.0
    )
    for table, message in [
        ({"max_spawned": -1}, "pool.max_spawned"),
        ({"idle_retire": 0}, "pool.idle_retire: must be a number of seconds > 0"),
        ({"grow_after": float("nan")}, "pool.grow_after"),
        ({"size": 1}, "pool: unknown key(s) size"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_pool(table)
        assert message in str(info.value)


def test_pool_allow_lists() -> None:
    assert PoolSettings().models is None and PoolSettings().tools is None
    table = {"models": ["openai/gpt-4o-mini", "grapevine/offline"], "tools": ["read_file"]}
    settings = parse_pool(table)
    assert settings.models == ("openai/gpt-4o-mini", "grapevine/offline")
    assert settings.tools == ("read_file",)
    assert parse_pool({"models": [], "tools": []}) == PoolSettings(models=(), tools=())
    for bad, message in [
        ({"models": "gpt"}, "pool.models: must be an array of litellm model strings, got str"),
        ({"models": ["a", " "]}, "pool.models[1]: must be a litellm model string, got ' '"),
        ({"models": ["a", "a"]}, "pool.models[1]: 'a' is listed twice"),
        ({"tools": ["rm_rf"]}, "pool.tools[0]: 'rm_rf' is neither a built-in tool"),
        ({"tools": ["os:system"]}, "pool.tools[0]: 'os:system' is not a built-in tool"),
        ({"tools": [1]}, "pool.tools[0]: 1 is neither"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_pool(bad)
        assert message in str(info.value)


def test_pool_allow_list_errors_name_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "peer.toml"
    config.write_text("[pool]\nmodels = ['ok', 3]\n")
    with pytest.raises(SettingsError, match=r"config file .*peer\.toml: pool\.models\[1\]"):
        load_settings({}, {}, config)
