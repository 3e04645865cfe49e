"""`grapevine demo`: a local network of agent peers running one delegation tree, end to end.

The demo starts `--peers` real `grapevine agent` processes on 127.0.0.1 under a fresh network
key: peer p1 hosts the boss, every other peer an admin, and every peer a worker
(peer.demo.team). It submits one job to the boss at p1; the boss delegates sections to admins,
admins delegate parts to workers, and the answers are merged back up. It shows live progress
(peer.demo.follow, peer.demo.live_view), then the answer, the task tree (which peer and agent
ran each node), token counts and an audit line whose figures come from the peers' own APIs
(peer.demo.report).

Invariants:
- Every process the demo starts is recorded in `DemoPeers` and ended by pid — SIGTERM, then
  SIGKILL after `STOP_GRACE` seconds — on success, on error, on Ctrl-C and on SIGTERM.
  Nothing else is ever signalled.
- Everything lives in one fresh temporary directory (network key, configs, data directories,
  logs), removed at the end unless `--keep`.
- Every wait is bounded by the `--timeout` deadline; a failure names what was missing and
  shows the tail of every peer's log.
- With `--json`, stdout carries exactly one JSON object; status lines always go to stderr.
- Exit codes: 0 the job finished, 1 it failed or timed out, 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from rich.console import Console

from peer.client import ApiError, GrapevineClient, GrapevineError
from peer.demo.follow import follow
from peer.demo.live_view import LiveView, Report, Snapshot, render_report
from peer.demo.network import (
    DemoError,
    DemoNetwork,
    DemoPeer,
    DemoPeers,
    wait_listening,
    wait_network,
)
from peer.demo.options import OFFLINE_MODEL
from peer.demo.report import final_report
from peer.demo.team import config_text, team
from peer.interrupts import run_interruptible
from peer.runtime.keyring import encode_key, generate_network_key

PROG = "grapevine demo"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


async def _demo(args: argparse.Namespace, root: Path, processes: DemoPeers) -> Report:
    deadline = time.monotonic() + args.timeout
    key_file = root / "network.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(encode_key(generate_network_key()) + "\n")
    peers: list[DemoPeer] = []
    for number, agents in enumerate(team(args.peers), start=1):
        name = f"p{number}"
        config = root / f"{name}.toml"
        config.write_text(config_text(agents, args.model, key_file, root / name))
        peers.append(DemoPeer(name, root / f"{name}.log", config=config, data_dir=root / name))

    seed = peers[0]
    processes.start(seed, None)
    await wait_listening(seed, deadline)
    for peer in peers[1:]:
        processes.start(peer, seed.bind)
    _status(f"started {len(peers)} peers pid={','.join(map(str, processes.pids()))} in {root}")
    for peer in peers[1:]:
        await wait_listening(peer, deadline)

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(p.client()) for p in peers]
        network = DemoNetwork(peers, clients)
        for peer, client in zip(peers, clients, strict=True):
            info = await client.self_info()
            peer.node_id = info["id"]
            network.names[info["id"]] = network.names[info["short_id"]] = peer.name
        await wait_network(network, deadline)
        _status(
            f"network ready: {len(peers)} peers see each other and the roles boss, admin, "
            "worker; submitting the job to the boss at p1"
        )
        started = time.monotonic()
        root_id = await _submit(clients[0], args.job, deadline)
        if args.json:
            await follow(network, root_id, deadline, _progress_lines())
        else:
            console = Console()
            with LiveView(console, [p.name for p in peers]) as view:
                await follow(network, root_id, deadline, view.update)
        seconds = time.monotonic() - started
        return await final_report(network, root_id, args.model, seconds, deadline)


async def _submit(client: GrapevineClient, job: str, deadline: float) -> str:
    """Submit the job to the boss; return its id.

    A busy peer may not confirm in time that another peer holds the task (503); the task is
    durable and spreading anyway, and asking again with the same idempotency key names the
    same task, so the demo asks again until the deadline.
    """
    key = f"grapevine-demo-{os.urandom(8).hex()}"
    while True:
        try:
            return str((await client.submit("boss", job, idempotency_key=key))["id"])
        except ApiError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                raise
            _status(f"the job is not replicated yet; asking p1 again ({exc.detail[:80]})")


def _progress_lines() -> Callable[[Snapshot], None]:
    """The progress of `--json` mode: a status line each time the count of done tasks moves."""
    shown = -1

    def show(snapshot: Snapshot) -> None:
        nonlocal shown
        if snapshot.done != shown:
            shown = snapshot.done
            _status(f"{snapshot.done} of {snapshot.total} tasks done, {snapshot.running} running")

    return show


# --- command line ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run `grapevine demo` with parsed `args`; returns the exit code."""
    if args.peers < 3:
        return _fail(f"--peers must be at least 3, got {args.peers}", EXIT_USAGE)
    if not args.timeout > 0:
        return _fail(f"--timeout must be positive, got {args.timeout}", EXIT_USAGE)
    if not args.job.strip():
        return _fail("--job must not be empty", EXIT_USAGE)
    missing = _missing_keys(args.model)
    if missing:
        return _fail(
            f"--model {args.model} needs {' and '.join(missing)} in the environment", EXIT_USAGE
        )
    root = Path(tempfile.mkdtemp(prefix="grapevine-demo-"))
    processes = DemoPeers()
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        code = _run(args, root, processes)
    finally:
        try:
            processes.stop()
        except KeyboardInterrupt:
            processes.stop(0.0)
            code = EXIT_INTERRUPTED
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            _status(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return code


def _run(args: argparse.Namespace, root: Path, processes: DemoPeers) -> int:
    try:
        report = run_interruptible(_demo(args, root, processes))
    except KeyboardInterrupt:
        return _fail("interrupted; stopping the peers", EXIT_INTERRUPTED)
    except (DemoError, GrapevineError, OSError) as exc:
        return _fail(f"{exc}\n{processes.logs()}", EXIT_FAILED)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        render_report(Console(), report)
    return EXIT_OK


def _missing_keys(model: str) -> list[str]:
    """The environment variables litellm says `model` needs and that are not set."""
    if model == OFFLINE_MODEL:
        return []
    # Imported only here: litellm costs seconds, and the offline demo never needs it.
    from peer.agents.llm import import_litellm

    with contextlib.redirect_stdout(sys.stderr):  # litellm prints provider hints on stdout
        answer = import_litellm().validate_environment(model)
    return [str(key) for key in answer.get("missing_keys", [])]


def _terminate_as_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM takes the Ctrl-C path: asyncio's SIGINT handler cancels the demo while it runs
    (so clients close cleanly); otherwise, or when SIGINT is ignored (a background job), a
    KeyboardInterrupt. Either way the peers are stopped next."""
    on_interrupt = signal.getsignal(signal.SIGINT)
    if callable(on_interrupt) and on_interrupt is not signal.default_int_handler:
        on_interrupt(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _status(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code
