"""Group commit: the node's effects wait for their records to be on disk, one fsync per turn.

Invariants (decisions 24 and 66):
- Effects are delivered in the order they were applied. The effects of every node call made in
  one turn of the event loop that persist anything (and those that follow them in that turn)
  wait for one `put_many` transaction at the end of the turn, so one fsync covers every
  envelope received meanwhile, and nothing they send leaves before it is on disk. Probes and
  their answers (`Send.probe`) of calls that persist nothing are the exception: they carry
  membership gossip only, and leave at once (`urgent`).
- If the write fails, the sends of those calls are not sent (they might announce a fact that
  is not durable), `degraded` holds the reason (shown by the API), and the records are kept:
  they are written, before the newer ones, with the next write (or retry), so disk catches up
  with the node's memory once writes succeed again; the first write that succeeds ends
  `degraded`.
- `commit_now` writes at once with everything waiting: a caller that must answer "on disk" or
  not (a submission) gets its answer before it returns.

With a `writer` (the peer's: one thread), a turn's commit runs there, so the loop goes on
reading, deciding and answering probes while SQLite fsyncs; whatever is applied meanwhile waits
for the next commit, which starts as soon as the one in flight ends: one fsync then covers
everything that arrived during the last. Writes stay one at a time and in order, and effects
still leave only after their records are on disk. Without fsyncs on the loop a
peer of a 3-peer network ran about a fifth more tasks per second (about 10% of a 2-core
machine's time had been spent waiting for the disk).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from protocol.effects import Effects, Persist, Send

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


@dataclass(eq=False)
class _Write:
    """A commit in flight on the writer thread, and what waits for it."""

    done: concurrent.futures.Future[None]
    records: list[Persist]
    """This commit's new records (the batch written also holds the unwritten ones before)."""
    batch: list[Persist]
    pending: list[Effects]
    waiters: list[asyncio.Future[bool]]


class GroupCommit:
    """Applies effects once their records are durable (see the module invariants).

    Args:
        store: where records are written (from the `writer` thread too, if given: then it
            must allow that, as `peer.runtime.store.Store` does).
        loop: the event loop whose turns group the writes.
        deliver: hands on one call's effects (sends only if `durable`) once written.
        writer: where a turn's commit runs (one thread), or None to write on the loop.
        urgent: sends a probe-class envelope (`Send.probe`) of effects that persist nothing
            at once, ahead of the effects waiting for a commit; None: they wait in order.
    """

    def __init__(
        self,
        store: RecordStore,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[Effects, bool], None],
        writer: concurrent.futures.Executor | None = None,
        urgent: Callable[[Send], None] | None = None,
    ) -> None:
        self._store = store
        self._urgent = urgent
        self._loop = loop
        self._deliver = deliver
        self._writer = writer
        self._writing: _Write | None = None
        """The commit in flight on the writer thread, if any."""
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
        if not (fx.persists or self._pending or self._writing or commit_now):
            if retry:
                self.write([], retry=True)
            self._deliver(fx, True)
            return not self._unwritten
        if self._urgent is not None and not fx.persists and any(s.probe for s in fx.sends):
            # Probes and their answers carry membership gossip only, never a fact that a
            # waiting record backs: they leave now, so a busy disk does not make this peer
            # look dead to its prober (decision 66).
            for send in fx.sends:
                if send.probe:
                    self._urgent(send)
            fx = replace(fx, sends=[send for send in fx.sends if not send.probe])
        self._pending.append(fx)
        if commit_now:
            return self.commit(retry=retry)
        if self._commit is None and self._writing is None:
            self._commit = self._loop.call_soon(self._commit_turn)
        return not self._unwritten

    def apply_then(self, fx: Effects) -> asyncio.Future[bool]:
        """Apply `fx` with this turn's commit (unwritten records retried); the future says
        whether every record so far was then on disk."""
        done: asyncio.Future[bool] = self._loop.create_future()
        if not (fx.persists or self._pending or self._writing):
            done.set_result(self.apply(fx, retry=True))
            return done
        self.apply(fx)
        self._waiters.append(done)
        self._retry_unwritten = True
        return done

    def flushed(self) -> asyncio.Future[bool]:
        """A future resolved once every effect applied so far has been delivered (at once if
        none waits), with whether every record so far was then on disk. A reader that shows
        what the node holds waits for it, so it never shows what is not on disk here yet."""
        done: asyncio.Future[bool] = self._loop.create_future()
        if self._pending:
            self._waiters.append(done)  # the next commit is due, or starts after this one
        elif self._writing is not None:
            self._writing.waiters.append(done)
        else:
            done.set_result(not self._unwritten)
        return done

    def commit(self, *, retry: bool = False) -> bool:
        """Write every waiting record in one transaction now, on the loop (after the commit in
        flight, waited for), then deliver the waiting effects."""
        if self._commit is not None:
            self._commit.cancel()
            self._commit = None
        if self._writing is not None:
            concurrent.futures.wait([self._writing.done])
            self._written(self._writing)
        pending, waiters, retry = self._take(retry)
        durable = self.write([record for fx in pending for record in fx.persists], retry=retry)
        self._finish(pending, waiters, durable)
        return durable

    def _commit_turn(self) -> None:
        """The end of a turn: commit what waits, on the writer thread if there is one."""
        self._commit = None
        if self._writer is None:
            self.commit()
            return
        if self._writing is not None:
            return  # the next commit starts when this one ends
        pending, waiters, retry = self._take(False)
        records = [record for fx in pending for record in fx.persists]
        if not records and not (retry and self._unwritten):
            self._finish(pending, waiters, not self._unwritten)
            return
        batch = self._batch(records)
        write = _Write(
            self._writer.submit(self._store.put_many, batch), records, batch, pending, waiters
        )
        self._writing = write
        write.done.add_done_callback(lambda _: self._call_soon_threadsafe(self._written, write))

    def _call_soon_threadsafe(self, callback: Callable[[_Write], None], write: _Write) -> None:
        # From the writer thread. A loop already closed has nothing left to deliver to (a
        # synchronous `commit`, as at a driver's stop, has taken the write over by then).
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, write)

    def _written(self, write: _Write) -> None:
        """The commit `write` ended (on the loop): deliver what waited for it, then start
        the next commit if anything waits."""
        if self._writing is not write:
            return  # a synchronous `commit` already took it over
        self._writing = None
        try:
            error = write.done.exception()
        except concurrent.futures.CancelledError:  # the writer was shut down first
            error = RuntimeError("the writer thread stopped before the write")
        if error is None:
            durable = self._succeeded(write.batch)
        else:
            durable = self._failed(write.records, write.batch, error)
        self._finish(write.pending, write.waiters, durable)
        if self._pending and self._commit is None:
            self._commit = self._loop.call_soon(self._commit_turn)

    def _take(self, retry: bool) -> tuple[list[Effects], list[asyncio.Future[bool]], bool]:
        pending, self._pending = self._pending, []
        waiters, self._waiters = self._waiters, []
        retry = retry or self._retry_unwritten
        self._retry_unwritten = False
        return pending, waiters, retry

    def _finish(
        self, pending: list[Effects], waiters: list[asyncio.Future[bool]], durable: bool
    ) -> None:
        for fx in pending:
            self._deliver(fx, durable)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(durable)

    def write(self, records: list[Persist], *, retry: bool) -> bool:
        """Write the unwritten records, then `records`, in one transaction; return whether
        nothing is left unwritten. Without `records` the unwritten ones wait for `retry`."""
        if not records and not (retry and self._unwritten):
            return not self._unwritten
        if self._writing is not None and not records:
            # The commit in flight carries every unwritten record already; writing them here
            # as well could put their older values after it.
            return not self._unwritten
        batch = self._batch(records)
        try:
            self._store.put_many(batch)
        except Exception as exc:
            return self._failed(records, batch, exc)
        return self._succeeded(batch)

    def _batch(self, records: list[Persist]) -> list[Persist]:
        return [*self._unwritten.values(), *records]  # a later record for a key wins

    def _failed(self, records: list[Persist], batch: list[Persist], exc: BaseException) -> bool:
        for record in records:
            self._unwritten[record.kind, record.key] = record
        self.write_failures += 1
        self.degraded = str(exc) or type(exc).__name__
        log.error("writing %d records to disk failed, the peer is degraded: %s", len(batch), exc)
        return False

    def _succeeded(self, batch: list[Persist]) -> bool:
        if self._unwritten:
            log.warning(
                "writing to disk works again (%d held records written)", len(self._unwritten)
            )
            self._unwritten.clear()
        self.degraded = None
        if self.on_written is not None:
            self.on_written(batch)
        return True
