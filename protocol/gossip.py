"""Dissemination: a transmit-limited broadcast queue and a bounded event de-duplicator.

Invariants (memberlist's TransmitLimitedQueue, restated):
- Each queued broadcast is handed out at most `limit` times, where `limit` is computed at hand-out
  time from the current cluster size (retransmit_mult * ceil(log10(n + 1))).
- Hand-out prefers the fewest-transmitted broadcasts, newest first among equals, packing as many
  as fit in the byte budget.
- A broadcast queued under a key replaces any older one under the same key: a newer fact about a
  subject invalidates older facts, so stale news never spends bandwidth.
- The queue is bounded; past `capacity` the most-transmitted broadcasts are dropped first (they
  have done most of their work; push-pull repairs anything lost).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

MESSAGE_OVERHEAD = 5
"""Bytes msgpack adds around one message inside an envelope's array (bin 32 header)."""


_MAX_MISSES = 8
"""Broadcasts too big for the remaining budget skipped before giving up: packing
the last few bytes is not worth scanning thousands of queued broadcasts."""


class BroadcastQueue:
    """Broadcasts waiting to be piggybacked or gossiped, bucketed by transmit count."""

    __slots__ = ("_buckets", "_where", "capacity", "dropped")

    def __init__(self, capacity: int = 8192) -> None:
        self._buckets: list[OrderedDict[Hashable, bytes]] = []
        self._where: dict[Hashable, int] = {}
        self.capacity = capacity
        self.dropped = 0
        """Broadcasts dropped because the queue was full."""

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def transmits(self, key: Hashable) -> int | None:
        """How often the broadcast under `key` was handed out, or None if not queued."""
        return self._where.get(key)

    def fresh(self) -> int:
        """Broadcasts queued and not yet handed out even once."""
        return len(self._buckets[0]) if self._buckets else 0

    def queue(self, key: Hashable, message: bytes) -> None:
        """Queue `message` under `key`, replacing an older broadcast with the same key."""
        self._remove(key)
        if not self._buckets:
            self._buckets.append(OrderedDict())
        self._buckets[0][key] = message
        self._where[key] = 0
        if len(self._where) > self.capacity:
            self._drop_most_transmitted()

    def get(self, budget: int, limit: int, solo: bool = False) -> list[bytes]:
        """Hand out broadcasts fitting in `budget` bytes, each at most `limit` times in total.

        Args:
            budget: bytes available, counting `MESSAGE_OVERHEAD` per message.
            limit: the current retransmit limit.
            solo: a broadcast bigger than `budget` met before anything was taken is handed out
                alone (for a packet of its own); without it, such a broadcast — a task record or
                result near the inline limit, larger than any packet budget — would never leave.

        Returns:
            The encoded messages, fewest-transmitted first.
        """
        out: list[bytes] = []
        taken: list[tuple[Hashable, int]] = []
        misses = 0
        for count, bucket in enumerate(self._buckets):
            if misses > _MAX_MISSES:
                break
            for key in reversed(bucket):
                size = len(bucket[key]) + MESSAGE_OVERHEAD
                if size <= budget or (solo and not taken):
                    out.append(bucket[key])
                    taken.append((key, count))
                    budget -= size
                    if budget < 0:
                        break
                else:
                    misses += 1
                    if misses > _MAX_MISSES:
                        break
            if budget < 2 * MESSAGE_OVERHEAD:
                break
        for key, count in taken:
            message = self._buckets[count].pop(key)
            if count + 1 >= limit:
                del self._where[key]
                continue
            if len(self._buckets) == count + 1:
                self._buckets.append(OrderedDict())
            self._buckets[count + 1][key] = message
            self._where[key] = count + 1
        return out

    def _remove(self, key: Hashable) -> None:
        count = self._where.pop(key, None)
        if count is not None:
            del self._buckets[count][key]

    def _drop_most_transmitted(self) -> None:
        for bucket in reversed(self._buckets):
            if bucket:
                key, _ = bucket.popitem(last=False)
                del self._where[key]
                self.dropped += 1
                return


class EventDedup:
    """Remembers the most recent user-event ids so each event is delivered once per peer."""

    __slots__ = ("_seen", "capacity")

    def __init__(self, capacity: int) -> None:
        self._seen: OrderedDict[tuple[bytes, int], None] = OrderedDict()
        self.capacity = capacity

    def first_time(self, origin: bytes, ltime: int) -> bool:
        """Record (origin, ltime); True if it had not been seen recently."""
        key = (origin, ltime)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True
