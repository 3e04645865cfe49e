"""Grants: the primary's answer to a standby asking to claim.

Invariants:
- Only the task's primary in our view (first of its candidates for the epoch) grants, and it
  grants each epoch to one peer, durably (persisted before it is sent), answering later askers
  with that grant. A new grant is made only when the grantee is declared dead.
- An asker that is behind (the task is final, or claimed at or beyond the epoch) is answered
  with the objects it missed; one that is ahead (it knows a claim we lack) is asked for them.
- Restored and not yet joined, we grant nothing: our view of who is primary means nothing yet.
- Of two conflicting grants learned (two peers each took themselves for the primary), the
  first one is kept, so at most the two grantees run the task.
"""

from __future__ import annotations

import math

from protocol.codec import encode_message
from protocol.effects import PersistKind
from protocol.tasks.core import STORE, TaskCore
from protocol.tasks.messages import TaskGrant
from protocol.tasks.state import TaskState


class Grants(TaskCore):
    """The arbiter side of the claim rule: asks answered, grants made and learned."""

    def on_ask(self, now: float, src: str, sender: bytes, task_id: bytes, epoch: int) -> None:
        """Answer a standby asking to claim `epoch`: with the grant, if we are the primary."""
        st = self.tasks.get(task_id)
        if st is None or st.record is None:
            self.ask_for(src, task_id)  # we cannot rank peers for a task we do not hold
            return
        claim = st.claim
        if st.accepted is not None or st.cancel is not None or (claim and claim.epoch >= epoch):
            self.send_objects(src, [task_id])  # what the asker missed answers it
            return
        if epoch < 1 or (epoch > 1 and (claim is None or claim.epoch != epoch - 1)):
            self.ask_for(src, task_id)  # it knows a claim we lack
            return
        if self.quiet_until == math.inf:
            return  # restored, not yet joined: our view of who is primary means nothing yet
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

    def _record_grant(self, st: TaskState, epoch: int, grantee: bytes) -> None:
        st.grants[epoch] = grantee
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
            # differed): keep the first grant, so at most the two grantees run it.
            self.counters["conflicting grants"] += 1
            return
        st.grants[epoch] = grantee
        if src == STORE:
            return  # a grant we made before a restart; nothing to decide until we join
        self.unsettled[task_id] = None
