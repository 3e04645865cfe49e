"""Queue timeouts: a task submitted with `queue` that no peer claimed in time is ended by its
origin, with the reason (issue 13, "Rough edges").

Theory of operation. `POST /v1/tasks` with `queue: true` calls `hold` with the task's id, role,
queue timeout and creation time *before* it submits the task (whose record carries the same
`created`). The deadline is `created + seconds`. `run` sleeps until the nearest deadline, then
asks `expiry_reason`, the one home of the rule: a task still pending (no claim, no result, no
cancel) whose origin is this peer is ended `failed` with the reason, through the origin's
signed `Cancel` with the outcome `failed` (decision 45), so every replica, stream and waiter
sees it end; anything else (claimed, final, unknown, submitted elsewhere) is left alone.
Either way its row is deleted.

Invariants:
- Durable before submitted: `hold` commits its row (SQLite, `synchronous=FULL`: fsynced)
  before the task exists, so every task acknowledged with a queue timeout has it on disk. A
  crash in between leaves a row with no task, dropped at its deadline.
- Restarts: the rows are read at start, so the timeout survives a restart of the origin; a
  deadline that passed while the peer was down is acted on at once.
- A task claimed once is never touched again, even if its owner later dies: the timeout bounds
  the wait for a first claim, not the run.
- Deadlines are wall-clock seconds (the record's `created` is one), so they mean the same after
  a restart; a nap never exceeds `MAX_NAP`, so a wall clock set forward is noticed soon.
- The record carries the queue timeout (signed by the origin), so the task's home can end it
  when its origin does not (gone for good, or restarted without the row): `expire_held` has
  this peer, if it is the task's arbiter, end a task still pending `HOME_GRACE` seconds after
  its deadline, through a failed `Cancel` it signs as a home member (decision 58). The origin
  acts first, at the deadline, with the better reason (it kept whether the role was served).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from peer.runtime.driver import Driver
from protocol.errors import LocalProtocolError
from protocol.tasks.state import TaskState

log = logging.getLogger(__name__)

DEFAULT_QUEUE_TIMEOUT = 600.0
"""Seconds a queued task waits for its first claim unless the submission says otherwise: long
enough to start a peer for the role by hand (or to let one restart and rejoin), short enough
that a task queued for a typo or a peer that never comes fails the same coffee break."""
DB_NAME = "queue.db"
"""The file in the data directory holding the queue timeouts."""
MAX_NAP = 5.0
"""Longest sleep between looks at the deadlines, in seconds."""
HOME_GRACE = 10.0
"""Seconds past a queued task's deadline before its home's arbiter ends it: the origin, which
acts at the deadline, gets the first word, and a home member whose wall clock runs a few
seconds ahead of the origin's does not pre-empt it."""


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued task's timeout, as stored."""

    task_id: bytes
    role: str
    seconds: float
    created: float
    """Wall-clock seconds: the task record's `created`."""

    @property
    def deadline(self) -> float:
        """When the task fails if no peer claimed it."""
        return self.created + self.seconds


def expiry_reason(st: TaskState | None, me: bytes, queued: Queued, served: bool) -> str | None:
    """The reason to end a queued task at its deadline, or None to leave it alone.

    Args:
        st: the task as held here (None if unknown here).
        me: this peer's node id (only the task's origin ends it).
        queued: its queue timeout.
        served: whether a live peer advertises the task's role now.
    """
    if st is None or st.record is None or st.state != "pending" or st.record.origin != me:
        return None
    return _reason(queued.role, queued.seconds, served)


def _reason(role: str, seconds: float, served: bool) -> str:
    if not served:
        return f"queue timeout: no live peer served role {role!r} for {seconds:g} s"
    return (
        f"queue timeout: no peer claimed it within {seconds:g} s "
        f"(the peers serving {role!r} were busy)"
    )


class QueueTimeouts:
    """The queue timeouts of the tasks submitted at one peer, and the loop that enforces them.

    The file is opened by `start` or the first `hold`, whichever comes first.

    Args:
        driver: the peer's driver (its node, wall clock and `cancel_task`).
        data_dir: the peer's data directory; the timeouts live in `DB_NAME` there.
    """

    def __init__(self, driver: Driver, data_dir: Path) -> None:
        self.driver = driver
        self.path = data_dir / DB_NAME
        self._db: sqlite3.Connection | None = None
        self._held: dict[bytes, Queued] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    def _open(self) -> sqlite3.Connection:
        """The file, opened and read on first use.

        Raises:
            sqlite3.Error: it cannot be opened or read.
        """
        if self._db is not None:
            return self._db
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS queued (task_id BLOB PRIMARY KEY, role TEXT NOT NULL,"
                " seconds REAL NOT NULL, created REAL NOT NULL) WITHOUT ROWID"
            )
            rows = db.execute("SELECT task_id, role, seconds, created FROM queued").fetchall()
        except sqlite3.Error:
            db.close()
            raise
        for task_id, role, seconds, created in rows:
            queued = Queued(bytes(task_id), role, seconds, created)
            self._held[queued.task_id] = queued
            heapq.heappush(self._heap, (queued.deadline, queued.task_id))
        self._db = db
        return db

    def hold(self, task_id: bytes, role: str, seconds: float, created: float) -> None:
        """Store a task's queue timeout durably; call it before submitting the task.

        Raises:
            sqlite3.Error: it could not be written (the task must not be submitted).
        """
        queued = Queued(task_id, role, seconds, created)
        self._open().execute(
            "INSERT OR REPLACE INTO queued VALUES (?, ?, ?, ?)", (task_id, role, seconds, created)
        )
        self._held[task_id] = queued
        heapq.heappush(self._heap, (queued.deadline, task_id))
        self._wake.set()

    def deadline(self, task_id: bytes) -> float | None:
        """When a task held here fails unless claimed; None if it has no queue timeout here.

        Raises:
            sqlite3.Error: the file cannot be opened or read.
        """
        self._open()
        queued = self._held.get(task_id)
        return queued.deadline if queued is not None else None

    def expire(self, now: float) -> list[bytes]:
        """End every queued task whose deadline passed (see `expiry_reason`); return their ids.

        Rows whose deadline passed are deleted, whatever was decided.

        Raises:
            sqlite3.Error: the file cannot be opened or read.
        """
        self._open()
        node = self.driver.node
        ended: list[bytes] = []
        while self._heap and self._heap[0][0] <= now:
            deadline, task_id = heapq.heappop(self._heap)
            queued = self._held.get(task_id)
            if queued is None or queued.deadline != deadline:
                continue  # superseded by a later `hold` of the same task
            served = bool(node.capable(queued.role))
            reason = expiry_reason(node.task(task_id), node.node_id, queued, served)
            if reason is not None:
                try:
                    self.driver.cancel_task(task_id, reason, outcome="failed")
                    ended.append(task_id)
                    log.info("task %s: %s", task_id.hex()[:12], reason)
                except LocalProtocolError as exc:
                    log.warning("task %s: queue timeout not applied: %s", task_id.hex()[:12], exc)
            try:
                self._open().execute("DELETE FROM queued WHERE task_id = ?", (task_id,))
            except sqlite3.Error as exc:  # the row is dropped again at the next start
                log.warning("queue timeouts: could not delete a row: %s", exc)
            del self._held[task_id]
        return ended

    def expire_held(self, now: float) -> list[bytes]:
        """As their arbiter, end the queued tasks held here that are still pending
        `HOME_GRACE` seconds after their deadline (their origin did not); return their ids.
        Whether this peer is the arbiter is the node's to say (`Node.expire`)."""
        node = self.driver.node
        ended: list[bytes] = []
        for st in node.open_tasks():
            rec = st.record
            if rec is None or not rec.queue_timeout or st.state != "pending":
                continue
            if now < rec.created + rec.queue_timeout + HOME_GRACE:
                continue
            reason = _reason(rec.role, rec.queue_timeout, bool(node.capable(rec.role)))
            if self.driver.expire_task(st.task_id, reason):
                ended.append(st.task_id)
                log.info("task %s: %s (ended by its home)", st.task_id.hex()[:12], reason)
        return ended

    def start(self) -> None:
        """Read the stored deadlines and start enforcing them (the ones passed at once).

        Raises:
            OSError: the file cannot be opened or read (it says which).
        """
        try:
            self._open()
        except sqlite3.Error as exc:
            raise OSError(f"cannot read the queue timeouts in {self.path}: {exc}") from exc
        self._loop = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop enforcing and close the file."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self.driver.wall()
            for step in (self.expire, self.expire_held):
                try:
                    step(now)
                except Exception:  # a bug here must not end every later timeout with it
                    log.exception("queue timeouts: %s failed", step.__name__)
            nap = MAX_NAP if not self._heap else min(MAX_NAP, max(0.0, self._heap[0][0] - now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), nap)
