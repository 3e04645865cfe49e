"""The initial join: ask the seeds, retry with capped exponential backoff, report clearly.

Invariants:
- Each attempt re-resolves the seeds (a name may gain records while we wait) and asks every
  address at once; the first answer ends the retrying.
- Delays follow "full jitter" (AWS Architecture Blog, "Exponential Backoff and Jitter", 2015):
  attempt i (from 0) waits uniform(0, min(cap, base * 2**i)), so restarting peers do not retry
  in lockstep against a recovering seed.
- When no seed answers, the result (and a warning log line) names every address tried and why
  it failed: "no seed answered after 5 attempts: 10.0.0.1:7946 (connection refused), ...".
- An attempt in which every seed resolved and every address answered with a refusal that
  waiting cannot change (`final`: our network key, our clock, not a gossip port) ends the
  retrying at once: the user reads why within one attempt (about 2 s), not after the whole
  backoff (about 13 s). The node's own reconnecting goes on either way.
- After the initial join the protocol node itself keeps re-contacting remembered seeds and dead
  members every `reconnect_interval`; this module only adds what the node cannot do without
  I/O: re-resolving DNS names periodically (`refresh_seeds`) and handing new addresses over.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from bootstrap.seeds import GetAddrInfo, Seed, resolve_seeds

log = logging.getLogger(__name__)

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
JOIN_ATTEMPTS = 5
ATTEMPT_TIMEOUT = 2.0
REFRESH_INTERVAL = 60.0

JoinOnce = Callable[[list[str], float], Awaitable[str | None]]
"""Ask these addresses to let us join, waiting at most this long; the address that answered."""
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class JoinResult:
    """How the initial join went."""

    joined_via: str | None
    """The address that answered, or None if none did."""
    attempts: int
    """Attempts made (1 when the first one succeeded)."""
    failures: dict[str, str] = field(default_factory=dict)
    """For a failed join: each address (or unresolvable seed) and why it did not answer."""

    @property
    def ok(self) -> bool:
        """True if a seed answered."""
        return self.joined_via is not None

    @property
    def message(self) -> str:
        """One line for humans describing the outcome."""
        if self.joined_via is not None:
            return f"joined through {self.joined_via} after {self.attempts} attempt(s)"
        reasons = ", ".join(f"{addr} ({why})" for addr, why in self.failures.items())
        tries = f"{self.attempts} attempt{'s' if self.attempts != 1 else ''}"
        return f"no seed answered after {tries}: {reasons or 'no seeds given'}"


def backoff_delay(
    attempt: int, rng: random.Random, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP
) -> float:
    """Return the full-jitter delay before retry number `attempt` (0 for the first retry)."""
    return rng.uniform(0.0, min(cap, base * 2.0**attempt))


async def join_with_retry(
    seeds: Sequence[Seed],
    join_once: JoinOnce,
    *,
    hints: Sequence[str] = (),
    failure_reason: Callable[[str], str | None] = lambda addr: None,
    final: Callable[[str], bool] = lambda reason: False,
    attempts: int = JOIN_ATTEMPTS,
    attempt_timeout: float = ATTEMPT_TIMEOUT,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    getaddrinfo: GetAddrInfo | None = None,
) -> JoinResult:
    """Join through the first of `seeds` (or `hints`) that answers, retrying with backoff.

    Args:
        seeds: configured seeds, resolved afresh before each attempt.
        join_once: asks addresses to let us join (`peer.runtime.driver.Driver.join`).
        hints: further addresses to try as they are (members known from a previous run).
        failure_reason: why sending to an address last failed, if known (the transport's
            `last_failure.get`); otherwise an address that stayed silent is reported as such.
        final: whether a failure reason is a refusal that retrying soon will not change
            (`peer.runtime.transport.is_final_refusal`); see the module invariants.
        attempts: attempts before giving up (at least 1).
        attempt_timeout: seconds to wait for an answer in each attempt.
        base, cap: backoff parameters (see the module docstring).
        rng: randomness for the jitter.
        sleep: awaits a delay (tests inject a fake).
        getaddrinfo: resolver (tests inject a fake).

    Returns:
        The outcome; on failure, `message` names each address and its failure. The node keeps
        retrying remembered seeds on its own afterwards.
    """
    rng = rng or random.Random()
    failures: dict[str, str] = {}
    for attempt in range(1, max(1, attempts) + 1):
        resolved = await resolve_seeds(seeds, getaddrinfo)
        addresses = resolved.addresses + [h for h in hints if h not in resolved.addresses]
        failures = dict(resolved.failures)
        if addresses:
            answered = await join_once(addresses, attempt_timeout)
            if answered is not None:
                result = JoinResult(answered, attempt)
                log.info("%s", result.message)
                return result
            for addr in addresses:
                failures[addr] = failure_reason(addr) or f"no answer within {attempt_timeout:g} s"
            if not resolved.failures and all(final(failures[addr]) for addr in addresses):
                result = JoinResult(None, attempt, failures)
                log.warning("%s; will keep retrying in the background", result.message)
                return result
        if attempt < attempts:
            delay = backoff_delay(attempt - 1, rng, base, cap)
            log.info("join attempt %d of %d failed; retrying in %.1f s", attempt, attempts, delay)
            await sleep(delay)
    result = JoinResult(None, max(1, attempts), failures)
    log.warning("%s; will keep retrying in the background", result.message)
    return result


async def refresh_seeds(
    seeds: Sequence[Seed],
    join_now: Callable[[list[str]], None],
    *,
    known: Sequence[str] = (),
    interval: float = REFRESH_INTERVAL,
    rounds: int | None = None,
    sleep: Sleep = asyncio.sleep,
    getaddrinfo: GetAddrInfo | None = None,
) -> None:
    """Every `interval` seconds, re-resolve seed names and join through any new address.

    Only DNS names are re-resolved; IP literals never change. Runs until cancelled, or for
    `rounds` rounds when given (tests).

    Args:
        seeds: configured seeds.
        join_now: starts a join with new addresses without waiting (`Driver.join_now`).
        known: addresses already handed to the node.
        interval: seconds between resolutions.
        rounds: stop after this many rounds; None runs forever.
        sleep: awaits a delay (tests inject a fake).
        getaddrinfo: resolver (tests inject a fake).
    """
    names = [seed for seed in seeds if not seed.is_literal]
    if not names:
        return
    seen = set(known)
    done = 0
    while rounds is None or done < rounds:
        await sleep(interval)
        done += 1
        resolved = await resolve_seeds(names, getaddrinfo)
        for seed, why in resolved.failures.items():
            log.warning("seed %s %s", seed, why)
        fresh = [addr for addr in resolved.addresses if addr not in seen]
        if fresh:
            log.info("seed names now also resolve to %s; joining through them", ", ".join(fresh))
            seen.update(fresh)
            join_now(fresh)
