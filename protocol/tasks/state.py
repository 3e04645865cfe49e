"""What one peer holds about one task: the per-task CRDT, and the order of claims.

Invariants:
- Every field merges by set union or by max (the rules are applied in
  `protocol.tasks.merge`); the `digest` is equal on two peers exactly when they hold the same
  objects.
- Claims, and the results made under them, are ordered by (epoch, HRW score of the owner). The
  score depends only on the task id and the owner id, so every peer orders them the same way.
"""

from __future__ import annotations

import hashlib

import msgpack

from protocol.tasks.messages import Cancel, Claim, Execution, Result, TaskRecord
from protocol.wire import Message

START, END = 0, 1
"""Execution-log phases."""


def hrw_score(task_id: bytes, node_id: bytes) -> int:
    """Rendezvous (highest random weight) score of `node_id` for `task_id`."""
    return int.from_bytes(hashlib.sha256(task_id + node_id).digest()[:8], "big")


def claim_rank(task_id: bytes, epoch: int, owner: bytes) -> tuple[int, int]:
    """The order of claims (and of the results made under them)."""
    return (epoch, hrw_score(task_id, owner))


class TaskState:
    """Everything one peer knows about one task."""

    __slots__ = (
        "task_id",
        "record",
        "claim",
        "claims",
        "results",
        "accepted",
        "cancel",
        "executions",
        "first_seen",
        "owner_down_at",
        "holders",
        "replicated",
        "submitted",
        "grants",
        "sent_to",
        "_digest",
    )

    def __init__(self, task_id: bytes, now: float) -> None:
        self.task_id = task_id
        self.record: TaskRecord | None = None
        self.claim: Claim | None = None
        """The greatest claim held: the one that owns the task now."""
        self.claims: dict[tuple[int, bytes], Claim] = {}
        """Every claim held, by (epoch, owner): results and later epochs are checked against
        them, and anti-entropy hands them on so a peer that missed one can catch up."""
        self.results: dict[tuple[int, bytes], Result] = {}
        self.accepted: Result | None = None
        self.cancel: Cancel | None = None
        self.executions: dict[tuple[int, bytes, int], Execution] = {}
        self.first_seen = now
        self.owner_down_at: float | None = None
        self.holders: set[bytes] = set()
        self.replicated = False
        self.submitted = False
        """Submitted here (a client waits here for the acknowledgement), even if the record
        kept is another origin's (see `protocol.tasks.idempotency`)."""
        self.grants: dict[int, bytes] = {}
        """Per epoch, the peer the task's primary let claim it (see `protocol.tasks.grants`):
        granted here if we are the primary, else learned from it. Not part of the CRDT."""
        self.sent_to: set[bytes] = set()
        """Peers this peer sent the task's objects to as its author or arbiter (see
        `protocol.tasks.placement.audience`): repair after a membership change sends to the rest."""
        self._digest: bytes | None = None

    def touch(self) -> None:
        """Forget the cached digest after a change."""
        self._digest = None

    def digest(self) -> bytes:
        """A short summary equal on two peers exactly when they hold the same objects."""
        if self._digest is None:
            summary = [
                self.record.sig if self.record is not None else b"",
                sorted([e, o] for e, o in self.claims),
                sorted([e, o] for e, o in self.results),
                self.cancel is not None,
                sorted([e, o, p] for e, o, p in self.executions),
            ]
            self._digest = hashlib.sha256(msgpack.packb(summary)).digest()[:8]
        return self._digest

    def objects(self) -> list[Message]:
        """Every object held, in an order a receiver can apply directly."""
        out: list[Message] = []
        if self.record is not None:
            out.append(self.record)
        out.extend(c for _, c in sorted(self.claims.items()))
        out.extend(r for _, r in sorted(self.results.items()))
        if self.cancel is not None:
            out.append(self.cancel)
        out.extend(self.executions.values())
        return out

    @property
    def state(self) -> str:
        """pending, running, done, failed or cancelled, as this peer sees it."""
        if self.accepted is not None:
            return (
                "done"
                if self.accepted.outcome == "ok"
                else ("cancelled" if self.accepted.outcome == "cancelled" else "failed")
            )
        if self.cancel is not None:
            return "cancelled"
        return "running" if self.claim is not None else "pending"

    def execution_count(self) -> int:
        """Executions started (distinct epoch and owner)."""
        return sum(1 for _, _, phase in self.executions if phase == START)
