"""The `grapevine` command: key generation, the peer agent, and clients of a peer's local API.

Invariants:
- A user mistake (bad flag, unreachable peer, refused request, bad settings) is reported as one
  line on stderr, "grapevine <command>: <what went wrong>", never as a traceback.
- Exit codes: 0 success, 1 the operation failed (peer unreachable, API problem, unhealthy peer),
  2 the command line or the settings are wrong, 130 interrupted by Ctrl-C.
- Every command that prints a table takes `--json`, which prints the API's own objects with the
  field names of docs/http-api.md, so scripts do not depend on the human layout.
- Client commands find the peer through `--api`, else `$GRAPEVINE_API`, else 127.0.0.1:8946.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import NoReturn

from peer.cli import render
from peer.cli import simulate as simulate_cmd
from peer.client import DEFAULT_API, ApiError, ClientError, GrapevineClient
from peer.demo import command as demo_cmd
from peer.runtime.sealing import decode_key, encode_key, generate_network_key

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_AGENT_FLAGS = (
    "network_key_file",
    "bind",
    "advertise",
    "api",
    "data_dir",
    "join",
    "profile",
    "insecure_dev",
    "no_agents",
    "log_level",
)
"""`grapevine agent` options passed to `peer.settings.load_settings` (only those given)."""

ClientCommand = Callable[[GrapevineClient, argparse.Namespace], Awaitable[int]]


class _Formatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            line
            if not line or line.startswith(" ")
            else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            for line in text.splitlines()
        )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line with a pointer to --help, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    """Run the `grapevine` command line.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.

    Returns:
        The process exit code (see the module docstring).
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Reported by the subcommand's parser, so the message names the command the user ran.
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`grapevine events --follow | head`); say nothing, and keep the
        # interpreter from complaining while it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every `grapevine` subcommand."""
    parser = _Parser(
        prog="grapevine",
        description="Grapevine: a peer-to-peer network of LLM agents. Every machine runs "
        "`grapevine agent`; the other commands talk to the local peer's HTTP API.",
        epilog="Start a network:\n"
        "  grapevine keygen --output network.key\n"
        "  grapevine agent --network-key-file network.key --bind 0.0.0.0:7946 \\\n"
        "      --join seed.example.org:7946\n"
        "  grapevine members\n\n"
        "Run `grapevine COMMAND --help` for a command's options.",
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    keygen = _command(
        commands,
        "keygen",
        "print a new network key",
        "Print a new random 32-byte network key in base64. Every peer of a network needs the "
        "same key (or keyring); a peer without it can neither read nor inject traffic. Keep it "
        "secret: --output writes it to a new file readable only by you.",
        "  grapevine keygen --output network.key\n  grapevine keygen > network.key",
    )
    keygen.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        type=Path,
        help="write the key to PATH (created with mode 0600; an existing file is not touched)",
    )
    keygen.set_defaults(handler=_keygen)

    _add_agent(commands)
    _add_client_commands(commands)
    # Imported here, not at the top: peer.cli.tasks builds on this module's helpers.
    from peer.cli import tasks as cli_tasks

    cli_tasks.register(commands)

    simulate = _command(
        commands,
        "simulate",
        "run the real protocol on a simulated network",
        "Run many peers' protocol code on a deterministic simulated network (virtual clock, "
        "seeded loss and partitions) and report convergence and failure-detection figures.",
        "  grapevine simulate --nodes 1000 --loss 0.2 --partition 30s",
    )
    simulate_cmd.add_arguments(simulate)
    simulate.set_defaults(handler=simulate_cmd.run)

    demo = _command(
        commands,
        "demo",
        "run a local network of agent peers on one job, end to end",
        "Start 3 local peers (separate processes, a fresh network key, temporary data "
        "directories) hosting a boss, admins and workers; submit one job that the boss splits "
        "among admins and the admins among workers; show live progress, then the answer, the "
        "task tree (which peer and agent ran each node), token counts and an audit line. The "
        "offline model needs no network or key; --model takes any litellm model string. The "
        "peers are stopped on exit and on Ctrl-C.",
        "  grapevine demo\n  grapevine demo --json | jq .audit\n"
        "  OPENAI_API_KEY=... grapevine demo --model openai/gpt-4o-mini",
    )
    demo_cmd.add_arguments(demo)
    demo.set_defaults(handler=demo_cmd.run)
    return parser


def _command(
    commands: argparse._SubParsersAction[_Parser],
    name: str,
    summary: str,
    description: str,
    examples: str = "",
    parents: Sequence[_Parser] = (),
) -> _Parser:
    parser = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=f"examples:\n{examples}" if examples else None,
        formatter_class=_Formatter,
        parents=list(parents),
    )
    parser.set_defaults(prog=parser.prog, parser=parser)
    return parser


# --- keygen ------------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    key = encode_key(generate_network_key())
    output: Path | None = args.output
    if output is None:
        if sys.stdout.isatty():
            _warn(args, "this is a secret; store it with `grapevine keygen --output network.key`")
        print(key)
        return EXIT_OK
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _fail(args, f"{output} already exists; not overwriting a key", EXIT_FAILED)
    except OSError as exc:
        return _fail(args, f"cannot create {output}: {exc.strerror}", EXIT_FAILED)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    print(f"wrote a new network key to {output}", file=sys.stderr)
    return EXIT_OK


# --- agent -------------------------------------------------------------------------------------


def _add_agent(commands: argparse._SubParsersAction[_Parser]) -> None:
    agent = _command(
        commands,
        "agent",
        "run a peer (and its agents) until stopped",
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
        help=f"address of the local HTTP API (default {DEFAULT_API}; keep it on loopback)",
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
        return _fail(args, str(exc), EXIT_USAGE)
    try:
        return main_agent(settings)
    except OSError as exc:
        # An address in use, an unreadable data directory: the environment, not a bug.
        return _fail(args, str(exc), EXIT_FAILED)


# --- client commands ---------------------------------------------------------------------------


def _add_client_commands(commands: argparse._SubParsersAction[_Parser]) -> None:
    api = _Parser(add_help=False)
    api.add_argument(
        "--api",
        metavar="HOST:PORT",
        default=None,
        help=f"the peer's API address (default: $GRAPEVINE_API, else {DEFAULT_API})",
    )
    as_json = _Parser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", help="print JSON with the API's field names"
    )
    both = (api, as_json)

    members = _command(
        commands,
        "members",
        "list the members this peer knows",
        'List every member the local peer knows, itself included (marked "(self)"), with its '
        "status: alive, suspect (failing probes), dead (declared failed) or left (gracefully).",
        "  grapevine members\n  grapevine members --json | jq '.[] | select(.status == \"alive\")'",
        both,
    )
    _client(members, _members)

    leave = _command(
        commands,
        "leave",
        "make the peer leave the network and exit",
        "Ask the local peer to leave gracefully: it tells the network it is leaving (others "
        'mark it "left", not dead), then its process exits with status 0.',
        "  grapevine leave --api 127.0.0.1:8946",
        (api,),
    )
    _client(leave, _leave)

    event = _command(
        commands,
        "event",
        "broadcast a user event to every peer",
        "Broadcast a named user event with an optional UTF-8 payload to every peer in the "
        "network, as Serf's user events do. Delivery is best-effort gossip; every peer lists "
        "what it received with `grapevine events`.",
        "  grapevine event deploy v1.2.3\n  grapevine event ping",
        (api,),
    )
    event.add_argument("name", metavar="NAME", help="the event's name")
    event.add_argument(
        "payload", metavar="PAYLOAD", nargs="?", default="", help="the event's payload text"
    )
    _client(event, _event)

    events = _command(
        commands,
        "events",
        "show user events and membership changes",
        "Show what the local peer received: user events and membership changes (joined, "
        "suspected, down, left, recovered). Without --follow, the recent buffer; with it, "
        "new ones as they arrive until Ctrl-C. --json prints one JSON object per line.",
        "  grapevine events --follow\n  grapevine events --json",
        both,
    )
    events.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new events as they arrive"
    )
    _client(events, _events)

    self_ = _command(
        commands,
        "self",
        "show the local peer's identity",
        "Show the local peer's node id, addresses, incarnation, network id and version.",
        "  grapevine self --json",
        both,
    )
    _client(self_, _self)

    health = _command(
        commands,
        "health",
        "check that the local peer is up",
        'Print the local peer\'s health. Exits 0 when it is "ok", 1 when it is leaving or '
        "cannot be reached, so it suits health checks and scripts.",
        "  grapevine health || restart-peer",
        both,
    )
    _client(health, _health)

    metrics = _command(
        commands,
        "metrics",
        "show the local peer's traffic counters",
        "Show the local peer's counters: messages and bytes in and out, dropped messages, "
        "traffic rejected by reason (e.g. sealed with an unknown network key), signature checks.",
        "  grapevine metrics --json",
        both,
    )
    _client(metrics, _metrics)

    keys = _command(
        commands,
        "keys",
        "inspect or rotate the network keyring",
        "Inspect or change the local peer's keyring. To rotate a network's key without "
        "downtime: `keys install NEW` on every peer, then `keys use NEW` on every peer, then "
        "`keys remove OLD` on every peer. KEY is base64 as `grapevine keygen` prints it, or "
        '"-" to read it from stdin (keeps it out of the process list). Keys are sent to the '
        "peer only; listings show key ids, never keys.",
        "  grapevine keys list\n  grapevine keygen | grapevine keys install -",
    )
    keys.set_defaults(handler=lambda args: _usage(args, "choose list, install, use or remove"))
    actions: argparse._SubParsersAction[_Parser] = keys.add_subparsers(
        title="actions", metavar="ACTION"
    )
    keys_list = _command(
        actions,
        "list",
        "show the primary and accepted key ids",
        "Show the key ids of the "
        "primary key (seals outgoing traffic) and of the accepted keys (also open incoming).",
        parents=both,
    )
    _client(keys_list, _keys_list)
    for action, summary in (
        ("install", "accept traffic sealed with KEY (rotation step 1)"),
        ("use", "seal outgoing traffic with the installed KEY (rotation step 2)"),
        ("remove", "stop accepting KEY (rotation step 3; not the primary)"),
    ):
        sub = _command(
            actions, action, summary, summary[0].upper() + summary[1:] + ".", parents=(api,)
        )
        sub.add_argument("key", metavar="KEY", help="base64 key, or - to read it from stdin")
        sub.set_defaults(action=action)
        _client(sub, _keys_change)


def _client(parser: argparse.ArgumentParser, command: ClientCommand) -> None:
    parser.set_defaults(handler=lambda args: _run_client(args, command))


def _run_client(args: argparse.Namespace, command: ClientCommand) -> int:
    api = args.api or os.environ.get("GRAPEVINE_API") or DEFAULT_API
    try:
        client = GrapevineClient(api)
    except ValueError as exc:
        return _fail(args, str(exc), EXIT_USAGE)

    async def run() -> int:
        async with client:
            return await command(client, args)

    try:
        return asyncio.run(run())
    except ClientError as exc:
        return _fail(
            args, f"{exc}; is `grapevine agent` running? (set --api or GRAPEVINE_API)", EXIT_FAILED
        )
    except ApiError as exc:
        return _fail(args, f"{exc.title}: {exc.detail}" if exc.detail else exc.title, EXIT_FAILED)


async def _members(client: GrapevineClient, args: argparse.Namespace) -> int:
    members = await client.members()
    print(render.as_json(members) if args.json else render.members_table(members))
    return EXIT_OK


async def _leave(client: GrapevineClient, args: argparse.Namespace) -> int:
    await client.leave()
    print(f"the peer at {client.api} is leaving the network; it exits once others know")
    return EXIT_OK


async def _event(client: GrapevineClient, args: argparse.Namespace) -> int:
    answer = await client.send_event(args.name, args.payload)
    print(
        f"sent event {args.name} (origin {render.short(answer.get('origin'))}, "
        f"ltime {answer.get('ltime')})"
    )
    return EXIT_OK


async def _events(client: GrapevineClient, args: argparse.Namespace) -> int:
    async for event in client.events(follow=args.follow):
        line = json.dumps(event, sort_keys=True) if args.json else render.event_line(event)
        print(line, flush=True)
    if args.follow:
        return _fail(args, "the peer ended the event stream", EXIT_FAILED)
    return EXIT_OK


async def _self(client: GrapevineClient, args: argparse.Namespace) -> int:
    info = await client.self_info()
    print(render.as_json(info) if args.json else render.self_table(info))
    return EXIT_OK


async def _health(client: GrapevineClient, args: argparse.Namespace) -> int:
    health = await client.health()
    print(render.as_json(health) if args.json else render.health_line(health))
    return EXIT_OK if health.get("status") == "ok" else EXIT_FAILED


async def _metrics(client: GrapevineClient, args: argparse.Namespace) -> int:
    metrics = await client.metrics()
    print(render.as_json(metrics) if args.json else render.metrics_table(metrics))
    return EXIT_OK


async def _keys_list(client: GrapevineClient, args: argparse.Namespace) -> int:
    keyring = await client.keys()
    print(render.as_json(keyring) if args.json else render.keyring_table(keyring))
    return EXIT_OK


async def _keys_change(client: GrapevineClient, args: argparse.Namespace) -> int:
    text = sys.stdin.readline() if args.key == "-" else args.key
    try:
        key = encode_key(decode_key(text))
    except ValueError as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    change = {"install": client.install_key, "use": client.use_key, "remove": client.remove_key}
    print(render.keyring_table(await change[args.action](key)))
    return EXIT_OK


def _warn(args: argparse.Namespace, message: str) -> None:
    print(f"{args.prog}: warning: {message}", file=sys.stderr)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"{args.prog}: {message}", file=sys.stderr)
    return code


def _usage(args: argparse.Namespace, message: str) -> int:
    return _fail(args, f"{message} (see `{args.prog} --help`)", EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
