"""The task plane's entry points of `protocol.node.Node`: submit, complete, checkpoint,
cancel, reads, suspend and resume, serve, and the restore of stored objects after a restart.

Each call enters the node at `now`, asks `protocol.tasks.plane.Tasks`, and returns what it
decided as `Effects` (see `Node._enter` and `Node._exit`); the node's other entry points
(envelopes, timers, joins, user events) stay in `protocol.node`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

from protocol.codec import decode_message
from protocol.config import NodeConfig
from protocol.effects import Dropped, Effects
from protocol.errors import RemoteProtocolError
from protocol.member_table import Rng
from protocol.node_queries import NodeQueries
from protocol.tasks.core import STORE
from protocol.tasks.listing import PageQuery
from protocol.tasks.messages import Checkpoint, TaskMessage


class NodeTaskCalls(NodeQueries, ABC):
    """The task calls a host makes on its node (see the module docstring)."""

    config: NodeConfig
    rng: Rng
    node_id: bytes

    @abstractmethod
    def _enter(self, now: float) -> None:
        """Bring the node's clock to `now` before a call (`Node._enter`)."""

    @abstractmethod
    def _exit(self) -> Effects:
        """Settle what the call changed and take its effects (`Node._exit`)."""

    def submit(
        self,
        now: float,
        role: str,
        data: bytes,
        *,
        priority: int = 0,
        parent: bytes = b"",
        idempotency_key: str = "",
        nonce: bytes = b"",
        timeout: float = 0.0,
        created: float = 0.0,
        traceparent: str = "",
        queue_timeout: float = 0.0,
    ) -> tuple[Effects, bytes]:
        """Submit a task here; returns the effects and the task id. `TaskReplicated` reports
        when `config.tasks.replication` other peers hold it (at once when replication is 0).

        Raises:
            LocalProtocolError: a field is out of bounds, or neither key nor nonce is given.
        """
        self._enter(now)
        record = self.tasks.submit(
            now,
            role,
            data,
            priority=priority,
            parent=parent,
            idempotency_key=idempotency_key,
            nonce=nonce,
            timeout=timeout,
            created=created,
            traceparent=traceparent,
            queue_timeout=queue_timeout,
        )
        if self.config.tasks.replication == 0:
            self.tasks.acknowledge_unreplicated(record.task_id)
        return self._exit(), record.task_id

    def nonce_near_home(
        self,
        nonce: bytes,
        role: str,
        input_digest: bytes,
        *,
        priority: int = 0,
        parent: bytes = b"",
        timeout: float = 0.0,
    ) -> bytes:
        """The nonce to submit a task without an idempotency key under, from the `nonce` the
        host drew: one whose id makes this peer one of the task's replicas when one of a few
        does (`protocol.tasks.plane.Tasks.nonce_near_home`). Changes nothing."""
        return self.tasks.nonce_near_home(nonce, role, input_digest, priority, parent, timeout)

    def complete(
        self,
        now: float,
        task_id: bytes,
        epoch: int,
        outcome: str,
        output: bytes,
        usage: tuple[int, int, int] = (0, 0, 0),
    ) -> Effects:
        """Report the end of an execution started by `StartExecution` (ignored if fenced).

        Raises:
            LocalProtocolError: unknown outcome or oversize output.
        """
        self._enter(now)
        self.tasks.complete(now, task_id, epoch, outcome, output, usage)
        return self._exit()

    def report_progress(
        self,
        now: float,
        task_id: bytes,
        epoch: int,
        kind: str,
        time: float,
        detail: Sequence[tuple[str, object]],
    ) -> Effects:
        """Tell the task's origin of a step of this peer's run of `task_id` under `epoch`, if
        it is another peer (`protocol.tasks.progress`): nothing is signed or stored.

        Raises:
            LocalProtocolError: not this peer's run, or `kind` or a field name is not a name.
        """
        self._enter(now)
        self.tasks.progress.report(task_id, epoch, kind, time, detail)
        return self._exit()

    def checkpoint(
        self, now: float, task_id: bytes, epoch: int, data: bytes
    ) -> tuple[Effects, Checkpoint]:
        """Record a step of this peer's run of `task_id` under `epoch`: signed, kept with the
        task's replicas and audience, so a takeover resumes from it (`Tasks.checkpoint`).

        Raises:
            LocalProtocolError: not this peer's run, oversize data, or too many steps.
        """
        self._enter(now)
        made = self.tasks.checkpoint(now, task_id, epoch, data)
        return self._exit(), made

    def send_lingering(self, now: float) -> Effects:
        """Send the claims and checkpoints made here that still wait for more of their run
        (`LINGER`) now, to survive this peer's death: a step is about to be shown."""
        self._enter(now)
        self.tasks.send_lingering(math.inf)
        return self._exit()

    def cancel(
        self, now: float, task_id: bytes, reason: str = "cancelled", outcome: str = "cancelled"
    ) -> Effects:
        """Cancel a task network-wide; it stops wherever it runs and ends `outcome`
        (`cancelled`, or `failed` when its origin gives up on it: decision 45)."""
        self._enter(now)
        self.tasks.cancel(now, task_id, reason, outcome)
        return self._exit()

    def expire(self, now: float, task_id: bytes, reason: str) -> tuple[Effects, bool]:
        """End a queued task nobody claimed as its arbiter (`Tasks.expire`, decision 58);
        returns the effects and whether it was ended here."""
        self._enter(now)
        ended = self.tasks.expire(now, task_id, reason)
        return self._exit(), ended

    def fetch(self, now: float, task_ids: list[bytes]) -> Effects:
        """Ask for tasks this peer may not hold (a read at any peer): their replica sets, and
        for tasks held, their owner (or origin) and first replica (`Tasks.fetch`)."""
        self._enter(now)
        self.tasks.fetch(task_ids)
        return self._exit()

    def ask_task_pages(
        self, now: float, peers: list[bytes], query: PageQuery
    ) -> tuple[Effects, dict[bytes, int]]:
        """Ask `peers` for a page of the tasks each arbitrates (a network listing); returns the
        request id sent to each, whose page `task_page` gives once it came."""
        self._enter(now)
        asked = self.tasks.listing.ask(now, peers, query, self.rng)
        return self._exit(), asked

    def suspend(self, now: float, task_id: bytes) -> Effects:
        """An execution here waits (on its child tasks): release its slot until `resume`.

        It stays owned and running for every other rule; the free slot is advertised and tasks
        passed for lack of one are looked at again. A no-op for a task not running here or
        already suspended."""
        self._enter(now)
        self.tasks.suspend(now, task_id)
        return self._exit()

    def resume(self, now: float, task_id: bytes) -> Effects:
        """A suspended execution goes on: it holds a slot again at once, even beyond
        `max_running` (it never waits for one, so a tree of tasks cannot deadlock). A no-op for
        a task not suspended."""
        self._enter(now)
        self.tasks.resume(now, task_id)
        return self._exit()

    def serve(self, now: float, roles: tuple[str, ...], max_running: int) -> Effects:
        """Declare the roles this peer executes and how many executions it runs at once
        before passing its turn, advertise them, and look at open tasks again."""
        self._enter(now)
        self.tasks.roles = frozenset(roles)
        self.tasks.max_running = max_running
        self.advertisements.advertise(roles, self.tasks.free_slots(), 0, 0.0)
        self.tasks.reevaluate(now)
        return self._exit()

    def restore(self, now: float, raw: bytes) -> Effects:
        """Re-apply a task object this peer persisted before a restart (verified like a peer's).

        Restore every stored object, then `serve`, then `join`. Until the join succeeds (and a
        standby delay after it, so what we missed arrives) this peer claims nothing: with an
        empty view every owner would look dead. Own claims left without a result are then
        resumed under the same epoch, signed again under our new incarnation so the re-run
        is counted (`StartExecution` again)."""
        self._enter(now)
        try:
            msg = decode_message(raw)
        except RemoteProtocolError as exc:
            self.port.note(Dropped(STORE, f"unreadable stored record: {exc}"))
            return self._exit()
        self.tasks.hold()
        if isinstance(msg, TaskMessage):  # the host stores nothing else; anything else is inert
            self.tasks.dispatch(now, STORE, self.node_id, msg, raw)
        return self._exit()

    def restore_tombstone(self, now: float, task_id: bytes, raw: bytes) -> Effects:
        """Re-apply the tombstone stored (`PersistKind.TOMBSTONE`) under `task_id` before any
        stored task object, so that no object of a compacted task is replayed (see
        `protocol.tasks.retention`)."""
        self._enter(now)
        self.tasks.hold()
        self.tasks.restore_tombstone(now, task_id, raw)
        return self._exit()
