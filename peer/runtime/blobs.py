"""Blobs on a peer: the service that pushes blobs to, and fetches them from, the designated
holders of their tasks (`protocol.blobs.designated_holders`), takes the pushes of other peers
only as such a holder, and deletes blobs once no task held here needs them (the store on disk
is `peer.runtime.blob_store`, the references index `peer.runtime.blob_references`).

Invariants:
- Every push names the task the blob is for. An input blob is pushed before its task is
  submitted, under the id the submission will give it (`Driver.task_id_for`), and acknowledged
  only when held here and by `replication` other live peers, the first of the task's
  designated holders that accept it (the same promise as a task record); if fewer accept,
  `BlobUnavailable` is raised and the caller submits nothing.
- An output blob is held here (the result's owner) and pushed to `replication` designated
  holders of its task on a best-effort basis: the execution already happened, so a failed push
  is logged and counted, not turned into a failed task.
- A push from another peer is admitted (`admit_push`) only when this peer is one of the task's
  designated holders in its own view of the live members, the task is not compacted here, and
  the store's quota has room; else it is refused before its data is read ("blob_not_holder",
  "blob_over_quota"), and nothing is stored.
- Fetching asks, in order: the hint peers (the task's designated holders, its origin or
  owner), then the other live peers in rendezvous order of the digest; `FETCH_ROUNDS` rounds
  with backoff. No answer larger than the blob's referenced size is read. A fetched blob is
  stored here, so the next reader finds it locally.
- Deletion (`peer.runtime.blob_references.collectable`, the one rule): a blob is deleted once
  no task here needs it — none held here references it, and it was not stored or admitted for
  a task still on its way — either as soon as the last task that needed it is forgotten
  (compacted), or `grace` seconds after it was last stored. Forgotten tasks are learnt from
  the records the driver writes (`note_written`), so their blobs go within moments; a sweep at
  start and every `SWEEP_INTERVAL` rebuilds the references from the held tasks and deletes the
  rest (a push whose task never came, a failed submission's input, a copy fetched for a read,
  blobs of tasks forgotten before a restart). Nothing a held task references is deleted, and
  while the driver cannot write (degraded), so the records it wrote lag its tasks, only sweeps
  delete.
- Disk reads, writes and hashing of whole blobs run in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from peer.runtime.blob_references import BlobReferences, collectable, task_blobs
from peer.runtime.blob_routes import NO_TASK, BlobTransferError
from peer.runtime.blob_store import BlobStore, BlobWriter
from peer.runtime.driver import Driver
from peer.runtime.executor import Work
from protocol.blobs import (
    BLOB_LIMIT,
    DIGEST_BYTES,
    REF_PREFIX,
    blob_digest,
    blob_holders,
    designated_holders,
    is_blob_size,
    make_ref,
    parse_blob_ref,
)
from protocol.effects import Persist, PersistKind
from protocol.wire import Status

log = logging.getLogger(__name__)

FETCH_ROUNDS = 4
"""Rounds of asking every candidate before a fetch gives up."""
FETCH_BACKOFF = 0.25
"""Seconds before the second round; doubled before each later one (0.25, 0.5, 1.0)."""
FETCH_CANDIDATES = 16
"""Peers asked per round at most; more could not plausibly hold a blob they were not pushed."""
UNREFERENCED_GRACE = 3600.0
"""Seconds a blob stored here may wait for a task held here to reference it before it is
deleted. A submitter pushes an input only just before it submits, so a minute would do for the
record to arrive; the margin covers a peer that learns of the task late, and keeps a copy
fetched for a read (of a task held elsewhere) for repeated reads."""
SWEEP_INTERVAL = 300.0
"""Seconds between two sweeps of the blobs no task held here references."""
_TASK_KINDS = (PersistKind.TASK, PersistKind.RESULT)


class BlobUnavailable(Exception):
    """A blob could not be stored where it must be, or fetched from anywhere."""


class BlobTransport(Protocol):
    """Moves blobs between peers (`peer.runtime.transport.Transport`)."""

    async def push_blob(
        self, addr: str, digest: bytes, data: bytes, task_id: bytes = NO_TASK
    ) -> None: ...

    async def fetch_blob(self, addr: str, digest: bytes, size: int) -> bytes | None: ...


class BlobService:
    """Stores, spreads, fetches and deletes the blobs of one peer; the executor's and API's blob
    port. Serve `holder` on the transport (``transport.blob_store = service.holder``) and give
    the driver `note_written` (``driver.disk.on_written``).

    Args:
        store: this peer's blob store.
        transport: sends and fetches blobs.
        driver: the peer's driver, for the live members and the tasks held here.
        fetch_backoff: seconds before the second fetch round (doubled each round).
        grace: seconds a blob may wait for a task referencing it (see `UNREFERENCED_GRACE`).
        wall: wall-clock seconds; blob times are file times.
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
        self.holder = GatedStore(self)
        """The transport's `peer.runtime.blob_routes.BlobHolder`: the store, behind
        `admit_push`."""
        self.references = BlobReferences()
        self._released = asyncio.Event()
        self._collector: asyncio.Task[None] | None = None
        self.counters: Counter[str] = Counter()
        """Blob activity: "pushed", "push failures", "fetched", "fetch failures",
        "outputs unreplicated" (an output blob no other peer accepted), "deleted with tasks"
        (blobs whose last task here was forgotten), "swept" (blobs deleted because no task
        held here referenced them for the grace period)."""

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
        hints = self.task_holders(work.task_id)
        state = self.driver.node.task(work.task_id)
        if state is not None and state.record is not None:
            hints.append(state.record.origin)
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
        """Hold an output too large to inline as a blob here, push it to `replication`
        designated holders of its task (best effort), and return its reference.

        Raises:
            ValueError: the output is not of blob size.
            OSError: it cannot be stored here.
        """
        digest = await self._put(work.task_id, output)
        held = await self._replicate(work.task_id, digest, output)
        if len(held) < self.replication:
            self.counters["outputs unreplicated"] += 1
            log.warning(
                "task %s: output blob %s is held here and by %d of %d other peer(s)",
                work.task_id.hex()[:12],
                digest.hex()[:12],
                len(held),
                self.replication,
            )
        return make_ref(digest, len(output))

    # The API's side

    async def store_input(self, data: bytes, task_id: bytes) -> bytes:
        """Hold `data` here and at `replication` designated holders of the task `task_id` (the
        id its submission will get: `Driver.task_id_for` of its reference); return its
        reference.

        Raises:
            ValueError: `data` is not of blob size.
            BlobUnavailable: fewer than `replication` other peers accepted it (the message says
                how many were asked and why they failed).
            OSError: it cannot be stored here.
        """
        digest = await self._put(task_id, data)
        failures: list[str] = []
        held = await self._replicate(task_id, digest, data, failures)
        if len(held) < self.replication:
            why = "; ".join(failures) if failures else "no other live peer"
            raise BlobUnavailable(
                f"input blob {digest.hex()} is held here but by {len(held)} of the "
                f"{self.replication} other peer(s) it must be ({why})"
            )
        return make_ref(digest, len(data))

    async def get(
        self, digest: bytes, hints: Sequence[bytes] = (), *, size: int | None = None
    ) -> bytes:
        """Return the blob named `digest`: from here, else fetched (and then kept here).

        Args:
            digest: the blob's digest.
            hints: node ids to ask first (its tasks' designated holders, origin, owner).
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
            raise BlobUnavailable("not held here and no other live peer is known")
        asked = ", ".join(f"{addr}: {why}" for addr, why in sorted(failures.items()))
        raise BlobUnavailable(f"not held here; asked {len(failures)} peer(s) ({asked})")

    def task_holders(self, task_id: bytes) -> list[bytes]:
        """The designated holders of the blobs of `task_id` in this peer's view, itself
        excluded, in the order they are pushed to."""
        node = self.driver.node
        up = [m.node_id for m in node.members() if m.up]
        replication = node.config.tasks.replication
        return [n for n in designated_holders(task_id, up, replication) if n != node.node_id]

    # The transport's side

    def admit_push(self, task_id: bytes, digest: bytes, size: int) -> str | None:
        """Admit a push of the blob `digest` (`size` bytes) for the task `task_id` only when
        this peer is one of the task's designated holders in its own view and the task is not
        compacted here, then within the store's quota.

        Returns:
            None when admitted (pair with `release_push`); else "blob_not_holder" or
            "blob_over_quota", and nothing is set aside.
        """
        node = self.driver.node
        if task_id == NO_TASK or node.tombstone(task_id) is not None:
            return "blob_not_holder"
        up = [m.node_id for m in node.members() if m.up]
        if node.node_id not in designated_holders(task_id, up, node.config.tasks.replication):
            return "blob_not_holder"
        refusal = self.store.admit_push(task_id, digest, size)
        if refusal is None:
            self.references.note(task_id, [digest], self._wall())  # before its record comes
        return refusal

    # Deletion

    def note_written(self, records: list[Persist]) -> None:
        """The driver wrote `records` (`GroupCommit.on_written`): index the blob references of the
        tasks and results among them, and release the blobs of the tasks forgotten."""
        now = self._wall()
        node = self.driver.node
        for record in records:
            if record.kind == PersistKind.FORGET_TASK:
                self.references.forget(record.key)
            elif record.kind in _TASK_KINDS and REF_PREFIX in record.value:
                task_id = record.key[:DIGEST_BYTES]
                state = node.task(task_id)
                if state is not None:
                    self.references.note(task_id, task_blobs(state), now)
        if self.references.released:
            self._released.set()

    def start(self) -> None:
        """Sweep now (call it once the tasks held here are restored: after a restart, blobs
        of tasks forgotten meanwhile are there), then delete the blobs of forgotten tasks as
        they are released and sweep every `SWEEP_INTERVAL` seconds, until `close`."""
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(self._collect_forever())

    async def close(self) -> None:
        """Stop deleting."""
        collector, self._collector = self._collector, None
        if collector is not None:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    async def collect_released(self) -> list[bytes]:
        """Delete the blobs whose last task here was forgotten, unless stored again since
        (`collectable`). Nothing is deleted while the driver is degraded: its written records,
        which the references follow, may then lag the tasks it holds.

        Returns:
            The digests deleted.

        Raises:
            OSError: the blob directory cannot be written.
        """
        if self.driver.disk.degraded is not None:
            return []
        released = dict.fromkeys(self.references.take_released(), True)
        deleted = await asyncio.to_thread(self._delete_collectable, released)
        self.counters["deleted with tasks"] += len(deleted)
        return deleted

    async def sweep(self) -> list[bytes]:
        """Rebuild the references from the tasks held here, then delete every blob no task
        held here references that `collectable` allows (released ones included).

        Returns:
            The digests deleted.

        Raises:
            OSError: the blob directory cannot be read or written.
        """
        self.references.rebuild(self._held_references(), self._wall(), self.grace)
        released = self.references.take_released()
        held = await asyncio.to_thread(self.store.held)
        candidates = {d: d in released for d in held if not self.references.needed(d)}
        deleted = await asyncio.to_thread(self._delete_collectable, candidates)
        if deleted:
            self.counters["swept"] += len(deleted)
            log.info("deleted %d blob(s) no task held here references", len(deleted))
        return deleted

    def _delete_collectable(self, candidates: Mapping[bytes, bool]) -> list[bytes]:
        """Delete the candidates (digest -> whether released) `collectable` allows, unless a
        task came to need one meanwhile (blocks)."""
        now = self._wall()
        deleted: list[bytes] = []
        for digest, released in candidates.items():
            stored_at = self.store.stored_at(digest)
            if stored_at is None or not collectable(stored_at, now, self.grace, released=released):
                continue
            if not self.references.needed(digest):
                self.store.delete(digest)
                deleted.append(digest)
        return deleted

    def _held_references(self) -> Iterable[tuple[bytes, Iterable[bytes]]]:
        for state in self.driver.node.held_tasks():
            refs = task_blobs(state)
            if refs:
                yield state.task_id, refs

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_sweep):
                    await self._released.wait()
            self._released.clear()
            try:
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + SWEEP_INTERVAL
                    await self.sweep()
                else:
                    await self.collect_released()
            except OSError as exc:
                log.warning("deleting unreferenced blobs failed: %s", exc)

    # Spreading

    async def _put(self, task_id: bytes, data: bytes) -> bytes:
        """Store `data` here as this peer's own blob for the task `task_id`; return its
        digest."""
        if not is_blob_size(len(data)):
            raise ValueError(f"a blob holds more than 64 KiB, up to 64 MiB; got {len(data)}")
        digest = await asyncio.to_thread(blob_digest, data)
        # Needed before it is stored: a collection running meanwhile must not take it.
        self.references.note(task_id, [digest], self._wall())
        return await asyncio.to_thread(self.store.put, data)

    async def _replicate(
        self, task_id: bytes, digest: bytes, data: bytes, failures: list[str] | None = None
    ) -> list[bytes]:
        """Push a blob held here to the first `replication` designated holders of `task_id`
        that are alive and accept it; one that fails is replaced by the next.

        Returns:
            The node ids that now hold it.
        """
        alive = self._live()
        held: list[bytes] = []
        for node_id in self.task_holders(task_id):
            if len(held) >= self.replication:
                break
            addr = alive.get(node_id)
            if addr is None:
                continue  # suspect: a push would likely wait out its timeout
            # One push at a time keeps memory and the link to one copy in flight.
            try:
                await self.transport.push_blob(addr, digest, data, task_id)
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
        order = [n for n in dict.fromkeys(hints) if n != node.node_id]
        order += [n for n in blob_holders(digest, up, len(up)) if n not in order]
        addrs: list[str] = []
        for node_id in order[:FETCH_CANDIDATES]:
            addr = up.get(node_id)
            if addr is None:
                member = node.member(node_id)  # a hint that is down may be back by now
                addr = member.addr if member is not None else None
            if addr is not None and addr not in addrs:
                addrs.append(addr)
        return addrs


class GatedStore:
    """A peer's blob store as its transport serves it: pushes go through
    `BlobService.admit_push` (the designated-holder rule, then the quota)."""

    def __init__(self, service: BlobService) -> None:
        self._service = service

    def get(self, digest: bytes) -> bytes | None:
        """See `BlobStore.get` (blocks)."""
        return self._service.store.get(digest)

    def admit_push(self, task_id: bytes, digest: bytes, size: int) -> str | None:
        """See `BlobService.admit_push`."""
        return self._service.admit_push(task_id, digest, size)

    def release_push(self, size: int) -> None:
        """See `BlobStore.release_push`."""
        self._service.store.release_push(size)

    def open_push(self, digest: bytes) -> BlobWriter:
        """See `BlobStore.open_push` (blocks)."""
        return self._service.store.open_push(digest)


def referenced_blobs(driver: Driver) -> dict[bytes, int]:
    """Digest -> size of every blob a task held here references (`task_blobs`)."""
    refs: dict[bytes, int] = {}
    for state in driver.node.held_tasks():
        refs.update(task_blobs(state))
    return refs
