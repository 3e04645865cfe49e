"""Settings of `grapevine agent`: flags over environment over config file over defaults.

Invariants:
- Each setting is taken from the first source that gives it: a command-line flag, then a
  `GRAPEVINE_*` environment variable, then the TOML config file, then the default.
- Every value is validated where it is read; a bad one raises `SettingsError` whose message
  names the setting, the source and the value: "bind from GRAPEVINE_BIND: 'abc' is not
  host:port".
- The config file may hold the settings at its top level or in a `[peer]` table; an unknown key
  is an error naming it, so a typo never silently falls back to a default.
- Relative paths in the config file are relative to the file's directory; relative paths from
  flags and the environment are relative to the working directory.
- `[tasks] retention` is the config file's spelling of `task_retention` (`--task-retention`,
  `GRAPEVINE_TASK_RETENTION`), and `[tasks] tombstone_grace` of `tombstone_grace`
  (`--tombstone-grace`, `GRAPEVINE_TOMBSTONE_GRACE`; unset, it follows the retention);
  durations are seconds or a number with s, m, h or d.
- The agent host's tables — `[[agents]]`, `[limits]`, `[pool]`, `[llm]` — come only from the
  config file's top level; their errors name the file, the table, the index and the key:
  "config file peer.toml: agents[2].max_concurrent: must be an integer >= 1, got 0". With no
  `[[agents]]` the peer serves the built-in roles only (`echo`, `sleep`). Every `api_key_env`
  they use must name a variable set in the environment given (a missing key stops the start).
- An API address beyond loopback is refused without the operator's token file
  (`AgentSettings.check_api_exposure`).
- The result is a frozen `AgentSettings`; nothing else reads flags, environment or files.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootstrap.seeds import parse_seed
from peer.agents.spec import (
    AgentSpec,
    PoolSettings,
    TreeLimits,
    parse_agents,
    parse_limits,
    parse_pool,
)
from peer.api_token import DEFAULT_DATA_DIR
from peer.observability.logs import LOG_FORMATS
from protocol.config import TaskConfig

if TYPE_CHECKING:
    from peer.agents.model_settings import LlmSettings

DEFAULT_BIND = "0.0.0.0:7946"
DEFAULT_API = "127.0.0.1:8946"
PROFILES = ("lan", "local", "wan")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_WILDCARDS = ("0.0.0.0", "::", "")
AGENT_TABLES = ("agents", "limits", "pool", "llm")
"""Top-level config tables of the agent host (read from the config file only)."""


class SettingsError(Exception):
    """A setting has an unusable value; the message names the setting and its source."""


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything `grapevine agent` needs to start one peer."""

    bind: str = DEFAULT_BIND
    """Where peers reach us: "host:port" to listen on for envelopes (port 0 picks one)."""
    advertise: str | None = None
    """The "host:port" other peers should dial. None: the bind address, except that a wildcard
    bind host (0.0.0.0 or ::) advertises 127.0.0.1, which only works on one machine; on a real
    network set --advertise to an address the other machines can reach."""
    api: str = DEFAULT_API
    """Where the local HTTP API listens. Loopback by default; any other address needs
    `api_token_file`, so that a peer never serves its API to a network on a token that only
    this machine's users can read."""
    api_token_file: Path | None = None
    """The operator's API token (`--api-token-file`): one file the peers of one operator can
    share. None: the peer's own token, generated at first start in `<data_dir>/api.token`."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Identity, incarnation, membership hints and the keyring copy live here."""
    network_key_file: Path | None = None
    """The network key or keyring file (`grapevine keygen --output network.key`); refused
    when group or others may read or write it (`peer.keys`)."""
    insecure_dev: bool = False
    """Use the well-known all-zero development key instead of a real one. Anyone can join."""
    join: tuple[str, ...] = ()
    """Seed addresses ("host:port", "[v6]:port" or a bare host) to join through."""
    profile: str = "lan"
    """Protocol timing preset: "lan" (memberlist's LAN), "local" (peers on one host) or "wan"
    (slow links, or many peers crowded on one small host)."""
    no_agents: bool = False
    """Seed-only mode: host no agents and advertise no roles."""
    log_level: str = "INFO"
    """Logging threshold: DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    log_format: str = "text"
    """"text" (one human-readable line per record) or "json" (one JSON object per line, for
    log collectors; task lifecycle fields become keys). See docs/observability.md."""
    workspace: Path | None = None
    """The directory agents' `read_file`/`write_file` tools are jailed in. None: the
    "workspace" folder of `data_dir` (see `workspace_dir`)."""
    task_retention: float = TaskConfig().retention
    """Seconds a final task is kept whole before it is compacted to a tombstone
    (`protocol.config.TaskConfig.retention`); 24 hours by default."""
    tombstone_grace: float | None = None
    """Seconds a tombstone is kept before it is forgotten
    (`protocol.config.TaskConfig.tombstone_grace`). None: as long as `task_retention`
    (decision 37)."""
    agents: tuple[AgentSpec, ...] = ()
    """The agents this peer hosts (`[[agents]]`); none: only the built-in roles are served."""
    limits: TreeLimits = field(default_factory=TreeLimits)
    """Depth, fan-out, step and budget limits of delegation trees (`[limits]`)."""
    pool: PoolSettings = field(default_factory=PoolSettings)
    """How many agents may be spawned at runtime, and when (`[pool]`)."""
    llm: LlmSettings | None = None
    """Model-layer settings (`[llm]`: rate limits, retries, breaker); None: no `[llm]` table,
    the model layer's defaults."""

    def workspace_dir(self) -> Path:
        """The agents' workspace: `workspace`, or `data_dir / "workspace"` when unset."""
        return self.workspace if self.workspace is not None else self.data_dir / "workspace"

    def bind_host_port(self) -> tuple[str, int]:
        """Return (host, port) of `bind`, IPv6 brackets removed."""
        return split_host_port(self.bind)

    def api_host_port(self) -> tuple[str, int]:
        """Return (host, port) of `api`, IPv6 brackets removed."""
        return split_host_port(self.api)

    def check_api_exposure(self) -> None:
        """Refuse an API beyond loopback without the operator's token.

        The generated token lives in the data directory, readable by this machine's user
        only; an API the network can reach must be guarded by a token the operator chose and
        handed out on purpose.

        Raises:
            SettingsError: `api` is not a loopback address and `api_token_file` is unset.
        """
        host, _ = self.api_host_port()
        if self.api_token_file is None and not is_loopback_host(host):
            raise SettingsError(
                f"api {self.api} is not a loopback address; an API reachable from the network "
                "needs the operator's token (--api-token-file FILE, GRAPEVINE_API_TOKEN_FILE "
                "or api_token_file in the config file)"
            )

    def advertise_address(self, bound_port: int) -> str:
        """Return the address to advertise, given the port the transport actually bound."""
        if self.advertise is not None:
            return self.advertise
        host, _ = self.bind_host_port()
        if host in _WILDCARDS:
            host = "127.0.0.1"
        return f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"


def is_loopback_host(host: str) -> bool:
    """Whether `host` (brackets removed) names this machine only: localhost or a loopback IP."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(text: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into (host, port).

    Raises:
        ValueError: the text is not host:port with a port from 0 to 65535.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("is not host:port")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has a bracketed host that is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host or not host or any(c.isspace() for c in host):
            raise ValueError("is not host:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("is not host:port (the port must be a number from 0 to 65535)")
    return host, int(port_text)


def _address(value: str) -> str:
    split_host_port(value)
    return value


def _advertise(value: str) -> str:
    host, port = split_host_port(value)
    if host in _WILDCARDS or port == 0:
        raise ValueError("must be a concrete host and port other peers can dial")
    return value


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
    raise ValueError("is not a boolean (use true/false, 1/0, yes/no or on/off)")


def _profile(value: str) -> str:
    if value not in PROFILES:
        raise ValueError(f"is not a profile (choose {' or '.join(PROFILES)})")
    return value


def _log_format(value: str) -> str:
    if value.lower() not in LOG_FORMATS:
        raise ValueError(f"is not a log format ({' or '.join(LOG_FORMATS)})")
    return value.lower()


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"is not a log level ({', '.join(LOG_LEVELS)})")
    return value.upper()


DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from a number, or a string of a number optionally followed by s, m, h or d.

    Raises:
        ValueError: not a positive, finite duration in that form.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("is not a duration (seconds, or a number with s, m, h or d)")
    text = str(value).strip().lower()
    scale = DURATION_UNITS.get(text[-1:]) if text else None
    number = text[:-1] if scale is not None else text
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError("is not a duration (seconds, or a number with s, m, h or d)") from None
    if not 0 < seconds < float("inf"):
        raise ValueError("must be a positive duration")
    return seconds


def _join_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        raise ValueError("is not a list of seed addresses")
    for item in items:
        if item:
            try:
                parse_seed(item)
            except ValueError as exc:
                raise ValueError(f"has a bad seed: {exc}") from None
    return tuple(item for item in items if item)


@dataclass(frozen=True, slots=True)
class _Field:
    env: str
    kind: str  # "str", "path", "bool", "list", "duration"
    check: Callable[[str], object] | None = None


_FIELDS: dict[str, _Field] = {
    "bind": _Field("GRAPEVINE_BIND", "str", _address),
    "advertise": _Field("GRAPEVINE_ADVERTISE", "str", _advertise),
    "api": _Field("GRAPEVINE_API", "str", _address),
    "api_token_file": _Field("GRAPEVINE_API_TOKEN_FILE", "path"),
    "data_dir": _Field("GRAPEVINE_DATA_DIR", "path"),
    "network_key_file": _Field("GRAPEVINE_NETWORK_KEY_FILE", "path"),
    "insecure_dev": _Field("GRAPEVINE_INSECURE_DEV", "bool"),
    "join": _Field("GRAPEVINE_JOIN", "list"),
    "profile": _Field("GRAPEVINE_PROFILE", "str", _profile),
    "no_agents": _Field("GRAPEVINE_NO_AGENTS", "bool"),
    "log_level": _Field("GRAPEVINE_LOG_LEVEL", "str", _log_level),
    "log_format": _Field("GRAPEVINE_LOG_FORMAT", "str", _log_format),
    "workspace": _Field("GRAPEVINE_WORKSPACE", "path"),
    "task_retention": _Field("GRAPEVINE_TASK_RETENTION", "duration"),
    "tombstone_grace": _Field("GRAPEVINE_TOMBSTONE_GRACE", "duration"),
}


def load_settings(
    flags: Mapping[str, object],
    env: Mapping[str, str],
    config_path: Path | None,
) -> AgentSettings:
    """Merge flags, environment and config file into validated settings.

    Args:
        flags: command-line values by setting name (snake_case); a None value means the flag
            was not given. Unknown names are an error.
        env: the environment (`os.environ`); only `GRAPEVINE_*` variables are read.
        config_path: a TOML file, or None.

    Returns:
        The settings.

    Raises:
        SettingsError: a value is invalid, a config key or flag is unknown, or the config file
            cannot be read or parsed. The message names the setting and where it came from.
    """
    unknown_flags = sorted(set(flags) - set(_FIELDS))
    if unknown_flags:
        raise SettingsError(f"unknown setting(s) {', '.join(unknown_flags)} given as flags")
    file_values, tables, file_dir, file_label = _read_config(config_path)
    values: dict[str, Any] = {}
    for name, spec in _FIELDS.items():
        flag = flags.get(name)
        if flag is not None:
            values[name] = _convert(name, spec, flag, f"--{name.replace('_', '-')}", Path.cwd())
        elif spec.env in env:
            values[name] = _convert(name, spec, env[spec.env], spec.env, Path.cwd())
        elif name in file_values:
            values[name] = _convert(name, spec, file_values[name], file_label, file_dir)
    values.update(_agent_tables(tables, file_label, env))
    settings = AgentSettings(**values)
    settings.check_api_exposure()
    return settings


def _agent_tables(
    tables: Mapping[str, object], label: str, env: Mapping[str, str]
) -> dict[str, object]:
    values: dict[str, object] = {}
    try:
        if "agents" in tables:
            values["agents"] = parse_agents(tables["agents"])
        if "limits" in tables:
            values["limits"] = parse_limits(tables["limits"])
        if "pool" in tables:
            values["pool"] = parse_pool(tables["pool"])
    except ValueError as exc:
        raise SettingsError(f"config file {label}: {exc}") from None
    if "llm" in tables:
        table = tables["llm"]
        if not isinstance(table, dict):
            raise SettingsError(f"config file {label}: llm: must be a table ([llm])")
        from peer.agents.model_settings import LlmSettings  # loads only when configured

        try:
            values["llm"] = LlmSettings.from_table(table)
        except ValueError as exc:
            message = str(exc)
            prefix = "" if message.startswith("llm") else "llm: "
            raise SettingsError(f"config file {label}: {prefix}{message}") from None
    if "agents" in tables or "llm" in tables:
        from peer.agents.model_settings import LlmSettings, check_credentials

        agents = values.get("agents", ())
        llm = values.get("llm") or LlmSettings()
        assert isinstance(agents, tuple) and isinstance(llm, LlmSettings)
        try:
            check_credentials(agents, llm, env)
        except ValueError as exc:
            raise SettingsError(f"config file {label}: {exc}") from None
    return values


def _convert(name: str, spec: _Field, value: object, source: str, base: Path) -> object:
    try:
        if spec.kind == "bool":
            return _bool(value)
        if spec.kind == "list":
            return _join_list(value)
        if spec.kind == "duration":
            return parse_duration(value)
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str):
            raise TypeError(f"is a {type(value).__name__}, not a string")
        if spec.kind == "path":
            if not value.strip():
                raise ValueError("is an empty path")
            path = Path(value).expanduser()
            return path if path.is_absolute() else base / path
        return spec.check(value) if spec.check is not None else value
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"{name} from {source}: {value!r} {exc}") from None


def _read_config(
    path: Path | None,
) -> tuple[dict[str, object], dict[str, object], Path, str]:
    if path is None:
        return {}, {}, Path.cwd(), ""
    path = Path(path)
    label = str(path)
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise SettingsError(f"config file {label}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {label}: not valid TOML ({exc})") from None
    table: dict[str, object] = dict(document)
    tables = {name: table.pop(name) for name in AGENT_TABLES if name in table}
    if "tasks" in table:
        table.update(_tasks_table(table.pop("tasks"), label))
    peer = table.pop("peer", None)
    if peer is not None:
        if not isinstance(peer, dict):
            raise SettingsError(f"config file {label}: 'peer' must be a table ([peer])")
        overlap = sorted(set(peer) & set(table))
        if overlap:
            raise SettingsError(
                f"config file {label}: {', '.join(overlap)} set both at the top level and in "
                "[peer]; keep one"
            )
        table.update(peer)
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise SettingsError(
            f"config file {label}: unknown key(s) {', '.join(unknown)} "
            f"(known: {', '.join(_FIELDS)}; tables: peer, tasks, {', '.join(AGENT_TABLES)})"
        )
    return table, tables, path.resolve().parent, label


def _tasks_table(tasks: object, label: str) -> dict[str, object]:
    """The settings a `[tasks]` table gives, under their own names (`retention` is
    `task_retention`; `tombstone_grace` keeps its name)."""
    if not isinstance(tasks, dict):
        raise SettingsError(f"config file {label}: 'tasks' must be a table ([tasks])")
    names = {"retention": "task_retention", "tombstone_grace": "tombstone_grace"}
    unknown = sorted(set(tasks) - set(names))
    if unknown:
        raise SettingsError(
            f"config file {label}: unknown key(s) {', '.join(unknown)} in [tasks] "
            f"(known: {', '.join(names)})"
        )
    return {names[key]: value for key, value in tasks.items()}
