"""Logs (docs/observability.md): `grapevine agent --log-format json` as a user runs it, one
JSON line per task lifecycle event; the setting from env and TOML; litellm kept quiet."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peer.observability.logs import LITELLM_LOGGERS, adopt_litellm_loggers, configure_logging
from peer.runtime.executor import builtin_roles
from peer.settings import SettingsError, load_settings
from scripts.local_cluster import LocalCluster, Peer, query, wait_ready, wait_views
from tests.peer.inprocess import in_process_peer

LIFECYCLE = ("submitted", "claimed", "started", "ended", "result")


def json_lines(peer: Peer) -> list[dict[str, Any]]:
    """The log's JSON objects (the agent also prints a plain ready line, not a log record)."""
    lines = peer.log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def task_lines(peers: list[Peer], task_id: str) -> list[dict[str, Any]]:
    """The lifecycle lines about `task_id` in every peer's log."""
    return [r for p in peers for r in json_lines(p) if r.get("task_id") == task_id]


async def run_one_task(peers: list[Peer]) -> str:
    """Wait until the peers see each other, submit one echo task at the first, wait for it."""
    await wait_ready(peers, timeout=30)
    await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=30)
    peer = peers[0]
    answer = await query(peer, lambda c: c.submit("echo", "hello"))
    task_id = str(answer["id"])
    done = await query(peer, lambda c: c.wait_task(task_id))
    assert done["state"] == "done", done
    return task_id


def test_agent_writes_one_json_line_per_lifecycle_event(tmp_path: Path) -> None:
    # Three peers: a submission is acknowledged once two others hold it.
    with LocalCluster(tmp_path, extra_args=("--log-format", "json")) as cluster:
        seed = cluster.add()
        peers = [seed, cluster.add(join=[seed]), cluster.add(join=[seed])]
        task_id = asyncio.run(run_one_task(peers))
        for _ in range(100):  # a line may reach the file a moment after the API answered
            if {r["event"] for r in task_lines(peers, task_id)} >= set(LIFECYCLE):
                break
            time.sleep(0.1)
    records = [r for p in peers for r in json_lines(p)]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    mine = task_lines(peers, task_id)
    assert sorted(r["event"] for r in mine) == sorted(LIFECYCLE), mine  # each once
    short_ids = {p.node_id[:10] for p in peers}
    for record in mine:
        assert record["level"] == "INFO" and record["logger"] == "grapevine.tasks"
        assert record["role"] == "echo" and record["peer"] in short_ids
        assert "trace_id" in record and task_id in record["message"]
    for peer in peers:  # each peer logs its part in lifecycle order
        events = [r["event"] for r in task_lines([peer], task_id)]
        assert events == [e for e in LIFECYCLE if e in events], events
    by_event = {r["event"]: r for r in mine}
    # Submitted and its result where the client waits; claimed, started, ended where it ran.
    assert by_event["submitted"]["peer"] == by_event["result"]["peer"] == seed.node_id[:10]
    assert by_event["claimed"]["peer"] == by_event["started"]["peer"] == by_event["ended"]["peer"]
    assert by_event["submitted"]["epoch"] == 0
    assert by_event["claimed"]["epoch"] == by_event["started"]["epoch"] == 1
    assert by_event["ended"]["outcome"] == "ok" and by_event["ended"]["duration"] >= 0
    assert by_event["result"]["outcome"] == "ok"


@pytest.mark.parametrize(
    ("flags", "env", "toml", "expected"),
    [
        ({}, {}, None, "text"),
        ({}, {"GRAPEVINE_LOG_FORMAT": "json"}, None, "json"),
        ({}, {}, 'log_format = "json"\n', "json"),
        ({"log_format": "text"}, {"GRAPEVINE_LOG_FORMAT": "JSON"}, None, "text"),
    ],
)
def test_log_format_comes_from_flag_env_or_toml(
    tmp_path: Path, flags: dict[str, object], env: dict[str, str], toml: str | None, expected: str
) -> None:
    config = None
    if toml is not None:
        config = tmp_path / "peer.toml"
        config.write_text(toml)
    assert load_settings(flags, env, config).log_format == expected


def test_an_unknown_log_format_is_refused_naming_its_source() -> None:
    with pytest.raises(SettingsError, match="GRAPEVINE_LOG_FORMAT"):
        load_settings({}, {"GRAPEVINE_LOG_FORMAT": "xml"}, None)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in LITELLM_LOGGERS}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


@pytest.mark.usefixtures("restored_logging")
def test_litellm_is_quiet_unless_debug_and_speaks_through_our_handler() -> None:
    stream = io.StringIO()
    litellm_log = logging.getLogger("LiteLLM")
    own = logging.StreamHandler(io.StringIO())
    litellm_log.addHandler(own)  # litellm attaches one of its own at import
    adopt_litellm_loggers()
    assert own not in litellm_log.handlers

    configure_logging("INFO", "json", stream)
    litellm_log.info("LiteLLM completion() model= offline")
    logging.getLogger("peer.test").info("kept", extra={"field": 3})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["logger"], r["message"], r.get("field")) for r in lines] == [
        ("peer.test", "kept", 3)
    ]

    configure_logging("DEBUG", "text", stream)
    litellm_log.debug("raw request sent")
    assert "LiteLLM: raw request sent" in stream.getvalue()


@pytest.mark.asyncio
async def test_a_cancelled_execution_logs_fenced_and_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="grapevine.tasks")
    async with in_process_peer(3, bytes(range(96, 128)), roles=builtin_roles()) as peer:
        peer.driver.serve(peer.executor.roles, peer.executor.max_running)
        task_id = peer.driver.submit("sleep", b"30", nonce=os.urandom(16))
        for _ in range(500):
            if peer.executor.running:
                break
            await asyncio.sleep(0.02)
        assert peer.executor.running, "the sleep task did not start"
        peer.driver.cancel_task(task_id)
        cancelled = peer.metrics.events.executions.labels("cancelled")
        for _ in range(500):  # the driver may apply the cancel on a later turn of the loop
            if cancelled._value.get():
                break
            await asyncio.sleep(0.02)
        found = cancelled._value.get()
    lines = [vars(r) for r in caplog.records if vars(r).get("task_id") == task_id.hex()]
    events = [line["event"] for line in lines]
    # The cancel is a note, the execution's stop a command: notes are applied first.
    assert events == ["submitted", "claimed", "started", "cancelled", "fenced"], events
    assert lines[4]["reason"] == "cancelled" and lines[4]["duration"] >= 0
    assert found == 1
