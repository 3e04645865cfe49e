"""What one peer holds about one task: the per-task CRDT, and the order of claims.

Invariants:
- Every field merges by set union or by max (the rules are applied in
  `protocol.tasks.merge`); the `digest` is equal on two peers exactly when they hold the same
  objects.
- Claims, and the results made under them, are ordered by (epoch, HRW score of the owner). The
  score depends only on the task id and the owner id, so every peer orders them the same way.
- A run is a claim: (epoch, owner, owner incarnation). An owner that runs its epoch again after
  a restart signs a new claim under its new incarnation, so every run is counted; the result
  (epoch, owner) ends the last run of that pair. A run with no result that is superseded, or of
  a task that is final, ended "fenced". Executions, duplicates and fenced runs are all derived
  from the claims and results held, never logged separately.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import msgpack

from protocol.tasks.messages import (
    INVENTORY_KEY,
    KEY_CANCEL,
    KEY_CLAIM,
    KEY_GRANT,
    KEY_RESULT,
    KEY_STEPS,
    Cancel,
    Checkpoint,
    Claim,
    EpochGrant,
    Inventory,
    Result,
    TaskRecord,
    record_tag,
)
from protocol.wire import Message

RunKey = tuple[int, bytes, int]
"""A run of a task: (epoch, owner, owner incarnation)."""

K = TypeVar("K")
V = TypeVar("V")

NOTHING_HELD: Mapping[Any, Any] = MappingProxyType({})
"""The one empty mapping every `TaskState` starts its maps with, read-only so that no state
writes into another's: a peer holds thousands of tasks, most of whose maps stay empty (an empty
dict of each costs 64 bytes, and five per task)."""
NO_PEERS: AbstractSet[bytes] = frozenset()
"""The one empty set every `TaskState` starts its sets of peers with (an empty `set` costs 216
bytes, and most tasks never name a holder)."""


class OneEntry(Mapping[K, V]):
    """A read-only map of one entry. A held task's maps mostly hold one entry each (its claim,
    its result, its one step, the grantee of epoch 1), and a dict of one entry costs 224 bytes
    where this costs 48; `_put` turns it into a dict at a second key."""

    __slots__ = ("_key", "_value")

    def __init__(self, key: K, value: V) -> None:
        self._key = key
        self._value = value

    def __getitem__(self, key: K) -> V:
        if key == self._key:
            return self._value
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key == self._key  # without the KeyError `Mapping.__contains__` would raise

    def __iter__(self) -> Iterator[K]:
        return iter((self._key,))

    def __len__(self) -> int:
        return 1


def _put(held: Mapping[K, V], key: K, value: V) -> Mapping[K, V]:
    """`held` with `key` mapped to `value`: written in place once it is a dict of its own; else
    a `OneEntry` while the map has one key, a new dict at its second."""
    if isinstance(held, dict):
        held[key] = value
        return held
    if not held or (len(held) == 1 and key in held):
        return OneEntry(key, value)
    out = dict(held)
    out[key] = value
    return out


def _joined(held: AbstractSet[bytes], more: Collection[bytes]) -> AbstractSet[bytes]:
    """`held` with `more` added: `held` itself once it is a set of its own (or nothing is
    added), a new set in place of the shared empty one."""
    if not more:
        return held
    out = held if isinstance(held, set) else set(held)
    out.update(more)
    return out


@dataclass(frozen=True, slots=True)
class Run:
    """One execution of a task, as the claims and results held tell it.

    `outcome` is None while it may still be running, the result's outcome once it has one,
    "interrupted" when its owner restarted and ran the epoch again, and "fenced" when it was
    superseded (or the task became final) without a result of its own.
    """

    epoch: int
    owner: bytes
    incarnation: int
    outcome: str | None


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
        "epoch_grants",
        "checkpoints",
        "results",
        "accepted",
        "cancel",
        "first_seen",
        "owner_down_at",
        "holders",
        "replicated",
        "submitted",
        "grants",
        "grant_sent_at",
        "sent_to",
        "_digest",
        "_inventory",
    )

    def __init__(self, task_id: bytes, now: float) -> None:
        self.task_id = task_id
        self.record: TaskRecord | None = None
        self.claim: Claim | None = None
        """The greatest claim held: the one that owns the task now."""
        self.claims: Mapping[RunKey, Claim] = NOTHING_HELD
        """Every claim held, by run (epoch, owner, incarnation): results and later epochs are
        checked against them, and anti-entropy hands them on so a peer that missed one can
        catch up."""
        self.epoch_grants: Mapping[tuple[int, bytes], EpochGrant] = NOTHING_HELD
        """The arbiter's signed grants of takeover epochs, by (epoch, grantee): a claim of
        epoch e > 1 is accepted only with the one naming its owner."""
        self.checkpoints: Mapping[tuple[int, bytes, int], Checkpoint] = NOTHING_HELD
        """The steps of runs, by (epoch, owner, sequence number): a takeover resumes from
        them."""
        self.results: Mapping[tuple[int, bytes], Result] = NOTHING_HELD
        self.accepted: Result | None = None
        self.cancel: Cancel | None = None
        self.first_seen = now
        self.owner_down_at: float | None = None
        self.holders: AbstractSet[bytes] = NO_PEERS
        self.replicated = False
        self.submitted = False
        """Submitted here (a client waits here for the acknowledgement), even if the record
        kept is another origin's (see `protocol.tasks.idempotency`)."""
        self.grants: Mapping[int, bytes] = NOTHING_HELD
        """Per epoch, the peer the task's primary let claim it (see `protocol.tasks.grants`):
        granted here if we are the primary, else learned from it. Not part of the CRDT."""
        self.grant_sent_at: float | None = None
        """When we, as the task's primary, last sent the grantee of epoch 1 the task with its
        grant (`protocol.tasks.grants`): sent again `standby_delay` later if its claim is still
        missing, not at every decision about the task. Not part of the CRDT."""
        self.sent_to: AbstractSet[bytes] = NO_PEERS
        """Peers this peer sent the task's objects to as its author or arbiter (see
        `protocol.tasks.placement.audience`): repair after a membership change sends to the rest."""
        self._digest: bytes | None = None
        self._inventory: Inventory | None = None

    # Every write to the maps and sets goes through these: they start as the shared empties
    # above, which must never be written, and become containers of their own at the first
    # entry (a map, a `OneEntry` until its second). Callers `touch` after adding an object.

    def add_claim(self, claim: Claim) -> None:
        """Hold `claim`, by its run."""
        run = (claim.epoch, claim.owner, claim.owner_incarnation)
        self.claims = _put(self.claims, run, claim)

    def add_epoch_grant(self, grant: EpochGrant) -> None:
        """Hold the arbiter's `grant`, by (epoch, grantee)."""
        self.epoch_grants = _put(self.epoch_grants, (grant.epoch, grant.grantee), grant)

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Hold `checkpoint`, by (epoch, owner, sequence number)."""
        key = (checkpoint.epoch, checkpoint.owner, checkpoint.seq)
        self.checkpoints = _put(self.checkpoints, key, checkpoint)

    def add_result(self, result: Result) -> None:
        """Hold `result`, by (epoch, owner)."""
        self.results = _put(self.results, (result.epoch, result.owner), result)

    def set_grant(self, epoch: int, grantee: bytes) -> None:
        """Note the peer the primary let claim `epoch` (see `protocol.tasks.grants`)."""
        self.grants = _put(self.grants, epoch, grantee)

    def add_holder(self, node_id: bytes) -> None:
        """Note a peer that told us it holds the record."""
        self.holders = _joined(self.holders, (node_id,))

    def add_sent_to(self, node_ids: Collection[bytes]) -> None:
        """Note peers we sent the task's objects to."""
        self.sent_to = _joined(self.sent_to, node_ids)

    def touch(self) -> None:
        """Forget the cached digest and inventory after a change."""
        self._digest = None
        self._inventory = None

    def digest(self) -> bytes:
        """A short summary equal on two peers exactly when they hold the same objects."""
        if self._digest is None:
            summary = [
                self.record.sig if self.record is not None else b"",
                sorted([e, o, i] for e, o, i in self.claims),
                sorted([e, g] for e, g in self.epoch_grants),
                sorted([e, o] for e, o in self.results),
                self.cancel is not None,
            ]
            if self.checkpoints:
                summary.append(sorted([e, o, n] for e, o, n in self.checkpoints))
            self._digest = hashlib.sha256(msgpack.packb(summary)).digest()[:8]
        return self._digest

    def inventory(self, keep: bool = True) -> Inventory:
        """What this state holds, by key (`protocol.tasks.inventory`): checkpoints as ranges of
        sequence numbers, the record as a tag of its signature. One built now is kept until
        the next change (or `forget_inventory`) if `keep`."""
        if self._inventory is not None:
            return self._inventory
        inventory = self._build_inventory()
        if keep:
            self._inventory = inventory
        return inventory

    def forget_inventory(self) -> None:
        """Drop the inventory kept: the task's replicas compared it for the last time."""
        # Building one costs some microseconds, and the replicas of a task that changed
        # compare it three times within a minute (`Repair.sync`), to each of its replicas, so
        # it is kept meanwhile. A settled task is rarely compared again but held for a day:
        # its inventory kept cost about 300 bytes per held task, a tenth of what a task costs.
        self._inventory = None

    def _build_inventory(self) -> Inventory:
        ranges: list[tuple[int, bytes, int, int]] = []
        for epoch, owner, seq in sorted(self.checkpoints):
            last = ranges[-1] if ranges else None
            if last is not None and last[:2] == (epoch, owner) and last[3] + 1 == seq:
                ranges[-1] = (epoch, owner, last[2], seq)
            else:
                ranges.append((epoch, owner, seq, seq))
        pack = INVENTORY_KEY.pack
        keys = [pack(KEY_GRANT, e, g, 0, 0) for e, g in sorted(self.epoch_grants)]
        keys += [pack(KEY_CLAIM, e, o, i, 0) for e, o, i in sorted(self.claims)]
        keys += [pack(KEY_STEPS, e, o, a, b) for e, o, a, b in ranges]
        keys += [pack(KEY_RESULT, e, o, 0, 0) for e, o in sorted(self.results)]
        if self.cancel is not None:
            keys.append(pack(KEY_CANCEL, 0, bytes(32), 0, 0))
        tag = record_tag(self.record.sig) if self.record is not None else b""
        return Inventory(self.task_id, self.digest(), tag, b"".join(keys))

    def objects(self, steps: bool = True) -> list[Message]:
        """Every object held (without the checkpoints unless `steps`), in an order a receiver
        can apply directly."""
        out: list[Message] = []
        if self.record is not None:
            out.append(self.record)
        out.extend(g for _, g in sorted(self.epoch_grants.items()))
        out.extend(c for _, c in sorted(self.claims.items()))
        if steps:
            out.extend(c for _, c in sorted(self.checkpoints.items()))
        out.extend(r for _, r in sorted(self.results.items()))
        if self.cancel is not None:
            out.append(self.cancel)
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
            return self.cancel.outcome
        return "running" if self.claim is not None else "pending"

    def has_claim(self, epoch: int, owner: bytes) -> bool:
        """Whether a claim of `epoch` by `owner` (any incarnation) is held."""
        return any(e == epoch and o == owner for e, o, _ in self.claims)

    def runs(self) -> list[Run]:
        """Every run held, in (epoch, owner, incarnation) order, with how it ended."""
        final = self.accepted is not None or self.cancel is not None
        keys = sorted(self.claims)
        out: list[Run] = []
        for i, (epoch, owner, inc) in enumerate(keys):
            last_of_pair = i + 1 == len(keys) or keys[i + 1][:2] != (epoch, owner)
            result = self.results.get((epoch, owner)) if last_of_pair else None
            outcome: str | None
            if result is not None:
                outcome = result.outcome
            elif not last_of_pair:
                outcome = "interrupted"  # its owner restarted and ran the epoch again
            elif final or self.claim is None:
                outcome = "fenced"
            elif (self.claim.epoch, self.claim.owner) != (epoch, owner):
                outcome = "fenced"  # a greater claim superseded it
            else:
                outcome = None
            out.append(Run(epoch, owner, inc, outcome))
        return out

    def execution_count(self) -> int:
        """Runs started (one per claim: distinct epoch, owner and incarnation)."""
        return len(self.claims)
