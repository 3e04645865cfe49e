"""`grapevine watch ID`: follow one task and the tasks below it in the terminal, as they run.

Invariants:
- One line per event on stdout as it arrives ("[  1.2s] 3f2a9c1b2d writer: model call to
  gpt-4o: 812 tokens, calls delegate"), then the task's answer as `submit` prints it; exit 0
  when the task is done, 1 when it failed or was cancelled (why on stderr), 130 on Ctrl-C
  (`peer.cli.main`), so a script can wait on it.
- `--json`: each event as one line of JSON, the API's object unchanged, then the task's object
  (`GET /v1/tasks/{id}`) as the last line; the exit code is the same.
- Progress steps (model calls, tool calls, delegations) are known only at the peer that runs
  each task: through another peer the lines show the task's signed facts only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from peer.cli.common import api_option, client_command, json_option
from peer.cli.parsing import Subcommands, add_command
from peer.cli.task_events import event_text
from peer.cli.tasks import report_result, with_task_id
from peer.client import GrapevineClient


def register(commands: Subcommands) -> None:
    """Add `watch` to the `grapevine` command line."""
    parser = add_command(
        commands,
        "watch",
        "Follow a task and every task below it: one line per event as it happens (claims, "
        "executions, each model call, tool call and delegation of an agent's run, child "
        "tasks, the result), then the task's answer. Exits 0 when the task is done, 1 when it "
        "failed or was cancelled (a queued task's queue timeout included). Model calls, tool "
        "calls and delegations are known at the peer that runs the task and at the peer it "
        "was submitted to (the running peer tells it of each); through any other peer, the "
        "other events only. ID is the task id in hex or a unique prefix of at least 6 digits.",
        "  grapevine watch 3f2a9c\n  grapevine watch 3f2a9c --json | jq -c 'select(.type == "
        '"task-progress")\'',
        (api_option(), json_option()),
    )
    parser.add_argument("id", metavar="ID", help="task id (hex) or a unique prefix")
    client_command(parser, with_task_id(_watch))


async def _watch(client: GrapevineClient, args: argparse.Namespace) -> int:
    task = await client.task(args.id)
    task_id = str(task.get("id", args.id))
    roles = {task_id: str(task.get("role", "?"))}
    start = time.monotonic()
    async for event in client.watch_task(task_id, tree=True):
        if args.json:
            print(json.dumps(event), flush=True)
            continue
        about = str(event.get("id", "?"))
        if event.get("type") == "task-child":
            roles[about] = str(event.get("role", "?"))
        line = f"{about[:10]} {roles.get(about, '?')}: {event_text(event)}"
        print(f"[{time.monotonic() - start:6.1f}s] {line}", flush=True)
    task = await client.task(task_id)
    if args.json:
        print(json.dumps(task), flush=True)
    sys.stdout.flush()
    return await report_result(client, args, task, print_output=not args.json)
