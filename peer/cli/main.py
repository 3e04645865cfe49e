"""The `grapevine` command: the parser assembled from the command groups, and `main`.

Each command group registers its own subcommands: `launch` (keygen, agent), `network` (members,
agents, join, leave, event, events, self, health, metrics, keys), `status` (the fleet
overview), `tasks` (submit, tasks, task, tree, result, cancel), `watch`, `simulate` and `demo`.
`peer.cli.catalog` names them all with their summaries, so a command line imports only the
group of the command it runs. What they share, the exit codes and the one-line error messages
included, is in `peer.cli.common`.

Invariants:
- `main` never lets an exception out as a traceback for Ctrl-C (exit 130) or a closed stdout
  (`grapevine events --follow | head`, exit 1); every other outcome is the handler's exit code.
- An option the chosen subcommand does not know is reported by that subcommand's parser, so the
  message names the command the user ran. With no command, the help goes to stderr, exit 2.
- `--help` lists the commands in the order of `peer.cli.catalog`.
- `console` (the installed `grapevine`, and `python -m peer.cli`) ends a process whose work
  left nothing for the interpreter's teardown (argparse's own exits: help, version, usage
  errors; and every client command, `quick_exit` in its namespace) with `os._exit` once stdout
  and stderr are flushed: tearing down a hundred modules costs about 30 ms, a fifth of a client
  command's budget (issue 13). `agent`, `demo` and `simulate` exit normally (their threads,
  logs and exit handlers). `main` itself never exits the process: tests call it in-process.
- Building the parser imports no HTTP server, rich, simulator or litellm: what a command needs
  beyond that is imported when it runs (tests/peer/test_cli_imports.py holds the line). `main`
  imports only the group of the command it runs; `--help` imports none.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Collection
from typing import NoReturn

from peer.cli import catalog
from peer.cli.parsing import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, ParagraphFormatter, Parser
from peer.version import installed_version


class _Progress:
    """How far `_main` got, for `console`'s choice of exit."""

    __slots__ = ("handler_ran", "quick_exit")

    def __init__(self) -> None:
        self.handler_ran = False
        self.quick_exit = False


def console() -> NoReturn:
    """The `grapevine` command: `main` on `sys.argv`, then exit with its code; quickly where the
    module invariants allow."""
    progress = _Progress()
    try:
        code = _main(sys.argv[1:], progress)
    except SystemExit as exc:
        if progress.handler_ran or not (exc.code is None or isinstance(exc.code, int)):
            raise
        _exit_now(exc.code or 0)  # argparse's: its help, version or usage line is printed
    if progress.quick_exit:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> NoReturn:
    """Flush what the command printed, then end the process without the interpreter's
    teardown. A reader that went away (`| head`) gets what fit, as in `main`."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = code or EXIT_FAILED
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the `grapevine` command line.

    Args:
        argv: the arguments after the program name; `sys.argv[1:]` when None.

    Returns:
        The process exit code (see `peer.cli.common`).
    """
    return _main(sys.argv[1:] if argv is None else argv, _Progress())


def _main(argv: list[str], progress: _Progress) -> int:
    parser = build_parser(catalog.groups_for(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Reported by the subcommand's parser, so the message names the command the user ran.
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    progress.handler_ran = True
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
        progress.quick_exit = bool(getattr(args, "quick_exit", False))
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`grapevine events --follow | head`); say nothing, and keep the
        # interpreter from complaining while it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


def build_parser(groups: Collection[str] | None = None) -> argparse.ArgumentParser:
    """Return the parser of `grapevine`.

    Args:
        groups: the command groups (modules, `peer.cli.catalog`) whose commands get their whole
            parsers; their group modules alone are imported. Every other command is listed by
            name and summary only when no group is asked for (`grapevine --help`, a mistyped
            command: the list and "did you mean" need the names), and left out when one is (a
            command line that runs a known command needs no other: each name costs a parser).
            None: all of them.
    """
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
    registered: set[str] = set()
    for name, (group, summary) in catalog.COMMANDS.items():
        if groups is not None and group not in groups:
            if not groups:
                commands.add_parser(name, help=summary)  # listed, and known to "did you mean"
        elif group not in registered:
            importlib.import_module(group).register(commands)  # all its commands, in order
            registered.add(group)
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


if __name__ == "__main__":
    console()
