"""A Python role's durable steps survive the SIGKILL of its owner (issue 13, "Takeovers
resume", for roles written in Python; `peer.python_api.steps`).

Three `grapevine agent --handlers stepper` processes on 127.0.0.1 serve a role of three steps,
each a second long, that log their pid to a file when their function returns. Once the owner
has finished two steps, it is SIGKILLed; the new owner (epoch 2) replays those two from the
checkpoints the replicas hold and runs only the third. The task's answer is whole and each
step's function ran once.

Every wait is bounded; the cluster ends every process it started, by pid.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from scripts.local_cluster import LocalCluster, Peer, wait_for
from tests.e2e.test_python_roles import wait_role

pytestmark = pytest.mark.e2e

STEPPER = """import asyncio
import os
from pathlib import Path

from peer import role

LOG = Path(__file__).with_name("steps.log")


@role("stepper")
async def stepper(task):
    done = []
    for name in ("one", "two", "three"):

        async def work(name=name):
            await asyncio.sleep(1.0)
            with LOG.open("a") as log:
                log.write(f"{os.getpid()} {name}\\n")
            return name

        done.append(await task.step(name, work))
    return " ".join(done)
"""


def _logged(root: Path) -> list[tuple[int, str]]:
    path = root / "steps.log"
    if not path.exists():
        return []
    return [
        (int(pid), name)
        for pid, name in (line.split() for line in path.read_text().split("\n") if line)
    ]


def test_a_takeover_replays_the_steps_its_dead_owner_finished(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    root.mkdir()
    (root / "stepper.py").write_text(STEPPER)
    with LocalCluster(root, profile="local") as cluster:
        first = cluster.add(extra_args=("--handlers", "stepper"))
        peers = [first] + [
            cluster.add(join=[first], extra_args=("--handlers", "stepper")) for _ in range(2)
        ]

        async def scenario() -> None:
            await wait_role(peers, "stepper")
            async with peers[0].client() as client:
                task_id = (await client.submit("stepper", "go"))["id"]

            async def two_done() -> tuple[bool, object]:
                seen = _logged(root)
                return [name for _, name in seen] == ["one", "two"], seen

            await wait_for("the owner's first two steps", two_done, timeout=20)
            await asyncio.sleep(0.3)  # the second step's checkpoint reaches the replicas
            [owner_pid] = {pid for pid, _ in _logged(root)}
            [owner] = [p for p in peers if p.pid == owner_pid]
            cluster.kill(owner)
            survivor: Peer = next(p for p in peers if p is not owner)
            deadline = time.monotonic() + 60
            async with survivor.client() as client:
                while (task := await client.task(task_id))["state"] not in ("done", "failed"):
                    assert time.monotonic() < deadline, f"no result after the kill: {task}"
                    await asyncio.sleep(0.2)
            assert task["state"] == "done", task
            assert task["epoch"] == 2, task
            assert task["result"]["output"] == "one two three", task
            logged = _logged(root)
            assert [name for _, name in logged] == ["one", "two", "three"], logged
            assert logged[2][0] != owner_pid, "the new owner ran the third step"
            # The new owner's steps are in its tree as they happened: two replayed, one run;
            # at the origin also the two the dead owner told it of (decision 75).
            [new_owner] = [p for p in peers if p.node_id == task["owner"]]
            async with new_owner.client() as client:
                progress = (await client.tree(task_id))["progress"]
            heard = 2 if new_owner is peers[0] else 0
            assert progress["step"] == 3 + heard, progress
            assert progress["last"]["step"] == "step", progress
            assert progress["last"]["detail"] == {"name": "three", "replayed": False}, progress

        asyncio.run(scenario())
