"""The `grapevine` command line (peer/cli/), run as a subprocess the way users run it.

Client commands run against a canned API (tests/peer/fake_api.py); the agent is only started
far enough to see it refuse bad settings — tests/e2e runs real peers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peer.cli.main import build_parser
from peer.cli.render import clock
from scripts.local_cluster import free_port
from tests.peer.fake_api import DEAD_ID, OTHER_ID, SELF_ID, ThreadedFakeApi

REPO = Path(__file__).resolve().parents[2]


def cli_env(**env: str) -> dict[str, str]:
    """The environment for a CLI subprocess: this checkout importable, only the given
    GRAPEVINE_* variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRAPEVINE_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    environ.update(env)
    return environ


def grapevine(
    *args: str, stdin: str = "", timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `python -m peer.cli ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", *args],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=cli_env(**env),
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    server = ThreadedFakeApi()
    server.start()
    yield server.address
    server.stop()


COMMANDS = [
    (),
    ("keygen",),
    ("agent",),
    ("members",),
    ("agents",),
    ("join",),
    ("leave",),
    ("event",),
    ("events",),
    ("self",),
    ("health",),
    ("metrics",),
    ("keys",),
    ("keys", "list"),
    ("keys", "install"),
    ("keys", "use"),
    ("keys", "remove"),
    ("simulate",),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "grapevine")
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    result = grapevine(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(('grapevine', *command))}")
    assert len(result.stdout.splitlines()) > 3


def test_keygen_prints_a_32_byte_key_without_warning_when_redirected() -> None:
    result = grapevine("keygen")
    assert result.returncode == 0
    assert len(base64.b64decode(result.stdout.strip(), validate=True)) == 32
    assert result.stderr == ""
    assert grapevine("keygen").stdout != result.stdout


def test_keygen_output_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "network.key"
    assert grapevine("keygen", "--output", str(path)).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text()
    assert len(base64.b64decode(key.strip())) == 32
    line = assert_one_line_error(grapevine("keygen", "-o", str(path)), 1)
    assert "already exists" in line
    assert path.read_text() == key


@pytest.mark.parametrize("via_env", [False, True], ids=["--api", "GRAPEVINE_API"])
def test_unreachable_api_is_one_line_and_exit_1(via_env: bool) -> None:
    address = f"127.0.0.1:{free_port()}"
    if via_env:
        result = grapevine("members", GRAPEVINE_API=address)
    else:
        result = grapevine("members", "--api", address)
    assert assert_one_line_error(result, 1) == (
        f"grapevine members: cannot reach the peer API at {address} (connection refused); "
        "is `grapevine agent` running? (set --api or GRAPEVINE_API)"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("members", "--bogus"), "grapevine members: unrecognized arguments: --bogus"),
        (("frobnicate",), "grapevine: argument COMMAND: invalid choice"),
        (("event",), "grapevine event: the following arguments are required: NAME"),
        (("agent", "--join"), "grapevine agent: argument --join: expected one argument"),
        (("keys",), "grapevine keys: choose list, install, use or remove"),
        (("members", "--api", "nope"), "grapevine members: the API address 'nope' must be"),
        (("keys", "install", "not-a-key"), "grapevine keys install: a network key is 32 bytes"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(args: tuple[str, ...], expected: str) -> None:
    assert assert_one_line_error(grapevine(*args), 2).startswith(expected)


def test_no_command_prints_help_and_exits_2() -> None:
    result = grapevine()
    assert result.returncode == 2
    assert result.stderr.startswith("usage: grapevine")


def test_agent_without_a_network_key_refuses_with_an_explanation(tmp_path: Path) -> None:
    result = grapevine(
        "agent",
        "--data-dir",
        str(tmp_path),
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--api",
        f"127.0.0.1:{free_port()}",
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("grapevine agent: ")
    assert "grapevine keygen" in result.stderr


def test_agent_with_bad_settings_file_refuses(tmp_path: Path) -> None:
    config = tmp_path / "peer.toml"
    config.write_text("this is = = not toml\n")
    result = grapevine("agent", "--config", str(config), "--insecure-dev", timeout=30)
    assert assert_one_line_error(result, 2).startswith("grapevine agent: ")


def test_members_table_marks_self_and_lists_every_member(api: str) -> None:
    result = grapevine("members", "--api", api)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = ["ID", "ADDRESS", "STATUS", "INC", "ROLES", "SLOTS", "QUEUE", "LOAD", "SEEN"]
    assert lines[0].split() == header
    assert lines[1].split()[:5] == [SELF_ID[:10], "(self)", "127.0.0.1:7001", "alive", "3"]
    assert lines[2].split()[:5] == [OTHER_ID[:10], "127.0.0.1:7002", "alive", "1", "writer,critic"]
    assert lines[3].split()[:3] == [DEAD_ID[:10], "127.0.0.1:7003", "dead"]
    # SEEN: the local time of each member's last_seen; none for ourselves.
    assert [line.split()[-1] for line in lines[1:4]] == [
        "-",
        clock(1_700_000_002.25),
        clock(1_699_999_990.0),
    ]
    assert lines[-1] == "3 members: 2 alive, 1 dead"


def test_members_json_keeps_the_api_field_names(api: str) -> None:
    members = json.loads(grapevine("members", "--json", "--api", api).stdout)
    assert {m["id"] for m in members} == {SELF_ID, OTHER_ID, DEAD_ID}
    for member in members:
        assert {"id", "address", "status", "incarnation", "self"} <= member.keys()


def test_events_are_printed_one_human_line_each(api: str) -> None:
    result = grapevine("events", "--follow", "--api", api)
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f"member-down {DEAD_ID[:10]} 127.0.0.1:7003 (dead, incarnation 2)")
    assert lines[1].endswith(f"event deploy from {OTHER_ID[:10]} (ltime 7): v1.2.3")
    # The fake peer closes the stream after two events; a followed stream ending is a failure.
    assert result.returncode == 1
    assert result.stderr == "grapevine events: the peer ended the event stream\n"


def test_events_json_is_one_object_per_line(api: str) -> None:
    result = grapevine("events", "--json", "--api", api)
    assert result.returncode == 0
    assert [json.loads(line)["type"] for line in result.stdout.splitlines()] == [
        "member-down",
        "event",
    ]


def test_event_health_self_metrics_and_keys(api: str) -> None:
    assert "ltime 8" in grapevine("event", "deploy", "v2", "--api", api).stdout
    health = grapevine("health", "--api", api)
    assert (health.returncode, health.stdout) == (0, "ok: 2 members alive, up 1m15s\n")
    assert json.loads(grapevine("self", "--json", "--api", api).stdout)["id"] == SELF_ID
    metrics = grapevine("metrics", "--api", api).stdout
    assert "rejected (unknown_key)  4" in metrics
    assert json.loads(grapevine("keys", "list", "--json", "--api", api).stdout)["accepted"]
    key = grapevine("keygen").stdout
    installed = grapevine("keys", "install", "-", "--api", api, stdin=key)
    assert installed.returncode == 0 and "feedf00d" in installed.stdout


def leaf_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command that runs something, with its parser (`keys list`, not `keys`)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from leaf_commands(sub, (*path, name))


def test_every_command_that_prints_takes_json() -> None:
    runs_a_peer = {("agent",)}
    commands = dict(leaf_commands(build_parser()))
    assert {("members",), ("agents",), ("join",), ("keys", "use"), ("keygen",)} <= set(commands)
    without = [
        " ".join(name)
        for name, parser in commands.items()
        if name not in runs_a_peer
        and not any("--json" in a.option_strings for a in parser._actions)
    ]
    assert without == []


def test_json_of_event_leave_keys_and_keygen(api: str, tmp_path: Path) -> None:
    sent = grapevine("event", "deploy", "v2", "--json", "--api", api)
    assert json.loads(sent.stdout) == {"ltime": 8, "origin": SELF_ID}
    left = grapevine("leave", "--json", "--api", api)
    assert json.loads(left.stdout) == {"status": "leaving"}
    key = json.loads(grapevine("keygen", "--json").stdout)["key"]
    assert len(base64.b64decode(key)) == 32
    installed = grapevine("keys", "install", "-", "--json", "--api", api, stdin=key)
    assert "feedf00d" in json.loads(installed.stdout)["accepted"]
    written = grapevine("keygen", "--json", "--output", str(tmp_path / "k"))
    assert json.loads(written.stdout) == {"path": str(tmp_path / "k")}


def test_api_problem_details_are_printed_and_exit_1(api: str) -> None:
    result = grapevine("event", "too-big", "x", "--api", api)
    assert assert_one_line_error(result, 1) == (
        "grapevine event: Event too large: the payload exceeds 512 bytes"
    )
    key = grapevine("keygen").stdout.strip()
    removed = grapevine("keys", "remove", key, "--api", api)
    assert assert_one_line_error(removed, 1).startswith("grapevine keys remove: Cannot remove")


def _sigint_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_quietly() -> None:
    # A listener that never answers keeps the client waiting until it is interrupted.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        process = subprocess.Popen(
            [sys.executable, "-m", "peer.cli", "events", "--follow", "--api", address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=cli_env(),
            # As from a terminal: a suite started in the background (`... &`) would pass on
            # an ignored SIGINT, and the Ctrl-C below would mean nothing.
            preexec_fn=_sigint_by_default,
        )
        try:
            time.sleep(1.5)
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=15)
        finally:
            process.kill()
    assert process.returncode == 130
    assert stderr == ""


def simulate_json(*args: str) -> dict[str, object]:
    result = grapevine("simulate", "--nodes", "20", "--json", *args, timeout=120)
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    report.pop("wall", None)
    return report


def test_simulate_json_is_deterministic_except_wall_time() -> None:
    assert simulate_json() == simulate_json()
