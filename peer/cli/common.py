"""What the `grapevine` command groups share beyond parsing (`peer.cli.parsing`): the messages,
the options of client commands and the API client.

Invariants:
- A user mistake (bad flag, unreachable peer, refused request, bad settings) is reported as one
  line on stderr, "grapevine <command>: <what went wrong>", never as a traceback: `fail`,
  `usage` and `warn` are the only writers of such lines, and `Parser.error` writes the same shape.
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
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from peer.api_token import TOKEN_HELP, TokenError
from peer.cli.parsing import EXIT_FAILED, EXIT_USAGE, Parser
from peer.client import DEFAULT_API, ApiError, ClientError, GrapevineClient, WrongPort

ClientCommand = Callable[[GrapevineClient, argparse.Namespace], Awaitable[int]]
"""A command that talks to the local peer: given an open client and the parsed arguments, it
prints its answer and returns the exit code."""


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


def client_command(
    parser: argparse.ArgumentParser,
    command: ClientCommand,
    needs_loop: Callable[[argparse.Namespace], bool] = lambda args: False,
) -> None:
    """Make `command` the handler of `parser`, run with a client of the peer `--api` names.

    Args:
        needs_loop: whether a command line runs work concurrently (asyncio.gather) and so
            needs an event loop; otherwise the command runs on blocking sockets with no loop
            and without importing asyncio (`peer.client_blocking`), which is most of what
            keeps a client command under 150 ms.
    """
    # quick_exit: a client command leaves nothing for interpreter teardown (peer.cli.main)
    parser.set_defaults(
        handler=lambda args: _run_client(args, command, needs_loop(args)), quick_exit=True
    )


def _run_client(args: argparse.Namespace, command: ClientCommand, loop: bool) -> int:
    """Run `command` with a client of the peer API `args.api` names; return its exit code.

    With `loop`, under an asyncio event loop; without, on blocking sockets.
    A bad address exits 2; an unreachable peer or a problem the API answered exits 1, each as
    one line on stderr.
    """
    api = args.api or os.environ.get("GRAPEVINE_API") or DEFAULT_API
    if args.data_dir is not None and args.data_dir.exists() and not args.data_dir.is_dir():
        wanted = "the peer's data directory (whose api.token is sent)"
        return fail(args, not_a_directory(args.data_dir, wanted), EXIT_USAGE)
    try:
        client = GrapevineClient(
            api, data_dir=args.data_dir, token_file=args.token_file, blocking=not loop
        )
    except ValueError as exc:
        return fail(args, str(exc), EXIT_USAGE)

    async def run() -> int:
        async with client:
            return await command(client, args)

    try:
        # loaded by the commands that talk to a peer, not by `--help`
        if loop:
            from peer.interrupts import run_interruptible

            return run_interruptible(run())
        from peer.client_blocking import run_blocking

        return run_blocking(run())
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
