"""One seeded task campaign: a small network runs tasks through faults, then is checked.

Timeline (virtual seconds):
1. 0..JOIN: every peer starts and joins through peer 0; then each serves `ROLE` with 1..3
   slots. T0 is when every peer sees every other one serving (checked every half second): the
   preferred owner is only unique where views agree (docs/design.md section 5).
2. T0 + 1..T0 + 1 + WINDOW: tasks are submitted at random running peers at random times;
   the faults of the mix happen in the same window (crashes restart 5..20 s later, pauses last
   below the detection time, partitions cut off 1..n/2 peers for 15..40 s). Forged claims and
   results are injected at random peers along the way.
3. Everything heals by T0 + SETTLE; the run goes on for QUIESCE seconds so push-pull repairs
   what gossip lost, then `TaskChecker.report` checks every invariant.

Invariants: all randomness comes from the seed (scenario choices from `random.Random` seeded
with the mix and seed, the rest from the simulator and the runner), so a seed replays exactly.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace

from protocol.codec import encode_message
from protocol.config import GossipConfig, NodeConfig, lan, suspicion_min_timeout
from protocol.envelope import encode_envelope
from protocol.sim.network import LinkModel
from protocol.sim.simulator import Simulator
from protocol.sim.task_checker import TaskChecker, TaskReport
from protocol.sim.task_runner import ROLE, TaskRunner, restart
from protocol.tasks.messages import DOMAIN_CLAIM, DOMAIN_RESULT, Claim, Result

JOIN = 4.0
VIEW_TIMEOUT = 60.0
WINDOW = 30.0
SETTLE = 75.0
QUIESCE = 60.0


@dataclass(frozen=True, slots=True)
class FaultMix:
    """Which faults a campaign run suffers."""

    name: str
    loss: float = 0.0
    duplicate: float = 0.0
    jitter: float = 0.0005
    pauses: int = 0
    crashes: int = 0
    partition: bool = False


MIXES = (
    FaultMix("clean"),
    FaultMix("loss+dup+reorder", loss=0.2, duplicate=0.1, jitter=0.02),
    FaultMix("pauses", pauses=3),
    FaultMix("crashes", crashes=2),
    FaultMix("partition", partition=True),
    FaultMix("everything", loss=0.2, duplicate=0.1, jitter=0.02, pauses=2, crashes=2,
             partition=True),
)  # fmt: skip
"""The fault mixes of the campaign; run `seed` uses MIXES[seed % len(MIXES)]."""


def campaign_config() -> NodeConfig:
    """LAN timings with push-pull and reconnect every 10 s, so short runs converge."""
    return replace(lan(), gossip=GossipConfig(push_pull_interval=10.0, reconnect_interval=10.0))


def run_campaign(seed: int, mix: FaultMix | None = None) -> tuple[TaskReport, bool]:
    """Run one seeded campaign; returns its report and whether any peer was declared dead
    or crashed (the only way, by docs/design.md section 5, a task may run twice)."""
    mix = mix or MIXES[seed % len(MIXES)]
    rng = random.Random(f"task-campaign:{mix.name}:{seed}")
    n = rng.randint(5, 8)
    config = campaign_config()
    link = LinkModel(latency=0.0005, jitter=mix.jitter, loss=mix.loss, duplicate=mix.duplicate)
    sim = Simulator(n, seed, config, link)
    runner = TaskRunner(sim)
    checker = TaskChecker(sim, runner)
    slots = [rng.randint(1, 3) for _ in range(n)]

    sim.start_all(0.05)
    sim.run_until(JOIN)
    for p in sim.running():
        assert p.node is not None
        sim.apply(p.index, p.node.serve(sim.now, (ROLE,), slots[p.index]))
    everyone = {p.signer.node_id for p in sim.peers}
    while sim.now < JOIN + VIEW_TIMEOUT and any(
        p.node is None or set(p.node.capable(ROLE)) != everyone for p in sim.peers
    ):
        sim.run_until(sim.now + 0.5)
    submit_at = sim.now + 1.0
    settle_at = sim.now + SETTLE

    def submit(key: str) -> None:
        up = sim.running()
        if not up:
            return
        p = up[rng.randrange(len(up))]
        assert p.node is not None
        fx, task_id = p.node.submit(
            sim.now, ROLE, key.encode(), idempotency_key=key, priority=rng.randrange(3)
        )
        checker.submitted.setdefault(task_id, sim.now)
        sim.apply(p.index, fx)

    def forge() -> None:
        up = sim.running()
        if len(up) < 3 or not checker.submitted:
            return
        victim, liar, target = rng.sample(up, 3)
        task_id = sorted(checker.submitted)[rng.randrange(len(checker.submitted))]
        owner = victim.signer
        c = Claim(task_id, owner.public_key, 0, 1, b"", owner.node_id)
        r = Result(task_id, 1, owner.public_key, "ok", b"forged", (0, 0, 0), b"", owner.node_id)
        c = replace(c, sig=liar.signer.sign(DOMAIN_CLAIM, c.signed_payload()))
        r = replace(r, sig=liar.signer.sign(DOMAIN_RESULT, r.signed_payload()))
        checker.forged.update((c.sig, r.sig))
        data = encode_envelope(
            liar.signer.node_id, liar.addr, [encode_message(c), encode_message(r)]
        )
        assert target.node is not None
        sim.apply(target.index, target.node.handle(sim.now, liar.addr, data))

    tasks = rng.randint(20, 40)
    for k in range(tasks):
        sim.at(submit_at + rng.uniform(0, WINDOW), functools.partial(submit, f"task-{seed}-{k}"))
    for _ in range(3):
        sim.at(submit_at + rng.uniform(5, WINDOW), forge)

    victims = rng.sample(range(1, n), min(n - 1, mix.crashes + mix.pauses))
    for i in victims[: mix.crashes]:
        at = submit_at + rng.uniform(2, WINDOW)
        down_for = rng.uniform(5, 20)

        def crash(i: int = i) -> None:
            runner.crashed(i)
            checker.crashed(i)
            sim.crash(i)

        sim.at(at, crash)
        sim.at(at + down_for, functools.partial(restart, sim, i, (ROLE,), slots[i]))
    pause = 0.75 * suspicion_min_timeout(config.swim.suspicion_mult, n, config.swim.probe_interval)
    for i in victims[mix.crashes :]:
        sim.at(submit_at + rng.uniform(2, WINDOW), functools.partial(sim.pause, i, pause))
    if mix.partition:
        cut = rng.sample(range(n), rng.randint(1, n // 2))
        rest = [i for i in range(n) if i not in cut]
        start = submit_at + rng.uniform(2, WINDOW / 2)

        def cut_off() -> None:
            sim.partition([cut, rest])
            checker.partitioned([cut, rest])

        def heal() -> None:
            sim.heal()
            checker.healed()

        sim.at(start, cut_off)
        sim.at(min(start + rng.uniform(15, 40), settle_at), heal)

    sim.run_until(settle_at + QUIESCE)
    report = checker.report()
    return report, bool(checker.downs or checker.crashes)
