"""Grants: the primary's answer to a standby asking to claim epoch 1, and the arbiter's signed
grant of a takeover epoch.

Invariants:
- A takeover epoch e > 1 is granted only by the task's arbiter in our view (the first live
  member of its home, the top k members by HRW whatever their status), only while it holds
  the claim of e - 1, holds its owner down by its own failure detector (for `down_grace` at
  least: decision 80) and holds no result,
  to one peer at a time (another only once that one is down), durably and signed
  (`EpochGrant`, decision 25); every receiver checks the grant before it accepts the claim.
- Only the task's primary in our view (first of its candidates for the epoch) grants, and it
  grants each epoch to one peer, durably (persisted before it is sent), answering later askers
  with that grant. A new grant is made only when the grantee is declared dead.
- An asker that is behind (the task is final, or claimed at or beyond the epoch) is answered
  with the objects it missed; one that is ahead (it knows a claim we lack) is asked for them.
- Restored and not yet joined, we grant nothing: our view of who is primary means nothing yet.
- Of two conflicting grants learned (two peers each took themselves for the primary), every
  holder keeps the grantee ranked first by HRW, so all agree on one; at most the two grantees
  run the task (one that already claimed is ranked by the claim order like any other).
- A primary with no free slot hands its turn on at once: it grants the epoch to the first
  standby that advertises a free slot and sends it the task with the grant. Standbys are not
  in the task's audience (decision 23), so without this a full primary would hold the task
  until a slot freed here. With every standby full it keeps the task and claims it when a slot
  frees.
"""

from __future__ import annotations

import math
from dataclasses import replace

from protocol.codec import encode_message
from protocol.effects import PersistKind
from protocol.tasks.claim_rule import ASK_RETRY, down_grace_ends
from protocol.tasks.core import LOCAL, STORE, TaskCore
from protocol.tasks.messages import DOMAIN_EPOCH_GRANT, EpochGrant, TaskGrant
from protocol.tasks.state import TaskState, hrw_score


class Grants(TaskCore):
    """The arbiter side of the claim rule: asks answered, grants made and learned."""

    def on_ask(self, now: float, src: str, sender: bytes, task_id: bytes, epoch: int) -> None:
        """Answer a standby asking to claim `epoch`: with the grant, if we are the primary.
        One asker's asks about one task are answered once per half an ask interval."""
        if self._answered_lately(now, task_id, sender):
            self.counters["asks answered lately"] += 1
            return
        st = self.tasks.get(task_id)
        if st is None or st.record is None:
            self.ask_for(src, task_id)  # we cannot rank peers for a task we do not hold
            return
        claim = st.claim
        if st.accepted is not None or st.cancel is not None or (claim and claim.epoch >= epoch):
            # What the asker missed answers it: the claims, grants, result or cancel. Not the
            # run's checkpoints, which a standby that is not to run it has no use for (a busy
            # network's standbys ask often, and a long run holds many: bench_agents).
            self.send_messages(src, st.objects(steps=False))
            return
        if epoch < 1 or (epoch > 1 and (claim is None or claim.epoch != epoch - 1)):
            self.ask_for(src, task_id)  # it knows a claim we lack
            return
        if self.quiet_until == math.inf:
            return  # restored, not yet joined: our view of who is primary means nothing yet
        if epoch > 1:
            self.grant_takeover(now, st, epoch, sender, src)
            return
        ranked = self.candidates(st, epoch)
        if not ranked or ranked[0] != self.node_id:
            return  # not the primary in our view; the asker's view will catch up
        grantee = st.grants.get(epoch)
        if grantee is None or (grantee != sender and self.view.confirmed_down(grantee)):
            grantee = sender
            self.counters["grants made"] += 1
            self._record_grant(st, epoch, grantee)
        grant = encode_message(TaskGrant(task_id, epoch, grantee))
        self.port.send(src, [grant], piggyback=False)

    def _answered_lately(self, now: float, task_id: bytes, asker: bytes) -> bool:
        # A peer that falls behind reads the asks queued meanwhile in a row, each asking the
        # same (bench_agents: 20 asks of one task from one standby within 11 s, each answered
        # with the task's objects): one answer covers them. Half the asker's shortest
        # interval keeps every ask of a standby that was not answered (decision 95).
        interval = self.standby_delay * ASK_RETRY / 2
        answered = self.asks_answered
        while answered:
            oldest = next(iter(answered))
            if now - answered[oldest] < interval:
                break
            del answered[oldest]
        key = (task_id, asker)
        if key in answered:
            return True
        answered[key] = now
        return False

    def grant_takeover(
        self, now: float, st: TaskState, epoch: int, asker: bytes, src: str | None
    ) -> None:
        """As the task's arbiter, let `asker` claim takeover `epoch` (its owner down in our own
        view, no result held), once per epoch while the grantee lives; answer it with the
        grant (`src` None: the asker is this peer)."""
        claim, rec = st.claim, st.record
        assert claim is not None and rec is not None and claim.epoch == epoch - 1
        if self.arbiter(st) != self.node_id:
            return  # not the arbiter in our view; the asker's view will catch up
        if not self.view.confirmed_down(claim.owner) or asker == claim.owner:
            return  # we do not hold the owner dead: no takeover
        if down_grace_ends(self.view, claim.owner, now, self.down_grace) is not None:
            # Declared dead here too lately: a busy owner refutes within the grace, and
            # meanwhile it runs the task (decision 80). The asker asks again.
            self.counters["takeover asked within the down grace"] += 1
            return
        if asker != self.node_id and self.view.advertises(asker, rec.role) is False:
            self.counters["takeover asked by a peer not serving the role"] += 1
            return
        live = [
            g
            for (e, grantee), g in sorted(st.epoch_grants.items())
            if e == epoch and not self.view.confirmed_down(grantee)
        ]
        if live:
            grant = live[0]  # granted already: the asker learns to whom
        else:
            payload = EpochGrant(st.task_id, epoch, asker, self.signer.public_key, b"", b"")
            sig = self.signer.sign(DOMAIN_EPOCH_GRANT, payload.signed_payload())
            grant = replace(payload, sig=sig, arbiter=self.node_id)
            self.counters["takeover grants made"] += 1
            self.apply_epoch_grant(now, grant, encode_message(grant), LOCAL)
        if src is not None:
            self.port.send(src, [encode_message(grant)], piggyback=False)

    def hand_on(self, now: float, st: TaskState) -> None:
        """As the task's primary, hand our turn to a standby with a free slot when we have
        none, and send the grantee the task with its grant until its claim arrives."""
        primary, epoch = self.waits_for(st)
        if primary != self.node_id or epoch != 1 or self.quiet_until == math.inf:
            return  # a takeover epoch is the arbiter's to grant
        grantee = st.grants.get(epoch)
        if grantee is None:
            if self.has_room():
                return
            ranked = self.candidates(st, epoch)
            grantee = next((n for n in ranked[1:] if self.view.full_since(n) is None), None)
            if grantee is None:
                return  # every standby is full too: we claim when a slot frees here
            self.counters["grants handed on"] += 1
            self._record_grant(st, epoch, grantee)
        elif grantee == self.node_id or self.view.is_down(grantee):
            return
        elif st.grant_sent_at is not None and now < st.grant_sent_at + self.standby_delay:
            # Sent lately; the wake below sends it again if the claim is still missing then.
            # Sending at every decision about the task (each slot freed here decides again
            # about every task passed) sent it about three times per task handed on, whole,
            # in a 3-peer soak (decision 81).
            return
        else:
            self.counters["grants sent again"] += 1  # the task or the grant may have been lost
        addr = self.view.addr_of(grantee)
        if addr is None:
            return
        # One envelope: the grantee decides once all of it is applied, so it claims with the
        # grant instead of asking us for one.
        batch = [encode_message(obj) for obj in st.objects()]
        batch.append(encode_message(TaskGrant(st.task_id, epoch, grantee)))
        self.port.send(addr, batch, piggyback=False)
        st.add_sent_to((grantee,))
        st.grant_sent_at = now
        self.wake(st.task_id, now + self.standby_delay)

    def _record_grant(self, st: TaskState, epoch: int, grantee: bytes) -> None:
        st.set_grant(epoch, grantee)
        raw = encode_message(TaskGrant(st.task_id, epoch, grantee))
        self.port.persist(PersistKind.GRANT, st.task_id + epoch.to_bytes(8, "big"), raw)

    def on_grant(self, task_id: bytes, epoch: int, grantee: bytes, src: str) -> None:
        """Learn the primary's grant of `epoch` (or, from the store, one we made)."""
        st = self.tasks.get(task_id)
        if st is None or epoch < 1:
            return
        known = st.grants.get(epoch)
        if known is not None and known != grantee and not self.view.is_down(known):
            # Two peers each took themselves for the primary (their views of who is alive
            # differed). Every holder keeps the grantee ranked first by HRW, so all agree on
            # one: keeping the first learned let each grantee hold the other's grant and
            # both wait for ever (task campaign, seed 89).
            self.counters["conflicting grants"] += 1
            if hrw_score(task_id, grantee) < hrw_score(task_id, known):
                return
        st.set_grant(epoch, grantee)
        if src == STORE:
            return  # a grant we made before a restart; nothing to decide until we join
        self.unsettled[task_id] = None
