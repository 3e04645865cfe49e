"""`build_peer`: wire one peer from its settings, and take it apart, in the one correct order.

The `grapevine agent` command and the in-process tests build their peers here, so there is one
start-up order and one teardown order to get right.

Invariants:
- Start-up order: keyring and store (refusing clearly if unusable), identity, a new
  incarnation made durable *before* the node exists (so a restart always starts higher), the
  transport, the blob store, the node and its driver, the executor, the replay of every stored
  task object, the blob service's deletions (indexed from the replayed tasks),
  the agent host, its metrics (a registry of its own), the API (its token read
  or generated first), then the roles are declared. Joining is the caller's business,
  inside the `async with`: `Node.restore` asks for restore, then serve, then join.
- Roles: a seed-only peer (`no_agents`) serves none; with `[[agents]]` configured the agent
  host (`peer.agents.host.AgentHost`) installs its roles on the same executor after the replay
  and declares them in place of the built-ins-only set; one model client serves all its agents.
  Python roles (`peer.python_api`) are on the executor from the start, next to the built-ins,
  each adding its `max_concurrent` slots, and are declared with the others.
- Teardown, after the body or after a part failed to start, undoes only what was started, in
  this order: the agent host (its timers stop before the executions do), the executor, the
  blob sweep, the driver (membership hints saved, waiters and task streams ended), the API
  (its event streams end with the membership hub), the transport (in-flight sends finish
  briefly), the store if it was opened here. Leaving the network comes before it, in the caller.
- A part that cannot start raises `PeerStartError` saying what and why; a missing or unusable
  network key or operator API token, or an API beyond loopback without the operator's token,
  raises `peer.settings.SettingsError` (before anything starts, for the API address).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from peer.agents.host import BUILTIN_SLOTS, AgentHost
from peer.agents.peer_port import DriverTaskPort
from peer.api_token import TokenError, load_or_create_token, read_token_file
from peer.http.app import PeerApi
from peer.keys import load_network_keyring
from peer.observability.metrics import PeerMetrics
from peer.python_api.roles import Role
from peer.python_api.serving import role_handlers, role_slots
from peer.runtime.blob_store import BLOBS_DIR, BlobStore
from peer.runtime.blobs import BlobService
from peer.runtime.driver import Driver
from peer.runtime.executor import Executor, RoleHandler, builtin_roles
from peer.runtime.group_commit import RecordStore
from peer.runtime.keyring import Keyring
from peer.runtime.serving import host_port
from peer.runtime.store import Store, StoreError
from peer.runtime.transport import Transport
from peer.settings import AgentSettings, SettingsError
from protocol.config import NodeConfig, lan, local, wan, with_network
from protocol.effects import PersistKind
from protocol.envelope import merge_envelopes
from protocol.identity import Signer
from protocol.node import Node
from protocol.tasks.retention import copies_outlived

log = logging.getLogger(__name__)

AGENT_SLOTS = BUILTIN_SLOTS
"""Executions of the built-in roles a peer runs at once (`max_running` of `Node.serve`); the
agent host adds its agents' slots to these."""
RESTORE_KINDS = (
    PersistKind.TASK,
    PersistKind.EPOCH_GRANT,
    PersistKind.CLAIM,
    PersistKind.CHECKPOINT,
    PersistKind.RESULT,
    PersistKind.CANCEL,
    PersistKind.GRANT,
)
"""Stored task objects, in replay order: a claim needs its record, a checkpoint or a result
its claim.
Tombstones (`PersistKind.TOMBSTONE`) are replayed before them, so a compacted task's objects
(none should be left) are never replayed."""
PROFILES = {"lan": lan, "local": local, "wan": wan}


class PeerStartError(Exception):
    """A part of the peer could not start (address in use, data directory locked, ...)."""


class PeerStore(RecordStore, Protocol):
    """The durable side a peer is built from (`peer.runtime.store.Store`, or one in memory)."""

    def load_or_create_identity(self) -> bytes: ...

    def load_incarnation(self) -> int: ...

    def save_incarnation(self, incarnation: int) -> None: ...

    def get(self, kind: str, key: bytes) -> bytes | None: ...

    def scan(self, kind: str) -> Iterator[tuple[bytes, bytes]]: ...

    def load_members(self) -> list[tuple[bytes, str, int]]: ...

    def last_contact(self) -> int | None: ...

    def forget_kinds(self, kinds: Iterable[str]) -> int: ...


@dataclass(frozen=True, slots=True)
class Peer:
    """The parts of one running peer."""

    keyring: Keyring
    store: PeerStore
    transport: Transport
    node: Node
    driver: Driver
    executor: Executor
    blobs: BlobService
    host: AgentHost | None
    """The agent host, with `[[agents]]` configured (and not seed-only)."""
    api: PeerApi | None
    """The HTTP API, listening; None when built without one."""
    listening: str
    """The "host:port" the transport is bound to."""
    restored: int
    """Stored task objects replayed into the node."""
    hints: list[str]
    """Addresses of the members remembered from a previous run (see `Driver.hints`)."""
    metrics: PeerMetrics
    """Its Prometheus registry (served at `GET /metrics` by the API)."""


@asynccontextmanager
async def build_peer(
    settings: AgentSettings,
    *,
    on_leave: Callable[[], None] | None = None,
    keyring: Keyring | None = None,
    store: PeerStore | None = None,
    roles: Mapping[str, RoleHandler] | None = None,
    max_running: int = AGENT_SLOTS,
    rng: random.Random | None = None,
    python_roles: Sequence[Role] = (),
) -> AsyncIterator[Peer]:
    """Start one peer, yield its parts, and stop it on exit (see the module invariants).

    Args:
        settings: validated settings (`peer.settings.load_settings`).
        on_leave: called when a client asks the peer to leave through the API; None serves no
            API (in-process tests drive the peer directly).
        keyring: the network keyring; by default the one the settings name.
        store: the durable side; by default the store in `settings.data_dir`, closed on exit.
        roles: what the executor runs; by default the built-in roles.
        max_running: executions of `roles` at once.
        rng: the node's randomness (seeded in tests, so a run repeats); a fresh one by default.
        python_roles: roles served by Python functions, on top of `roles` (checked against
            the settings' agents first: `peer.python_api.serving.settings_with`).

    Raises:
        SettingsError: no usable network key or operator API token; an API beyond loopback
            without the operator's token.
        PeerStartError: a part could not start; what was started is stopped again.
    """
    if on_leave is not None:
        settings.check_api_exposure()
    keyring = keyring or load_network_keyring(settings)
    opened: Store | None = None
    if store is None:
        opened = store = _open_store(settings)
    transport: Transport | None = None
    driver: Driver | None = None
    writer: concurrent.futures.ThreadPoolExecutor | None = None
    blobs: BlobService | None = None
    executor: Executor | None = None
    host: AgentHost | None = None
    api: PeerApi | None = None
    try:
        try:
            signer = Signer(store.load_or_create_identity(), keyring.network_id)
        except StoreError as exc:
            raise PeerStartError(str(exc)) from exc
        incarnation = max(store.load_incarnation(), _stored_incarnation(store)) + 1
        store.save_incarnation(incarnation)

        bind_host, bind_port = settings.bind_host_port()
        started = Transport(
            bind_host, bind_port, keyring, os.urandom(8), _nowhere, coalesce=merge_envelopes
        )
        try:
            await started.start()
        except OSError as exc:
            reason = exc.strerror or exc
            raise PeerStartError(f"cannot listen on {settings.bind}: {reason}") from exc
        transport = started
        try:
            blob_store = BlobStore(settings.data_dir / BLOBS_DIR)
        except OSError as exc:
            raise PeerStartError(f"cannot open the blob store: {exc}") from exc

        advertise = settings.advertise_address(transport.port)
        config = _config(settings, keyring.network_id)
        loop = asyncio.get_running_loop()
        node = Node(config, signer, advertise, rng or random.Random(), loop.time(), incarnation)
        # One thread writes the task records, so the loop goes on while SQLite fsyncs. A store
        # given by the caller (a test's fake) is written on the loop: it need not be thread-safe.
        if opened is not None:
            writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        driver = Driver(node, transport, store, writer=writer)
        blobs = BlobService(blob_store, transport, driver)
        transport.blob_store = blobs.holder  # pushes pass the designated-holder rule
        driver.disk.on_written = blobs.note_written  # blobs go with the tasks forgotten
        transport.on_receive = driver.receive
        driver.start()
        handlers = dict(builtin_roles() if roles is None else roles)
        port = DriverTaskPort(driver, blobs)
        handlers.update(role_handlers(python_roles, port, settings.limits, driver.progress, driver))
        slots = role_slots(python_roles)
        executor = Executor(handlers, max_running + sum(slots.values()), blobs=blobs)
        driver.attach(executor)
        _discard_outlived_copies(store, config)
        saved_members = store.load_members()
        driver.remember_members(saved_members)
        driver.restore_tombstones(store.scan(PersistKind.TOMBSTONE))
        restored = driver.restore(value for kind in RESTORE_KINDS for _, value in store.scan(kind))
        if restored:
            log.info("restored %d stored task objects", restored)
        blobs.start()  # indexes the restored tasks' blobs, then deletes the ones none needs
        if settings.agents and not settings.no_agents:
            try:
                host = _agent_host(settings, port, driver, signer, slots)
            except (ValueError, OSError) as exc:
                raise PeerStartError(f"cannot host the agents: {exc}") from exc
        metrics = PeerMetrics(driver, transport, host)
        if isinstance(store, Store):
            store.on_write = metrics.events.store_write.observe

        if on_leave is not None:
            serving = PeerApi(
                driver,
                transport,
                settings.data_dir,
                on_leave,
                token=_api_token(settings),
                blobs=blobs,
                agents=None if host is None else host.status,
                metrics=metrics,
            )
            api_host, api_port = settings.api_host_port()
            try:
                await serving.start(api_host, api_port)
            except OSError as exc:
                reason = exc.strerror or exc
                raise PeerStartError(f"cannot serve the API on {settings.api}: {reason}") from exc
            api = serving

        hints = [addr for _, addr, _ in saved_members if addr != advertise]
        driver.hints = set(hints)
        if settings.no_agents:
            driver.serve((), 0)
        elif host is not None:
            host.start()
            log.info("hosting %d agents; roles %s", len(settings.agents), ", ".join(host.roles))
        else:
            driver.serve(executor.roles, executor.max_running)
        yield Peer(
            keyring,
            store,
            transport,
            node,
            driver,
            executor,
            blobs,
            host,
            api,
            host_port(bind_host, transport.port),
            restored,
            hints,
            metrics,
        )
    finally:
        if host is not None:
            await host.close()
        if executor is not None:
            await executor.close()
        if blobs is not None:
            await blobs.close()
        if driver is not None:
            driver.stop()  # takes over the write in flight, then writes what waits
        if writer is not None:
            writer.shutdown()
        if api is not None:
            await api.stop()
        if transport is not None:
            await transport.stop()
        if opened is not None:
            opened.close()


def _config(settings: AgentSettings, network_id: bytes) -> NodeConfig:
    """The protocol configuration: the settings' profile, network and task retention."""
    config = with_network(PROFILES[settings.profile](), network_id)
    retention = settings.task_retention
    grace = settings.tombstone_grace if settings.tombstone_grace is not None else retention
    return replace(config, tasks=replace(config.tasks, retention=retention, tombstone_grace=grace))


def _discard_outlived_copies(store: PeerStore, config: NodeConfig) -> None:
    """Back after an absence longer than the network remembers compacted tasks, forget the
    stored tasks and tombstones rather than resurrect them (`copies_outlived`)."""
    cfg = config.tasks
    if not copies_outlived(store.last_contact(), time.time(), cfg.retention, cfg.tombstone_grace):
        return
    dropped = store.forget_kinds((*RESTORE_KINDS, PersistKind.TOMBSTONE))
    log.warning(
        "away from the network for longer than task retention + tombstone grace: discarded "
        "%d stored task records; the tasks this peer replicates come back from other replicas",
        dropped,
    )


def _open_store(settings: AgentSettings) -> Store:
    try:
        return Store.open(settings.data_dir)
    except (StoreError, OSError) as exc:
        raise PeerStartError(str(exc)) from exc


def _api_token(settings: AgentSettings) -> str:
    """The operator's API token, or else the peer's own (generated at first start)."""
    if settings.api_token_file is not None:
        try:
            return read_token_file(settings.api_token_file)
        except TokenError as exc:
            raise SettingsError(f"api_token_file: {exc}") from None
    try:
        return load_or_create_token(settings.data_dir)
    except TokenError as exc:
        raise PeerStartError(str(exc)) from exc


def _stored_incarnation(store: PeerStore) -> int:
    """The incarnation the node last persisted (it rises when the node refutes a suspicion)."""
    raw = store.get(PersistKind.INCARNATION, b"self")
    return int.from_bytes(raw, "big") if raw else 0


def _nowhere(src: str, data: bytes) -> None:
    """Where received envelopes go until the driver exists."""


def _agent_host(
    settings: AgentSettings,
    port: DriverTaskPort,
    driver: Driver,
    signer: Signer,
    python_roles: Mapping[str, int],
) -> AgentHost:
    """The agent host of `settings.agents`, its roles installed on the driver's executor (not
    yet declared: `AgentHost.start` does that, after the replay)."""
    from peer.agents.llm import ModelClient  # litellm itself loads on first call
    from peer.agents.model_settings import LlmSettings

    llm = settings.llm or LlmSettings()
    host: AgentHost | None = None

    def network_share(model: str) -> float | None:
        return None if host is None else host.share_of(model)

    client = ModelClient(llm, clock=asyncio.get_running_loop().time, network_share=network_share)
    host = AgentHost(
        driver,
        settings.agents,
        client,
        port,
        signer=signer,
        limits=settings.limits,
        pool_settings=settings.pool,
        workspace=settings.workspace_dir(),
        python_roles=python_roles,
        network_rpm=llm.network_requests_per_minute,
    )
    return host
