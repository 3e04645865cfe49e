"""`grapevine submit --file`: submit every task of a JSON Lines file, then wait for them all.

Invariants:
- Every bad line is reported with its number on stderr and skipped; the others are still
  submitted, and the command exits 1 if any line was bad or refused, or (unless --no-wait) any
  task did not finish as done.
- At most `FILE_CONCURRENCY` requests are in flight at once, while submitting and while polling.
- Progress bars go to stderr and only on a terminal; stdout carries the summary line, or with
  `--json` one object: the tasks by line, the bad lines and the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from peer.cli import render
from peer.cli.common import fail
from peer.cli.parsing import EXIT_FAILED, EXIT_OK
from peer.client import ApiError, GrapevineClient, JsonObject

FILE_CONCURRENCY = 16
"""Requests `submit --file` keeps in flight at once."""
POLL_INTERVAL = 0.5
"""Seconds between checks of unfinished tasks while `submit --file` waits."""
FINAL = ("done", "failed", "cancelled")
_FILE_FIELDS = {"role", "input", "priority", "idempotency_key", "timeout", "queue", "queue_timeout"}
"""What a line may carry: the API's submission fields (`queue` and `queue_timeout` override
`--queue` and `--queue-timeout` for that line)."""


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
    if type(spec.get("queue", False)) is not bool:
        raise ValueError("queue must be true or false")
    queue_timeout = spec.get("queue_timeout")
    if queue_timeout is not None and (type(queue_timeout) not in (int, float) or queue_timeout < 0):
        raise ValueError("queue_timeout must be a number of seconds, 0 or more")
    if queue_timeout is not None and spec.get("queue") is False:
        raise ValueError("queue_timeout applies to a queued task: drop it or set queue to true")
    return spec


async def submit_file(client: GrapevineClient, args: argparse.Namespace) -> int:
    """Run `grapevine submit --file args.file`; return the exit code (see the module docstring)."""
    try:
        lines = list(_file_lines(args.file))
    except OSError as exc:
        return fail(args, f"cannot read {args.file}: {exc.strerror or exc}", EXIT_FAILED)
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
                    queue=bool(spec.get("queue", args.queue)),
                    queue_timeout=spec.get("queue_timeout", args.queue_timeout),
                )
                run.submitted[number] = str(answer["id"])
            except ApiError as exc:
                if exc.status == 401:
                    raise  # no line can pass: one message says how to pass the token
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
