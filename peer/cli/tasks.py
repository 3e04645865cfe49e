"""The task commands of `grapevine`: submit, tasks, task, tree, result, cancel.

Invariants (those of peer/cli.py, whose helpers these commands use):
- Errors are one line on stderr, "grapevine <command>: <what went wrong>"; exit 0 on success,
  1 when the operation or the task failed, 2 for a wrong command line, 130 on Ctrl-C.
- `--json` prints the API's own objects (docs/http-api.md); progress goes to stderr only, so
  stdout stays clean for pipes.
- `submit --file` keeps at most `FILE_CONCURRENCY` requests in flight and reports every bad
  line with its number instead of stopping at the first.
- An output that is a blob reference (`protocol.blobs`) is printed as the blob's bytes, fetched
  through `GET /v1/blobs/{digest}`, exactly as stored (no newline added); `--json` shows the
  reference as the API does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from peer.cli import render
from peer.cli.main import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    _client,
    _command,
    _fail,
    _Parser,
)
from peer.client import (
    DEFAULT_API,
    ApiError,
    ClientError,
    GrapevineClient,
    JsonObject,
    _api_error,
    _reason,
    base_url,
)
from protocol.blobs import parse_blob_ref

FILE_CONCURRENCY = 16
"""Requests `submit --file` keeps in flight at once."""
BLOB_TIMEOUT = aiohttp.ClientTimeout(total=600.0, sock_connect=5.0)
"""How long fetching a blob output may take (the peer may fetch it from its holders first)."""
POLL_INTERVAL = 0.5
"""Seconds between checks of unfinished tasks while `submit --file` waits."""
STATES = ("pending", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
_FILE_FIELDS = {"role", "input", "priority", "idempotency_key", "timeout"}


def register(commands: argparse._SubParsersAction[_Parser]) -> None:
    """Add submit, tasks, task, tree, result and cancel to the `grapevine` command line."""
    api = _Parser(add_help=False)
    api.add_argument(
        "--api",
        metavar="HOST:PORT",
        default=None,
        help=f"the peer's API address (default: $GRAPEVINE_API, else {DEFAULT_API})",
    )
    api.add_argument("--json", action="store_true", help="print JSON with the API's field names")
    parents = (api,)

    submit = _command(
        commands,
        "submit",
        "submit a task (or a file of tasks) and wait for the result",
        "Submit a task at the local peer. The peer acknowledges once the task is durable and "
        "held by another peer; by default this command then follows the task (progress on "
        "stderr) and prints its accepted output. With --file, submits one task per line of a "
        'JSON Lines file ({"role": ..., "input": ..., "priority"?: ..., "idempotency_key"?: '
        '..., "timeout"?: ...}), reports bad lines by number, skips them, and exits 1 if any '
        "line was bad or any task did not finish as done.",
        "  grapevine submit --role echo 'hello'\n"
        "  grapevine submit --role sleep --timeout 5 --no-wait 10\n"
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
        help="resubmitting with the same key (and input) names the same task",
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
        help="submit every task of a JSON Lines file (- for stdin)",
    )
    submit.add_argument(
        "--no-wait",
        dest="no_wait",
        action="store_true",
        help="print the task id once accepted instead of waiting for the result",
    )
    _client(submit, _submit)

    tasks = _command(
        commands,
        "tasks",
        "list the tasks the local peer knows",
        "List the tasks the local peer knows, newest first, with their state (pending, "
        "running, done, failed, cancelled), owner and epoch.",
        "  grapevine tasks --state running\n  grapevine tasks --json | jq length",
        parents,
    )
    tasks.add_argument("--state", choices=STATES, help="only tasks in this state")
    tasks.add_argument("--role", help="only tasks of this role")
    tasks.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    _client(tasks, _tasks)

    task = _command(
        commands,
        "task",
        "show one task",
        "Show one task: its state, claim, execution log and accepted result. ID is the task "
        "id in hex or a unique prefix of at least 6 digits.",
        "  grapevine task 3f2a9c --json",
        parents,
    )
    task.add_argument("id", metavar="ID", help="task id (hex) or a unique prefix")
    _client(task, _task)

    tree = _command(
        commands,
        "tree",
        "show a task and the tasks it delegated",
        "Show the tree of tasks below a task as the local peer knows it: one line per task "
        "(role, id, state, the peer running it, the agent that answered, tokens used), "
        "children under their parent, then totals over the tree. ID is the task id in hex or "
        "a unique prefix of at least 6 digits.",
        "  grapevine tree 3f2a9c\n  grapevine tree 3f2a9c --json | jq .totals",
        parents,
    )
    tree.add_argument("id", metavar="ID", help="task id (hex) or a unique prefix")
    _client(tree, _tree)

    result = _command(
        commands,
        "result",
        "print a task's accepted result",
        "Print the accepted output of a task; exits 1 if it has none yet or did not succeed.",
        "  grapevine result 3f2a9c",
        parents,
    )
    result.add_argument("id", metavar="ID", help="task id (hex) or a unique prefix")
    _client(result, _result)

    cancel = _command(
        commands,
        "cancel",
        "cancel a task wherever it runs",
        "Cancel a task network-wide: whoever runs it stops. A task already final cannot be "
        "cancelled.",
        "  grapevine cancel 3f2a9c",
        parents,
    )
    cancel.add_argument("id", metavar="ID", help="task id (hex) or a unique prefix")
    _client(cancel, _cancel)


# --- one task ----------------------------------------------------------------------------------


async def _submit(client: GrapevineClient, args: argparse.Namespace) -> int:
    if args.file is not None:
        if args.input is not None or args.role:
            return _fail(args, "give either --file or --role with INPUT, not both", EXIT_USAGE)
        return await _submit_file(client, args)
    if not args.role or args.input is None:
        return _fail(args, "give --role ROLE and INPUT (or --file PATH)", EXIT_USAGE)
    text = sys.stdin.read() if args.input == "-" else args.input
    answer = await client.submit(
        args.role,
        text,
        priority=args.priority,
        idempotency_key=args.idempotency_key,
        timeout=args.timeout,
    )
    task_id = str(answer.get("id", ""))
    if args.no_wait:
        print(render.as_json(answer) if args.json else task_id)
        return EXIT_OK
    progress = _ProgressLine(task_id)
    async for event in client.watch_task(task_id):
        progress.show(event)
    progress.close()
    task = await client.task(task_id)
    if args.json:
        print(render.as_json(task))
    return await _report_result(client, args, task, print_output=not args.json)


async def _report_result(
    client: GrapevineClient, args: argparse.Namespace, task: JsonObject, print_output: bool
) -> int:
    result = task.get("result")
    state = task.get("state")
    if not isinstance(result, dict):
        return _fail(args, f"task {task.get('id')} has no result yet (state {state})", EXIT_FAILED)
    if print_output:
        output = str(result.get("output", ""))
        ref = parse_blob_ref(output.encode("utf-8", errors="surrogatepass"))
        if ref is None:
            print(output)
        else:
            data = await fetch_blob(client.api, ref[0].hex())
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    if state != "done":
        outcome = result.get("outcome")
        return _fail(args, f"task {task.get('id')} ended {outcome} ({state})", EXIT_FAILED)
    return EXIT_OK


class _ProgressLine:
    """One progress line on stderr: redrawn in place on a terminal, a line per step otherwise."""

    def __init__(self, task_id: str) -> None:
        self.prefix = f"task {task_id[:12]}"
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.width = 0

    def show(self, event: JsonObject) -> None:
        kind = str(event.get("type", "?")).removeprefix("task-")
        who = render.short(event.get("owner") or event.get("by"))
        detail = {
            "claimed": f"claimed by {who} (epoch {event.get('epoch')})",
            "started": f"running on {who} (epoch {event.get('epoch')})",
            "ended": f"execution on {who} ended: {event.get('outcome')}",
            "result": f"result accepted: {event.get('outcome')} from {who}",
            "cancelled": f"cancelled by {who}",
        }.get(kind, kind)
        line = f"{self.prefix}: {detail} [{time.monotonic() - self.start:.1f}s]"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def _tasks(client: GrapevineClient, args: argparse.Namespace) -> int:
    if args.limit < 1:
        return _fail(args, "--limit must be at least 1", EXIT_USAGE)
    tasks = await client.tasks(state=args.state, role=args.role, limit=args.limit)
    print(render.as_json(tasks) if args.json else tasks_table(tasks))
    return EXIT_OK


async def _task(client: GrapevineClient, args: argparse.Namespace) -> int:
    task_id = _task_id(args)
    if task_id is None:
        return _bad_id(args)
    task = await client.task(task_id)
    print(render.as_json(task) if args.json else task_details(task))
    return EXIT_OK


async def _tree(client: GrapevineClient, args: argparse.Namespace) -> int:
    task_id = _task_id(args)
    if task_id is None:
        return _bad_id(args)
    tree = await client.tree(task_id)
    if args.json:
        print(render.as_json(tree))
        return EXIT_OK
    Console(soft_wrap=True, highlight=False).print(render.task_tree(tree))
    print(render.tree_totals(tree))
    return EXIT_OK


async def _result(client: GrapevineClient, args: argparse.Namespace) -> int:
    task_id = _task_id(args)
    if task_id is None:
        return _bad_id(args)
    task = await client.task(task_id)
    if args.json:
        print(render.as_json(task.get("result")))
    return await _report_result(client, args, task, print_output=not args.json)


async def fetch_blob(api: str, digest: str) -> bytes:
    """Return the bytes of a blob from the peer API at `api` (`GET /v1/blobs/{digest}`).

    Raises:
        ClientError: the peer could not be reached.
        ApiError: the peer answered an error (404: no peer asked held the blob).
    """
    try:
        async with (
            aiohttp.ClientSession(timeout=BLOB_TIMEOUT) as session,
            session.get(f"{base_url(api)}/v1/blobs/{digest}") as response,
        ):
            if response.status >= 400:
                raise await _api_error(response)
            return await response.read()
    except aiohttp.ClientError as exc:
        raise ClientError(api, _reason(exc)) from exc
    except TimeoutError as exc:
        raise ClientError(api, "timed out") from exc


async def _cancel(client: GrapevineClient, args: argparse.Namespace) -> int:
    task_id = _task_id(args)
    if task_id is None:
        return _bad_id(args)
    task = await client.cancel(task_id)
    print(render.as_json(task) if args.json else f"cancelled task {task.get('id')}")
    return EXIT_OK


def _task_id(args: argparse.Namespace) -> str | None:
    text = str(args.id).strip().lower()
    if not text or any(c not in "0123456789abcdef" for c in text):
        return None
    return text


def _bad_id(args: argparse.Namespace) -> int:
    return _fail(args, f"a task id is hex digits (or a prefix), got {args.id!r}", EXIT_USAGE)


# --- a file of tasks ---------------------------------------------------------------------------


@dataclass
class _FileRun:
    """What `submit --file` did, line by line."""

    bad: list[tuple[int, str]] = field(default_factory=list)
    submitted: dict[int, str] = field(default_factory=dict)
    final: dict[int, JsonObject] = field(default_factory=dict)

    def summary(self) -> JsonObject:
        states: dict[str, int] = {}
        for task in self.final.values():
            state = str(task.get("state"))
            states[state] = states.get(state, 0) + 1
        return {
            "lines": len(self.bad) + len(self.submitted),
            "bad_lines": len(self.bad),
            "submitted": len(self.submitted),
            **{state: states.get(state, 0) for state in FINAL},
            "unfinished": len(self.submitted) - len(self.final),
        }


def _file_lines(path: Path) -> Iterator[tuple[int, str]]:
    handle = sys.stdin if str(path) == "-" else path.open(encoding="utf-8", errors="replace")
    try:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line
    finally:
        if handle is not sys.stdin:
            handle.close()


def parse_task_line(line: str) -> JsonObject:
    """Validate one JSON Lines entry of `submit --file`; return it.

    Raises:
        ValueError: the line is not a task object; the message names the field.
    """
    try:
        spec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(spec, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(spec) - _FILE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    if not isinstance(spec.get("role"), str) or not spec["role"]:
        raise ValueError("role must be a non-empty string")
    if not isinstance(spec.get("input"), str):
        raise ValueError("input must be a string")
    if type(spec.get("priority", 0)) is not int or spec.get("priority", 0) < 0:
        raise ValueError("priority must be an integer of 0 or more")
    if not isinstance(spec.get("idempotency_key", ""), str):
        raise ValueError("idempotency_key must be a string")
    timeout = spec.get("timeout", 0)
    if type(timeout) not in (int, float) or timeout < 0:
        raise ValueError("timeout must be a number of seconds, 0 or more")
    return spec


async def _submit_file(client: GrapevineClient, args: argparse.Namespace) -> int:
    try:
        lines = list(_file_lines(args.file))
    except OSError as exc:
        return _fail(args, f"cannot read {args.file}: {exc.strerror or exc}", EXIT_FAILED)
    run = _FileRun()
    specs: list[tuple[int, JsonObject]] = []
    for number, line in lines:
        try:
            specs.append((number, parse_task_line(line)))
        except ValueError as exc:
            run.bad.append((number, str(exc)))
    for number, reason in run.bad:
        print(f"{args.prog}: {args.file} line {number}: {reason}; skipped", file=sys.stderr)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
        disable=not console.is_terminal,
    ) as progress:
        sent = progress.add_task("submitted", total=len(specs))
        done = progress.add_task("finished", total=len(specs), visible=not args.no_wait)
        await _submit_all(client, args, specs, run, progress, sent)
        if not args.no_wait:
            progress.update(done, total=len(run.submitted))
            await _wait_all(client, run, progress, done)
    summary = run.summary()
    if args.json:
        rows: list[dict[str, Any]] = [
            {
                "line": number,
                "id": task_id,
                "state": run.final.get(number, {}).get("state"),
                "outcome": (run.final.get(number, {}).get("result") or {}).get("outcome"),
            }
            for number, task_id in sorted(run.submitted.items())
        ]
        bad = [{"line": n, "error": reason} for n, reason in run.bad]
        print(render.as_json({"tasks": rows, "bad_lines": bad, "summary": summary}))
    else:
        print(", ".join(f"{value} {name.replace('_', ' ')}" for name, value in summary.items()))
    failed = run.bad or (not args.no_wait and summary["done"] != summary["submitted"])
    return EXIT_FAILED if failed else EXIT_OK


async def _submit_all(
    client: GrapevineClient,
    args: argparse.Namespace,
    specs: list[tuple[int, JsonObject]],
    run: _FileRun,
    progress: Progress,
    bar: Any,
) -> None:
    pending = iter(specs)

    async def worker() -> None:
        for number, spec in pending:
            try:
                answer = await client.submit(
                    spec["role"],
                    spec["input"],
                    priority=spec.get("priority", 0),
                    idempotency_key=spec.get("idempotency_key") or None,
                    timeout=float(spec.get("timeout", 0)),
                )
                run.submitted[number] = str(answer["id"])
            except ApiError as exc:
                reason = exc.detail or exc.title
                run.bad.append((number, f"refused: {reason}"))
                print(f"{args.prog}: {args.file} line {number}: refused: {reason}", file=sys.stderr)
            progress.advance(bar)

    await asyncio.gather(*(worker() for _ in range(FILE_CONCURRENCY)))
    run.bad.sort()


async def _wait_all(client: GrapevineClient, run: _FileRun, progress: Progress, bar: Any) -> None:
    while True:
        open_lines = [n for n in run.submitted if n not in run.final]
        if not open_lines:
            return
        queue = iter(open_lines)

        async def worker(queue: Iterator[int] = queue) -> None:
            for number in queue:
                task = await client.task(run.submitted[number])
                if task.get("state") in FINAL:
                    run.final[number] = task
                    progress.advance(bar)

        await asyncio.gather(*(worker() for _ in range(FILE_CONCURRENCY)))
        if len(run.final) < len(run.submitted):
            await asyncio.sleep(POLL_INTERVAL)


# --- renderings --------------------------------------------------------------------------------


def tasks_table(tasks: list[JsonObject]) -> str:
    """The `grapevine tasks` table and a count line."""
    rows = [
        [
            str(t.get("id", "?"))[:12],
            str(t.get("role", "?")),
            str(t.get("state", "?")),
            render.short(t.get("owner")) if t.get("owner") else "-",
            str(t.get("epoch", "?")),
            str(t.get("duplicates", 0)),
            render.clock(t.get("created")),
        ]
        for t in tasks
    ]
    header = ["ID", "ROLE", "STATE", "OWNER", "EPOCH", "DUP", "CREATED"]
    return f"{render.table(header, rows)}\n{len(tasks)} tasks"


def task_details(task: JsonObject) -> str:
    """The `grapevine task` view: fields, execution log and result."""
    result = task.get("result") if isinstance(task.get("result"), dict) else None
    lines = [
        f"id          {task.get('id')}",
        f"role        {task.get('role')}",
        f"state       {task.get('state')}",
        f"owner       {task.get('owner') or '-'} (epoch {task.get('epoch')})",
        f"priority    {task.get('priority')}",
        f"created     {render.clock(task.get('created'))}",
        f"key         {task.get('idempotency_key') or '-'}",
        f"duplicates  {task.get('duplicates')}",
    ]
    for entry in task.get("executions") or []:
        outcome = f" {entry.get('outcome')}" if entry.get("outcome") else ""
        lines.append(
            f"execution   epoch {entry.get('epoch')} {render.short(entry.get('owner'))} "
            f"{entry.get('phase')}{outcome}"
        )
    if result is not None:
        lines.append(
            f"result      {result.get('outcome')} (epoch {result.get('epoch')}, "
            f"{render.short(result.get('owner'))})"
        )
        lines.append(f"output      {result.get('output')}")
    return "\n".join(lines)
