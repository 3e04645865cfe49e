"""The store under a soak's write pattern: does a commit cost the same on a full store as on an
empty one? (issue 10, decision 83)

Drives `peer.runtime.store.Store` alone, in this process, as a replica of a steady task load
writes it: each task's record, claim and result (sizes of bench_soak's echo tasks), a few tasks
per commit as the group commit batches them; once `--live` tasks are held, each new task
compacts the oldest (forget its objects, write its tombstone), and once `--tombstones` are held
the oldest tombstone is forgotten. Task ids are SHA-256 digests, as the protocol makes them.

Prints, per window of `--window` tasks, the CPU and wall time per task and the database's
size, then the last windows against the first. Run it against two checkouts to compare store
layouts (`PYTHONPATH=/path/to/other/checkout`). Bounded by `--tasks`; its data goes to a
temporary directory that is removed at the end. Usage::

    python scripts/bench_store.py                  # 120,000 tasks, about a minute
    python scripts/bench_store.py --tasks 30000    # a check
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from peer.runtime.store import DB_NAME, Store
from protocol.effects import Persist, PersistKind

RECORD_BYTES, CLAIM_BYTES, RESULT_BYTES, TOMBSTONE_BYTES = 700, 240, 260, 90
"""Sizes of an echo task's stored objects, as a soak peer's data directory shows them."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=120_000, help="tasks written in all")
    parser.add_argument("--live", type=int, default=20_000, help="tasks held before compaction")
    parser.add_argument("--tombstones", type=int, default=20_000, help="tombstones held")
    parser.add_argument("--batch", type=int, default=6, help="tasks per commit")
    parser.add_argument("--window", type=int, default=10_000, help="tasks per row of the table")
    args = parser.parse_args()
    for name in ("tasks", "live", "tombstones", "batch", "window"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        rows = run(Path(tmp), args)
    print(f"{'tasks':>8} {'cpu us/task':>12} {'wall us/task':>13} {'db MB':>7}")
    for done, cpu, wall, size in rows:
        print(f"{done:8,d} {cpu:12.1f} {wall:13.1f} {size:7.1f}")
    if len(rows) >= 4:
        steady = statistics.median(cpu for _, cpu, _, _ in rows[-3:])
        print(
            f"cpu per task: first window {rows[0][1]:.1f} us, median of the last three "
            f"{steady:.1f} us ({steady / rows[0][1]:.2f}x)"
        )
    return 0


def run(data_dir: Path, args: argparse.Namespace) -> list[tuple[int, float, float, float]]:
    live: deque[bytes] = deque()
    stones: deque[bytes] = deque()
    rows = []
    payload = os.urandom(RECORD_BYTES)
    with Store.open(data_dir) as store:
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, args.tasks, args.batch):
            batch: list[Persist] = []
            for n in range(start, min(start + args.batch, args.tasks)):
                task_id = hashlib.sha256(n.to_bytes(8, "big")).digest()
                run_key = task_id + (1).to_bytes(8, "big") + payload[:32] + (1).to_bytes(8, "big")
                batch += [
                    Persist(PersistKind.TASK, task_id, payload),
                    Persist(PersistKind.CLAIM, run_key, payload[:CLAIM_BYTES]),
                    Persist(PersistKind.RESULT, run_key, payload[:RESULT_BYTES]),
                ]
                live.append(task_id)
                if len(live) > args.live:
                    old = live.popleft()
                    batch += [
                        Persist(PersistKind.FORGET_TASK, old, b""),
                        Persist(PersistKind.TOMBSTONE, old, payload[:TOMBSTONE_BYTES]),
                    ]
                    stones.append(old)
                if len(stones) > args.tombstones:
                    batch.append(Persist(PersistKind.FORGET_TOMBSTONE, stones.popleft(), b""))
            store.put_many(batch)
            done = min(start + args.batch, args.tasks)
            if done % args.window < args.batch or done == args.tasks:
                now_cpu, now_wall = time.process_time(), time.perf_counter()
                count = done - (rows[-1][0] if rows else 0)
                size = sum(
                    f.stat().st_size for f in data_dir.iterdir() if f.name.startswith(DB_NAME)
                )
                rows.append(
                    (
                        done,
                        1e6 * (now_cpu - cpu) / count,
                        1e6 * (now_wall - wall) / count,
                        size / 1e6,
                    )
                )
                cpu, wall = now_cpu, now_wall
    return rows


if __name__ == "__main__":
    sys.exit(main())
