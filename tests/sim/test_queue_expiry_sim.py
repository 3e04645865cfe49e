"""Queued tasks whose origins crash end `failed` at every holder (decision 58), simulated with
message loss, duplication and reordering.

Nobody serves the tasks' role, so no peer claims them; their origins crash right after
submitting, so no origin ends them. Every second each running peer does what the host's
`QueueTimeouts.expire_held` does (`Node.expire` once the deadline and the grace passed); only
the arbiter in its view acts. At the end every running peer holding one of the tasks holds it
`failed`, and every running member of its home holds it.
"""

from __future__ import annotations

from peer.runtime.queue_timeouts import HOME_GRACE
from protocol.sim.network import LinkModel
from protocol.sim.simulator import Simulator
from protocol.tasks.placement import top_by_score
from tests.sim.test_scenarios import joined

PEERS = 12
ORIGINS = (0, 1, 2, 3)
QUEUE_TIMEOUT = 5.0


def expire_due(sim: Simulator, created: dict[bytes, float]) -> None:
    """Each running peer ends the queued tasks whose deadline and grace passed, as arbiter."""
    for p in sim.running():
        assert p.node is not None
        for st in p.node.open_tasks():
            due = created.get(st.task_id)
            if due is not None and sim.now >= due + QUEUE_TIMEOUT + HOME_GRACE:
                fx, _ = p.node.expire(sim.now, st.task_id, "queue timeout: no live peer")
                sim.apply(p.index, fx)
    sim.at(sim.now + 1.0, lambda: expire_due(sim, created))


def test_queued_tasks_whose_origins_crash_end_failed_at_every_holder_despite_loss() -> None:
    sim, checker = joined(PEERS, seed=58, link=LinkModel(jitter=0.02, loss=0.2, duplicate=0.1))
    created: dict[bytes, float] = {}
    for origin in ORIGINS:
        for k in range(2):
            node = sim.peers[origin].node
            assert node is not None
            fx, task_id = node.submit(
                sim.now,
                "nobody-serves-this",
                b"x",
                idempotency_key=f"queued-{origin}-{k}",
                queue_timeout=QUEUE_TIMEOUT,
            )
            sim.apply(origin, fx)
            created[task_id] = sim.now
    sim.run_until(sim.now + 1.0)  # the records reach their homes (most of them: 20% loss)
    for origin in ORIGINS:
        checker.crash(origin)
    expire_due(sim, created)
    sim.run_until(sim.now + 120.0)

    alive = {p.signer.node_id: p for p in sim.running()}
    everyone = tuple(p.signer.node_id for p in sim.peers)
    for task_id in created:
        holders = [p for p in alive.values() if p.node and p.node.task(task_id) is not None]
        states = {p.index: p.node.task(task_id).state for p in holders if p.node}  # type: ignore[union-attr]
        assert states and set(states.values()) == {"failed"}, (task_id.hex()[:8], states)
        home = [n for n in top_by_score(task_id, everyone, 3) if n in alive]
        assert all(alive[n].node.task(task_id) is not None for n in home)  # type: ignore[union-attr]
