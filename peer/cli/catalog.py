"""Every `grapevine` command by name: the module of the group that registers it, and its summary.

Why a catalog: `grapevine --help` lists every command, but running one should import only its
own group (`peer.cli.main.build_parser`): the others cost a third of the CLI's start-up for
nothing (issue 13: `--help` and the client commands answer in under 150 ms). So the list of
commands and their one-line summaries live here, in a module that imports nothing.

Invariants:
- The order here is the order of `grapevine --help`. A group's commands are next to each other
  and in the order its `register` adds them (tests/peer/test_cli_catalog.py holds both).
- A top-level command's summary is written only here: `add_command` looks it up by name.
"""

from __future__ import annotations

from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "keygen": ("peer.cli.launch", "print a new network key"),
    "agent": ("peer.cli.launch", "run a peer (and its agents) until stopped"),
    "members": ("peer.cli.network", "list the members this peer knows"),
    "agents": ("peer.cli.network", "list the local peer's agents and the roles it serves"),
    "join": ("peer.cli.network", "make the running peer join more seeds"),
    "leave": ("peer.cli.network", "make the peer leave the network and exit"),
    "event": ("peer.cli.network", "broadcast a user event to every peer"),
    "events": ("peer.cli.network", "show user events and membership changes"),
    "self": ("peer.cli.network", "show the local peer's identity"),
    "health": ("peer.cli.network", "check that the local peer is up"),
    "metrics": ("peer.cli.network", "show the local peer's traffic counters"),
    "keys": ("peer.cli.network", "inspect or rotate the network keyring"),
    "status": ("peer.cli.status", "show the fleet at a glance: members, tasks, agents, spend"),
    "submit": ("peer.cli.tasks", "submit a task (or a file of tasks) and wait for the result"),
    "tasks": ("peer.cli.tasks", "list the tasks the local peer knows, or the whole network's"),
    "task": ("peer.cli.tasks", "show one task"),
    "tree": ("peer.cli.tasks", "show a task and the tasks it delegated"),
    "result": ("peer.cli.tasks", "print a task's accepted result"),
    "cancel": ("peer.cli.tasks", "cancel a task wherever it runs"),
    "watch": ("peer.cli.watch", "follow a task and the tasks it delegates as they run"),
    "simulate": ("peer.cli.simulate", "run the real protocol on a simulated network"),
    "demo": ("peer.cli.demo", "run a local network of agent peers on one job, end to end"),
}
"""Command name -> (module of its group, which has `register(commands)`; one-line summary)."""


def summary(name: str) -> str:
    """The one-line summary of the top-level command `name` (KeyError: not in the catalog)."""
    return COMMANDS[name][1]


def groups_for(argv: Sequence[str]) -> set[str]:
    """The group modules a command line needs in full: the group of the command it runs.

    `grapevine`'s own options (`--help`, `--version`) take no value, so the command, if any, is
    the first word; anything else (no command, an unknown word) needs the names only.
    """
    if argv and argv[0] in COMMANDS:
        return {COMMANDS[argv[0]][0]}
    return set()
