"""A simulated task executor: runs what `StartExecution` asks for, for a random while.

Invariants:
- Durations come from one `random.Random` derived from the simulator's seed, drawn in the
  order executions start, so a seed replays the same executions exactly.
- An execution ends in exactly one way: completed (`Node.complete` called, its effects applied
  through the simulator), cancelled (`CancelExecution` arrived first) or lost (its peer crashed
  or restarted before it finished). A paused peer's execution finishes when the peer resumes.
- Every start and end is kept in `log`, across peers and lives, so duplicates are counted from
  what ran rather than from what the protocol believes ran.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import assert_never

from protocol.effects import CancelExecution, Command, PersistKind, StartExecution
from protocol.sim.simulator import SimPeer, Simulator

_PAUSED_RETRY = 0.05
"""Seconds between looks at a paused peer whose execution is due."""
ROLE = "worker"
"""The role every simulated peer serves."""


@dataclass(slots=True)
class Run:
    """One execution: `peer` (in its `life`) ran `task_id` under `epoch`."""

    task_id: bytes
    epoch: int
    peer: int
    life: int
    started: float
    ended: float | None = None
    outcome: str = "running"
    """running, completed, cancelled (fenced or cancelled by the protocol) or lost (crash)."""


class TaskRunner:
    """Executes tasks at simulated peers.

    Args:
        sim: the simulator; the runner registers itself as an executor of commands.
        min_duration: shortest execution, seconds.
        max_duration: longest execution, seconds.
    """

    def __init__(self, sim: Simulator, min_duration: float = 0.05, max_duration: float = 2.0):
        self.sim = sim
        self.rng = random.Random(f"task-runner:{sim.seed}")
        self.min_duration = min_duration
        self.max_duration = max_duration
        self.log: list[Run] = []
        self._running: dict[tuple[int, bytes], Run] = {}
        sim.executors.append(self._execute)

    def output_of(self, run: Run) -> bytes:
        """What an execution produces: distinct per (task, epoch, peer), so flips show."""
        return hashlib.sha256(b"%d:%d:" % (run.epoch, run.peer) + run.task_id).digest()

    def crashed(self, index: int) -> None:
        """Peer `index` crashed: what ran there is lost. Call before `Simulator.crash`."""
        for key in list(self._running):
            if key[0] == index:
                self._end(key, "lost")

    def _execute(self, now: float, p: SimPeer, command: Command) -> None:
        match command:
            case StartExecution(task_id, epoch):
                key = (p.index, task_id)
                if key in self._running:
                    self._end(key, "lost")  # restarted under the same claim: the old run is gone
                run = Run(task_id, epoch, p.index, p.life, now)
                self.log.append(run)
                self._running[key] = run
                duration = self.rng.uniform(self.min_duration, self.max_duration)
                self.sim.at(now + duration / 2, lambda: self._step(run))
                self.sim.at(now + duration, lambda: self._finish(run))
            case CancelExecution(task_id, epoch):
                key = (p.index, task_id)
                current = self._running.get(key)
                if current is not None and current.epoch == epoch:
                    self._end(key, "cancelled")
            case _:
                assert_never(command)

    def _step(self, run: Run) -> None:
        # Halfway through, a run records one step (a checkpoint), as an agent does after each
        # model call, so checkpoints travel, are stored and restored under every fault.
        p = self.sim.peers[run.peer]
        if self._running.get((run.peer, run.task_id)) is not run or p.node is None or p.paused:
            return
        if p.life != run.life or p.node.tasks.running.get(run.task_id) != run.epoch:
            return
        fx, _ = p.node.checkpoint(self.sim.now, run.task_id, run.epoch, b"halfway")
        self.sim.apply(run.peer, fx)

    def _finish(self, run: Run) -> None:
        key = (run.peer, run.task_id)
        if self._running.get(key) is not run:
            return
        p = self.sim.peers[run.peer]
        if p.node is None or p.life != run.life:
            self._end(key, "lost")
            return
        if p.paused:
            self.sim.at(self.sim.now + _PAUSED_RETRY, lambda: self._finish(run))
            return
        self._end(key, "completed")
        fx = p.node.complete(self.sim.now, run.task_id, run.epoch, "ok", self.output_of(run))
        self.sim.apply(run.peer, fx)

    def _end(self, key: tuple[int, bytes], outcome: str) -> None:
        run = self._running.pop(key)
        run.ended = self.sim.now
        run.outcome = outcome


STORED_ORDER = (
    PersistKind.TASK,
    PersistKind.CANCEL,
    PersistKind.EPOCH_GRANT,
    PersistKind.CLAIM,
    PersistKind.CHECKPOINT,
    PersistKind.RESULT,
    PersistKind.GRANT,
)
"""Kinds of durable task objects, in the order a restarted peer re-applies them: a claim needs
its task and the claim of the epoch before; a checkpoint or a result needs its claim."""


def restart(sim: Simulator, index: int, roles: tuple[str, ...], max_running: int) -> None:
    """Restart crashed peer `index` as the peer/ shell does: restore every stored task object,
    then serve (which resumes own claims left without a result)."""
    sim.restart(index)
    p = sim.peers[index]
    node = p.node
    assert node is not None
    stored = sorted(
        ((STORED_ORDER.index(kind), key, value) for (kind, key), value in p.durable.items()
         if kind in STORED_ORDER)
    )  # fmt: skip
    for _, _, raw in stored:
        sim.apply(index, node.restore(sim.now, raw))
    sim.apply(index, node.serve(sim.now, roles, max_running))
