"""The agent host: a peer's agents as executor roles, spawning, pools and the LLM demand gossip.

Theory of operation. `AgentHost` installs one handler per role on the driver's executor; an
execution is run by an agent of its role picked by the `Roster` (`peer.agents.roster`). The
peer declares (`Driver.serve`) the agents' roles, the built-ins `echo` and `sleep`, and
`grapevine.spawn` while it may spawn more agents, with max_running = the sum of the agents'
`max_concurrent` + `BUILTIN_SLOTS`. Every change of agents (spawn, pool growth, retirement)
re-declares both.

Invariants:
- Placement is a task: a `grapevine.spawn` task is claimed by one peer like any other and its
  handler adds the agent there, so a spawn request adds exactly one agent (one more only after
  a takeover, as for any task). A peer without room, or whose operator does not allow the
  model or a tool asked for (`peer.agents.spawning`), fails the task saying so and changes
  nothing.
- A suspended execution holds neither an executor slot nor its agent's slot (the roster's
  rule); the host only forwards the port's suspend and resume to it.
- Declared agents (from the config) never retire; spawned ones retire after `idle_retire`
  idle seconds, and the pool grows spawned roles with demand (`peer.agents.pool`).
- All agents share one model client, so per-peer rate limits and the breaker cover them all.
  With a network-wide limit the host gossips its signed per-model demand every
  `DEMAND_INTERVAL` seconds and hands the client its share of each model
  (`peer.agents.demand`: only demands signed by their origin count).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from peer.agents import pool
from peer.agents.demand import (
    DEMAND_EVENT,
    DEMAND_INTERVAL,
    NODE_ID_CHARS,
    DemandBoard,
    seal_demand,
)
from peer.agents.endpoints import ModelEndpoint
from peer.agents.ports import ChildResult, Model, TaskPort, TaskView
from peer.agents.roster import HostedAgent, Roster
from peer.agents.runtime import SPAWN_ROLE, AgentRuntime
from peer.agents.spawning import SpawnAllowList, SpawnRequest
from peer.agents.spec import AgentSpec, PoolSettings, TreeLimits
from peer.agents.tools import Toolbox
from peer.runtime.driver import Driver
from peer.runtime.executor import Executor, Outcome, RoleHandler, Work, builtin_roles
from protocol.effects import EventReceived
from protocol.errors import LocalProtocolError
from protocol.identity import Signer, short_id
from protocol.wire import MAX_ROLES, ModelUsage

log = logging.getLogger(__name__)

BUILTIN_SLOTS = 4
"""Executions of the built-in roles (`echo`, `sleep`, `grapevine.spawn`) on top of the
agents' slots (the `AGENT_SLOTS` of a peer without agents)."""
USAGE_SECONDS = 2.0
"""Seconds between two readings of this peer's agents and model spend for its peer state."""


class HostModel(Model, Protocol):
    """The shared model client as the host uses it (`peer.agents.llm.ModelClient`)."""

    def status(self) -> dict[str, Any]:
        """A JSON-able summary per model (breaker, calls, waits)."""
        ...

    def demand(self) -> dict[str, float]:
        """Per model, requests per minute wanted: calls started in the last minute + waiting."""
        ...

    def spend_micro(self) -> int:
        """Micro-dollars every call so far cost, all models together."""
        ...

    def usage_totals(self) -> dict[str, dict[str, str | int | float]]:
        """Per model and server, the running totals kept across restarts."""
        ...

    def advertised_models(self) -> tuple[ModelUsage, ...]:
        """Spend and breaker of the models the peer state names."""
        ...

    def restore_usage(self, saved: Mapping[str, Mapping[str, object]]) -> None:
        """Count on from the totals of an earlier life."""
        ...

    def with_endpoint(self, endpoint: ModelEndpoint) -> Model:
        """The client, calling an agent's own server with its key and params."""
        ...

    def task_deadline(self, seconds: float) -> AbstractContextManager[None]:
        """Within the block, calls serve a task due within `seconds` (0: no deadline)."""
        ...


class HostTaskPort:
    """The task port agents get: the peer's, plus the roster's slot accounting."""

    def __init__(self, inner: TaskPort, roster: Roster) -> None:
        self._inner = inner
        self._roster = roster

    def submit_child(self, parent: bytes, role: str, data: bytes, priority: int) -> bytes:
        return self._inner.submit_child(parent, role, data, priority)

    async def wait_result(self, task_id: bytes) -> ChildResult:
        return await self._inner.wait_result(task_id)

    def suspend(self, task_id: bytes) -> None:
        self._roster.suspend(task_id)
        self._inner.suspend(task_id)

    def resume(self, task_id: bytes) -> None:
        self._inner.resume(task_id)
        self._roster.resume(task_id)

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
        signer: this peer's identity (it signs the demand events).
        limits: the delegation-tree limits every agent applies.
        pool_settings: how many agents may be spawned, with which models and tools, when they
            retire and grow.
        workspace: the directory the file tools are jailed in (created if missing).
        python_roles: roles served by Python functions (`peer.python_api`), already installed
            on the executor, with their slots; the host declares them with its own.
        network_rpm: a network-wide requests-per-minute limit per model; 0 = none.
        clock: monotonic seconds (the node's clock; defaults to the loop's).

    Raises:
        ValueError: no executor is attached, the signer is not the node's identity, or a
            spec's tools cannot be loaded.
    """

    def __init__(
        self,
        driver: Driver,
        specs: tuple[AgentSpec, ...],
        model: HostModel,
        port: TaskPort,
        *,
        signer: Signer,
        limits: TreeLimits,
        pool_settings: PoolSettings,
        workspace: Path,
        python_roles: Mapping[str, int] | None = None,
        network_rpm: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if driver.executor is None:
            raise ValueError("attach an executor to the driver before creating the host")
        if signer.node_id != driver.node.node_id:
            raise ValueError("the signer is not this peer's identity")
        self.driver = driver
        self.executor: Executor = driver.executor
        self.client = model
        self.signer = signer
        self.limits = limits
        self.pool_settings = pool_settings
        self.allowed = SpawnAllowList.of(pool_settings, specs)
        self.workspace = workspace
        self.python_roles = dict(python_roles or {})
        self._clock = clock or asyncio.get_running_loop().time
        self.roster = Roster(self._clock)
        self._port = HostTaskPort(port, self.roster)
        self._spawn_count = 0
        self._demand_sequence = 0
        self._timers: list[asyncio.Task[None]] = []
        self._saved_usage: dict[str, dict[str, str | int | float]] = {}
        """The model usage totals last saved (see `_save_usage`)."""
        self._subscription: asyncio.Queue[Any] | None = None
        self.network_rpm = network_rpm
        self.demand: DemandBoard | None = None
        if network_rpm > 0:
            self.demand = DemandBoard(
                driver.node.node_id, network_rpm, signer.network_id, self._member_key
            )
        self.me = short_id(driver.node.node_id, NODE_ID_CHARS)
        workspace.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            self._add(spec, spawned=False)

    # Lifecycle

    def start(self) -> None:
        """Declare the roles (`Driver.serve`) and start the pool and demand timers."""
        self._serve()
        # Calls, tokens and spend count on across restarts: the network's cost shown on
        # every dashboard must not drop when a peer restarts (decision 52).
        self.client.restore_usage(self.driver.load_model_usage())
        self._saved_usage = self.client.usage_totals()
        loop = asyncio.get_running_loop()
        self._timers.append(loop.create_task(self._pool_loop()))
        self._timers.append(loop.create_task(self._usage_loop()))
        if self.demand is not None:
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
        self._save_usage()

    async def _usage_loop(self) -> None:
        # The peer state carries our agents and spend to every dashboard (decision 47); the
        # node gossips a change at a bounded rate, so reading it this often costs nothing.
        while True:
            self.driver.set_usage(
                len(self.roster.agents),
                self.client.spend_micro(),
                self.client.advertised_models(),
            )
            self._save_usage()
            await asyncio.sleep(USAGE_SECONDS)

    def _save_usage(self) -> None:
        """Save the model usage totals if they changed since the last save: a crash loses at
        most `USAGE_SECONDS` of them."""
        totals = self.client.usage_totals()
        if totals != self._saved_usage:
            self.driver.save_model_usage(totals)
            self._saved_usage = totals

    # Agents

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this peer declares, sorted."""
        roles = self.roster.served()
        roles.update(builtin_roles())
        roles.update(self.python_roles)
        if self.spawned < self.pool_settings.max_spawned:
            roles.add(SPAWN_ROLE)
        return tuple(sorted(roles))

    @property
    def max_running(self) -> int:
        """Executions run at once: every agent's `max_concurrent`, every Python role's, and
        `BUILTIN_SLOTS`."""
        return BUILTIN_SLOTS + self.roster.slots + sum(self.python_roles.values())

    @property
    def spawned(self) -> int:
        """Agents added at runtime and not retired."""
        return self.roster.spawned

    def share_of(self, model: str) -> float | None:
        """This peer's requests per minute of the network-wide limit on `model` (None: no
        network-wide limit); give it to the model client."""
        if self.demand is None:
            return None
        return self.demand.share(model, self.client.demand().get(model, 0.0), self._clock())

    def add(self, spec: AgentSpec, *, spawned: bool) -> None:
        """Host one more agent and declare its roles.

        Raises:
            ValueError: the name is taken, or its tools cannot be loaded.
        """
        self._add(spec, spawned=spawned)
        self._serve()

    def status(self) -> dict[str, Any]:
        """The agents, their load and the model client's status, as JSON-able values."""
        return {
            "agents": self.roster.status(self._clock()),
            "roles": list(self.roles),
            "max_running": self.max_running,
            "spawned": self.spawned,
            "max_spawned": self.pool_settings.max_spawned,
            "waiting": len(self.roster.waiting),
            "network_rpm": self.network_rpm,
            "demand_dropped": {} if self.demand is None else dict(self.demand.dropped),
            "model": self.client.status(),
        }

    def _add(self, spec: AgentSpec, *, spawned: bool) -> None:
        if spec.name in self.roster.agents:
            raise ValueError(f"agent {spec.name!r} already exists on this peer")
        runtime = AgentRuntime(
            spec,
            self.client.with_endpoint(spec.endpoint),
            self._port,
            Toolbox.load(spec.tools),
            self.limits,
            self.workspace,
            progress=self.driver.progress,
            checkpoints=self.driver,
        )
        self.roster.add(HostedAgent(spec, runtime, spawned, self._clock()))
        for role in spec.roles:
            if role not in self.executor.handlers:
                self.executor.handlers[role] = self._handler(role)

    def _serve(self) -> None:
        served = self.roster.served()
        for role in list(self.executor.handlers):
            kept = role in builtin_roles() or role in self.python_roles or role == SPAWN_ROLE
            if role not in served and not kept:
                del self.executor.handlers[role]
        self.executor.handlers[SPAWN_ROLE] = self._spawn
        # Raising the limit lets executions waiting in the executor start at the next
        # completion or suspension (the executor has no call to re-check at once).
        self.executor.max_running = self.max_running
        self.driver.serve(self.roles, self.max_running)
        self.roster.notify()

    def _handler(self, role: str) -> RoleHandler:
        async def run(work: Work) -> Outcome:
            agent = await self.roster.acquire(role, work.task_id)
            try:
                with self.client.task_deadline(work.timeout):
                    return await agent.runtime.run(work)
            finally:
                self.roster.release(agent, work.task_id)

        return run

    # Spawning and the pool

    async def _spawn(self, work: Work) -> bytes:
        request = SpawnRequest.decode(work.input)
        refusal = self.allowed.refusal(request)
        if refusal is not None:
            raise PermissionError(refusal)
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
            if name not in self.roster.agents:
                return name

    def pool_members(self) -> list[pool.PoolMember]:
        """The agents as the pool decision sees them."""
        return self.roster.pool_members()

    def waiting_since(self) -> dict[str, float]:
        """Per role of a spawned agent: since when its oldest open task has waited, unclaimed
        in the network (as this peer sees it) or here for a free agent."""
        pooled = {role for a in self.roster if a.spawned for role in a.spec.roles}
        oldest: dict[str, float] = {}
        if not pooled:
            return oldest
        for state in self.driver.node.open_tasks():
            if state.claim is not None or state.record is None:
                continue
            role = state.record.role
            if role in pooled:
                oldest[role] = min(oldest.get(role, state.first_seen), state.first_seen)
        for role, since in self.roster.waiting.values():
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
            template = self.roster.agents[name].spec
            role = template.roles[0]
            spec = replace(template, name=self._spawn_name(role))
            log.info("pool: tasks of %s wait; adding agent %s", role, spec.name)
            self._add(spec, spawned=True)
        for name in plan.retire:
            if self.roster.retire(name):
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

    def broadcast_demand(self) -> None:
        """Gossip this peer's demand per model, signed (a `DEMAND_EVENT` user event)."""
        self._demand_sequence += 1
        node = self.driver.node
        try:
            payload = seal_demand(
                self.signer, node.incarnation, self._demand_sequence, self.client.demand()
            )
            self.driver.broadcast(DEMAND_EVENT, payload)
        except (ValueError, LocalProtocolError) as exc:
            log.warning("cannot gossip the LLM demand: %s", exc)

    def observe_demand(self, origin: bytes, payload: bytes) -> None:
        """Take in a demand event claimed to come from `origin` (dropped and counted unless
        that member signed it; see `peer.agents.demand`)."""
        if self.demand is None:
            return
        reason = self.demand.observe(origin, payload, self._clock())
        if reason is not None:
            log.debug("dropped a demand event from %s: %s", short_id(origin), reason)

    def _member_key(self, node_id: bytes) -> bytes | None:
        """A live member's key: a down member's demand (a replay, as it sends none) is refused."""
        node = self.driver.node
        member = node.member(node_id)
        if member is None or node.is_down(node_id):
            return None
        return member.alive.public_key

    async def _demand_loop(self) -> None:
        while True:
            self.broadcast_demand()
            if self.demand is not None:
                self.demand.forget(self.driver.node.is_down)
            await asyncio.sleep(DEMAND_INTERVAL)

    async def _listen(self, queue: asyncio.Queue[Any]) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            note = item.note
            if isinstance(note, EventReceived) and note.name == DEMAND_EVENT:
                self.observe_demand(note.origin, note.payload)
