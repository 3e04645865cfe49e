"""The demo's network: its peer processes, one API client each, and the waits until it forms.

Invariants:
- Every process the demo starts is recorded in `DemoPeers` before anything else can fail, and
  `DemoPeers.stop` ends them by pid (peer.demo.processes.stop_processes).
- Peers listen on 127.0.0.1 port 0; the addresses they got come from each agent's ready line,
  so there is no race for a "free" port. Their clients send the API token each peer generated
  in its data directory (`DemoPeer.client`).
- Every wait is bounded by the caller's deadline and fails with a `DemoError` naming what was
  missing; a peer process that exits early fails the demo at the next check.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from peer.client import GrapevineClient, GrapevineError
from peer.demo.processes import (
    STOP_GRACE,
    PeerProcess,
    agent_command,
    read_log_tail,
    stop_processes,
)

POLL_INTERVAL = 0.25
"""Seconds between polls of the peers while waiting on them (about 4 Hz)."""
LOG_TAIL = 12
"""Lines of each peer's log an error message shows."""


class DemoError(Exception):
    """The demo could not finish; the message says what was missing."""


@dataclass(kw_only=True)
class DemoPeer(PeerProcess):
    """One `grapevine agent` process of the demo, run from its own config."""

    config: Path
    data_dir: Path
    """The `data_dir` of its config, where it keeps its API token."""

    def client(self) -> GrapevineClient:
        """A client of this peer's API (once it listens), sending its token."""
        return GrapevineClient(self.api, data_dir=self.data_dir)


@dataclass
class DemoPeers:
    """The peer processes the demo started; `stop()` ends every one of them, by pid."""

    started: list[DemoPeer] = field(default_factory=list)

    def start(self, peer: DemoPeer, join: str | None) -> None:
        """Start `peer`'s agent on 127.0.0.1 port 0, joining through `join` if given."""
        flags = ["--config", str(peer.config), "--bind", "127.0.0.1:0", "--api", "127.0.0.1:0"]
        if join is not None:
            flags += ["--join", join]
        peer.launch(agent_command(flags), cwd=peer.config.parent)
        self.started.append(peer)

    def pids(self) -> list[int]:
        return [p.pid for p in self.started if p.pid is not None]

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every running peer, then SIGKILL those still running after `grace` s.

        A second Ctrl-C while waiting kills the rest at once.
        """
        stop_processes((p.process for p in self.started), grace)

    def logs(self) -> str:
        """The tail of every peer's log, for an error message."""
        return "\n".join(
            f"--- {p.name} log ({p.log_path}):\n{_shown_tail(p)}" for p in self.started
        )


def _shown_tail(peer: DemoPeer) -> str:
    tail = read_log_tail(peer.log_path, LOG_TAIL)
    return "(no log)" if tail is None else tail or "(empty log)"


async def wait_listening(peer: DemoPeer, deadline: float) -> None:
    """Wait for the agent's ready line; record the addresses it bound."""
    while not peer.read_ready_line():
        assert peer.process is not None
        if peer.process.poll() is not None:
            raise DemoError(f"{peer.name} exited with status {peer.process.returncode}")
        if time.monotonic() > deadline:
            raise DemoError(f"{peer.name} did not start listening within --timeout")
        await asyncio.sleep(0.05)


@dataclass
class DemoNetwork:
    """The running peers with one open API client each, and node ids mapped to peer names."""

    peers: list[DemoPeer]
    clients: list[GrapevineClient]
    names: dict[str, str] = field(default_factory=dict)

    def name_of(self, node: str | None) -> str:
        return self.names.get(node or "", node[:10] if node else "?")

    def check_alive(self) -> None:
        for peer in self.peers:
            if peer.process is not None and peer.process.poll() is not None:
                raise DemoError(
                    f"{peer.name} exited with status {peer.process.returncode} during the demo"
                )


async def wait_network(network: DemoNetwork, deadline: float) -> None:
    """Wait until every peer sees every peer alive and the boss, admin and worker roles."""
    wanted_ids = {p.node_id for p in network.peers}
    wanted_roles = {"boss", "admin", "worker"}
    while True:
        network.check_alive()
        missing = []
        for peer, client in zip(network.peers, network.clients, strict=True):
            try:
                members = await client.members()
            except GrapevineError as exc:
                missing.append(f"{peer.name}: {exc}")
                continue
            alive = [m for m in members if m.get("status") == "alive"]
            ids = {m["id"] for m in alive}
            roles = {role for m in alive for role in m.get("roles", [])}
            if not wanted_ids <= ids:
                missing.append(f"{peer.name} sees {len(wanted_ids & ids)} of the peers alive")
            elif not wanted_roles <= roles:
                missing.append(f"{peer.name} misses roles {sorted(wanted_roles - roles)}")
        if not missing:
            return
        last = "; ".join(missing)
        if time.monotonic() > deadline:
            raise DemoError(f"the network did not form within --timeout: {last}")
        await asyncio.sleep(POLL_INTERVAL)
