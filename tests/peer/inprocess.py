"""In-process peers for tests: whole peers from `build_peer` on 127.0.0.1, their durable state
in memory, no API (tests serve one through aiohttp's test client when they need it, guarded by
`API_TOKEN`, which their clients send as `API_HEADERS`)."""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.build import AGENT_SLOTS, Peer, build_peer
from peer.runtime.executor import RoleHandler
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings
from protocol.effects import Persist, PersistKind

API_TOKEN = "in-process-test-token"
"""The bearer token of the APIs tests serve for their in-process peers."""
API_HEADERS = {"Authorization": f"Bearer {API_TOKEN}"}
JSON_BODY = {"Content-Type": "application/json"}
"""The header of a raw request body the API should read as JSON (it refuses other types)."""


class MemoryStore:
    """A peer's durable state kept in memory (these tests never restart a peer from disk).

    Args:
        incarnation: the incarnation a previous run stored (the peer starts one higher).
    """

    def __init__(self, incarnation: int = 0) -> None:
        self.identity = Ed25519PrivateKey.generate().private_bytes_raw()
        self.incarnation = incarnation
        self.records: dict[tuple[str, bytes], bytes] = {}
        self.members: list[tuple[bytes, str, int]] = []
        self.model_usage: dict[str, dict[str, object]] = {}

    def load_or_create_identity(self) -> bytes:
        return self.identity

    def load_incarnation(self) -> int:
        return self.incarnation

    def save_incarnation(self, incarnation: int) -> None:
        self.incarnation = incarnation

    def get(self, kind: str, key: bytes) -> bytes | None:
        return self.records.get((kind, key))

    def scan(self, kind: str) -> Iterator[tuple[bytes, bytes]]:
        return iter([(key, value) for (k, key), value in self.records.items() if k == kind])

    def put_many(self, records: Iterable[Persist]) -> None:
        for record in records:
            if record.kind == PersistKind.FORGET_TASK:
                for kind, key in [k for k in self.records if k[1].startswith(record.key)]:
                    if kind != PersistKind.TOMBSTONE:
                        del self.records[kind, key]
            elif record.kind == PersistKind.FORGET_TOMBSTONE:
                self.records.pop((PersistKind.TOMBSTONE, record.key), None)
            else:
                self.records[record.kind, record.key] = record.value

    def last_contact(self) -> int | None:
        return max((seen for _, _, seen in self.members), default=None)

    def forget_kinds(self, kinds: Iterable[str]) -> int:
        doomed = [k for k in self.records if k[0] in set(kinds)]
        for k in doomed:
            del self.records[k]
        return len(doomed)

    def save_members(self, rows: Iterable[tuple[bytes, str, int]]) -> None:
        self.members = list(rows)

    def load_members(self) -> list[tuple[bytes, str, int]]:
        return list(self.members)

    def save_model_usage(self, usage: Mapping[str, Mapping[str, object]]) -> None:
        self.model_usage = {key: dict(totals) for key, totals in usage.items()}

    def load_model_usage(self) -> dict[str, dict[str, object]]:
        return {key: dict(totals) for key, totals in self.model_usage.items()}


@asynccontextmanager
async def in_process_peer(
    index: int,
    key: bytes,
    incarnation: int = 1,
    *,
    roles: Mapping[str, RoleHandler] | None = None,
    max_running: int = AGENT_SLOTS,
    seed_only: bool = False,
    store: MemoryStore | None = None,
    data_dir: Path | None = None,
    task_retention: float | None = None,
) -> AsyncIterator[Peer]:
    """A started peer on an ephemeral port, its node on the local profile, stopped on exit.

    Args:
        index: seeds the node's randomness, so a test runs the same way every time.
        key: the network key.
        incarnation: the node's incarnation.
        roles: what its executor runs (the built-in roles by default), `max_running` at once.
        seed_only: declare no roles (the executor is attached but never given work).
        store: its durable state (a fresh `MemoryStore` by default).
        data_dir: where its blobs go (a temporary directory, removed on exit, by default).
        task_retention: its `--task-retention` (the default, 24 hours, by default).
    """
    with tempfile.TemporaryDirectory() as scratch:
        settings = AgentSettings(
            bind="127.0.0.1:0",
            data_dir=data_dir or Path(scratch),
            profile="local",
            no_agents=seed_only,
            **({} if task_retention is None else {"task_retention": task_retention}),
        )
        async with build_peer(
            settings,
            keyring=Keyring(key),
            store=store or MemoryStore(incarnation - 1),
            roles=roles,
            max_running=max_running,
            rng=random.Random(index),
        ) as peer:
            yield peer


async def joined_peers(stack: AsyncExitStack, count: int, key: bytes) -> list[Peer]:
    """`count` in-process peers (stopped when `stack` closes), each joined through the first,
    once every one sees every peer serving "echo" (so all rank a task's candidates alike)."""
    peers = [await stack.enter_async_context(in_process_peer(i, key)) for i in range(count)]
    for other in peers[1:]:
        assert await other.driver.join([peers[0].driver.node.addr], timeout=5.0) is not None
    async with asyncio.timeout(10):
        while any(len(p.driver.node.capable("echo")) < count for p in peers):
            await asyncio.sleep(0.05)
    return peers
