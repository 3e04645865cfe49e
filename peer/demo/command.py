"""`grapevine demo`: a local network of agent peers running one delegation tree, end to end.

The demo starts `--peers` real `grapevine agent` processes on 127.0.0.1 under a fresh network
key: peer p1 hosts the boss, every other peer an admin, and every peer a worker. It
submits one job to the boss at p1; the boss delegates sections to admins, admins delegate
parts to workers, and the answers are merged back up. It shows live progress, then the answer,
the task tree (which peer and agent ran each node), token counts and an audit line whose
figures come from the peers' own APIs.

Invariants:
- Every process the demo starts is recorded in `Processes` and ended by pid — SIGTERM, then
  SIGKILL after `STOP_GRACE` seconds — on success, on error, on Ctrl-C and on SIGTERM.
  Nothing else is ever signalled.
- Everything lives in one fresh temporary directory (network key, configs, data directories,
  logs), removed at the end unless `--keep`.
- Peers listen on 127.0.0.1 port 0; the addresses they got come from each agent's ready line,
  so there is no race for a "free" port.
- Every wait is bounded by the `--timeout` deadline; a failure names what was missing and
  shows the tail of every peer's log.
- With `--json`, stdout carries exactly one JSON object; status lines always go to stderr.
- Exit codes: 0 the job finished, 1 it failed or timed out, 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from rich.console import Console

import peer
from peer.agents.ports import AgentOutput
from peer.client import ApiError, GrapevineClient, GrapevineError
from peer.demo.live_view import Json, LiveView, PeerCounts, Report, Snapshot, render_report
from peer.runtime.sealing import encode_key, generate_network_key

PROG = "grapevine demo"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

OFFLINE_MODEL = "grapevine/offline"
DEFAULT_JOB = "Plan a small city's policy on urban heat"
DEFAULT_TIMEOUT = 120.0
BOSS_PARTS = 2
"""Sections the boss splits the job into (one per admin when there are 3 peers)."""
ADMIN_PARTS = 3
"""Parts each admin splits its section into (one per worker task)."""
WORKER_SLOTS = 2
"""Tasks each peer's worker agent runs at once (`max_concurrent`)."""
POLL_INTERVAL = 0.25
"""Seconds between polls of the peers' task lists while the job runs (about 4 Hz)."""
SETTLE_TIME = 10.0
"""Seconds to wait after the root's result for p1 to hear every node's result."""
STOP_GRACE = 5.0
"""Seconds a peer gets to leave the network after SIGTERM before it is killed."""
LOG_TAIL = 12
_READY = re.compile(r"grapevine agent (\S+) listening on (\S+) \(api (\S+)\)")
_STATE_RANK = {"pending": 0, "running": 1, "done": 2, "failed": 2, "cancelled": 2}
_FINAL = ("done", "failed", "cancelled")

BOSS_PROMPT = (
    "You lead a small team writing a city policy document. Split the job into {parts} "
    "sections, delegate each section to an admin with the delegate tool, then merge the "
    "admins' answers into one coherent document with final_answer."
)
ADMIN_PROMPT = (
    "You are responsible for one section of a city policy document. Split your section into "
    "{parts} parts, delegate each part to a worker with the delegate tool, then merge the "
    "workers' answers into the finished section with final_answer."
)
WORKER_PROMPT = (
    "You write one part of a city policy document: two or three short, concrete paragraphs "
    "with measures, owners and costs. Answer directly."
)


class DemoError(Exception):
    """The demo could not finish; the message says what was missing."""


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One agent of the demo team, as written to its peer's `[[agents]]` table."""

    name: str
    role: str
    system: str
    tools: tuple[str, ...]
    max_concurrent: int


def team(peers: int) -> list[list[AgentSpec]]:
    """The agents of each peer: p1 the boss and a worker, the others an admin and a worker.

    A peer serves each role with one agent (peer.agents.spec), so a worker agent takes
    `WORKER_SLOTS` tasks at once instead of there being several worker agents per peer.

    Args:
        peers: how many peers (3 or more).

    Returns:
        One list of agents per peer, p1 first.
    """
    delegating = ("delegate", "final_answer")
    boss_prompt = BOSS_PROMPT.format(parts=BOSS_PARTS)
    admin_prompt = ADMIN_PROMPT.format(parts=ADMIN_PARTS)
    result = []
    for number in range(1, peers + 1):
        lead = (
            AgentSpec(
                "p1-boss",
                "boss",
                f"{boss_prompt}\nDelegate to: admin\nParts: {BOSS_PARTS}",
                delegating,
                1,
            )
            if number == 1
            else AgentSpec(
                f"p{number}-admin",
                "admin",
                f"{admin_prompt}\nDelegate to: worker\nParts: {ADMIN_PARTS}",
                delegating,
                1,
            )
        )
        worker = AgentSpec(
            f"p{number}-worker", "worker", WORKER_PROMPT, ("final_answer",), WORKER_SLOTS
        )
        result.append([lead, worker])
    return result


def config_text(agents: list[AgentSpec], model: str, key_file: Path, data_dir: Path) -> str:
    """The TOML config of one demo peer: its settings and its `[[agents]]`.

    Addresses are not in it: the demo passes them as flags (port 0, then the seed it learned).
    Every model call goes through litellm, the offline model too (it is registered there as a
    custom provider): the demo runs the code path a real model takes. Peers import litellm
    before they start, so its seconds of import do not stall a running peer.
    """
    lines = [
        "[peer]",
        f"network_key_file = {_toml(str(key_file))}",
        f"data_dir = {_toml(str(data_dir))}",
        'profile = "local"',
    ]
    for agent in agents:
        lines += [
            "",
            "[[agents]]",
            f"name = {_toml(agent.name)}",
            f"roles = [{_toml(agent.role)}]",
            f"model = {_toml(model)}",
            f"system = {_toml(agent.system)}",
            f"tools = [{', '.join(_toml(tool) for tool in agent.tools)}]",
            f"max_concurrent = {agent.max_concurrent}",
        ]
    return "\n".join(lines) + "\n"


def _toml(text: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes; json.dumps never writes "\/").
    return json.dumps(text)


# --- processes ---------------------------------------------------------------------------------


@dataclass
class DemoPeer:
    """One `grapevine agent` process of the demo and what the demo learned about it."""

    name: str
    config: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    bind: str = ""
    api: str = ""
    node_id: str = ""

    def log_tail(self, lines: int = LOG_TAIL) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass
class Processes:
    """The peer processes the demo started; `stop()` ends every one of them, by pid."""

    peers: list[DemoPeer] = field(default_factory=list)

    def start(self, peer_: DemoPeer, join: str | None) -> None:
        """Start `peer_`'s agent on 127.0.0.1 port 0, joining through `join` if given."""
        args = [
            sys.executable,
            "-m",
            "peer.cli",
            "agent",
            "--config",
            str(peer_.config),
            "--bind",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ]
        if join is not None:
            args += ["--join", join]
        with peer_.log_path.open("ab") as log:
            peer_.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_child_env(),
                cwd=peer_.config.parent,
            )
        self.peers.append(peer_)

    def pids(self) -> list[int]:
        return [p.process.pid for p in self.peers if p.process is not None]

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every running peer, then SIGKILL those still running after `grace` s.

        A second Ctrl-C while waiting kills the rest at once.
        """
        running = [p.process for p in self.peers if p.process and p.process.poll() is None]
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

    def logs(self) -> str:
        """The tail of every peer's log, for an error message."""
        return "\n".join(f"--- {p.name} log ({p.log_path}):\n{p.log_tail()}" for p in self.peers)


def _child_env() -> dict[str, str]:
    """The peers' environment: this installation importable, no GRAPEVINE_* settings leaking."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPEVINE_")}
    package_root = str(Path(peer.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


async def _wait_ready(peer_: DemoPeer, deadline: float) -> None:
    """Wait for the agent's ready line; record the addresses it bound."""
    while True:
        assert peer_.process is not None
        match = _READY.search(peer_.log_path.read_text(errors="replace"))
        if match is not None:
            peer_.bind, peer_.api = match.group(2), match.group(3)
            return
        if peer_.process.poll() is not None:
            raise DemoError(f"{peer_.name} exited with status {peer_.process.returncode}")
        if time.monotonic() > deadline:
            raise DemoError(f"{peer_.name} did not start listening within --timeout")
        await asyncio.sleep(0.05)


# --- the demo ----------------------------------------------------------------------------------


@dataclass
class _Network:
    """The running peers with one open API client each, and node ids mapped to peer names."""

    peers: list[DemoPeer]
    clients: list[GrapevineClient]
    names: dict[str, str] = field(default_factory=dict)

    def name_of(self, node: str | None) -> str:
        return self.names.get(node or "", node[:10] if node else "?")

    def check_alive(self) -> None:
        for peer_ in self.peers:
            if peer_.process is not None and peer_.process.poll() is not None:
                raise DemoError(
                    f"{peer_.name} exited with status {peer_.process.returncode} during the demo"
                )


async def _demo(args: argparse.Namespace, root: Path, processes: Processes) -> Report:
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
        peers.append(DemoPeer(name, config, root / f"{name}.log"))

    seed = peers[0]
    processes.start(seed, None)
    await _wait_ready(seed, deadline)
    for peer_ in peers[1:]:
        processes.start(peer_, seed.bind)
    _status(f"started {len(peers)} peers pid={','.join(map(str, processes.pids()))} in {root}")
    for peer_ in peers[1:]:
        await _wait_ready(peer_, deadline)

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(GrapevineClient(p.api)) for p in peers]
        network = _Network(peers, clients)
        for peer_, client in zip(peers, clients, strict=True):
            info = await client.self_info()
            peer_.node_id = info["id"]
            network.names[info["id"]] = network.names[info["short_id"]] = peer_.name
        await _wait_network(network, deadline)
        _status(
            f"network ready: {len(peers)} peers see each other and the roles boss, admin, "
            "worker; submitting the job to the boss at p1"
        )
        started = time.monotonic()
        root_id = await _submit(clients[0], args.job, deadline)
        if args.json:
            await _follow(network, root_id, deadline, None)
        else:
            console = Console()
            with LiveView(console, [p.name for p in peers]) as view:
                await _follow(network, root_id, deadline, view)
        seconds = time.monotonic() - started
        return await _report(network, root_id, args.model, seconds, deadline)


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


async def _wait_network(network: _Network, deadline: float) -> None:
    """Wait until every peer sees every peer alive and the boss, admin and worker roles."""
    wanted_ids = {p.node_id for p in network.peers}
    wanted_roles = {"boss", "admin", "worker"}
    last = "no answer yet"
    while True:
        network.check_alive()
        missing = []
        for peer_, client in zip(network.peers, network.clients, strict=True):
            try:
                members = await client.members()
            except GrapevineError as exc:
                missing.append(f"{peer_.name}: {exc}")
                continue
            alive = [m for m in members if m.get("status") == "alive"]
            ids = {m["id"] for m in alive}
            roles = {role for m in alive for role in m.get("roles", [])}
            if not wanted_ids <= ids:
                missing.append(f"{peer_.name} sees {len(wanted_ids & ids)} of the peers alive")
            elif not wanted_roles <= roles:
                missing.append(f"{peer_.name} misses roles {sorted(wanted_roles - roles)}")
        if not missing:
            return
        last = "; ".join(missing)
        if time.monotonic() > deadline:
            raise DemoError(f"the network did not form within --timeout: {last}")
        await asyncio.sleep(POLL_INTERVAL)


async def _follow(network: _Network, root_id: str, deadline: float, view: LiveView | None) -> None:
    """Poll every peer's task list until the root task is final; feed the live view."""
    done_line = -1
    while True:
        network.check_alive()
        tasks = await _merged_tasks(network)
        tree = _descendants(tasks, root_id)
        snapshot = _snapshot(network, tree)
        if view is not None:
            view.update(snapshot)
        elif snapshot.done != done_line:
            done_line = snapshot.done
            _status(f"{snapshot.done} of {snapshot.total} tasks done, {snapshot.running} running")
        root = tasks.get(root_id)
        if root is not None and root["state"] in _FINAL:
            if root["state"] != "done":
                result = root.get("result") or {}
                raise DemoError(
                    f"the job ended {root['state']}: {str(result.get('output', ''))[:300]}"
                )
            return
        if time.monotonic() > deadline:
            raise DemoError(
                f"the job did not finish in time: {snapshot.done} of {snapshot.total} tasks "
                f"done, {snapshot.running} running (raise --timeout?)"
            )
        await asyncio.sleep(POLL_INTERVAL)


async def _merged_tasks(network: _Network) -> dict[str, Json]:
    """Every task any peer knows; each in the most advanced state some peer reports."""
    answers = await asyncio.gather(
        *(client.tasks(limit=1000) for client in network.clients), return_exceptions=True
    )
    merged: dict[str, Json] = {}
    for answer in answers:
        if isinstance(answer, GrapevineError):
            continue  # a slow peer this round; check_alive reports a dead one
        if isinstance(answer, BaseException):
            raise answer
        for task in answer:
            known = merged.get(task["id"])
            if known is None or _rank(task) > _rank(known):
                merged[task["id"]] = task
    return merged


def _rank(task: Json) -> tuple[int, bool]:
    return _STATE_RANK.get(task["state"], 0), task.get("owner") is not None


def _descendants(tasks: dict[str, Json], root_id: str) -> list[Json]:
    """The tasks of the job: the root and every task whose parent chain reaches it."""
    inside: dict[str, bool] = {root_id: True}

    def belongs(task_id: str) -> bool:
        chain = []
        while task_id not in inside:
            chain.append(task_id)
            parent = tasks[task_id].get("parent") if task_id in tasks else None
            if parent is None:
                break
            task_id = parent
        verdict = inside.get(task_id, False)
        for visited in chain:
            inside[visited] = verdict
        return verdict

    return [task for task_id, task in tasks.items() if belongs(task_id)]


def _snapshot(network: _Network, tasks: list[Json]) -> Snapshot:
    counts = {p.name: {"queued": 0, "running": 0, "done": 0, "failed": 0} for p in network.peers}
    unclaimed = 0
    for task in tasks:
        state, owner = task["state"], task.get("owner")
        bucket = {"pending": "queued", "running": "running", "done": "done"}.get(state, "failed")
        name = network.names.get(owner or "")
        if name is None:
            unclaimed += bucket == "queued"
            continue
        counts[name][bucket] += 1
    peers = tuple(PeerCounts(name, **by_state) for name, by_state in counts.items())
    return Snapshot(
        peers=peers,
        unclaimed=unclaimed,
        total=len(tasks),
        done=sum(p.done for p in peers),
        running=sum(p.running for p in peers),
        failed=sum(p.failed for p in peers),
    )


async def _report(
    network: _Network, root_id: str, model: str, seconds: float, deadline: float
) -> Report:
    """The final figures: p1's task tree once it holds every node's result, and the audit.

    The root's result can reach p1 before a grandchild's record or execution log does (they
    spread by gossip from other peers), so the tree is read again until it holds every task
    some peer knows in the job, each final with its executions logged, or `SETTLE_TIME` passed.
    """
    client = network.clients[0]
    settle = min(deadline, time.monotonic() + SETTLE_TIME)
    while True:
        job = {task["id"] for task in _descendants(await _merged_tasks(network), root_id)}
        tree = await client.tree(root_id)
        totals = tree["totals"]
        settled = job <= set(_ids(tree)) and totals["executions"] >= totals["tasks"]
        if (settled and _complete(tree)) or time.monotonic() > settle:
            break
        await asyncio.sleep(POLL_INTERVAL)
    task = await client.task(root_id)
    output = str((task.get("result") or {}).get("output", ""))
    decoded = AgentOutput.decode(output.encode())
    metrics = await asyncio.gather(*(c.metrics() for c in network.clients))
    prompt, completion = int(totals["prompt_tokens"]), int(totals["completion_tokens"])
    audit = {
        "tasks": int(totals["tasks"]),
        "executions": int(totals["executions"]),
        "duplicates": int(totals["duplicates"]),
        "signatures_verified": sum(int(m.get("signatures_verified", 0)) for m in metrics),
        "tokens": prompt + completion,
    }
    return Report(
        answer=decoded.answer if decoded is not None else output,
        tree=_node(tree, network),
        audit=audit,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_microdollars=int(totals.get("cost_microdollars", 0)),
        model=decoded.model if decoded is not None and decoded.model else model,
        seconds=seconds,
    )


def _ids(node: Json) -> list[str]:
    return [node["id"], *(i for child in node.get("children", []) for i in _ids(child))]


def _complete(node: Json) -> bool:
    return node.get("state") in _FINAL and all(_complete(c) for c in node.get("children", []))


def _node(raw: Json, network: _Network) -> Json:
    usage = raw.get("usage") or {}
    return {
        "id": raw["id"],
        "role": raw["role"],
        "state": raw["state"],
        "peer": network.name_of(raw.get("peer")),
        "node": raw.get("peer"),
        "agent": raw.get("agent") or "",
        "tokens": int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0)),
        "children": [_node(child, network) for child in raw.get("children", [])],
    }


# --- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `demo` options to `parser`."""
    parser.add_argument(
        "--model",
        default=OFFLINE_MODEL,
        help=f"litellm model string for every agent (default {OFFLINE_MODEL}, which needs no "
        "network or key), e.g. openai/gpt-4o-mini with OPENAI_API_KEY set",
    )
    parser.add_argument(
        "--job", default=DEFAULT_JOB, metavar="TEXT", help=f"the job (default: {DEFAULT_JOB!r})"
    )
    parser.add_argument(
        "--peers", type=int, default=3, metavar="N", help="peers to start (default 3, at least 3)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long (default {DEFAULT_TIMEOUT:.0f})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object {answer, tree, audit} instead of the live view",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (configs, data directories, logs) afterwards",
    )


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
    processes = Processes()
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


def _run(args: argparse.Namespace, root: Path, processes: Processes) -> int:
    try:
        report = asyncio.run(_demo(args, root, processes))
    except KeyboardInterrupt:
        return _fail("interrupted; stopping the peers", EXIT_INTERRUPTED)
    except DemoError as exc:
        return _fail(f"{exc}\n{processes.logs()}", EXIT_FAILED)
    except (GrapevineError, OSError) as exc:
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
