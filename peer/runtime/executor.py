"""Runs the executions the node starts: one pluggable async callable per role.

Invariants:
- At most `max_running` executions run at once (the figure declared with `Node.serve`); the
  node may start more (a standby's claim or a takeover does not wait for a free slot), and
  those wait here, highest priority first, then in arrival order.
- Every execution that is started and not cancelled is reported exactly once through `on_done`
  with an outcome of `protocol.tasks.messages.OUTCOMES`: "ok" (the handler returned), "failed" (it
  raised, or its output is too large), "timeout" (it outlived the task's `timeout`). A cancelled
  execution (`cancel`, i.e. `CancelExecution`: fenced, cancelled, or a result was accepted) is
  not reported — the node has already logged its end.
- The same (task id, epoch) is never run twice at once: a repeated start is ignored.
- A suspended execution (`suspend`: it waits on its child tasks) keeps running but holds no
  slot, so waiting work may start; `resume` counts it again at once, even beyond `max_running`
  (a parent never waits for a slot, so a tree of tasks cannot deadlock). The accounting is
  the protocol's `SlotLedger`, the one home of that rule.
- Handlers run on the event loop; a handler that blocks it stalls the whole peer, so CPU-bound
  work belongs in a thread (`asyncio.to_thread`).
- Blobs (docs/tasks.md "Blobs"): with a `BlobPort`, a handler never sees a blob reference as
  input — the executor resolves it first (inside the task's timeout), and a reference it
  cannot resolve fails the execution with the port's message ("input blob <digest>
  unavailable: ..."); an output over `MAX_INLINE_PAYLOAD` (up to `BLOB_LIMIT`) is stored
  through the port and the result carries its reference. Without a port, references reach
  handlers as they are and large outputs fail, as before. The executor itself does no I/O.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from protocol.blobs import BLOB_LIMIT, parse_blob_ref
from protocol.slots import SlotLedger
from protocol.tasks.messages import MAX_INLINE_PAYLOAD

log = logging.getLogger(__name__)

MAX_SLEEP = 3600.0
"""Longest the built-in `sleep` role sleeps, in seconds."""

Usage = tuple[int, int, int]
"""(prompt tokens, completion tokens, cost in millionths of a dollar)."""


@dataclass(frozen=True, slots=True)
class Work:
    """One execution as a role handler sees it (the fields of `StartExecution`)."""

    task_id: bytes
    epoch: int
    role: str
    input: bytes
    priority: int = 0
    timeout: float = 0.0
    parent: bytes = b""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a handler may return instead of bare output bytes: an outcome and token usage."""

    output: bytes
    outcome: str = "ok"
    usage: Usage = (0, 0, 0)


RoleHandler = Callable[[Work], Awaitable[bytes | Outcome]]
"""Runs one execution of a role; returns its output (or an `Outcome`), raises on failure."""
Done = Callable[[bytes, int, str, bytes, Usage], None]
"""Called as on_done(task_id, epoch, outcome, output, usage) when an execution ends."""


async def echo(work: Work) -> bytes:
    """The built-in `echo` role: the output is the input."""
    return work.input


async def sleep(work: Work) -> bytes:
    """The built-in `sleep` role: the input is a number of seconds as text; sleep that long.

    Raises:
        ValueError: the input is not a number of seconds between 0 and `MAX_SLEEP`.
    """
    text = work.input.decode("utf-8", errors="replace").strip()
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"sleep wants a number of seconds, got {text[:40]!r}") from None
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_SLEEP):
        raise ValueError(f"sleep wants 0 to {MAX_SLEEP:g} seconds, got {text[:40]!r}")
    await asyncio.sleep(seconds)
    return f"slept {seconds:g} s".encode()


class BlobPort(Protocol):
    """Turns blob references into bytes and large outputs into references
    (`peer.runtime.blobs.BlobService`)."""

    async def resolve_input(self, work: Work) -> bytes:
        """Return the bytes `work.input` (a blob reference) stands for.

        Raises:
            Exception: the blob is unavailable; the message becomes the failed output.
        """
        ...

    async def store_output(self, work: Work, output: bytes) -> bytes:
        """Store `output` (over the inline limit) as a blob; return its reference.

        Raises:
            Exception: it could not be stored; the message becomes the failed output.
        """
        ...


def builtin_roles() -> dict[str, RoleHandler]:
    """The roles every peer with agents serves: `echo` and `sleep`."""
    return {"echo": echo, "sleep": sleep}


class Executor:
    """Bounded, cancellable execution of tasks by role.

    Args:
        roles: the handler of each role served.
        max_running: executions run at once (at least 1).
        on_done: receives every execution's end (see the module docstring); may be set later.
        blobs: resolves blob inputs and stores large outputs; None passes references through
            and fails outputs over the inline limit.
    """

    def __init__(
        self,
        roles: Mapping[str, RoleHandler],
        max_running: int,
        on_done: Done | None = None,
        *,
        blobs: BlobPort | None = None,
    ) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.handlers = dict(roles)
        self.max_running = max_running
        self.on_done = on_done
        self.blobs = blobs
        self.context_of: Callable[[Work], contextvars.Context | None] | None = None
        """The context an execution's asyncio task runs in (the driver's tracing puts the
        execution's span there); None, or a None answer, copies the current one."""
        self._slots: SlotLedger[bytes, tuple[int, asyncio.Task[None]]] = SlotLedger()
        """Running executions by task id, with their epoch and asyncio task."""
        self._waiting: dict[bytes, Work] = {}
        self._heap: list[tuple[int, int, bytes, int]] = []
        self._seq = 0
        self._closed = False

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles served, sorted."""
        return tuple(sorted(self.handlers))

    @property
    def running(self) -> int:
        """Executions running now."""
        return len(self._slots.running)

    @property
    def suspended(self) -> int:
        """Running executions suspended (they hold no slot)."""
        return len(self._slots.suspended)

    @property
    def waiting(self) -> int:
        """Executions started by the node but waiting for a free slot."""
        return len(self._waiting)

    def start(self, work: Work) -> None:
        """Run `work` as soon as a slot is free; a start already running or waiting is ignored."""
        if self._closed:
            return
        running = self._slots.running.get(work.task_id)
        if running is not None and running[0] == work.epoch:
            return
        waiting = self._waiting.get(work.task_id)
        if waiting is not None and waiting.epoch == work.epoch:
            return
        self._waiting[work.task_id] = work
        self._seq += 1
        heapq.heappush(self._heap, (-work.priority, self._seq, work.task_id, work.epoch))
        self._pump()

    def cancel(self, task_id: bytes, epoch: int) -> bool:
        """Stop the execution of `task_id` under `epoch` (running or waiting), unreported.

        Returns:
            True if such an execution was running or waiting.
        """
        waiting = self._waiting.get(task_id)
        if waiting is not None and waiting.epoch == epoch:
            del self._waiting[task_id]
            return True
        running = self._slots.running.get(task_id)
        if running is not None and running[0] == epoch:
            # Freed now: a task cancelled before its first step never runs its own cleanup.
            self._slots.finish(task_id)
            running[1].cancel()
            self._pump()
            return True
        return False

    def suspend(self, task_id: bytes) -> bool:
        """Release the slot of a running execution that waits (on its child tasks), so that
        waiting work may start. It keeps running, and can still be cancelled.

        Returns:
            True if it was running and not already suspended.
        """
        if not self._slots.suspend(task_id):
            return False
        self._pump()
        return True

    def resume(self, task_id: bytes) -> bool:
        """Count a suspended execution against `max_running` again, at once (never waits).

        Returns:
            True if it was suspended.
        """
        return self._slots.resume(task_id)

    async def close(self) -> None:
        """Cancel everything, unreported, and wait for the handlers to unwind."""
        self._closed = True
        self._waiting.clear()
        self._heap.clear()
        tasks = [task for _, task in self._slots.running.values()]
        self._slots.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _pump(self) -> None:
        while self._heap and self._slots.has_room(self.max_running):
            _, _, task_id, epoch = heapq.heappop(self._heap)
            work = self._waiting.get(task_id)
            if work is None or work.epoch != epoch or task_id in self._slots.running:
                continue  # cancelled while waiting, or superseded by a later start
            del self._waiting[task_id]
            context = None if self.context_of is None else self.context_of(work)
            task = asyncio.get_running_loop().create_task(self._run(work), context=context)
            self._slots.start(task_id, (epoch, task))

    async def _run(self, work: Work) -> None:
        try:
            outcome, output, usage = await self._execute(work)
        except asyncio.CancelledError:
            self._finish(work)
            self._pump()
            raise
        self._finish(work)
        if self.on_done is not None:
            try:
                self.on_done(work.task_id, work.epoch, outcome, output, usage)
            except Exception:
                log.exception("reporting the end of task %s failed", work.task_id.hex()[:12])
        self._pump()

    def _finish(self, work: Work) -> None:
        running = self._slots.running.get(work.task_id)
        if running is not None and running[1] is asyncio.current_task():
            self._slots.finish(work.task_id)

    async def _execute(self, work: Work) -> tuple[str, bytes, Usage]:
        handler = self.handlers.get(work.role)
        if handler is None:
            return "failed", f"this peer does not serve role {work.role!r}".encode(), (0, 0, 0)
        limit = work.timeout if work.timeout > 0 else None
        blobs = self.blobs
        try:
            async with asyncio.timeout(limit) as scope:
                if blobs is not None and parse_blob_ref(work.input) is not None:
                    try:
                        work = replace(work, input=await blobs.resolve_input(work))
                    except Exception as exc:
                        return "failed", str(exc).encode()[:4096], (0, 0, 0)
                value = await handler(work)
        except TimeoutError:
            if scope.expired():
                return "timeout", f"exceeded the timeout of {work.timeout:g} s".encode(), (0, 0, 0)
            return "failed", b"TimeoutError raised by the role handler", (0, 0, 0)
        except Exception as exc:
            return "failed", f"{type(exc).__name__}: {exc}".encode()[:4096], (0, 0, 0)
        result = value if isinstance(value, Outcome) else Outcome(bytes(value))
        size = len(result.output)
        if size <= MAX_INLINE_PAYLOAD:
            return result.outcome, result.output, result.usage
        if blobs is None or size > BLOB_LIMIT:
            limit_bytes = BLOB_LIMIT if blobs is not None else MAX_INLINE_PAYLOAD
            detail = f"output of {size} bytes exceeds the limit of {limit_bytes}"
            return "failed", detail.encode(), result.usage
        try:
            ref = await blobs.store_output(work, result.output)
        except Exception as exc:
            detail = f"output blob of {size} bytes could not be stored: {exc}"
            return "failed", detail.encode()[:4096], result.usage
        return result.outcome, ref, result.usage
