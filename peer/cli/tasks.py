"""The task commands of `grapevine`: submit, tasks, task, tree, result, cancel.

Invariants:
- Errors are one line on stderr, "grapevine <command>: <what went wrong>"; exit 0 on success,
  1 when the operation or the task failed, 2 for a wrong command line, 130 on Ctrl-C
  (`peer.cli.common`).
- `--json` prints the API's own objects (docs/http-api.md); progress goes to stderr only, so
  stdout stays clean for pipes.
- A task ID on the command line is hex digits (a full id or a unique prefix), checked before any
  request and passed on in lower case; anything else exits 2.
- An output that is a blob reference (`protocol.blobs`) is printed as the blob's bytes, fetched
  through `GET /v1/blobs/{digest}`, exactly as stored (no newline added); `--json` shows the
  reference as the API does. Any other output is printed as text (`render.answer_text`: an
  agent's answer, not the JSON object it travels in); `--json` prints the API's object.
- `submit` names the task (its id, on stderr) as soon as the peer accepted it, before any wait,
  so an interrupted wait can be resumed with `grapevine task ID`. A role no live peer serves is
  refused by the peer (exit 1, naming the roles served and the closest one) unless `--queue`;
  a queued task that no peer claimed within its queue timeout (`--queue-timeout`, default 600
  s) ends with the reason, and the wait with it (exit 1, the reason on stderr).
- rich (the progress bar of `submit --file`) is imported only by the command that draws with
  it; the tree is plain text with ANSI colour on a terminal (`peer.cli.render_tree`).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from peer.cli import render
from peer.cli.common import ClientCommand, StatusLine, api_option, client_command, fail, json_option
from peer.cli.network_tasks import network_listing
from peer.cli.parsing import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Parser, Subcommands, add_command
from peer.cli.task_events import event_text
from peer.client import ApiError, GrapevineClient, JsonObject
from peer.node_ids import node_id_from_text

STATES = ("pending", "running", "done", "failed", "cancelled")
"""The task states `grapevine tasks --state` accepts."""
_UNACKNOWLEDGED = re.compile(r"task ([0-9a-f]{64}) is durable at this peer")
"""How a submission's 503 begins when the task exists here but too few peers hold a copy
(`peer.http.tasks`): `submit` warns and follows the task."""
LOCAL_LIMIT = 100
"""Tasks `grapevine tasks` lists without --limit (all of them with --network)."""


def register(commands: Subcommands) -> None:
    """Add submit, tasks, task, tree, result and cancel to the `grapevine` command line."""
    parents = (api_option(), json_option())

    submit = add_command(
        commands,
        "submit",
        "Submit a task at the local peer. The peer acknowledges once the task is durable and "
        "held by another peer; by default this command then follows the task (progress on "
        "stderr) and prints its accepted output. With --file, submits one task per line of a "
        'JSON Lines file ({"role": ..., "input": ..., "priority"?: ..., "idempotency_key"?: '
        '..., "timeout"?: ...}), reports bad lines by number, skips them, and exits 1 if any '
        "line was bad or any task did not finish as done.",
        "  grapevine submit --role echo 'hello'\n"
        "  grapevine submit --role sleep --timeout 5 --no-wait 10\n"
        "  grapevine submit --role summarize --queue 'text for a peer not started yet'\n"
        "  grapevine submit --role summarize --queue --queue-timeout 60 'fail after a minute'\n"
        "  grapevine submit --file tasks.jsonl",
        parents,
    )
    submit.add_argument("input", metavar="INPUT", nargs="?", help="the task's input; - for stdin")
    submit.add_argument("--role", help="the role that runs the task (e.g. echo, sleep)")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    submit.add_argument(
        "--idempotency-key",
        dest="idempotency_key",
        metavar="KEY",
        default=None,
        help="resubmitting with the same key and spec at any peer names the same task; the "
        "same key with another role, input, priority or timeout is refused (exit 1, naming "
        "the existing task)",
    )
    submit.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds one execution may run; 0 (default) for no limit",
    )
    submit.add_argument(
        "--file",
        type=Path,
        default=None,
        metavar="PATH",
        help="submit every task of a JSON Lines file (- for stdin): one object per line with "
        "role and input, and optionally priority, idempotency_key, timeout, queue and "
        "queue_timeout (these two override --queue and --queue-timeout for that line)",
    )
    submit.add_argument(
        "--no-wait",
        dest="no_wait",
        action="store_true",
        help="print the task id once accepted instead of waiting for the result",
    )
    submit.add_argument(
        "--queue",
        action="store_true",
        help="submit even if no live peer serves the role yet; it waits for one (without it, "
        "such a task is refused, naming the roles the network serves); with --file, for "
        "every line",
    )
    submit.add_argument(
        "--queue-timeout",
        dest="queue_timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --queue: if no peer claimed the task within SECONDS of its submission, it "
        "ends failed with the reason 'queue timeout: ...', and so does any wait for it; "
        "default 600, 0 waits forever. The deadline travels in the signed task: the "
        "submitting peer ends the task, or the peers that hold it if that peer is gone",
    )
    # --file submits lines concurrently (asyncio.gather); one task needs no event loop
    client_command(submit, _submit, needs_loop=lambda args: args.file is not None)

    tasks = add_command(
        commands,
        "tasks",
        "List the tasks the local peer knows, newest first, with their state (pending, "
        "running, done, failed, cancelled), owner and epoch. With --network, list the tasks of "
        "the whole network in id order, gathered from every live peer's replica sets page by "
        "page (progress on stderr for long listings); peers that did not answer are named in a "
        "warning, and with --limit the next --cursor to go on from. --json then prints one "
        "object: {tasks, next_cursor, partial, missing}.",
        "  grapevine tasks --state running\n  grapevine tasks --json | jq length\n"
        "  grapevine tasks --network --state failed\n"
        "  grapevine tasks --network --limit 1000 --json | jq .next_cursor",
        parents,
    )
    tasks.add_argument("--state", choices=STATES, help="only tasks in this state")
    tasks.add_argument("--role", help="only tasks of this role")
    tasks.add_argument(
        "--owner",
        metavar="ID",
        default=None,
        help="only tasks claimed by this member (its id as `grapevine members --json` shows it)",
    )
    tasks.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"at most this many (default {LOCAL_LIMIT}; with --network, every task)",
    )
    tasks.add_argument(
        "--network",
        action="store_true",
        help="list every task in the network, not only those the local peer knows",
    )
    tasks.add_argument(
        "--cursor",
        metavar="ID",
        default=None,
        help="with --network: start after this task id (a next_cursor of an earlier listing)",
    )
    client_command(tasks, _tasks)

    _add_by_id(
        commands,
        "task",
        "Show one task: its state, claim, execution log and accepted result. ID is the task "
        "id in hex or a unique prefix of at least 6 digits.",
        "  grapevine task 3f2a9c --json",
        parents,
        _task,
    )
    _add_by_id(
        commands,
        "tree",
        "Show the tree of tasks below a task as the local peer knows it: one line per task "
        "(role, id, state, the peer running it, the agent that answered, tokens used), "
        "children under their parent, then totals over the tree. ID is the task id in hex or "
        "a unique prefix of at least 6 digits.",
        "  grapevine tree 3f2a9c\n  grapevine tree 3f2a9c --json | jq .totals",
        parents,
        _tree,
    )
    _add_by_id(
        commands,
        "result",
        "Print the accepted output of a task; exits 1 if it has none yet or did not succeed.",
        "  grapevine result 3f2a9c",
        parents,
        _result,
    )
    _add_by_id(
        commands,
        "cancel",
        "Cancel a task network-wide: whoever runs it stops. A task already final cannot be "
        "cancelled.",
        "  grapevine cancel 3f2a9c",
        parents,
        _cancel,
    )


def _add_by_id(
    commands: Subcommands,
    name: str,
    description: str,
    examples: str,
    parents: Sequence[Parser],
    command: ClientCommand,
) -> None:
    """Add a command about one task, named by the ID argument that `with_task_id` checks."""
    parser = add_command(commands, name, description, examples, parents)
    parser.add_argument("id", metavar="ID", help="task id (hex) or a unique prefix")
    client_command(parser, with_task_id(command))


def with_task_id(command: ClientCommand) -> ClientCommand:
    """`command`, run once `args.id` is checked and lowered; a malformed ID exits 2 unsent."""

    async def checked(client: GrapevineClient, args: argparse.Namespace) -> int:
        text = str(args.id).strip().lower()
        if not text or any(c not in "0123456789abcdef" for c in text):
            return fail(args, f"a task id is hex digits (or a prefix), got {args.id!r}", EXIT_USAGE)
        args.id = text
        return await command(client, args)

    return checked


# --- one task ----------------------------------------------------------------------------------


async def _submit(client: GrapevineClient, args: argparse.Namespace) -> int:
    if args.queue_timeout is not None and not args.queue:
        return fail(args, "--queue-timeout applies to a queued task: add --queue", EXIT_USAGE)
    if args.file is not None:
        if args.input is not None or args.role:
            return fail(args, "give either --file or --role with INPUT, not both", EXIT_USAGE)
        from peer.cli.task_file import submit_file  # draws with rich: imported when used

        return await submit_file(client, args)
    if not args.role or args.input is None:
        return fail(args, "give --role ROLE and INPUT (or --file PATH)", EXIT_USAGE)
    text = sys.stdin.read() if args.input == "-" else args.input
    try:
        answer = await client.submit(
            args.role,
            text,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            timeout=args.timeout,
            queue=args.queue,
            queue_timeout=args.queue_timeout,
        )
    except ApiError as exc:
        unacknowledged = _UNACKNOWLEDGED.match(exc.detail) if exc.status == 503 else None
        if unacknowledged is None or args.no_wait:
            raise
        # The task exists and runs; only its copies elsewhere are missing. Say so, and follow
        # it as for an acknowledged one (a lone peer's first try must still show the answer).
        print(f"{args.prog}: warning: {exc.detail}", file=sys.stderr)
        answer = {"id": unacknowledged.group(1)}
    task_id = str(answer.get("id", ""))
    if args.no_wait:
        print(render.as_json(answer) if args.json else task_id)
        return EXIT_OK
    print(f"{args.prog}: task {task_id} accepted; waiting for its result", file=sys.stderr)
    progress = _ProgressLine(task_id)
    async for event in client.watch_task(task_id):
        progress.event(event)
    progress.close()
    task = await client.task(task_id)
    if args.json:
        print(render.as_json(task))
    return await report_result(client, args, task, print_output=not args.json)


async def report_result(
    client: GrapevineClient, args: argparse.Namespace, task: JsonObject, print_output: bool
) -> int:
    """Print a final task's output (unless not `print_output`) and return the exit code: 0 when
    it is done, else 1 with why on stderr (its outcome, or the reason it was cancelled)."""
    result = task.get("result")
    state = task.get("state")
    cancel = task.get("cancel")
    if not isinstance(result, dict):
        why = (
            f": {cancel.get('reason')}" if isinstance(cancel, dict) and cancel.get("reason") else ""
        )
        if isinstance(cancel, dict):  # ended by a cancel: failed (given up) or cancelled
            message = (
                f"task {task.get('id')} {'failed' if state == 'failed' else 'was cancelled'}{why}"
            )
        else:
            message = f"task {task.get('id')} has no result yet (state {state})"
        return fail(args, message, EXIT_FAILED)
    if print_output:
        # The task plane's hashing comes with it: imported by the commands that print outputs.
        from protocol.blobs import parse_blob_ref

        output = str(result.get("output", ""))
        ref = parse_blob_ref(output.encode("utf-8", errors="surrogatepass"))
        if ref is None:
            print(render.answer_text(output))
        else:
            data = await client.blob(ref[0].hex())
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    if state != "done":
        outcome = result.get("outcome")
        return fail(args, f"task {task.get('id')} ended {outcome} ({state})", EXIT_FAILED)
    return EXIT_OK


class _ProgressLine(StatusLine):
    """One progress line on stderr: redrawn in place on a terminal, a line per step otherwise."""

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.prefix = f"task {task_id[:12]}"
        self.start = time.monotonic()

    def event(self, event: JsonObject) -> None:
        detail = event_text(event)
        self.show(f"{self.prefix}: {detail} [{time.monotonic() - self.start:.1f}s]")


async def _tasks(client: GrapevineClient, args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        return fail(args, "--limit must be at least 1", EXIT_USAGE)
    if args.owner is not None and node_id_from_text(args.owner) is None:
        return fail(
            args,
            f"--owner is a member's id, 52 letters and digits as `grapevine members --json` "
            f"shows it; got {args.owner[:70]!r}",
            EXIT_USAGE,
        )
    if args.network:
        return await network_listing(client, args)
    if args.cursor is not None:
        return fail(args, "--cursor pages a network listing: add --network", EXIT_USAGE)
    limit = LOCAL_LIMIT if args.limit is None else args.limit
    tasks = await client.tasks(state=args.state, role=args.role, limit=limit, owner=args.owner)
    print(render.as_json(tasks) if args.json else render.tasks_table(tasks))
    return EXIT_OK


async def _task(client: GrapevineClient, args: argparse.Namespace) -> int:
    try:
        task = await client.task(args.id)
    except ApiError as exc:
        if exc.status != 410:
            raise
        # Compacted after its retention: a final answer, not a failure.
        print(exc.detail or f"task {args.id} has been compacted")
        return EXIT_OK
    print(render.as_json(task) if args.json else render.task_details(task))
    return EXIT_OK


async def _tree(client: GrapevineClient, args: argparse.Namespace) -> int:
    tree = await client.tree(args.id)
    if args.json:
        print(render.as_json(tree))
        return EXIT_OK
    from peer.cli.render_tree import tree_lines, wants_colour

    print("\n".join(tree_lines(tree, colour=wants_colour(sys.stdout))))
    print(render.tree_totals(tree))
    return EXIT_OK


async def _result(client: GrapevineClient, args: argparse.Namespace) -> int:
    task = await client.task(args.id)
    if args.json:
        print(render.as_json(task.get("result")))
    return await report_result(client, args, task, print_output=not args.json)


async def _cancel(client: GrapevineClient, args: argparse.Namespace) -> int:
    task = await client.cancel(args.id)
    print(render.as_json(task) if args.json else f"cancelled task {task.get('id')}")
    return EXIT_OK
