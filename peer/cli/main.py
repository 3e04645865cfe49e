"""The `grapevine` command: the parser assembled from the command groups, and `main`.

Each command group registers its own subcommands: `launch` (keygen, agent), `network` (members,
agents, join, leave, event, events, self, health, metrics, keys), `status` (the fleet
overview), `tasks` (submit, tasks, task,
tree, result, cancel), `simulate`, and the demo (options `peer.demo.options`, run by
`peer.demo.command`). What they share, the exit codes and the one-line error messages included,
is in `peer.cli.common`.

Invariants:
- `main` never lets an exception out as a traceback for Ctrl-C (exit 130) or a closed stdout
  (`grapevine events --follow | head`, exit 1); every other outcome is the handler's exit code.
- An option the chosen subcommand does not know is reported by that subcommand's parser, so the
  message names the command the user ran. With no command, the help goes to stderr, exit 2.
- `--help` lists the commands in the order they are registered here.
- Building the parser imports no HTTP server, rich, simulator or litellm: what a command needs
  beyond that is imported when it runs (tests/peer/test_cli_imports.py holds the line).
"""

from __future__ import annotations

import argparse
import os
import sys

from peer.cli import launch, network, simulate, status, tasks, watch
from peer.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ParagraphFormatter,
    Parser,
    Subcommands,
    add_command,
)
from peer.demo import options as demo_options
from peer.version import installed_version


def main(argv: list[str] | None = None) -> int:
    """Run the `grapevine` command line.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.

    Returns:
        The process exit code (see `peer.cli.common`).
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
    parser = Parser(
        prog="grapevine",
        description="Grapevine: a peer-to-peer network of LLM agents. Every machine runs "
        "`grapevine agent`; the other commands talk to the local peer's HTTP API.",
        epilog="Start a network:\n"
        "  grapevine keygen --output network.key\n"
        "  grapevine agent --network-key-file network.key --bind 0.0.0.0:7946 \\\n"
        "      --join seed.example.org:7946\n"
        "  grapevine members\n\n"
        "Run `grapevine COMMAND --help` for a command's options.",
        formatter_class=ParagraphFormatter,
    )
    parser.add_argument("--version", action=PrintVersion)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    launch.register(commands)
    network.register(commands)
    status.register(commands)
    tasks.register(commands)
    watch.register(commands)
    simulate.register(commands)
    _register_demo(commands)
    return parser


class PrintVersion(argparse.Action):
    """`--version`: print "grapevine VERSION" (the installed one) and exit 0; the version is
    read only then (`peer.version`), so building the parser stays cheap."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="print the installed version and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"grapevine {installed_version()}")
        parser.exit()


def _register_demo(commands: Subcommands) -> None:
    demo = add_command(
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
    demo_options.add_arguments(demo)
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from peer.demo.command import run  # the demo's processes and live view: loaded to run it

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
