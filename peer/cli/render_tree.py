"""`grapevine tree` drawn as text: one line per task, children under their parent, with the
box-drawing guides of `tree(1)` ("├── ", "└── ", "│   ").

Invariants:
- A pure function of the `/v1/tasks/{id}/tree` answer (docs/http-api.md); a field a peer did
  not send is shown as "?" and never raises.
- Text that comes from peers (roles, agent names, ids) reaches the terminal without control
  characters: a peer cannot move the cursor, recolour or clear the user's screen.
- Colour (ANSI SGR codes) only when asked for, which `grapevine tree` does for a terminal
  that wants it (`wants_colour`: a TTY, no NO_COLOR, TERM not "dumb").
- No rich: `tree` is a client command, and client commands answer in under 150 ms (issue 13;
  importing rich alone costs a good part of that).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, TextIO

from peer.cli.render import short
from peer.client import JsonObject

STATE_STYLE = {
    "done": "32",  # green
    "failed": "31",  # red
    "cancelled": "33",  # yellow
    "running": "36",  # cyan
    "pending": "2",  # dim
}
"""The SGR colour of each task state."""
BOLD, DIM, YELLOW, RED = "1", "2", "33", "31"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def wants_colour(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that takes colour (https://no-color.org)."""
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def tree_lines(tree: JsonObject, colour: bool = False) -> list[str]:
    """`grapevine tree`: one line per task of a `/v1/tasks/{id}/tree` answer, children under
    their parent, e.g. "├── writer 3f2a9c1b2d4e done on k3j4h5l2mn agent writer-1 120 tokens"."""
    return list(_walk(tree, colour))


def _walk(tree: JsonObject, colour: bool) -> Iterator[str]:
    # iterative: a deep tree cannot exhaust the recursion limit here
    pending: list[tuple[Any, str, str]] = [(tree, "", "")]
    while pending:
        node, guide, indent = pending.pop()
        yield guide + tree_label(node, colour)
        children = [c for c in _children(node) if isinstance(c, dict)]
        for position, child in reversed(list(enumerate(children))):
            last = position == len(children) - 1
            pending.append(
                (
                    child,
                    indent + ("└── " if last else "├── "),
                    indent + ("    " if last else "│   "),
                )
            )


def _children(node: JsonObject) -> list[Any]:
    children = node.get("children")
    return children if isinstance(children, list) else []


def tree_label(node: JsonObject, colour: bool = False) -> str:
    """One task's line: role, short id, state, peer, agent, tokens, model calls (and those
    repeated after a takeover), duplicates."""

    def styled(text: str, style: str) -> str:
        return f"\x1b[{style}m{text}\x1b[0m" if colour and style else text

    state = _plain(node.get("state", "?"))
    parts = [
        styled(_plain(node.get("role") or "?"), BOLD),
        styled(_plain(node.get("id", "?"))[:12], DIM),
        styled(state, STATE_STYLE.get(state, "")),
    ]
    if node.get("peer"):
        parts.append(f"on {_plain(short(node.get('peer')))}")
    if node.get("agent"):
        parts.append(f"agent {_plain(node['agent'])}")
    usage = node.get("usage")
    if isinstance(usage, dict):
        tokens = sum(v for k, v in usage.items() if k.endswith("_tokens") and isinstance(v, int))
        parts.append(f"{tokens} tokens")
    calls, repeated = node.get("model_calls"), node.get("model_calls_repeated")
    if isinstance(calls, int) and calls > 0:
        parts.append(f"{calls} model call{'s' if calls > 1 else ''}")
        if isinstance(repeated, int) and repeated > 0:
            parts.append(styled(f"({repeated} repeated after a takeover)", YELLOW))
    duplicates = node.get("duplicates")
    if isinstance(duplicates, int) and duplicates > 0:
        parts.append(styled(f"({duplicates} duplicate{'s' if duplicates > 1 else ''})", RED))
    return " ".join(parts)


def _plain(value: object) -> str:
    """A peer's text with its control characters (escape sequences included) removed."""
    return _CONTROL.sub("", str(value))
