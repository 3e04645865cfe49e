"""Initial join: full-jitter backoff, a clear report when no seed answers, DNS refresh."""

from __future__ import annotations

import random
import socket
from typing import Any

import pytest

from bootstrap.join import backoff_delay, join_with_retry, refresh_seeds
from bootstrap.seeds import Seed
from peer.runtime.transport import is_final_refusal, refusal_reason


class FixedRng(random.Random):
    """uniform() returns the upper bound, exposing the backoff ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    rng = FixedRng()
    assert [backoff_delay(i, rng) for i in range(9)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
        30.0,
    ]
    real = random.Random(1)
    for i in range(20):
        assert 0.0 <= backoff_delay(i, real) <= min(30.0, 0.5 * 2**i)


async def test_no_seed_answers_reports_every_address_and_reason() -> None:
    sleep = FakeSleep()
    asked: list[list[str]] = []

    async def join_once(addrs: list[str], timeout: float) -> str | None:
        asked.append(addrs)
        return None

    reasons = {"10.0.0.1:7946": "connection refused"}
    result = await join_with_retry(
        [Seed("10.0.0.1", 7946), Seed("10.0.0.2", 7000)],
        join_once,
        failure_reason=reasons.get,
        attempts=4,
        rng=FixedRng(),
        sleep=sleep,
    )
    assert not result.ok and result.attempts == 4
    assert sleep.delays == [0.5, 1.0, 2.0]
    assert asked == [["10.0.0.1:7946", "10.0.0.2:7000"]] * 4
    assert result.message == (
        "no seed answered after 4 attempts: 10.0.0.1:7946 (connection refused), "
        "10.0.0.2:7000 (no answer within 2 s)"
    )


async def test_an_attempt_every_seed_refused_for_good_ends_the_retrying() -> None:
    sleep = FakeSleep()
    asked: list[list[str]] = []

    async def join_once(addrs: list[str], timeout: float) -> str | None:
        asked.append(addrs)
        return None

    reasons = {
        "10.0.0.1:7946": refusal_reason(403, b"unknown_key\n"),
        "10.0.0.2:8946": refusal_reason(401, b"{}"),
    }
    result = await join_with_retry(
        [Seed("10.0.0.1", 7946), Seed("10.0.0.2", 8946)],
        join_once,
        failure_reason=reasons.get,
        final=is_final_refusal,
        rng=FixedRng(),
        sleep=sleep,
    )
    assert (result.ok, result.attempts, len(asked), sleep.delays) == (False, 1, 1, [])
    assert result.message.startswith(
        "no seed answered after 1 attempt: 10.0.0.1:7946 (it refused our network key"
    )


@pytest.mark.parametrize(
    "other",
    ["connection refused", None, "HTTP 503 (busy)", "HTTP 403 (replay)"],
    ids=["refused-connection", "silent", "busy", "replay"],
)
async def test_one_seed_that_may_still_answer_keeps_the_retrying(other: str | None) -> None:
    reasons = {"10.0.0.1:7946": refusal_reason(403, b"stale_timestamp\n")}
    if other is not None:
        reasons["10.0.0.2:7946"] = other
    sleep = FakeSleep()

    async def join_once(addrs: list[str], timeout: float) -> str | None:
        return None

    result = await join_with_retry(
        [Seed("10.0.0.1", 7946), Seed("10.0.0.2", 7946)],
        join_once,
        failure_reason=reasons.get,
        final=is_final_refusal,
        attempts=3,
        rng=FixedRng(),
        sleep=sleep,
    )
    assert (result.attempts, sleep.delays) == (3, [0.5, 1.0])


async def test_success_on_a_later_attempt_stops_retrying() -> None:
    sleep = FakeSleep()
    answers = [None, None, "10.0.0.2:7946"]

    async def join_once(addrs: list[str], timeout: float) -> str | None:
        return answers.pop(0)

    result = await join_with_retry(
        [Seed("10.0.0.2", 7946)], join_once, hints=["10.9.9.9:1"], rng=FixedRng(), sleep=sleep
    )
    assert result.ok and result.joined_via == "10.0.0.2:7946" and result.attempts == 3
    assert sleep.delays == [0.5, 1.0]
    assert "joined through 10.0.0.2:7946" in result.message


async def test_unresolvable_names_are_reported() -> None:
    async def resolver(host: str, port: int, **kw: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def join_once(addrs: list[str], timeout: float) -> str | None:
        raise AssertionError("nothing to ask")

    result = await join_with_retry(
        [Seed("gone.example", 7946)],
        join_once,
        attempts=2,
        sleep=FakeSleep(),
        getaddrinfo=resolver,
    )
    assert result.message == (
        "no seed answered after 2 attempts: gone.example:7946 "
        "(does not resolve: name or service not known)"
    )


async def test_refresh_hands_new_addresses_to_the_node() -> None:
    records = [["10.0.0.1"], ["10.0.0.1", "10.0.0.3"], ["10.0.0.3"]]

    async def resolver(host: str, port: int, **kw: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in records.pop(0)]

    joined: list[list[str]] = []
    sleep = FakeSleep()
    await refresh_seeds(
        [Seed("seeds.example.org", 7946), Seed("10.0.0.7", 1)],
        joined.append,
        known=["10.0.0.1:7946"],
        interval=60.0,
        rounds=3,
        sleep=sleep,
        getaddrinfo=resolver,
    )
    assert joined == [["10.0.0.3:7946"]]
    assert sleep.delays == [60.0] * 3


async def test_refresh_returns_at_once_without_names() -> None:
    async def fail(*args: Any, **kw: Any) -> None:
        raise AssertionError("no sleeping needed")

    await refresh_seeds([Seed("10.0.0.7", 1)], lambda addrs: None, sleep=fail)
