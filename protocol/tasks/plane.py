"""The task plane of one peer: `Tasks`, its commands from the host and its input dispatch.

`Tasks` is driven by `protocol.node.Node`. It is assembled from one mixin per concept:
`protocol.tasks.repair` (anti-entropy, replica sync, audience repair, relay),
`protocol.tasks.merge` (the per-task CRDT and the receiver's checks), `protocol.tasks.grants`
(the primary's grants) and `protocol.tasks.execution` (the claim rule's decisions applied, and
executions), over the shared state of `protocol.tasks.core`; network listings
(`protocol.tasks.listing`) are a part it holds (`listing`).

Invariants:
- Decisions are taken only in `settle` (once a whole input is applied: an anti-entropy batch
  carries a task record before its claims, and the record alone would look unclaimed), on a
  wake-up, or when a slot frees or the view changes; always most urgent task first.
- Restored from the store, a peer decides nothing until it joined (`hold` / `release`); after a
  stall, or cut off from every peer, it claims nothing for a while and stops its executions
  when isolated (others will take them over).
- Takeover: when a member is declared dead or leaves, its claims' tasks are looked at again;
  the claim rule gives them to the next-ranked live peer with epoch + 1.
"""

from __future__ import annotations

import hashlib
import math
from functools import cached_property
from typing import assert_never

from protocol.codec import encode_message
from protocol.errors import LocalProtocolError
from protocol.tasks.core import LOCAL, STORE
from protocol.tasks.execution import Executions
from protocol.tasks.grants import Grants
from protocol.tasks.idempotency import IdempotencyConflict, spec_for, spec_of
from protocol.tasks.listing import Listing
from protocol.tasks.messages import (
    CANCEL_OUTCOMES,
    DOMAIN_CANCEL,
    DOMAIN_TASK,
    MAX_INLINE_PAYLOAD,
    MAX_NONCE,
    Cancel,
    Checkpoint,
    Claim,
    EpochGrant,
    Result,
    TaskAsk,
    TaskGrant,
    TaskHave,
    TaskHeld,
    TaskList,
    TaskMessage,
    TaskPage,
    TaskProgress,
    TaskRead,
    TaskRecord,
    TaskShards,
    TaskWant,
    is_traceparent,
    task_id_of,
    with_signature,
)
from protocol.tasks.placement import NONCE_TRIES, members_above, nonce_variant
from protocol.tasks.progress import Progress
from protocol.tasks.repair import SYNC_TICK
from protocol.wire import MAX_NAME_CHARS


class Tasks(Executions, Grants):
    """The task rules of one peer. Driven by `protocol.node.Node`."""

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
        traceparent: str = "",
        queue_timeout: float = 0.0,
    ) -> TaskRecord:
        """Create, sign and disseminate a task; an existing task with the same id is returned.

        `queue_timeout` (seconds after `created`, 0 for none) goes into the record so that the
        task's home can end it if no peer claimed it in time and its origin does not
        (`expire`, decision 58).

        With an idempotency key the id names the key in its scope (the parent), whatever the
        peer: a task held here under that key with another spec is refused at once, and one
        held elsewhere is learned from its replicas (`SubmissionConflicted`; see
        `protocol.tasks.idempotency`).

        Raises:
            IdempotencyConflict: the key names a task held here with another spec.
            LocalProtocolError: a field is out of bounds.
        """
        if not 0 < len(role) <= MAX_NAME_CHARS or len(idempotency_key) > MAX_NAME_CHARS:
            raise LocalProtocolError(f"role and idempotency key must be 1..{MAX_NAME_CHARS} chars")
        if len(data) > MAX_INLINE_PAYLOAD:
            raise LocalProtocolError(f"task input must be at most {MAX_INLINE_PAYLOAD} bytes")
        if priority < 0 or timeout < 0 or len(nonce) > MAX_NONCE or len(parent) not in (0, 32):
            raise LocalProtocolError("priority and timeout must be >= 0, nonce <= 16 bytes")
        if not 0.0 <= queue_timeout <= 1e9:
            raise LocalProtocolError("a queue timeout must be 0 to 1e9 seconds")
        if not idempotency_key and not nonce:
            raise LocalProtocolError("a task needs an idempotency key or a nonce")
        if not is_traceparent(traceparent):
            raise LocalProtocolError("traceparent must be a W3C traceparent (version 00) or empty")
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
            if spec_of(known.record) != spec_for(role, data, priority, parent, timeout):
                raise IdempotencyConflict(task_id)
            if known.submitted or known.record.origin == self.node_id:
                known.submitted = True
                return known.record
            # Received from another origin: sign our own record of it (the later one is kept,
            # so the task's news comes here, where its client now waits); its holders'
            # answers acknowledge it.
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
            traceparent,
            b"",
            task_id,
            self.node_id,
            float(queue_timeout),
        )
        sig = self.signer.sign(DOMAIN_TASK, unsigned.signed_payload())
        record = with_signature(unsigned, sig)
        self.apply_task(now, record, encode_message(record), local=True)
        st = self.tasks[task_id]
        st.submitted = True
        assert st.record is not None
        return st.record

    def nonce_near_home(
        self,
        nonce: bytes,
        role: str,
        input_digest: bytes,
        priority: int = 0,
        parent: bytes = b"",
        timeout: float = 0.0,
    ) -> bytes:
        """A nonce for a task submitted here without an idempotency key (`nonce` or one of
        its variants, `placement.nonce_variant`) whose id puts this peer in the task's
        replica set in our view of who is live: at its top when this peer would run it now
        (`runs_here_first`), else below its arbiter; `nonce` if none of `NONCE_TRIES` does,
        or every member is in every replica set and this peer would not run it.

        The origin holds its task's objects whatever the replica set (its client waits
        there), so being one of its replicas costs it nothing, and spares the task a record
        sent, an acknowledgement and a result: 5 envelopes per no-op task in a large network
        instead of 8 (decision 94). At the top, the origin is the task's arbiter and first in
        line to run it, so the record, the claim and the result start here and go out
        together. Only while half its slots for the role are free, so a peer that submits
        many tasks runs a few and the rest run across the network (decision 96).
        """
        k = self.replicas.k
        live = self.view.live_members()
        first = self.runs_here_first(role)
        if len(live) < 2 or (not first and (k < 2 or len(live) <= k)):
            return nonce
        below: bytes | None = None
        for i in range(NONCE_TRIES):
            candidate = nonce_variant(nonce, i)
            task_id = task_id_of(
                self.node_id, "", candidate, role, input_digest, priority, parent, float(timeout)
            )
            # Once a nonce below the arbiter is in hand only the top is worth a try, and one
            # member scoring above us rules that out: most tries stop after a hash or two.
            limit = 1 if first and below is not None else k
            above = members_above(task_id, self.node_id, live, limit)
            if above == 0 and first:
                self.counters["task ids placed to run at their origin"] += 1
                return candidate
            if 0 < above < limit:
                if not first:
                    self.counters["task ids placed with their origin among the replicas"] += 1
                    return candidate
                below = candidate if below is None else below
        if below is not None:
            self.counters["task ids placed with their origin among the replicas"] += 1
            return below
        self.counters["task ids placed without their origin among the replicas"] += 1
        return nonce

    def runs_here_first(self, role: str) -> bool:
        """Whether a task of `role` submitted here now should be placed to run here: this
        peer serves the role, has joined, and at least half its slots are free (decision
        96). The half left is for the tasks the network's placement brings here."""
        return (
            role in self.roles
            and self.quiet_until != math.inf
            and 2 * self.free_slots() >= max(1, self.max_running)
        )

    def cancel(self, now: float, task_id: bytes, reason: str, outcome: str = "cancelled") -> bool:
        """Cancel a task network-wide; False if the task is unknown or already final. It ends
        `outcome`: `cancelled`, or `failed` (its origin gave up on it, decision 45).

        Raises:
            LocalProtocolError: this peer is neither the task's origin nor its parent's owner,
                or `outcome` is not one of `CANCEL_OUTCOMES`.
        """
        if outcome not in CANCEL_OUTCOMES:
            raise LocalProtocolError(f"a cancel ends a task {' or '.join(CANCEL_OUTCOMES)}")
        st = self.tasks.get(task_id)
        if st is None or st.accepted is not None or st.cancel is not None:
            return False
        if st.record is None or not self.may_cancel(st.record, self.node_id, outcome):
            origin = st.record.origin.hex() if st.record is not None else "unknown"
            raise LocalProtocolError(
                f"only the task's origin (peer {origin}) or its parent's owner may cancel it"
            )
        payload = Cancel(
            task_id, self.signer.public_key, reason[:MAX_NAME_CHARS], b"", self.node_id, outcome
        )
        sig = self.signer.sign(DOMAIN_CANCEL, payload.signed_payload())
        cancel = with_signature(payload, sig)
        self.apply_cancel(now, cancel, encode_message(cancel), src=LOCAL)
        return True

    def expire(self, now: float, task_id: bytes, reason: str) -> bool:
        """End a queued task no peer claimed, `failed` with `reason`, as its arbiter (decision
        58). The host calls this once the record's queue timeout has passed on its wall clock
        (with a grace that leaves the origin the first word); False, and nothing done, unless
        the task is held here unclaimed and unfinished, its record has a queue timeout, and
        this peer is its arbiter in our view (so one home member speaks, not all of them)."""
        st = self.tasks.get(task_id)
        if st is None or st.record is None or not st.record.queue_timeout:
            return False
        if st.state != "pending" or self.arbiter(st) != self.node_id:
            return False
        return self.cancel(now, task_id, reason, "failed")

    def reevaluate(self, now: float) -> None:
        """Look at every open task again, highest priority first (a slot freed, roles or
        membership changed)."""

        for tid in sorted(self.open, key=self.urgency):
            self.evaluate(now, self.tasks[tid])

    def view_changed(self) -> None:
        """Roles or free slots advertised by a peer changed: look at open tasks again."""
        for tid in sorted(self.open):
            self.unsettled[tid] = None

    def settle(self, now: float) -> None:
        """Decide on the tasks the input just applied touched, highest priority first.

        Deciding only after a whole envelope is applied matters: an anti-entropy batch carries
        a task record before its claims, and the record alone would look unclaimed."""
        self.repair(now)
        if now >= self.next_sync:
            self.next_sync = now + SYNC_TICK
            # The last tick's syncs that found no envelope to ride go now; this tick's wait
            # for one until the next (decision 63).
            self.port.flush_lazy()
            self.sync(now)
        touched = [t for t in self.unsettled if t in self.tasks]
        self.unsettled.clear()
        for tid in sorted(touched, key=self.urgency):
            self.evaluate(now, self.tasks[tid])
        if self.unspread:
            self.spread_submitted()
        if self.held_owed:
            self.pay_held()

    def hold(self) -> None:
        """Restored from the store after a restart: our view of the network is empty, so every
        owner looks dead and every task unclaimed. Decide nothing until `release`."""
        self.quiet_until = math.inf
        self.restored = True

    def release(self, now: float) -> None:
        """We joined: decide again after a standby delay, once what we missed has arrived."""
        if self.quiet_until == math.inf:
            self.quiet_until = now + self.standby_delay
            self.reevaluate(now)

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
                self.unsettled[st.task_id] = None

    def on_isolated(self, now: float, until: float) -> None:
        """We reach no one: others will declare us dead and take our work over, so stop it,
        and claim nothing before `until` (the next look) plus a standby delay."""
        self.quiet_until = max(self.quiet_until, until + self.standby_delay)
        for task_id, epoch in list(self.slots.running.items()):
            self.fence(now, task_id, epoch, "isolated")
            # Decided again once the quiet ends: if no one declared us dead meanwhile (our
            # loop was only blocked, or the partition healed first), our claim still stands
            # and no one else may take it over, so we resume it (the claim rule's Resume).
            self.unsettled[task_id] = None

    def on_standby(self, now: float, task_id: bytes, at: float) -> None:
        """A wake-up (`TaskStandby`) fired: look at the task again unless superseded."""
        if self.armed.get(task_id) != at:
            return  # superseded by an earlier wake-up, which has looked or will look again
        del self.armed[task_id]
        st = self.tasks.get(task_id)
        if st is not None:
            self.evaluate(now, st)

    def dispatch(self, now: float, src: str, sender: bytes, msg: TaskMessage, raw: bytes) -> None:
        """Apply one task message (none about a compacted task: see `retention`)."""
        if self.tombstones and self.dominated(src, msg):
            return
        if not (self.took_part or self.pulled or src == STORE) and isinstance(
            msg, TaskRecord | Claim | Result | Cancel | EpochGrant | Checkpoint
        ):
            self.took_part = True
        match msg:
            case TaskRecord():
                self.apply_task(now, msg, raw, local=False)
            case Claim():
                self.apply_claim(now, msg, raw, src)
            case Result():
                self.apply_result(now, msg, raw, src)
            case Cancel():
                self.apply_cancel(now, msg, raw, src)
            case EpochGrant():
                self.apply_epoch_grant(now, msg, raw, src)
            case Checkpoint():
                self.apply_checkpoint(now, msg, raw, src)
            case TaskHeld(task_id):
                self.on_held(task_id, sender)
            case TaskShards():
                self.on_shards(now, src, sender, msg)
            case TaskHave():
                self.on_have(src, sender, msg)
            case TaskWant(ids):
                self.send_objects(src, ids)
            case TaskRead(ids):
                self.send_objects(src, self.with_children(ids))
            case TaskAsk(task_id, epoch):
                self.on_ask(now, src, sender, task_id, epoch)
            case TaskGrant(task_id, epoch, grantee):
                self.on_grant(task_id, epoch, grantee, src)
            case TaskList():
                self.listing.on_list(now, src, sender, msg)
            case TaskPage():
                self.listing.on_page(now, src, sender, msg)
            case TaskProgress():
                self.progress.on_progress(src, sender, msg)
            case _:
                assert_never(msg)

    @cached_property
    def listing(self) -> Listing:
        """Network listings: pages asked of peers and answered (`protocol.tasks.listing`)."""
        return Listing(self)

    @cached_property
    def progress(self) -> Progress:
        """Progress reports of runs, to and from origins (`protocol.tasks.progress`)."""
        return Progress(self, lambda task_id, epoch: self.slots.running.get(task_id) == epoch)

    def told_of(self, task_id: bytes) -> bool:
        """Whether this peer is in the task's audience (its news reaches it unasked)."""
        st = self.tasks.get(task_id)
        return st is not None and self.node_id in self.audience_with_self(st)
