"""Every refusal at a peer's boundaries shows in `GET /metrics` (issue 11; docs/observability.md):
each is provoked over a real socket (the local API's guard and connection caps, the
transport's intake, the protocol's decoder) and its counter read back from a scrape."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.build import Peer, build_peer
from peer.http.app import PeerApi
from peer.http.common import MAX_BODY_BYTES
from peer.http.guard import API_REFUSALS
from peer.runtime.keyring import Keyring
from peer.runtime.sealing import Sealer
from peer.runtime.serving import ServerLimits
from peer.runtime.transport import ENVELOPE_PATH
from peer.settings import AgentSettings
from tests.peer.inprocess import API_HEADERS, API_TOKEN, MemoryStore

KEY = bytes(range(100, 132))
LIMITS = ServerLimits(
    max_connections=3, max_per_source=2, idle_timeout=30.0, linger=0.5, prove_within=1.0
)
"""Small caps, so each one is reached with a handful of sockets; loopback addresses other
than 127.0.0.1 stand for other sources."""
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Served:
    peer: Peer
    api: PeerApi

    @property
    def port(self) -> int:
        return int(self.api.address.rsplit(":", 1)[1])


@asynccontextmanager
async def served(data_dir: Path) -> AsyncIterator[Served]:
    """A whole peer (its state in memory) with its API on 127.0.0.1 under `LIMITS`."""
    settings = AgentSettings(bind="127.0.0.1:0", data_dir=data_dir, profile="local")
    async with build_peer(settings, keyring=Keyring(KEY), store=MemoryStore()) as peer:
        api = PeerApi(
            peer.driver,
            peer.transport,
            data_dir,
            lambda: None,
            token=API_TOKEN,
            metrics=peer.metrics,
            limits=LIMITS,
        )
        await api.start("127.0.0.1", 0)
        try:
            yield Served(peer, api)
        finally:
            await api.stop()


async def scrape(s: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `GET /metrics`, on a connection of its own that is closed after, retried
    while the caps are still full of connections the test just closed."""
    deadline = time.monotonic() + 5
    while True:
        try:
            async with (
                aiohttp.ClientSession(headers=API_HEADERS) as session,
                session.get(f"http://{s.api.address}/metrics") as response,
            ):
                body = await response.text()
                if response.status == 200:
                    break
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "the API never answered the scrape"
        await asyncio.sleep(0.05)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


async def refusals(s: Served) -> dict[str, float]:
    found = await scrape(s)
    return {
        reason: found[("grapevine_api_refusals_total", (("reason", reason),))]
        for reason in API_REFUSALS
    }


async def request(s: Served, head: str, body: bytes = b"", source: str = "127.0.0.1") -> str:
    """Send one raw request (`head` without its blank line) and return the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port, local_addr=(source, 0))
    try:
        writer.write(head.encode() + b"\r\n\r\n" + body)
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()


async def trusted(s: Served, source: str) -> Connection:
    """A kept-alive connection from `source` whose request carried the token."""
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port, local_addr=(source, 0))
    writer.write(
        f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n"
        f"Authorization: Bearer {API_TOKEN}\r\n\r\n".encode()
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader, writer


async def refused_at_once(s: Served, source: str) -> bytes:
    """The first line the server sends a new connection from `source` before closing it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port, local_addr=(source, 0))
    try:
        return await asyncio.wait_for(reader.readline(), 2)
    finally:
        writer.close()


def close(connections: list[Connection]) -> None:
    for _, writer in connections:
        writer.close()


async def no_connections(s: Served) -> None:
    """Wait until the API has seen every connection the test closed go."""
    deadline = time.monotonic() + 5
    while s.api.connections():
        assert time.monotonic() < deadline, f"{s.api.connections()} connections stay open"
        await asyncio.sleep(0.02)


async def test_each_api_refusal_is_counted_in_metrics(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        before = await refusals(s)
        assert before == dict.fromkeys(API_REFUSALS, 0.0)  # every reason, from the start
        found = await scrape(s)
        assert found[("grapevine_api_connections", ())] >= 1  # the scrape's own

        host = f"Host: 127.0.0.1:{s.port}"
        token = f"Authorization: Bearer {API_TOKEN}"
        wrong = "Authorization: Bearer not-the-token"
        json_post = f"POST /v1/join HTTP/1.1\r\n{host}\r\n{token}\r\nContent-Type: application/json"
        cases = [
            ("foreign_host", f"GET /v1/self HTTP/1.1\r\nHost: evil.example:{s.port}", b"", 403),
            (
                "foreign_origin",
                f"GET /v1/self HTTP/1.1\r\n{host}\r\nOrigin: http://evil.example",
                b"",
                403,
            ),
            ("token_missing", f"GET /v1/self HTTP/1.1\r\n{host}", b"", 401),
            ("token_wrong", f"GET /v1/self HTTP/1.1\r\n{host}\r\n{wrong}", b"", 401),
            (
                "unsupported_media_type",
                f"POST /v1/join HTTP/1.1\r\n{host}\r\n{token}\r\nContent-Type: text/plain\r\n"
                "Content-Length: 2",
                b"{}",
                415,
            ),
            ("bad_request", f"{json_post}\r\nContent-Length: 8", b"not json", 400),
            ("bad_request", f"GET /v1/tasks?state=%ff HTTP/1.1\r\n{host}\r\n{token}", b"", 400),
        ]
        expected = dict(before)
        for reason, head, body, status in cases:
            line = await request(s, f"{head}\r\nConnection: close", body)
            assert line.startswith(f"HTTP/1.1 {status} "), (reason, line)
            expected[reason] += 1
            assert await refusals(s) == expected, reason

        # A body over the API's limit: 413 from the handler's read, counted by the guard.
        big = b'{"seeds": ["' + b"a" * MAX_BODY_BYTES + b'"]}'
        async with (
            aiohttp.ClientSession(headers=API_HEADERS) as session,
            session.post(
                f"http://{s.api.address}/v1/join",
                data=big,
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            assert response.status == 413
        expected["body_too_large"] += 1
        assert await refusals(s) == expected

        # A body that stalls after the token checked out: 408.
        s.api.guard.body_timeout = 0.3
        line = await request(s, f"{json_post}\r\nContent-Length: 100", b'{"seeds":')
        assert line.startswith("HTTP/1.1 408 ")
        expected["body_timeout"] += 1
        assert await refusals(s) == expected

        # Bytes that are not HTTP: aiohttp answers 400 before any handler; counted all the same.
        line = await request(s, "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nNot A Header")
        assert line.split()[1] == "400"
        expected["malformed_http"] += 1
        for _ in range(50):  # counted as the answer is logged, a moment after it is written
            if await refusals(s) == expected:
                break
            await asyncio.sleep(0.02)
        assert await refusals(s) == expected

        await no_connections(s)
        # Connection caps. Two trusted connections fill 127.0.0.1's share: a third is refused.
        first = [await trusted(s, "127.0.0.1"), await trusted(s, "127.0.0.1")]
        assert (await refused_at_once(s, "127.0.0.1")).startswith(b"HTTP/1.1 503")
        # One more trusted from another source fills the API: a fourth source is refused.
        first.append(await trusted(s, "127.0.0.2"))
        assert (await refused_at_once(s, "127.0.0.3")).startswith(b"HTTP/1.1 503")
        close(first)
        await no_connections(s)
        expected["too_many_connections_from_source"] += 1
        expected["too_many_connections"] += 1
        assert await refusals(s) == expected

        await no_connections(s)
        # Unproven connections: the oldest makes room for a newcomer from its source, and the
        # other is closed when its time to prove itself is up.
        idle = [
            await asyncio.open_connection("127.0.0.1", s.port, local_addr=("127.0.0.4", 0))
            for _ in range(2)
        ]
        newcomer = await trusted(s, "127.0.0.4")
        assert (await asyncio.wait_for(idle[0][0].readline(), 2)).startswith(b"HTTP/1.1 503")
        assert (await asyncio.wait_for(idle[1][0].readline(), 3)).startswith(b"HTTP/1.1 503")
        close([*idle, newcomer])
        await no_connections(s)
        expected["unproven_evicted"] += 1
        expected["unproven_timeout"] += 1
        assert await refusals(s) == expected


async def test_transport_and_decoder_refusals_are_counted_in_metrics(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        before = await scrape(s)
        url = f"http://{s.peer.node.addr}{ENVELOPE_PATH}"
        sealer = Sealer(Keyring(KEY), os.urandom(8))
        async with aiohttp.ClientSession() as session:
            # A stranger: not the network's magic, judged from the first bytes.
            async with session.post(url, data=b"x" * 200) as response:
                assert response.status == 400
            # A frame under the network key holding no envelope: opened, then dropped by the
            # protocol's decoder.
            frame = sealer.seal(b"\x93not an envelope", time.time())
            async with session.post(url, data=frame) as response:
                assert response.status == 204
        await asyncio.sleep(0.1)  # the bulk lane hands the envelope to the node
        after = await scrape(s)

    def delta(name: str, reason: str) -> float:
        key = (name, (("reason", reason),))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("grapevine_envelopes_rejected_total", "bad_magic") == 1
    assert delta("grapevine_inputs_dropped_total", "malformed") == 1


@pytest.fixture(autouse=True)
def other_loopback_sources() -> None:
    """The caps are told apart by source address: 127.0.0.2-4 must be usable as sources."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 cannot be bound here")
