"""Takeovers that resume, measured: how many model calls a SIGKILL in the middle of an agent's
run costs again (issue 13, "Takeovers resume").

The scenario (also the e2e test tests/e2e/test_agent_resume.py): three real peers on
127.0.0.1 serve the `rounds` agent, the offline model with `Repeat: work_round 4` (four rounds
of a tool, then the answer: five model calls) and `Think: THINK` (each call takes that long).
A task is submitted at the first peer; its owner's watch stream is followed to the third
`model-call` step (plus `--kill-delay` seconds), the owner is SIGKILLed, and a survivor's task
tree is read once the result of epoch 2 is there: model calls by the first owner (the one in
flight at the kill included), by the second, answers resumed, calls repeated and their tokens
(counted from the task's checkpoints, `peer.agents.model_calls`).

Each run starts a fresh cluster (a killed peer would otherwise come back with a claim of its
own to resume). The runs stop at `--runs` or once `--time-limit` seconds have passed; the
table ends with the total and the median of each column.

Every process is started by a `LocalCluster` and ended by pid when the run ends.

    python scripts/bench_resume.py              # 20 runs
    python scripts/bench_resume.py --runs 5 --in-call   # land the kill in call 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from peer.agents.ports import AgentOutput  # noqa: E402
from scripts.local_cluster import (  # noqa: E402
    GrapevineError,
    LocalCluster,
    Peer,
    wait_for,
    wait_ready,
    wait_views,
)

THINK = 0.6
"""Seconds each model call takes."""
ROUNDS = 4
CALLS = ROUNDS + 1
KILL_AFTER = 3
PEERS = 3
SURVIVE_LIMIT = 45.0
"""Seconds from the kill to the result of epoch 2 before a run fails."""
AGENT = f"""
[[agents]]
name = "rounds"
roles = ["rounds"]
system = "You work in rounds.\\nRepeat: work_round {ROUNDS}\\nThink: {THINK}"
tools = ["scripts.bench_resume:work_round", "final_answer"]

[llm]
offline_via_litellm = false
"""
"""Each peer's config: the offline model called directly (no litellm import per process)."""


def work_round(round: int) -> str:
    """Do one round of the work.

    Args:
        round: which round, from 1.
    """
    return f"round {round} done"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run of the scenario measured."""

    first_calls: int
    """Model calls the first owner (epoch 1) made, the one in flight at the kill included."""
    second_calls: int
    resumed: int
    """Answers the second owner took over from the first's checkpoints."""
    repeated: int
    repeated_tokens: int
    seconds: float
    """From the kill to the result at a survivor."""


def start_peers(cluster: LocalCluster) -> list[Peer]:
    """Start `PEERS` peers serving the `rounds` agent, all joining through the first."""
    peers: list[Peer] = []
    for i in range(PEERS):
        config = cluster.root / f"p{i}.toml"
        config.write_text(AGENT)
        peers.append(cluster.add(join=peers[:1], extra_args=("--config", str(config))))
    return peers


async def wait_rounds_known(peers: list[Peer]) -> None:
    """Wait until every peer is up, sees every other alive and sees every peer serve `rounds`."""
    await wait_ready(peers, timeout=20)
    await wait_views(peers, {p.node_id: "alive" for p in peers}, timeout=15)

    async def served() -> tuple[bool, object]:
        counts = {}
        for peer in peers:
            async with peer.client() as client:
                members = await client.members()
            counts[peer.name] = sum(
                1 for m in members if m["status"] == "alive" and "rounds" in m["roles"]
            )
        return all(c == len(peers) for c in counts.values()), counts

    await wait_for("the rounds role known everywhere", served, timeout=15)


async def run_scenario(
    cluster: LocalCluster,
    peers: list[Peer],
    request: str,
    kill_delay: float = 0.0,
    in_call: bool = False,
) -> Outcome:
    """Submit a `rounds` task at the first peer, kill its owner `kill_delay` seconds after its
    third model call (with `in_call`, once a survivor holds the start of its fourth, so the
    kill lands while that call is in flight), and measure the takeover from a survivor's
    task tree.

    Raises:
        AssertionError: the result is not epoch 2's at a survivor, or not the whole answer.
        TimeoutError: no result within `SURVIVE_LIMIT` of the kill.
    """
    async with peers[0].client() as client:
        task_id: str = (await client.submit("rounds", request))["id"]
    owners: list[str] = []

    async def claimed() -> tuple[bool, object]:
        async with peers[0].client() as client:
            task = await client.task(task_id)
        if task["owner"] is not None:
            owners.append(task["owner"])
        return bool(owners), task["owner"]

    await wait_for("the task claimed", claimed, timeout=10, interval=0.02)
    victim = next(p for p in peers if p.node_id == owners[0])
    survivors = [p for p in peers if p is not victim]

    async def third_call() -> None:
        seen: list[str] = []
        async with victim.client() as client:
            async for event in client.watch_task(task_id):
                seen.append(event.get("step") or event["type"])
                if seen.count("model-call") == KILL_AFTER:
                    return
        raise AssertionError(f"{victim.name}'s watch stream ended before the kill: {seen}")

    await asyncio.wait_for(third_call(), timeout=KILL_AFTER * THINK + 10)
    if kill_delay:
        await asyncio.sleep(kill_delay)
    if in_call:
        # A fixed delay is not enough on a loaded machine: the call's start is a checkpoint
        # that reaches the survivors a little later, and without it nothing was in flight.
        async def next_call_known() -> tuple[bool, object]:
            async with survivors[0].client() as client:
                tree = await client.tree(task_id)
            calls = {run["epoch"]: run["model_calls"] for run in tree["model_calls_by_run"]}
            return calls.get(1, 0) > KILL_AFTER, calls

        await wait_for("the 4th call's start at a survivor", next_call_known, 10, 0.02)
    cluster.kill(victim)
    killed_at = time.monotonic()

    last: object = None
    while True:
        try:
            async with survivors[0].client() as client:
                task = await client.task(task_id)
                tree = await client.tree(task_id)
            runs = {run["epoch"]: run for run in tree["model_calls_by_run"]}
            if task["result"] is not None and 2 in runs and runs[2]["model_calls"] >= 2:
                break
            last = {"state": task["state"], "runs": runs}
        except GrapevineError as exc:
            last = exc
        if time.monotonic() - killed_at > SURVIVE_LIMIT:
            raise TimeoutError(f"no result of epoch 2 within {SURVIVE_LIMIT:.0f} s: {last!r}")
        await asyncio.sleep(0.1)
    seconds = time.monotonic() - killed_at

    result = task["result"]
    assert result["outcome"] == "ok" and result["epoch"] == 2, result
    assert result["owner"] in {p.node_id for p in survivors}, result
    output = AgentOutput.decode(result["output"].encode())
    assert output is not None and output.steps == CALLS, result
    rounds = "; ".join(f"round {i} done" for i in range(1, ROUNDS + 1))
    assert output.answer.endswith(f" Rounds: {rounds}."), output.answer
    assert sorted(runs) == [1, 2], runs
    first, second = runs[1], runs[2]
    assert first["owner"] == victim.node_id and second["owner"] == result["owner"], runs
    return Outcome(
        first["model_calls"],
        second["model_calls"],
        second["model_calls_resumed"],
        tree["model_calls_repeated"],
        tree["repeated_tokens"],
        seconds,
    )


def one_run(root: Path, index: int, kill_delay: float, in_call: bool) -> Outcome:
    """The scenario once, in a fresh cluster under `root`."""
    with LocalCluster(root / f"run{index}", profile="local", extra_args=()) as cluster:
        peers = start_peers(cluster)

        async def scenario() -> Outcome:
            await wait_rounds_known(peers)
            request = f"Plan garden {index}"
            return await run_scenario(cluster, peers, request, kill_delay, in_call)

        return asyncio.run(scenario())


HEADER = ("run", "calls by 1st owner", "calls by 2nd", "resumed", "repeated", "tokens repeated")


def table(outcomes: list[Outcome]) -> str:
    """The runs, then the total and median of each column."""
    rows = [(str(i), *(str(v) for v in astuple(o)[:5])) for i, o in enumerate(outcomes, 1)]
    if outcomes:
        columns = list(zip(*(astuple(o)[:5] for o in outcomes), strict=True))
        rows.append(("total", *(str(sum(c)) for c in columns)))
        rows.append(("median", *(f"{statistics.median(c):g}" for c in columns)))
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(cell.rjust(w) for cell, w in zip(HEADER, widths, strict=True))
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20, help="runs of the scenario (20)")
    parser.add_argument(
        "--time-limit", type=float, default=900.0, help="seconds before no new run starts (900)"
    )
    parser.add_argument(
        "--kill-delay",
        type=float,
        default=0.0,
        help="seconds between the third model call and the kill (0)",
    )
    parser.add_argument(
        "--in-call",
        action="store_true",
        help="kill once a survivor holds the start of the fourth model call (in flight)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    outcomes: list[Outcome] = []
    failures = 0
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as scratch:
        for index in range(1, args.runs + 1):
            if time.monotonic() - started > args.time_limit:
                print(f"time limit: {len(outcomes)} of {args.runs} runs done", flush=True)
                break
            try:
                outcome = one_run(Path(scratch), index, args.kill_delay, args.in_call)
            except (AssertionError, TimeoutError, GrapevineError) as exc:
                failures += 1
                print(f"run {index} failed: {exc}", flush=True)
                continue
            outcomes.append(outcome)
            print(f"run {index}: {outcome}", flush=True)
    print(table(outcomes))
    took = [o.seconds for o in outcomes]
    if took:
        print(f"kill to result: median {statistics.median(took):.1f} s, max {max(took):.1f} s")
    print(f"{len(outcomes)} runs, {failures} failed, {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
