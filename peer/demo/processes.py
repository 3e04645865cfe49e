"""Start and stop `grapevine agent` processes on this machine: the one process manager.

`grapevine demo` and scripts/local_cluster.py (the e2e tests and the benchmarks) start their
peers as `PeerProcess`es and end them with `stop_processes`; scripts/netns_cluster.py and the
benchmarks' other servers end their processes with `stop_processes` too.

Invariants:
- A process is only ever signalled through the `Popen` object that started it, by pid; nothing
  else is signalled.
- `stop_processes` ends every process it is given: SIGTERM, then SIGKILL for each one still
  running after the grace period; an interrupt while waiting (a second Ctrl-C) still kills and
  reaps the rest.
- Children run this installation (its root first on PYTHONPATH) and inherit none of the
  caller's GRAPEVINE_* settings: they do only what their flags and configs say.
- A peer's stdout and stderr are appended to its log file, so a restart keeps the earlier runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding the `peer` package (the checkout, in a development install)."""
STOP_GRACE = 5.0
"""Seconds a peer gets to leave the network after SIGTERM before it is killed."""
READY_LINE = re.compile(r"grapevine agent (\S+) listening on (\S+) \(api (\S+)\)")
"""What `grapevine agent` logs once it listens: its id, peer address and API address."""


def grapevine_command() -> list[str]:
    """The command that runs the CLI of this installation, whether on PATH or not."""
    return [sys.executable, "-m", "peer.cli"]


def agent_command(flags: Sequence[str]) -> list[str]:
    """The command line of `grapevine agent FLAGS`."""
    return [*grapevine_command(), "agent", *flags]


def child_env() -> dict[str, str]:
    """The children's environment: this installation importable, no GRAPEVINE_* leaking."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPEVINE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def read_log_tail(path: Path, lines: int) -> str | None:
    """The last `lines` lines of the log at `path`, or None when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:])


def stop_processes(
    processes: Iterable[subprocess.Popen[Any] | None], grace: float = STOP_GRACE
) -> None:
    """SIGTERM every process still running, then SIGKILL those still running after `grace` s.

    Args:
        processes: the processes to end; None entries (never started) and exited ones are
            skipped.
        grace: seconds they get, all together, to exit on their own.
    """
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()


@dataclass
class PeerProcess:
    """One `grapevine agent` process (or a stopped one that can be started again)."""

    name: str
    log_path: Path
    bind: str = ""
    """Its peer address, once known."""
    api: str = ""
    """Its API address, once known."""
    node_id: str = ""
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    """How many times it was launched."""

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last `lines` lines of its log ("" when there is none)."""
        return read_log_tail(self.log_path, lines) or ""

    def launch(self, command: Sequence[str], cwd: Path) -> None:
        """Run `command` (see `agent_command`) in `cwd`, its output appended to the log."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(),
                cwd=cwd,
            )
        self.starts += 1

    def read_ready_line(self) -> bool:
        """Record the addresses the agent's ready line names; False while its log has none.

        A peer started on port 0 learns its ports from the OS; this line is where they show.
        """
        match = READY_LINE.search(self.log_path.read_text(errors="replace"))
        if match is None:
            return False
        self.bind, self.api = match.group(2), match.group(3)
        return True
