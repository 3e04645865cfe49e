"""The API form of execution progress (`peer.runtime.progress`) and the change feed the task
streams wait on.

Invariants:
- A step is shown as a "task-progress" event: `{type, time, id, epoch, seq, step, detail}`,
  where `step` is one of `peer.runtime.progress.STEP_KINDS` and `detail` its fields.
- Steps are known at the peer that runs a task, at its origin, which the running peer tells
  of each, and at the origins of the tasks above it, to which they are passed on
  (`protocol.tasks.progress`); a stream elsewhere shows none (docs/tasks.md).
- `merged` waits on the task notes and the steps at once and never leaves a getter behind:
  each wait's pending gets are cancelled before it yields, and an item a get took is yielded.
  What is queued already is yielded as one batch (each queue's items in their order), which a
  stream writes in one go; a feed that yielded a batch less than `GATHER_SECONDS` ago first
  waits out the rest of that time, so a busy stream writes at most one batch per interval
  while a quiet one's first event goes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

from peer.http.common import Json
from peer.runtime.driver import Driver
from peer.runtime.hub import Observed
from peer.runtime.progress import ProgressLog, Step

T = TypeVar("T")

GATHER_SECONDS = 0.01
"""Least time between two batches of one `merged` feed. A busy 3-peer network noted about
2,000 events a second to each watch stream; written as they came, a batch held about 5 of
them and the writes were about 4% of a peer's CPU (decision 84). Events reach a busy stream at
most this much later; a quiet stream is not delayed."""
MERGED_BATCH = 256
"""Most items taken from each subscription for one batch of `merged`: a stream that fell far
behind catches up in writes of a bounded size."""


def step_json(step: Step) -> Json:
    """Return the API form of one step."""
    return {
        "type": "task-progress",
        "time": round(step.time, 3),
        "id": step.task_id.hex(),
        "epoch": step.epoch,
        "seq": step.seq,
        "step": step.kind,
        "detail": dict(step.detail),
    }


def progress_json(log: ProgressLog, task_id: bytes) -> Json | None:
    """A task's progress here for its tree node: counts by step kind and the last step; None
    when it made no step at this peer."""
    counts = log.counts(task_id)
    if counts is None:
        return None
    steps = log.steps(task_id)
    return {**counts, "last": step_json(steps[-1]) if steps else None}


def new_steps(log: ProgressLog, task_id: bytes, shown: dict[bytes, int]) -> list[Json]:
    """The steps of `task_id` not shown yet (recorded in `shown`: the last seq per task)."""
    last = shown.get(task_id, 0)
    fresh = [step for step in log.steps(task_id) if step.seq > last]
    if fresh:
        shown[task_id] = fresh[-1].seq
    return [step_json(step) for step in fresh]


async def merged(
    notes: asyncio.Queue[Observed | None],
    steps: asyncio.Queue[Step | None],
    silence: float,
    gather: float = GATHER_SECONDS,
) -> AsyncGenerator[list[Observed | Step] | None, None]:
    """Yield what the task notes and steps queued, in batches (each queue's items in order,
    at most `MERGED_BATCH` of each, at least `gather` seconds apart), or None after `silence`
    seconds with neither.

    Ends, after yielding what came before, when either subscription does (its hub dropped or
    closed it: the peer stops).
    """
    loop = asyncio.get_running_loop()
    last_batch = float("-inf")  # none yet: the first batch goes at once
    while True:
        pause = last_batch + gather - loop.time()
        if pause > 0:
            await asyncio.sleep(pause)  # what comes meanwhile goes in the next batch
        # What is queued already is taken without waiting: two futures and a wait per event
        # cost a busy peer's watch stream more than writing the event did. And all of it at
        # once, so a stream writes it in one go rather than one system call per event.
        got: list[Observed | Step | None] = [*_queued(notes), *_queued(steps)]
        if not got:
            gets: list[asyncio.Future[Observed | Step | None]] = [
                asyncio.ensure_future(notes.get()),
                asyncio.ensure_future(steps.get()),
            ]
            try:
                await asyncio.wait(gets, timeout=silence, return_when="FIRST_COMPLETED")
            finally:
                for get in gets:
                    get.cancel()  # cancelled before it completed, a get took nothing
            got = [get.result() for get in gets if get.done() and not get.cancelled()]
            if not got:
                yield None
                continue
        batch: list[Observed | Step] = []
        for item in got:
            if item is None:
                if batch:
                    yield batch
                return
            batch.append(item)
        last_batch = loop.time()
        yield batch


def _queued(queue: asyncio.Queue[T]) -> list[T]:
    """What `queue` holds now, up to `MERGED_BATCH` items, in order."""
    return [queue.get_nowait() for _ in range(min(queue.qsize(), MERGED_BATCH))]


async def task_or_step_changes(
    driver: Driver, watched: Callable[[], set[bytes]], poll: float
) -> AsyncGenerator[None, None]:
    """Yield now, then whenever a task note or a step about a task in `watched()` arrives, or
    `poll` seconds passed without one (an execution-log entry from another peer is not noted).

    Ends when the peer stops.
    """
    notes, steps = driver.task_hub.subscribe(), driver.progress.subscribe()
    try:
        yield None
        feed = merged(notes, steps, poll)
        async with contextlib.aclosing(feed):
            async for batch in feed:
                if batch is None:
                    yield None
                    continue
                ids = {item.task_id if isinstance(item, Step) else task_of(item) for item in batch}
                if not ids.isdisjoint(watched()):
                    yield None
    finally:
        driver.task_hub.unsubscribe(notes)
        driver.progress.unsubscribe(steps)


def task_of(item: Observed) -> bytes | None:
    """The task a note is about (None for a note about no task)."""
    task_id = getattr(item.note, "task_id", None)
    return task_id if isinstance(task_id, bytes) else None
