"""Clusters of real `grapevine agent` processes on 127.0.0.1, for the e2e tests and benchmarks.

Starting and stopping the processes is peer.demo.processes' job (shared with `grapevine demo`);
this module adds what tests and benchmarks need: fixed free ports, restarts, and bounded waits
on the peers' APIs. Used by tests/e2e, tests/peer and scripts/bench_*.py.

Invariants:
- Every process this module starts is recorded in its `LocalCluster` and ended by `close()`
  (SIGTERM, then SIGKILL after a grace period), by pid, whatever happened before; nothing else
  is ever signalled.
- Peers listen on 127.0.0.1 only, on ports the OS reported free, with data directories and logs
  under the cluster's own directory.
- Clients of a peer send the API token the peer generated in its data directory
  (`Peer.client`, `Peer.cli_flags`).
- Every wait is bounded: `wait_for` polls until a deadline and then raises `TimeoutError`
  carrying the last observation, so a failing test says what it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from peer.api_token import TokenError  # noqa: E402
from peer.client import ApiError, ClientError, GrapevineClient, GrapevineError  # noqa: E402
from peer.demo.processes import (  # noqa: E402
    PeerProcess,
    agent_command,
    child_env,
    grapevine_command,
    stop_processes,
)

__all__ = [
    "ApiError",
    "GrapevineClient",
    "GrapevineError",
    "LocalCluster",
    "Peer",
    "child_env",
    "grapevine_command",
]

T = TypeVar("T")


_handed_out: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now and was not handed out before.

    Ports come from below the kernel's ephemeral range, so the outgoing connections of a
    hundred running peers cannot take a port between this check and the peer's own bind; the
    scan starts at a random port so that concurrent harnesses rarely pick the same one. Under
    pytest-xdist each worker scans a range of its own: a port handed out by one worker and not
    yet bound by its peer would look free to another.
    """
    low, high = 20000, 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        high = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    low, high = _worker_range(low, high)
    start = random.randrange(low, high)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port between {low} and {high}")


def _worker_range(low: int, high: int) -> tuple[int, int]:
    """The share of [low, high) of this pytest-xdist worker ("gw3" of 4 takes the fourth
    quarter); the whole range outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    with contextlib.suppress(ValueError):
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", ""))
        index = int(worker.removeprefix("gw"))
        if 0 <= index < count:
            share = (high - low) // count
            return low + index * share, low + (index + 1) * share
    return low, high


def keygen(path: Path) -> Path:
    """Write a new network key to `path` with `grapevine keygen --output`."""
    subprocess.run(
        [*grapevine_command(), "keygen", "--output", str(path)],
        check=True,
        capture_output=True,
        env=child_env(),
        timeout=30,
    )
    return path


@dataclass(kw_only=True)
class Peer(PeerProcess):
    """One peer of a `LocalCluster`, on fixed ports, so that it can be restarted as it was."""

    data_dir: Path
    key_file: Path
    join: list[str]
    extra_args: Sequence[str] = ()
    """More `grapevine agent` flags for this peer (kept, so a restart runs it the same way)."""

    def client(self) -> GrapevineClient:
        """A client of this peer's API, sending the token in its data directory."""
        return GrapevineClient(self.api, data_dir=self.data_dir)

    def cli_flags(self) -> list[str]:
        """The flags that point a `grapevine` client command at this peer, token included."""
        return ["--api", self.api, "--data-dir", str(self.data_dir)]


@dataclass
class LocalCluster:
    """Real peers on loopback under `root`; use as a context manager so `close()` always runs.

    Args:
        root: a private directory for keys, data directories and logs.
        profile: the protocol preset every peer runs ("local" is fast, "lan" is Serf's LAN).
        extra_args: more `grapevine agent` flags for every peer.
    """

    root: Path
    profile: str = "local"
    extra_args: Sequence[str] = ("--no-agents",)
    peers: list[Peer] = field(default_factory=list)
    key_file: Path | None = None

    def __enter__(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_file = keygen(self.root / "network.key")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self,
        join: Sequence[Peer] = (),
        key_file: Path | None = None,
        extra_args: Sequence[str] | None = None,
    ) -> Peer:
        """Start a new peer joining through `join` (with the cluster's key unless given), with
        `extra_args` instead of the cluster's when given (e.g. its own `--config`)."""
        assert self.key_file is not None, "use LocalCluster as a context manager"
        name = f"p{len(self.peers)}"
        peer = Peer(
            name=name,
            bind=f"127.0.0.1:{free_port()}",
            api=f"127.0.0.1:{free_port()}",
            data_dir=self.root / name,
            key_file=key_file or self.key_file,
            join=[p.bind for p in join],
            log_path=self.root / f"{name}.log",
            extra_args=self.extra_args if extra_args is None else tuple(extra_args),
        )
        self.peers.append(peer)
        self.start(peer)
        return peer

    def start(self, peer: Peer) -> None:
        """(Re)start `peer`'s process with its own data directory, key and seeds."""
        assert not peer.running(), f"{peer.name} is already running"
        flags = [
            "--bind",
            peer.bind,
            "--api",
            peer.api,
            "--data-dir",
            str(peer.data_dir),
            "--network-key-file",
            str(peer.key_file),
            "--profile",
            self.profile,
            *peer.extra_args,
        ]
        for seed in peer.join:
            flags += ["--join", seed]
        command = agent_command(flags)
        with peer.log_path.open("ab") as log:
            log.write(f"--- start {peer.starts + 1}: {' '.join(command)}\n".encode())
        peer.launch(command, cwd=self.root)

    def kill(self, peer: Peer, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to `peer`'s process and, for SIGKILL, reap it."""
        if peer.process is not None and peer.process.poll() is None:
            peer.process.send_signal(sig)
            if sig == signal.SIGKILL:
                peer.process.wait(10)

    def close(self, grace: float = 5.0) -> None:
        """End every process this cluster started: SIGTERM, then SIGKILL after `grace`."""
        stop_processes((p.process for p in self.peers), grace)


async def query(peer: Peer, call: Callable[[GrapevineClient], Awaitable[T]]) -> T:
    """Run one client call against `peer`'s API."""
    async with peer.client() as client:
        return await call(client)


async def members_of(peer: Peer) -> list[dict[str, Any]]:
    """`peer`'s member list from its API."""
    return await query(peer, lambda c: c.members())


async def statuses(peer: Peer) -> dict[str, str]:
    """`peer`'s view as {node id: status}."""
    return {m["id"]: m["status"] for m in await members_of(peer)}


async def wait_for(
    what: str,
    check: Callable[[], Awaitable[tuple[bool, object]]],
    timeout: float,
    interval: float = 0.25,
) -> float:
    """Poll `check` until it reports success; return the seconds it took.

    Args:
        what: a description for the error message.
        check: returns (done, observation); API errors count as "not yet".
        timeout: seconds before giving up.

    Raises:
        TimeoutError: `check` never succeeded; the message holds the last observation.
    """
    start = time.monotonic()
    last: object = None
    while True:
        try:
            done, last = await check()
        except GrapevineError as exc:
            done, last = False, exc
        if done:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s; last saw {last!r}")
        await asyncio.sleep(interval)


async def wait_ready(peers: Sequence[Peer], timeout: float) -> None:
    """Wait until every peer's API answers, and record each peer's node id (a peer that has
    not written its API token yet is not ready)."""

    async def ready() -> tuple[bool, object]:
        missing = []
        for peer in peers:
            if not peer.running():
                raise RuntimeError(f"{peer.name} exited early:\n{peer.log_tail()}")
            try:
                info = await query(peer, lambda c: c.self_info())
            except (ClientError, TokenError):
                missing.append(peer.name)
                continue
            peer.node_id = info["id"]
        return not missing, missing

    await wait_for("peers ready", ready, timeout)


async def wait_views(
    observers: Sequence[Peer],
    expected: dict[str, str],
    timeout: float,
    exact: bool = False,
) -> float:
    """Wait until every observer sees each node id in `expected` with the expected status.

    Args:
        exact: also require that observers know no other member than those in `expected`.
    """

    async def agree() -> tuple[bool, object]:
        views = await asyncio.gather(*(statuses(p) for p in observers))
        wrong = {}
        for peer, view in zip(observers, views, strict=True):
            seen = {node: view.get(node) for node in expected}
            if seen != expected or (exact and set(view) != set(expected)):
                wrong[peer.name] = view
        return not wrong, wrong

    return await wait_for(f"views {expected}", agree, timeout)
