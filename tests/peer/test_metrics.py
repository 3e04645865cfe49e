"""`GET /metrics` (docs/observability.md): whole peers from `build_peer` on 127.0.0.1, each with
its data directory and API on a real socket, scraped as Prometheus would."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.api_token import load_or_create_token
from peer.build import Peer, build_peer
from peer.runtime.executor import builtin_roles
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings

pytestmark = pytest.mark.asyncio

KEY = bytes(range(64, 96))
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@asynccontextmanager
async def api_peer(data_dir: Path, index: int, *, seed_only: bool = False) -> AsyncIterator[Peer]:
    """A peer serving the built-in roles (none if `seed_only`), its API on an ephemeral port,
    its store on disk."""
    settings = AgentSettings(
        bind="127.0.0.1:0",
        api="127.0.0.1:0",
        data_dir=data_dir,
        profile="local",
        no_agents=seed_only,
    )
    async with build_peer(
        settings, on_leave=lambda: None, keyring=Keyring(KEY), rng=random.Random(index)
    ) as peer:
        yield peer


async def scrape(peer: Peer, token: str | None) -> tuple[int, str, str]:
    """(status, content type, body) of `GET /metrics`, with `token` as bearer if given."""
    assert peer.api is not None
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        url = f"http://{peer.api.address}/metrics"
        async with session.get(url, headers=headers) as response:
            return response.status, response.content_type, await response.text()


async def samples(peer: Peer, token: str) -> Samples:
    """Every sample of a scrape, parsed by prometheus_client's own parser."""
    status, _, body = await scrape(peer, token)
    assert status == 200, body
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def until(check: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the limit"
        await asyncio.sleep(0.02)


async def run_tasks(peer: Peer, count: int) -> None:
    """Submit `count` echo tasks at `peer` and wait for their results."""
    ids = [peer.driver.submit("echo", b"noop", nonce=os.urandom(16)) for _ in range(count)]
    for task_id in ids:
        result = await peer.driver.wait_result(task_id, timeout=10.0)
        assert result is not None and result.outcome == "ok"


async def test_metrics_parse_and_move_as_tasks_run(tmp_path: Path) -> None:
    async with api_peer(tmp_path, 1) as peer:
        token = load_or_create_token(tmp_path)
        status, content_type, _ = await scrape(peer, token)
        assert (status, content_type) == (200, "text/plain")
        before = await samples(peer, token)
        assert value(before, "grapevine_members", status="alive") == 1
        assert value(before, "grapevine_task_claims_total") == 0
        assert value(before, "grapevine_executor_capacity") == peer.executor.max_running

        await run_tasks(peer, 5)
        after = await samples(peer, token)

    assert value(after, "grapevine_tasks", state="done") == 5
    assert value(after, "grapevine_task_claims_total") == 5
    assert value(after, "grapevine_task_executions_total", outcome="ok") == 5
    assert value(after, "grapevine_task_duplicate_executions_total") == 0
    assert value(after, "grapevine_task_submit_to_start_seconds_count") == 5
    assert value(after, "grapevine_task_submit_to_result_seconds_count") == 5
    assert value(after, "grapevine_task_submit_to_result_seconds_bucket", le="+Inf") == 5
    assert value(after, "grapevine_store_write_seconds_count") > value(
        before, "grapevine_store_write_seconds_count"
    )
    # Every executor role is listed, with its slots all free again once the tasks ended.
    for role in builtin_roles():
        assert value(after, "grapevine_executor_slots", role=role, state="used") == 0
        assert value(after, "grapevine_executor_slots", role=role, state="free") == 4
    for status in ("alive", "suspect", "dead", "left"):
        assert ("grapevine_members", (("status", status),)) in after
    for name in (
        "grapevine_probes_total",
        "grapevine_indirect_probes_total",
        "grapevine_suspicions_total",
        "grapevine_refutations_total",
        "grapevine_false_suspicions_refuted_total",
        "grapevine_task_takeovers_total",
        "grapevine_task_fenced_total",
        "grapevine_task_grants_total",
        "grapevine_task_result_flips_total",
        "grapevine_signatures_verified_total",
    ):
        assert (name, ()) in after, name


async def test_two_peers_keep_their_own_values_and_count_gossip(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(api_peer(tmp_path / "a", 1))
        b = await stack.enter_async_context(api_peer(tmp_path / "b", 2, seed_only=True))
        assert await b.driver.join([a.node.addr], timeout=5.0) == a.node.addr
        await until(lambda: len(a.node.members()) == 2 and len(b.node.members()) == 2)
        token_a, token_b = (load_or_create_token(tmp_path / n) for n in "ab")
        b0 = await samples(b, token_b)
        # Only A serves roles, so every execution is A's; B counts none of them.
        await run_tasks(a, 3)
        found_a, found_b = await samples(a, token_a), await samples(b, token_b)

    assert value(found_a, "grapevine_task_claims_total") == 3
    assert value(found_b, "grapevine_task_claims_total") == 0
    assert value(found_b, "grapevine_task_executions_total", outcome="ok") == 0
    assert value(found_a, "grapevine_members", status="alive") == 2
    assert value(found_b, "grapevine_gossip_messages_total", direction="in") > value(
        b0, "grapevine_gossip_messages_total", direction="in"
    )
    assert value(found_b, "grapevine_gossip_bytes_total", direction="out") > 0
    info_a = [k for k in found_a if k[0] == "grapevine_peer_info"]
    info_b = [k for k in found_b if k[0] == "grapevine_peer_info"]
    assert len(info_a) == len(info_b) == 1 and info_a != info_b


async def test_an_unauthenticated_scrape_is_refused(tmp_path: Path) -> None:
    async with api_peer(tmp_path, 1) as peer:
        status, _, body = await scrape(peer, None)
        assert status == 401 and "grapevine_" not in body
        status, _, body = await scrape(peer, "not-the-token")
        assert status == 401 and "grapevine_" not in body
