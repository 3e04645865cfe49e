"""Tombstones: what is left of a compacted task (see `protocol.tasks.retention`).

Invariants:
- A tombstone is local: it is stored and read back by its own peer (`encode`,
  `decode_tombstone`), never sent; its stored format starts with `TOMBSTONE_FORMAT`. It is
  stored under its task id, which format 2 therefore leaves out (format 1, which repeated it,
  is still read).
- Its digests are the first `DIGEST_BYTES` bytes of SHA-256: a peer keeps a tombstone for
  every task it compacted within the grace period (a day by default), so each byte counts
  (decision 57). A format-1 tombstone's full digests are cut to that length when read, so two
  replicas agree whichever format each stored.
- Its `digest` is taken in its own domain, so it never equals a live `TaskState.digest`, and it
  leaves out the local time of compaction, so replicas holding the same tombstone agree.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.tasks.state import TaskState

TOMBSTONE_FORMAT = 2
"""The first field of a stored tombstone as written now; formats 1 and 2 are read."""
DIGEST_BYTES = 16
"""How much of a SHA-256 a tombstone keeps (128 bits: no accidental collision in any store)."""
STATES = ("done", "failed", "cancelled")
"""A final task's states, stored by their position."""
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
    """The first `DIGEST_BYTES` of the sha256 of the accepted result's output as it was held
    (inline bytes or a blob reference); empty without a result."""
    idempotency_digest: bytes
    """The first `DIGEST_BYTES` of the sha256 of the record's idempotency key; empty without a
    key or a record."""
    parent: bytes
    """The parent task's id; empty for a root (or without a record)."""
    compacted_at: float
    """When the task was compacted, on the node's clock (stored in whole seconds, rounded up:
    a restored tombstone is kept up to a second longer, never shorter). Not part of the
    digest."""

    def digest(self) -> bytes:
        """A short summary, equal on two peers holding the same tombstone and never equal to
        a live state's `TaskState.digest`."""
        summary = [self.state, self.outcome, self.epoch, self.owner, self.output_digest]
        return hashlib.sha256(DIGEST_DOMAIN + self.task_id + msgpack.packb(summary)).digest()[:8]

    def encode(self) -> bytes:
        """The stored form (msgpack, format 2, without the task id: the store's key), read
        back by `decode_tombstone`."""
        fields = [
            TOMBSTONE_FORMAT,
            STATES.index(self.state),
            self.outcome,
            self.epoch,
            self.owner,
            self.output_digest,
            self.idempotency_digest,
            self.parent,
            math.ceil(self.compacted_at),
        ]
        return bytes(msgpack.packb(fields))


def decode_tombstone(task_id: bytes, raw: bytes) -> Tombstone:
    """Read the tombstone stored under `task_id`.

    Raises:
        TombstoneError: `raw` is not a tombstone this code wrote (format 1 or 2), or format 1
            names another task.
    """
    try:
        fields: Any = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        raise TombstoneError(f"not msgpack: {exc}") from None
    if not isinstance(fields, list) or not fields or fields[0] not in (1, 2):
        raise TombstoneError("not a tombstone of format 1 or 2")
    if fields[0] == 1 and len(fields) == 10:
        _, stored_id, state, outcome, epoch, owner, output, idem, parent, at = fields
        if stored_id != task_id:
            raise TombstoneError("a format-1 tombstone stored under another task's id")
    elif fields[0] == 2 and len(fields) == 9:
        _, code, outcome, epoch, owner, output, idem, parent, at = fields
        state = STATES[code] if type(code) is int and 0 <= code < len(STATES) else None
    else:
        raise TombstoneError(f"a tombstone of format {fields[0]} with {len(fields)} fields")
    if not (
        len(task_id) == 32
        and state in STATES
        and isinstance(outcome, str)
        and isinstance(epoch, int)
        and all(isinstance(b, bytes) for b in (owner, output, idem, parent))
        and isinstance(at, int | float)
    ):
        raise TombstoneError("a tombstone field has the wrong type")
    return Tombstone(
        task_id,
        state,
        outcome,
        epoch,
        owner,
        output[:DIGEST_BYTES],
        idem[:DIGEST_BYTES],
        parent,
        float(at),
    )


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
        hashlib.sha256(acc.output).digest()[:DIGEST_BYTES] if acc is not None else b"",
        hashlib.sha256(IDEMPOTENCY_DOMAIN + key.encode()).digest()[:DIGEST_BYTES] if key else b"",
        rec.parent if rec is not None else b"",
        now,
    )
