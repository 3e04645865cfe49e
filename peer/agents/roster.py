"""The agents a peer hosts, and which of them runs each execution of a role.

Theory of operation. An execution of a role is given to an agent serving it with a free
`max_concurrent` slot, least busy first; when all of them are busy it waits here for one (the
node may start more work than fits: a standby's claim or a takeover does not wait for a
slot). Every release, suspension or change of agents wakes the waiters to look again.

Invariants:
- A suspended execution (waiting on its children) holds no slot of its agent; on resume it
  takes the slot back at once, even beyond `max_concurrent` (it never waits, so a tree cannot
  deadlock). Each agent keeps its account in the protocol's `SlotLedger`, the one home of that
  rule.
- Agent names are unique; an agent running or suspended executions is never removed.
- An execution whose role no agent serves any more fails at once instead of waiting forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from peer.agents import pool
from peer.agents.runtime import AgentRuntime
from peer.agents.spec import AgentSpec
from protocol.slots import SlotLedger


@dataclass(slots=True)
class HostedAgent:
    """One hosted agent and what it is doing."""

    spec: AgentSpec
    runtime: AgentRuntime
    spawned: bool
    """Added at runtime (a spawn task or the pool); declared agents never retire."""
    idle_since: float
    slots: SlotLedger[bytes, None] = field(default_factory=SlotLedger)
    """Executions it runs, suspended ones (holding no agent slot) included."""


class Roster:
    """The hosted agents, by name, and the executions waiting for one of them.

    Args:
        clock: monotonic seconds.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.agents: dict[str, HostedAgent] = {}
        self.waiting: dict[bytes, tuple[str, float]] = {}
        """Executions waiting for a free agent: task id -> (role, since)."""
        self._owner: dict[bytes, HostedAgent] = {}
        self._changed = asyncio.Event()

    def __iter__(self) -> Iterator[HostedAgent]:
        return iter(self.agents.values())

    def add(self, agent: HostedAgent) -> None:
        """Host one more agent.

        Raises:
            ValueError: the name is taken.
        """
        if agent.spec.name in self.agents:
            raise ValueError(f"agent {agent.spec.name!r} already exists on this peer")
        self.agents[agent.spec.name] = agent
        self.notify()

    def retire(self, name: str) -> bool:
        """Remove a spawned agent that runs nothing; return whether it was removed."""
        agent = self.agents.get(name)
        if agent is None or not agent.spawned or agent.slots.running:
            return False
        del self.agents[name]
        self.notify()
        return True

    def served(self) -> set[str]:
        """The roles some agent serves."""
        return {role for agent in self.agents.values() for role in agent.spec.roles}

    @property
    def spawned(self) -> int:
        """Agents added at runtime and not retired."""
        return sum(1 for agent in self.agents.values() if agent.spawned)

    @property
    def slots(self) -> int:
        """The sum of the agents' `max_concurrent`."""
        return sum(agent.spec.max_concurrent for agent in self.agents.values())

    async def acquire(self, role: str, task_id: bytes) -> HostedAgent:
        """Wait for a free agent of `role` and take its slot for `task_id`.

        Raises:
            RuntimeError: no agent serves `role` any more.
        """
        try:
            while True:
                serving = [a for a in self.agents.values() if role in a.spec.roles]
                if not serving:
                    raise RuntimeError(f"no agent of role {role!r} on this peer any more")
                free = [a for a in serving if a.slots.has_room(a.spec.max_concurrent)]
                if free:
                    agent = min(free, key=lambda a: a.slots.used())
                    agent.slots.start(task_id, None)
                    self._owner[task_id] = agent
                    return agent
                self.waiting.setdefault(task_id, (role, self.clock()))
                changed = self._changed
                await changed.wait()
        finally:
            self.waiting.pop(task_id, None)

    def release(self, agent: HostedAgent, task_id: bytes) -> None:
        """The execution of `task_id` ended: free its slot."""
        agent.slots.finish(task_id)
        self._owner.pop(task_id, None)
        if not agent.slots.running:
            agent.idle_since = self.clock()
        self.notify()

    def suspend(self, task_id: bytes) -> None:
        """The execution waits on its children: its agent's slot is free meanwhile."""
        agent = self._owner.get(task_id)
        if agent is not None and agent.slots.suspend(task_id):
            self.notify()

    def resume(self, task_id: bytes) -> None:
        """The execution runs again: it takes its agent's slot back without waiting."""
        agent = self._owner.get(task_id)
        if agent is not None:
            agent.slots.resume(task_id)

    def notify(self) -> None:
        """Wake every waiting execution to look for a free agent again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def pool_members(self) -> list[pool.PoolMember]:
        """The agents as the pool decision sees them."""
        return [
            pool.PoolMember(
                a.spec.name, a.spec.roles, a.spawned, len(a.slots.running), a.idle_since
            )
            for a in self.agents.values()
        ]

    def status(self, now: float) -> list[dict[str, Any]]:
        """Each agent and its load, as JSON-able values."""
        return [
            {
                "name": agent.spec.name,
                "roles": list(agent.spec.roles),
                "model": agent.spec.model,
                "max_concurrent": agent.spec.max_concurrent,
                "running": len(agent.slots.running),
                "suspended": len(agent.slots.suspended),
                "spawned": agent.spawned,
                "idle_for": None if agent.slots.running else round(now - agent.idle_since, 3),
            }
            for agent in self.agents.values()
        ]
