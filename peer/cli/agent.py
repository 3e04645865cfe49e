"""`grapevine agent`: one peer process, from settings to a graceful exit.

The peer itself is wired and taken apart by `peer.build.build_peer`; this module adds
what makes it a command.

Invariants:
- Exit status: 0 after a graceful exit, 1 if the peer could not start (address in use, data
  directory locked, database corrupt or unwritable, ...), 2 if the settings are unusable (no
  key); the reason goes to stderr as one line, never a traceback.
- The ready line goes to stderr once both servers listen, then the dashboard's one-time
  login URL (peer.http.dashboard); a last line once the peer left.
- Shutdown (SIGINT, SIGTERM or `POST /v1/leave`) is always graceful: gossip the leave and wait
  for it to go out (at most `LEAVE_TIMEOUT`), then `build_peer` stops the parts.
- A restart with the same data directory keeps the identity, takes a higher incarnation and
  re-joins through the members it knew, as well as the configured seeds. A peer that restored
  task objects and has no one to join joins itself (a network of one), which releases it at
  once: a restored node decides nothing until its join succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bootstrap.join import join_with_retry, refresh_seeds
from bootstrap.seeds import parse_seeds
from peer.agents.offline import OFFLINE_MODEL
from peer.build import Peer, PeerStartError, build_peer
from peer.observability.logs import configure_logging
from peer.runtime.store import StoreError
from peer.runtime.transport import is_final_refusal
from peer.settings import AgentSettings, SettingsError
from protocol.identity import short_id

if TYPE_CHECKING:
    from peer.python_api.roles import Role

log = logging.getLogger(__name__)

LEAVE_TIMEOUT = 3.0
GC_YOUNG_THRESHOLD = 10_000
"""Container objects allocated (net) between two collections of Python's youngest generation;
the interpreter's default is 700. A busy peer makes and drops thousands of objects per
task, most within a turn of the loop: at 700 the collector ran several hundred times a
second, promoted objects that were about to die, and those promotions triggered full
collections of everything the peer holds (145 ms each with 20,000 tasks held). About 8% of
a soak peer's CPU went to the collector, 3.6% at 10,000 (decision 83)."""


async def run_agent(
    settings: AgentSettings,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
    python_roles: Sequence[Role] = (),
) -> int:
    """Run one peer until it is told to stop, then leave gracefully.

    Args:
        settings: validated settings (`peer.settings.load_settings`).
        stop: set it to make the peer leave and exit (tests; signals and the API do the same).
        handle_signals: leave on SIGINT/SIGTERM (needs the main thread).
        python_roles: roles served by Python functions (`--handlers`, `peer.run`).

    Returns:
        The process exit status: 0 after a graceful exit, 1 if the peer could not start
        (address in use, data directory locked), 2 if the settings are unusable (no key).
    """
    stop = stop or asyncio.Event()
    try:
        async with build_peer(settings, on_leave=stop.set, python_roles=python_roles) as peer:
            await _run_until_stopped(settings, peer, stop, handle_signals)
    except SettingsError as exc:
        print(f"grapevine agent: {exc}", file=sys.stderr)
        return 2
    except (PeerStartError, StoreError) as exc:
        # StoreError: the data directory failed while starting (say, a full disk for the new
        # incarnation); one line naming the file beats a traceback.
        print(f"grapevine agent: {exc}", file=sys.stderr)
        return 1
    print(f"grapevine agent {short_id(peer.node.node_id)} left", file=sys.stderr, flush=True)
    return 0


async def _run_until_stopped(
    settings: AgentSettings, peer: Peer, stop: asyncio.Event, handle_signals: bool
) -> None:
    """Announce the peer, join in the background, wait for `stop`, then leave."""
    loop = asyncio.get_running_loop()
    driver, node = peer.driver, peer.node
    if handle_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
    assert peer.api is not None  # built with `on_leave`
    print(
        f"grapevine agent {short_id(node.node_id)} listening on {peer.listening} "
        f"(api {peer.api.address}), "
        f"network {peer.keyring.network_id.hex()[:8]}",
        file=sys.stderr,
        flush=True,
    )
    login = peer.api.dashboard.login_url(peer.api.address)
    if login is not None:
        print(f"dashboard: {login} (the link works once)", file=sys.stderr, flush=True)
    log.info(
        "advertising %s, incarnation %d, profile %s%s",
        node.addr,
        node.incarnation,
        settings.profile,
        ", seed-only (no agents)" if settings.no_agents else "",
    )

    seeds = parse_seeds(list(settings.join))
    background: list[asyncio.Task[Any]] = []
    if peer.restored and not (seeds or peer.hints):
        driver.join_now([node.addr])
    if seeds or peer.hints:
        background.append(
            loop.create_task(
                join_with_retry(
                    seeds,
                    driver.join,
                    hints=peer.hints,
                    failure_reason=peer.transport.last_failure.get,
                    final=is_final_refusal,
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


def main_agent(settings: AgentSettings, python_roles: Sequence[Role] = ()) -> int:
    """Configure logging from `settings` and run the peer to completion (blocking).

    Args:
        settings: validated settings, code agents included.
        python_roles: roles served by Python functions (`--handlers`, `peer.run`).

    Returns:
        The exit status `run_agent` returned (130 if interrupted before it could leave).
    """
    configure_logging(settings.log_level, settings.log_format, sys.stderr)
    tune_garbage_collector()
    try:
        if _needs_litellm(settings):
            # Importing litellm takes seconds of CPU; on the event loop that would stall the
            # peer long enough for others to suspect it, so pay it before the peer exists.
            from peer.agents.llm import import_litellm
            from peer.agents.model_settings import LlmSettings, unset_provider_keys

            litellm = import_litellm()
            for line in unset_provider_keys(
                settings.agents,
                settings.llm or LlmSettings(),
                lambda model: dict(litellm.validate_environment(model=model)),
            ):
                log.warning("%s", line)
        return asyncio.run(run_agent(settings, python_roles=python_roles))
    except KeyboardInterrupt:
        return 130


def tune_garbage_collector() -> None:
    """Collect the youngest generation every `GC_YOUNG_THRESHOLD` allocations, not 700: for
    the peer process alone (a library's host process keeps its own settings)."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def _needs_litellm(settings: AgentSettings) -> bool:
    """Whether an agent's model calls go through litellm (all but the direct offline model)."""
    if settings.no_agents or not settings.agents:
        return False
    via_litellm = settings.llm is None or settings.llm.offline_via_litellm
    return any(spec.model != OFFLINE_MODEL or via_litellm for spec in settings.agents)
