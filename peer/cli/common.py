"""What every `grapevine` command group shares: the parser, exit codes, messages, the API client.

Invariants:
- A user mistake (bad flag, unreachable peer, refused request, bad settings) is reported as one
  line on stderr, "grapevine <command>: <what went wrong>", never as a traceback: `fail`,
  `usage` and `warn` are the only writers of such lines, and `Parser.error` writes the same shape.
- Flags are never abbreviated (`--rol` is not `--role`: every parser is made with
  `allow_abbrev=False`), and a mistyped command, choice or flag gets a "did you mean" for the
  closest known one (`difflib`).
- Exit codes: 0 success, 1 the operation failed (peer unreachable, API problem, unhealthy peer),
  2 the command line or the settings are wrong, 130 interrupted by Ctrl-C.
- Every command that prints takes `--json` (`json_option`), which prints the API's own objects
  with the field names of docs/http-api.md, so scripts do not depend on the human layout.
- Client commands find the peer through `--api` (`api_option`), else `$GRAPEVINE_API`, else
  127.0.0.1:8946, and its API token through `--token-file`, `--data-dir` or the places
  `peer.api_token.find_token` looks; they run through `client_command`, which turns a refused
  connection or an API problem into exit 1, a bad address or token file into exit 2, a 401
  into a line saying how to pass the token, and a gossip port given as the API into a line
  saying so.
- Importing this module (and the command groups) loads no HTTP server, rich, simulator or
  litellm: `grapevine --help` and the client commands stay fast (tests/peer/test_cli_imports.py).
- Every subcommand's namespace carries `prog` ("grapevine members") and `parser`, set by
  `add_command`, so messages name the command the user ran.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from peer.api_token import TOKEN_HELP, TokenError
from peer.client import DEFAULT_API, ApiError, ClientError, GrapevineClient, WrongPort

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

ClientCommand = Callable[[GrapevineClient, argparse.Namespace], Awaitable[int]]
"""A command that talks to the local peer: given an open client and the parsed arguments, it
prints its answer and returns the exit code."""


class ParagraphFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            line
            if not line or line.startswith(" ")
            else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            for line in text.splitlines()
        )


_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<word>[^']*)'")
_UNRECOGNIZED = "unrecognized arguments: "


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes no abbreviated flag and whose errors are one line, with a
    "did you mean" when a known word is close, and a pointer to --help, not a usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = self.suggestion(message)
        hint = f"; did you mean {hint}?" if hint else ""
        self.exit(EXIT_USAGE, f"{self.prog}: {message}{hint} (see `{self.prog} --help`)\n")

    def suggestion(self, message: str) -> str | None:
        """The known command, choice or flag closest to the mistyped one `message` names."""
        match = _INVALID_CHOICE.search(message)
        if match is not None:
            word = match.group("word")
            known = [str(c) for a in self._actions if a.choices for c in a.choices]
        elif message.startswith(_UNRECOGNIZED):
            flags = [w for w in message.removeprefix(_UNRECOGNIZED).split() if w.startswith("-")]
            if not flags:
                return None
            word = flags[0].partition("=")[0]
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        else:
            return None
        close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
        return f"{close[0]!r}" if close else None


Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"
"""Where a command group adds its subcommands (`Parser.add_subparsers`)."""


def add_command(
    commands: Subcommands,
    name: str,
    summary: str,
    description: str,
    examples: str = "",
    parents: Sequence[Parser] = (),
) -> Parser:
    """Add the subcommand `name` and return its parser.

    Args:
        commands: the group of subcommands to add it to.
        name: the word the user types.
        summary: one line for the list of commands.
        description: the paragraph of its `--help`.
        examples: indented command lines shown under "examples:" in its `--help`.
        parents: option parsers it shares with other commands (`api_option`, `json_option`).

    Returns:
        The subcommand's parser; its namespace carries `prog` and `parser`.
    """
    parser = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=f"examples:\n{examples}" if examples else None,
        formatter_class=ParagraphFormatter,
        parents=list(parents),
    )
    parser.set_defaults(prog=parser.prog, parser=parser)
    return parser


def api_option() -> Parser:
    """A parent parser holding `--api HOST:PORT` and the token options (`--token-file`,
    `--data-dir`), for every command that talks to a peer."""
    parser = Parser(add_help=False)
    parser.add_argument(
        "--api",
        metavar="HOST:PORT",
        default=None,
        help=f"the peer's API address (default: $GRAPEVINE_API, else {DEFAULT_API})",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        type=Path,
        default=None,
        help="file holding the peer's API token (default: $GRAPEVINE_API_TOKEN, else "
        "$GRAPEVINE_API_TOKEN_FILE, else api.token in the peer's data directory)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="PATH",
        type=Path,
        default=None,
        help="the peer's data directory, whose api.token to send (default: "
        "$GRAPEVINE_DATA_DIR, else ./grapevine-data, as for `grapevine agent`)",
    )
    return parser


def json_option() -> Parser:
    """A parent parser holding `--json`, for every command that prints an API object."""
    parser = Parser(add_help=False)
    parser.add_argument("--json", action="store_true", help="print JSON with the API's field names")
    return parser


def client_command(parser: argparse.ArgumentParser, command: ClientCommand) -> None:
    """Make `command` the handler of `parser`, run with a client of the peer `--api` names."""
    parser.set_defaults(handler=lambda args: _run_client(args, command))


def _run_client(args: argparse.Namespace, command: ClientCommand) -> int:
    """Run `command` with a client of the peer API `args.api` names; return its exit code.

    A bad address exits 2; an unreachable peer or a problem the API answered exits 1, each as
    one line on stderr.
    """
    api = args.api or os.environ.get("GRAPEVINE_API") or DEFAULT_API
    if args.data_dir is not None and args.data_dir.exists() and not args.data_dir.is_dir():
        wanted = "the peer's data directory (whose api.token is sent)"
        return fail(args, not_a_directory(args.data_dir, wanted), EXIT_USAGE)
    try:
        client = GrapevineClient(api, data_dir=args.data_dir, token_file=args.token_file)
    except ValueError as exc:
        return fail(args, str(exc), EXIT_USAGE)

    async def run() -> int:
        async with client:
            return await command(client, args)

    try:
        # loaded by the commands that talk to a peer, not by `--help`
        from peer.interrupts import run_interruptible

        return run_interruptible(run())
    except TokenError as exc:
        return fail(args, f"{exc}; {TOKEN_HELP}", EXIT_USAGE)
    except WrongPort as exc:
        return fail(args, str(exc), EXIT_USAGE)
    except ClientError as exc:
        return fail(
            args, f"{exc}; is `grapevine agent` running? (set --api or GRAPEVINE_API)", EXIT_FAILED
        )
    except ApiError as exc:
        if exc.status == 401:
            return fail(args, _unauthorized(client.token_source), EXIT_FAILED)
        return fail(args, f"{exc.title}: {exc.detail}" if exc.detail else exc.title, EXIT_FAILED)


def not_a_directory(path: Path, wanted: str) -> str:
    """The line for a --data-dir that names a file; `wanted` says what to give instead."""
    return f"--data-dir {path} is a file, not a directory; give {wanted}"


def _unauthorized(source: str | None) -> str:
    """The line for a 401: which token was refused, or that none was found, and what to do."""
    if source is None:
        return f"the peer wants its API token and none was found; {TOKEN_HELP}"
    return f"the peer refused the API token from {source}; {TOKEN_HELP}"


def warn(args: argparse.Namespace, message: str) -> None:
    """Print "<prog>: warning: <message>" on stderr."""
    print(f"{args.prog}: warning: {message}", file=sys.stderr)


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Print "<prog>: <message>" on stderr and return `code`, the exit code to end with."""
    print(f"{args.prog}: {message}", file=sys.stderr)
    return code


def usage(args: argparse.Namespace, message: str) -> int:
    """Report a wrong command line the way `Parser.error` does; return `EXIT_USAGE`."""
    return fail(args, f"{message} (see `{args.prog} --help`)", EXIT_USAGE)


class StatusLine:
    """One status line on stderr: redrawn in place on a terminal, a line per update otherwise
    (a log or a pipe keeps every step)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.width = 0

    def show(self, line: str) -> None:
        """Replace the line (on a terminal) or add it."""
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        """End the line on a terminal, so what follows starts on its own."""
        if self.tty and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()
