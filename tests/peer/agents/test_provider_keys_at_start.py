"""A peer configured with a provider's model but not its key says so in one line at start
(decision 65), as a user would see it: `grapevine agent --config` as a subprocess."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from scripts.local_cluster import LocalCluster, wait_ready

CONFIG = """
[[agents]]
name = "writer"
roles = ["write"]
model = "openai/gpt-4o-mini"
"""


def test_a_model_whose_provider_key_is_unset_is_named_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = tmp_path / "peer.toml"
    config.write_text(CONFIG)
    with LocalCluster(tmp_path / "net", extra_args=("--config", str(config))) as cluster:
        peer = cluster.add()
        asyncio.run(wait_ready([peer], timeout=60))
        log = peer.log_path.read_text()
    [line] = [line for line in log.splitlines() if "OPENAI_API_KEY" in line]
    assert "WARNING" in line and "agents[0] (model openai/gpt-4o-mini)" in line
    assert "api_key_env" in line and "Traceback" not in log
