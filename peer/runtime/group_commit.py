"""Group commit: the node's effects wait for their records to be on disk, one fsync per turn.

Invariants (decision 24):
- Effects are delivered in the order they were applied. The effects of every node call made in
  one turn of the event loop that persist anything (and those that follow them in that turn)
  wait for one `put_many` transaction at the end of the turn, so one fsync covers every
  envelope received meanwhile, and nothing they send leaves before it is on disk.
- If the write fails, the sends of those calls are not sent (they might announce a fact that
  is not durable), `degraded` holds the reason (shown by the API), and the records are kept:
  they are written, before the newer ones, with the next write (or retry), so disk catches up
  with the node's memory once writes succeed again; the first write that succeeds ends
  `degraded`.
- `commit_now` writes at once with everything waiting: a caller that must answer "on disk" or
  not (a submission) gets its answer before it returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from protocol.effects import Effects, Persist

log = logging.getLogger(__name__)


class NotDurable(Exception):
    """A task submitted here could not be written to disk: the node holds it in memory only
    (it may still spread and run) and the driver retries the write with the next ones.

    Attributes:
        task_id: the task's id.
        reason: why the write failed.
    """

    def __init__(self, task_id: bytes, reason: str) -> None:
        super().__init__(f"task {task_id.hex()} could not be written to disk here: {reason}")
        self.task_id = task_id
        self.reason = reason


class RecordStore(Protocol):
    """The durable side the driver needs (`peer.runtime.store.Store`, or a fake in tests)."""

    def put_many(self, records: Iterable[Persist]) -> None: ...

    def save_members(self, rows: Iterable[tuple[bytes, str, int]]) -> None: ...

    def save_model_usage(self, usage: Mapping[str, Mapping[str, object]]) -> None: ...

    def load_model_usage(self) -> dict[str, dict[str, object]]: ...


class GroupCommit:
    """Applies effects once their records are durable (see the module invariants).

    Args:
        store: where records are written.
        loop: the event loop whose turns group the writes.
        deliver: hands on one call's effects (sends only if `durable`) once written.
    """

    def __init__(
        self,
        store: RecordStore,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[Effects, bool], None],
    ) -> None:
        self._store = store
        self._loop = loop
        self._deliver = deliver
        self.degraded: str | None = None
        """Why the last write to disk failed; None while writes succeed."""
        self.write_failures = 0
        """Writes to disk that failed since the start."""
        self.on_written: Callable[[list[Persist]], None] | None = None
        """Called with each batch of records once it is on disk, in order (the blob service
        indexes blob references and deletes the blobs of forgotten tasks)."""
        self._unwritten: dict[tuple[str, bytes], Persist] = {}
        """Records of failed writes, oldest first, the newest value for each key."""
        self._pending: list[Effects] = []
        """Effects waiting for this turn's commit (see `apply`), in order."""
        self._commit: asyncio.Handle | None = None
        """The commit scheduled for the end of this turn of the loop, if any."""
        self._waiters: list[asyncio.Future[bool]] = []
        """Callers waiting for this turn's commit (see `apply_then`)."""
        self._retry_unwritten = False
        """Whether this turn's commit retries unwritten records (a caller waits)."""

    def apply(self, fx: Effects, *, retry: bool = False, commit_now: bool = False) -> bool:
        """Deliver `fx` at once if it persists nothing and nothing waits for a commit, else
        with this turn's commit (or at once, with everything waiting, for `commit_now`).
        `retry` writes unwritten records even if nothing else is to be written.

        Returns:
            Whether every record so far is on disk (as of this call, for a deferred one).
        """
        if not (fx.persists or self._pending or commit_now):
            if retry:
                self.write([], retry=True)
            self._deliver(fx, True)
            return not self._unwritten
        self._pending.append(fx)
        if commit_now:
            return self.commit(retry=retry)
        if self._commit is None:
            self._commit = self._loop.call_soon(self.commit)
        return not self._unwritten

    def apply_then(self, fx: Effects) -> asyncio.Future[bool]:
        """Apply `fx` with this turn's commit (unwritten records retried); the future says
        whether every record so far was then on disk."""
        done: asyncio.Future[bool] = self._loop.create_future()
        if not (fx.persists or self._pending):
            done.set_result(self.apply(fx, retry=True))
            return done
        self.apply(fx)
        self._waiters.append(done)
        self._retry_unwritten = True
        return done

    def commit(self, *, retry: bool = False) -> bool:
        """Write every waiting record in one transaction, then deliver the waiting effects."""
        if self._commit is not None:
            self._commit.cancel()
            self._commit = None
        pending, self._pending = self._pending, []
        waiters, self._waiters = self._waiters, []
        retry = retry or self._retry_unwritten
        self._retry_unwritten = False
        records = [record for fx in pending for record in fx.persists]
        durable = self.write(records, retry=retry)
        for fx in pending:
            self._deliver(fx, durable)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(durable)
        return durable

    def write(self, records: list[Persist], *, retry: bool) -> bool:
        """Write the unwritten records, then `records`, in one transaction; return whether
        nothing is left unwritten. Without `records` the unwritten ones wait for `retry`."""
        if not records and not (retry and self._unwritten):
            return not self._unwritten
        batch = [*self._unwritten.values(), *records]  # a later record for a key wins
        try:
            self._store.put_many(batch)
        except Exception as exc:
            for record in records:
                self._unwritten[record.kind, record.key] = record
            self.write_failures += 1
            self.degraded = str(exc) or type(exc).__name__
            log.error(
                "writing %d records to disk failed, the peer is degraded: %s", len(batch), exc
            )
            return False
        if self._unwritten:
            log.warning(
                "writing to disk works again (%d held records written)", len(self._unwritten)
            )
            self._unwritten.clear()
        self.degraded = None
        if self.on_written is not None:
            self.on_written(batch)
        return True
