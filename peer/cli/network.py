"""The commands about the local peer and its network: members, agents, join, leave, event,
events, self, health, metrics and keys.

Invariants:
- Each is a client of the local peer's API (`common.client_command`); none changes anything but
  through that API.
- A command that shows one API object prints it with `--json` exactly as the API sent it, and
  otherwise through its `render` function; `_show` is that rule, written once.
- Keys given on the command line or stdin are checked and normalised here, sent to the peer only,
  and never printed; listings show key ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from peer.cli import render
from peer.cli.common import ClientCommand, api_option, client_command, fail, json_option, usage
from peer.cli.parsing import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Subcommands, add_command
from peer.client import GrapevineClient, JsonObject

Shown = TypeVar("Shown")


def register(commands: Subcommands) -> None:
    """Add members, agents, join, leave, event, events, self, health, metrics and keys to
    `grapevine`."""
    api = api_option()
    both = (api, json_option())

    members = add_command(
        commands,
        "members",
        'List every member the local peer knows, itself included (marked "(self)"), with its '
        "status: alive, suspect (failing probes), dead (declared failed) or left (gracefully).",
        "  grapevine members\n  grapevine members --json | jq '.[] | select(.status == \"alive\")'",
        both,
    )
    client_command(members, _show(GrapevineClient.members, render.members_table))

    agents = add_command(
        commands,
        "agents",
        "List the agents the local peer hosts: their roles, model, running and maximum "
        "concurrent tasks, suspended tasks (waiting on their children) and idle time; then the "
        "roles the peer serves. A peer without agents (--no-agents, or none configured) lists "
        "its built-in roles.",
        "  grapevine agents\n  grapevine agents --json | jq .roles",
        both,
    )
    client_command(agents, _show(GrapevineClient.agents, render.agents_table))

    join = add_command(
        commands,
        "join",
        "Ask the local peer to join the network through more seed peers (host:port, the "
        "address another peer's `grapevine agent --bind` or --advertise gave), as --join does "
        "at start: it contacts them at once and says which answered; it keeps every seed and "
        "retries it on its own, as for the seeds it started with. Exits 1 if none answered.",
        "  grapevine join 10.0.0.7:7946\n  grapevine join seed-a.example.org seed-b.example.org",
        both,
    )
    join.add_argument("seeds", metavar="ADDR", nargs="+", help="a seed's gossip address, host:port")
    client_command(join, _join)

    leave = add_command(
        commands,
        "leave",
        "Ask the local peer to leave gracefully: it tells the network it is leaving (others "
        'mark it "left", not dead), then its process exits with status 0.',
        "  grapevine leave --api 127.0.0.1:8946",
        both,
    )
    client_command(leave, _leave)

    event = add_command(
        commands,
        "event",
        "Broadcast a named user event with an optional UTF-8 payload to every peer in the "
        "network, as Serf's user events do. Delivery is best-effort gossip; every peer lists "
        "what it received with `grapevine events`.",
        "  grapevine event deploy v1.2.3\n  grapevine event ping",
        both,
    )
    event.add_argument("name", metavar="NAME", help="the event's name")
    event.add_argument(
        "payload", metavar="PAYLOAD", nargs="?", default="", help="the event's payload text"
    )
    client_command(event, _event)

    events = add_command(
        commands,
        "events",
        "Show what the local peer received: user events and membership changes (joined, "
        "suspected, down, left, recovered). Without --follow, the recent buffer; with it, "
        "new ones as they arrive until Ctrl-C. --json prints one JSON object per line.",
        "  grapevine events --follow\n  grapevine events --json",
        both,
    )
    events.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new events as they arrive"
    )
    client_command(events, _events)

    self_ = add_command(
        commands,
        "self",
        "Show the local peer's node id, addresses, incarnation, network id and version.",
        "  grapevine self --json",
        both,
    )
    client_command(self_, _show(GrapevineClient.self_info, render.self_table))

    health = add_command(
        commands,
        "health",
        'Print the local peer\'s health. Exits 0 when it is "ok", 1 when it is leaving or '
        "cannot be reached, so it suits health checks and scripts.",
        "  grapevine health || restart-peer",
        both,
    )
    client_command(health, _show(GrapevineClient.health, render.health_line, _healthy))

    metrics = add_command(
        commands,
        "metrics",
        "Show the local peer's counters: messages and bytes in and out, dropped messages, "
        "traffic rejected by reason (e.g. sealed with an unknown network key), signature checks.",
        "  grapevine metrics --json",
        both,
    )
    client_command(metrics, _show(GrapevineClient.metrics, render.metrics_table))

    keys = add_command(
        commands,
        "keys",
        "Inspect or change the local peer's keyring. To rotate a network's key without "
        "downtime: `keys install NEW` on every peer, then `keys use NEW` on every peer, then "
        "`keys remove OLD` on every peer. KEY is base64 as `grapevine keygen` prints it, or "
        '"-" to read it from stdin (keeps it out of the process list). Keys are sent to the '
        "peer only; listings show key ids, never keys.",
        "  grapevine keys list\n  grapevine keygen | grapevine keys install -",
    )
    keys.set_defaults(handler=lambda args: usage(args, "choose list, install, use or remove"))
    actions: Subcommands = keys.add_subparsers(title="actions", metavar="ACTION")
    keys_list = add_command(
        actions,
        "list",
        "Show the key ids of the "
        "primary key (seals outgoing traffic) and of the accepted keys (also open incoming).",
        parents=both,
        summary="show the primary and accepted key ids",
    )
    client_command(keys_list, _show(GrapevineClient.keys, render.keyring_table))
    for action, summary in (
        ("install", "accept traffic sealed with KEY (rotation step 1)"),
        ("use", "seal outgoing traffic with the installed KEY (rotation step 2)"),
        ("remove", "stop accepting KEY (rotation step 3; not the primary)"),
    ):
        sub = add_command(
            actions, action, summary[0].upper() + summary[1:] + ".", parents=both, summary=summary
        )
        sub.add_argument("key", metavar="KEY", help="base64 key, or - to read it from stdin")
        sub.set_defaults(action=action)
        client_command(sub, _keys_change)


def _show(
    fetch: Callable[[GrapevineClient], Awaitable[Shown]],
    human: Callable[[Shown], str],
    succeeded: Callable[[Shown], bool] = lambda _: True,
) -> ClientCommand:
    """A command that prints what `fetch` returns: as JSON with `--json`, else via `human`.

    It exits 0 when `succeeded` holds for the value, else 1 (`health` of a peer that is leaving).
    """

    async def command(client: GrapevineClient, args: argparse.Namespace) -> int:
        value = await fetch(client)
        print(render.as_json(value) if args.json else human(value))
        return EXIT_OK if succeeded(value) else EXIT_FAILED

    return command


async def _join(client: GrapevineClient, args: argparse.Namespace) -> int:
    answer = await client.join(args.seeds)
    print(render.as_json(answer) if args.json else f"joined through {answer.get('joined')}")
    return EXIT_OK


async def _leave(client: GrapevineClient, args: argparse.Namespace) -> int:
    answer = await client.leave()
    if args.json:
        print(render.as_json(answer))
    else:
        print(f"the peer at {client.api} is leaving the network; it exits once others know")
    return EXIT_OK


async def _event(client: GrapevineClient, args: argparse.Namespace) -> int:
    answer = await client.send_event(args.name, args.payload)
    if args.json:
        print(render.as_json(answer))
        return EXIT_OK
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
        return fail(args, "the peer ended the event stream", EXIT_FAILED)
    return EXIT_OK


def _healthy(health: JsonObject) -> bool:
    return health.get("status") == "ok"


async def _keys_change(client: GrapevineClient, args: argparse.Namespace) -> int:
    from peer.runtime.keyring import decode_key, encode_key  # only for the keys commands

    text = sys.stdin.readline() if args.key == "-" else args.key
    try:
        key = encode_key(decode_key(text))
    except ValueError as exc:
        return fail(args, str(exc), EXIT_USAGE)
    change = {"install": client.install_key, "use": client.use_key, "remove": client.remove_key}
    keyring = await change[args.action](key)
    print(render.as_json(keyring) if args.json else render.keyring_table(keyring))
    return EXIT_OK
