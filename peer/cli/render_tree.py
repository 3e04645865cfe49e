"""`grapevine tree` drawn with rich: one line per task, children under their parent.

Invariants:
- A pure function of the `/v1/tasks/{id}/tree` answer (docs/http-api.md); a field a peer did
  not send is shown as "?" and never raises.
- Text that comes from peers (roles, agent names) is never read as rich markup.
- The only `grapevine` rendering that needs rich, so it lives apart from `peer.cli.render` and
  is imported only when `tree` runs.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from rich.tree import Tree

from peer.cli.render import short
from peer.client import JsonObject

STATE_STYLE = {
    "done": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "pending": "dim",
}
"""The colour of each task state."""


def task_tree(tree: JsonObject) -> Tree:
    """`grapevine tree`: one line per task of a `/v1/tasks/{id}/tree` answer, children under
    their parent, e.g. "writer 3f2a9c1b2d4e done on k3j4h5l2mn agent writer-1 120 tokens"."""
    root = Tree(tree_label(tree))
    pending: list[tuple[Tree, Any]] = [(root, tree.get("children"))]
    while pending:  # iterative: a deep tree cannot exhaust the recursion limit here
        branch, children = pending.pop()
        for child in children if isinstance(children, list) else []:
            if isinstance(child, dict):
                pending.append((branch.add(tree_label(child)), child.get("children")))
    return root


def tree_label(node: JsonObject) -> Text:
    """One task's line: role, short id, state, peer, agent, tokens, model calls (and those
    repeated after a takeover), duplicates."""
    state = str(node.get("state", "?"))
    usage = node.get("usage") if isinstance(node.get("usage"), dict) else None
    label = Text.assemble(
        (str(node.get("role") or "?"), "bold"),
        " ",
        (str(node.get("id", "?"))[:12], "dim"),
        " ",
        (state, STATE_STYLE.get(state, "")),
        f" on {short(node.get('peer'))}" if node.get("peer") else "",
        f" agent {node['agent']}" if node.get("agent") else "",
    )
    if usage is not None:
        tokens = sum(v for k, v in usage.items() if k.endswith("_tokens") and isinstance(v, int))
        label.append(f" {tokens} tokens")
    calls, repeated = node.get("model_calls"), node.get("model_calls_repeated")
    if isinstance(calls, int) and calls > 0:
        label.append(f" {calls} model call{'s' if calls > 1 else ''}")
        if isinstance(repeated, int) and repeated > 0:
            label.append(f" ({repeated} repeated after a takeover)", "yellow")
    duplicates = node.get("duplicates")
    if isinstance(duplicates, int) and duplicates > 0:
        label.append(f" ({duplicates} duplicate{'s' if duplicates > 1 else ''})", "red")
    return label
