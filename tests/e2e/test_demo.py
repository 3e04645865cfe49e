"""`grapevine demo` end to end: three real peers, the offline model, one delegation tree.

Runs the command as a user would (a subprocess, no stdin, no terminal) and checks what it
prints: the JSON object's tree and audit, the human report's tree and audit line, and that no
peer process it started outlives it — after success and after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scripts.local_cluster import child_env, grapevine_command

pytestmark = pytest.mark.e2e

DEMO_LIMIT = 150.0
"""Seconds a whole demo run may take here (its own --timeout is 120 s)."""
_PIDS = re.compile(r"started \d+ peers pid=([\d,]+)")


def demo_env() -> dict[str, str]:
    """As CI runs it: no terminal, and no FORCE_COLOR making rich write escape codes anyway."""
    env = child_env()
    env.pop("FORCE_COLOR", None)
    return env


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*grapevine_command(), "demo", *args],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_LIMIT,
        env=demo_env(),
    )


def started_pids(stderr: str) -> list[int]:
    match = _PIDS.search(stderr)
    assert match is not None, stderr
    return [int(pid) for pid in match.group(1).split(",")]


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); the demo reaps its children, so one would be a bug too.
    return True


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node["children"]:
        yield from walk(child)


@pytest.fixture(scope="module")
def json_run() -> subprocess.CompletedProcess[str]:
    return demo("--json")


def test_json_output_is_the_tree_and_the_audit(
    json_run: subprocess.CompletedProcess[str],
) -> None:
    assert json_run.returncode == 0, json_run.stderr
    report = json.loads(json_run.stdout)
    assert set(report) == {"answer", "tree", "audit"}
    assert "[offline stand-in model]" in report["answer"]

    root = report["tree"]
    assert root["role"] == "boss"
    assert [admin["role"] for admin in root["children"]] == ["admin", "admin"]
    for admin in root["children"]:
        assert [worker["role"] for worker in admin["children"]] == ["worker"] * 3
        assert all(worker["children"] == [] for worker in admin["children"])
    nodes = list(walk(root))
    assert len(nodes) == 9
    for node in nodes:
        assert node["state"] == "done", node
        assert re.fullmatch(r"p[123]", node["peer"]), node
        assert node["agent"].startswith(node["peer"] + "-"), node
        assert node["agent"].endswith(node["role"]), node
        assert node["tokens"] > 0, node
    assert root["peer"] == "p1"

    audit = report["audit"]
    assert audit["tasks"] == 9
    assert audit["executions"] == 9
    assert audit["duplicates"] == 0
    assert audit["signatures_verified"] > 0
    assert audit["tokens"] == sum(node["tokens"] for node in nodes)


def test_json_run_leaves_no_process_behind(json_run: subprocess.CompletedProcess[str]) -> None:
    pids = started_pids(json_run.stderr)
    assert len(pids) == 3
    assert not [pid for pid in pids if running(pid)]


def test_default_output_shows_answer_tree_and_audit_line() -> None:
    result = demo()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[offline stand-in model]" in out
    assert "task tree" in out
    assert len(re.findall(r"\bworker [0-9a-f]{8} p[123] p[123]-worker", out)) == 6, out
    assert len(re.findall(r"\badmin [0-9a-f]{8} p[123] p[123]-admin", out)) == 2, out
    audit = re.search(
        r"^audit: 9 tasks, 9 executions, 0 duplicates, (\d+) signatures verified, (\d+) tokens$",
        out,
        re.M,
    )
    assert audit is not None, out
    assert int(audit.group(1)) > 0 and int(audit.group(2)) > 0
    assert "Traceback" not in result.stderr
    assert not [pid for pid in started_pids(result.stderr) if running(pid)]


def _sigint_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("signum", "delay"),
    [(signal.SIGINT, 0.0), (signal.SIGTERM, 2.0)],
    ids=["ctrl-c-while-starting", "sigterm-once-running"],
)
def test_interrupt_stops_every_peer(signum: int, delay: float) -> None:
    process = subprocess.Popen(
        [*grapevine_command(), "demo", "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_env(),
        # As from a terminal: a suite started in the background (`... &`) would pass on an
        # ignored SIGINT, and the Ctrl-C below would mean nothing.
        preexec_fn=_sigint_by_default,
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if _PIDS.search(line):
                break
        pids = started_pids("".join(seen))
        time.sleep(delay)
        process.send_signal(signum)
        code = process.wait(30)
        rest = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 130, "".join(seen) + rest
    assert "interrupted" in rest
    assert "Traceback" not in rest
    assert process.stdout is not None and process.stdout.read() == ""
    deadline = time.monotonic() + 5
    while [pid for pid in pids if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if running(pid)]
