"""Tombstones: what is left of a compacted task (see `protocol.tasks.retention`).

Invariants:
- A tombstone is local: it is stored and read back by its own peer (`encode`,
  `decode_tombstone`), never sent; its stored format starts with `TOMBSTONE_FORMAT`.
- Its `digest` is taken in its own domain, so it never equals a live `TaskState.digest`, and it
  leaves out the local time of compaction, so replicas holding the same tombstone agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.tasks.state import TaskState

TOMBSTONE_FORMAT = 1
"""The first field of a stored tombstone; a store written in another format is refused."""
DIGEST_DOMAIN = b"grapevine/tombstone/v1"
"""Hashed into a tombstone's digest, so that it never equals a live task state's."""
IDEMPOTENCY_DOMAIN = b"grapevine/idempotency-key/v1"


class TombstoneError(ValueError):
    """A stored tombstone could not be read."""


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a compacted task: enough to answer "what became of it" and to refuse
    its late objects."""

    task_id: bytes
    state: str
    """done, failed or cancelled."""
    outcome: str
    """The accepted result's outcome; empty for a task cancelled without a result."""
    epoch: int
    """The accepted result's epoch (0 without one)."""
    owner: bytes
    """The node id of the accepted result's owner (empty without one)."""
    output_digest: bytes
    """sha256 of the accepted result's output as it was held (inline bytes or a blob
    reference); empty without a result."""
    idempotency_digest: bytes
    """sha256 of the record's idempotency key; empty without a key or a record."""
    parent: bytes
    """The parent task's id; empty for a root (or without a record)."""
    compacted_at: float
    """When the task was compacted, on the node's clock. Not part of the digest."""

    def digest(self) -> bytes:
        """A short summary, equal on two peers holding the same tombstone and never equal to
        a live state's `TaskState.digest`."""
        summary = [self.state, self.outcome, self.epoch, self.owner, self.output_digest]
        return hashlib.sha256(DIGEST_DOMAIN + self.task_id + msgpack.packb(summary)).digest()[:8]

    def encode(self) -> bytes:
        """The stored form (msgpack), read back by `decode_tombstone`."""
        fields = [
            TOMBSTONE_FORMAT,
            self.task_id,
            self.state,
            self.outcome,
            self.epoch,
            self.owner,
            self.output_digest,
            self.idempotency_digest,
            self.parent,
            self.compacted_at,
        ]
        return bytes(msgpack.packb(fields))


def decode_tombstone(raw: bytes) -> Tombstone:
    """Read a stored tombstone.

    Raises:
        TombstoneError: `raw` is not a tombstone this code wrote.
    """
    try:
        fields: Any = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        raise TombstoneError(f"not msgpack: {exc}") from None
    if not isinstance(fields, list) or len(fields) != 10 or fields[0] != TOMBSTONE_FORMAT:
        raise TombstoneError("not a tombstone of format 1")
    _, task_id, state, outcome, epoch, owner, output, idem, parent, at = fields
    if not (
        isinstance(task_id, bytes)
        and len(task_id) == 32
        and isinstance(state, str)
        and isinstance(outcome, str)
        and isinstance(epoch, int)
        and all(isinstance(b, bytes) for b in (owner, output, idem, parent))
        and isinstance(at, float)
    ):
        raise TombstoneError("a tombstone field has the wrong type")
    return Tombstone(task_id, state, outcome, epoch, owner, output, idem, parent, at)


def tombstone_of(st: TaskState, now: float) -> Tombstone:
    """The tombstone of a final task."""
    acc = st.accepted
    rec = st.record
    key = rec.idempotency_key if rec is not None else ""
    return Tombstone(
        st.task_id,
        st.state,
        acc.outcome if acc is not None else "",
        acc.epoch if acc is not None else 0,
        acc.owner if acc is not None else b"",
        hashlib.sha256(acc.output).digest() if acc is not None else b"",
        hashlib.sha256(IDEMPOTENCY_DOMAIN + key.encode()).digest() if key else b"",
        rec.parent if rec is not None else b"",
        now,
    )
