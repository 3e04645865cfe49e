"""`grapevine agent --handlers MODULE` as a user runs it (issue 13, "Agents and roles in
Python"): the installed `grapevine` command, a module in the current directory, `grapevine
submit` printing the role's answer; and the one-line refusals (exit 2, no traceback).

Every process is a subprocess on 127.0.0.1; the cluster ends the peers it started by pid.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import scripts.local_cluster as local_cluster
from scripts.local_cluster import LocalCluster, Peer, child_env, wait_for, wait_ready

pytestmark = pytest.mark.e2e

GRAPEVINE = Path(sys.executable).with_name("grapevine")
"""The installed console script: unlike `python -m peer.cli`, it does not put the current
directory on sys.path, so the handlers' own lookup there is what finds the module."""

SHOUT = """from peer import role

@role("shout")
async def shout(task):
    return task.input.upper()
"""
"""The module of issue 13, exactly as written there."""


def grapevine(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRAPEVINE), *argv],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=cwd,
        timeout=60,
        check=False,
    )


async def wait_role(peers: Sequence[Peer], role: str) -> None:
    """Wait until every peer answers and sees all of them alive, one serving `role`."""

    async def served() -> tuple[bool, object]:
        seen = {}
        for peer in peers:
            async with peer.client() as client:
                members = await client.members()
            alive = [m for m in members if m["status"] == "alive"]
            seen[peer.name] = (len(alive), sorted({r for m in alive for r in m["roles"]}))
        return all(n == len(peers) and role in roles for n, roles in seen.values()), seen

    await wait_ready(peers, timeout=20)
    await wait_for(f"role {role} served", served, timeout=20)


@pytest.fixture
def installed_command(monkeypatch: pytest.MonkeyPatch) -> None:
    if not GRAPEVINE.exists():
        pytest.skip("the grapevine console script is not installed next to this Python")

    def command(flags: Sequence[str]) -> list[str]:
        return [str(GRAPEVINE), "agent", *flags]

    monkeypatch.setattr(local_cluster, "agent_command", command)


def test_the_shout_module_answers_hello(tmp_path: Path, installed_command: None) -> None:
    root = tmp_path / "cluster"
    root.mkdir()
    (root / "shout.py").write_text(SHOUT)
    with LocalCluster(root, profile="local") as cluster:
        # Three peers, as a task is acknowledged once held by two replicas besides its origin.
        server = cluster.add(extra_args=("--handlers", "shout"))
        peers = [server, cluster.add(join=[server]), cluster.add(join=[server])]

        def logs() -> str:
            return "\n".join(f"--- {p.name}:\n{p.log_tail(20)}" for p in peers)

        try:
            asyncio.run(wait_role(peers, "shout"))
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\n{logs()}") from exc
        for at in (server, peers[1]):
            done = grapevine("submit", *at.cli_flags(), "--role", "shout", "hello", cwd=tmp_path)
            assert done.returncode == 0, done.stderr + logs()
            assert done.stdout == "HELLO\n"


BROKEN = "from peer import role\n\nraise RuntimeError('the database is down')\n"
EMPTY = "VALUE = 1\n"
CLASH_CONFIG = """
[[agents]]
name = "loud"
roles = ["shout"]
"""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--handlers", "no_such_module"], "--handlers: no module named 'no_such_module'"),
        (
            ["--handlers", "broken"],
            "--handlers: cannot import broken: RuntimeError: the database is down",
        ),
        (["--handlers", "empty"], "--handlers: module 'empty' ("),
        (
            ["--handlers", "shout", "--config", "clash.toml"],
            "--handlers: role 'shout' is served both by shout.shout and by agent 'loud' in "
            "the config file",
        ),
        (["--handlers", "shout,shout2"], "--handlers: role 'shout' is served both by"),
        (["--handlers", "shout", "--no-agents"], "--handlers: a seed-only peer (--no-agents)"),
    ],
)
def test_unusable_handlers_exit_2_with_one_line(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    if not GRAPEVINE.exists():
        pytest.skip("the grapevine console script is not installed next to this Python")
    (tmp_path / "shout.py").write_text(SHOUT)
    (tmp_path / "shout2.py").write_text(SHOUT)
    (tmp_path / "broken.py").write_text(BROKEN)
    (tmp_path / "empty.py").write_text(EMPTY)
    (tmp_path / "clash.toml").write_text(CLASH_CONFIG)
    done = grapevine(
        "agent",
        "--insecure-dev",
        "--data-dir",
        str(tmp_path / "data"),
        "--bind",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
        *flags,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("grapevine agent: " + message), done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()
