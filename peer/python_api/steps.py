"""Durable steps of a Python role: `await task.step(name, fn, ...)` runs `fn` once per task,
whatever happens to the peer running it.

Theory of operation (issue 13, "Takeovers resume", for Python roles). Each completed step is
recorded as a checkpoint of the run, `{"k":"pystep","n":n,"name":str,"result":json}`, held by
the task's replicas (`peer.agents.checkpoints`). A run that starts where an earlier run of the
task left steps (a takeover at epoch e + 1, or the owner's own re-run after a restart) replays
them: the n-th call of `step` returns the n-th recorded result without calling `fn`, as long
as the names agree; from the first step whose name differs (the code changed, or took another
path) everything runs afresh. This is the durable-function model (Temporal's activities,
Azure Durable Functions): the role's own code between steps must be deterministic for the
replay to line up, and what must not run twice (a model call, a payment) belongs in a step.

Invariants:
- A step's result must be JSON (None, booleans, numbers, text, lists, objects with text
  keys); anything else raises `TypeError` before it is recorded.
- Recording never fails the task: a checkpoint the driver refuses (too large, too many)
  stops the recording for the rest of the run (`Journal`); those steps run again after a
  takeover.
- Only the latest epoch (not above this run's) holding steps is read; within it, records in
  (owner, sequence) order, as the driver keeps them, and a record of step n drops any later
  steps recorded before it (the later branch wins).
- A step resumed from an earlier epoch is recorded again under this run's epoch as a copy when
  it is replayed, so a second takeover resumes from this run's records alone.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from peer.agents.checkpoints import CheckpointPort, CheckpointView, Journal, decode

log = logging.getLogger(__name__)

STEP_KIND = "pystep"
"""The checkpoint kind of a Python role's step."""


def recorded_steps(
    checkpoints: Sequence[CheckpointView], epoch: int
) -> tuple[int | None, list[tuple[str, Any]]]:
    """The steps a run of `epoch` resumes from: (the epoch they were recorded under, the
    results of steps 1..k in order as (name, result)); (None, []) when there are none."""
    by_epoch: dict[int, dict[int, tuple[str, Any]]] = {}
    for c in sorted(checkpoints, key=lambda c: (c.epoch, c.owner, c.seq)):
        if c.epoch > epoch:
            continue
        entry = decode(c.data)
        if entry is None or entry.get("k") != STEP_KIND:
            continue
        n, name = entry.get("n"), entry.get("name")
        if type(n) is not int or n < 1 or not isinstance(name, str) or "result" not in entry:
            continue
        steps = by_epoch.setdefault(c.epoch, {})
        for later in [m for m in steps if m >= n]:
            del steps[later]  # a new record of step n starts a new branch from there
        steps[n] = (name, entry["result"])
    if not by_epoch:
        return None, []
    latest = max(by_epoch)
    steps = by_epoch[latest]
    out: list[tuple[str, Any]] = []
    while len(out) + 1 in steps:
        out.append(steps[len(out) + 1])
    return latest, out


class Steps:
    """The durable steps of one run of a Python role (see the module invariants).

    Args:
        port: where checkpoints are read and recorded (the peer's `Driver`); None keeps no
            steps (each runs every time).
        task_id: the task.
        epoch: the run's epoch.
    """

    def __init__(self, port: CheckpointPort | None, task_id: bytes, epoch: int) -> None:
        self._task_id = task_id
        self._epoch = epoch
        self._journal = Journal(port, task_id, epoch)
        self._loaded: tuple[int | None, list[tuple[str, Any]]] | None = None
        self._next = 1
        self.resumed = 0
        """Steps of this run answered from an earlier run's records."""
        self.ran = 0
        """Steps of this run whose function was called."""

    async def run(
        self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The result of step `name`: recorded by an earlier run, or `fn(*args, **kwargs)`
        (awaited if it returns an awaitable), recorded."""
        if not isinstance(name, str) or not name:
            raise TypeError("a step's name must be non-empty text")
        if self._loaded is None:
            found = recorded_steps(self._journal.held(), self._epoch)
            if found[1]:
                log.info(
                    "task %s epoch %d: %d steps recorded by the run of epoch %s can be replayed",
                    self._task_id.hex()[:16],
                    self._epoch,
                    len(found[1]),
                    found[0],
                )
            self._loaded = found
        n, self._next = self._next, self._next + 1
        at, steps = self._loaded
        if n <= len(steps):
            recorded_name, result = steps[n - 1]
            if recorded_name == name:
                self.resumed += 1
                if at != self._epoch:
                    self._record(n, name, result, copy=True)
                return result
            log.warning(
                "task %s: step %d is %r, an earlier run's was %r: running it and the rest afresh",
                self._task_id.hex()[:16],
                n,
                name,
                recorded_name,
            )
            del steps[n - 1 :]
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            value = await value
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"step {name!r} returned {type(value).__name__}, which is not JSON ({exc}); a "
                "step's result is recorded so that a takeover need not run it again"
            ) from None
        self.ran += 1
        self._record(n, name, value, copy=False)
        await self._journal.saved()  # a step that returned is one a takeover replays
        return value

    def _record(self, n: int, name: str, result: Any, *, copy: bool) -> None:
        entry: dict[str, Any] = {"k": STEP_KIND, "n": n, "name": name, "result": result}
        if copy:
            entry["copy"] = True
        self._journal.record(entry)
