"""Lifeguard's suspicion timeout and local-health awareness (protocol/suspicion.py)."""

from __future__ import annotations

import math

import pytest

from protocol.suspicion import Awareness, Suspicion

A, B, C, D = b"a" * 32, b"b" * 32, b"c" * 32, b"d" * 32


def fresh(now: float = 100.0, wanted: int = 3) -> Suspicion:
    return Suspicion(now, min_timeout=4.0, max_timeout=24.0, wanted=wanted, accuser=A, generation=7)


def test_deadline_starts_at_max() -> None:
    s = fresh()
    assert s.confirmations == 0
    assert s.deadline == 100.0 + 24.0


def test_deadline_shrinks_logarithmically_with_confirmations() -> None:
    s = fresh(wanted=3)
    deadlines = []
    for accuser in (B, C):
        assert s.confirm(accuser)
        deadlines.append(s.deadline)
    # max - log(n + 1) / log(wanted + 1) * (max - min), Lifeguard section IV-B.
    assert deadlines[0] == pytest.approx(100.0 + 24.0 - math.log(2) / math.log(4) * 20.0)
    assert deadlines[0] == pytest.approx(114.0)
    assert deadlines[1] == pytest.approx(100.0 + 24.0 - math.log(3) / math.log(4) * 20.0)
    assert 104.0 < deadlines[1] < deadlines[0] < 124.0


def test_deadline_reaches_min_at_wanted_confirmations() -> None:
    s = fresh(wanted=3)
    for accuser in (B, C, D):
        s.confirm(accuser)
    assert s.confirmations == 3
    assert s.deadline == 104.0


def test_confirmations_beyond_wanted_are_not_counted() -> None:
    s = fresh(wanted=1)
    assert s.confirm(B)
    assert not s.confirm(C)
    assert s.confirmations == 1
    assert s.deadline == 104.0


def test_no_confirmations_wanted_means_min_from_the_start() -> None:
    assert fresh(wanted=0).deadline == 104.0


def test_same_accuser_counts_once() -> None:
    s = fresh()
    assert s.confirm(B)
    assert not s.confirm(B)
    assert s.confirmations == 1


def test_original_accuser_is_not_a_confirmation() -> None:
    s = fresh()
    assert not s.confirm(A)
    assert s.confirmations == 0
    assert s.deadline == 124.0


def test_restart_moves_the_start_and_keeps_confirmations() -> None:
    s = fresh(wanted=1)
    s.confirm(B)
    s.restart(500.0)
    assert s.start == 500.0
    assert s.deadline == 504.0
    assert s.generation == 7


def test_awareness_starts_healthy_and_scales_by_score_plus_one() -> None:
    a = Awareness(max_multiplier=8)
    assert a.score == 0
    assert a.scale(0.5) == 0.5
    a.apply(2)
    assert a.scale(0.5) == 1.5


def test_awareness_clamps_to_zero_and_max_minus_one() -> None:
    a = Awareness(max_multiplier=8)
    a.apply(-3)
    assert a.score == 0
    a.apply(100)
    assert a.score == 7
    assert a.scale(1.0) == 8.0
    a.apply(-1)
    assert a.score == 6


def test_awareness_with_multiplier_one_never_scales() -> None:
    a = Awareness(max_multiplier=1)
    a.apply(5)
    assert a.score == 0
    assert a.scale(2.0) == 2.0
