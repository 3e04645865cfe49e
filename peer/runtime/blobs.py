"""Blobs on a peer: the service that spreads blobs to, and fetches them from, the peers
`protocol.blobs.blob_holders` names, and sweeps the pushed blobs no task references (the store
on disk is `peer.runtime.blob_store`).

Invariants:
- An input blob is acknowledged only when held here and by `replication` other live peers,
  the first ones in rendezvous order that accept it (the same promise as a task record); if
  fewer accept, `BlobUnavailable` is raised and the caller submits nothing.
- An output blob is held here (the result's owner) and pushed to `replication` peers in
  rendezvous order on a best-effort basis: the execution already happened, so a failed push is
  logged and counted, not turned into a failed task.
- Fetching asks, in order: the live peers in rendezvous order, the hint peers (a task's origin
  or owner), then the remaining live peers; `FETCH_ROUNDS` rounds with backoff. No answer
  larger than the blob's referenced size is read. A fetched blob is stored here, so the next
  reader finds it locally.
- A blob another peer pushed here that no task held here references `grace` seconds after it
  arrived is deleted (`sweep`, every `SWEEP_INTERVAL` while started), so a member pushing blobs
  no task uses costs a peer at most the store's quota, for at most the grace period.
- Disk reads, writes and hashing of whole blobs run in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from peer.runtime.blob_routes import BlobTransferError
from peer.runtime.blob_store import BlobStore
from peer.runtime.driver import Driver
from peer.runtime.executor import Work
from protocol.blobs import (
    BLOB_LIMIT,
    DIGEST_BYTES,
    blob_holders,
    blob_ref,
    parse_blob_ref,
)
from protocol.wire import Status

log = logging.getLogger(__name__)

FETCH_ROUNDS = 4
"""Rounds of asking every candidate before a fetch gives up."""
FETCH_BACKOFF = 0.25
"""Seconds before the second round; doubled before each later one (0.25, 0.5, 1.0)."""
FETCH_CANDIDATES = 16
"""Peers asked per round at most; more could not plausibly hold a blob they were not pushed."""
UNREFERENCED_GRACE = 3600.0
"""Seconds a blob pushed here may wait for a task held here to reference it before it is
deleted. A submitter pushes an input only just before it submits, so a minute would do for the
record to arrive; the margin covers a peer that learns of the task late."""
SWEEP_INTERVAL = 300.0
"""Seconds between two sweeps of unreferenced pushed blobs."""


class BlobUnavailable(Exception):
    """A blob could not be stored where it must be, or fetched from anywhere."""


class BlobTransport(Protocol):
    """Moves blobs between peers (`peer.runtime.transport.Transport`)."""

    async def push_blob(self, addr: str, digest: bytes, data: bytes) -> None: ...

    async def fetch_blob(self, addr: str, digest: bytes, size: int) -> bytes | None: ...


class BlobService:
    """Stores, spreads and fetches the blobs of one peer; the executor's and API's blob port.

    Args:
        store: this peer's blob store.
        transport: sends and fetches blobs (serve `store` on it: `transport.blob_store`).
        driver: the peer's driver, for the live members and the tasks' origins and owners.
        fetch_backoff: seconds before the second fetch round (doubled each round).
        grace: seconds a blob pushed here may wait for a task referencing it (see
            `UNREFERENCED_GRACE`).
        wall: wall-clock seconds; the receipt times `sweep` compares with are file times.
    """

    def __init__(
        self,
        store: BlobStore,
        transport: BlobTransport,
        driver: Driver,
        *,
        fetch_backoff: float = FETCH_BACKOFF,
        grace: float = UNREFERENCED_GRACE,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.transport = transport
        self.driver = driver
        self.fetch_backoff = fetch_backoff
        self.grace = grace
        self._wall = wall
        self._sweeper: asyncio.Task[None] | None = None
        self.counters: Counter[str] = Counter()
        """Blob activity: "pushed", "push failures", "fetched", "fetch failures",
        "outputs unreplicated" (an output blob no other peer accepted), "swept" (pushed
        blobs deleted because no task referenced them)."""

    @property
    def replication(self) -> int:
        """Other peers that must hold an input blob: as many as must hold a task record."""
        return self.driver.node.copies_needed()

    # The executor's port

    async def resolve_input(self, work: Work) -> bytes:
        """Return the bytes a reference input stands for (the input itself if it is none).

        Raises:
            BlobUnavailable: "input blob <digest> unavailable: <why>".
        """
        ref = parse_blob_ref(work.input)
        if ref is None:
            return work.input
        digest, size = ref
        state = self.driver.node.task(work.task_id)
        hints = [state.record.origin] if state is not None and state.record is not None else []
        try:
            data = await self.get(digest, hints, size=size)
        except BlobUnavailable as exc:
            raise BlobUnavailable(f"input blob {digest.hex()} unavailable: {exc}") from None
        if len(data) != size:
            raise BlobUnavailable(
                f"input blob {digest.hex()} unavailable: it holds {len(data)} bytes, "
                f"the reference says {size}"
            )
        return data

    async def store_output(self, work: Work, output: bytes) -> bytes:
        """Hold an output too large to inline as a blob here, push it to `replication` peers
        in rendezvous order (best effort), and return its reference.

        Raises:
            ValueError: the output is not of blob size.
            OSError: it cannot be stored here.
        """
        ref = blob_ref(output)
        digest = await asyncio.to_thread(self.store.put, output)
        held = await self.replicate(digest, output, self.replication)
        if len(held) < self.replication:
            self.counters["outputs unreplicated"] += 1
            log.warning(
                "task %s: output blob %s is held here and by %d of %d other peer(s)",
                work.task_id.hex()[:12],
                digest.hex()[:12],
                len(held),
                self.replication,
            )
        return ref

    # The API's side

    async def store_input(self, data: bytes) -> bytes:
        """Hold `data` here and at `replication` other live peers; return its reference.

        Raises:
            ValueError: `data` is not of blob size.
            BlobUnavailable: fewer than `replication` other peers accepted it (the message says
                how many were asked and why they failed).
            OSError: it cannot be stored here.
        """
        ref = blob_ref(data)
        digest = await asyncio.to_thread(self.store.put, data)
        failures: list[str] = []
        held = await self.replicate(digest, data, self.replication, failures)
        if len(held) < self.replication:
            why = "; ".join(failures) if failures else "no other live peer"
            raise BlobUnavailable(
                f"input blob {digest.hex()} is held here but by {len(held)} of the "
                f"{self.replication} other peer(s) it must be ({why})"
            )
        return ref

    async def get(
        self, digest: bytes, hints: Sequence[bytes] = (), *, size: int | None = None
    ) -> bytes:
        """Return the blob named `digest`: from here, else fetched (and then kept here).

        Args:
            digest: the blob's digest.
            hints: node ids worth asking after the rendezvous holders (origin, owner).
            size: its size, from the reference; None looks it up in the references of the
                tasks held here (`BLOB_LIMIT` if none has it). No larger answer is read.

        Raises:
            BlobUnavailable: no peer asked had it within `FETCH_ROUNDS` rounds; the message
                names the last failure of each.
        """
        data = await asyncio.to_thread(self.store.get, digest)
        if data is not None:
            return data
        if size is None:
            size = referenced_blobs(self.driver).get(digest, BLOB_LIMIT)
        delay = self.fetch_backoff
        failures: dict[str, str] = {}
        for round_ in range(FETCH_ROUNDS):
            if round_:
                await asyncio.sleep(delay)
                delay *= 2
            for addr in self._fetch_order(digest, hints):
                try:
                    data = await self.transport.fetch_blob(addr, digest, size)
                except BlobTransferError as exc:
                    failures[addr] = exc.reason
                    self.counters["fetch failures"] += 1
                    continue
                if data is None:
                    failures[addr] = "not held there"
                    continue
                self.counters["fetched"] += 1
                await asyncio.to_thread(self.store.receive, digest, data)
                return data
        if not failures:
            raise BlobUnavailable("not held here and no other peer is known")
        asked = ", ".join(f"{addr}: {why}" for addr, why in sorted(failures.items()))
        raise BlobUnavailable(f"not held here; asked {len(failures)} peer(s) ({asked})")

    # Sweeping

    def start(self) -> None:
        """Sweep unreferenced pushed blobs every `SWEEP_INTERVAL` seconds until `close`."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        """Stop sweeping."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def sweep(self) -> list[bytes]:
        """Delete the blobs other peers pushed here more than `grace` seconds ago that no task
        held here references.

        Returns:
            The digests deleted.

        Raises:
            OSError: the blob directory cannot be written.
        """
        referenced = referenced_blobs(self.driver)
        deleted = await asyncio.to_thread(self.store.sweep, referenced, self._wall(), self.grace)
        if deleted:
            self.counters["swept"] += len(deleted)
            log.info("deleted %d pushed blob(s) no task held here references", len(deleted))
        return deleted

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except OSError as exc:
                log.warning("sweeping unreferenced blobs failed: %s", exc)

    # Spreading

    async def replicate(
        self, digest: bytes, data: bytes, k: int, failures: list[str] | None = None
    ) -> list[bytes]:
        """Push a blob held here to the first `k` live peers, in rendezvous order, that
        accept it; a peer that fails is replaced by the next one.

        Returns:
            The node ids that now hold it (at most `k`).
        """
        if k <= 0:
            return []
        addrs = self._live()
        ranked = blob_holders(digest, addrs, len(addrs))
        held: list[bytes] = []
        for node_id in ranked:
            if len(held) >= k:
                break
            # A push wave of k at a time would be faster; one at a time keeps memory and the
            # link to one copy in flight, and replication is 1 by default.
            addr = addrs[node_id]
            try:
                await self.transport.push_blob(addr, digest, data)
            except BlobTransferError as exc:
                self.counters["push failures"] += 1
                if failures is not None:
                    failures.append(f"{addr}: {exc.reason}")
                continue
            self.counters["pushed"] += 1
            held.append(node_id)
        return held

    def _live(self, statuses: Iterable[Status] = (Status.ALIVE,)) -> dict[bytes, str]:
        """Node id -> address of the other members in one of `statuses`."""
        node = self.driver.node
        wanted = set(statuses)
        return {
            m.node_id: m.addr
            for m in node.members()
            if m.node_id != node.node_id and m.status in wanted
        }

    def _fetch_order(self, digest: bytes, hints: Sequence[bytes]) -> list[str]:
        node = self.driver.node
        up = self._live((Status.ALIVE, Status.SUSPECT))
        ranked = blob_holders(digest, up, len(up))
        first = ranked[: self.replication + 2]  # the holders, with room for a membership change
        order = list(first)
        for node_id in hints:
            if node_id not in order and node_id != node.node_id:
                order.append(node_id)
        order += [node_id for node_id in ranked if node_id not in order]
        addrs: list[str] = []
        for node_id in order[:FETCH_CANDIDATES]:
            addr = up.get(node_id)
            if addr is None:
                member = node.member(node_id)  # a hint that is down may be back by now
                addr = member.addr if member is not None else None
            if addr is not None and addr not in addrs:
                addrs.append(addr)
        return addrs


def blob_hints(driver: Driver, digest: bytes) -> list[bytes]:
    """The peers likely to hold the blob `digest`: the origins of tasks whose input references
    it and the owners of results whose output does."""
    hints: list[bytes] = []
    for state in driver.node.held_tasks():
        rec, acc = state.record, state.accepted
        if rec is not None and _names(rec.input, digest) and rec.origin not in hints:
            hints.append(rec.origin)
        for result in state.results.values():
            if _names(result.output, digest) and result.owner not in hints:
                hints.append(result.owner)
        if acc is not None and _names(acc.output, digest) and acc.owner not in hints:
            hints.insert(0, acc.owner)
    return hints


def referenced_blobs(driver: Driver) -> dict[bytes, int]:
    """Digest -> size of every blob a task held here references: its record's input, any of
    its results' outputs."""
    refs: dict[bytes, int] = {}
    for state in driver.node.held_tasks():
        payloads = [result.output for result in state.results.values()]
        if state.record is not None:
            payloads.append(state.record.input)
        if state.accepted is not None:
            payloads.append(state.accepted.output)
        for payload in payloads:
            ref = parse_blob_ref(payload)
            if ref is not None:
                refs[ref[0]] = ref[1]
    return refs


def _names(payload: bytes, digest: bytes) -> bool:
    ref = parse_blob_ref(payload)
    return ref is not None and ref[0] == digest


def digest_of_text(text: str) -> bytes | None:
    """Parse a blob digest given as 64 hex digits (any case); None if it is not one."""
    text = text.strip().lower()
    if len(text) != 2 * DIGEST_BYTES or any(c not in "0123456789abcdef" for c in text):
        return None
    return bytes.fromhex(text)
