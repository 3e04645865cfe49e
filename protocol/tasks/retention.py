"""Retention: final tasks are compacted to tombstones, and tombstones forgotten after a grace.

Theory of operation (docs/design.md section 5, "Retention"; docs/decisions.md, decision 22)
- A task is *final* here when it has an accepted result or a cancel and every child held here
  is final. The unit of compaction is a tree: a task and its descendants held here, decided at
  its topmost ancestor held whole here, so a running parent keeps its final children (a tree
  read needs them). A task whose parent is not held here (or is compacted) is its own root.
- A tree is compacted `retention` seconds after the last of its tasks became final here, not
  before; each task becomes a `Tombstone` (id, state, outcome, epoch, owner, output digest,
  idempotency key digest, parent), and its stored objects are deleted in the same effects as
  the tombstone is stored (`PersistKind.FORGET_TASK` then `PersistKind.TOMBSTONE`: the host
  applies one call's persists in one transaction).
- A tombstone dominates every merge: a record, claim, result, cancel or epoch grant of a
  compacted task is dropped before its signature is checked and counted ("object of a
  compacted task"); asks, grants and "held" notices about it are ignored. Nothing resurrects it.
- Anti-entropy: tombstones are not compared or sent (they are not signed objects); every
  replica compacts by the same rule on its own clock, so replicas converge on the tombstone. A
  tombstone holder neither asks for nor answers about the task. Its digest (in its own domain,
  never equal to a live state's) is kept for the API.
- `tombstone_grace` seconds after compaction the tombstone is forgotten (`FORGET_TOMBSTONE`).
- Time is the node's clock. A task restored from the store counts its retention from the
  restore; a tombstone keeps the time it was made, or counts from the restore when that time is
  ahead of the clock (the host's clock restarted with its machine). A peer whose last contact
  with the network is older than retention + grace discards its stored copies before the
  replay (`copies_outlived`, decision 22).
- Scheduling: one heap of (due, task id) for trees that may be due and one for tombstones, and
  one `RetentionDue` timer armed at the earliest; stale heap entries are recognised on pop.
"""

from __future__ import annotations

import heapq
from dataclasses import replace

from protocol.effects import Dropped, PersistKind
from protocol.tasks.messages import (
    Cancel,
    Checkpoint,
    Claim,
    EpochGrant,
    Result,
    TaskAsk,
    TaskGrant,
    TaskHeld,
    TaskMessage,
    TaskRecord,
)
from protocol.tasks.repair import Repair
from protocol.tasks.tombstone import TombstoneError, decode_tombstone, tombstone_of
from protocol.timers import RetentionDue


def task_of(msg: TaskMessage) -> bytes | None:
    """The task a per-task message is about (None for the many-task ones)."""
    match msg:
        case (
            TaskRecord()
            | Claim()
            | Result()
            | Cancel()
            | EpochGrant()
            | Checkpoint()
            | TaskHeld()
            | TaskAsk()
            | TaskGrant()
        ):
            return msg.task_id
        case _:
            return None


class Retention(Repair):
    """Compaction of final task trees to tombstones, and the tombstones' expiry."""

    def finished(self, now: float, task_id: bytes) -> None:
        """The task just got its accepted result or its cancel here: its tree may be due for
        compaction `retention` seconds from now."""
        if task_id in self.final_at:
            return
        self.final_at[task_id] = now
        heapq.heappush(self.compaction_due, (now + self.retention, task_id))
        self.arm_retention()

    def dominated(self, src: str, msg: TaskMessage) -> bool:
        """Whether `msg` is about a compacted task (then it is dropped: objects are counted)."""
        task_id = task_of(msg)
        if task_id is None or task_id not in self.tombstones:
            return False
        if isinstance(msg, TaskRecord | Claim | Result | Cancel | EpochGrant | Checkpoint):
            self.counters["object of a compacted task"] += 1
            self.port.note(Dropped(src, "object of a compacted task"))
        return True

    def on_retention_due(self, now: float, at: float) -> None:
        """The `RetentionDue` timer fired: compact what is due, forget what expired."""
        if self.retention_armed != at:
            return  # superseded by an earlier one, which re-armed for the rest
        self.retention_armed = None
        while self.compaction_due and self.compaction_due[0][0] <= now:
            _, task_id = heapq.heappop(self.compaction_due)
            if task_id in self.tasks:
                self._compact_if_due(now, self.root_of(task_id))
        while self.expiry_due and self.expiry_due[0][0] <= now:
            due, task_id = heapq.heappop(self.expiry_due)
            stone = self.tombstones.get(task_id)
            if stone is not None and stone.compacted_at + self.tombstone_grace == due:
                del self.tombstones[task_id]
                self.counters["tombstones forgotten"] += 1
                self.port.persist(PersistKind.FORGET_TOMBSTONE, task_id, b"")
        self.arm_retention()

    def restore_tombstone(self, now: float, task_id: bytes, raw: bytes) -> None:
        """Re-apply the tombstone stored under `task_id` (before any stored task object, so
        that none of a compacted task is replayed)."""
        try:
            stone = decode_tombstone(task_id, raw)
        except TombstoneError as exc:
            self.port.note(Dropped("store", f"unreadable stored tombstone: {exc}"))
            return
        if stone.compacted_at > now:
            # Made before the host's clock restarted (a reboot): its age is unknown, so the
            # grace counts from now.
            stone = replace(stone, compacted_at=now)
        self.tombstones[stone.task_id] = stone
        heapq.heappush(self.expiry_due, (stone.compacted_at + self.tombstone_grace, stone.task_id))
        self.arm_retention()

    def root_of(self, task_id: bytes) -> bytes:
        """The topmost ancestor of the task held whole here (the task itself if its parent is
        not held)."""
        seen = {task_id}
        st = self.tasks[task_id]
        while st.record is not None and st.record.parent in self.tasks:
            parent = st.record.parent
            if parent in seen:
                break  # ids are hashes over the parent's id: a cycle means forged input
            seen.add(parent)
            st = self.tasks[parent]
        return st.task_id

    def tree_of(self, root: bytes) -> list[bytes]:
        """The task and every descendant held here, parents before children."""
        out, stack, seen = [], [root], {root}
        while stack:
            tid = stack.pop()
            out.append(tid)
            for child in sorted(self.children.get(tid, ())):
                if child in self.tasks and child not in seen:
                    seen.add(child)
                    stack.append(child)
        return out

    def arm_retention(self) -> None:
        """Arm `RetentionDue` at the earliest due entry, unless armed earlier already."""
        heads = [h[0][0] for h in (self.compaction_due, self.expiry_due) if h]
        if not heads:
            return
        at = min(heads)
        if self.retention_armed is None or at < self.retention_armed:
            self.retention_armed = at
            self.port.schedule(at, RetentionDue(at))

    def _compact_if_due(self, now: float, root: bytes) -> None:
        tree = self.tree_of(root)
        finals = [self.final_at.get(tid) for tid in tree]
        if any(at is None for at in finals):
            return  # a task of the tree is not final: it pushes the tree again when it is
        due = max(at for at in finals if at is not None) + self.retention
        if due > now:
            heapq.heappush(self.compaction_due, (due, root))
            return
        for tid in reversed(tree):
            self._compact(now, tid)

    def _compact(self, now: float, task_id: bytes) -> None:
        st = self.tasks[task_id]
        running = self.slots.running.get(task_id)
        if running is not None:
            self.fence(now, task_id, running, "compacted")  # final tasks are fenced already
        stone = tombstone_of(st, now)
        del self.tasks[task_id]
        for table in (
            self.final_at,
            self.sync_due,
            self.armed,
            self.unsettled,
            self.alike,
            self.asks_made,
        ):
            table.pop(task_id, None)
        self.open.discard(task_id)
        self.passed.discard(task_id)
        self.rankings.forget(task_id)
        self.replicas.forget(task_id)
        self.children.pop(task_id, None)
        siblings = self.children.get(stone.parent)
        if siblings is not None:
            siblings.discard(task_id)
            if not siblings:
                del self.children[stone.parent]
        for key in self.parked_by_task.pop(task_id, ()):
            self.parked.pop(key, None)
        self.asked.pop(task_id, None)
        self.tombstones[task_id] = stone
        heapq.heappush(self.expiry_due, (now + self.tombstone_grace, task_id))
        self.counters["tasks compacted"] += 1
        self.port.persist(PersistKind.FORGET_TASK, task_id, b"")
        self.port.persist(PersistKind.TOMBSTONE, task_id, stone.encode())


def copies_outlived(
    last_contact: float | None, now: float, retention: float, tombstone_grace: float
) -> bool:
    """Whether a peer starting again must discard its stored task objects and tombstones.

    Its copies outlived the network's memory when its last contact with the network is more
    than `retention + tombstone_grace` ago: a task it holds may have become final, been
    compacted and had its tombstone forgotten everywhere else meanwhile, and replaying its copy
    would resurrect the task (and run it again). It comes back empty instead and gets the tasks
    it replicates from their other replicas (decision 22).

    Args:
        last_contact: when this peer last saw another member up (wall-clock seconds), or None
            if it never did (a network of one keeps its tasks: nobody else forgot them).
        now: the wall-clock time now.
        retention: `TaskConfig.retention`.
        tombstone_grace: `TaskConfig.tombstone_grace`.
    """
    return last_contact is not None and now - last_contact > retention + tombstone_grace
