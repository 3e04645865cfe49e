"""The task commands (peer/cli/tasks.py, task_file.py) as subprocesses against two real agents."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.local_cluster import (
    LocalCluster,
    Peer,
    child_env,
    grapevine_command,
    wait_ready,
)
from tests.peer.two_peers import joined_pair


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with joined_pair(tmp_path_factory.mktemp("cli-tasks")) as seed:
        yield seed


def grapevine(peer: Peer, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*grapevine_command(), *args, *peer.cli_flags()],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_submit_waits_and_prints_the_output(peer: Peer) -> None:
    result = grapevine(peer, "submit", "--role", "echo", "hello from the cli")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the cli\n"
    assert "result accepted: ok" in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_no_wait_then_task_result_and_json_shapes(peer: Peer) -> None:
    submitted = grapevine(peer, "submit", "--role", "sleep", "--no-wait", "0.2")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    assert len(task_id) == 64 and all(c in "0123456789abcdef" for c in task_id)
    as_json = grapevine(peer, "submit", "--role", "echo", "--no-wait", "--json", "x")
    assert set(json.loads(as_json.stdout)) == {"id"}

    waited = grapevine(peer, "submit", "--role", "sleep", "--json", "0.1")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["state"] == "done"

    result = grapevine(peer, "result", task_id[:10])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "slept 0.2 s\n"
    result_json = json.loads(grapevine(peer, "result", task_id, "--json").stdout)
    assert set(result_json) == {"outcome", "output", "epoch", "owner", "usage"}
    assert result_json["outcome"] == "ok" and result_json["epoch"] == 1

    task = json.loads(grapevine(peer, "task", task_id, "--json").stdout)
    assert task["id"] == task_id and task["state"] == "done" and task["duplicates"] == 0
    assert {"owner", "epoch", "executions", "priority", "created", "result"} <= set(task)
    human = grapevine(peer, "task", task_id)
    assert human.returncode == 0 and "state       done" in human.stdout

    listed = json.loads(grapevine(peer, "tasks", "--state", "done", "--json").stdout)
    assert isinstance(listed, list) and task_id in {t["id"] for t in listed}
    table = grapevine(peer, "tasks")
    assert table.returncode == 0 and task_id[:12] in table.stdout


def test_cancel_and_errors(peer: Peer) -> None:
    task_id = grapevine(peer, "submit", "--role", "sleep", "--no-wait", "30").stdout.strip()
    cancelled = grapevine(peer, "cancel", task_id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["state"] == "cancelled"
    again = grapevine(peer, "cancel", task_id)
    assert "already cancelled" in one_line_error(again, 1)
    assert "was cancelled: " in one_line_error(grapevine(peer, "result", task_id), 1)
    assert "not known" in one_line_error(grapevine(peer, "task", "ab" * 32), 1)
    assert "hex digits" in one_line_error(grapevine(peer, "task", "nothex"), 2)
    assert "--role" in one_line_error(grapevine(peer, "submit", "x"), 2)
    failed = grapevine(peer, "submit", "--role", "sleep", "--timeout", "0.1", "5")
    assert "ended timeout" in failed.stderr.splitlines()[-1] and failed.returncode == 1
    unreachable = subprocess.run(
        [*grapevine_command(), "tasks", "--api", "127.0.0.1:9"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
    )
    assert "cannot reach the peer API" in one_line_error(unreachable, 1)


def test_submit_file_skips_bad_lines_with_numbers(peer: Peer, tmp_path: Path) -> None:
    lines = [
        json.dumps({"role": "echo", "input": f"item {i}", "priority": i % 3}) for i in range(20)
    ]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"role": "echo"}))
    lines.insert(9, "")
    lines.append(json.dumps({"role": "echo", "input": "k", "idempotency_key": "same"}))
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = grapevine(peer, "submit", "--file", str(path), "--json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "line 4: not JSON" in result.stderr and "line 8: input must be a string" in result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["submitted"] == 21 and report["summary"]["bad_lines"] == 2
    assert report["summary"]["done"] == 21 and report["summary"]["unfinished"] == 0
    assert {b["line"] for b in report["bad_lines"]} == {4, 8}
    assert all(t["state"] == "done" and t["outcome"] == "ok" for t in report["tasks"])

    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines[:3]) + "\n")
    ok = grapevine(peer, "submit", "--file", str(good))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("3 lines, 0 bad lines, 3 submitted, 3 done")


def test_submit_file_lines_may_queue_with_their_own_timeout(peer: Peer, tmp_path: Path) -> None:
    lines = [
        json.dumps({"role": "echo", "input": "served"}),
        json.dumps({"role": "nobody-serves", "input": "x", "queue": True, "queue_timeout": 1}),
        json.dumps({"role": "echo", "input": "y", "queue": "yes"}),
        json.dumps({"role": "echo", "input": "z", "queue": False, "queue_timeout": 5}),
        json.dumps({"role": "nobody-serves", "input": "w"}),  # not queued: refused (422)
    ]
    path = tmp_path / "queued.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = grapevine(peer, "submit", "--file", str(path), "--json")
    assert result.returncode == 1, result.stderr
    assert "line 3: queue must be true or false" in result.stderr
    assert "line 4: queue_timeout applies to a queued task" in result.stderr
    assert "line 5: refused: no live peer serves the role 'nobody-serves'" in result.stderr
    report = json.loads(result.stdout)
    states = {t["line"]: t["state"] for t in report["tasks"]}
    assert states == {1: "done", 2: "failed"}, report
    queued = next(t for t in report["tasks"] if t["line"] == 2)
    shown = json.loads(grapevine(peer, "task", queued["id"], "--json").stdout)
    assert shown["cancel"]["outcome"] == "failed", shown
    assert shown["cancel"]["reason"].startswith("queue timeout"), shown
    text = grapevine(peer, "task", queued["id"]).stdout
    assert "\nended       failed by " in text and ": queue timeout" in text, text


def test_a_lone_peer_runs_a_submission_and_says_it_is_not_acknowledged(tmp_path: Path) -> None:
    # A new user's first try is often one peer: no other peer can hold a copy, so the task is
    # not acknowledged (design: durable locally and at the replicas), but it runs and its
    # answer is shown, with a warning saying why, at once rather than after a 5 s wait.
    with LocalCluster(tmp_path, extra_args=()) as cluster:
        alone = cluster.add()
        asyncio.run(wait_ready([alone], timeout=30))
        started = time.monotonic()
        result = grapevine(alone, "submit", "--role", "echo", "hello")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "hello\n"
        assert time.monotonic() - started < 4.0
        warning = next(line for line in result.stderr.splitlines() if "warning" in line)
        assert "alone in its network" in warning and "--join" in warning
        refused = grapevine(alone, "submit", "--role", "echo", "--no-wait", "hello")
        assert "alone in its network" in one_line_error(refused, 1)
