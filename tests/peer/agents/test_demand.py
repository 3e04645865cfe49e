"""Signed demand events (peer/agents/demand.py): only what a member signed changes a share."""

from __future__ import annotations

import json

import pytest

from peer.agents.demand import (
    DOMAIN_DEMAND,
    HEADER_BYTES,
    MAX_MODELS,
    DemandBoard,
    seal_demand,
)
from protocol.identity import Signer

NETWORK = b"n" * 32
LIMIT = 60.0
MODEL = "openai/gpt-4o-mini"
ME, ALICE, MALLORY = (Signer(bytes([i]) * 32, NETWORK) for i in (1, 2, 3))


def _board(*members: Signer) -> DemandBoard:
    keys = {signer.node_id: signer.public_key for signer in (ME, *members)}
    return DemandBoard(ME.node_id, LIMIT, NETWORK, keys.get)


def _raw(signer: Signer, counters: bytes, body: bytes) -> bytes:
    """A payload signed over arbitrary body bytes (values `seal_demand` would refuse)."""
    return signer.sign(DOMAIN_DEMAND, counters + body) + counters + body


def test_a_signed_demand_counts() -> None:
    board = _board(ALICE)
    alone = board.share(MODEL, 10.0, 0.0)
    assert alone == LIMIT
    assert board.observe(ALICE.node_id, seal_demand(ALICE, 1, 1, {MODEL: 30.0}), 0.0) is None
    assert board.share(MODEL, 10.0, 0.0) == pytest.approx(LIMIT * 10 / 40)
    assert not board.dropped


@pytest.mark.parametrize(
    ("origin", "payload", "reason"),
    [
        # The old unsigned format: plain JSON.
        (ALICE.node_id, json.dumps({MODEL: 10**12}).encode(), "malformed"),
        # Mallory signs, claiming to be Alice.
        (ALICE.node_id, seal_demand(MALLORY, 1, 1, {MODEL: 10**12}), "bad-signature"),
        # Alice's signature, one byte of the demand changed.
        (ALICE.node_id, seal_demand(ALICE, 1, 1, {MODEL: 10**11})[:-3] + b"99}", "bad-signature"),
        # A stranger (no member of the network).
        (MALLORY.node_id, seal_demand(MALLORY, 1, 1, {MODEL: 10**12}), "unknown-origin"),
        # Signed, but a negative or non-finite value.
        (ALICE.node_id, _raw(ALICE, bytes(16), b'{"m":-5}'), "malformed"),
        (ALICE.node_id, _raw(ALICE, bytes(16), b'{"m":1e999}'), "malformed"),
        (ALICE.node_id, _raw(ALICE, bytes(16), b"[1]"), "malformed"),
        (ALICE.node_id, b"", "malformed"),
        (ALICE.node_id, seal_demand(ALICE, 1, 1, {})[:-1] + b"x" * 2100, "malformed"),
    ],
)
def test_a_forged_or_unsigned_demand_changes_no_share(
    origin: bytes, payload: bytes, reason: str
) -> None:
    board = _board(ALICE)
    before = board.share(MODEL, 10.0, 0.0)
    assert board.observe(origin, payload, 0.0) == reason
    assert board.share(MODEL, 10.0, 0.0) == before == LIMIT
    assert board.dropped == {reason: 1}


def test_a_replayed_or_older_demand_is_stale() -> None:
    board = _board(ALICE)
    old = seal_demand(ALICE, 1, 5, {MODEL: 50.0})
    assert board.observe(ALICE.node_id, old, 0.0) is None
    assert board.observe(ALICE.node_id, seal_demand(ALICE, 1, 6, {MODEL: 0.0}), 1.0) is None
    share = board.share(MODEL, 10.0, 1.0)
    assert board.observe(ALICE.node_id, old, 2.0) == "stale"
    assert board.observe(ALICE.node_id, seal_demand(ALICE, 0, 99, {MODEL: 50.0}), 2.0) == "stale"
    assert board.share(MODEL, 10.0, 2.0) == share
    # A restart: a higher incarnation, its sequence from 1 again.
    assert board.observe(ALICE.node_id, seal_demand(ALICE, 2, 1, {MODEL: 50.0}), 3.0) is None
    assert board.dropped == {"stale": 2}


def test_a_huge_demand_counts_as_the_whole_limit() -> None:
    board = _board(ALICE)
    board.observe(ALICE.node_id, seal_demand(ALICE, 1, 1, {MODEL: 1e300}), 0.0)
    capped = board.share(MODEL, LIMIT, 0.0)
    assert capped == pytest.approx(LIMIT / 2), "1e300 weighs as much as the limit itself"


def test_my_own_event_is_ignored_and_models_are_bounded() -> None:
    board = _board(ALICE)
    assert board.observe(ME.node_id, b"anything", 0.0) is None and not board.dropped
    for batch in range(3):
        names = {f"m{batch}-{i}": 1.0 for i in range(40)}
        board.observe(ALICE.node_id, seal_demand(ALICE, 1, batch + 1, names), 0.0)
    assert board.dropped["too-many-models"] == 3 * 40 - MAX_MODELS


def test_forget_drops_counters_of_gone_origins() -> None:
    board = _board(ALICE)
    board.observe(ALICE.node_id, seal_demand(ALICE, 1, 1, {MODEL: 1.0}), 0.0)
    board.forget(lambda origin: origin == ALICE.node_id)
    assert board.observe(ALICE.node_id, seal_demand(ALICE, 1, 1, {MODEL: 1.0}), 0.0) is None


def test_seal_demand_refuses_bad_counters_and_values() -> None:
    with pytest.raises(ValueError, match="counters"):
        seal_demand(ALICE, -1, 1, {})
    with pytest.raises(ValueError, match="finite"):
        seal_demand(ALICE, 1, 1, {MODEL: float("nan")})
    assert len(seal_demand(ALICE, 1, 1, {})) == HEADER_BYTES + 2
