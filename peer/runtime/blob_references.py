"""Which blobs the tasks here need, and the one rule for deleting a blob.

Invariants:
- `BlobReferences` maps each digest to the ids of the tasks that need it here: the tasks held
  here whose record input or result output references it (`task_blobs`), and the tasks a blob
  was stored here for before they are held (an input pushed or put ahead of its record, an
  output stored ahead of its result). It grows as blobs are stored for a task and as the driver
  writes task records and results (`note`), and shrinks when a task's records are forgotten
  (`forget`: compaction to a tombstone). `rebuild` replaces it with the references of the held
  tasks, keeping the tasks noted less than a grace period ago that are not held yet, so an
  update it missed lasts until the next rebuild at most.
- A digest whose last task was forgotten (or dropped by a rebuild) is *released*: it waits in
  `released` until a collection takes it; a digest needed again before then is not released.
- `collectable` is the one rule that says whether a blob no task needs may be deleted;
  `peer.runtime.blobs.BlobService` asks it for every deletion.
- Only the event loop thread changes it; a worker thread may ask `needed` (one dict lookup)
  right before deleting a file, so a blob needed meanwhile is spared.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.blobs import parse_blob_ref
from protocol.tasks.state import TaskState


def task_blobs(state: TaskState) -> dict[bytes, int]:
    """Digest -> size of every blob the task `state` references: its record's input, the
    outputs of its results and of its accepted result."""
    payloads = [result.output for result in state.results.values()]
    if state.record is not None:
        payloads.append(state.record.input)
    if state.accepted is not None:
        payloads.append(state.accepted.output)
    refs: dict[bytes, int] = {}
    for payload in payloads:
        ref = parse_blob_ref(payload)
        if ref is not None:
            refs[ref[0]] = ref[1]
    return refs


def collectable(stored_at: float, now: float, grace: float, *, released: bool) -> bool:
    """Whether a blob that no task here needs may be deleted.

    It may when it was released (the last task that needed it here was forgotten, or was never
    held here within the grace period), or when it was stored more than `grace` ago (a push
    whose task never came here, a copy fetched for a read, a blob of a task forgotten before a
    restart: after a restart nothing is released).

    Args:
        stored_at: when the blob was last stored here (wall-clock seconds, its file time).
        now: wall-clock seconds.
        grace: seconds a blob may wait for a task here to need it.
        released: whether it is among the digests `BlobReferences` released.
    """
    return released or now - stored_at >= grace


class BlobReferences:
    """Digest -> the tasks that need it here (see the module invariants)."""

    def __init__(self) -> None:
        self._tasks_of: dict[bytes, set[bytes]] = {}
        """Digest -> ids of the tasks needing it (never empty)."""
        self._blobs_of: dict[bytes, set[bytes]] = {}
        """Task id -> the digests it needs (only tasks needing some)."""
        self._noted_at: dict[bytes, float] = {}
        """Task id -> when it was first noted (wall-clock seconds)."""
        self.released: set[bytes] = set()
        """Digests whose last task was forgotten since the last collection."""

    def needed(self, digest: bytes) -> bool:
        """Whether a task here needs the blob `digest`."""
        return digest in self._tasks_of

    def note(self, task_id: bytes, digests: Iterable[bytes], now: float) -> None:
        """The task `task_id` needs `digests` here (and maybe more)."""
        for digest in digests:
            self._tasks_of.setdefault(digest, set()).add(task_id)
            self._blobs_of.setdefault(task_id, set()).add(digest)
            self._noted_at.setdefault(task_id, now)
            self.released.discard(digest)

    def forget(self, task_id: bytes) -> None:
        """The task `task_id` is no longer held here: the digests only it needed are
        released."""
        self._noted_at.pop(task_id, None)
        for digest in self._blobs_of.pop(task_id, ()):
            tasks = self._tasks_of[digest]
            tasks.discard(task_id)
            if not tasks:
                del self._tasks_of[digest]
                self.released.add(digest)

    def rebuild(
        self, held: Iterable[tuple[bytes, Iterable[bytes]]], now: float, grace: float
    ) -> None:
        """Replace the index by the references of `held` ((task id, digests) of every task held
        here that references a blob), keeping what tasks not held were noted for less than
        `grace` seconds ago; every digest no longer needed is released."""
        before = self._tasks_of
        blobs_of, noted_at = self._blobs_of, self._noted_at
        self._tasks_of, self._blobs_of, self._noted_at = {}, {}, {}
        held_ids: set[bytes] = set()
        for task_id, digests in held:
            held_ids.add(task_id)
            self.note(task_id, digests, noted_at.get(task_id, now))
        for task_id, digests in blobs_of.items():
            at = noted_at[task_id]
            if task_id not in held_ids and now - at < grace:
                self.note(task_id, digests, at)  # its record or result is still on its way
        self.released |= before.keys() - self._tasks_of.keys()

    def take_released(self) -> set[bytes]:
        """The released digests, now forgotten here."""
        released, self.released = self.released, set()
        return released
