"""The simulated network: latency, loss, duplication, reordering and partitions.

Invariants:
- Every random choice comes from the one `random.Random` passed in, in a fixed order, so a seed
  replays the same faults exactly.
- Reordering is not a separate knob: independent per-message latency jitter reorders messages
  on the same link, as it does on a real network.
- A partition is a labelling of addresses into sides; a message crosses only between addresses
  on the same side. Addresses not labelled are on side 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LinkModel:
    """How one message fares on the wire.

    Attributes:
        latency: fixed one-way delay in seconds.
        jitter: mean of an exponential extra delay in seconds (the source of reordering).
        loss: probability a message is lost.
        duplicate: probability a delivered message arrives twice.
    """

    latency: float = 0.0005
    jitter: float = 0.0005
    loss: float = 0.0
    duplicate: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first impossible field."""
        if self.latency < 0 or self.jitter < 0:
            raise ValueError("latency and jitter must be non-negative")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if not 0.0 <= self.duplicate <= 1.0:
            raise ValueError("duplicate must be in [0, 1]")


class Network:
    """Decides, for each message, whether and when it arrives."""

    def __init__(self, model: LinkModel, rng: random.Random) -> None:
        model.validate()
        self.model = model
        self.rng = rng
        self._side: dict[str, int] = {}
        self.sent = 0
        self.lost = 0
        self.cut = 0
        self.duplicated = 0
        self.bytes = 0

    def partition(self, sides: list[list[str]]) -> None:
        """Cut the network into `sides`; traffic only flows within a side."""
        self._side = {addr: i + 1 for i, side in enumerate(sides) for addr in side}

    def heal(self) -> None:
        """Remove every partition."""
        self._side = {}

    def reachable(self, a: str, b: str) -> bool:
        """True if no partition separates `a` and `b`."""
        return self._side.get(a, 0) == self._side.get(b, 0)

    def delays(self, src: str, dst: str, size: int) -> list[float]:
        """The delays after which copies of one message arrive (empty: it is lost)."""
        self.sent += 1
        self.bytes += size
        if not self.reachable(src, dst):
            self.cut += 1
            return []
        m = self.model
        rng = self.rng
        if m.loss and rng.random() < m.loss:
            self.lost += 1
            return []
        first = m.latency + (rng.expovariate(1.0 / m.jitter) if m.jitter else 0.0)
        if m.duplicate and rng.random() < m.duplicate:
            self.duplicated += 1
            second = m.latency + (rng.expovariate(1.0 / m.jitter) if m.jitter else 0.0)
            return [first, second]
        return [first]
