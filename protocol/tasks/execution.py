"""Execution: applying the claim rule's decisions, and the life of an execution here.

Invariants:
- Every decision about a task comes from `protocol.tasks.claim_rule.decide`; this module only
  applies it (claim, resume, pass, ask the primary, wake up later).
- A claim made here is applied and its execution started at once, so the slot is taken before
  the next decision. The claim is the run's start and the result its end: no separate log.
- Resuming our own claim after a restart signs it again under our new incarnation, so the
  re-run is a run of its own and counted (decision 23).
- An execution ends exactly once: completed (a result), or fenced (a greater claim, an
  accepted result, a cancel, isolation); a fenced or stale completion changes nothing.
- Suspension: an execution waiting on its child tasks may be suspended. It stays owned and
  running for every other rule (fencing, takeover, cancel, complete) but holds no slot, so the
  free slot is advertised and passed tasks are looked at again; resuming takes the slot back at
  once, even beyond `max_running` (a parent never waits for a slot, so a tree cannot deadlock).
- A slot freeing here looks again at the tasks passed for lack of one, most urgent first.
"""

from __future__ import annotations

from typing import assert_never

from protocol.codec import encode_message
from protocol.effects import CancelExecution, StartExecution
from protocol.errors import LocalProtocolError
from protocol.tasks.claim_rule import (
    AskGrant,
    MakeClaim,
    Nothing,
    Pass,
    Resume,
    Wait,
    ask_retry_after,
    decide,
)
from protocol.tasks.core import LOCAL
from protocol.tasks.merge import Merge
from protocol.tasks.messages import (
    DOMAIN_CHECKPOINT,
    DOMAIN_CLAIM,
    DOMAIN_RESULT,
    MAX_CHECKPOINT_BYTES,
    MAX_CHECKPOINTS,
    MAX_INLINE_PAYLOAD,
    OUTCOMES,
    Checkpoint,
    Claim,
    Result,
    TaskAsk,
    with_signature,
)
from protocol.tasks.state import TaskState


class Executions(Merge):
    """Decisions applied, and executions started, completed, fenced, suspended and resumed."""

    @property
    def running(self) -> dict[bytes, int]:
        """Tasks executing here, by id, with the epoch they run under (suspended included)."""
        return self.slots.running

    @property
    def suspended(self) -> set[bytes]:
        """Running tasks that wait on their children and hold no slot."""
        return self.slots.suspended

    def is_running(self, task_id: bytes) -> bool:
        """Whether the task executes here (suspended or not)."""
        return task_id in self.slots.running

    def has_room(self) -> bool:
        """Whether a slot is free here under `max_running`."""
        return self.slots.has_room(self.max_running)

    def evaluate(self, now: float, st: TaskState) -> None:
        """Decide what to do about the task (see `claim_rule`) and do it."""
        decision = decide(self.view, st, now, self)
        if not isinstance(decision, AskGrant):
            self.asks_made.pop(st.task_id, None)
        match decision:
            case Nothing():
                if st.grants:
                    self.hand_on(now, st)  # our grantee may not have got the task yet
            case Wait(until):
                self.wake(st.task_id, until)
            case Resume(epoch):
                self._resume(now, st, epoch)
            case Pass():
                self.passed.add(st.task_id)
                self.hand_on(now, st)
            case MakeClaim(epoch):
                self._claim(now, st, epoch)  # the claim goes to the task's audience
            case AskGrant(grantor, epoch, retry_at):
                if grantor == self.node_id:
                    # We arbitrate this takeover ourselves: grant it (or learn to whom it
                    # went) and decide again.
                    self.grant_takeover(now, st, epoch, self.node_id, None)
                    self.wake(st.task_id, retry_at)
                    return
                self.ask(now, st, grantor, epoch, retry_at - now)
            case _ as unreachable:
                assert_never(unreachable)

    def ask(self, now: float, st: TaskState, grantor: bytes, epoch: int, span: float) -> None:
        """Ask `grantor` for a grant of `epoch`, unless we asked it lately, and look again when
        the next ask is due: `span` after the first ask to it, then twice, four times, up to
        `ASK_BACKOFF_MAX` times as long (decision 95)."""
        # The claim rule looks at a waiting task whenever anything it depends on changes, and
        # an unanswered ask mostly waits in a crowded peer's input: asking again at once, or
        # every `span` for as long as it waits, only lengthens that queue.
        prior = self.asks_made.get(st.task_id)
        if prior is not None and prior[0] == grantor and now < prior[2]:
            self.wake(st.task_id, prior[2])
            return
        in_a_row = prior[1] + 1 if prior is not None and prior[0] == grantor else 1
        next_at = now + span * ask_retry_after(in_a_row)
        self.asks_made[st.task_id] = (grantor, in_a_row, next_at)
        addr = self.view.addr_of(grantor)
        if addr is not None:
            self.counters["grants asked"] += 1
            msg = encode_message(TaskAsk(st.task_id, epoch))
            self.port.send(addr, [msg], piggyback=False)
        self.wake(st.task_id, next_at)

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
        payload = Result(
            task_id, epoch, self.signer.public_key, outcome, output, usage, b"", self.node_id
        )
        result = with_signature(payload, self.signer.sign(DOMAIN_RESULT, payload.signed_payload()))
        raw = encode_message(result)
        self.apply_result(now, result, raw, src=LOCAL)
        self._deliver_to_waiters(task_id, epoch, raw)
        self._slot_freed(now)
        return result

    def checkpoint(self, now: float, task_id: bytes, epoch: int, data: bytes) -> Checkpoint:
        """Record step `data` of this peer's run of `task_id` under `epoch`, numbered after
        the steps of that epoch it already recorded (including those of earlier runs of the
        same epoch, before a restart).

        Raises:
            LocalProtocolError: this peer does not run the task under `epoch` (not claimed
                here, fenced, or ended), `data` is over `MAX_CHECKPOINT_BYTES`, or the run
                has `MAX_CHECKPOINTS` already.
        """
        if len(data) > MAX_CHECKPOINT_BYTES:
            raise LocalProtocolError(f"a checkpoint must be at most {MAX_CHECKPOINT_BYTES} bytes")
        st = self.tasks.get(task_id)
        if st is None or self.slots.running.get(task_id) != epoch:
            raise LocalProtocolError("this peer does not run the task under that epoch")
        seq = 1 + max(
            (n for e, o, n in st.checkpoints if (e, o) == (epoch, self.node_id)), default=0
        )
        if seq > MAX_CHECKPOINTS:
            raise LocalProtocolError(f"a run keeps at most {MAX_CHECKPOINTS} checkpoints")
        payload = Checkpoint(task_id, epoch, seq, self.signer.public_key, data, b"", self.node_id)
        signed = with_signature(
            payload, self.signer.sign(DOMAIN_CHECKPOINT, payload.signed_payload())
        )
        self.apply_checkpoint(now, signed, encode_message(signed), src=LOCAL)
        return signed

    def _deliver_to_waiters(self, task_id: bytes, epoch: int, raw: bytes) -> None:
        # The task's origin (where its client waits) and the owner of its parent task (waiting
        # on this child) need the result first. Gossip gets it there too, but each broadcast is
        # sent only a few times: under load its queue holds it back for seconds, and after a
        # crash some copies go to the dead peer, so a waiter could wait for anti-entropy. Send
        # it (with its claim) directly.
        st = self.tasks[task_id]
        runs = [c for (e, o, _), c in st.claims.items() if (e, o) == (epoch, self.node_id)]
        mine = max(runs, key=lambda c: c.owner_incarnation, default=None)
        if st.record is None or mine is None:
            return
        waiters = {st.record.origin}
        parent = self.tasks.get(st.record.parent)
        parent_claim = parent.claim if parent is not None else None
        if parent_claim is not None:
            waiters.add(parent_claim.owner)
        batch = [encode_message(mine)]
        for node_id in sorted(waiters - st.sent_to - {self.node_id}):
            addr = self.view.addr_of(node_id)
            if addr is not None:
                self.port.send(addr, [*batch, raw], piggyback=False)

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

    def free_slots(self) -> int:
        """Execution slots free here under `max_running`."""
        return self.slots.free(self.max_running)

    def _slot_freed(self, now: float) -> None:
        waiting = sorted(self.passed & self.open, key=self.urgency)
        self.passed.clear()
        for tid in waiting:
            self.evaluate(now, self.tasks[tid])

    def _claim(self, now: float, st: TaskState, epoch: int) -> None:
        if st.claim is not None:
            self.counters["takeovers"] += 1
        self._sign_claim(now, st, epoch)
        self._start(now, st, epoch)  # at once: the slot is taken before the next decision

    def _resume(self, now: float, st: TaskState, epoch: int) -> None:
        # Our claim, made before a restart, has no result: run it again as a run of its own
        # (our new incarnation), so the re-execution is counted wherever the claim goes.
        if (epoch, self.node_id, self.incarnation()) not in st.claims:
            self.counters["runs resumed after a restart"] += 1
            self._sign_claim(now, st, epoch)
        self._start(now, st, epoch)

    def _sign_claim(self, now: float, st: TaskState, epoch: int) -> None:
        payload = Claim(
            st.task_id, self.signer.public_key, self.incarnation(), epoch, b"", self.node_id
        )
        claim = with_signature(payload, self.signer.sign(DOMAIN_CLAIM, payload.signed_payload()))
        self.apply_claim(now, claim, encode_message(claim), src=LOCAL)

    def _start(self, now: float, st: TaskState, epoch: int) -> None:
        rec = st.record
        assert rec is not None
        self.slots.start(st.task_id, epoch)
        self.port.slots_changed()
        self.port.command(
            StartExecution(
                st.task_id, epoch, rec.role, rec.input, rec.priority, rec.timeout, rec.parent
            )
        )

    def fence(self, now: float, task_id: bytes, epoch: int, reason: str) -> None:
        """Stop our execution of `epoch` of the task, if it still runs: its slot frees and the
        host is told to cancel it (the run reads as "fenced": see `TaskState.runs`)."""
        if self.slots.running.get(task_id) != epoch:
            return
        self.slots.finish(task_id)
        self.port.slots_changed()
        self.counters["fenced"] += 1
        self.port.command(CancelExecution(task_id, epoch, reason))
        self._slot_freed(now)
