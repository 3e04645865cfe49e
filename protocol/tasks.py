"""Tasks, claim tokens and results: the per-task CRDT and the rules that make work run once.

Theory of operation (docs/design.md section 5 is the specification)
- Per task each peer keeps a state-based CRDT: the signed task record, the greatest claim seen,
  every signed result, a cancel flag and the execution log. Every part merges by set union or
  by max, so the order, loss and duplication of messages do not matter.
- Claims are ordered by (epoch, HRW score of the owner for this task). The HRW score depends
  only on the task id and the owner id, not on anyone's view, so two claims always compare the
  same way everywhere.
- The task's primary for an epoch is the live member able to run it (its gossiped roles) with
  the highest HRW score. With a free slot it claims at once; a full primary passes and claims
  when a slot frees. Nobody else claims without the primary's grant: a standby whose turn came
  with no claim in view (at once if every peer ranked before it is full, else after
  `standby_delay * rank`) asks the primary, which grants each epoch to one peer, durably, and
  answers later askers with that grant or with its claim. So a live primary and two standbys
  never both run the task, whatever their views of each other's free slots; only a primary
  declared dead (or a grantee declared dead before claiming) lets a second grant be made.
- Takeover: only when the claim's owner is declared dead (or left) does the next-ranked live
  peer claim with epoch + 1. The epoch is the fencing token.
- Suspension: an execution waiting on its child tasks may be suspended. It stays owned and
  running for every other rule (fencing, takeover, cancel, complete) but holds no slot, so the
  free slot is advertised and passed tasks are looked at again; resuming takes the slot back at
  once, even beyond `max_running` (a parent never waits for a slot, so a tree cannot deadlock).
- Self-fencing: an executing owner that sees a greater claim, an accepted result other than its
  own, a cancel, or its own isolation from every peer, cancels its execution.
- The accepted result is the completed result whose claim ranks highest. A result ranking below
  the accepted one changes nothing. A change of the accepted result is a "flip" and is counted.
- Claims and results that skip an epoch, and objects whose signature fails, are dropped and
  counted; state is unchanged. A claim or result that arrived before the claim it builds on
  is kept aside (bounded) and applied, verified, when that claim arrives; its sender is asked
  for the chain meanwhile.
- Anti-entropy: with each push-pull a peer sends a digest of every task it holds; the receiver
  answers with its objects for tasks whose digests differ and asks for the sender's.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Protocol, TypeVar, assert_never

from protocol.codec import encode_message
from protocol.effects import (
    CancelExecution,
    Command,
    Dropped,
    PersistKind,
    ResultAccepted,
    StartExecution,
    TaskCancelled,
    TaskClaimed,
    TaskReplicated,
)
from protocol.errors import LocalProtocolError
from protocol.identity import Signer, VerifiedCache
from protocol.membership import Port as MembershipPort
from protocol.placement import ReplicaSets, audience
from protocol.slots import SlotLedger
from protocol.task_messages import (
    MAX_INLINE_PAYLOAD,
    MAX_NONCE,
    Cancel,
    Claim,
    Execution,
    Result,
    TaskAsk,
    TaskDigests,
    TaskGrant,
    TaskHeld,
    TaskMessage,
    TaskRead,
    TaskRecord,
    TaskSync,
    TaskWant,
    task_id_of,
)
from protocol.task_state import END as END
from protocol.task_state import START as START
from protocol.task_state import TaskState as TaskState
from protocol.task_state import claim_rank as claim_rank
from protocol.task_state import hrw_score as hrw_score
from protocol.timers import TaskStandby
from protocol.wire import MAX_NAME_CHARS

DOMAIN_TASK = b"grapevine/task/v1"
DOMAIN_CLAIM = b"grapevine/claim/v1"
DOMAIN_RESULT = b"grapevine/result/v1"
DOMAIN_CANCEL = b"grapevine/cancel/v1"
DOMAIN_EXECUTION = b"grapevine/execution/v1"

LOCAL, STORE = "", "store"
"""The `src` of objects made here (no address is empty, so no peer can pose as it), and of
objects re-applied from the store on restart (verified like any peer's)."""
OUTCOMES = ("ok", "failed", "timeout", "cancelled", "fenced")


class View(Protocol):
    """What the task rules need to know about membership."""

    def is_down(self, node_id: bytes) -> bool: ...
    def capable(self, role: str) -> list[bytes]: ...
    def addr_of(self, node_id: bytes) -> str | None: ...
    def full_since(self, node_id: bytes) -> float | None: ...
    def live_members(self) -> tuple[bytes, ...]: ...
    def advertises(self, node_id: bytes, role: str) -> bool | None: ...


class Port(MembershipPort, Protocol):
    """What the task rules need from the node: membership's port, and three more."""

    def send_to_random(
        self, k: int, messages: list[bytes], exclude: frozenset[bytes] = frozenset()
    ) -> None: ...
    def slots_changed(self) -> None: ...
    def command(self, command: Command) -> None: ...


class Tasks:
    """The task rules of one peer. Driven by `protocol.node.Node`."""

    def __init__(
        self,
        signer: Signer,
        network_id: bytes,
        incarnation: Callable[[], int],
        standby_delay: float,
        replication: int,
        cache: VerifiedCache,
        port: Port,
        view: View,
    ) -> None:
        self.signer = signer
        self.node_id = signer.node_id
        self.network_id = network_id
        self._incarnation = incarnation
        self.standby_delay = standby_delay
        self.replication = replication
        self.cache = cache
        self.port = port
        self.view = view
        self.replicas = ReplicaSets(replication + 1)
        self._repaired_for: tuple[bytes, ...] = ()
        self._sync_due: dict[bytes, tuple[float, float]] = {}
        """Tasks that changed lately -> (next replica sync, its interval); see `_sync`."""
        self._next_sync = 0.0
        """The live membership the audiences of open tasks were last repaired for."""
        self.tasks: dict[bytes, TaskState] = {}
        self.slots: SlotLedger[bytes, int] = SlotLedger()
        """Tasks executing here, by id, with the epoch they run under; suspended ones (waiting
        on their children) hold no slot."""
        self.open: set[bytes] = set()
        """Tasks with a record and neither an accepted result nor a cancel."""
        self.children: dict[bytes, set[bytes]] = {}
        """Parent task id -> ids of the held tasks whose record names it."""
        self.roles: frozenset[str] = frozenset()
        self.passed: set[bytes] = set()
        """Tasks we were first in line for but passed for lack of a free slot."""
        self.max_running = 0
        """Executions this peer runs at once before it passes its turn to standbys."""
        self.quiet_until = 0.0
        """After a stall no claim is made before this time: what we missed arrives first."""
        self.counters: Counter[str] = Counter()
        self.last_down = 0.0
        """When a member last went down: the standby order of unclaimed tasks changed then."""
        self._parked: dict[tuple[str, bytes, int, bytes], tuple[Claim | Result, bytes, str]] = {}
        """Claims and results that arrived before the claim they build on, oldest first."""
        self._parked_by_task: dict[bytes, list[tuple[str, bytes, int, bytes]]] = {}
        self._rankings: dict[bytes, tuple[list[bytes], list[bytes], dict[bytes, int]]] = {}
        """Open tasks' candidates as last seen, their HRW order, and every HRW score computed
        for the task (see `_ranking`)."""
        self._armed: dict[bytes, float] = {}
        """The pending wake-up (`TaskStandby`) of each task, by the time it is armed for."""
        self._unsettled: dict[bytes, None] = {}
        """Tasks to decide on once the current input is fully applied (see `settle`)."""

    # Commands from the host.

    def submit(
        self,
        now: float,
        role: str,
        data: bytes,
        *,
        priority: int = 0,
        parent: bytes = b"",
        idempotency_key: str = "",
        nonce: bytes = b"",
        timeout: float = 0.0,
        created: float = 0.0,
    ) -> TaskRecord:
        """Create, sign and disseminate a task; an existing task with the same id is returned.

        Raises:
            LocalProtocolError: a field is out of bounds.
        """
        if not 0 < len(role) <= MAX_NAME_CHARS or len(idempotency_key) > MAX_NAME_CHARS:
            raise LocalProtocolError(f"role and idempotency key must be 1..{MAX_NAME_CHARS} chars")
        if len(data) > MAX_INLINE_PAYLOAD:
            raise LocalProtocolError(f"task input must be at most {MAX_INLINE_PAYLOAD} bytes")
        if priority < 0 or timeout < 0 or len(nonce) > MAX_NONCE or len(parent) not in (0, 32):
            raise LocalProtocolError("priority and timeout must be >= 0, nonce <= 16 bytes")
        if not idempotency_key and not nonce:
            raise LocalProtocolError("a task needs an idempotency key or a nonce")
        task_id = task_id_of(
            self.node_id,
            idempotency_key,
            nonce,
            role,
            hashlib.sha256(data).digest(),
            priority,
            parent,
            float(timeout),
        )
        known = self.tasks.get(task_id)
        if known is not None and known.record is not None:
            return known.record
        unsigned = TaskRecord(
            self.signer.public_key,
            float(created),
            role,
            data,
            priority,
            parent,
            idempotency_key,
            nonce,
            float(timeout),
            b"",
            task_id,
            self.node_id,
        )
        record = _with_sig(unsigned, self.signer.sign(DOMAIN_TASK, unsigned.signed_payload()))
        self._apply_task(now, record, encode_message(record), local=True)
        return record

    def complete(
        self,
        now: float,
        task_id: bytes,
        epoch: int,
        outcome: str,
        output: bytes,
        usage: tuple[int, int, int] = (0, 0, 0),
    ) -> Result | None:
        """Record the end of a local execution; None if it had been fenced meanwhile.

        Raises:
            LocalProtocolError: unknown outcome or oversize output.
        """
        if outcome not in OUTCOMES:
            raise LocalProtocolError(f"outcome must be one of {OUTCOMES}")
        if len(output) > MAX_INLINE_PAYLOAD:
            raise LocalProtocolError(f"output must be at most {MAX_INLINE_PAYLOAD} bytes")
        if self.slots.running.get(task_id) != epoch:
            return None
        self.slots.finish(task_id)
        self.port.slots_changed()
        self._log(now, task_id, epoch, END, outcome)
        payload = Result(
            task_id, epoch, self.signer.public_key, outcome, output, usage, b"", self.node_id
        )
        result = _with_sig(payload, self.signer.sign(DOMAIN_RESULT, payload.signed_payload()))
        raw = encode_message(result)
        self._apply_result(now, result, raw, src=LOCAL)
        self._deliver_to_waiters(task_id, epoch, raw)
        self._slot_freed(now)
        return result

    def _deliver_to_waiters(self, task_id: bytes, epoch: int, raw: bytes) -> None:
        # The task's origin (where its client waits) and the owner of its parent task (waiting
        # on this child) need the result first. Gossip gets it there too, but each broadcast is
        # sent only a few times: under load its queue holds it back for seconds, and after a
        # crash some copies go to the dead peer, so a waiter could wait for anti-entropy. Send
        # it (with its claim) directly.
        st = self.tasks[task_id]
        mine = st.claims.get((epoch, self.node_id))
        if st.record is None or mine is None:
            return
        waiters = {st.record.origin}
        parent = self.tasks.get(st.record.parent)
        parent_claim = parent.claim if parent is not None else None
        if parent_claim is not None:
            waiters.add(parent_claim.owner)
        # The execution-log entries too, so a waiter sees start and end before the result.
        log = [st.executions.get((epoch, self.node_id, phase)) for phase in (START, END)]
        batch = [encode_message(mine)] + [encode_message(e) for e in log if e is not None]
        for node_id in sorted(waiters - st.sent_to - {self.node_id}):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self.port.send(addr, [*batch, raw], piggyback=False)

    def cancel(self, now: float, task_id: bytes, reason: str) -> bool:
        """Cancel a task network-wide; False if the task is unknown or already final.

        Raises:
            LocalProtocolError: this peer is neither the task's origin nor its parent's owner.
        """
        st = self.tasks.get(task_id)
        if st is None or st.accepted is not None or st.cancel is not None:
            return False
        if st.record is None or not self._may_cancel(st.record, self.node_id):
            origin = st.record.origin.hex() if st.record is not None else "unknown"
            raise LocalProtocolError(
                f"only the task's origin (peer {origin}) or its parent's owner may cancel it"
            )
        payload = Cancel(
            task_id, self.signer.public_key, reason[:MAX_NAME_CHARS], b"", self.node_id
        )
        cancel = _with_sig(payload, self.signer.sign(DOMAIN_CANCEL, payload.signed_payload()))
        self._apply_cancel(now, cancel, encode_message(cancel), src=LOCAL)
        return True

    def fetch(self, task_ids: list[bytes]) -> None:
        """Ask the peers that hold these tasks for every object of them and of their children:
        the replica set, and for a task held here its claim's owner and its origin (the
        origins of its children, when they are delegated from its execution)."""
        live = self.view.live_members()
        targets: dict[bytes, list[bytes]] = {}
        for tid in task_ids[:_MAX_WANT]:
            peers = set(self.replicas.of(tid, live))
            st = self.tasks.get(tid)
            if st is not None and st.record is not None:
                peers.add(st.record.origin)
            if st is not None and st.claim is not None:
                peers.add(st.claim.owner)
            for node_id in peers - {self.node_id}:
                targets.setdefault(node_id, []).append(tid)
        for node_id, ids in sorted(targets.items()):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self.port.send(addr, [encode_message(TaskRead(tuple(ids)))], piggyback=False)

    def _may_cancel(self, record: TaskRecord, by: bytes) -> bool:
        """A cancel is honoured only from the task's origin or its parent's owner."""
        if by == record.origin:
            return True
        parent = self.tasks.get(record.parent) if record.parent else None
        return parent is not None and parent.claim is not None and parent.claim.owner == by

    def suspend(self, now: float, task_id: bytes) -> bool:
        """Release the slot of a running execution that waits (on its child tasks): the free
        slot is advertised and tasks passed for lack of one are looked at again. It stays
        running for every other rule. False if it is not running here or already suspended."""
        if not self.slots.suspend(task_id):
            return False
        self.port.slots_changed()
        self._slot_freed(now)
        return True

    def resume(self, now: float, task_id: bytes) -> bool:
        """Take the slot of a suspended execution back at once, even beyond `max_running`:
        waiting for a slot here could deadlock a tree of tasks. False if it is not suspended."""
        if not self.slots.resume(task_id):
            return False
        self.port.slots_changed()
        return True

    @property
    def running(self) -> dict[bytes, int]:
        """Tasks executing here, by id, with the epoch they run under (suspended included)."""
        return self.slots.running

    @property
    def suspended(self) -> set[bytes]:
        """Running tasks that wait on their children and hold no slot."""
        return self.slots.suspended

    def free_slots(self) -> int:
        """Execution slots free here under `max_running`."""
        return self.slots.free(self.max_running)

    def reevaluate(self, now: float) -> None:
        """Look at every open task again, highest priority first (a slot freed, roles or
        membership changed)."""

        for tid in sorted(self.open, key=self._urgency):
            self._evaluate(now, self.tasks[tid])

    def view_changed(self) -> None:
        """Roles or free slots advertised by a peer changed: look at open tasks again."""
        for tid in sorted(self.open):
            self._unsettled[tid] = None

    def settle(self, now: float) -> None:
        """Decide on the tasks the input just applied touched, highest priority first.

        Deciding only after a whole envelope is applied matters: an anti-entropy batch carries
        a task record before its claims, and the record alone would look unclaimed."""
        self._repair()
        if now >= self._next_sync:
            self._next_sync = now + _SYNC_TICK
            self._sync(now)
        touched = [t for t in self._unsettled if t in self.tasks]
        self._unsettled.clear()
        for tid in sorted(touched, key=self._urgency):
            self._evaluate(now, self.tasks[tid])

    def hold(self) -> None:
        """Restored from the store after a restart: our view of the network is empty, so every
        owner looks dead and every task unclaimed. Decide nothing until `release`."""
        self.quiet_until = math.inf

    def release(self, now: float) -> None:
        """We joined: decide again after a standby delay, once what we missed has arrived."""
        if self.quiet_until == math.inf:
            self.quiet_until = now + self.standby_delay
            self.reevaluate(now)

    def _slot_freed(self, now: float) -> None:
        waiting = sorted(self.passed & self.open, key=self._urgency)
        self.passed.clear()
        for tid in waiting:
            self._evaluate(now, self.tasks[tid])

    def _urgency(self, task_id: bytes) -> tuple[int, float, bytes]:
        # Highest priority first, then first come, first served: by id alone, a task whose id
        # sorts last waited for as long as others kept arriving (seconds under steady load).
        # The id breaks ties, so the order never depends on set iteration (hash randomisation
        # would make simulated runs differ between processes).
        st = self.tasks[task_id]
        return (-st.record.priority if st.record is not None else 0, st.first_seen, task_id)

    def on_stall(self, now: float, quiet: float | None = None) -> None:
        """We were frozen: let the claims made meanwhile reach us before claiming anything,
        for `quiet` seconds (a standby delay by default)."""
        wait = self.standby_delay if quiet is None else quiet
        self.quiet_until = max(self.quiet_until, now + wait)

    def on_member_down(self, now: float, node_id: bytes) -> None:
        """A member was declared dead or left: take over its claims in rank order. Standbys
        of unclaimed tasks move up a rank, so their wait restarts: the new first in line must
        get its turn before the next one steps in."""
        self.last_down = now
        for st in self.tasks.values():
            if st.claim is not None and st.claim.owner == node_id and st.accepted is None:
                st.owner_down_at = now
            if st.task_id in self.open:
                self._unsettled[st.task_id] = None

    def on_isolated(self, now: float, until: float) -> None:
        """We reach no one: others will declare us dead and take our work over, so stop it,
        and claim nothing before `until` (the next look) plus a standby delay."""
        self.quiet_until = max(self.quiet_until, until + self.standby_delay)
        for task_id, epoch in list(self.slots.running.items()):
            self._fence(now, task_id, epoch, "isolated")

    def on_standby(self, now: float, task_id: bytes, at: float) -> None:
        if self._armed.get(task_id) != at:
            return  # superseded by an earlier wake-up, which has looked or will look again
        del self._armed[task_id]
        st = self.tasks.get(task_id)
        if st is not None:
            self._evaluate(now, st)

    def _wake(self, task_id: bytes, at: float) -> None:
        # Every look at an open task may ask to look again later, and a busy network changes
        # the view (and so causes looks) many times a second: keep one wake-up per task, the
        # earliest, or timers pile up by the thousand (seen with 100 peers and 1,000 tasks).
        armed = self._armed.get(task_id)
        if armed is not None and armed <= at:
            return
        self._armed[task_id] = at
        self.port.schedule(at, TaskStandby(task_id, at))

    # Input from peers (or from the store on restart, with `replay`).

    def dispatch(self, now: float, src: str, sender: bytes, msg: TaskMessage, raw: bytes) -> None:
        """Apply one task message."""
        match msg:
            case TaskRecord():
                self._apply_task(now, msg, raw, local=False)
            case Claim():
                self._apply_claim(now, msg, raw, src)
            case Result():
                self._apply_result(now, msg, raw, src)
            case Cancel():
                self._apply_cancel(now, msg, raw, src)
            case Execution():
                self._apply_execution(now, msg, raw, src)
            case TaskHeld(task_id):
                self._on_held(task_id, sender)
            case TaskDigests():
                self._on_digests(src, sender, msg)
            case TaskSync():
                self._on_sync(src, msg)
            case TaskWant(ids):
                self._send_objects(src, ids)
            case TaskRead(ids):
                self._send_objects(src, self._with_children(ids))
            case TaskAsk(task_id, epoch):
                self._on_ask(now, src, sender, task_id, epoch)
            case TaskGrant(task_id, epoch, grantee):
                self._on_grant(task_id, epoch, grantee, src)
            case _:
                assert_never(msg)

    def digests(self, partner: bytes | None) -> TaskDigests:
        """The anti-entropy summary sent with a push-pull to `partner`: the tasks held here whose
        replica set (in our view) includes it. Its size follows what the two share, not the
        network's history (None, an unknown partner: nothing)."""
        if partner is None:
            return TaskDigests(())
        live = self.view.live_members()
        return TaskDigests(
            tuple(
                (tid, st.digest())
                for tid, st in self.tasks.items()
                if partner in self.replicas.of(tid, live)
            )
        )

    # Placement: who receives a task's objects.

    def audience(self, st: TaskState) -> set[bytes]:
        """The peers that must receive the objects of `st` directly (see `protocol.placement`)."""
        return self._audience(st) - {self.node_id}

    def told_of(self, task_id: bytes) -> bool:
        """Whether this peer is in the task's audience (its news reaches it unasked)."""
        st = self.tasks.get(task_id)
        return st is not None and self.node_id in self._audience(st)

    def _audience(self, st: TaskState) -> set[bytes]:
        replicas = self.replicas.of(st.task_id, self.view.live_members())
        candidates: list[bytes] = []
        if st.record is not None:
            candidates = self._candidates(st, 1 if st.claim is None else st.claim.epoch + 1)
        return audience(st, replicas, candidates, b"")

    def replica_set(self, task_id: bytes) -> list[bytes]:
        """The task's replica set in our view, its arbiter first."""
        return self.replicas.of(task_id, self.view.live_members())

    def _spread(self, st: TaskState, raws: list[bytes]) -> None:
        # Objects made here go to the task's audience directly, and nowhere else: gossiping
        # them to every peer made a task cost O(N) (decision 17).
        targets = self.audience(st)
        for node_id in sorted(targets - {self.node_id}):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self.port.send(addr, raws, piggyback=False)
        st.sent_to |= targets

    def _changed(self, task_id: bytes, now: float) -> None:
        self._sync_due[task_id] = (now + _SYNC_FIRST, _SYNC_FIRST)

    def _sync(self, now: float) -> None:
        # A task object goes to each replica once, directly; one lost on the way would wait for
        # a random push-pull to pair the right two peers. So after a task changes, its replicas
        # compare digests of it with each other (and with its origin) a few times, backing off
        # (2, 8, 32 s): cheap where nothing was lost, and repair within seconds where it was.
        due = sorted(t for t, (at, _) in self._sync_due.items() if at <= now)
        if not due:
            return
        live = self.view.live_members()
        batches: dict[bytes, list[tuple[bytes, bytes]]] = {}
        for tid in due:
            _, interval = self._sync_due.pop(tid)
            st = self.tasks.get(tid)
            if st is None:
                continue
            if interval * _SYNC_BACKOFF <= _SYNC_LAST:
                self._sync_due[tid] = (now + interval * _SYNC_BACKOFF, interval * _SYNC_BACKOFF)
            replicas = self.replicas.of(tid, live)
            targets = set(replicas)
            if self.node_id in replicas and st.record is not None:
                targets.add(st.record.origin)
            for node_id in targets - {self.node_id}:
                batches.setdefault(node_id, []).append((tid, st.digest()))
        for node_id, entries in sorted(batches.items()):
            addr = self.view.addr_of(node_id)
            for k in range(0, len(entries), _MAX_WANT):
                if addr is not None:
                    msg = encode_message(TaskSync(tuple(entries[k : k + _MAX_WANT])))
                    self.port.send(addr, [msg], piggyback=False)

    def _on_sync(self, src: str, msg: TaskSync) -> None:
        want: list[bytes] = []
        differ: list[bytes] = []
        for tid, digest in msg.entries:
            st = self.tasks.get(tid)
            if st is None or st.digest() != digest:
                want.append(tid)
                if st is not None:
                    differ.append(tid)
        self._send_objects(src, differ)
        if want:
            self.port.send(src, [encode_message(TaskWant(tuple(want[:_MAX_WANT])))], False)

    def _relay(self, st: TaskState, raw: bytes, src: str, author: bytes) -> None:
        # The origin sent the record to the audience of its view; a claimer's view of that
        # audience may differ (a peer's roles or liveness not yet known to it), and a record
        # holder that never hears of the claim would claim too. So the origin hands claims and
        # results on to every peer it sent the record to. Receivers drop known objects before
        # verifying them: a copy costs bytes, not a signature check.
        if src == STORE or st.record is None or st.record.origin != self.node_id:
            return
        for node_id in sorted(st.sent_to - {author}):
            addr = self.view.addr_of(node_id)
            if addr is not None and addr != src:
                self.port.send(addr, [raw], piggyback=False)

    def _repair(self) -> None:
        # The live membership changed: the arbiter of each open task (first of its replica set)
        # sends what it holds to audience members that never got it (a new replica, the next
        # standby after one died). Final tasks reach new replicas through anti-entropy.
        live = self.view.live_members()
        if live == self._repaired_for:
            return
        self._repaired_for = live
        for tid in sorted(self.open):
            st = self.tasks[tid]
            if st.record is None or self.replicas.of(tid, live)[0] != self.node_id:
                continue
            missing = self.audience(st) - st.sent_to
            if missing:
                self.counters["audience repairs"] += 1
                self._send_objects_to(missing, tid)
                st.sent_to |= missing

    def _send_objects_to(self, node_ids: set[bytes], task_id: bytes) -> None:
        for node_id in sorted(node_ids):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self._send_objects(addr, [task_id])

    # Rules.

    def _state(self, task_id: bytes, now: float) -> TaskState:
        st = self.tasks.get(task_id)
        if st is None:
            st = self.tasks[task_id] = TaskState(task_id, now)
        return st

    def _verified(
        self, domain: bytes, key: bytes, payload: bytes, sig: bytes, src: str, what: str
    ) -> bool:
        if self.cache.verify(domain, self.network_id, key, payload, sig):
            return True
        self.counters[f"bad signature: {what}"] += 1
        self.port.note(Dropped(src, f"{what} with a bad signature"))
        return False

    def _apply_task(self, now: float, rec: TaskRecord, raw: bytes, local: bool) -> None:
        st = self.tasks.get(rec.task_id)
        if st is not None and st.record is not None:
            return
        if not local and not self._verified(
            DOMAIN_TASK, rec.origin_key, rec.signed_payload(), rec.sig, "peer", "task record"
        ):
            return
        st = self._state(rec.task_id, now)
        st.record = rec
        st.touch()
        self._changed(st.task_id, now)
        if rec.parent:
            self.children.setdefault(rec.parent, set()).add(rec.task_id)
        if st.accepted is None and st.cancel is None:
            self.open.add(rec.task_id)
        self.port.persist(PersistKind.TASK, rec.task_id, raw)
        if local:
            self._spread(st, [raw])
        elif self.replica_set(rec.task_id)[:1] == [self.node_id]:
            st.sent_to = self.audience(st)  # the origin sent it there: repair only what changes
        if not local and rec.origin != self.node_id:
            addr = self.view.addr_of(rec.origin)
            if addr is not None:
                self.port.send(addr, [encode_message(TaskHeld(rec.task_id))], piggyback=False)
        self._unsettled[rec.task_id] = None

    def acknowledge_unreplicated(self, task_id: bytes) -> None:
        """Replication 0: the submission is acknowledged as soon as it is durable here."""
        st = self.tasks[task_id]
        if not st.replicated:
            st.replicated = True
            self.port.note(TaskReplicated(task_id, 0))

    def copies_needed(self) -> int:
        """Other peers that must hold a task record (or an input blob) before a submission is
        acknowledged: `replication`, or every other live member in a smaller network; a peer
        alone has no one to hold a copy, so its submissions are never acknowledged."""
        others = len(self.view.live_members()) - 1
        return max(1, min(self.replication, others))

    def _on_held(self, task_id: bytes, sender: bytes) -> None:
        st = self.tasks.get(task_id)
        if st is None or st.record is None or st.record.origin != self.node_id:
            return
        st.holders.add(sender)
        if not st.replicated and len(st.holders) >= self.copies_needed():
            st.replicated = True
            self.port.note(TaskReplicated(task_id, len(st.holders)))

    def _apply_claim(self, now: float, c: Claim, raw: bytes, src: str) -> None:
        held = self.tasks.get(c.task_id)
        claims = held.claims if held is not None else {}
        if (c.epoch, c.owner) in claims:
            return
        if c.epoch == 0 or (c.epoch > 1 and not any(e == c.epoch - 1 for e, _ in claims)):
            # A takeover names the epoch after one it saw; without that claim here it is
            # either forged or ahead of what reached us, so ask its sender for the chain.
            self.counters["claim skips an epoch"] += 1
            self.port.note(Dropped(src, "claim skips an epoch"))
            self._park(("claim", c.task_id, c.epoch, c.owner), c, raw, src)
            return
        # Only a peer serving the task's role may own it. A peer whose advertisement has not
        # reached us yet is given the benefit of the doubt: its state follows.
        if (
            src not in (LOCAL, STORE)
            and held is not None
            and held.record is not None
            and self.view.advertises(c.owner, held.record.role) is False
        ):
            self.counters["claim from a peer not serving the role"] += 1
            self.port.note(Dropped(src, "claim from a peer not serving the task's role"))
            return
        if src != LOCAL and not self._verified(
            DOMAIN_CLAIM, c.owner_key, c.signed_payload(), c.sig, src, "claim"
        ):
            return
        st = self._state(c.task_id, now)
        st.claims[(c.epoch, c.owner)] = c
        st.touch()
        self._changed(st.task_id, now)
        self.port.persist(PersistKind.CLAIM, c.task_id + c.epoch.to_bytes(8, "big") + c.owner, raw)
        if src == LOCAL:
            self._spread(st, [raw])
        else:
            self._relay(st, raw, src, c.owner)
        self._unpark(now, c.task_id)
        current = st.claim
        if current is not None and claim_rank(c.task_id, c.epoch, c.owner) < claim_rank(
            current.task_id, current.epoch, current.owner
        ):
            self.counters["superseded claims"] += 1
            return
        st.claim = c
        st.owner_down_at = now if self.view.is_down(c.owner) else None
        self.port.note(TaskClaimed(c.task_id, c.owner, c.epoch))
        mine = self.slots.running.get(c.task_id)
        if mine is not None and c.owner != self.node_id:
            self._fence(now, c.task_id, mine, "superseded by a greater claim")
        self._unsettled[c.task_id] = None

    def _apply_result(self, now: float, r: Result, raw: bytes, src: str) -> None:
        held = self.tasks.get(r.task_id)
        if held is not None and (r.epoch, r.owner) in held.results:
            return
        if held is None or (r.epoch, r.owner) not in held.claims:
            # Every result is made under a claim its owner published first; a result
            # without one is forged or ahead of its claim, so ask its sender for the chain.
            self.counters["result without its claim"] += 1
            self.port.note(Dropped(src, "result without its claim"))
            self._park(("result", r.task_id, r.epoch, r.owner), r, raw, src)
            return
        if src != LOCAL and not self._verified(
            DOMAIN_RESULT, r.owner_key, r.signed_payload(), r.sig, src, "result"
        ):
            return
        st = held
        st.results[(r.epoch, r.owner)] = r
        st.touch()
        self._changed(st.task_id, now)
        self.port.persist(PersistKind.RESULT, r.task_id + r.epoch.to_bytes(8, "big") + r.owner, raw)
        if src == LOCAL:
            self._spread(st, [raw])
        else:
            self._relay(st, raw, src, r.owner)
        acc = st.accepted
        if acc is not None and claim_rank(r.task_id, r.epoch, r.owner) < claim_rank(
            acc.task_id, acc.epoch, acc.owner
        ):
            self.counters["result of a losing claim"] += 1
            return
        flipped = acc is not None
        st.accepted = r
        self.open.discard(r.task_id)
        self._rankings.pop(r.task_id, None)
        if flipped:
            self.counters["result flips"] += 1
        self.port.note(ResultAccepted(r.task_id, r.epoch, r.owner, r.outcome, flipped))
        mine = self.slots.running.get(r.task_id)
        if mine is not None:
            self._fence(now, r.task_id, mine, "a result was accepted")

    def _park(
        self, key: tuple[str, bytes, int, bytes], obj: Claim | Result, raw: bytes, src: str
    ) -> None:
        # The node skips a message it saw recently, so the same bytes re-sent in answer to our
        # TaskWant would never reach us again: keep the early object until what it builds on
        # arrives (unverified: it is verified when applied). Bounded against floods; an evicted
        # object comes back through anti-entropy.
        if key in self._parked:
            return
        self._parked[key] = (obj, raw, src)
        self._parked_by_task.setdefault(key[1], []).append(key)
        if len(self._parked) > _PARKED_MAX:
            oldest = next(iter(self._parked))
            del self._parked[oldest]
            self._parked_by_task[oldest[1]].remove(oldest)
            if not self._parked_by_task[oldest[1]]:
                del self._parked_by_task[oldest[1]]
            self.counters["parked objects evicted"] += 1
        self._ask(src, key[1])

    def _unpark(self, now: float, task_id: bytes) -> None:
        keys = self._parked_by_task.pop(task_id, None)
        for key in keys or ():
            parked = self._parked.pop(key, None)
            if parked is None:
                continue
            obj, raw, src = parked
            if isinstance(obj, Claim):
                self._apply_claim(now, obj, raw, src)
            else:
                self._apply_result(now, obj, raw, src)

    def _ask(self, src: str, task_id: bytes) -> None:
        if src not in (LOCAL, STORE):
            self.port.send(src, [encode_message(TaskWant((task_id,)))], piggyback=False)

    def _apply_cancel(self, now: float, c: Cancel, raw: bytes, src: str) -> None:
        st = self.tasks.get(c.task_id)
        if st is not None and st.cancel is not None:
            return
        if st is None or st.record is None:
            # Who may cancel is decided by the record: ask for it (the cancel comes with it).
            self.counters["cancel before its record"] += 1
            self.port.note(Dropped(src, "cancel of a task whose record is not held"))
            self._ask(src, c.task_id)
            return
        if not self._may_cancel(st.record, c.by):
            self.counters["cancel by neither origin nor parent owner"] += 1
            self.port.note(
                Dropped(src, "cancel signed by neither the origin nor the parent's owner")
            )
            return
        if src != LOCAL and not self._verified(
            DOMAIN_CANCEL, c.by_key, c.signed_payload(), c.sig, src, "cancel"
        ):
            return
        st.cancel = c
        st.touch()
        self._changed(st.task_id, now)
        self.open.discard(c.task_id)
        self._rankings.pop(c.task_id, None)
        self.port.note(TaskCancelled(c.task_id, c.by, c.reason))
        self.port.persist(PersistKind.CANCEL, c.task_id, raw)
        if src == LOCAL:
            self._spread(st, [raw])
        mine = self.slots.running.get(c.task_id)
        if mine is not None:
            self._fence(now, c.task_id, mine, "cancelled")

    def _apply_execution(self, now: float, e: Execution, raw: bytes, src: str) -> None:
        key = (e.epoch, e.owner, e.phase)
        held = self.tasks.get(e.task_id)
        if held is not None and key in held.executions:
            return
        if src != LOCAL and not self._verified(
            DOMAIN_EXECUTION, e.owner_key, e.signed_payload(), e.sig, src, "execution entry"
        ):
            return
        st = self._state(e.task_id, now)
        st.executions[key] = e
        st.touch()
        self._changed(st.task_id, now)
        self.port.persist(
            PersistKind.EXECUTION,
            e.task_id + e.epoch.to_bytes(8, "big") + e.owner + bytes([e.phase]),
            raw,
        )
        if src == LOCAL:
            self._spread(st, [raw])

    # Decisions.

    def _evaluate(self, now: float, st: TaskState) -> None:
        rec = st.record
        if rec is None or st.accepted is not None or st.cancel is not None:
            return
        if st.task_id in self.slots.running or rec.role not in self.roles:
            return
        if now < self.quiet_until:
            if self.quiet_until != math.inf:
                self._wake(st.task_id, self.quiet_until)
            return
        claim = st.claim
        if claim is not None and claim.owner == self.node_id:
            if (claim.epoch, self.node_id) not in st.results:
                self._start(now, st, claim.epoch)  # resume our own claim after a restart
            return
        if claim is None:
            epoch, since = 1, max(st.first_seen, self.last_down)
        elif self.view.is_down(claim.owner):
            epoch, since = claim.epoch + 1, st.owner_down_at or now
        else:
            return
        ranked = self._candidates(st, epoch)
        if self.node_id not in ranked:
            return
        rank = ranked.index(self.node_id)
        granted = st.grants.get(epoch)
        if granted is not None and granted != self.node_id and not self.view.is_down(granted):
            return  # the primary let another peer claim this epoch
        if rank > 0 and granted != self.node_id:
            self._stand_by(now, st, epoch, since, ranked, rank)
        elif not self.slots.has_room(self.max_running):
            self.passed.add(st.task_id)  # a slot freeing here, or a standby's ask, moves it on
        else:
            self._claim(now, st, epoch)  # the claim goes to the task's audience

    def _stand_by(
        self, now: float, st: TaskState, epoch: int, since: float, ranked: list[bytes], rank: int
    ) -> None:
        # A standby steps in only with the primary's grant. Its turn comes at once when every
        # peer ranked before it looks full (the usual case under load), else after a standby
        # delay per rank: by then the claim of a peer before it has normally arrived, and asking
        # heals one that was lost. With no free slot it passes and asks when one frees.
        if any(self.view.full_since(n) is None for n in ranked[:rank]):
            due = since + rank * self.standby_delay
            if now < due:
                self._wake(st.task_id, due)
                return
        if not self.slots.has_room(self.max_running):
            self.passed.add(st.task_id)
            return
        addr = self.view.addr_of(ranked[0])
        if addr is not None:
            self.counters["grants asked"] += 1
            msg = encode_message(TaskAsk(st.task_id, epoch))
            self.port.send(addr, [msg], piggyback=False)
        self._wake(st.task_id, now + self.standby_delay * _ASK_RETRY)

    def _candidates(self, st: TaskState, epoch: int) -> list[bytes]:
        """Live peers able to run `epoch` of the task in HRW order, its primary first (for a
        takeover, without the owner it takes over from)."""
        assert st.record is not None
        claim = st.claim
        exclude = claim.owner if epoch > 1 and claim is not None else b""
        capable = self.view.capable(st.record.role)
        return self._ranking(st.task_id, [n for n in capable if n != exclude])

    def _on_ask(self, now: float, src: str, sender: bytes, task_id: bytes, epoch: int) -> None:
        st = self.tasks.get(task_id)
        if st is None or st.record is None:
            self._ask(src, task_id)  # we cannot rank peers for a task we do not hold
            return
        claim = st.claim
        if st.accepted is not None or st.cancel is not None or (claim and claim.epoch >= epoch):
            self._send_objects(src, [task_id])  # what the asker missed answers it
            return
        if epoch < 1 or (epoch > 1 and (claim is None or claim.epoch != epoch - 1)):
            self._ask(src, task_id)  # it knows a claim we lack
            return
        if self.quiet_until == math.inf:
            return  # restored, not yet joined: our view of who is primary means nothing yet
        ranked = self._candidates(st, epoch)
        if not ranked or ranked[0] != self.node_id:
            return  # not the primary in our view; the asker's view will catch up
        grantee = st.grants.get(epoch)
        if grantee is None or (grantee != sender and self.view.is_down(grantee)):
            grantee = sender
            self.counters["grants made"] += 1
            self._record_grant(st, epoch, grantee)
        grant = encode_message(TaskGrant(task_id, epoch, grantee))
        self.port.send(src, [grant], piggyback=False)

    def _record_grant(self, st: TaskState, epoch: int, grantee: bytes) -> None:
        st.grants[epoch] = grantee
        raw = encode_message(TaskGrant(st.task_id, epoch, grantee))
        self.port.persist(PersistKind.GRANT, st.task_id + epoch.to_bytes(8, "big"), raw)

    def _on_grant(self, task_id: bytes, epoch: int, grantee: bytes, src: str) -> None:
        st = self.tasks.get(task_id)
        if st is None or epoch < 1:
            return
        known = st.grants.get(epoch)
        if known is not None and known != grantee and not self.view.is_down(known):
            # Two peers each took themselves for the primary (their views of who is alive
            # differed): keep the first grant, so at most the two grantees run it.
            self.counters["conflicting grants"] += 1
            return
        st.grants[epoch] = grantee
        if src == STORE:
            return  # a grant we made before a restart; nothing to decide until we join
        self._unsettled[task_id] = None

    def _ranking(self, task_id: bytes, candidates: list[bytes]) -> list[bytes]:
        # An open task is looked at whenever a peer's roles or fullness change; hashing every
        # candidate (HRW) each time cost a quarter of a peer's CPU with 100 peers and 1,000
        # open tasks. Scores never change, and candidates only as members come and go.
        cached = self._rankings.get(task_id)
        if cached is not None and cached[0] == candidates:
            return cached[1]
        scores = cached[2] if cached is not None else {}
        for n in candidates:
            if n not in scores:
                scores[n] = hrw_score(task_id, n)
        ranked = sorted(candidates, key=scores.__getitem__, reverse=True)
        self._rankings[task_id] = (candidates, ranked, scores)
        return ranked

    def _claim(self, now: float, st: TaskState, epoch: int) -> None:
        payload = Claim(
            st.task_id, self.signer.public_key, self._incarnation(), epoch, b"", self.node_id
        )
        claim = _with_sig(payload, self.signer.sign(DOMAIN_CLAIM, payload.signed_payload()))
        if st.claim is not None:
            self.counters["takeovers"] += 1
        self._apply_claim(now, claim, encode_message(claim), src=LOCAL)
        self._start(now, st, epoch)  # at once: the slot is taken before the next decision

    def _start(self, now: float, st: TaskState, epoch: int) -> None:
        rec = st.record
        assert rec is not None
        self.slots.start(st.task_id, epoch)
        self.port.slots_changed()
        self._log(now, st.task_id, epoch, START, "")
        self.port.command(
            StartExecution(
                st.task_id, epoch, rec.role, rec.input, rec.priority, rec.timeout, rec.parent
            )
        )

    def _fence(self, now: float, task_id: bytes, epoch: int, reason: str) -> None:
        if self.slots.running.get(task_id) != epoch:
            return
        self.slots.finish(task_id)
        self.port.slots_changed()
        self.counters["fenced"] += 1
        self._log(now, task_id, epoch, END, "fenced")
        self.port.command(CancelExecution(task_id, epoch, reason))
        self._slot_freed(now)

    def _log(self, now: float, task_id: bytes, epoch: int, phase: int, outcome: str) -> None:
        payload = Execution(
            task_id, epoch, self.signer.public_key, phase, outcome or "start", b"", self.node_id
        )
        entry = _with_sig(payload, self.signer.sign(DOMAIN_EXECUTION, payload.signed_payload()))
        self._apply_execution(now, entry, encode_message(entry), LOCAL)

    # Anti-entropy.

    def _on_digests(self, src: str, sender: bytes, msg: TaskDigests) -> None:
        differ = [
            tid for tid, d in msg.entries if tid not in self.tasks or self.tasks[tid].digest() != d
        ]
        theirs = {tid for tid, _ in msg.entries}
        live = self.view.live_members()
        mine_only = [
            tid for tid in self.tasks if tid not in theirs and sender in self.replicas.of(tid, live)
        ]
        self._send_objects(src, differ + mine_only)
        if differ:
            self.port.send(src, [encode_message(TaskWant(tuple(differ[:_MAX_WANT])))], False)

    def _with_children(self, task_ids: Iterable[bytes]) -> list[bytes]:
        # A reader asking for a task wants its tree too: the children held here (this peer
        # submitted them, running the task) follow it, a bounded number per task.
        out: list[bytes] = []
        for tid in task_ids:
            out.append(tid)
            out.extend(sorted(self.children.get(tid, ()))[:_MAX_CHILDREN_SENT])
        return out

    def _send_objects(self, addr: str, task_ids: Iterable[bytes]) -> None:
        batch: list[bytes] = []
        size = 0
        for tid in task_ids:
            st = self.tasks.get(tid)
            if st is None:
                continue
            for obj in st.objects():
                raw = encode_message(obj)
                batch.append(raw)
                size += len(raw)
                if size > _SYNC_BATCH_BYTES:
                    self.port.send(addr, batch, piggyback=False)
                    batch, size = [], 0
        if batch:
            self.port.send(addr, batch, piggyback=False)


_ASK_RETRY = 0.25
"""A standby that asked the primary for a grant asks again after this many standby delays."""
_MAX_WANT = 10_000
_MAX_CHILDREN_SENT = 1024
"""Children of an asked-for task sent with it (a tree read; deeper levels are asked for)."""
_SYNC_TICK = 0.5
"""How often due replica syncs are sent (seconds)."""
_SYNC_FIRST, _SYNC_BACKOFF, _SYNC_LAST = 2.0, 4.0, 32.0
"""A changed task's replicas compare it after 2 s, then 8 s, then 32 s (see `_sync`)."""
_PARKED_MAX = 4096
"""Claims and results kept while they wait for the claim they build on (see `_park`)."""
_SYNC_BATCH_BYTES = 512 * 1024


_Signed = TypeVar("_Signed", TaskRecord, Claim, Result, Cancel, Execution)


def _with_sig(obj: _Signed, sig: bytes) -> _Signed:
    return replace(obj, sig=sig)
