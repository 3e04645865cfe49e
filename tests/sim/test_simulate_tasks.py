"""`grapevine simulate --tasks`: the task load, its figures, and their determinism.

The command is run as a subprocess, twice under different hash seeds, as a user or a benchmark
would run it: the same arguments must print the same figures (all but the wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from peer.cli import simulate as simulate_cmd
from protocol.identity import Signer, VerifiedCache
from protocol.sim.peer_cache import PeerCache

ROOT = Path(__file__).resolve().parents[2]
TASK_FIELDS = ("tasks", "done", "lost", "duplicates", "verifications_per_task", "bytes_per_task")


def simulate_json(*argv: str, hash_seed: str = "0") -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "peer.cli", "simulate", *argv, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures: dict[str, Any] = json.loads(run.stdout)
    return figures


def test_fifty_tasks_on_twenty_peers_are_all_done_and_replay_exactly() -> None:
    runs = [simulate_json("--nodes", "20", "--tasks", "50", hash_seed=h) for h in ("1", "2")]
    for figures in runs:
        assert all(name in figures for name in TASK_FIELDS)
        assert figures["tasks"] == 50 and figures["done"] == figures["tasks"]
        assert figures["lost"] == 0 and figures["duplicates"] == 0
        assert figures["task_violations"] == 0
        # Every task costs signatures and bytes beyond the membership baseline.
        assert figures["verifications_per_task"] > 0 and figures["bytes_per_task"] > 0
        assert figures["bytes"] > figures["baseline_bytes"] > 0
        assert isinstance(figures.pop("wall"), float)
    assert runs[0] == runs[1]


def test_without_tasks_the_task_fields_are_empty() -> None:
    figures = simulate_json("--nodes", "5", "--duration", "10s")
    assert {name: figures[name] for name in TASK_FIELDS} == {
        "tasks": 0,
        "done": 0,
        "lost": 0,
        "duplicates": 0,
        "verifications_per_task": None,
        "bytes_per_task": None,
    }


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_replication_sets_the_task_configuration() -> None:
    params = simulate_cmd.params_from(parse("--tasks", "5", "--replication", "3"))
    assert params.tasks == 5
    assert params.config is not None and params.config.tasks.replication == 3


def test_the_table_shows_task_rows_only_with_tasks() -> None:
    with_tasks = {"nodes": 3, "tasks": 4, "done": 4, "lost": 0, "bytes_per_task": 10}
    assert "done (result at the submitting peer)" in simulate_cmd.format_table(with_tasks)
    assert "tasks submitted" not in simulate_cmd.format_table({**with_tasks, "tasks": 0})


def test_a_peer_cache_counts_its_own_verifications_and_shares_the_work() -> None:
    signer = Signer(bytes(32), b"net")
    sig = signer.sign(b"d", b"payload")
    shared = VerifiedCache()
    a, b = PeerCache(shared), PeerCache(shared)
    for cache in (a, a, b):
        assert cache.verify(b"d", b"net", signer.public_key, b"payload", sig)
    assert not b.verify(b"d", b"net", signer.public_key, b"other", sig)
    assert (a.verified, a.hits, b.verified, b.hits, b.failures) == (1, 1, 1, 0, 1)
    assert shared.verified == 1  # the Ed25519 work was done once for both peers
