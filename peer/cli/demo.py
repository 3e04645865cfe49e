"""`grapevine demo`: its options (`peer.demo.options`); the run itself (`peer.demo.command`,
processes and a live view) is imported only when the demo runs."""

from __future__ import annotations

import argparse

from peer.cli.parsing import Subcommands, add_command
from peer.demo import options as demo_options


def register(commands: Subcommands) -> None:
    """Add `demo` to the `grapevine` command line."""
    demo = add_command(
        commands,
        "demo",
        "Start 3 local peers (separate processes, a fresh network key, temporary data "
        "directories) hosting a boss, admins and workers; submit one job that the boss splits "
        "among admins and the admins among workers; show live progress, then the answer, the "
        "task tree (which peer and agent ran each node), token counts and an audit line. The "
        "offline model needs no network or key; --model takes any litellm model string. The "
        "peers are stopped on exit and on Ctrl-C.",
        "  grapevine demo\n  grapevine demo --json | jq .audit\n"
        "  OPENAI_API_KEY=... grapevine demo --model openai/gpt-4o-mini",
    )
    demo_options.add_arguments(demo)
    demo.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from peer.demo.command import run

    return run(args)
