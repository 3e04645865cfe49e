"""The long task campaign: `--seeds N` seeded runs (protocol/sim/task_campaign.py) through every
fault mix, with a table of totals per mix. Progress goes to stderr, the table to stdout.

    .venv/bin/python scripts/bench_claims.py --seeds 5000

Exit status 1 if any run broke an invariant (the violations are printed).
"""

from __future__ import annotations

import argparse
import sys
import time

from protocol.sim.task_campaign import MIXES, run_campaign
from protocol.sim.task_checker import TaskReport

COLUMNS = ("tasks", "executions", "duplicates", "flips", "fenced", "takeovers", "lost")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5000, help="runs (default 5000)")
    parser.add_argument("--first", type=int, default=0, help="first seed (default 0)")
    args = parser.parse_args(argv)

    totals = {mix.name: TaskReport() for mix in MIXES}
    runs = dict.fromkeys(totals, 0)
    bad: list[tuple[int, str, str]] = []
    started = time.monotonic()
    for k, seed in enumerate(range(args.first, args.first + args.seeds), start=1):
        mix = MIXES[seed % len(MIXES)]
        report, _ = run_campaign(seed)
        totals[mix.name].add(report)
        runs[mix.name] += 1
        bad.extend((seed, mix.name, v) for v in report.violations)
        if k % 50 == 0 or k == args.seeds:
            rate = k / (time.monotonic() - started)
            print(f"{k}/{args.seeds} runs, {rate:.1f} runs/s, {len(bad)} violations",
                  file=sys.stderr)  # fmt: skip

    header = ("mix", "runs", *COLUMNS, "violations")
    rows = [
        (name, str(runs[name]), *(str(getattr(t, c)) for c in COLUMNS), str(len(t.violations)))
        for name, t in totals.items()
    ]
    grand = TaskReport()
    for t in totals.values():
        grand.add(t)
    rows.append(
        ("total", str(sum(runs.values())), *(str(getattr(grand, c)) for c in COLUMNS),
         str(len(grand.violations)))
    )  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    for seed, name, violation in bad[:50]:
        print(f"seed {seed} ({name}): {violation}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
