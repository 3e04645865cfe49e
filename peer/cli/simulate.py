"""`grapevine simulate`: run the real protocol on a deterministic simulated network.

Invariants:
- Everything printed is a function of the arguments except the wall-clock time (`wall` in the
  JSON object, "wall time" in the table): the same arguments print the same figures.
- A bad argument is one line on stderr, "grapevine simulate: <what is wrong>", and exit code 2;
  never a traceback.
- Progress goes to stderr, and only when stderr is a terminal, so `--json` output on stdout
  stays machine-readable and logs stay clean.
- With `--tasks`, the per-task costs (`bytes_per_task`, `verifications_per_task`) have the
  membership baseline subtracted: the run is simulated again without tasks
  (`protocol.sim.scenario` explains); the baseline totals are printed too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING, TextIO

from peer.cli.parsing import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Subcommands, add_command
from protocol.config import sim

if TYPE_CHECKING:
    from protocol.sim.figures import Figure
    from protocol.sim.scenario import ScenarioParams

PROG = "grapevine simulate"
PARTITION_AT = 40.0
"""Seconds after the views converged at which `--partition` cuts the network in two."""
AFTER_HEAL = 120.0
"""Seconds simulated after a partition heals when `--duration` is not given."""
DEFAULT_DURATION = 60.0

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class UsageError(Exception):
    """A command-line value that cannot be simulated; the message names the flag."""


def parse_duration(text: str) -> float:
    """Seconds in "30s", "500ms", "2m", "1h" or a plain number of seconds.

    Raises:
        ValueError: not a non-negative duration.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 500ms, 2m)")
    return float(match.group(1)) * _UNIT[match.group(2)]


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(commands: Subcommands) -> None:
    """Add `simulate` to the `grapevine` command line."""
    simulate = add_command(
        commands,
        "simulate",
        "Run many peers' protocol code on a deterministic simulated network (virtual clock, "
        "seeded loss and partitions) and report convergence and failure-detection figures.",
        "  grapevine simulate --nodes 1000 --loss 0.2 --partition 30s\n"
        "  grapevine simulate --nodes 100 --tasks 1000 --replication 2 --json",
    )
    add_arguments(simulate)
    simulate.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `simulate` options to `parser`."""
    parser.add_argument("--nodes", type=int, default=100, help="peers (default 100)")
    parser.add_argument(
        "--loss", type=float, default=0.0, help="probability a message is lost, in [0, 1)"
    )
    parser.add_argument(
        "--duplicate", type=float, default=0.0, help="probability a message arrives twice"
    )
    parser.add_argument(
        "--latency", type=_duration_arg, default=0.0005, help="one-way delay (default 0.5ms)"
    )
    parser.add_argument(
        "--jitter",
        type=_duration_arg,
        default=0.0005,
        help="mean extra random delay, which reorders messages (default 0.5ms)",
    )
    parser.add_argument(
        "--partition",
        type=_duration_arg,
        default=None,
        metavar="DURATION",
        help=f"split the peers 50/50 for DURATION (e.g. 30s), {PARTITION_AT:g} s after they "
        "converged, then heal",
    )
    parser.add_argument("--crashes", type=int, default=0, help="peers to crash (never the seed)")
    parser.add_argument(
        "--pauses", type=int, default=0, help="peers to freeze for less than the detection time"
    )
    parser.add_argument("--broadcasts", type=int, default=3, help="user events to send")
    parser.add_argument(
        "--tasks",
        type=int,
        default=0,
        help="tasks to submit at random live peers over the first half of the run (default 0)",
    )
    parser.add_argument(
        "--replication",
        type=int,
        default=None,
        help="the task plane's replication setting (default "
        f"{sim().tasks.replication}, the configuration's)",
    )
    parser.add_argument(
        "--duration",
        type=_duration_arg,
        default=None,
        help=f"simulated time after the join converged (default {DEFAULT_DURATION:g} s; with "
        f"--partition, until {AFTER_HEAL:g} s after the heal)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def params_from(args: argparse.Namespace) -> ScenarioParams:
    """The scenario the arguments ask for.

    Raises:
        UsageError: an argument is out of range (the message names it).
    """
    if args.nodes < 1:
        raise UsageError("--nodes must be at least 1")
    if not 0.0 <= args.loss < 1.0:
        raise UsageError("--loss must be in [0, 1)")
    if not 0.0 <= args.duplicate <= 1.0:
        raise UsageError("--duplicate must be in [0, 1]")
    for flag in ("crashes", "pauses", "broadcasts", "tasks"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must not be negative")
    if args.crashes + args.pauses > args.nodes - 1:
        raise UsageError("--crashes plus --pauses must be below --nodes (peer 0 is the seed)")
    partition = None
    if args.partition is not None:
        if not args.partition > 0:
            raise UsageError("--partition must be a positive duration")
        if args.nodes < 2:
            raise UsageError("--partition needs at least 2 nodes")
        partition = (PARTITION_AT, float(args.partition), 0.5)
    duration = args.duration
    if duration is None:
        duration = DEFAULT_DURATION
        if partition is not None:
            duration = max(duration, PARTITION_AT + partition[1] + AFTER_HEAL)
    if not duration > 0:
        raise UsageError("--duration must be positive")
    # The simulator is imported when it runs, not when `grapevine` builds its parser.
    from protocol.sim.scenario import ScenarioParams

    config = sim()
    if args.replication is not None:
        if args.replication < 0:
            raise UsageError("--replication must not be negative")
        config = replace(config, tasks=replace(config.tasks, replication=args.replication))
    return ScenarioParams(
        nodes=args.nodes,
        seed=args.seed,
        loss=args.loss,
        duplicate=args.duplicate,
        latency=args.latency,
        jitter=args.jitter,
        duration=float(duration),
        partition=partition,
        crashes=args.crashes,
        pauses=args.pauses,
        broadcasts=args.broadcasts,
        tasks=args.tasks,
        config=config,
    )


class _Progress:
    """Rewrites one stderr line, at most a few times per second."""

    def __init__(self, stream: TextIO, nodes: int) -> None:
        self.stream = stream
        self.nodes = nodes
        self.last = 0.0
        self.shown = False

    def __call__(self, phase: str, done: float, total: float) -> None:
        now = time.monotonic()
        if now - self.last < 0.25:
            return
        self.last = now
        what = {"joining": "joining", "baseline": "baseline without tasks"}.get(phase, "simulating")
        line = f"{what} {self.nodes} peers: {done:.0f}/{total:.0f} s"
        self.stream.write(f"\r{line:<70}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 70 + "\r")
            self.stream.flush()


_ROWS: tuple[tuple[str, str, str], ...] = (
    ("nodes", "peers", ""),
    ("seed", "seed", ""),
    ("loss", "message loss", ""),
    ("duplicate", "message duplication", ""),
    ("converged", "converged at the end", ""),
    ("convergence", "views (strict: every running peer alive)", ""),
    ("join_seconds", "join converged after", "s"),
    ("broadcasts", "broadcasts", ""),
    ("broadcast_p50_s", "  reached 50% after (median)", "s"),
    ("broadcast_p99_s", "  reached 99% after (median)", "s"),
    ("broadcast_p9999_s", "  reached 99.99% after (median)", "s"),
    ("broadcast_all_s", "  reached 100% after (worst)", "s"),
    ("broadcast_missing", "  deliveries missing", ""),
    ("crashes", "crashes", ""),
    ("crash_detection_s", "  detected by all after", "s"),
    ("crash_detection_max_s", "  slowest detection", "s"),
    ("pauses", "pauses", ""),
    ("pause_seconds", "  each lasting", "s"),
    ("partition_s", "partition (50/50)", "s"),
    ("healed_after_s", "  views merged after the heal", "s"),
    ("false_positives", "false positives (live peers declared dead)", ""),
    ("false_suspicions", "false suspicions (refuted)", ""),
    ("messages_per_peer_s", "messages per peer per second", ""),
    ("bytes_per_peer_s", "bytes per peer per second", ""),
    ("messages", "messages sent", ""),
    ("messages_lost", "  lost", ""),
    ("messages_duplicated", "  duplicated", ""),
    ("messages_cut", "  cut by the partition", ""),
    ("tasks", "tasks submitted", ""),
    ("replication", "  replication", ""),
    ("done", "  done (result at the submitting peer)", ""),
    ("lost", "  lost (no result anywhere)", ""),
    ("duplicates", "  duplicate executions", ""),
    ("task_violations", "  invariant violations", ""),
    ("result_p50_s", "  result after (median)", "s"),
    ("result_p99_s", "  result after (p99)", "s"),
    ("verifications_per_task", "  signatures verified per task, all peers", ""),
    ("bytes_per_task", "  bytes sent per task, all peers", ""),
    ("baseline_verifications", "  baseline (no tasks): signatures verified", ""),
    ("baseline_bytes", "  baseline (no tasks): bytes sent", ""),
    ("simulated_seconds", "simulated time", "s"),
    ("events", "simulator events", ""),
    ("signatures_verified", "signatures verified", ""),
    ("cache_hits", "  verifications saved by the cache", ""),
    ("wall", "wall time", "s"),
)

_TASK_ROWS = frozenset(
    {"tasks", "replication", "done", "lost", "duplicates", "task_violations", "result_p50_s",
     "result_p99_s", "verifications_per_task", "bytes_per_task", "baseline_verifications",
     "baseline_bytes"}
)  # fmt: skip
"""Rows shown only when tasks were submitted."""


def _show(value: Figure, unit: str) -> str:
    if value is None:
        return "—" if unit == "" else "not reached"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_show(v, unit) for v in value) or "—"
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") if unit else f"{value:g}"
        return f"{text} {unit}".rstrip()
    if isinstance(value, int):
        return f"{value:,} {unit}".rstrip()
    return f"{value} {unit}".rstrip()


def format_table(figures: dict[str, Figure]) -> str:
    """The figures as two aligned columns, the rows that apply to this run only."""
    skip: set[str] = set()
    if not figures.get("broadcasts"):
        skip |= {k for k, _, _ in _ROWS if k.startswith("broadcast_")}
    if not figures.get("crashes"):
        skip |= {"crash_detection_s", "crash_detection_max_s"}
    if not figures.get("pauses"):
        skip |= {"pause_seconds"}
    if figures.get("partition_s") is None:
        skip |= {"partition_s", "healed_after_s", "messages_cut"}
    if not figures.get("tasks"):
        skip |= _TASK_ROWS
    rows = [(label, _show(figures[k], unit)) for k, label, unit in _ROWS if k in figures]
    rows = [
        (label, text)
        for (k, _, _), (label, text) in zip(
            [r for r in _ROWS if r[0] in figures], rows, strict=True
        )
        if k not in skip
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)


def run(args: argparse.Namespace) -> int:
    """Run `grapevine simulate` with parsed `args`; returns the exit code."""
    try:
        params = params_from(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from protocol.sim.scenario import run_scenario

    progress = _Progress(sys.stderr, params.nodes) if sys.stderr.isatty() else None
    started = time.perf_counter()
    try:
        figures = run_scenario(params, progress)
    except KeyboardInterrupt:
        if progress is not None:
            progress.clear()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if progress is not None:
            progress.clear()
    figures["wall"] = round(time.perf_counter() - started, 3)
    if args.json:
        print(json.dumps(figures))
    else:
        print(format_table(figures))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """`python -m peer.cli.simulate`: the same command outside `grapevine`."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
