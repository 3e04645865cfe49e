"""Real peers in Linux network namespaces, with a switch that can be cut in two (needs root).

Topology (everything lives in namespaces this script creates; the root namespace is untouched)::

    gv-test-<pid>-0 ─┐                                  ┌─ gv-test-<pid>-2
      eth0 10.250.0.10 ├─ br-a ══ trunk-a/trunk-b ══ br-b ┤   eth0 10.250.0.12
    gv-test-<pid>-1 ─┘     (in gv-test-<pid>-sw)        └─ gv-test-<pid>-3
      eth0 10.250.0.11                                       eth0 10.250.0.13

The first half of the hosts hang off bridge br-a, the second half off br-b, in a switch
namespace; one veth pair (trunk-a, trunk-b) joins the bridges. `partition()` sets the trunk
down: a clean half|half split in which each side still reaches its own members (setting host
veths down would instead isolate every host on that side from its neighbours too). `heal()`
sets it up again.

Each host runs `grapevine agent --bind 10.250.0.X:7946 --api 127.0.0.1:8946` inside its
namespace (the API on that namespace's own loopback); views are read with
`ip netns exec NS grapevine members --json`.

Invariants:
- Only namespaces named gv-test-<our pid>-* are created, and only addresses in 10.250.0.0/24
  inside them; `close()` ends the processes it started (by pid) and deletes exactly the
  namespaces it created, even after a failure. Leftovers of an earlier run of this script
  whose pid no longer exists (gv-test-<dead pid>-*) are deleted on start.
- Every wait is bounded.

Run by hand (as root): `python scripts/netns_cluster.py --hosts 4` builds the cluster, shows
each view, partitions, waits for both sides to see the other dead, heals, waits for one view.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from peer.demo.processes import (  # noqa: E402
    agent_command,
    child_env,
    grapevine_command,
    read_log_tail,
    stop_processes,
)

SUBNET = "10.250.0"
FIRST_HOST = 10
PEER_PORT = 7946
API = "127.0.0.1:8946"
_OUR_NAMES = re.compile(r"^gv-test-(\d+)-")


class NetnsUnavailable(Exception):
    """This machine cannot run the namespace cluster (not root, no `ip netns`, no veth)."""


def ip(*args: str, netns: str | None = None) -> str:
    """Run `ip ARGS` (inside `netns` when given) and return its stdout.

    Raises:
        subprocess.CalledProcessError: the command failed; its stderr is in the exception.
    """
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=30).stdout


def check_available() -> None:
    """Raise `NetnsUnavailable` with the reason unless we can create namespaces and veths."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
    probe = f"gv-test-{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
        ip("link", "add", "probe-a", "type", "veth", "peer", "name", "probe-b", netns=probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        reason = getattr(exc, "stderr", "") or str(exc)
        raise NetnsUnavailable(f"cannot create a namespace with a veth: {reason.strip()}") from None
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete gv-test-<pid>-* namespaces whose creating process no longer exists."""
    removed = []
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _OUR_NAMES.match(name)
        if match and not _pid_exists(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            removed.append(name)
    return removed


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Host:
    """One namespace with one peer."""

    index: int
    netns: str
    address: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""


@dataclass
class NetnsCluster:
    """`hosts` peers in their own namespaces; use as a context manager so teardown always runs.

    Args:
        root: a private directory for the key, data directories and logs.
        hosts: how many peers (at least 2; the first half is one side of the partition).
        profile: the protocol preset the peers run.
    """

    root: Path
    hosts: int = 4
    profile: str = "local"
    prefix: str = field(default_factory=lambda: f"gv-test-{os.getpid()}")
    members: list[Host] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def __enter__(self) -> Self:
        try:
            self.build()
            self.start_peers()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        """Create the switch namespace, its two bridges and trunk, and one namespace per host."""
        if self.hosts < 2:
            raise ValueError("a partition needs at least 2 hosts")
        remove_stale_namespaces()
        self.root.mkdir(parents=True, exist_ok=True)
        self._add_netns(self.switch)
        for bridge in ("br-a", "br-b"):
            ip("link", "add", bridge, "type", "bridge", netns=self.switch)
        ip("link", "add", "trunk-a", "type", "veth", "peer", "name", "trunk-b", netns=self.switch)
        ip("link", "set", "trunk-a", "master", "br-a", netns=self.switch)
        ip("link", "set", "trunk-b", "master", "br-b", netns=self.switch)
        for dev in ("br-a", "br-b", "trunk-a", "trunk-b"):
            ip("link", "set", dev, "up", netns=self.switch)
        for i in range(self.hosts):
            netns = f"{self.prefix}-{i}"
            self._add_netns(netns)
            port = f"h{i}"
            bridge = "br-a" if i < self.hosts // 2 else "br-b"
            ip(
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns,
                netns=self.switch,
            )
            ip("link", "set", port, "master", bridge, netns=self.switch)
            ip("link", "set", port, "up", netns=self.switch)
            address = f"{SUBNET}.{FIRST_HOST + i}"
            ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
            ip("link", "set", "eth0", "up", netns=netns)
            ip("link", "set", "lo", "up", netns=netns)
            self.members.append(
                Host(
                    i, netns, f"{address}:{PEER_PORT}", self.root / f"h{i}", self.root / f"h{i}.log"
                )
            )

    def start_peers(self) -> None:
        """Start a peer in every namespace; all join through the first host."""
        key = self.root / "network.key"
        if not key.exists():
            subprocess.run(
                [*grapevine_command(), "keygen", "--output", str(key)],
                check=True,
                capture_output=True,
                env=child_env(),
                timeout=30,
            )
        seed = self.members[0].address
        for host in self.members:
            args = [
                "ip",
                "netns",
                "exec",
                host.netns,
                *agent_command(
                    [
                        "--bind",
                        host.address,
                        "--api",
                        API,
                        "--data-dir",
                        str(host.data_dir),
                        "--network-key-file",
                        str(key),
                        "--profile",
                        self.profile,
                        "--no-agents",
                    ]
                ),
            ]
            if host.index:
                args += ["--join", seed]
            with host.log_path.open("ab") as log:
                # `ip netns exec` execs the command, so this pid is the peer's own.
                host.process = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env()
                )

    def partition(self) -> None:
        """Cut the trunk between the two bridges: first half | second half."""
        ip("link", "set", "trunk-a", "down", netns=self.switch)
        ip("link", "set", "trunk-b", "down", netns=self.switch)

    def heal(self) -> None:
        """Reconnect the two bridges."""
        ip("link", "set", "trunk-a", "up", netns=self.switch)
        ip("link", "set", "trunk-b", "up", netns=self.switch)

    def sides(self) -> tuple[list[Host], list[Host]]:
        half = self.hosts // 2
        return self.members[:half], self.members[half:]

    def view(self, host: Host) -> dict[str, str] | None:
        """`host`'s member list as {address: status}, or None when its API did not answer."""
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                host.netns,
                *grapevine_command(),
                "members",
                "--json",
                "--api",
                API,
                "--data-dir",
                str(host.data_dir),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=child_env(),
            check=False,
        )
        if result.returncode != 0:
            return None
        members: list[dict[str, Any]] = json.loads(result.stdout)
        for m in members:
            if m.get("self"):
                host.node_id = m["id"]
        return {m["address"]: m["status"] for m in members}

    def wait_views(
        self, observers: Sequence[Host], expected: dict[str, str], timeout: float
    ) -> float:
        """Wait until each observer sees every address in `expected` with its status.

        Returns:
            The seconds it took.

        Raises:
            TimeoutError: not within `timeout`; the message holds the last views.
        """
        start = time.monotonic()
        while True:
            views = {h.netns: self.view(h) for h in observers}
            if all(
                view is not None and all(view.get(a) == s for a, s in expected.items())
                for view in views.values()
            ):
                return time.monotonic() - start
            for host in observers:
                if host.process is not None and host.process.poll() is not None:
                    raise RuntimeError(f"the peer in {host.netns} exited:\n{self.log_tail(host)}")
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"views not {expected} within {timeout:.0f} s: {views}")
            time.sleep(0.5)

    def log_tail(self, host: Host, lines: int = 15) -> str:
        return read_log_tail(host.log_path, lines) or ""

    def close(self) -> None:
        """End the peers this cluster started, then delete the namespaces it created."""
        stop_processes(h.process for h in self.members)
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.created.clear()

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self.created.append(name)


def run_scenario(cluster: NetnsCluster, timeout: float = 60.0) -> dict[str, float]:
    """Converge, partition, check each side sees the other dead, heal, converge again.

    Returns:
        Seconds taken by each phase: "converge", "partition_detected", "healed".
    """
    alive = {h.address: "alive" for h in cluster.members}
    took = {"converge": cluster.wait_views(cluster.members, alive, timeout)}
    left, right = cluster.sides()
    cluster.partition()
    start = time.monotonic()
    for side, other in ((left, right), (right, left)):
        expected = {**{h.address: "alive" for h in side}, **{h.address: "dead" for h in other}}
        cluster.wait_views(side, expected, timeout)
    took["partition_detected"] = time.monotonic() - start
    cluster.heal()
    took["healed"] = cluster.wait_views(cluster.members, alive, timeout)
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=4, help="peers, one per namespace")
    parser.add_argument("--profile", default="local", help="protocol preset (local or lan)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per phase")
    args = parser.parse_args(argv)
    try:
        check_available()
    except NetnsUnavailable as exc:
        print(f"netns_cluster: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gv-netns-") as tmp:
        try:
            with NetnsCluster(Path(tmp), args.hosts, args.profile) as cluster:
                took = run_scenario(cluster, args.timeout)
        except (TimeoutError, RuntimeError) as exc:
            print(f"netns_cluster: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    for phase, seconds in took.items():
        print(f"{phase:20} {seconds:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
