"""The slot ledger: which executions hold an execution slot, and whether one is free.

This is the one home of the rule "a suspended execution frees its slot": the task rules, the
peer's executor and its agent host all keep their accounts in a `SlotLedger`.

Invariants:
- Every suspended key is running; `used()` is the number running minus the number suspended.
- `suspend` frees the slot of a running, not yet suspended execution (it keeps running: it
  waits on its child tasks). `resume` takes the slot back at once, even beyond the limit: a
  parent never waits for a slot, so a tree of tasks cannot deadlock.
- Starting never checks the limit: the caller decides whether to wait for `has_room` (the
  executor does; the task rules let a standby's claim or a takeover start regardless).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SlotLedger(Generic[K, V]):
    """Running executions by key, each with the caller's value, and the suspended subset."""

    __slots__ = ("running", "suspended")

    def __init__(self) -> None:
        self.running: dict[K, V] = {}
        """Executions running, suspended ones included, with the caller's value for each."""
        self.suspended: set[K] = set()
        """Running executions that hold no slot."""

    def start(self, key: K, value: V) -> None:
        """Record `key` as running (holding a slot), replacing any earlier value."""
        self.running[key] = value

    def finish(self, key: K) -> None:
        """Forget `key`, suspended or not; a no-op for a key not running."""
        self.running.pop(key, None)
        self.suspended.discard(key)

    def suspend(self, key: K) -> bool:
        """Free the slot of a running execution. False if it is not running or already
        suspended (nothing changes)."""
        if key not in self.running or key in self.suspended:
            return False
        self.suspended.add(key)
        return True

    def resume(self, key: K) -> bool:
        """Take the slot of a suspended execution back at once, whatever the limit. False if
        it is not suspended (nothing changes)."""
        if key not in self.suspended:
            return False
        self.suspended.discard(key)
        return True

    def used(self) -> int:
        """Slots held: executions running and not suspended."""
        return len(self.running) - len(self.suspended)

    def has_room(self, limit: int) -> bool:
        """True if one more execution fits under `limit` slots."""
        return self.used() < limit

    def free(self, limit: int) -> int:
        """Slots free under `limit` (never negative: resumed executions may exceed it)."""
        return max(0, limit - self.used())

    def clear(self) -> None:
        """Forget every execution."""
        self.running.clear()
        self.suspended.clear()
