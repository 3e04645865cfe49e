"""Task invariants of a simulated run, checked after healing and quiescence.

Invariants checked (docs/design.md section 5), on every running peer:
- every submitted task has an accepted result (else it is lost, or not yet converged);
- its replica set (the top replication + 1 running peers by HRW score) and its origin hold
  the same accepted (epoch, owner, output digest), and so does any other peer holding one;
- it is the highest-ranked result among all results any peer holds;
- every task object held verifies under its author's key, and none of the forged objects
  injected during the run was kept;
- every duplicate execution is explained: between the task's submission and the new start,
  the peer starting it or a peer that ran it before crashed, was declared dead by some peer,
  was held dead in the other's view (a declaration from before, not yet refuted), the peer
  starting it held dead a peer ranked above it for the task (so it was first in line in its
  view: a primary that had handed its turn to another standby and was then declared dead, seed
  2951), or a partition was in effect (gossip then also wastes sends on the cut-off side, so a
  claim can miss a standby on its own side). docs/design.md section 5: duplicates need a
  crash, a partition or a stall longer than the failure-detection time.

Counted: executions, duplicates, result flips, fenced aborts, takeovers, lost tasks.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field

from protocol.effects import (
    CancelExecution,
    Command,
    MemberDown,
    MemberJoined,
    MemberRecovered,
    Note,
    ResultAccepted,
    TaskClaimed,
)
from protocol.identity import VerifiedCache
from protocol.sim.simulator import SimPeer, Simulator
from protocol.sim.task_runner import Run, TaskRunner
from protocol.tasks.messages import (
    DOMAIN_CHECKPOINT,
    DOMAIN_CLAIM,
    DOMAIN_EPOCH_GRANT,
    DOMAIN_RESULT,
    DOMAIN_TASK,
    Checkpoint,
    Claim,
    EpochGrant,
    Result,
    TaskRecord,
)
from protocol.tasks.placement import top_by_score
from protocol.tasks.state import claim_rank, hrw_score


@dataclass(slots=True)
class TaskReport:
    """The task figures of one run; `violations` empty means every invariant held."""

    tasks: int = 0
    executions: int = 0
    duplicates: int = 0
    flips: int = 0
    fenced: int = 0
    takeovers: int = 0
    lost: int = 0
    declared_dead: int = 0
    violations: list[str] = field(default_factory=list)

    def add(self, other: TaskReport) -> None:
        """Accumulate `other` into this report."""
        for name in ("tasks", "executions", "duplicates", "flips", "fenced", "takeovers"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lost += other.lost
        self.declared_dead += other.declared_dead
        self.violations.extend(other.violations)


class TaskChecker:
    """Watches a run's task notifications and checks the end state.

    Args:
        sim: the simulator (the checker registers itself as an observer).
        runner: the executor whose log holds what actually ran.
    """

    def __init__(self, sim: Simulator, runner: TaskRunner) -> None:
        self.sim = sim
        self.runner = runner
        self.submitted: dict[bytes, float] = {}
        """Task id -> when it was (first) submitted."""
        self.forged: set[bytes] = set()
        """Signatures of forged objects injected during the run."""
        self.crashes: list[tuple[float, int]] = []
        self.downs: list[tuple[float, bytes]] = []
        self.flips = 0
        self.fenced = 0
        self.epochs: set[tuple[bytes, int]] = set()
        self.partitions: list[tuple[float, float, list[set[int]]]] = []
        self.held_dead: list[tuple[int, bytes, float, float]] = []
        """(observer, subject, from, to): `observer` held `subject` dead over that time."""
        self._dead_since: dict[tuple[int, bytes], float] = {}
        sim.observers.append(self._observe)
        sim.executors.append(self._on_command)

    def crashed(self, index: int) -> None:
        """Record that the scenario crashed peer `index` now."""
        self.crashes.append((self.sim.now, index))
        for observer, subject in [k for k in self._dead_since if k[0] == index]:
            self._undead(observer, subject)

    def _undead(self, observer: int, subject: bytes) -> None:
        since = self._dead_since.pop((observer, subject), None)
        if since is not None:
            self.held_dead.append((observer, subject, since, self.sim.now))

    def partitioned(self, sides: list[list[int]]) -> None:
        """Record that the scenario cut the network into `sides` now (until `healed`)."""
        self.partitions.append((self.sim.now, float("inf"), [set(side) for side in sides]))

    def healed(self) -> None:
        """Record that the scenario ended the partition now."""
        if self.partitions and self.partitions[-1][1] == float("inf"):
            start, _, sides = self.partitions[-1]
            self.partitions[-1] = (start, self.sim.now, sides)

    def _observe(self, now: float, p: SimPeer, note: Note) -> None:
        match note:
            case MemberDown(node_id):
                self.downs.append((now, node_id))
                self._dead_since.setdefault((p.index, node_id), now)
            case MemberRecovered(node_id) | MemberJoined(node_id):
                self._undead(p.index, node_id)
            case ResultAccepted(flipped=True):
                self.flips += 1
            case TaskClaimed(task_id, _, epoch) if epoch > 1:
                self.epochs.add((task_id, epoch))
            case _:
                pass

    def _on_command(self, now: float, p: SimPeer, command: Command) -> None:
        if isinstance(command, CancelExecution):
            self.fenced += 1

    def report(self) -> TaskReport:
        """Check the end state of every running peer; call after healing and quiescence."""
        rep = TaskReport(
            tasks=len(self.submitted),
            executions=len(self.runner.log),
            flips=self.flips,
            fenced=self.fenced,
            takeovers=len(self.epochs),
            declared_dead=len(self.downs),
        )
        peers = self.sim.running()
        cache = VerifiedCache()
        network = self.sim.config.network_id
        for p in peers:
            assert p.node is not None
            for st in p.node.tasks.tasks.values():
                for obj in st.objects():
                    problem = _bad_object(obj, cache, network, self.forged)
                    if problem:
                        rep.violations.append(f"peer {p.index} holds {problem}")
        for task_id in self.submitted:
            self._check_task(task_id, peers, rep)
        self._check_duplicates(rep)
        return rep

    def _check_task(self, task_id: bytes, peers: list[SimPeer], rep: TaskReport) -> None:
        name = task_id.hex()[:8]
        k = self.sim.config.tasks.replication + 1
        replicas = set(top_by_score(task_id, [p.signer.node_id for p in peers], k))
        held: dict[tuple[int, bytes], Result] = {}
        accepted: Counter[tuple[int, bytes, bytes] | None] = Counter()
        origin: bytes | None = None
        for p in peers:
            assert p.node is not None
            st = p.node.tasks.tasks.get(task_id)
            if st is not None and st.record is not None:
                origin = st.record.origin
        for p in peers:
            assert p.node is not None
            st = p.node.tasks.tasks.get(task_id)
            # The task's replicas and its origin must hold the accepted result; any other
            # peer holding one (an executor, a reader) must hold the same.
            must_hold = p.signer.node_id in replicas or p.signer.node_id == origin
            if st is None or st.accepted is None:
                if st is not None:
                    held.update(st.results)
                if must_hold:
                    accepted[None] += 1
                continue
            held.update(st.results)
            acc = st.accepted
            accepted[(acc.epoch, acc.owner, hashlib.sha256(acc.output).digest())] += 1
        self._check_runs_counted(task_id, peers, rep)
        if not held:
            rep.lost += 1
            rep.violations.append(f"task {name} lost: no result anywhere")
            return
        if len(accepted) != 1 or None in accepted:
            rep.violations.append(f"task {name}: replicas disagree or lack a result: {accepted}")
            return
        best = max(held.values(), key=lambda r: claim_rank(task_id, r.epoch, r.owner))
        [(epoch, owner, _)] = [k for k in accepted if k is not None]
        if (epoch, owner) != (best.epoch, best.owner):
            rep.violations.append(f"task {name}: accepted result is not the highest-ranked")

    def _check_runs_counted(self, task_id: bytes, peers: list[SimPeer], rep: TaskReport) -> None:
        # Every run is its claim (epoch, owner, incarnation), so the runs the peers hold
        # between them must cover every run a running peer made in any of its lives (a peer
        # that crashed for good may take an unsent claim with it).
        counted: set[tuple[int, bytes, int]] = set()
        for p in peers:
            assert p.node is not None
            st = p.node.tasks.tasks.get(task_id)
            if st is not None:
                counted.update(st.claims)
        running = {p.index for p in peers}
        made = {(r.peer, r.life, r.epoch) for r in self.runner.log if r.task_id == task_id}
        made = {m for m in made if m[0] in running}
        if len(counted) < len(made):
            rep.violations.append(
                f"task {task_id.hex()[:8]}: {len(made)} runs made, {len(counted)} counted"
            )

    def _check_duplicates(self, rep: TaskReport) -> None:
        by_task: dict[bytes, list[Run]] = {}
        for run in self.runner.log:
            by_task.setdefault(run.task_id, []).append(run)
        for task_id, runs in by_task.items():
            for k, run in enumerate(runs[1:], start=1):
                rep.duplicates += 1
                since = self.submitted.get(task_id, 0.0)
                if not any(
                    self._explains(q.peer, run.peer, since, run.started) for q in runs[:k]
                ) and not self._ranked_above_held_dead(task_id, run.peer, since, run.started):
                    rep.violations.append(
                        f"task {task_id.hex()[:8]}: execution at peer {run.peer} (epoch "
                        f"{run.epoch}) at {run.started:.2f}s follows peer {runs[k - 1].peer}'s "
                        f"without a crash, a death declaration or a partition"
                    )
        rep.violations.extend(_unique_ids(self.sim))

    def _explains(self, q: int, peer: int, t0: float, t1: float) -> bool:
        """Between t0 and t1, did `q` or `peer` crash or get declared dead, or was the network
        partitioned?"""
        ids = {self.sim.peers[q].signer.node_id, self.sim.peers[peer].signer.node_id}
        held = self.held_dead + [(o, n, t, math.inf) for (o, n), t in self._dead_since.items()]
        return (
            any(o in (q, peer) and n in ids and t <= t1 and u >= t0 for o, n, t, u in held)
            or any(i in (q, peer) and t0 <= t <= t1 for t, i in self.crashes)
            or any(n in ids and t0 <= t <= t1 for t, n in self.downs)
            or any(start <= t1 and end >= t0 for start, end, _ in self.partitions)
        )

    def _ranked_above_held_dead(self, task_id: bytes, peer: int, t0: float, t1: float) -> bool:
        """Between t0 and t1, did `peer` hold dead a peer ranked above it to run the task? It
        claims the task then as the first live candidate in its view (every campaign peer
        serves the role): a declared death of the primary, whose grant of epoch 1 to another
        peer it may not know of, lets two peers run it (seed 2951: the primary handed its
        turn to one standby and was declared dead at another)."""
        ids = [p.signer.node_id for p in self.sim.peers]
        ranked = sorted(ids, key=lambda n: hrw_score(task_id, n), reverse=True)
        above = set(ranked[: ranked.index(self.sim.peers[peer].signer.node_id)])
        held = self.held_dead + [(o, n, t, math.inf) for (o, n), t in self._dead_since.items()]
        return any(o == peer and n in above and t <= t1 and u >= t0 for o, n, t, u in held)


def _unique_ids(sim: Simulator) -> list[str]:
    ids = {p.signer.node_id for p in sim.peers}
    return [] if len(ids) == len(sim.peers) else ["two simulated peers share a node id"]


def _bad_object(
    obj: object, cache: VerifiedCache, network: bytes, forged: set[bytes]
) -> str | None:
    match obj:
        case TaskRecord():
            key, domain, payload, sig = obj.origin_key, DOMAIN_TASK, obj.signed_payload(), obj.sig
        case Claim():
            key, domain, payload, sig = obj.owner_key, DOMAIN_CLAIM, obj.signed_payload(), obj.sig
        case Result():
            key, domain, payload, sig = obj.owner_key, DOMAIN_RESULT, obj.signed_payload(), obj.sig
        case EpochGrant():
            key, domain = obj.arbiter_key, DOMAIN_EPOCH_GRANT
            payload, sig = obj.signed_payload(), obj.sig
        case Checkpoint():
            key, domain = obj.owner_key, DOMAIN_CHECKPOINT
            payload, sig = obj.signed_payload(), obj.sig
        case _:
            return None
    if sig in forged:
        return f"an injected forgery ({type(obj).__name__})"
    if not cache.verify(domain, network, key, payload, sig):
        return f"an object with a bad signature ({type(obj).__name__})"
    return None
