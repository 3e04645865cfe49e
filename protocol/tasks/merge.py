"""The per-task merge: how records, claims, results and cancels are applied.

Invariants (docs/design.md section 5 is the specification):
- Per task each peer keeps a state-based CRDT (`protocol.tasks.state.TaskState`); every part
  merges by set union or by max, so the order, loss and duplication of messages do not matter.
  A known object is dropped before its signature is checked: a copy costs bytes, not a check.
- Nothing creates state before the signature and the rules check out; a rejected object is
  counted and noted as `Dropped`, state unchanged.
- A claim of epoch e > 1 needs a claim of e - 1; a result needs its claim. A claim is a run
  (epoch, owner, incarnation): an owner re-running its epoch under a new incarnation adds a run
  (at most `RUNS_PER_EPOCH` per owner and epoch), so every re-execution is counted. One that arrives
  before what it builds on is kept aside (bounded, oldest evicted first) and applied, verified,
  when that arrives; its sender is asked for the chain meanwhile.
- A claim of epoch e > 1 needs the arbiter's signed grant of e naming its owner
  (`EpochGrant`, decision 25), signed by a member that may be the task's arbiter
  (`may_arbitrate`); one that arrives before its grant is kept aside like one before its
  chain.
- A peer that advertises it does not serve the task's role may not claim it.
- The current claim is the greatest by (epoch, HRW score of the owner); the accepted result is
  the completed result whose claim ranks highest. A change of the accepted result is a "flip"
  and is counted.
- A cancel is valid only from the task's origin or its parent's owner.
- Two records of one task (one idempotency key submitted at two peers) merge by
  `protocol.tasks.idempotency.kept_record`: same spec, the first by a total order everywhere;
  another spec, the one held (its origin is answered with it and refuses its submission).
- Self-fencing: an executing owner that sees a greater claim, an accepted result or a cancel
  stops its execution.
- Every object applied is persisted; objects made here go to the task's audience, and the
  origin relays the claims and results it receives (see `protocol.tasks.repair`).
"""

from __future__ import annotations

from protocol.codec import encode_message
from protocol.effects import (
    Dropped,
    PersistKind,
    ResultAccepted,
    SubmissionConflicted,
    TaskCancelled,
    TaskClaimed,
    TaskReplicated,
)
from protocol.tasks.core import LOCAL, STORE, Parkable, ParkedKey
from protocol.tasks.idempotency import kept_record, spec_of
from protocol.tasks.messages import (
    DOMAIN_CANCEL,
    DOMAIN_CHECKPOINT,
    DOMAIN_CLAIM,
    DOMAIN_EPOCH_GRANT,
    DOMAIN_RESULT,
    DOMAIN_TASK,
    Cancel,
    Checkpoint,
    Claim,
    EpochGrant,
    Result,
    TaskHeld,
    TaskRecord,
)
from protocol.tasks.retention import Retention
from protocol.tasks.state import TaskState, claim_rank

RUNS_PER_EPOCH = 16
"""Runs (claims under distinct incarnations) kept per owner and epoch. An honest owner adds
one per restart while its claim has no result; more are refused, so a member cannot grow a
task's state without bound by re-signing its claim."""
PARKED_MAX = 4096
"""Objects kept while they wait for what they build on (see `_park`)."""
ASK_INTERVAL = 1.0
"""Least seconds between two asks for what a task's parked objects build on (see `_park`)."""


class Merge(Retention):
    """The receiver's checks and the merge of each kind of task object."""

    def may_cancel(self, record: TaskRecord, by: bytes, outcome: str = "cancelled") -> bool:
        """A cancel is honoured only from the task's origin or its parent's owner, or, ending
        it `failed`, from a member of its home when its record has a queue timeout (decision
        58: the home ends a queued task its origin no longer can)."""
        if by == record.origin:
            return True
        parent = self.tasks.get(record.parent) if record.parent else None
        if parent is not None and parent.claim is not None and parent.claim.owner == by:
            return True
        return (
            outcome == "failed"
            and record.queue_timeout > 0
            and self.may_arbitrate(record.task_id, by)
        )

    def apply_task(self, now: float, rec: TaskRecord, raw: bytes, local: bool) -> None:
        st = self.tasks.get(rec.task_id)
        held = st.record if st is not None else None
        if held is not None and held.sig == rec.sig:
            return
        if not local and not self.verified(
            DOMAIN_TASK, rec.origin_key, rec.signed_payload(), rec.sig, "peer", "task record"
        ):
            return
        if st is not None and held is not None:
            self._merge_record(now, st, held, rec, raw, local)
            return
        st = self.state_of(rec.task_id, now)
        st.record = rec
        st.touch()
        self.mark_changed(st.task_id, now)
        if rec.parent:
            self.children.setdefault(rec.parent, set()).add(rec.task_id)
        if st.accepted is None and st.cancel is None:
            self.open.add(rec.task_id)
        self.port.persist(PersistKind.TASK, rec.task_id, raw)
        self._unpark(now, rec.task_id)  # grants that came before the record
        if local:
            self.unspread[rec.task_id] = raw  # sent once settled (`spread_submitted`)
        elif self.replica_set(rec.task_id)[:1] == [self.node_id]:
            st.sent_to = self.audience(st)  # the origin sent it there: repair only what changes
        if not local and rec.origin != self.node_id:
            # Told once the input is settled (`owe_held`): a claim we make then tells it too.
            self.held_owed[rec.task_id] = rec.origin
        self.unsettled[rec.task_id] = None

    def _merge_record(
        self, now: float, st: TaskState, held: TaskRecord, rec: TaskRecord, raw: bytes, local: bool
    ) -> None:
        # A second record of one task: the same idempotency key submitted at another peer
        # (`protocol.tasks.idempotency` decides which is kept). Its origin learns what we hold:
        # a holder of the same spec (it may acknowledge), or the record its key already names.
        same_spec = spec_of(held) == spec_of(rec)
        kept = kept_record(held, rec)
        if not same_spec and held.origin == self.node_id and st.submitted and not st.replicated:
            # Our submission, not acknowledged yet, met the task its key already names: refuse
            # it and hold the existing record, so what this peer answers is that task.
            kept = rec
            st.submitted = False
            self.counters["submissions refused: idempotency key conflict"] += 1
            self.port.note(SubmissionConflicted(st.task_id))
        elif not same_spec:
            self.counters["task records conflicting with the one held"] += 1
            self.port.note(Dropped("peer", "task record conflicting with the one held"))
        if kept is rec:
            st.record = rec
            st.touch()
            self.mark_changed(st.task_id, now)
            self.port.persist(PersistKind.TASK, rec.task_id, raw)
        if local:
            self.spread(st, [raw])  # its holders answer us (`TaskHeld`), so we may acknowledge
            return
        addr = self.view.addr_of(rec.origin) if rec.origin != self.node_id else None
        if addr is None:
            return
        answer = [] if kept is rec else [encode_message(kept)]
        if same_spec:
            answer.append(encode_message(TaskHeld(rec.task_id)))
        if answer:
            self.port.send(addr, answer, piggyback=False)

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

    def pay_held(self) -> None:
        """Tell the origins of the records received in this input that we hold them
        (`TaskHeld`), except where we claimed the task meanwhile: the claim tells the origin
        as much (`apply_claim`), and a no-op task's claim reaches it with its result, one
        envelope instead of two (decision 53)."""
        for task_id, origin in self.held_owed.items():
            st = self.tasks.get(task_id)
            if st is None:
                continue
            if any(owner == self.node_id for _, owner, _ in st.claims):
                self.counters["records acknowledged by our claim"] += 1
                continue
            addr = self.view.addr_of(origin)
            if addr is not None:
                self.port.send(addr, [encode_message(TaskHeld(task_id))], piggyback=False)
        self.held_owed.clear()

    def on_held(self, task_id: bytes, sender: bytes) -> None:
        st = self.tasks.get(task_id)
        if st is None or st.record is None:
            return
        if not st.submitted and st.record.origin != self.node_id:
            return
        st.add_holder(sender)
        if not st.replicated and len(st.holders) >= self.copies_needed():
            st.replicated = True
            self.port.note(TaskReplicated(task_id, len(st.holders)))

    def apply_claim(self, now: float, c: Claim, raw: bytes, src: str) -> None:
        held = self.tasks.get(c.task_id)
        claims = held.claims if held is not None else {}
        run = (c.epoch, c.owner, c.owner_incarnation)
        if run in claims:
            return
        if c.epoch == 0 or (c.epoch > 1 and not any(e == c.epoch - 1 for e, _, _ in claims)):
            # A takeover names the epoch after one it saw; without that claim here it is
            # either forged or ahead of what reached us, so ask its sender for the chain.
            self.counters["claim skips an epoch"] += 1
            self.port.note(Dropped(src, "claim skips an epoch"))
            self._park(now, ("claim", c.task_id, c.epoch, c.owner), c, raw, src)
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
        if c.epoch > 1 and held is not None and (c.epoch, c.owner) not in held.epoch_grants:
            # A takeover is the arbiter's to grant: without its grant the claim is forged or
            # ahead of the grant, so ask its sender for what it holds.
            self.counters["claim without its grant"] += 1
            self.port.note(Dropped(src, "takeover claim without the arbiter's grant"))
            self._park(now, ("claim", c.task_id, c.epoch, c.owner), c, raw, src)
            return
        if sum(1 for e, o, _ in claims if (e, o) == run[:2]) >= RUNS_PER_EPOCH:
            self.counters["claim beyond the runs kept per epoch"] += 1
            self.port.note(Dropped(src, "claim beyond the runs kept per owner and epoch"))
            return
        if src != LOCAL and not self.verified(
            DOMAIN_CLAIM, c.owner_key, c.signed_payload(), c.sig, src, "claim"
        ):
            return
        st = self.state_of(c.task_id, now)
        st.add_claim(c)
        st.touch()
        if src not in (LOCAL, STORE) and c.owner != self.node_id:
            # A peer claims a task only holding its record, written with or before the claim:
            # its claim doubles as its `TaskHeld` (decision 53).
            self.on_held(c.task_id, c.owner)
        self.mark_changed(st.task_id, now)
        at = c.epoch.to_bytes(8, "big") + c.owner + c.owner_incarnation.to_bytes(8, "big")
        self.port.persist(PersistKind.CLAIM, c.task_id + at, raw)
        if src == LOCAL:
            self.linger(now, st, raw)
        else:
            self.relay(st, raw, src, c.owner)
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
            self.fence(now, c.task_id, mine, "superseded by a greater claim")
        self.unsettled[c.task_id] = None

    def apply_epoch_grant(self, now: float, g: EpochGrant, raw: bytes, src: str) -> None:
        """Keep an arbiter's grant of a takeover epoch (checked, then verified)."""
        st = self.tasks.get(g.task_id)
        if st is not None and (g.epoch, g.grantee) in st.epoch_grants:
            return
        if st is None or st.record is None:
            # Its arbiter is checked against the record's replica set: keep it until the
            # record comes (asked for meanwhile), as a claim before its chain.
            self.counters["epoch grant before its record"] += 1
            self.port.note(Dropped(src, "epoch grant of a task whose record is not held"))
            self._park(now, ("grant", g.task_id, g.epoch, g.grantee), g, raw, src)
            return
        if src != LOCAL and not self.may_arbitrate(g.task_id, g.arbiter):
            self.counters["epoch grant from a peer that is not the arbiter"] += 1
            self.port.note(Dropped(src, "epoch grant signed by a peer that is not the arbiter"))
            return
        if src != LOCAL and not self.verified(
            DOMAIN_EPOCH_GRANT, g.arbiter_key, g.signed_payload(), g.sig, src, "epoch grant"
        ):
            return
        st.add_epoch_grant(g)
        st.touch()
        self.mark_changed(st.task_id, now)
        key = g.task_id + g.epoch.to_bytes(8, "big") + g.grantee
        self.port.persist(PersistKind.EPOCH_GRANT, key, raw)
        if src == LOCAL:
            self.spread(st, [raw])
        self._unpark(now, g.task_id)
        self.unsettled[g.task_id] = None

    def apply_checkpoint(self, now: float, c: Checkpoint, raw: bytes, src: str) -> None:
        """Keep a step of a run (checked against its claim, then verified)."""
        held = self.tasks.get(c.task_id)
        key = (c.epoch, c.owner, c.seq)
        if held is not None and key in held.checkpoints:
            return
        if held is None or not held.has_claim(c.epoch, c.owner):
            # Only the owner of a run writes its steps, after its claim: without the claim
            # held, it is forged or ahead of its claim, so ask its sender for the chain.
            self.counters["checkpoint without its claim"] += 1
            self.port.note(Dropped(src, "checkpoint without its claim"))
            parked = ("checkpoint", c.task_id, c.epoch, c.owner + c.seq.to_bytes(4, "big"))
            self._park(now, parked, c, raw, src)
            return
        if src != LOCAL and not self.verified(
            DOMAIN_CHECKPOINT, c.owner_key, c.signed_payload(), c.sig, src, "checkpoint"
        ):
            return
        held.add_checkpoint(c)
        held.touch()
        self.mark_changed(held.task_id, now)
        at = c.epoch.to_bytes(8, "big") + c.owner + c.seq.to_bytes(4, "big")
        self.port.persist(PersistKind.CHECKPOINT, c.task_id + at, raw)
        if src == LOCAL:
            self.linger(now, held, raw)

    def apply_result(self, now: float, r: Result, raw: bytes, src: str) -> None:
        held = self.tasks.get(r.task_id)
        if held is not None and (r.epoch, r.owner) in held.results:
            return
        if held is None or not held.has_claim(r.epoch, r.owner):
            # Every result is made under a claim its owner published first; a result
            # without one is forged or ahead of its claim, so ask its sender for the chain.
            self.counters["result without its claim"] += 1
            self.port.note(Dropped(src, "result without its claim"))
            self._park(now, ("result", r.task_id, r.epoch, r.owner), r, raw, src)
            return
        if src != LOCAL and not self.verified(
            DOMAIN_RESULT, r.owner_key, r.signed_payload(), r.sig, src, "result"
        ):
            return
        st = held
        st.add_result(r)
        st.touch()
        self.mark_changed(st.task_id, now)
        self.port.persist(PersistKind.RESULT, r.task_id + r.epoch.to_bytes(8, "big") + r.owner, raw)
        if src == LOCAL:
            self.spread(st, [raw])
        else:
            self.relay(st, raw, src, r.owner)
        acc = st.accepted
        if acc is not None and claim_rank(r.task_id, r.epoch, r.owner) < claim_rank(
            acc.task_id, acc.epoch, acc.owner
        ):
            self.counters["result of a losing claim"] += 1
            return
        flipped = acc is not None
        st.accepted = r
        self.finished(now, r.task_id)
        self.open.discard(r.task_id)
        self.rankings.forget(r.task_id)
        if flipped:
            self.counters["result flips"] += 1
        self.port.note(ResultAccepted(r.task_id, r.epoch, r.owner, r.outcome, flipped))
        mine = self.slots.running.get(r.task_id)
        if mine is not None:
            self.fence(now, r.task_id, mine, "a result was accepted")

    def _park(self, now: float, key: ParkedKey, obj: Parkable, raw: bytes, src: str) -> None:
        # The node skips a message it saw recently, so the same bytes re-sent in answer to our
        # ask would never reach us again: keep the early object until what it builds on
        # arrives (unverified: it is verified when applied). Bounded against floods; an evicted
        # object comes back through anti-entropy. The sender is asked for what we lack at most
        # once per `ASK_INTERVAL` per task: a run's steps arriving before its claim would
        # otherwise each ask again (decision 44).
        if key in self.parked:
            return
        task_id = key[1]
        self.parked[key] = (obj, raw, src)
        self.parked_by_task.setdefault(task_id, []).append(key)
        if len(self.parked) > PARKED_MAX:
            oldest = next(iter(self.parked))
            del self.parked[oldest]
            self.parked_by_task[oldest[1]].remove(oldest)
            if not self.parked_by_task[oldest[1]]:
                del self.parked_by_task[oldest[1]]
                self.asked.pop(oldest[1], None)
            self.counters["parked objects evicted"] += 1
        last = self.asked.get(task_id)
        if task_id in self.parked_by_task and (last is None or now - last >= ASK_INTERVAL):
            self.asked[task_id] = now
            self.ask_for(src, task_id)

    def _unpark(self, now: float, task_id: bytes) -> None:
        keys = self.parked_by_task.pop(task_id, None)
        self.asked.pop(task_id, None)
        for key in keys or ():
            parked = self.parked.pop(key, None)
            if parked is None:
                continue
            obj, raw, src = parked
            if isinstance(obj, EpochGrant):
                self.apply_epoch_grant(now, obj, raw, src)
            elif isinstance(obj, Claim):
                self.apply_claim(now, obj, raw, src)
            elif isinstance(obj, Checkpoint):
                self.apply_checkpoint(now, obj, raw, src)
            else:
                self.apply_result(now, obj, raw, src)

    def apply_cancel(self, now: float, c: Cancel, raw: bytes, src: str) -> None:
        st = self.tasks.get(c.task_id)
        if st is not None and st.cancel is not None:
            return
        if st is None or st.record is None:
            # Who may cancel is decided by the record: ask for it (the cancel comes with it).
            self.counters["cancel before its record"] += 1
            self.port.note(Dropped(src, "cancel of a task whose record is not held"))
            self.ask_for(src, c.task_id)
            return
        if not self.may_cancel(st.record, c.by, c.outcome):
            self.counters["cancel by neither origin nor parent owner"] += 1
            self.port.note(
                Dropped(
                    src,
                    "cancel signed by neither the origin nor the parent's owner"
                    " (nor, for a queued task failing, a member of its home)",
                )
            )
            return
        if src != LOCAL and not self.verified(
            DOMAIN_CANCEL, c.by_key, c.signed_payload(), c.sig, src, "cancel"
        ):
            return
        st.cancel = c
        self.finished(now, c.task_id)
        st.touch()
        self.mark_changed(st.task_id, now)
        self.open.discard(c.task_id)
        self.rankings.forget(c.task_id)
        self.port.note(TaskCancelled(c.task_id, c.by, c.reason, c.outcome))
        self.port.persist(PersistKind.CANCEL, c.task_id, raw)
        if src == LOCAL:
            self.spread(st, [raw])
        mine = self.slots.running.get(c.task_id)
        if mine is not None:
            self.fence(now, c.task_id, mine, "cancelled")
