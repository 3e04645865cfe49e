"""The peer process collects its youngest generation less often than Python's default
(decision 83)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from peer.cli.agent import GC_YOUNG_THRESHOLD, tune_garbage_collector


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    kept = gc.get_threshold()
    try:
        yield kept
    finally:
        gc.set_threshold(*kept)


def test_the_peer_raises_only_the_youngest_generations_threshold(
    thresholds: tuple[int, int, int],
) -> None:
    gc.set_threshold(700, 11, 12)
    tune_garbage_collector()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 11, 12)
    assert GC_YOUNG_THRESHOLD > 700
