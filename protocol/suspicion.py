"""Lifeguard's two refinements of SWIM (Dadgar, Phillips, Currey; "Lifeguard", 2018).

Invariants:
- A `Suspicion` starts at `max_timeout` and only shrinks, toward `min_timeout`, as independent
  accusers confirm it; the accuser that raised it never counts as a confirmation, and each
  accuser counts once. (`restart` after a local stall is the one exception and moves it later.)
- `Awareness` is a local-health score in [0, max_multiplier - 1]. It rises when this peer misses
  acks or nacks, or must refute a suspicion of itself, and falls with each successful probe.
  Timeouts are scaled by score + 1, so a slow peer stops accusing healthy ones.
"""

from __future__ import annotations

from protocol.config import suspicion_timeout


class Suspicion:
    """The timer state of one suspected member."""

    __slots__ = ("start", "min_timeout", "max_timeout", "wanted", "accusers", "generation")

    def __init__(
        self,
        now: float,
        min_timeout: float,
        max_timeout: float,
        wanted: int,
        accuser: bytes,
        generation: int,
    ) -> None:
        self.start = now
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.wanted = wanted
        self.accusers: set[bytes] = {accuser}
        self.generation = generation
        """Distinguishes this suspicion's timers from those of an earlier, cleared one."""

    @property
    def confirmations(self) -> int:
        """Independent accusers beyond the first."""
        return len(self.accusers) - 1

    @property
    def deadline(self) -> float:
        """When the suspected member is declared dead, given the confirmations so far."""
        timeout = suspicion_timeout(
            self.min_timeout, self.max_timeout, self.wanted, self.confirmations
        )
        return self.start + timeout

    def confirm(self, accuser: bytes) -> bool:
        """Record an accusation; True if it was new (and so worth re-gossiping)."""
        if accuser in self.accusers or self.confirmations >= self.wanted:
            return False
        self.accusers.add(accuser)
        return True

    def restart(self, now: float) -> None:
        """Start the timeout over from `now`: our own clock jumped and cannot be trusted."""
        self.start = now


class Awareness:
    """Lifeguard's local health multiplier."""

    __slots__ = ("score", "max_multiplier")

    def __init__(self, max_multiplier: int) -> None:
        self.score = 0
        self.max_multiplier = max_multiplier

    def apply(self, delta: int) -> None:
        """Add `delta` to the score, clamped to [0, max_multiplier - 1]."""
        self.score = min(self.max_multiplier - 1, max(0, self.score + delta))

    def scale(self, timeout: float) -> float:
        """Return `timeout` stretched by the current health: timeout * (score + 1)."""
        return timeout * (self.score + 1)
