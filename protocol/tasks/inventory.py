"""Inventories: what a peer holds of a task by object key, so repair sends only what is missing.

A task's digest (`TaskState.digest`) tells two peers whether they hold the same objects, not
which ones differ. Answering a differing digest with every object of the task re-sent a
long-running task's whole history (every checkpoint) at each comparison, and its digest
changes with every checkpoint: the cost grew with the square of its length (decision 44).
An inventory names each object held in a few bytes; its receiver sends exactly the objects it
holds that the inventory does not list.

Invariants:
- `inventory_of(st)` lists exactly the objects `st` holds: `missing_from(st, inventory_of(st))`
  is empty and `holds_more(inventory_of(a), b)` is false when `a` holds all `b` holds.
- The wire shape is checked strictly (`decode_have`): any violation raises
  `RemoteProtocolError`; list lengths are bounded by what one task may hold.
"""

from __future__ import annotations

from typing import Any

from protocol import fields
from protocol.errors import RemoteProtocolError
from protocol.tasks.messages import (
    MAX_CHECKPOINTS,
    RECORD_TAG_BYTES,
    Inventory,
    TaskHave,
    record_tag,
)
from protocol.tasks.state import TaskState
from protocol.wire import Message

StepKey = tuple[int, bytes, int]
"""A checkpoint's key: (epoch, owner, sequence number)."""
MAX_INVENTORY_ROWS = 1024
"""Most keys of one kind in one task's inventory: a bound on a hostile sender (an honest task
holds a few claims and results, and its checkpoints come as ranges)."""


def inventory_of(st: TaskState) -> Inventory:
    """What `st` holds, by key (cached on the state until it changes)."""
    return st.inventory()


def _covered(inv: Inventory) -> dict[tuple[int, bytes], list[tuple[int, int]]]:
    out: dict[tuple[int, bytes], list[tuple[int, int]]] = {}
    for epoch, owner, first, last in inv.checkpoints:
        out.setdefault((epoch, owner), []).append((first, last))
    return out


def _listed(covered: dict[tuple[int, bytes], list[tuple[int, int]]], key: StepKey) -> bool:
    return any(first <= key[2] <= last for first, last in covered.get(key[:2], ()))


def missing_from(st: TaskState, inv: Inventory) -> list[Message]:
    """The objects `st` holds that `inv` does not list, in an order a receiver can apply."""
    grants, claims, results = set(inv.grants), set(inv.claims), set(inv.results)
    covered = _covered(inv)
    out: list[Message] = []
    if st.record is not None and record_tag(st.record.sig) != inv.record:
        out.append(st.record)
    out.extend(g for k, g in sorted(st.epoch_grants.items()) if k not in grants)
    out.extend(c for k, c in sorted(st.claims.items()) if k not in claims)
    out.extend(c for k, c in sorted(st.checkpoints.items()) if not _listed(covered, k))
    out.extend(r for k, r in sorted(st.results.items()) if k not in results)
    if st.cancel is not None and not inv.cancel:
        out.append(st.cancel)
    return out


def holds_more(inv: Inventory, st: TaskState) -> bool:
    """Whether `inv` lists an object `st` does not hold."""
    record = record_tag(st.record.sig) if st.record is not None else b""
    return (
        (inv.record != b"" and inv.record != record)
        or any(k not in st.epoch_grants for k in inv.grants)
        or any(k not in st.claims for k in inv.claims)
        or any(k not in st.results for k in inv.results)
        or (inv.cancel and st.cancel is None)
        or any(
            (e, o, n) not in st.checkpoints
            for e, o, first, last in inv.checkpoints
            for n in range(first, last + 1)
        )
    )


def have_fields(msg: TaskHave) -> list[Any]:
    """The wire fields of a `TaskHave` after its kind."""
    rows = [
        [
            inv.task_id,
            inv.record,
            [list(k) for k in inv.grants],
            [list(k) for k in inv.claims],
            [list(k) for k in inv.checkpoints],
            [list(k) for k in inv.results],
            inv.cancel,
        ]
        for inv in msg.entries
    ]
    return [rows, msg.reply]


def decode_have(f: list[Any]) -> TaskHave:
    """A `TaskHave` from its wire fields (the kind first).

    Raises:
        RemoteProtocolError: any field out of shape or range.
    """
    if type(f[2]) is not bool:
        raise RemoteProtocolError("task have: reply must be a boolean")
    return TaskHave(tuple(_inventory(row) for row in fields.array(f[1])), f[2])


def _inventory(row: Any) -> Inventory:
    if not isinstance(row, list) or len(row) != 7:
        raise RemoteProtocolError(
            "an inventory is [task id, record, grants, claims, checkpoints, results, cancel]"
        )
    tid, record, grants, claims, checkpoints, results, cancel = row
    if type(record) is not bytes or len(record) not in (0, RECORD_TAG_BYTES):
        raise RemoteProtocolError("an inventory's record is empty or an 8-byte tag")
    if type(cancel) is not bool:
        raise RemoteProtocolError("an inventory's cancel must be a boolean")
    return Inventory(
        fields.node_id(tid),
        record,
        tuple((fields.uint(e), fields.node_id(g)) for e, g in _rows(grants, 2)),
        tuple((fields.uint(e), fields.node_id(o), fields.uint(i)) for e, o, i in _rows(claims, 3)),
        tuple(_range(r) for r in _rows(checkpoints, 4)),
        tuple((fields.uint(e), fields.node_id(o)) for e, o in _rows(results, 2)),
        cancel,
    )


def _rows(v: Any, width: int) -> list[list[Any]]:
    rows = fields.array(v)
    if len(rows) > MAX_INVENTORY_ROWS:
        raise RemoteProtocolError(f"an inventory lists at most {MAX_INVENTORY_ROWS} keys a kind")
    for r in rows:
        if not isinstance(r, list) or len(r) != width:
            raise RemoteProtocolError(f"an inventory key has {width} fields")
    return rows


def _range(r: list[Any]) -> tuple[int, bytes, int, int]:
    epoch, owner, first, last = fields.uint(r[0]), fields.node_id(r[1]), r[2], r[3]
    first, last = fields.uint(first), fields.uint(last)
    if not 1 <= first <= last <= MAX_CHECKPOINTS:
        raise RemoteProtocolError(f"a checkpoint range runs within 1 to {MAX_CHECKPOINTS}")
    return (epoch, owner, first, last)
