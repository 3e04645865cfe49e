"""Task load for `grapevine simulate`: every peer serves, N tasks submitted at random live peers.

Timeline (virtual seconds; `begin` is when the scenario's membership views converged):
1. At `begin` every running peer serves `ROLE` with `SLOTS` execution slots.
2. Every `LOOK` seconds the load checks whether every running peer sees every started peer
   serving (the preferred executor is only unique where views agree, docs/design.md section
   5); it goes on anyway `VIEW_TIMEOUT` seconds after `begin`. Call that moment `ready`.
3. The tasks are submitted at uniformly random times over the first half of what is left of the
   run after `ready`, each at a random running peer picked when it is submitted; the second half
   lets the last ones finish. Executions last `MIN_DURATION`..`MAX_DURATION` seconds
   (`protocol.sim.task_runner`); the end state is checked by `protocol.sim.task_checker`.

Figures: `done` counts the tasks whose result was accepted at the peer they were submitted at
(where a client waits); `lost` those without a result at any running peer at the end (with a run
too short for its load, unfinished tasks count here too); `duplicates` extra execution starts
(from what ran, not from what the protocol believes). Result latency is from the submission to
the first `ResultAccepted` at the submitting peer.

Invariants: the load's choices come from `random.Random("task-load:<seed>")` and the runner's own
generator, never from the scenario's, so the same scenario with and without tasks schedules the
same crashes, pauses, partitions and broadcasts at the same times (the network's per-message
draws do differ: task messages take their share).
"""

from __future__ import annotations

import functools
import random

from protocol.effects import Note, ResultAccepted
from protocol.sim.figures import Figure, nearest_rank, rounded
from protocol.sim.simulator import SimPeer, Simulator
from protocol.sim.task_checker import TaskChecker
from protocol.sim.task_runner import ROLE, TaskRunner

SLOTS = 4
"""Execution slots of every simulated peer."""
MIN_DURATION = 0.05
MAX_DURATION = 0.5
"""Bounds of an execution's duration, seconds: short, so the task plane's own cost dominates."""
LOOK = 0.5
"""Seconds between two looks at whether every peer sees every other one serving."""
VIEW_TIMEOUT = 60.0
"""Seconds after `begin` after which submissions start even if views still disagree."""


class TaskLoad:
    """Drives `tasks` submissions through a simulated run and reports the task figures.

    Args:
        sim: the simulator; the load registers its runner, checker and observer on it.
        tasks: tasks to submit.
        seed: the seed of the load's choices.
        begin: when to start serving (the scenario's T0).
        end: when the run ends.
    """

    def __init__(self, sim: Simulator, tasks: int, seed: int, begin: float, end: float) -> None:
        self.sim = sim
        self.tasks = tasks
        self.end = end
        self.rng = random.Random(f"task-load:{seed}")
        self.runner = TaskRunner(sim, MIN_DURATION, MAX_DURATION)
        self.checker = TaskChecker(sim, self.runner)
        self.origin: dict[bytes, int] = {}
        """Task id -> index of the peer it was submitted at."""
        self.done_at: dict[bytes, float] = {}
        """Task id -> when its submitting peer first accepted a result."""
        self.begin = begin
        self.ready: float | None = None
        """When submissions were scheduled (views agreed, or the view timeout passed)."""
        sim.observers.append(self._observe)
        sim.at(begin, self._serve)

    def crashed(self, index: int) -> None:
        """Record that the scenario is about to crash peer `index` (what ran there is lost)."""
        self.runner.crashed(index)
        self.checker.crashed(index)

    def figures(self) -> dict[str, Figure]:
        """The task figures of the run; call once, at its end."""
        report = self.checker.report()
        latencies = sorted(t - self.checker.submitted[tid] for tid, t in self.done_at.items())
        return {
            "tasks": report.tasks,
            "done": len(self.done_at),
            "lost": report.lost,
            "duplicates": report.duplicates,
            "executions": report.executions,
            "takeovers": report.takeovers,
            "task_violations": len(report.violations),
            "views_ready_s": rounded(None if self.ready is None else self.ready - self.begin),
            "result_p50_s": rounded(nearest_rank(latencies, 0.5)),
            "result_p99_s": rounded(nearest_rank(latencies, 0.99)),
        }

    def _serve(self) -> None:
        for p in self.sim.running():
            assert p.node is not None
            self.sim.apply(p.index, p.node.serve(self.sim.now, (ROLE,), SLOTS))
        self._look()

    def _look(self) -> None:
        sim = self.sim
        if not self._views_agree() and sim.now + LOOK < self.begin + VIEW_TIMEOUT:
            sim.at(sim.now + LOOK, self._look)
            return
        self.ready = sim.now
        spread = max(0.0, (self.end - sim.now) / 2)
        for k in range(self.tasks):
            at = sim.now + self.rng.uniform(0.0, spread)
            sim.at(at, functools.partial(self._submit, f"sim-{sim.seed}-{k}"))

    def _views_agree(self) -> bool:
        serving = {p.signer.node_id for p in self.sim.peers if p.node is not None}
        for p in self.sim.running():
            assert p.node is not None
            if not serving <= set(p.node.capable(ROLE)):
                return False
        return True

    def _submit(self, key: str) -> None:
        sim = self.sim
        up = sim.running()
        if not up:
            return
        p = up[self.rng.randrange(len(up))]
        assert p.node is not None
        fx, task_id = p.node.submit(sim.now, ROLE, key.encode(), idempotency_key=key)
        self.origin.setdefault(task_id, p.index)
        self.checker.submitted.setdefault(task_id, sim.now)
        sim.apply(p.index, fx)

    def _observe(self, now: float, p: SimPeer, note: Note) -> None:
        if isinstance(note, ResultAccepted) and self.origin.get(note.task_id) == p.index:
            self.done_at.setdefault(note.task_id, now)
