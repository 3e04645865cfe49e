"""`grapevine tasks --network` (peer/cli/network_tasks.py) against two real agents: as a
subprocess for the output and the exit codes, and through `main()` for the progress lines of a
listing that takes several pages."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from peer.cli import network_tasks
from peer.cli.main import main
from scripts.local_cluster import Peer, child_env, grapevine_command
from tests.peer.two_peers import joined_pair

TASKS = 7


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peer, list[str]]]:
    with joined_pair(tmp_path_factory.mktemp("cli-network-tasks")) as seed:
        ids = []
        for n in range(TASKS):
            submitted = grapevine(seed, "submit", "--role", "echo", "--json", f"task {n}")
            assert submitted.returncode == 0, submitted.stderr
            ids.append(json.loads(submitted.stdout)["id"])
        yield seed, sorted(ids)


def grapevine(peer: Peer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*grapevine_command(), *args, *peer.cli_flags()],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )


def test_lists_every_task_once_as_json_and_as_a_table(peer: tuple[Peer, list[str]]) -> None:
    seed, ids = peer
    listed = grapevine(seed, "tasks", "--network", "--json")
    assert listed.returncode == 0, listed.stderr
    answer = json.loads(listed.stdout)
    assert [t["id"] for t in answer["tasks"]] == ids
    assert answer["next_cursor"] is None and answer["partial"] is False
    assert answer["missing"] == []
    assert {t["state"] for t in answer["tasks"]} == {"done"}
    assert listed.stderr == ""

    table = grapevine(seed, "tasks", "--network", "--state", "done")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "ID", "ROLE", "STATE", "OUTCOME", "OWNER", "EPOCH", "CREATED",
    ]  # fmt: skip
    assert all(task_id[:12] in table.stdout for task_id in ids)
    assert table.stdout.rstrip().endswith(f"{TASKS} tasks")


def test_owner_lists_the_tasks_one_member_claimed(peer: tuple[Peer, list[str]]) -> None:
    seed, ids = peer
    whole = json.loads(grapevine(seed, "tasks", "--network", "--json").stdout)["tasks"]
    assert [t["id"] for t in whole] == ids
    owners = {t["owner"] for t in whole}
    assert owners and all(owners)
    for owner in owners:
        mine = [t["id"] for t in whole if t["owner"] == owner]
        listed = grapevine(seed, "tasks", "--network", "--owner", owner, "--limit", "2", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [t["id"] for t in json.loads(listed.stdout)["tasks"]] == mine[:2]
        local = grapevine(seed, "tasks", "--owner", owner, "--json")
        assert local.returncode == 0, local.stderr
        assert {t["owner"] for t in json.loads(local.stdout)} <= {owner}


def test_limit_and_cursor_resume_a_listing(peer: tuple[Peer, list[str]]) -> None:
    seed, ids = peer
    seen: list[str] = []
    cursor: list[str] = []
    for _ in range(TASKS):
        part = grapevine(seed, "tasks", "--network", "--limit", "3", "--json", *cursor)
        assert part.returncode == 0, part.stderr
        answer = json.loads(part.stdout)
        assert len(answer["tasks"]) <= 3
        seen += [t["id"] for t in answer["tasks"]]
        if answer["next_cursor"] is None:
            break
        assert answer["next_cursor"] == answer["tasks"][-1]["id"]
        cursor = ["--cursor", answer["next_cursor"]]
    assert seen == ids
    human = grapevine(seed, "tasks", "--network", "--limit", "2")
    assert human.returncode == 0
    assert human.stderr.strip() == f"more tasks: add --cursor {ids[1]}"


def test_progress_shows_on_stderr_for_listings_of_several_pages(
    peer: tuple[Peer, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed, ids = peer
    monkeypatch.setattr(network_tasks, "NETWORK_PAGE", 3)
    assert main(["tasks", "--network", "--json", *seed.cli_flags()]) == 0
    out, err = capsys.readouterr()
    assert [t["id"] for t in json.loads(out)["tasks"]] == ids
    assert err.splitlines() == ["listed 3 tasks so far...", "listed 6 tasks so far..."]


def test_wrong_command_lines_exit_2_with_one_line(peer: tuple[Peer, list[str]]) -> None:
    seed, ids = peer
    for args, words in [
        (("--network", "--cursor", "nothex"), "--cursor"),
        (("--network", "--cursor", ids[0][:10]), "64 hex digits"),
        (("--cursor", ids[0]), "--network"),
        (("--network", "--limit", "0"), "--limit"),
        (("--owner", "peer-a"), "--owner"),
        (("--network", "--owner", ids[0]), "--owner"),
    ]:
        result = grapevine(seed, "tasks", *args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("grapevine tasks: ") and words in line
