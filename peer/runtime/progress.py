"""Progress of the executions running on this peer, and of those of tasks submitted here, as it
happens: each model call, tool call and delegation of an agent's run (issue 13, "Task
progress").

Theory of operation. The code that runs an execution here (`peer.agents.runtime`) reports each
step to the peer's `ProgressLog` (`Driver.progress`) the moment it is done; the log hands it on
(`forward`: the driver tells the task's origin, `protocol.tasks.progress`), and the origin
records what it hears (`observe`). The API's watch streams subscribe to the log and the task tree
summarises it. Steps are facts about one execution, not about the task: they are neither
signed nor stored, and sent only to the origin, where its user follows the task (and from
there up the task tree to the root's origin: decision 77).

Invariants:
- A step is known at the peer that ran it and at the task's origin, in memory, until that peer
  restarts. Other peers see the task's signed facts (claims, executions, result) only.
- A step heard from the running peer keeps its time there; it is numbered here (`seq`), and
  never handed on again.
- Bounded: the last `STEPS_KEPT` steps of each of the last `TASKS_KEPT` tasks reported (the
  task reported least recently is forgotten first); the per-kind counts cover every step.
- Reporting never blocks or raises: each subscriber is a bounded queue, and one that falls
  `SUBSCRIBER_QUEUE` steps behind is ended (its queue gets None), as `peer.runtime.hub` does.
- A task's steps are numbered from 1 in the order reported here (`seq`), across its epochs.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.effects import Note, ProgressHeard

STEP_KINDS = ("model-call", "tool-call", "delegation", "note", "step")
"""What a step is: a model call answered, a tool call returned, a child task asked for, or a
few words a Python role's function reported (`Task.progress`)."""
TASKS_KEPT = 1000
STEPS_KEPT = 200
SUBSCRIBER_QUEUE = 1000

Detail = str | int | float | bool | None
"""A step's field values: what JSON carries as it is."""


@dataclass(frozen=True, slots=True)
class Step:
    """One step of an execution that ran here."""

    task_id: bytes
    epoch: int
    seq: int
    kind: str
    """One of `STEP_KINDS`."""
    time: float
    """Wall-clock seconds."""
    detail: tuple[tuple[str, Detail], ...]
    """The kind's fields (model and tokens, tool name, child id and role), in report order."""


@dataclass(slots=True)
class _TaskSteps:
    recent: deque[Step] = field(default_factory=lambda: deque(maxlen=STEPS_KEPT))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEP_KINDS, 0))


class ProgressLog:
    """The recent steps of the tasks run on one peer, and their subscribers.

    Args:
        wall: wall-clock seconds, stamped on each step.
    """

    def __init__(
        self, wall: Callable[[], float], forward: Callable[[Step], None] | None = None
    ) -> None:
        self._wall = wall
        self.forward = forward
        """Called with each step reported here (not those heard): the driver sends it on."""
        self._tasks: OrderedDict[bytes, _TaskSteps] = OrderedDict()
        self._subscribers: set[asyncio.Queue[Step | None]] = set()

    def report(self, task_id: bytes, epoch: int, kind: str, **detail: Detail) -> Step:
        """Record a step of the execution (`task_id`, `epoch`) and hand it to every subscriber.

        Raises:
            ValueError: `kind` is not one of `STEP_KINDS` (a caller's mistake).
        """
        if kind not in STEP_KINDS:
            raise ValueError(f"a step is one of {', '.join(STEP_KINDS)}, not {kind!r}")
        step = self._record(task_id, epoch, kind, self._wall(), tuple(detail.items()))
        if self.forward is not None:
            self.forward(step)
        return step

    def observe(self, note: Note) -> None:
        """Record the step a `ProgressHeard` note carries (the node accepted it: the sender
        runs the task, submitted here); ignore every other note."""
        # The running peer's time is kept; a kind this version does not know is not recorded.
        if isinstance(note, ProgressHeard) and note.kind in STEP_KINDS:
            self._record(note.task_id, note.epoch, note.kind, note.time, note.detail)

    def _record(
        self,
        task_id: bytes,
        epoch: int,
        kind: str,
        time: float,
        detail: tuple[tuple[str, Detail], ...],
    ) -> Step:
        steps = self._tasks.pop(task_id, None) or _TaskSteps()
        self._tasks[task_id] = steps  # most recently reported last
        while len(self._tasks) > TASKS_KEPT:
            self._tasks.popitem(last=False)
        steps.counts[kind] += 1
        step = Step(task_id, epoch, sum(steps.counts.values()), kind, time, detail)
        steps.recent.append(step)
        for queue in list(self._subscribers):
            if queue.qsize() >= SUBSCRIBER_QUEUE:
                self._end(queue)
            else:
                queue.put_nowait(step)
        return step

    def steps(self, task_id: bytes) -> list[Step]:
        """The recent steps of a task run here, oldest first (empty if none is known)."""
        steps = self._tasks.get(task_id)
        return list(steps.recent) if steps is not None else []

    def counts(self, task_id: bytes) -> dict[str, int] | None:
        """How many steps of each kind a task made here; None if it made none here."""
        steps = self._tasks.get(task_id)
        return dict(steps.counts) if steps is not None else None

    def subscribe(self) -> asyncio.Queue[Step | None]:
        """A queue receiving every step reported from now on; None ends it."""
        queue: asyncio.Queue[Step | None] = asyncio.Queue(SUBSCRIBER_QUEUE + 1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Step | None]) -> None:
        """Stop delivering to `queue`."""
        self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscription (the peer stops)."""
        for queue in list(self._subscribers):
            self._end(queue)

    def _end(self, queue: asyncio.Queue[Step | None]) -> None:
        self._subscribers.discard(queue)
        queue.put_nowait(None)  # the queue has one slot more than the lag limit
