"""The member table: every member one peer knows, with O(1) random picks among the others.

Invariants:
- `members` holds this peer (`me`) and every other known member, keyed by node id; the others
  are also kept in a dense list so a uniformly random one costs O(1) (`random_members`).
- `alive_count` is always the number of members alive or suspect, this peer included: every
  status change goes through `set_status`, every insertion through `add`, every removal
  through `remove`.
- The table applies no rule: which record wins is decided by `protocol.membership`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from protocol.suspicion import Suspicion
from protocol.wire import Alive, MemberEntry, Status


class Rng(Protocol):
    """The slice of `random.Random` the protocol uses; injected so runs replay exactly."""

    def random(self) -> float: ...
    def randrange(self, start: int, stop: int | None = ..., step: int = ...) -> int: ...
    def shuffle(self, x: list[bytes]) -> None: ...


class Member:
    """One member as this peer sees it."""

    __slots__ = ("alive", "status", "incarnation", "since", "suspicion", "probed_at", "down_here")

    def __init__(self, alive: Alive, status: Status, incarnation: int, since: float) -> None:
        self.alive = alive
        self.status = status
        self.incarnation = incarnation
        self.since = since
        """When the status last changed (local clock)."""
        self.suspicion: Suspicion | None = None
        self.probed_at = float("-inf")
        """When this peer last probed the member (local clock)."""
        self.down_here = False
        """This peer's own failure detector holds the member down: a probe of ours went
        unanswered for a whole round, or a suspicion ran out here, and no ack or newer alive
        record came since. A suspicion or death another peer declared never sets it."""

    @property
    def node_id(self) -> bytes:
        return self.alive.node_id

    @property
    def addr(self) -> str:
        return self.alive.addr

    @property
    def up(self) -> bool:
        """Alive or suspect: still probed and gossiped to."""
        return self.status <= Status.SUSPECT


class MemberTable:
    """Every known member by node id, this peer (`me`) included.

    Args:
        me: this peer's own entry (alive); it is never removed.
        rng: picks random members.
    """

    __slots__ = ("_index", "_others", "_up", "me", "members", "rng")

    def __init__(self, me: Member, rng: Rng) -> None:
        self.me = me
        self.rng = rng
        self.members: dict[bytes, Member] = {me.node_id: me}
        self._others: list[Member] = []
        self._index: dict[bytes, int] = {}
        self._up = 1

    def alive_count(self) -> int:
        """Members alive or suspect, including this peer (the n of the formulas)."""
        return self._up

    def entries(self) -> list[MemberEntry]:
        """The full state for a push-pull, this peer included."""
        return [MemberEntry(m.alive, m.status, m.incarnation) for m in self.members.values()]

    def others(self) -> Iterator[Member]:
        """Every member other than this peer, in no particular order."""
        return iter(self._others)

    def random_members(self, k: int, accept: Callable[[Member], bool]) -> list[Member]:
        """Up to `k` distinct random other members satisfying `accept`.

        Rejection-samples the member list, so the cost is O(k) while most members qualify and
        never more than O(n).
        """
        n = len(self._others)
        if n == 0 or k <= 0:
            return []
        chosen: dict[bytes, Member] = {}
        for _ in range(4 * k + 8):
            m = self._others[self.rng.randrange(n)]
            if m.node_id not in chosen and accept(m):
                chosen[m.node_id] = m
                if len(chosen) == k:
                    return list(chosen.values())
        rest = [m for m in self._others if m.node_id not in chosen and accept(m)]
        while rest and len(chosen) < k:
            m = rest.pop(self.rng.randrange(len(rest)))
            chosen[m.node_id] = m
        return list(chosen.values())

    def add(self, m: Member) -> None:
        """Insert a member not yet in the table."""
        self.members[m.node_id] = m
        self._index[m.node_id] = len(self._others)
        self._others.append(m)
        if m.up:
            self._up += 1

    def remove(self, node_id: bytes) -> None:
        """Forget another member (swaps the last one into its slot)."""
        if self.members.pop(node_id).up:
            self._up -= 1
        i = self._index.pop(node_id)
        last = self._others.pop()
        if i < len(self._others):
            self._others[i] = last
            self._index[last.node_id] = i

    def set_status(self, m: Member, status: Status) -> None:
        """Change a member's status, keeping `alive_count` right."""
        self._up += (status <= Status.SUSPECT) - m.up
        m.status = status
