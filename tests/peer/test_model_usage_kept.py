"""Model usage counts on across a restart (issue 12; decision 52): a peer hosting an agent on
the offline model runs a task, stops, starts again on the same data directory (a real SQLite
store), and its calls and tokens start from where they were, then grow with the next task.
The running totals are saved in the store's `model_usage` table (`peer.agents.model_stats`)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from peer.agents.limits import CircuitBreaker
from peer.agents.model_stats import (
    ModelStats,
    advertised,
    restore_usage,
    shown_server,
    usage_totals,
)
from peer.agents.offline import OFFLINE_MODEL
from peer.agents.ports import AgentInput
from peer.agents.spec import AgentSpec
from peer.build import Peer, build_peer
from peer.runtime.keyring import Keyring
from peer.runtime.store import DB_NAME, Store
from peer.settings import AgentSettings
from protocol.wire import MAX_STATE_MODELS, Breaker, ModelUsage

KEY = bytes(range(40, 72))
WRITER = AgentSpec("writer", ("section",))


async def _run_one(peer: Peer, text: str) -> dict[str, Any]:
    task = peer.driver.submit("section", AgentInput(text).encode(), nonce=os.urandom(16))
    result = await peer.driver.wait_result(task, timeout=30)
    assert result is not None and result.outcome == "ok"
    assert peer.host is not None
    model: dict[str, Any] = peer.host.status()["model"][OFFLINE_MODEL]
    return model


async def test_calls_and_tokens_count_on_after_a_restart(tmp_path: Path) -> None:
    settings = AgentSettings(
        bind="127.0.0.1:0", data_dir=tmp_path, profile="local", agents=(WRITER,)
    )
    async with build_peer(settings, keyring=Keyring(KEY)) as peer:
        first = await _run_one(peer, "Parks")
    assert first["calls"] >= 1 and first["prompt_tokens"] > 0

    async with build_peer(settings, keyring=Keyring(KEY)) as peer:
        assert peer.host is not None
        peer.driver.join_now([peer.node.addr])  # restored, alone: as `grapevine agent` does
        again = peer.host.status()["model"][OFFLINE_MODEL]
        for name in ("calls", "ok", "prompt_tokens", "completion_tokens", "cost_micro"):
            assert again[name] == first[name], name
        assert again["breaker"] == "closed"  # the state of the moment starts afresh
        later = await _run_one(peer, "Rivers")
    assert later["calls"] > first["calls"]
    assert later["prompt_tokens"] > first["prompt_tokens"]

    with Store.open(tmp_path) as store:
        saved = store.load_model_usage()
    assert saved[OFFLINE_MODEL]["calls"] == later["calls"]


def test_a_damaged_saved_tally_is_skipped_not_fatal(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        store.save_model_usage({"m": {"model": "m", "calls": 3}})
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute("INSERT INTO model_usage VALUES ('broken', 'not json')")
    db.execute("INSERT INTO model_usage VALUES ('listed', '[1, 2]')")
    db.commit()
    db.close()
    with Store.open(tmp_path) as store:
        assert store.load_model_usage() == {"m": {"model": "m", "calls": 3}}
        store.save_model_usage({})  # replaced, not merged
        assert store.load_model_usage() == {}


def test_restore_adds_counts_and_skips_what_is_not_a_count() -> None:
    stats: dict[str, ModelStats] = {}
    saved: dict[str, dict[str, object]] = {
        "a@http://127.0.0.1:9": {
            "model": "a",
            "calls": 4,
            "cost_micro": 250,
            "wait_seconds": 1.5,
            "errors": -1,  # not a count
            "retries": True,  # not a count either
            "waiting": 7,  # the state of the moment is not restored
        },
        "nameless": {"calls": 9},
    }
    restore_usage(stats, saved, lambda: CircuitBreaker(3, 10.0))
    assert list(stats) == ["a@http://127.0.0.1:9"]
    a = stats["a@http://127.0.0.1:9"]
    assert (a.model, a.calls, a.cost_micro, a.wait_seconds) == ("a", 4, 250, 1.5)
    assert (a.errors, a.retries, a.waiting) == (0, 0, 0)
    restore_usage(stats, saved, lambda: CircuitBreaker(3, 10.0))
    assert (a.calls, a.cost_micro) == (8, 500)  # added to what this life counted
    totals = usage_totals(stats)
    assert totals["a@http://127.0.0.1:9"]["calls"] == 8
    assert totals["a@http://127.0.0.1:9"]["model"] == "a"


@pytest.mark.parametrize(
    ("api_base", "shown"),
    [
        ("http://user:pw@host:8000/v1?key=abc#x", "http://host:8000/v1"),
        ("https://api.example.com/v1", "https://api.example.com/v1"),
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("http://h/v1/?api-key=z", "http://h/v1/"),
        ("user:pw@host:80/v1?k=1", "host:80/v1"),  # no scheme
        ("localhost:8000", "localhost:8000"),
    ],
)
def test_a_server_is_shown_without_its_credentials(api_base: str, shown: str) -> None:
    assert shown_server(api_base) == shown


def test_totals_saved_under_a_url_with_credentials_come_back_without_them() -> None:
    stats: dict[str, ModelStats] = {}
    saved: dict[str, dict[str, object]] = {
        "vertex/claude@20240229@http://u:secret@h:9/v1": {
            "model": "vertex/claude@20240229",
            "calls": 2,
        },
        "vertex/claude@20240229": {"model": "vertex/claude@20240229", "calls": 1},
    }
    restore_usage(stats, saved, lambda: CircuitBreaker(3, 10.0))
    assert {key: s.calls for key, s in stats.items()} == {
        "vertex/claude@20240229@http://h:9/v1": 2,
        "vertex/claude@20240229": 1,
    }


def test_the_peer_state_names_tripped_breakers_first_then_the_costliest_models() -> None:
    def stats(model: str, cost: int, breaker: str = "closed") -> ModelStats:
        s = ModelStats(model, CircuitBreaker(3, 10.0), cost_micro=cost)
        s.breaker.state = breaker
        return s

    held = {
        "cheap": stats("cheap", 1),
        "dear": stats("dear", 900),
        "dear@http://127.0.0.1:9": stats("dear", 100, "half_open"),  # one model, two servers
        "down": stats("down", 0, "open"),
        **{f"m{n}": stats(f"m{n}", 10 + n) for n in range(8)},
    }
    shown = advertised(held)
    assert len(shown) == MAX_STATE_MODELS
    # Breakers not closed first (the costliest of them first), whatever their spend.
    assert shown[0] == ModelUsage("dear", 1_000, Breaker.HALF_OPEN)  # summed, the worst state
    assert shown[1] == ModelUsage("down", 0, Breaker.OPEN)
    assert [u.model for u in shown[2:]] == ["m7", "m6", "m5", "m4", "m3", "m2"]


def test_the_peer_state_sums_each_models_tokens_and_rate_limit_waits_over_its_servers() -> None:
    def stats(prompt: int, completion: int, waits: int, waiting: int) -> ModelStats:
        return ModelStats(
            "m",
            CircuitBreaker(3, 10.0),
            prompt_tokens=prompt,
            completion_tokens=completion,
            waits=waits,
            waiting=waiting,
            cost_micro=5,
        )

    held = {"m": stats(100, 20, 2, 1), "m@http://127.0.0.1:9": stats(7, 3, 1, 0)}
    assert advertised(held) == (
        ModelUsage("m", 10, Breaker.CLOSED, tokens=130, waits=3, waiting=1),
    )
