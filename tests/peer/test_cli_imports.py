"""What `grapevine` imports on its fast paths: `--help` and the client commands (issue 13: under
150 ms). Wall time depends on the machine (scripts/bench_cli.py measures it); the import graph
does not, so it is what this test holds: a fresh interpreter builds the parser and runs a
client command, then lists what it loaded.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HEAVY = ("aiohttp", "aiohttp.web", "rich", "litellm", "protocol.sim", "peer.demo.command")
"""Modules none of those paths may load: the HTTP server (and aiohttp's client, whose import
alone costs most of the budget), rich, litellm, the simulator and the demo."""

PROBE = """
import json, sys
from peer.cli.main import build_parser, main
build_parser()
after_parser = sorted(sys.modules)
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print(json.dumps({"parser": after_parser, "command": sorted(sys.modules), "code": code}))
"""


def loaded(*argv: str) -> dict[str, object]:
    return run_probe(PROBE, *argv)


def run_probe(probe: str, *argv: str) -> dict[str, object]:
    """Run `probe` in a fresh interpreter with `argv`; the JSON object it printed last."""
    answer: dict[str, object] = json.loads(python_c(probe, *argv).stdout.splitlines()[-1])
    return answer


def python_c(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter with `argv`, from the repository's root."""
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def heavy_in(modules: object) -> list[str]:
    assert isinstance(modules, list)
    return [name for name in HEAVY if name in modules]


def test_building_the_parser_loads_no_heavy_module() -> None:
    assert heavy_in(loaded()["parser"]) == []


@pytest.mark.parametrize(
    "argv",
    [
        ("members",),
        ("agents", "--json"),
        ("submit", "--role", "echo", "x"),
        ("task", "abcdef"),
        ("tree", "abcdef"),
        ("status",),
        ("watch", "abcdef"),
        ("events", "--follow"),
    ],
    ids=lambda argv: argv[0],
)
def test_a_client_command_loads_no_heavy_module(argv: tuple[str, ...]) -> None:
    # Nobody listens there: the command runs its whole client path up to the connection.
    answer = loaded(*argv, "--api", f"127.0.0.1:{free_port()}")
    assert answer["code"] == 1
    assert heavy_in(answer["command"]) == []
    assert "h11" in answer["command"]  # it did run its client
    # ... on blocking sockets: asyncio alone is about a third of a command's start-up
    assert "asyncio" not in answer["command"]


def test_submitting_a_file_runs_an_event_loop(tmp_path: Path) -> None:
    # The one client command that works concurrently; it shows the asyncio check can fail.
    lines = tmp_path / "tasks.jsonl"
    lines.write_text('{"role": "echo", "input": "x"}\n')
    answer = loaded("submit", "--file", str(lines), "--api", f"127.0.0.1:{free_port()}")
    assert "asyncio" in answer["command"]
    assert heavy_in(answer["command"]) == ["rich"]  # --file draws its progress with rich


def test_the_probe_catches_a_heavy_import() -> None:
    # The check can fail: the demo loads rich and its process manager once it runs (here, up
    # to refusing --peers 1), while the simulator is refused before it loads.
    demo = loaded("demo", "--peers", "1")
    assert (demo["code"], heavy_in(demo["command"])) == (2, ["rich", "peer.demo.command"])
    simulate = loaded("simulate", "--nodes", "0")
    assert (simulate["code"], heavy_in(simulate["command"])) == (2, [])


CONSOLE = """
import atexit, sys
atexit.register(lambda: print("teardown ran", flush=True))
from peer.cli.main import console
console()
"""


@pytest.mark.parametrize(
    ("argv", "code", "teardown"),
    [
        (("--version",), 0, False),
        (("members", "--api", "PORT"), 1, False),
        (("membrs",), 2, False),
        (("simulate", "--nodes", "0"), 2, True),
    ],
    ids=["version", "client", "usage", "simulate"],
)
def test_the_console_skips_teardown_only_where_nothing_needs_it(
    argv: tuple[str, ...], code: int, teardown: bool
) -> None:
    # A client command and argparse's own exits end with os._exit (about 30 ms of teardown
    # saved), their output flushed; the other commands exit normally, exit handlers and all.
    argv = tuple(f"127.0.0.1:{free_port()}" if a == "PORT" else a for a in argv)
    result = python_c(CONSOLE, *argv)
    assert result.returncode == code
    assert ("teardown ran" in result.stdout) == teardown
    assert result.stdout.strip() or result.stderr.strip()  # what it printed got out
    if argv[0] == "--version":
        assert result.stdout.startswith("grapevine ")
    if argv[0] == "members":
        assert "connection refused" in result.stderr
