"""Rate limits, circuit breaker and network share (peer/agents/limits.py): synchronous, exact."""

from __future__ import annotations

import math

import pytest

from peer.agents.limits import (
    MAX_DEMAND_BYTES,
    CircuitBreaker,
    ModelLimiter,
    NetworkShare,
    TokenBucket,
    burst_for,
    decode_demand,
    encode_demand,
)


@pytest.mark.parametrize(
    ("rate", "burst", "steps"),
    [
        # (now, amount, expected wait); a wait of 0.0 means taken.
        (60, 2, [(0, 1, 0.0), (0, 1, 0.0), (0, 1, 1.0), (0.5, 1, 0.5), (1, 1, 0.0)]),
        (0, 1, [(0, 1000, 0.0), (0, 1000, 0.0)]),  # rate 0: unlimited
        (60, 5, [(0, 3, 0.0), (0, 3, 1.0), (1, 3, 0.0), (1, 1, 1.0)]),
        # Larger than the burst: waits for a full bucket, then goes into debt.
        (60, 2, [(0, 1, 0.0), (0, 10, 1.0), (1, 10, 0.0), (1, 1, 9.0), (10, 1, 0.0)]),
        (60, 2, [(0, 2, 0.0), (100, 2, 0.0), (100, 1, 1.0)]),  # refill caps at the burst
    ],
)
def test_token_bucket(rate: float, burst: float, steps: list[tuple[float, float, float]]) -> None:
    bucket = TokenBucket(rate, burst)
    for now, amount, wait in steps:
        assert bucket.try_take(now, amount) == pytest.approx(wait), (now, amount)


def test_token_bucket_refills_exactly_despite_float_rounding() -> None:
    bucket = TokenBucket(6, 1)  # 0.1 a second
    assert bucket.try_take(1000, 1) == 0.0
    for now in range(1001, 1010):
        assert bucket.try_take(now, 1) > 0.5
    assert bucket.try_take(1010, 1) == 0.0  # ten refills of 0.1 sum to 0.9999999999999999


def test_token_bucket_refund_charge_and_rate_change() -> None:
    bucket = TokenBucket(60, 2)
    assert bucket.try_take(0, 2) == 0.0
    bucket.refund(0, 1)
    assert bucket.available(0) == 1.0
    bucket.refund(0, 5)
    assert bucket.available(0) == 2.0  # never above the burst
    bucket.charge(0, 4)
    assert bucket.available(0) == -2.0
    bucket.set_rate(1, 120)  # one second at 60/min earned first
    assert bucket.available(1) == -1.0
    assert bucket.available(1.5) == 0.0


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1.0), (6, 1.0), (60, 10.0), (600, 100.0), (90_000, 15_000.0)]
)
def test_burst_for(rate: float, burst: float) -> None:
    assert burst_for(rate) == burst


def test_token_bucket_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


def test_limiter_takes_from_all_buckets_or_none() -> None:
    # 60 requests/min (burst 10) and 600 tokens/min (burst 100).
    limiter = ModelLimiter({"m": (60, 600)})
    assert limiter.reserve("m", 0, 60) == 0.0
    # 60 more tokens do not fit (40 left): wait 2 s; the request taken is given back.
    assert limiter.reserve("m", 0, 60) == pytest.approx(2.0)
    for _ in range(9):
        assert limiter.reserve("m", 0, 1) == 0.0  # all 9 remaining requests still there
    assert limiter.reserve("m", 0, 1) == pytest.approx(1.0)  # now the requests run out


def test_limiter_settle_refunds_or_charges() -> None:
    limiter = ModelLimiter(default=(0, 600))  # burst 100 tokens
    assert limiter.reserve("m", 0, 100) == 0.0
    limiter.settle("m", 0, reserved=100, used=40)  # 60 back
    assert limiter.reserve("m", 0, 60) == 0.0
    limiter.settle("m", 0, reserved=60, used=160)  # 100 more: 100 in debt
    assert limiter.reserve("m", 0, 10) == pytest.approx(11.0)  # (10 + 100) × 60 / 600


def test_limiter_unlimited_by_default_and_per_model() -> None:
    limiter = ModelLimiter({"slow": (6, 0)})
    for _ in range(100):
        assert limiter.reserve("fast", 0, 10_000) == 0.0
    assert limiter.reserve("slow", 0, 10_000) == 0.0
    assert limiter.reserve("slow", 0, 1) == pytest.approx(10.0)


def test_limiter_share_caps_requests() -> None:
    limiter = ModelLimiter()
    assert limiter.reserve("m", 0, 1, share_per_minute=6) == 0.0
    assert limiter.reserve("m", 0, 1, share_per_minute=6) == pytest.approx(10.0)
    assert limiter.reserve("m", 5, 1, share_per_minute=12) == pytest.approx(2.5)


# (method, now, expected state, expected before_call wait or None)
BREAKER_STEPS = [
    ("fail", 0, "closed", None),
    ("success", 0, "closed", None),  # resets the count
    ("fail", 1, "closed", None),
    ("fail", 2, "closed", None),
    ("before", 2, "closed", 0.0),
    ("fail", 3, "open", None),  # third consecutive error: open, cooldown 10
    ("before", 5, "open", 8.0),
    ("fail", 6, "open", None),  # from a call started before it opened: ignored
    ("before", 13, "half_open", 0.0),  # the probe
    ("before", 13, "half_open", 10.0),  # others wait
    ("fail", 14, "open", None),  # probe failed: cooldown 20
    ("before", 33, "open", 1.0),
    ("before", 34, "half_open", 0.0),
    ("abandon", 35, "half_open", None),  # probe cancelled: another may probe
    ("before", 35, "half_open", 0.0),
    ("success", 36, "closed", None),  # closed, cooldown back to 10
    ("before", 36, "closed", 0.0),
    ("fail", 37, "closed", None),
    ("fail", 37, "closed", None),
    ("fail", 37, "open", None),
    ("before", 46, "open", 1.0),
]


def test_breaker_transitions() -> None:
    breaker = CircuitBreaker(errors_to_open=3, cooldown=10)
    for i, (method, now, state, wait) in enumerate(BREAKER_STEPS):
        if method == "fail":
            breaker.on_failure(now)
        elif method == "success":
            breaker.on_success(now)
        elif method == "abandon":
            breaker.on_abandoned(now)
        else:
            assert breaker.before_call(now) == pytest.approx(wait), i
        assert breaker.state == state, i
    assert breaker.opened == 3


def test_breaker_cooldown_doubles_up_to_the_cap() -> None:
    breaker = CircuitBreaker(errors_to_open=1, cooldown=1)
    breaker.on_failure(0)
    now, cooldowns = 0.0, []
    for _ in range(8):
        now += breaker.before_call(now)
        assert breaker.before_call(now) == 0.0  # the probe
        breaker.on_failure(now)
        cooldowns.append(breaker.cooldown)
    assert cooldowns == [2, 4, 8, 16, 16, 16, 16, 16]


@pytest.mark.parametrize(
    ("heard", "my_demand", "now", "expected"),
    [
        ({}, 0, 0, 100.0),  # alone and idle: the whole limit
        ({}, 50, 0, 100.0),  # alone: never more than the limit
        ({"b": 30}, 10, 0, 25.0),  # 100 × 10 / 40
        ({"b": 30}, 30, 0, 50.0),
        ({"b": 99}, 0, 0, 25.0),  # idle: the floor 100 / (2 × 2)
        ({"b": 0, "c": 0}, 0, 0, 100 / 3),  # nobody has demand: an equal split
        ({"b": 30}, 10, 61, 100.0),  # b's entry is stale after the 60 s window
        ({"b": 10, "c": 10, "d": 10, "e": 1000}, 1, 0, 10.0),  # floor 100 / (2 × 5)
    ],
)
def test_network_share(
    heard: dict[str, float], my_demand: float, now: float, expected: float
) -> None:
    share = NetworkShare(limit=100, window=60)
    for peer, demand in heard.items():
        share.observe(peer, demand, 0)
    assert share.share("me", my_demand, now) == pytest.approx(expected)


def test_network_share_expires_and_ignores_self_and_bad_demand() -> None:
    share = NetworkShare(limit=100, window=60)
    share.observe("me", 1000, 0)  # my own gossip coming back: my_demand is used instead
    share.observe("b", 10, 0)
    share.observe("c", math.nan, 0)
    share.observe("d", -5, 0)
    assert share.share("me", 10, 0) == pytest.approx(50.0)
    share.observe("b", 10, 50)
    assert share.peers(100) == 1  # "me" heard at 0 expired, b refreshed at 50
    assert share.peers(111) == 0


def test_demand_round_trip() -> None:
    demand = {"openai/gpt-4o-mini": 12.5, "grapevine/offline": 0.0}
    data = encode_demand(demand)
    assert data == b'{"grapevine/offline":0.0,"openai/gpt-4o-mini":12.5}'
    assert decode_demand(data) == demand


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"m": "fast"}',
        b'{"m": -1}',
        b'{"m": true}',
        b'{"m": NaN}',
        b'{"m": Infinity}',
        b'{"m": 1}' + b" " * MAX_DEMAND_BYTES,
    ],
)
def test_decode_demand_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_demand(data)


def test_encode_demand_rejects() -> None:
    with pytest.raises(ValueError):
        encode_demand({"m": -1.0})
    with pytest.raises(ValueError):
        encode_demand({f"model-{i:04d}": 1.0 for i in range(200)})
