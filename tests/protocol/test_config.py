"""Config: derived values against hand-computed memberlist formulas, validation, presets."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from protocol.config import (
    GossipConfig,
    NodeConfig,
    SwimConfig,
    lan,
    local,
    push_pull_interval_for,
    retransmit_limit,
    sim,
    suspicion_confirmations_wanted,
    suspicion_min_timeout,
    suspicion_timeout,
    wan,
    with_network,
)
from protocol.errors import LocalProtocolError


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [
        (4, 0, 4),  # ceil(log10(1)) = 0, floored at one round per multiplier
        (4, 1, 4),  # ceil(log10(2)) = 1
        (4, 9, 4),  # ceil(log10(10)) = 1
        (4, 10, 8),  # ceil(log10(11)) = 2
        (4, 99, 8),  # ceil(log10(100)) = 2
        (4, 100, 12),  # ceil(log10(101)) = 3
        (3, 1000, 12),  # ceil(log10(1001)) = 4
        (2, 5, 2),
    ],
)
def test_retransmit_limit(mult: int, n: int, expected: int) -> None:
    assert retransmit_limit(mult, n) == expected


@pytest.mark.parametrize(
    ("mult", "n", "interval", "expected"),
    [
        (4, 0, 1.0, 4.0),  # node scale floors at 1
        (4, 1, 1.0, 4.0),
        (4, 10, 1.0, 4.0),  # log10(10) = 1
        (4, 50, 1.0, 4 * math.log10(50)),  # 6.796
        (4, 100, 1.0, 8.0),
        (4, 1000, 0.5, 6.0),  # 4 * 3 * 0.5
        (3, 10_000, 0.2, 2.4),  # 3 * 4 * 0.2
    ],
)
def test_suspicion_min_timeout(mult: int, n: int, interval: float, expected: float) -> None:
    assert suspicion_min_timeout(mult, n, interval) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [
        (4, 100, 2),  # mult - 2
        (4, 4, 2),  # n - 2 = 2 others can confirm: enough
        (4, 3, 0),  # n - 2 = 1 < 2: too small to supply confirmations
        (3, 3, 1),
        (6, 100, 4),
        (1, 100, 0),  # mult - 2 < 0 never asks for a negative count
        (2, 1, 0),
    ],
)
def test_suspicion_confirmations_wanted(mult: int, n: int, expected: int) -> None:
    assert suspicion_confirmations_wanted(mult, n) == expected


@pytest.mark.parametrize(
    ("low", "high", "wanted", "got", "expected"),
    [
        (4.0, 24.0, 0, 0, 4.0),  # nobody can confirm: min at once
        (4.0, 24.0, 2, 0, 24.0),  # fresh suspicion starts at max
        (4.0, 24.0, 2, 1, 24.0 - (math.log(2) / math.log(3)) * 20.0),  # 11.381
        (4.0, 24.0, 2, 2, 4.0),  # all wanted confirmations: min
        (4.0, 24.0, 2, 5, 4.0),  # more than wanted never goes below min
        (4.0, 24.0, 3, 1, 14.0),  # log 2 / log 4 = 1/2 of the way
        (6.0, 36.0, 3, 3, 6.0),
    ],
)
def test_suspicion_timeout(low: float, high: float, wanted: int, got: int, expected: float) -> None:
    assert suspicion_timeout(low, high, wanted, got) == pytest.approx(expected)


def test_suspicion_timeout_never_grows_with_confirmations() -> None:
    timeouts = [suspicion_timeout(4.0, 24.0, 4, got) for got in range(8)]
    assert timeouts == sorted(timeouts, reverse=True)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, 30.0),
        (32, 30.0),  # threshold: unchanged up to 32 members
        (33, 60.0),  # ceil(log2(33) - 5) + 1 = 2
        (64, 60.0),
        (65, 90.0),  # ceil(0.02) + 1 + 1 = 3
        (128, 90.0),
        (1000, 180.0),  # ceil(9.97 - 5) + 1 = 6
        (1024, 180.0),
    ],
)
def test_push_pull_interval_for(n: int, expected: float) -> None:
    assert push_pull_interval_for(30.0, n) == pytest.approx(expected)


@pytest.mark.parametrize("preset", [lan, local, sim, wan])
def test_presets_validate(preset: Callable[[], NodeConfig]) -> None:
    preset().validate()


def test_sim_compares_with_lan() -> None:
    assert sim() == lan()


def test_local_is_tighter_than_lan() -> None:
    assert local().swim.probe_timeout < lan().swim.probe_timeout
    assert local().gossip.gossip_interval < lan().gossip.gossip_interval


def test_wan_is_looser_than_lan() -> None:
    assert wan().swim.probe_timeout > lan().swim.probe_timeout
    assert wan().swim.probe_interval > lan().swim.probe_interval
    assert wan().tasks.standby_delay > lan().tasks.standby_delay


def test_with_network_binds_only_the_network() -> None:
    bound = with_network(lan(), b"prod")
    assert bound.network_id == b"prod"
    assert replace(bound, network_id=lan().network_id) == lan()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("probe_interval", 0.0),
        ("probe_interval", -1.0),
        ("probe_interval", math.nan),
        ("probe_timeout", 0.0),
        ("probe_timeout", 2.0),  # exceeds probe_interval
        ("dead_retention", 0.0),
        ("stall_threshold", -5.0),
        ("gossip_to_the_dead", 0.0),
        ("indirect_checks", -1),
        ("suspicion_mult", 0),
        ("suspicion_max_timeout_mult", 0),
        ("awareness_max_multiplier", 0),
        ("suspicion_mult", 2.5),  # not an integer
    ],
)
def test_swim_validate_names_the_field(field: str, value: Any) -> None:
    config = replace(SwimConfig(), **{field: value})
    with pytest.raises(LocalProtocolError, match=field):
        config.validate()
    with pytest.raises(LocalProtocolError, match=field):
        NodeConfig(swim=config).validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gossip_interval", 0.0),
        ("push_pull_interval", -1.0),
        ("reconnect_interval", 0.0),
        ("gossip_fanout", 0),
        ("retransmit_mult", 0),
        ("event_dedup", 0),
        ("packet_budget", 255),
    ],
)
def test_gossip_validate_names_the_field(field: str, value: Any) -> None:
    config = replace(GossipConfig(), **{field: value})
    with pytest.raises(LocalProtocolError, match=field):
        config.validate()
    with pytest.raises(LocalProtocolError, match=field):
        NodeConfig(gossip=config).validate()


@pytest.mark.parametrize("network_id", [b"", b"x" * 65])
def test_node_validate_rejects_bad_network_id(network_id: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="network_id"):
        NodeConfig(network_id=network_id).validate()


def test_zero_indirect_checks_is_allowed() -> None:
    replace(SwimConfig(), indirect_checks=0).validate()
