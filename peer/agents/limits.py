"""Rate limits and the circuit breaker around model calls: pure, with `now` as a parameter.

Nothing here reads a clock, sleeps or locks: every method takes `now` (seconds on a monotonic
clock) and answers with the seconds to wait, 0.0 meaning "go ahead, it is taken". The asyncio
layer in `peer.agents.llm` does the waiting and asks again.

Invariants:
- A rate of 0 means unlimited: such a bucket never makes anyone wait.
- A bucket holds at most `burst` tokens and refills at rate / 60 per second. A take larger
  than the burst waits for a full bucket and then leaves it in debt (negative), which later
  takes repay by waiting; so a huge request is slow, never impossible.
- `ModelLimiter.reserve` takes from all of a model's buckets or from none.
- The breaker lets exactly one probe through when half-open; everyone else waits.
- `NetworkShare.share` is within [floor, limit] and only counts peers heard from within the
  freshness window.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

BURST_SECONDS = 10.0
"""A bucket's burst is this many seconds of its rate (at least one unit): enough to absorb a
fan-out of parallel calls, small enough that a per-minute provider limit is met evenly."""


def burst_for(rate_per_minute: float) -> float:
    """The burst `ModelLimiter` gives a bucket: max(1, rate_per_minute × BURST_SECONDS / 60)."""
    return max(1.0, rate_per_minute * BURST_SECONDS / 60.0)


_EPSILON = 1e-9


class TokenBucket:
    """A token bucket: `rate_per_minute` units per minute, up to `burst` at once."""

    __slots__ = ("rate_per_minute", "burst", "_tokens", "_at")

    def __init__(self, rate_per_minute: float, burst: float) -> None:
        if rate_per_minute < 0 or burst <= 0:
            raise ValueError("a token bucket needs a rate >= 0 and a burst > 0")
        self.rate_per_minute = rate_per_minute
        self.burst = burst
        self._tokens = burst
        self._at: float | None = None

    def try_take(self, now: float, amount: float) -> float:
        """Take `amount` if available.

        Returns:
            0.0 if taken, else the seconds until it would be (nothing is taken then).
        """
        if self.rate_per_minute == 0:
            return 0.0
        self._refill(now)
        needed = min(amount, self.burst)
        # The epsilon absorbs rounding in the refill sums (ten refills of 0.1 are not 1.0),
        # which would otherwise ask the caller to wait a few femtoseconds, forever.
        if self._tokens + _EPSILON >= needed:
            self._tokens -= amount
            return 0.0
        return (needed - self._tokens) * 60.0 / self.rate_per_minute

    def refund(self, now: float, amount: float) -> None:
        """Give back `amount` (a reservation that was not used), up to the burst."""
        if self.rate_per_minute == 0:
            return
        self._refill(now)
        self._tokens = min(self.burst, self._tokens + amount)

    def charge(self, now: float, amount: float) -> None:
        """Take `amount` without waiting (a call that already happened), going into debt."""
        if self.rate_per_minute == 0:
            return
        self._refill(now)
        self._tokens -= amount

    def set_rate(self, now: float, rate_per_minute: float) -> None:
        """Change the rate from `now` on (tokens earned so far at the old rate are kept)."""
        if rate_per_minute < 0:
            raise ValueError("a token bucket needs a rate >= 0")
        self._refill(now)
        self.rate_per_minute = rate_per_minute

    def available(self, now: float) -> float:
        """Tokens in the bucket at `now` (negative while in debt)."""
        self._refill(now)
        return self._tokens

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            earned = (now - self._at) * self.rate_per_minute / 60.0
            self._tokens = min(self.burst, self._tokens + earned)
        if self._at is None or now > self._at:
            self._at = now


@dataclass(slots=True)
class _ModelBuckets:
    requests: TokenBucket
    tokens: TokenBucket
    share: TokenBucket | None = None


class ModelLimiter:
    """Per model, a requests-per-minute and a tokens-per-minute bucket.

    Tokens are reserved by an estimate before the call and corrected by the actual usage
    after it (`settle`): under-estimates put the bucket in debt, over-estimates are refunded.
    """

    __slots__ = ("limits", "default", "_buckets")

    def __init__(
        self,
        limits: Mapping[str, tuple[float, float]] | None = None,
        default: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """Args:
        limits: model → (requests per minute, tokens per minute); 0 = unlimited.
        default: the limits of a model not in `limits`.
        """
        self.limits: Mapping[str, tuple[float, float]] = dict(limits or {})
        self.default = default
        self._buckets: dict[str, _ModelBuckets] = {}

    def reserve(
        self, model: str, now: float, tokens: int, share_per_minute: float | None = None
    ) -> float:
        """Reserve one request and `tokens` tokens for `model`, or nothing.

        Args:
            share_per_minute: this peer's share of a network-wide limit, an extra
                requests-per-minute cap; None when there is none.

        Returns:
            0.0 if reserved, else the seconds to wait before asking again.
        """
        buckets = self._for(model)
        if share_per_minute is not None:
            if buckets.share is None:
                buckets.share = TokenBucket(share_per_minute, burst_for(share_per_minute))
            buckets.share.set_rate(now, share_per_minute)
            buckets.share.burst = burst_for(share_per_minute)
        taken: list[tuple[TokenBucket, float]] = []
        for bucket, amount in (
            (buckets.requests, 1.0),
            (buckets.tokens, float(tokens)),
            (buckets.share, 1.0),
        ):
            if bucket is None:
                continue
            wait = bucket.try_take(now, amount)
            if wait > 0:
                for done, back in taken:
                    done.refund(now, back)
                return wait
            taken.append((bucket, amount))
        return 0.0

    def settle(self, model: str, now: float, reserved: int, used: int) -> None:
        """Correct a reservation of `reserved` tokens by the `used` ones (0 for a failed call)."""
        bucket = self._for(model).tokens
        if used < reserved:
            bucket.refund(now, reserved - used)
        elif used > reserved:
            bucket.charge(now, used - reserved)

    def _for(self, model: str) -> _ModelBuckets:
        buckets = self._buckets.get(model)
        if buckets is None:
            requests, tokens = self.limits.get(model, self.default)
            buckets = _ModelBuckets(
                TokenBucket(requests, burst_for(requests)), TokenBucket(tokens, burst_for(tokens))
            )
            self._buckets[model] = buckets
        return buckets


MAX_COOLDOWN_FACTOR = 16
"""A breaker's cooldown doubles on each failed probe up to this multiple of the first one."""


class CircuitBreaker:
    """Closed → open after `errors_to_open` consecutive provider errors; then half-open probes.

    - closed: calls go ahead; a success resets the error count.
    - open: callers wait until the cooldown has passed since it opened.
    - half-open: the first caller after the cooldown is the probe; others wait. The probe's
      success closes the breaker (cooldown back to its first value); its failure re-opens it
      with the cooldown doubled, at most `MAX_COOLDOWN_FACTOR` × the first.

    Outcomes reported while open belong to calls started before it opened and are ignored.
    In half-open any outcome is taken as the probe's (a call started while closed may finish
    then; it is as good evidence as the probe).
    """

    __slots__ = (
        "errors_to_open",
        "base_cooldown",
        "cooldown",
        "state",
        "errors",
        "_opened_at",
        "_probing",
        "opened",
    )

    def __init__(self, errors_to_open: int, cooldown: float) -> None:
        if errors_to_open < 1 or cooldown < 0:
            raise ValueError("a breaker needs errors_to_open >= 1 and cooldown >= 0")
        self.errors_to_open = errors_to_open
        self.base_cooldown = cooldown
        self.cooldown = cooldown
        self.state = "closed"
        """closed, open or half_open."""
        self.errors = 0
        """Consecutive provider errors while closed."""
        self.opened = 0
        """How many times it opened (for status)."""
        self._opened_at = 0.0
        self._probing = False

    def before_call(self, now: float) -> float:
        """Ask to make a call.

        Returns:
            0.0 to go ahead (when half-open, the caller is now the probe), else the seconds
            to wait before asking again (while a probe is in flight: the cooldown, as an
            upper bound; the caller may ask earlier).
        """
        if self.state == "closed":
            return 0.0
        if self.state == "open":
            remaining = self._opened_at + self.cooldown - now
            if remaining > 0:
                return remaining
            self.state = "half_open"
            self._probing = False
        if self._probing:
            return max(self.cooldown, 0.001)
        self._probing = True
        return 0.0

    def on_success(self, now: float) -> None:
        """The provider answered (a non-retryable error such as a bad request counts too)."""
        if self.state == "open":
            return
        self.state, self.errors, self.cooldown, self._probing = (
            "closed",
            0,
            self.base_cooldown,
            False,
        )

    def on_failure(self, now: float) -> None:
        """The provider failed (rate limit, connection error, timeout, 5xx)."""
        if self.state == "open":
            return
        if self.state == "half_open":
            self.cooldown = min(self.cooldown * 2, self.base_cooldown * MAX_COOLDOWN_FACTOR)
            self._open(now)
            return
        self.errors += 1
        if self.errors >= self.errors_to_open:
            self._open(now)

    def on_abandoned(self, now: float) -> None:
        """A call ended with no outcome (cancelled): if it was the probe, let another probe."""
        if self.state == "half_open":
            self._probing = False

    def _open(self, now: float) -> None:
        self.state, self._opened_at, self._probing, self.errors = "open", now, False, 0
        self.opened += 1


class NetworkShare:
    """A network-wide requests-per-minute limit divided among peers in proportion to demand.

    Each peer gossips its demand (requests per minute it would make if unlimited); each keeps
    the demands heard within `window` seconds and computes its own share locally. The floor
    of limit / (2 × peers) lets a peer with no recent demand start; as every peer computes
    from the demands it has heard, the shares sum to about the limit (more while gossip lags
    or floors apply — a soft limit).
    """

    __slots__ = ("limit", "window", "_heard")

    def __init__(self, limit: float, window: float) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("a network share needs a limit > 0 and a window > 0")
        self.limit = limit
        self.window = window
        self._heard: dict[str, tuple[float, float]] = {}

    def observe(self, peer_id: str, demand: float, now: float) -> None:
        """Record a peer's gossiped demand (requests per minute) heard at `now`."""
        if not math.isfinite(demand) or demand < 0:
            return
        self._heard[peer_id] = (max(demand, 0.0), now)
        self._expire(now)

    def share(self, me: str, my_demand: float, now: float) -> float:
        """This peer's requests-per-minute share at `now`.

        Returns:
            min(limit, max(limit / (2 × peers), limit × my_demand / total demand)), peers and
            total counting this peer and the peers heard within the window; limit / peers
            when nobody has demand.
        """
        self._expire(now)
        others = {p: d for p, (d, _) in self._heard.items() if p != me}
        peers = len(others) + 1
        total = sum(others.values()) + my_demand
        floor = self.limit / (2 * peers)
        if total <= 0:
            return self.limit / peers
        return min(self.limit, max(floor, self.limit * my_demand / total))

    def peers(self, now: float) -> int:
        """Peers heard within the window (this one not included unless it observed itself)."""
        self._expire(now)
        return len(self._heard)

    def _expire(self, now: float) -> None:
        stale = [p for p, (_, at) in self._heard.items() if now - at > self.window]
        for peer_id in stale:
            del self._heard[peer_id]


MAX_DEMAND_BYTES = 2048
"""A demand payload rides in gossip: bounded so it cannot crowd out membership messages."""


def encode_demand(demand: Mapping[str, float]) -> bytes:
    """Encode model → demand (requests per minute) as compact JSON for gossip.

    Raises:
        ValueError: a negative or non-finite demand, or an encoding over MAX_DEMAND_BYTES.
    """
    for model, value in demand.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"demand for {model!r} must be a finite number >= 0")
    body = {model: round(value, 3) for model, value in sorted(demand.items())}
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > MAX_DEMAND_BYTES:
        raise ValueError(f"demand payload is {len(data)} bytes (max {MAX_DEMAND_BYTES})")
    return data


def decode_demand(data: bytes) -> dict[str, float]:
    """Decode a gossiped demand payload.

    Raises:
        ValueError: oversized, not JSON, not an object of model → finite number >= 0.
    """
    if len(data) > MAX_DEMAND_BYTES:
        raise ValueError(f"demand payload is {len(data)} bytes (max {MAX_DEMAND_BYTES})")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"demand payload is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("demand payload is not an object")
    demand: dict[str, float] = {}
    for model, value in body.items():
        valid = isinstance(value, int | float) and not isinstance(value, bool)
        if not valid or not math.isfinite(value) or value < 0:
            raise ValueError(f"demand for {model!r} is not a finite number >= 0")
        demand[model] = float(value)
    return demand
