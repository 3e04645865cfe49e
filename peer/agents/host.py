"""The agent host: a peer's agents as executor roles, spawning, pools and the LLM demand gossip.

Theory of operation. `AgentHost` installs one handler per role on the driver's executor. An
execution of a role is given to an agent serving it with a free `max_concurrent` slot, least
busy first; when all of them are busy it waits here for one (the node may start more work than
fits: a standby's claim or a takeover does not wait for a slot). The peer declares
(`Driver.serve`) the agents' roles, the built-ins `echo` and `sleep`, and `grapevine.spawn`
while it may spawn more agents, with max_running = the sum of the agents' `max_concurrent` +
`BUILTIN_SLOTS`. Every change of agents (spawn, pool growth, retirement) re-declares both.

Invariants:
- Placement is a task: a `grapevine.spawn` task is claimed by one peer like any other and its
  handler adds the agent there, so a spawn request adds exactly one agent (one more only after
  a takeover, as for any task). A peer without room fails the task saying so.
- A suspended execution (waiting on its children) holds neither an executor slot nor its
  agent's slot; on resume it takes the agent's slot back at once, even beyond
  `max_concurrent` (it never waits, so a tree cannot deadlock). Each agent keeps its account
  in the protocol's `SlotLedger`, the one home of that rule.
- Declared agents (from the config) never retire; spawned ones retire after `idle_retire`
  idle seconds, and the pool grows spawned roles with demand (`peer.agents.pool`).
- All agents share one model client, so per-peer rate limits and the breaker cover them all.
  With a network-wide limit the host gossips its per-model demand every `DEMAND_INTERVAL`
  seconds as the user event `DEMAND_EVENT` and hands the client its share of each model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from peer.agents import pool
from peer.agents.limits import NetworkShare, decode_demand, encode_demand
from peer.agents.ports import ChildResult, Model, TaskPort, TaskView
from peer.agents.runtime import SPAWN_ROLE, AgentRuntime
from peer.agents.spec import (
    BUILTIN_TOOLS,
    RESERVED_PREFIX,
    RESERVED_ROLES,
    AgentSpec,
    PoolSettings,
    TreeLimits,
    is_valid_name,
)
from peer.agents.tools import Toolbox
from peer.runtime.driver import Driver
from peer.runtime.executor import Executor, Outcome, RoleHandler, Work, builtin_roles
from protocol.effects import EventReceived
from protocol.errors import LocalProtocolError
from protocol.identity import short_id
from protocol.slots import SlotLedger
from protocol.wire import MAX_ROLES

log = logging.getLogger(__name__)

BUILTIN_SLOTS = 4
"""Executions of the built-in roles (`echo`, `sleep`, `grapevine.spawn`) on top of the
agents' slots (the `AGENT_SLOTS` of a peer without agents)."""
DEMAND_EVENT = "grapevine.llm-demand"
DEMAND_INTERVAL = 5.0
"""Seconds between two demand broadcasts; others forget a peer after 3 intervals of silence."""
NODE_ID_CHARS = 52
"""A node id as the API shows it: its whole base32 form."""
MAX_SPAWN_INPUT = 16 * 1024


class HostModel(Model, Protocol):
    """The shared model client as the host uses it (`peer.agents.llm.ModelClient`)."""

    def status(self) -> dict[str, Any]:
        """A JSON-able summary per model (breaker, calls, waits)."""
        ...

    def demand(self) -> dict[str, float]:
        """Per model, requests per minute wanted: calls started in the last minute + waiting."""
        ...


ShareOf = Callable[[str], float | None]
"""share_of(model): this peer's requests per minute of a network-wide limit, or None."""


@dataclass(slots=True)
class _Agent:
    """One hosted agent and what it is doing."""

    spec: AgentSpec
    runtime: AgentRuntime
    spawned: bool
    idle_since: float
    slots: SlotLedger[bytes, None] = field(default_factory=SlotLedger)
    """Executions it runs, suspended ones (holding no agent slot) included."""


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """The input of a `grapevine.spawn` task."""

    role: str
    system: str
    model: str
    tools: tuple[str, ...]

    @classmethod
    def decode(cls, data: bytes) -> SpawnRequest:
        """Parse {"role", "system", "model", "tools"?}; tools default to ("final_answer",).

        Raises:
            ValueError: not a JSON object, a field missing or of the wrong type, a reserved
                or malformed role, or a tool that is not a built-in. The message says which.
        """
        if len(data) > MAX_SPAWN_INPUT:
            raise ValueError(f"spawn request is {len(data)} bytes (max {MAX_SPAWN_INPUT})")
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict):
            raise ValueError('spawn request must be a JSON object {"role", "system", "model"}')
        unknown = sorted(set(body) - {"role", "system", "model", "tools"})
        if unknown:
            raise ValueError(f"spawn request: unknown field(s) {', '.join(unknown)}")
        role, system, model = body.get("role"), body.get("system", ""), body.get("model")
        if not isinstance(role, str) or not is_valid_name(role):
            raise ValueError(f"spawn request: role must be a name (letters, digits, ._-): {role!r}")
        if role in RESERVED_ROLES or role.startswith(RESERVED_PREFIX):
            raise ValueError(f"spawn request: role {role!r} is reserved for the peer's own roles")
        if not isinstance(system, str):
            raise ValueError("spawn request: system must be a string")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"spawn request: model must be a litellm model string, got {model!r}")
        tools = body.get("tools", ["final_answer"])
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise ValueError("spawn request: tools must be an array of built-in tool names")
        bad = [t for t in tools if t not in BUILTIN_TOOLS]
        if bad:
            raise ValueError(
                f"spawn request: {', '.join(map(repr, bad))} not built-in tools "
                f"({', '.join(BUILTIN_TOOLS)})"
            )
        if "final_answer" not in tools:
            tools = [*tools, "final_answer"]
        return cls(role, system, model, tuple(dict.fromkeys(tools)))


class _HostPort:
    """The task port agents get: the peer's, plus the host's own slot accounting."""

    def __init__(self, inner: TaskPort, host: AgentHost) -> None:
        self._inner = inner
        self._host = host

    def submit_child(self, parent: bytes, role: str, data: bytes, priority: int) -> bytes:
        return self._inner.submit_child(parent, role, data, priority)

    async def wait_result(self, task_id: bytes) -> ChildResult:
        return await self._inner.wait_result(task_id)

    def suspend(self, task_id: bytes) -> None:
        self._host._suspend(task_id)
        self._inner.suspend(task_id)

    def resume(self, task_id: bytes) -> None:
        self._inner.resume(task_id)
        self._host._resume(task_id)

    def task(self, task_id: bytes) -> TaskView | None:
        return self._inner.task(task_id)

    def children(self, task_id: bytes) -> list[TaskView]:
        return self._inner.children(task_id)

    def role_available(self, role: str) -> bool:
        return self._inner.role_available(role)


class AgentHost:
    """A peer's agents, served as roles of the driver's executor.

    Args:
        driver: the peer's driver, with an `Executor` attached.
        specs: the declared agents (from the config); they never retire.
        model: the shared model client.
        port: the task port over the driver (`peer.agents.peer_port.DriverTaskPort`).
        limits: the delegation-tree limits every agent applies.
        pool_settings: how many agents may be spawned, when they retire and grow.
        workspace: the directory the file tools are jailed in (created if missing).
        network_rpm: a network-wide requests-per-minute limit per model; 0 = none.
        clock: monotonic seconds (the node's clock; defaults to the loop's).

    Raises:
        ValueError: no executor is attached, or a spec's tools cannot be loaded.
    """

    def __init__(
        self,
        driver: Driver,
        specs: tuple[AgentSpec, ...],
        model: HostModel,
        port: TaskPort,
        *,
        limits: TreeLimits,
        pool_settings: PoolSettings,
        workspace: Path,
        network_rpm: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if driver.executor is None:
            raise ValueError("attach an executor to the driver before creating the host")
        self.driver = driver
        self.executor: Executor = driver.executor
        self.client = model
        self.limits = limits
        self.pool_settings = pool_settings
        self.workspace = workspace
        self._clock = clock or asyncio.get_running_loop().time
        self._port = _HostPort(port, self)
        self._agents: dict[str, _Agent] = {}
        self._owner: dict[bytes, _Agent] = {}
        self._waiting: dict[bytes, tuple[str, float]] = {}
        """Executions waiting for a free agent: task id -> (role, since)."""
        self._changed = asyncio.Event()
        self._spawn_count = 0
        self._timers: list[asyncio.Task[None]] = []
        self._subscription: asyncio.Queue[Any] | None = None
        self._shares: dict[str, NetworkShare] = {}
        self.network_rpm = network_rpm
        self.me = short_id(driver.node.node_id, NODE_ID_CHARS)
        workspace.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            self._add(spec, spawned=False)

    # Lifecycle

    def start(self) -> None:
        """Declare the roles (`Driver.serve`) and start the pool and demand timers."""
        self._serve()
        loop = asyncio.get_running_loop()
        self._timers.append(loop.create_task(self._pool_loop()))
        if self.network_rpm > 0:
            self._subscription = self.driver.hub.subscribe()
            self._timers.append(loop.create_task(self._demand_loop()))
            self._timers.append(loop.create_task(self._listen(self._subscription)))

    async def close(self) -> None:
        """Stop the timers (the executor, closed by its owner, stops the executions)."""
        if self._subscription is not None:
            self.driver.hub.unsubscribe(self._subscription)
        for task in self._timers:
            task.cancel()
        await asyncio.gather(*self._timers, return_exceptions=True)
        self._timers.clear()

    # Agents

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this peer declares, sorted."""
        roles = {role for agent in self._agents.values() for role in agent.spec.roles}
        roles.update(builtin_roles())
        if self.spawned < self.pool_settings.max_spawned:
            roles.add(SPAWN_ROLE)
        return tuple(sorted(roles))

    @property
    def max_running(self) -> int:
        """Executions run at once: every agent's `max_concurrent` + `BUILTIN_SLOTS`."""
        return BUILTIN_SLOTS + sum(a.spec.max_concurrent for a in self._agents.values())

    @property
    def spawned(self) -> int:
        """Agents added at runtime and not retired."""
        return sum(1 for agent in self._agents.values() if agent.spawned)

    def share_of(self, model: str) -> float | None:
        """This peer's requests per minute of the network-wide limit on `model` (None: no
        network-wide limit); give it to the model client."""
        if self.network_rpm <= 0:
            return None
        now = self._clock()
        mine = self.client.demand().get(model, 0.0)
        return self._share(model).share(self.me, mine, now)

    def add(self, spec: AgentSpec, *, spawned: bool) -> None:
        """Host one more agent and declare its roles.

        Raises:
            ValueError: the name is taken, or its tools cannot be loaded.
        """
        self._add(spec, spawned=spawned)
        self._serve()

    def status(self) -> dict[str, Any]:
        """The agents, their load and the model client's status, as JSON-able values."""
        now = self._clock()
        agents = [
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
            for agent in self._agents.values()
        ]
        return {
            "agents": agents,
            "roles": list(self.roles),
            "max_running": self.max_running,
            "spawned": self.spawned,
            "max_spawned": self.pool_settings.max_spawned,
            "waiting": len(self._waiting),
            "network_rpm": self.network_rpm,
            "model": self.client.status(),
        }

    def _add(self, spec: AgentSpec, *, spawned: bool) -> None:
        if spec.name in self._agents:
            raise ValueError(f"agent {spec.name!r} already exists on this peer")
        runtime = AgentRuntime(
            spec, self.client, self._port, Toolbox.load(spec.tools), self.limits, self.workspace
        )
        self._agents[spec.name] = _Agent(spec, runtime, spawned, self._clock())
        for role in spec.roles:
            if role not in self.executor.handlers:
                self.executor.handlers[role] = self._handler(role)

    def _serve(self) -> None:
        served = {role for agent in self._agents.values() for role in agent.spec.roles}
        for role in list(self.executor.handlers):
            if role not in served and role not in builtin_roles() and role != SPAWN_ROLE:
                del self.executor.handlers[role]
        self.executor.handlers[SPAWN_ROLE] = self._spawn
        # Raising the limit lets executions waiting in the executor start at the next
        # completion or suspension (the executor has no call to re-check at once).
        self.executor.max_running = self.max_running
        self.driver.serve(self.roles, self.max_running)
        self._notify()

    # Executions

    def _handler(self, role: str) -> RoleHandler:
        async def run(work: Work) -> Outcome:
            agent = await self._acquire(role, work.task_id)
            try:
                return await agent.runtime.run(work)
            finally:
                self._release(agent, work.task_id)

        return run

    async def _acquire(self, role: str, task_id: bytes) -> _Agent:
        try:
            while True:
                serving = [a for a in self._agents.values() if role in a.spec.roles]
                if not serving:
                    raise RuntimeError(f"no agent of role {role!r} on this peer any more")
                free = [a for a in serving if a.slots.has_room(a.spec.max_concurrent)]
                if free:
                    agent = min(free, key=lambda a: a.slots.used())
                    agent.slots.start(task_id, None)
                    self._owner[task_id] = agent
                    return agent
                self._waiting.setdefault(task_id, (role, self._clock()))
                changed = self._changed
                await changed.wait()
        finally:
            self._waiting.pop(task_id, None)

    def _release(self, agent: _Agent, task_id: bytes) -> None:
        agent.slots.finish(task_id)
        self._owner.pop(task_id, None)
        if not agent.slots.running:
            agent.idle_since = self._clock()
        self._notify()

    def _suspend(self, task_id: bytes) -> None:
        agent = self._owner.get(task_id)
        if agent is not None and agent.slots.suspend(task_id):
            self._notify()

    def _resume(self, task_id: bytes) -> None:
        agent = self._owner.get(task_id)
        if agent is not None:
            agent.slots.resume(task_id)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # Spawning and the pool

    async def _spawn(self, work: Work) -> bytes:
        request = SpawnRequest.decode(work.input)
        if self.spawned >= self.pool_settings.max_spawned:
            raise RuntimeError(
                f"no room: this peer already hosts {self.spawned} spawned agents "
                f"(pool.max_spawned = {self.pool_settings.max_spawned})"
            )
        if request.role not in self.roles and len(self.roles) >= MAX_ROLES:
            raise RuntimeError(f"no room: this peer already declares {MAX_ROLES} roles")
        spec = AgentSpec(
            name=self._spawn_name(request.role),
            roles=(request.role,),
            model=request.model,
            system=request.system,
            tools=request.tools,
        )
        self.add(spec, spawned=True)
        log.info(
            "spawned agent %s for role %s (task %s)",
            spec.name,
            request.role,
            work.task_id.hex()[:12],
        )
        body = {"agent": spec.name, "peer": self.me, "role": request.role}
        return json.dumps(body, sort_keys=True).encode()

    def _spawn_name(self, role: str) -> str:
        while True:
            self._spawn_count += 1
            name = f"{role}-spawned-{self._spawn_count}"
            if name not in self._agents:
                return name

    def pool_members(self) -> list[pool.PoolMember]:
        """The agents as the pool decision sees them."""
        return [
            pool.PoolMember(
                a.spec.name, a.spec.roles, a.spawned, len(a.slots.running), a.idle_since
            )
            for a in self._agents.values()
        ]

    def waiting_since(self) -> dict[str, float]:
        """Per role of a spawned agent: since when its oldest open task has waited, unclaimed
        in the network (as this peer sees it) or here for a free agent."""
        pooled = {role for a in self._agents.values() if a.spawned for role in a.spec.roles}
        oldest: dict[str, float] = {}
        if not pooled:
            return oldest
        for state in self.driver.node.open_tasks():
            if state.claim is not None or state.record is None:
                continue
            role = state.record.role
            if role in pooled:
                oldest[role] = min(oldest.get(role, state.first_seen), state.first_seen)
        for role, since in self._waiting.values():
            if role in pooled:
                oldest[role] = min(oldest.get(role, since), since)
        return oldest

    def free_elsewhere(self) -> frozenset[str]:
        """Roles some other live peer advertises with a free execution slot."""
        node = self.driver.node
        roles: set[str] = set()
        for node_id, state in node.peer_states().items():
            if node_id != node.node_id and state.free_slots > 0 and not node.is_down(node_id):
                roles.update(state.roles)
        return frozenset(roles)

    def check_pool(self) -> pool.PoolPlan:
        """Run one pool decision now and apply it; return it."""
        plan = pool.plan(
            self.pool_settings,
            self._clock(),
            self.pool_members(),
            self.waiting_since(),
            self.free_elsewhere(),
        )
        for name in plan.grow:
            template = self._agents[name].spec
            role = template.roles[0]
            spec = replace(template, name=self._spawn_name(role))
            log.info("pool: tasks of %s wait; adding agent %s", role, spec.name)
            self._add(spec, spawned=True)
        for name in plan.retire:
            agent = self._agents.get(name)
            if agent is not None and agent.spawned and not agent.slots.running:
                del self._agents[name]
                log.info("pool: retired idle agent %s", name)
        if plan.grow or plan.retire:
            self._serve()
        return plan

    async def _pool_loop(self) -> None:
        interval = pool.check_interval(self.pool_settings)
        while True:
            await asyncio.sleep(interval)
            try:
                self.check_pool()
            except Exception:
                log.exception("the pool check failed")

    # Network-wide LLM limit

    def _share(self, model: str) -> NetworkShare:
        share = self._shares.get(model)
        if share is None:
            share = NetworkShare(self.network_rpm, 3 * DEMAND_INTERVAL)
            self._shares[model] = share
        return share

    def broadcast_demand(self) -> None:
        """Gossip this peer's demand per model (a `DEMAND_EVENT` user event)."""
        demand = self.client.demand()
        try:
            self.driver.broadcast(DEMAND_EVENT, encode_demand(demand))
        except (ValueError, LocalProtocolError) as exc:
            log.warning("cannot gossip the LLM demand: %s", exc)

    def observe_demand(self, origin: bytes, payload: bytes) -> None:
        """Take in another peer's demand event."""
        if origin == self.driver.node.node_id:
            return
        try:
            demand = decode_demand(payload)
        except ValueError as exc:
            log.debug("ignoring a malformed demand event: %s", exc)
            return
        now = self._clock()
        peer = short_id(origin, NODE_ID_CHARS)
        for model in set(demand) | set(self._shares):
            self._share(model).observe(peer, demand.get(model, 0.0), now)

    async def _demand_loop(self) -> None:
        while True:
            self.broadcast_demand()
            await asyncio.sleep(DEMAND_INTERVAL)

    async def _listen(self, queue: asyncio.Queue[Any]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            note = item.note
            if isinstance(note, EventReceived) and note.name == DEMAND_EVENT:
                self.observe_demand(note.origin, note.payload)
