"""`run` and `serve`: `grapevine agent` from Python, with the command's settings and builder.

    import peer
    from crew import boss, researcher

    raise SystemExit(peer.run(boss, researcher, config="peer.toml", join=["10.0.0.1:7946"]))

Invariants:
- The settings are the command's: keyword arguments are its options under their setting
  names (`bind`, `join`, `network_key_file`, `insecure_dev`, ...), then the `GRAPEVINE_*`
  environment, then the `config` file (`peer.settings.load_settings`), and the peer is built
  and run by the command's own code (`peer.cli.agent`, `peer.build.build_peer`). Nothing
  here reads a setting itself.
- `run` behaves as the command does: it blocks until the peer leaves (Ctrl-C, SIGTERM,
  `grapevine leave`), prints a configuration problem as one line, and returns the exit
  status (0 left, 1 could not start, 2 unusable settings). `serve` is for a program with its
  own event loop: it raises `SettingsError` or `ServeError` instead, and stops when `stop`
  is set.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from peer.cli.agent import main_agent, run_agent
from peer.python_api.roles import Role
from peer.python_api.serving import Servable, ServeError, collect, settings_with
from peer.settings import AgentSettings, SettingsError, load_settings

EXIT_USAGE = 2


def run(*served: Servable, config: str | Path | None = None, **options: object) -> int:
    """Run a peer serving `served` until it leaves, as `grapevine agent` does (blocking).

    Args:
        served: roles, agents, modules or module names (all their top-level roles and agents).
        config: a TOML config file, as `--config`.
        options: `grapevine agent`'s options by setting name (`bind="0.0.0.0:7946"`,
            `join=["seed:7946"]`, `insecure_dev=True`, ...).

    Returns:
        The exit status: 0 after leaving, 1 if the peer could not start, 2 if the settings
        or what to serve are unusable (the reason printed on stderr as one line).
    """
    try:
        settings, roles = prepare(served, config, options)
    except (SettingsError, ServeError) as exc:
        print(f"grapevine agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return main_agent(settings, roles)


async def serve(
    *served: Servable,
    config: str | Path | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = False,
    **options: object,
) -> int:
    """Run a peer serving `served` in the running event loop until `stop` is set.

    Args:
        served, config, options: as for `run`.
        stop: set it to make the peer leave.
        handle_signals: leave on SIGINT/SIGTERM too (needs the main thread).

    Returns:
        The exit status, as for `run`.

    Raises:
        SettingsError: an option, variable or config value is unusable.
        ServeError: what to serve cannot be served (see `peer.python_api.serving`).
    """
    settings, roles = prepare(served, config, options)
    return await run_agent(settings, stop=stop, handle_signals=handle_signals, python_roles=roles)


def prepare(
    served: Sequence[Servable], config: str | Path | None, options: dict[str, object]
) -> tuple[AgentSettings, tuple[Role, ...]]:
    """The command's settings with the code agents added, and the Python roles.

    Raises:
        SettingsError: as `peer.settings.load_settings`.
        ServeError: as `peer.python_api.serving.collect` and `settings_with`.
    """
    settings = load_settings(options, os.environ, None if config is None else Path(config))
    wanted = collect(served)
    return settings_with(settings, wanted), wanted.roles
