"""`grapevine tasks --network`: the network listing, every page followed, printed as one.

Invariants:
- Pages are followed from `--cursor` (the first page by default) until the last one, or until
  `--limit` tasks were listed; then the cursor to go on from is printed on stderr (and is
  `next_cursor` in `--json`), so a listing cut by `--limit` can be resumed.
- Progress goes to stderr, and only once a listing takes more than one page; stdout carries the
  table (or the JSON object) alone.
- Members that did not answer a page are named in one warning line on stderr; the listing is
  still printed and the exit code is 0 (what came is right, only incomplete). With `--json`
  the object says it too: `{tasks, next_cursor, partial, missing}`, the API's page shape.
"""

from __future__ import annotations

import argparse
import sys

from peer.cli import render
from peer.cli.common import StatusLine, fail, warn
from peer.cli.parsing import EXIT_OK, EXIT_USAGE
from peer.client import GrapevineClient, JsonObject

NETWORK_PAGE = 500
"""Tasks asked for per page: the API's largest page."""
TASK_ID_DIGITS = 64


async def network_listing(client: GrapevineClient, args: argparse.Namespace) -> int:
    """Run `grapevine tasks --network` (see the module invariants)."""
    cursor = None if args.cursor is None else str(args.cursor).strip().lower()
    if cursor is not None and (
        len(cursor) != TASK_ID_DIGITS or any(c not in "0123456789abcdef" for c in cursor)
    ):
        return fail(
            args, f"--cursor is a full task id (64 hex digits), got {args.cursor!r}", EXIT_USAGE
        )
    wanted: int | None = args.limit
    listed: list[JsonObject] = []
    missing: set[str] = set()
    next_cursor: str | None = None
    progress = _Progress()
    pages = client.network_task_pages(
        state=args.state,
        role=args.role,
        owner=args.owner,
        page_size=NETWORK_PAGE if wanted is None else min(NETWORK_PAGE, wanted),
        cursor=cursor,
    )
    # Each page is a finished request before it is yielded: leaving early holds nothing open.
    async for page in pages:
        rows: list[JsonObject] = page["tasks"]
        missing.update(str(m) for m in page.get("missing") or ())
        next_cursor = page.get("next_cursor")
        room = None if wanted is None else wanted - len(listed)
        if room is not None and len(rows) >= room:
            if len(rows) > room:
                next_cursor = str(rows[room - 1].get("id"))
            listed += rows[:room]
            break
        listed += rows
        if next_cursor:
            progress.count(len(listed))
    progress.close()
    if args.json:
        answer = {
            "tasks": listed,
            "next_cursor": next_cursor,
            "partial": bool(missing),
            "missing": sorted(missing),
        }
        print(render.as_json(answer))
    else:
        print(network_table(listed))
    if missing:
        names = ", ".join(render.short(m) for m in sorted(missing))
        warn(args, f"{len(missing)} peer(s) did not answer ({names}): the listing may be partial")
    if next_cursor and not args.json:
        print(f"more tasks: add --cursor {next_cursor}", file=sys.stderr)
    return EXIT_OK


def network_table(tasks: list[JsonObject]) -> str:
    """The table of a network listing and a count line."""
    rows = [
        [
            str(t.get("id", "?"))[:12],
            str(t.get("role", "?")),
            str(t.get("state", "?")),
            str(t.get("outcome") or "-"),
            render.short(t.get("owner")) if t.get("owner") else "-",
            str(t.get("epoch", "?")),
            render.clock(t.get("created")),
        ]
        for t in tasks
    ]
    header = ["ID", "ROLE", "STATE", "OUTCOME", "OWNER", "EPOCH", "CREATED"]
    return f"{render.table(header, rows)}\n{len(tasks)} tasks"


class _Progress(StatusLine):
    """How many tasks are listed so far, on stderr: redrawn in place on a terminal."""

    def count(self, count: int) -> None:
        self.show(f"listed {count} tasks so far...")
