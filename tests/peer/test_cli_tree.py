"""`grapevine tree` (peer/cli/tasks.py, peer/cli/render.py) run as a user runs it: a subprocess.

Against two real agent processes (a task with no children, and the errors), and against an
in-process peer serving its API on a real socket, where a parent with two children is made
through the driver with `parent=` (agent processes do not delegate yet).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from peer.agents.ports import AgentOutput
from peer.cli import render as cli_render
from peer.cli import render_tree
from peer.http.app import PeerApi
from peer.runtime.executor import Outcome, Work, builtin_roles
from scripts.local_cluster import (
    Peer,
    child_env,
    grapevine_command,
)
from tests.peer.inprocess import API_TOKEN, in_process_peer
from tests.peer.test_cli_tasks import one_line_error
from tests.peer.two_peers import joined_pair


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with joined_pair(tmp_path_factory.mktemp("cli-tree")) as seed:
        yield seed


def grapevine(target: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `grapevine ARGS` against the peer the flags `target` name (`Peer.cli_flags`)."""
    return subprocess.run(
        [*grapevine_command(), *args, *target],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )


def test_tree_of_a_task_without_children(peer: Peer) -> None:
    submitted = grapevine(peer.cli_flags(), "submit", "--role", "echo", "--json", "leaf")
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["id"]

    human = grapevine(peer.cli_flags(), "tree", task_id[:10])
    assert human.returncode == 0, human.stderr
    first, totals = human.stdout.splitlines()
    assert first.startswith(f"echo {task_id[:12]} done on ")
    assert first.endswith(" 0 tokens")
    assert totals == (
        "1 tasks, 1 executions, 0 duplicates, 0 tokens (0 prompt, 0 completion), cost $0.000000, "
        "0 model calls (0 repeated after a takeover, 0 tokens)"
    )

    as_json = json.loads(grapevine(peer.cli_flags(), "tree", task_id, "--json").stdout)
    assert as_json["id"] == task_id and as_json["children"] == []
    assert as_json["agent"] is None and as_json["truncated"] is False
    assert as_json["totals"]["tasks"] == 1


def test_tree_errors_are_one_line(peer: Peer) -> None:
    assert "not known" in one_line_error(grapevine(peer.cli_flags(), "tree", "ab" * 32), 1)
    assert "hex digits" in one_line_error(grapevine(peer.cli_flags(), "tree", "nothex"), 2)
    assert "at least 6" in one_line_error(grapevine(peer.cli_flags(), "tree", "abc"), 1)
    unreachable = grapevine(["--api", "127.0.0.1:9"], "tree", "ab" * 32)
    assert "cannot reach the peer API" in one_line_error(unreachable, 1)


async def writer(work: Work) -> Outcome:
    answer = AgentOutput(f"wrote {work.input.decode()}", "writer-1", "offline", 1)
    return Outcome(answer.encode(), usage=(100, 20, 7))


async def test_tree_of_a_parent_and_two_children_in_process(tmp_path: Any) -> None:
    roles = {**builtin_roles(), "writer": writer}
    async with in_process_peer(1, bytes(range(96, 128)), roles=roles) as peer:
        driver = peer.driver
        peer_api = PeerApi(driver, peer.transport, tmp_path, lambda: None, token=API_TOKEN)
        server = TestServer(peer_api.app)
        await server.start_server()
        try:
            parent = driver.submit("writer", b"report", nonce=os.urandom(16))
            driver.submit("writer", b"intro", parent=parent, created=1.0, nonce=os.urandom(16))
            driver.submit("echo", b"refs", parent=parent, created=2.0, nonce=os.urandom(16))
            for child in driver.children_of(parent):
                assert await driver.wait_result(child.task_id, timeout=10) is not None
            assert await driver.wait_result(parent, timeout=10) is not None
            api = f"127.0.0.1:{server.port}"
            process = await asyncio.create_subprocess_exec(
                *grapevine_command(),
                "tree",
                parent.hex(),
                "--api",
                api,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**child_env(), "GRAPEVINE_API_TOKEN": API_TOKEN},
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        finally:
            await server.close()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith(f"writer {parent.hex()[:12]} done on ")
    assert lines[0].endswith(" agent writer-1 120 tokens")
    assert lines[1].startswith("├── writer ") and lines[1].endswith(" agent writer-1 120 tokens")
    assert lines[2].startswith("└── echo ") and lines[2].endswith(" 0 tokens")
    assert lines[3] == (
        "3 tasks, 3 executions, 0 duplicates, 240 tokens (200 prompt, 40 completion), "
        "cost $0.000014, 0 model calls (0 repeated after a takeover, 0 tokens)"
    )


def test_rendering_of_nested_duplicated_and_truncated_trees() -> None:
    def node(role: str, state: str, children: list[Any], **extra: Any) -> dict[str, Any]:
        base = {"id": role * 20, "role": role, "state": state, "peer": None, "agent": None}
        return {**base, "usage": None, "duplicates": 0, "children": children, **extra}

    tree = node(
        "a",
        "running",
        [
            node(
                "b",
                "running",
                [node("c", "pending", [], model_calls=1)],
                duplicates=2,
                model_calls=3,
                model_calls_repeated=1,
            ),
            node("[red]d", "done", []),
        ],
        totals={
            "tasks": 4,
            "executions": 3,
            "duplicates": 2,
            "model_calls": 4,
            "model_calls_repeated": 1,
            "repeated_tokens": 30,
        },
        truncated=True,
    )
    assert render_tree.tree_lines(tree) == [
        "a aaaaaaaaaaaa running",
        "├── b bbbbbbbbbbbb running 3 model calls (1 repeated after a takeover) (2 duplicates)",
        "│   └── c cccccccccccc pending 1 model call",
        "└── [red]d [red]d[red]d done",
    ]
    totals = cli_render.tree_totals(tree)
    assert totals.startswith("4 tasks, 3 executions, 2 duplicates, 0 tokens")
    assert totals.endswith(
        "cost ?, 4 model calls (1 repeated after a takeover, 30 tokens); deeper tasks left out"
    )


def test_a_peers_text_cannot_drive_the_terminal_and_colour_is_opt_in() -> None:
    tree = {
        "id": "ab" * 32,
        "role": "evil\x1b[2J\x1b]0;title\x07",
        "state": "failed",
        "peer": None,
        "agent": "a\rb\x9bc",
        "usage": {"prompt_tokens": 5, "completion_tokens": "x"},
        "duplicates": 1,
        "children": [{"id": "cd" * 32, "role": "leaf", "state": "done", "children": "junk"}],
    }
    plain = render_tree.tree_lines(tree)
    assert plain == [
        "evil[2J]0;title abababababab failed agent abc 5 tokens (1 duplicate)",
        "└── leaf cdcdcdcdcdcd done",
    ]
    coloured = render_tree.tree_lines(tree, colour=True)
    assert coloured[0].startswith("\x1b[1mevil[2J]0;title\x1b[0m ")
    assert "\x1b[31mfailed\x1b[0m" in coloured[0]
    assert "\x1b[32mdone\x1b[0m" in coloured[1]
    assert [line.count("\x1b[") for line in coloured] == [8, 6]  # only our own codes


def test_colour_only_for_a_terminal_that_wants_it(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert render_tree.wants_colour(Terminal())
    assert not render_tree.wants_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not render_tree.wants_colour(Terminal())
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not render_tree.wants_colour(Terminal())
