"""Inventories: what a peer holds of a task by object key, so repair sends only what is missing.

A task's digest (`TaskState.digest`) tells two peers whether they hold the same objects, not
which ones differ. Answering a differing digest with every object of the task re-sent a
long-running task's whole history (every checkpoint) at each comparison, and its digest
changes with every checkpoint: the cost grew with the square of its length (decision 44).
An inventory names each object held in a few bytes; its receiver sends exactly the objects it
holds that the inventory does not list.

Invariants:
- `st.inventory()` lists exactly the objects `st` holds: `missing_from(st, st.inventory())`
  is empty and `holds_more(a.inventory(), b)` is false when `a` holds all `b` holds.
- Decoding checks an inventory's shape strictly (`decode_have`: ids, an 8-byte digest, a tag,
  keys a whole number of `INVENTORY_KEY` records, at most `MAX_KEYS`); its keys are parsed and
  checked (`parse_keys`) only where the receiver's digest differs, and a malformed one raises
  `RemoteProtocolError` then, changing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import fields
from protocol.errors import RemoteProtocolError
from protocol.tasks.messages import (
    INVENTORY_KEY,
    KEY_CANCEL,
    KEY_CLAIM,
    KEY_GRANT,
    KEY_RESULT,
    KEY_STEPS,
    MAX_CHECKPOINTS,
    RECORD_TAG_BYTES,
    Inventory,
    TaskHave,
    record_tag,
)
from protocol.tasks.state import TaskState
from protocol.wire import MAX_UINT, Message

StepKey = tuple[int, bytes, int]
"""A checkpoint's key: (epoch, owner, sequence number)."""
MAX_KEYS = 4096
"""Most keys in one task's inventory: a bound on a hostile sender (an honest task holds a few
claims and results, and its checkpoints come as ranges)."""
DIGEST_BYTES = 8


@dataclass(frozen=True, slots=True)
class Keys:
    """An inventory's keys, parsed (`parse_keys`)."""

    grants: frozenset[tuple[int, bytes]]
    claims: frozenset[tuple[int, bytes, int]]
    checkpoints: tuple[tuple[int, bytes, int, int], ...]
    results: frozenset[tuple[int, bytes]]
    cancel: bool


def parse_keys(inv: Inventory) -> Keys:
    """The keys of `inv`, checked.

    Raises:
        RemoteProtocolError: an unknown kind, a number out of range, a checkpoint range
            outside 1..`MAX_CHECKPOINTS`, or a field that must be zero is not.
    """
    grants: set[tuple[int, bytes]] = set()
    claims: set[tuple[int, bytes, int]] = set()
    steps: list[tuple[int, bytes, int, int]] = []
    results: set[tuple[int, bytes]] = set()
    cancel = False
    for kind, epoch, node, a, b in INVENTORY_KEY.iter_unpack(inv.keys):
        if max(epoch, a, b) > MAX_UINT:
            raise RemoteProtocolError("an inventory key's numbers are 63-bit")
        if kind == KEY_CLAIM and b == 0:
            claims.add((epoch, node, a))
        elif kind == KEY_STEPS and 1 <= a <= b <= MAX_CHECKPOINTS:
            steps.append((epoch, node, a, b))
        elif kind in (KEY_GRANT, KEY_RESULT) and a == b == 0:
            (grants if kind == KEY_GRANT else results).add((epoch, node))
        elif kind == KEY_CANCEL and (epoch, node, a, b) == (0, bytes(32), 0, 0):
            cancel = True
        else:
            raise RemoteProtocolError("an inventory key is malformed")
    return Keys(frozenset(grants), frozenset(claims), tuple(steps), frozenset(results), cancel)


def _covered(keys: Keys) -> dict[tuple[int, bytes], list[tuple[int, int]]]:
    out: dict[tuple[int, bytes], list[tuple[int, int]]] = {}
    for epoch, owner, first, last in keys.checkpoints:
        out.setdefault((epoch, owner), []).append((first, last))
    return out


def _listed(covered: dict[tuple[int, bytes], list[tuple[int, int]]], key: StepKey) -> bool:
    return any(first <= key[2] <= last for first, last in covered.get(key[:2], ()))


def missing_from(st: TaskState, inv: Inventory, keys: Keys | None = None) -> list[Message]:
    """The objects `st` holds that `inv` does not list, in an order a receiver can apply
    (`keys`: `inv`'s, parsed already).

    Raises:
        RemoteProtocolError: `inv`'s keys are malformed (`parse_keys`).
    """
    keys = keys if keys is not None else parse_keys(inv)
    covered = _covered(keys)
    out: list[Message] = []
    if st.record is not None and record_tag(st.record.sig) != inv.record:
        out.append(st.record)
    out.extend(g for k, g in sorted(st.epoch_grants.items()) if k not in keys.grants)
    out.extend(c for k, c in sorted(st.claims.items()) if k not in keys.claims)
    out.extend(c for k, c in sorted(st.checkpoints.items()) if not _listed(covered, k))
    out.extend(r for k, r in sorted(st.results.items()) if k not in keys.results)
    if st.cancel is not None and not keys.cancel:
        out.append(st.cancel)
    return out


def holds_more(inv: Inventory, st: TaskState, keys: Keys | None = None) -> bool:
    """Whether `inv` lists an object `st` does not hold (`keys`: `inv`'s, parsed already).

    Raises:
        RemoteProtocolError: `inv`'s keys are malformed (`parse_keys`).
    """
    keys = keys if keys is not None else parse_keys(inv)
    record = record_tag(st.record.sig) if st.record is not None else b""
    return (
        (inv.record != b"" and inv.record != record)
        or any(k not in st.epoch_grants for k in keys.grants)
        or any(k not in st.claims for k in keys.claims)
        or any(k not in st.results for k in keys.results)
        or (keys.cancel and st.cancel is None)
        or any(
            (e, o, n) not in st.checkpoints
            for e, o, first, last in keys.checkpoints
            for n in range(first, last + 1)
        )
    )


def have_fields(msg: TaskHave) -> list[Any]:
    """The wire fields of a `TaskHave` after its kind."""
    rows = [[inv.task_id, inv.digest, inv.record, inv.keys] for inv in msg.entries]
    return [rows, msg.reply]


def decode_have(f: list[Any]) -> TaskHave:
    """A `TaskHave` from its wire fields (the kind first); its keys are checked when parsed.

    Raises:
        RemoteProtocolError: any field out of shape or range.
    """
    if type(f[2]) is not bool:
        raise RemoteProtocolError("task have: reply must be a boolean")
    return TaskHave(tuple(_inventory(row) for row in fields.array(f[1])), f[2])


def _inventory(row: Any) -> Inventory:
    if not isinstance(row, list) or len(row) != 4:
        raise RemoteProtocolError("an inventory is [task id, digest, record tag, keys]")
    tid, digest, record, keys = row
    if type(digest) is not bytes or len(digest) != DIGEST_BYTES:
        raise RemoteProtocolError("an inventory's digest is 8 bytes")
    if type(record) is not bytes or len(record) not in (0, RECORD_TAG_BYTES):
        raise RemoteProtocolError("an inventory's record is empty or an 8-byte tag")
    size = INVENTORY_KEY.size
    if type(keys) is not bytes or len(keys) % size or len(keys) > MAX_KEYS * size:
        raise RemoteProtocolError(
            f"an inventory's keys are at most {MAX_KEYS} records of {size} bytes"
        )
    return Inventory(fields.node_id(tid), digest, record, keys)
