"""Settings: flag > environment > config file > default; every error names its setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.settings import AgentSettings, SettingsError, load_settings, split_host_port


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peer.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings({}, {}, None)
    assert s == AgentSettings()
    assert s.bind == "0.0.0.0:7946" and s.api == "127.0.0.1:8946" and s.profile == "lan"
    assert s.advertise_address(7946) == "127.0.0.1:7946"


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        ("1.1.1.1:1", "2.2.2.2:2", "3.3.3.3:3", "1.1.1.1:1"),
        (None, "2.2.2.2:2", "3.3.3.3:3", "2.2.2.2:2"),
        (None, None, "3.3.3.3:3", "3.3.3.3:3"),
        (None, None, None, "0.0.0.0:7946"),
    ],
)
def test_precedence(
    tmp_path: Path, flag: str | None, env: str | None, file: str | None, expected: str
) -> None:
    config = _toml(tmp_path, f'bind = "{file}"\n' if file else "")
    environ = {"GRAPEVINE_BIND": env} if env else {}
    assert load_settings({"bind": flag}, environ, config).bind == expected


def test_every_setting_from_each_source(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        """
[peer]
bind = "[::1]:7000"
advertise = "10.0.0.5:7000"
api = "127.0.0.1:9000"
data_dir = "state"
network_key_file = "net.key"
insecure_dev = true
join = ["seed.example.org", "[::1]:7946"]
profile = "local"
no_agents = true
log_level = "debug"
""",
    )
    s = load_settings({}, {}, config)
    assert s.bind_host_port() == ("::1", 7000)
    assert s.advertise_address(1) == "10.0.0.5:7000"
    assert s.data_dir == tmp_path / "state"  # relative to the config file
    assert s.network_key_file == tmp_path / "net.key"
    assert s.insecure_dev and s.no_agents and s.profile == "local" and s.log_level == "DEBUG"
    assert s.join == ("seed.example.org", "[::1]:7946")

    env = {
        "GRAPEVINE_JOIN": "a:1, b:2",
        "GRAPEVINE_INSECURE_DEV": "no",
        "GRAPEVINE_NO_AGENTS": "0",
        "GRAPEVINE_DATA_DIR": "/var/lib/gv",
        "GRAPEVINE_PROFILE": "lan",
    }
    s = load_settings({"log_level": "warning"}, env, config)
    assert s.join == ("a:1", "b:2") and not s.insecure_dev and not s.no_agents
    assert s.data_dir == Path("/var/lib/gv") and s.profile == "lan" and s.log_level == "WARNING"

    s = load_settings({"join": ["c:3"], "no_agents": False, "data_dir": "rel"}, env, config)
    assert s.join == ("c:3",) and not s.no_agents and s.data_dir == Path.cwd() / "rel"


def test_wildcard_ipv6_bind_advertises_loopback() -> None:
    s = load_settings({"bind": "[::]:0"}, {}, None)
    assert s.advertise_address(4242) == "127.0.0.1:4242"
    assert load_settings({"bind": "10.1.2.3:0"}, {}, None).advertise_address(5) == "10.1.2.3:5"


@pytest.mark.parametrize(
    ("flags", "env", "file", "message"),
    [
        ({}, {"GRAPEVINE_BIND": "abc"}, "", "bind from GRAPEVINE_BIND: 'abc' is not host:port"),
        ({"bind": "h:99999"}, {}, "", "bind from --bind: 'h:99999'"),
        ({}, {}, 'api = "nope"', "api from "),
        ({"advertise": "0.0.0.0:7946"}, {}, "", "advertise from --advertise"),
        ({}, {"GRAPEVINE_PROFILE": "lan2"}, "", "profile from GRAPEVINE_PROFILE: 'lan2'"),
        ({}, {"GRAPEVINE_INSECURE_DEV": "maybe"}, "", "insecure_dev from GRAPEVINE_INSECURE_DEV"),
        ({}, {}, "no_agents = 3", "no_agents from "),
        ({}, {"GRAPEVINE_JOIN": "a:x"}, "", "join from GRAPEVINE_JOIN: 'a:x' has a bad seed"),
        ({}, {}, "join = 5", "join from "),
        ({}, {}, "log_level = 'loud'", "log_level from "),
        ({}, {}, "data_dir = 7", "data_dir from "),
        ({}, {"GRAPEVINE_NETWORK_KEY_FILE": ""}, "", "network_key_file from GRAPEVINE_NETWORK"),
        ({}, {}, "bnid = '1:2'", "unknown key(s) bnid"),
        ({}, {}, "[peer]\nbind = '1:2'\n[agentz]\n", "unknown key(s) agentz"),
        ({}, {}, "[agents]\n", "agents: must be an array of tables ([[agents]])"),
        ({}, {}, "[peer]\n[peer.limits]\n", "unknown key(s) limits"),
        ({}, {}, "bind = '1:2'\n[peer]\nbind = '1:3'\n", "bind set both"),
        ({}, {}, "bind = ", "not valid TOML"),
        ({"colour": "red"}, {}, "", "unknown setting(s) colour"),
    ],
)
def test_errors_name_the_setting_and_source(
    tmp_path: Path, flags: dict[str, object], env: dict[str, str], file: str, message: str
) -> None:
    config = _toml(tmp_path, file)
    with pytest.raises(SettingsError) as info:
        load_settings(flags, env, config)
    assert message in str(info.value)
    if "from " in message and "GRAPEVINE" not in message and "--" not in message:
        assert str(config) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({}, {}, tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("h:1", ("h", 1)), ("[::1]:0", ("::1", 0)), ("0.0.0.0:7946", ("0.0.0.0", 7946))],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["h", ":1", "::1:5", "[x]:1", "h:-1", "h h:1", "[::1]"])
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="host"):
        split_host_port(text)


AGENTS_TOML = """
workspace = "ws"

[[agents]]
name = "boss"
roles = ["writer"]
model = "openai/gpt-4o-mini"
system = "You write briefs."
tools = ["delegate", "final_answer"]
max_concurrent = 2
temperature = 0.3
budget = { tokens = 50000, cost_micro = 20000 }

[[agents]]
name = "helper"
roles = ["researcher", "checker"]

[limits]
max_depth = 2
default_budget = 1000

[pool]
max_spawned = 0
"""


def test_agent_tables(tmp_path: Path) -> None:
    from peer.agents.ports import Budget
    from peer.agents.spec import AgentSpec, PoolSettings, TreeLimits

    s = load_settings({}, {}, _toml(tmp_path, AGENTS_TOML))
    assert [a.name for a in s.agents] == ["boss", "helper"]
    assert s.agents[0].budget == Budget(50_000, 20_000) and s.agents[0].max_concurrent == 2
    assert s.agents[1] == AgentSpec("helper", ("researcher", "checker"))
    assert s.limits == TreeLimits(max_depth=2, default_budget=Budget(tokens=1000))
    assert s.pool == PoolSettings(max_spawned=0)
    assert s.workspace == tmp_path / "ws" and s.workspace_dir() == tmp_path / "ws"
    assert s.llm is None


def test_no_agents_and_default_workspace(tmp_path: Path) -> None:
    s = load_settings({"data_dir": str(tmp_path)}, {}, _toml(tmp_path, 'bind = "1.2.3.4:5"\n'))
    assert s.agents == () and s.workspace is None
    assert s.workspace_dir() == tmp_path / "workspace"
    assert load_settings({}, {"GRAPEVINE_WORKSPACE": "/srv/ws"}, None).workspace == Path("/srv/ws")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[agents]]\nname = 'a'\nroles = ['r']\nmax_concurrent = 0\n", "agents[0].max_concurrent"),
        (
            "[[agents]]\nname = 'a'\nroles = ['r']\n[[agents]]\nname = 'a'\nroles = ['s']\n",
            "agents[1].name: 'a' is already",
        ),
        ("[[agents]]\nname = 'a'\nroles = ['r']\ncolour = 1\n", "agents[0]: unknown key(s) colour"),
        ("[limits]\nmax_steps = 0\n", "limits.max_steps: must be an integer >= 1, got 0"),
        ("[pool]\nidle_retire = -1\n", "pool.idle_retire"),
        ("llm = 3\n", "llm: must be a table"),
    ],
)
def test_agent_table_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    config = _toml(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        load_settings({}, {}, config)
    assert message in str(info.value) and str(config) in str(info.value)


def test_llm_table(tmp_path: Path) -> None:
    llm = pytest.importorskip("peer.agents.llm", reason="the model layer is not there yet")
    s = load_settings({}, {}, _toml(tmp_path, "[llm]\n"))
    assert s.llm == llm.LlmSettings.from_table({})
    with pytest.raises(SettingsError) as info:
        load_settings({}, {}, _toml(tmp_path, "[llm]\nno_such_key = 1\n"))
    assert "no_such_key" in str(info.value) and "llm" in str(info.value)
