"""Starting a network: `grapevine keygen` (a new network key) and `grapevine agent` (run a peer).

Invariants:
- `keygen --output` never overwrites a file and creates the key readable only by its owner.
- A --data-dir that names a file is refused (exit 2) before anything starts.
- `agent` passes to `peer.settings.load_settings` only the options the user gave, so the
  environment and the --config file fill the rest; a settings mistake exits 2, an environment
  problem (address in use, unreadable data directory) exits 1.
- `agent --handlers` modules are imported before the peer starts (`peer.python_api.serving`):
  a module that cannot be imported or serves nothing, or a role also served by an agent,
  exits 2 with one line.
- The peer runtime (`peer.cli.agent`, `peer.settings`) is imported only when `agent` runs, so
  the client commands start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from peer.cli.common import fail, json_option, not_a_directory, warn
from peer.cli.parsing import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Subcommands, add_command
from peer.client import DEFAULT_API
from peer.runtime.keyring import encode_key, generate_network_key

_AGENT_FLAGS = (
    "network_key_file",
    "bind",
    "advertise",
    "api",
    "api_token_file",
    "data_dir",
    "join",
    "profile",
    "insecure_dev",
    "no_agents",
    "log_level",
    "log_format",
    "task_retention",
    "tombstone_grace",
)
"""`grapevine agent` options passed to `peer.settings.load_settings` (only those given)."""


def register(commands: Subcommands) -> None:
    """Add keygen and agent to the `grapevine` command line."""
    _add_keygen(commands)
    _add_agent(commands)


# --- keygen ------------------------------------------------------------------------------------


def _add_keygen(commands: Subcommands) -> None:
    keygen = add_command(
        commands,
        "keygen",
        "Print a new random 32-byte network key in base64. Every peer of a network needs the "
        "same key (or keyring); a peer without it can neither read nor inject traffic. Keep it "
        "secret: --output writes it to a new file readable only by you.",
        "  grapevine keygen --output network.key\n"
        "  (umask 077; grapevine keygen > network.key)   # a peer refuses a key others can read",
        parents=(json_option(),),
    )
    keygen.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        type=Path,
        help="write the key to PATH (created with mode 0600; an existing file is not touched)",
    )
    keygen.set_defaults(handler=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    key = encode_key(generate_network_key())
    output: Path | None = args.output
    if output is None:
        if sys.stdout.isatty():
            warn(args, "this is a secret; store it with `grapevine keygen --output network.key`")
        print(json.dumps({"key": key}) if args.json else key)
        return EXIT_OK
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return fail(args, f"{output} already exists; not overwriting a key", EXIT_FAILED)
    except OSError as exc:
        return fail(args, f"cannot create {output}: {exc.strerror}", EXIT_FAILED)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    if args.json:
        print(json.dumps({"path": str(output)}))
    print(f"wrote a new network key to {output}", file=sys.stderr)
    return EXIT_OK


# --- agent -------------------------------------------------------------------------------------


def _add_agent(commands: Subcommands) -> None:
    agent = add_command(
        commands,
        "agent",
        "Run a Grapevine peer: join the network through the --join seeds, gossip membership and "
        "tasks, host this peer's agents, and serve the local HTTP API the other commands use. "
        "It runs until Ctrl-C, SIGTERM or `grapevine leave`. Each option may also come "
        "from a GRAPEVINE_* environment variable (GRAPEVINE_BIND, GRAPEVINE_JOIN=a,b, ...) or "
        "the --config file; options win over the environment, which wins over the file.",
        "  grapevine agent --network-key-file network.key --bind 0.0.0.0:7946 \\\n"
        "      --join seed.example.org:7946\n"
        "  grapevine agent --config peer.toml",
    )
    suppress = argparse.SUPPRESS
    agent.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        default=None,
        help="TOML file with the peer's settings and its agents",
    )
    agent.add_argument(
        "--network-key-file",
        metavar="PATH",
        dest="network_key_file",
        default=suppress,
        help="file holding the network key or keyring (from `grapevine keygen`); required "
        "unless --insecure-dev",
    )
    agent.add_argument(
        "--bind",
        metavar="HOST:PORT",
        default=suppress,
        help="address the peer listens on for other peers (e.g. 0.0.0.0:7946)",
    )
    agent.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        default=suppress,
        help="address other peers should use to reach this one, when --bind is not it "
        "(NAT, 0.0.0.0)",
    )
    agent.add_argument(
        "--api",
        metavar="HOST:PORT",
        default=suppress,
        help=f"address of the local HTTP API (default {DEFAULT_API}; keep it on loopback: "
        "any other address needs --api-token-file)",
    )
    agent.add_argument(
        "--api-token-file",
        metavar="PATH",
        dest="api_token_file",
        default=suppress,
        help="file holding the API token clients must send (one line; the peers of one "
        "operator may share it); default: a token generated at first start in "
        "DATA_DIR/api.token, readable only by you",
    )
    agent.add_argument(
        "--data-dir",
        metavar="PATH",
        dest="data_dir",
        default=suppress,
        help="directory for the identity key, keyring and durable state",
    )
    agent.add_argument(
        "--join",
        metavar="HOST:PORT",
        action="append",
        default=suppress,
        help="seed peer to join through; repeat for several (a DNS name may have several "
        "addresses)",
    )
    agent.add_argument(
        "--profile",
        metavar="NAME",
        default=suppress,
        help="protocol timing preset: lan (default; as Serf's LAN profile), local (faster, "
        "for one machine) or wan (slow links, or many peers crowded on one host)",
    )
    agent.add_argument(
        "--insecure-dev",
        dest="insecure_dev",
        action="store_true",
        default=suppress,
        help="run without a network key file, for development on one machine only",
    )
    agent.add_argument(
        "--no-agents",
        dest="no_agents",
        action="store_true",
        default=suppress,
        help="take part in membership and gossip but host no agents (a seed or relay peer)",
    )
    agent.add_argument(
        "--log-level",
        metavar="LEVEL",
        dest="log_level",
        default=suppress,
        help="debug, info, warning or error",
    )
    agent.add_argument(
        "--log-format",
        metavar="FORMAT",
        dest="log_format",
        default=suppress,
        help="text (default) or json: one JSON object per line, task lifecycle fields as keys",
    )
    agent.add_argument(
        "--task-retention",
        metavar="DURATION",
        dest="task_retention",
        default=suppress,
        help="how long a finished task is kept whole before it is compacted to a tombstone: "
        "seconds, or a number with s, m, h or d (default 24h)",
    )
    agent.add_argument(
        "--tombstone-grace",
        metavar="DURATION",
        dest="tombstone_grace",
        default=suppress,
        help="how long a compacted task's tombstone is kept; its late objects are refused "
        "meanwhile, and a peer away for longer than retention + grace starts empty "
        "(default: the task retention)",
    )
    agent.add_argument(
        "--handlers",
        metavar="MODULE",
        action="append",
        default=[],
        help="Python module of roles to serve: every @peer.role function and peer.Agent at its "
        "top level (docs/python.md); imported from the current directory or sys.path; repeat, "
        "or give a comma-separated list, for several",
    )
    agent.set_defaults(handler=_agent)


def _agent(args: argparse.Namespace) -> int:
    # Imported here so client commands do not pay for the peer runtime's imports.
    from peer.cli.agent import main_agent
    from peer.settings import SettingsError, load_settings

    flags: dict[str, object] = {
        name: getattr(args, name) for name in _AGENT_FLAGS if hasattr(args, name)
    }
    try:
        settings = load_settings(flags, os.environ, args.config)
    except SettingsError as exc:
        return fail(args, str(exc), EXIT_USAGE)
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        wanted = "a directory for the peer's state (created if it does not exist)"
        return fail(args, not_a_directory(settings.data_dir, wanted), EXIT_USAGE)
    modules = [name.strip() for value in args.handlers for name in value.split(",")]
    served = None
    if any(modules):
        from peer.python_api.serving import ServeError, load_modules, settings_with

        try:
            served = load_modules([name for name in modules if name])
            settings = settings_with(settings, served)
        except ServeError as exc:
            return fail(args, f"--handlers: {exc}", EXIT_USAGE)
    try:
        return main_agent(settings, served.roles if served is not None else ())
    except OSError as exc:
        # An address in use, an unreadable data directory: the environment, not a bug.
        return fail(args, str(exc), EXIT_FAILED)
