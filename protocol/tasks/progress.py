"""Progress reports: each step of a run, told to the task's origin as it happens, and up the
task tree to the root's origin.

Why: a user follows a task where they submitted it (`grapevine watch ID` at their own peer),
but the task usually runs elsewhere, and so do its children. Steps (a model call answered, a
tool call returned, a child asked for) are facts about one run, for watchers: the run's
durable record is its signed checkpoints, held by the replicas. So a report is small,
unsigned, sent once, straight to the origin, and never stored.

Invariants:
- Only the peer running the task under an epoch reports its steps (`report` refuses
  otherwise), and only to the task's origin, when that is another peer it knows the address
  of; nothing is sent for a task submitted here. A report travels with the run's claim and
  checkpoints still lingering here (`TaskCore.send_with_run`), never ahead of them.
- A report is accepted (the `ProgressHeard` note) only at the task's origin, from a known
  member whose claim is the task's current one under that very epoch. Anything else changes
  nothing and is dropped with its reason, counted. The sender is the envelope's, trusted as
  for the other unsigned task messages (`TaskHeld`, `TaskAsk`): a member holding the network
  key could pose as the owner, and change what watchers read, never a signed fact.
- Up the tree (decision 77): a child task's origin is the peer running its parent. Having
  accepted a step of a child's run (or made one of a child submitted here), that peer passes it
  on to its parent's origin, as a relayed report (`via` the parent, under its epoch), when it
  runs the parent and the parent was submitted elsewhere; a peer that runs and submitted the
  parent looks one level higher. The parent's origin accepts a relayed report only from the
  member whose claim is the `via` task's current one under `via_epoch`, for a `via` task it
  submitted, and passes it on the same way, so each step climbs one path to the root's origin,
  one message per level.
- Text is cut to `MAX_PROGRESS_TEXT` characters and the detail to `MAX_PROGRESS_FIELDS`
  fields by the sender; a receiver refuses larger ones when decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from protocol.codec import encode_message
from protocol.effects import Dropped, ProgressHeard
from protocol.errors import LocalProtocolError
from protocol.tasks.core import TaskCore
from protocol.tasks.messages import (
    MAX_PROGRESS_FIELDS,
    MAX_PROGRESS_TEXT,
    ProgressValue,
    TaskProgress,
)
from protocol.tasks.state import TaskState
from protocol.wire import MAX_NAME_CHARS, MAX_UINT

MAX_RELAY_LEVELS = 64
"""Most levels of a tree one peer looks up for an ancestor to relay to (its own runs, each
submitted here): a bound on local work, far beyond any real delegation depth."""


class Progress:
    """This peer's side of progress reports: the steps of its runs sent to their origins, and
    the reports it accepts as an origin.

    Args:
        core: the task plane (its tasks, view, port and counters).
        runs: whether this peer runs a task under an epoch now.
    """

    def __init__(self, core: TaskCore, runs: Callable[[bytes, int], bool]) -> None:
        self.core = core
        self.runs = runs

    def report(
        self,
        task_id: bytes,
        epoch: int,
        kind: str,
        time: float,
        detail: Sequence[tuple[str, object]],
    ) -> bool:
        """Send a step of this peer's run of `task_id` under `epoch` to the task's origin.

        Returns:
            Whether a report was sent (not for a task submitted here, or whose origin's
            address is unknown).

        Raises:
            LocalProtocolError: this peer does not run the task under `epoch`, or `kind` or a
                field name is not a name (1 to 128 characters).
        """
        if not self.runs(task_id, epoch):
            raise LocalProtocolError("this peer does not run the task under that epoch")
        fields = tuple(dict((key, _sendable(value)) for key, value in detail).items())
        fields = fields[:MAX_PROGRESS_FIELDS]
        names = [kind, *(key for key, _ in fields)]
        if not all(0 < len(name) <= MAX_NAME_CHARS for name in names):
            raise LocalProtocolError(f"a step's kind and fields are 1..{MAX_NAME_CHARS} chars")
        st = self.core.tasks.get(task_id)
        if st is None or st.record is None:
            return False
        stamp = float(time) if math.isfinite(time) and time > 0 else 0.0
        msg = TaskProgress(task_id, epoch, kind, stamp, fields)
        if st.record.origin == self.core.node_id:
            return self._pass_up(st, msg, self.core.node_id)
        addr = self.core.view.addr_of(st.record.origin)
        if addr is None:
            return False
        self.core.send_with_run(task_id, st.record.origin, addr, encode_message(msg))
        return True

    def on_progress(self, src: str, sender: bytes, msg: TaskProgress) -> None:
        """Accept a report of a run of a task submitted here (see the module invariants)."""
        core = self.core
        if core.view.addr_of(sender) != src:
            self._drop(src, "progress from a sender not known here")
            return
        # A relayed step is checked against the task it travels through, a direct one
        # against its own task.
        through, epoch, owner = (
            (msg.via, msg.via_epoch, msg.owner) if msg.via else (msg.task_id, msg.epoch, sender)
        )
        st = core.tasks.get(through)
        if st is None or st.record is None or st.record.origin != core.node_id:
            self._drop(
                src,
                "progress relayed through a task not submitted here"
                if msg.via
                else "progress of a task not submitted here",
            )
            return
        claim = st.claim
        if claim is None or (claim.epoch, claim.owner) != (epoch, sender):
            self._drop(src, "progress from a peer not running the task")
            return
        core.port.note(ProgressHeard(msg.task_id, msg.epoch, owner, msg.kind, msg.time, msg.detail))
        self._pass_up(st, msg, owner)

    def _pass_up(self, st: TaskState, step: TaskProgress, owner: bytes) -> bool:
        """Relay `step`, made by `owner` in a run of `st` or of a task below it, to the origin
        of the nearest ancestor of `st` that this peer runs and another peer submitted (see
        the module invariants); False if there is none."""
        core, me = self.core, self.core.node_id
        for _ in range(MAX_RELAY_LEVELS):
            assert st.record is not None
            parent = core.tasks.get(st.record.parent) if st.record.parent else None
            if parent is None or parent.record is None:
                return False
            claim = parent.claim
            if claim is None or claim.owner != me:
                return False  # only the parent's runner has a step of its subtree to pass on
            if parent.record.origin != me:
                addr = core.view.addr_of(parent.record.origin)
                if addr is None:
                    return False
                relayed = replace(step, owner=owner, via=parent.task_id, via_epoch=claim.epoch)
                core.send_with_run(
                    parent.task_id, parent.record.origin, addr, encode_message(relayed)
                )
                return True
            st = parent  # submitted here too: its own origin's is the one to tell
        return False

    def _drop(self, src: str, reason: str) -> None:
        self.core.counters[reason] += 1
        self.core.port.note(Dropped(src, reason))


def _sendable(value: object) -> ProgressValue:
    """`value` as a report carries it: text cut to `MAX_PROGRESS_TEXT`, a number a receiver
    would refuse (not finite, beyond 64 bits) as null, anything else as its text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -MAX_UINT - 1 <= value <= MAX_UINT else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)[:MAX_PROGRESS_TEXT]
