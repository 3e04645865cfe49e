"""`grapevine agent`: one peer process, from settings to a graceful exit.

Invariants:
- Start-up order: keyring and store (refusing clearly if unusable), identity, a new
  incarnation made durable *before* the node exists (so a restart always starts higher), the
  transport, the node and its driver, the API, then the join in the background. The ready line
  goes to stderr once both servers listen.
- Shutdown (SIGINT, SIGTERM or `POST /v1/leave`) is always graceful: gossip the leave and wait
  for it to go out (at most `LEAVE_TIMEOUT`), save membership hints, stop the API and the
  transport (letting in-flight sends finish briefly), close the store.
- A restart with the same data directory keeps the identity, takes a higher incarnation and
  re-joins through the members it knew, as well as the configured seeds.
- Tasks: every stored task object (record, claim, result, cancel, execution log) is replayed
  into the node, then the peer declares its roles (`Node.serve`; seed-only peers serve none),
  then it joins — the order `Node.restore` asks for. A restored node decides nothing until
  its join succeeded and a standby delay passed, so claims made while it was down arrive
  first; its own unfinished claims then resume under the same epoch. A restored peer with no
  one to join joins itself (a network of one), which releases it at once.
- Agents: with `[[agents]]` configured (and not seed-only) the agent host
  (`peer.agents.host.AgentHost`) installs its roles on the same executor after the replay and
  declares them in place of the built-ins-only set; one model client serves all its agents.
  The host is closed before the executor, so its timers stop before the executions do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bootstrap.join import join_with_retry, refresh_seeds
from bootstrap.seeds import parse_seeds
from peer.agents.host import BUILTIN_SLOTS, AgentHost
from peer.agents.offline import OFFLINE_MODEL
from peer.agents.peer_port import DriverTaskPort
from peer.http.app import PeerApi
from peer.keys import load_network_keyring
from peer.runtime.blobs import BLOBS_DIR, BlobService, BlobStore
from peer.runtime.driver import Driver
from peer.runtime.executor import Executor, builtin_roles
from peer.runtime.sealing import Keyring
from peer.runtime.serving import host_port
from peer.runtime.store import Store, StoreError
from peer.runtime.transport import Transport
from peer.settings import AgentSettings, SettingsError
from protocol.config import lan, local, wan, with_network
from protocol.identity import Signer, short_id
from protocol.node import Node
from protocol.wire import merge_envelopes

log = logging.getLogger(__name__)

LEAVE_TIMEOUT = 3.0
AGENT_SLOTS = BUILTIN_SLOTS
"""Executions of the built-in roles a peer runs at once (`max_running` of `Node.serve`); the
agent host adds its agents' slots to these."""
RESTORE_KINDS = ("task", "claim", "result", "cancel", "execution", "grant")
"""Stored task objects, in replay order: a claim needs its record, a result its claim."""


def _incarnation_record(store: Store) -> int:
    raw = store.get("incarnation", b"self")
    return int.from_bytes(raw, "big") if raw else 0


async def run_agent(
    settings: AgentSettings,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> int:
    """Run one peer until it is told to stop, then leave gracefully.

    Args:
        settings: validated settings (`peer.settings.load_settings`).
        stop: set it to make the peer leave and exit (tests; signals and the API do the same).
        handle_signals: leave on SIGINT/SIGTERM (needs the main thread).

    Returns:
        The process exit status: 0 after a graceful exit, 1 if the peer could not start
        (address in use, data directory locked), 2 if the settings are unusable (no key).
    """
    try:
        keyring = load_network_keyring(settings)
    except SettingsError as exc:
        print(f"grapevine agent: {exc}", file=sys.stderr)
        return 2
    try:
        store = Store.open(settings.data_dir)
    except (StoreError, OSError) as exc:
        print(f"grapevine agent: {exc}", file=sys.stderr)
        return 1
    try:
        return await _run(settings, keyring, store, stop or asyncio.Event(), handle_signals)
    finally:
        store.close()


async def _run(
    settings: AgentSettings,
    keyring: Keyring,
    store: Store,
    stop: asyncio.Event,
    handle_signals: bool,
) -> int:
    loop = asyncio.get_running_loop()
    try:
        signer = Signer(store.load_or_create_identity(), keyring.network_id)
    except StoreError as exc:
        print(f"grapevine agent: {exc}", file=sys.stderr)
        return 1
    incarnation = max(store.load_incarnation(), _incarnation_record(store)) + 1
    store.save_incarnation(incarnation)
    seeds = parse_seeds(list(settings.join))

    bind_host, bind_port = settings.bind_host_port()
    transport = Transport(
        bind_host, bind_port, keyring, os.urandom(8), lambda s, d: None, coalesce=merge_envelopes
    )
    try:
        await transport.start()
    except OSError as exc:
        print(
            f"grapevine agent: cannot listen on {settings.bind}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    advertise = settings.advertise_address(transport.port)
    preset = {"lan": lan, "local": local, "wan": wan}[settings.profile]
    config = with_network(preset(), keyring.network_id)
    node = Node(config, signer, advertise, random.Random(), loop.time(), incarnation)
    driver = Driver(node, transport, store)
    try:
        blobs = BlobService(BlobStore(settings.data_dir / BLOBS_DIR), transport, driver)
    except OSError as exc:
        print(f"grapevine agent: cannot open the blob store: {exc}", file=sys.stderr)
        await transport.stop()
        return 1
    transport.blob_store = blobs.store
    transport.on_receive = driver.receive
    driver.start()
    executor = Executor(builtin_roles(), AGENT_SLOTS, blobs=blobs)
    driver.attach(executor)
    restored = driver.restore(value for kind in RESTORE_KINDS for _, value in store.scan(kind))
    host: AgentHost | None = None
    if settings.agents and not settings.no_agents:
        try:
            host = _agent_host(settings, driver, blobs)
        except (ValueError, OSError) as exc:
            print(f"grapevine agent: cannot host the agents: {exc}", file=sys.stderr)
            await executor.close()
            driver.stop()
            await transport.stop()
            return 1

    api = PeerApi(driver, transport, settings.data_dir, stop.set)
    api.tasks.blobs = blobs
    api.app.router.add_get("/v1/agents", _agents_route(host, executor))
    api_host, api_port = settings.api_host_port()
    try:
        await api.start(api_host, api_port)
    except OSError as exc:
        print(
            f"grapevine agent: cannot serve the API on {settings.api}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        if host is not None:
            await host.close()
        await executor.close()
        driver.stop()
        await transport.stop()
        return 1

    if handle_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
    print(
        f"grapevine agent {short_id(signer.node_id)} listening on "
        f"{host_port(bind_host, transport.port)} (api {api.address}), "
        f"network {keyring.network_id.hex()[:8]}",
        file=sys.stderr,
        flush=True,
    )
    log.info(
        "advertising %s, incarnation %d, profile %s%s",
        advertise,
        incarnation,
        settings.profile,
        ", seed-only (no agents)" if settings.no_agents else "",
    )

    hints = [addr for _, addr, _ in store.load_members() if addr != advertise]
    driver.hints = set(hints)
    background: list[asyncio.Task[Any]] = []
    if restored:
        log.info("restored %d stored task objects", restored)
    if settings.no_agents:
        driver.serve((), 0)
    elif host is not None:
        host.start()
        log.info("hosting %d agents; roles %s", len(settings.agents), ", ".join(host.roles))
    else:
        driver.serve(executor.roles, executor.max_running)
    if restored and not (seeds or hints):
        driver.join_now([advertise])
    if seeds or hints:
        background.append(
            loop.create_task(
                join_with_retry(
                    seeds,
                    driver.join,
                    hints=hints,
                    failure_reason=transport.last_failure.get,
                )
            )
        )
        background.append(loop.create_task(refresh_seeds(seeds, driver.join_now)))
    try:
        await stop.wait()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)
        log.info("leaving the network")
        done = await driver.leave(LEAVE_TIMEOUT)
        if not done:
            log.warning("leave not confirmed within %.0f s; exiting anyway", LEAVE_TIMEOUT)
        if host is not None:
            await host.close()
        await executor.close()
        driver.stop()
        await api.stop()
        await transport.stop()
    print(f"grapevine agent {short_id(signer.node_id)} left", file=sys.stderr, flush=True)
    return 0


def _agent_host(settings: AgentSettings, driver: Driver, blobs: BlobService) -> AgentHost:
    """The agent host of `settings.agents`, its roles installed on the driver's executor (not
    yet declared: `AgentHost.start` does that, after the replay)."""
    from peer.agents.llm import LlmSettings, ModelClient  # litellm itself loads on first call

    llm = settings.llm or LlmSettings()
    host: AgentHost | None = None

    def network_share(model: str) -> float | None:
        return None if host is None else host.share_of(model)

    client = ModelClient(llm, clock=asyncio.get_running_loop().time, network_share=network_share)
    host = AgentHost(
        driver,
        settings.agents,
        client,
        DriverTaskPort(driver, blobs),
        limits=settings.limits,
        pool_settings=settings.pool,
        workspace=settings.workspace_dir(),
        network_rpm=llm.network_requests_per_minute,
    )
    return host


def _agents_route(
    host: AgentHost | None, executor: Executor
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /v1/agents: the agent host's status (the built-in roles only without agents)."""

    async def agents(request: web.Request) -> web.Response:
        if host is None:
            return web.json_response({"agents": [], "roles": list(executor.roles)})
        return web.json_response(host.status())

    return agents


def main_agent(settings: AgentSettings) -> int:
    """Configure logging from `settings` and run the peer to completion (blocking).

    Returns:
        The exit status `run_agent` returned (130 if interrupted before it could leave).
    """
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if _needs_litellm(settings):
            # Importing litellm takes seconds of CPU; on the event loop that would stall the
            # peer long enough for others to suspect it, so pay it before the peer exists.
            from peer.agents.llm import import_litellm

            import_litellm()
        return asyncio.run(run_agent(settings))
    except KeyboardInterrupt:
        return 130


def _needs_litellm(settings: AgentSettings) -> bool:
    """Whether an agent's model calls go through litellm (all but the direct offline model)."""
    if settings.no_agents or not settings.agents:
        return False
    via_litellm = settings.llm is None or settings.llm.offline_via_litellm
    return any(spec.model != OFFLINE_MODEL or via_litellm for spec in settings.agents)
