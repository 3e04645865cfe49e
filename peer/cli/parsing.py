"""How `grapevine` parses a command line: the parser class, exit codes and `add_command`.

Apart from `peer.cli.common` (the API client and the messages of client commands) so that
`grapevine --help`, `simulate` and `demo` import no HTTP client or token code.

Invariants:
- Flags are never abbreviated (`--rol` is not `--role`: every parser is made with
  `allow_abbrev=False`), and a mistyped command, choice or flag gets a "did you mean" for the
  closest known one (`difflib`).
- A parse error is one line, "<prog>: <message>", exit 2, never a usage dump.
- Exit codes: 0 success, 1 the operation failed (peer unreachable, API problem, unhealthy peer),
  2 the command line or the settings are wrong, 130 interrupted by Ctrl-C.
- Every subcommand's namespace carries `prog` ("grapevine members") and `parser`, set by
  `add_command`, so messages name the command the user ran.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from typing import Any, NoReturn, TypeAlias

from peer.cli import catalog

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ParagraphFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps indented lines (examples) as written.

    argparse builds a formatter for every option it adds (to check its help), and its own asks
    `shutil` for the terminal's width; `terminal_width` asks the OS directly, so that the
    commands that never print help skip importing shutil, and textwrap loads only for help.
    """

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("width", terminal_width() - 2)  # argparse's own margin
        super().__init__(prog, **kwargs)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n".join(
            line
            if not line or line.startswith(" ")
            else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            for line in text.splitlines()
        )


def terminal_width() -> int:
    """Columns of the terminal, as `shutil.get_terminal_size` finds them: $COLUMNS, else the
    terminal on stdout, else 80."""
    try:
        return max(int(os.environ["COLUMNS"]), 1)
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(1).columns or 80
    except (OSError, ValueError):
        return 80


_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<word>[^']*)'")
_UNRECOGNIZED = "unrecognized arguments: "


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes no abbreviated flag and whose errors are one line, with a
    "did you mean" when a known word is close, and a pointer to --help, not a usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", ParagraphFormatter)  # no shutil: see there
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
        import difflib  # only on a mistake

        close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
        return f"{close[0]!r}" if close else None


Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"
"""Where a command group adds its subcommands (`Parser.add_subparsers`)."""


def add_command(
    commands: Subcommands,
    name: str,
    description: str,
    examples: str = "",
    parents: Sequence[Parser] = (),
    summary: str | None = None,
) -> Parser:
    """Add the subcommand `name` and return its parser.

    Args:
        commands: the group of subcommands to add it to.
        name: the word the user types.
        description: the paragraph of its `--help`.
        examples: indented command lines shown under "examples:" in its `--help`.
        parents: option parsers it shares with other commands (`api_option`, `json_option`).
        summary: one line for the list of commands; a top-level command's is the catalog's
            (`peer.cli.catalog`), so only nested ones (`keys list`) give it.

    Returns:
        The subcommand's parser; its namespace carries `prog` and `parser`.
    """
    parser = commands.add_parser(
        name,
        help=catalog.summary(name) if summary is None else summary,
        description=description,
        epilog=f"examples:\n{examples}" if examples else None,
        formatter_class=ParagraphFormatter,
        parents=list(parents),
    )
    parser.set_defaults(prog=parser.prog, parser=parser)
    return parser
