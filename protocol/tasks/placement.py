"""Where a task lives: its replica set, and who else needs its objects (its audience).

Invariants:
- A task's replica set is the top `k` live members by rendezvous (HRW) score for the task id,
  k = replication + 1. The score depends only on the task id and the member id, so peers with
  the same view of who is alive compute the same set, and a member joining or leaving moves
  only the tasks it enters or leaves the top k of (about k/N of them).
- The first member of the replica set is the task's arbiter: it repairs the task's audience
  when membership changes (see `protocol.tasks.repair`).
- A task's audience is who must receive its objects directly: the replica set, its origin
  (where the client waits, and for a child task the parent's owner that submitted it), the
  owner of its current claim, and, while the task waits for an owner, the peer first in line to
  run it and the one it granted the epoch to. Task objects go to the audience and nowhere else,
  so a task costs the network O(k), not O(N): with the executor and origin outside the replica
  set, each of its three signed objects (record, claim, result) is verified by k + 1 peers,
  3k + 3 in all. Standbys further down the line are sent the task only when it comes to them
  (the primary is full and grants them its turn, or the arbiter repairs the audience after a
  death).
- The candidates to run a task are ranked by the same HRW score; `CandidateRankings` caches the
  order per task and recomputes it only when the candidates change.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable

from protocol.tasks.state import TaskState


def top_by_score(task_id: bytes, members: Iterable[bytes], k: int) -> list[bytes]:
    """The `k` members with the highest HRW score for `task_id`, best first."""
    return [n for _, n in sorted(scored(task_id, members), key=_score, reverse=True)[:k]]


def scored(task_id: bytes, members: Iterable[bytes]) -> list[tuple[int, bytes]]:
    """(`hrw_score(task_id, n)`, n) for each of `members`, in their order.

    The same as calling `hrw_score` per member, inlined: every holder of a task ranks every
    member for it twice (its replica set and its candidates), which at 30 peers was most of a
    task's hashing."""
    sha256, from_bytes = hashlib.sha256, int.from_bytes
    return [(from_bytes(sha256(task_id + n).digest()[:8], "big"), n) for n in members]


_score = operator.itemgetter(0)

NONCE_TRIES = 64
"""Nonces tried for a task submitted without an idempotency key before its origin settles for
the first (`nonce_variant`): at 30 peers and 3 replicas one in 15 puts the origin among the
task's replicas below its arbiter; at 100, one in 50."""


def nonce_variant(nonce: bytes, i: int) -> bytes:
    """The `i`th nonce tried for a submission whose host drew `nonce`: `nonce` itself first,
    then 16 bytes derived from it (unique per submission as the nonce is)."""
    if i == 0:
        return nonce
    return hashlib.sha256(b"grapevine/nonce-variant/v1" + bytes([i]) + nonce).digest()[:16]


def members_above(task_id: bytes, member: bytes, members: Iterable[bytes], k: int) -> int:
    """How many of `members` score above `member` for `task_id`, counted up to `k` (the
    count stops there: most ids put `member` far down, and a few hashes tell)."""
    sha256, from_bytes = hashlib.sha256, int.from_bytes
    mine = from_bytes(sha256(task_id + member).digest()[:8], "big")
    above = 0
    for n in members:
        if n != member and from_bytes(sha256(task_id + n).digest()[:8], "big") > mine:
            above += 1
            if above == k:
                break
    return above


class ReplicaSets:
    """Replica sets of held tasks, cached while the live membership is unchanged.

    Args:
        k: members per replica set (replication + 1).
    """

    __slots__ = ("k", "_live", "_sets")

    def __init__(self, k: int) -> None:
        self.k = k
        self._live: tuple[bytes, ...] = ()
        self._sets: dict[bytes, list[bytes]] = {}

    def of(self, task_id: bytes, live: tuple[bytes, ...]) -> list[bytes]:
        """The replica set of `task_id` among `live` (every up member, this peer included)."""
        if live != self._live:
            self._live = live
            self._sets.clear()
        found = self._sets.get(task_id)
        if found is None:
            found = self._sets[task_id] = top_by_score(task_id, live, self.k)
        return found

    def with_member(self, task_id: bytes, live: tuple[bytes, ...], member: bytes) -> list[bytes]:
        """The replica set of `task_id` among `live` plus `member` (a peer that just joined
        and is not live in our view yet), from the cached set: it enters or it does not."""
        found = self.of(task_id, live)
        if member in found:
            return found
        return top_by_score(task_id, [*found, member], self.k)

    def forget(self, task_id: bytes) -> None:
        """Drop the cached set of a task no longer held."""
        self._sets.pop(task_id, None)


class CandidateRankings:
    """The HRW order of each open task's candidates, cached.

    An open task is looked at whenever a peer's roles or fullness change; hashing every
    candidate each time cost a quarter of a peer's CPU with 100 peers and 1,000 open tasks.
    Scores never change, and candidates only as members come and go.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[bytes, tuple[list[bytes], list[bytes], dict[bytes, int]]] = {}
        """Task id -> its candidates as last seen, their HRW order, and every score computed."""

    def rank(self, task_id: bytes, candidates: list[bytes]) -> list[bytes]:
        """`candidates` in HRW order for `task_id`, best first."""
        cached = self._cache.get(task_id)
        if cached is not None and cached[0] == candidates:
            return cached[1]
        scores = cached[2] if cached is not None else {}
        missing = [n for n in candidates if n not in scores]
        if missing:
            scores.update((n, score) for score, n in scored(task_id, missing))
        ranked = sorted(candidates, key=scores.__getitem__, reverse=True)
        self._cache[task_id] = (candidates, ranked, scores)
        return ranked

    def forget(self, task_id: bytes) -> None:
        """Drop the order of a task that is no longer open."""
        self._cache.pop(task_id, None)


def audience(
    st: TaskState, replicas: list[bytes], primary: bytes | None, epoch: int | None
) -> set[bytes]:
    """Who must receive the objects of the task `st` directly (see the module's invariants).

    Args:
        st: the task as held here.
        replicas: its replica set.
        primary: while the task waits for an owner, the live peer first in line to run it.
        epoch: the epoch it waits to be claimed under (None: it does not wait for an owner).
    """
    out = set(replicas)
    if st.record is not None:
        out.add(st.record.origin)
    if st.claim is not None:
        out.add(st.claim.owner)
    if primary is not None:
        out.add(primary)
    if epoch is not None and epoch in st.grants:
        out.add(st.grants[epoch])
    return out
