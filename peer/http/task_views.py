"""The API's views of a task (its JSON, its tombstone's, its usage and model calls) and how a
task named in a URL is found: held here, or asked of the peers that hold it.

Used by the task endpoints (`peer.http.tasks`), the tree (`peer.http.tree`) and the streams
(`peer.http.watch`), so that every route shows a task the same way.

Invariants:
- Task JSON is computed from this peer's CRDT state (`protocol.tasks.state.TaskState`, read
  through the node's query facade), so once gossip has converged every peer answers the same
  for the same task.
- A task compacted here answers 410 Gone with its tombstone's fields (`TaskCompacted`); a full
  task id this peer does not hold is asked of its holders (at most `READ_TIMEOUT`) before the
  answer is 404.
"""

from __future__ import annotations

from aiohttp import web

from peer.agents.model_calls import ModelCalls, count_model_calls
from peer.http.common import (
    PROBLEM_TYPE,
    Json,
    Problem,
    bad_request,
)
from peer.node_ids import node_id_text
from peer.runtime.driver import Driver
from protocol.node import Node
from protocol.tasks.state import TaskState
from protocol.tasks.tombstone import Tombstone

WATCH_POLL = 0.25
"""Seconds between re-reads of a watched task's state when no notification arrives."""
READ_TIMEOUT = 2.0
"""Seconds a read of a task this peer does not hold waits for its replicas' answer."""
REFRESH_INTERVAL = 1.0
"""Seconds between asks for news of a followed task this peer is not told about (a watch or
a wait at a peer outside the task's audience)."""
MIN_ID_PREFIX = 6
"""Fewest hex digits of a task id prefix a URL may name a task by."""
STATES = ("pending", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")


def usage_json(usage: tuple[int, int, int]) -> Json:
    """Return the API form of a result's usage (prompt tokens, completion tokens, cost)."""
    prompt, completion, cost = usage
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_microdollars": cost,
    }


def model_calls_json(calls: ModelCalls) -> Json:
    """Return the API form of a task's model calls over its runs (`count_model_calls`)."""
    return {
        "model_calls": calls.model_calls,
        "model_calls_repeated": calls.model_calls_repeated,
        "model_tokens": calls.model_tokens,
        "repeated_tokens": calls.repeated_tokens,
    }


def model_calls_of(driver: Driver, task_id: bytes) -> ModelCalls:
    """The model calls logged in the checkpoints of a task held here."""
    return count_model_calls(driver.checkpoints(task_id))


def duplicates(st: TaskState) -> int:
    """Executions of `st` beyond the first (each one a task run twice)."""
    return max(0, st.execution_count() - 1)


def task_json(st: TaskState) -> Json:
    """Return the API form of a task this peer holds the record of."""
    rec = st.record
    assert rec is not None
    claim, acc = st.claim, st.accepted
    result: Json | None = None
    if acc is not None:
        result = {
            "outcome": acc.outcome,
            "output": acc.output.decode("utf-8", errors="replace"),
            "epoch": acc.epoch,
            "owner": node_id_text(acc.owner),
            "usage": usage_json(acc.usage),
        }
    executions = [
        {
            "epoch": run.epoch,
            "owner": node_id_text(run.owner),
            "incarnation": run.incarnation,
            "phase": phase,
            "outcome": None if phase == "start" else run.outcome,
        }
        for run in st.runs()
        for phase in (("start",) if run.outcome is None else ("start", "end"))
    ]
    cancel = st.cancel
    return {
        "id": st.task_id.hex(),
        "role": rec.role,
        "state": st.state,
        "owner": node_id_text(claim.owner) if claim is not None else None,
        "epoch": claim.epoch if claim is not None else 0,
        "priority": rec.priority,
        "parent": rec.parent.hex() if rec.parent else None,
        "created": rec.created,
        "idempotency_key": rec.idempotency_key or None,
        "timeout": rec.timeout,
        "origin": node_id_text(rec.origin),
        "input": rec.input.decode("utf-8", errors="replace"),
        "result": result,
        "executions": executions,
        "duplicates": duplicates(st),
        "cancel": (
            {"by": node_id_text(cancel.by), "reason": cancel.reason, "outcome": cancel.outcome}
            if cancel is not None
            else None
        ),
    }


class TaskCompacted(Problem):
    """410 Gone: the task was final for longer than the retention and only its tombstone is
    left here."""

    def __init__(self, stone: Tombstone) -> None:
        super().__init__(
            410,
            "Gone",
            f"task {stone.task_id.hex()} was {stone.state} and has been compacted: only its "
            "tombstone is kept",
        )
        self.tombstone = stone

    def response(self) -> web.Response:
        """Problem details with the tombstone's fields."""
        body: Json = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **tombstone_json(self.tombstone),
        }
        return web.json_response(body, status=self.status, content_type=PROBLEM_TYPE)


def tombstone_json(stone: Tombstone) -> Json:
    """A tombstone as JSON (digests in hex, empty ones as null)."""
    return {
        "id": stone.task_id.hex(),
        "state": stone.state,
        "compacted": True,
        "outcome": stone.outcome or None,
        "epoch": stone.epoch,
        "owner": node_id_text(stone.owner) if stone.owner else None,
        "output_digest": stone.output_digest.hex() or None,
        "idempotency_key_digest": stone.idempotency_digest.hex() or None,
        "parent": stone.parent.hex() or None,
    }


def find_task(node: Node, text: str) -> TaskState:
    """The task this peer holds the record of whose id is `text` or starts with it.

    Raises:
        Problem: 400 for text that is not a task id or an unambiguous prefix of at least
            `MIN_ID_PREFIX` hex digits; 404 when no such task is known here (yet).
        TaskCompacted: 410, the full id of a task compacted here.
    """
    text = text.strip().lower()
    if not text or any(c not in "0123456789abcdef" for c in text) or len(text) > 64:
        raise bad_request(f"a task id is 64 hex digits (or a unique prefix), got {text[:70]!r}")
    if len(text) == 64:
        stone = node.tombstone(bytes.fromhex(text))
        if stone is not None:
            raise TaskCompacted(stone)
        st = node.task(bytes.fromhex(text))
        matches = [st] if st is not None and st.record is not None else []
    elif len(text) < MIN_ID_PREFIX:
        raise bad_request(f"a task id prefix needs at least {MIN_ID_PREFIX} hex digits")
    else:
        matches = [
            st
            for st in node.held_tasks()
            if st.record is not None and st.task_id.hex().startswith(text)
        ][:2]
    if not matches:
        raise Problem(404, "Not Found", f"task {text} is not known to this peer (yet)")
    if len(matches) > 1:
        raise bad_request(f"task id prefix {text} is ambiguous; give more digits")
    return matches[0]


async def read_task(driver: Driver, text: str) -> TaskState:
    """`find_task`, at any peer: a full task id this peer does not hold is asked of the peers
    that hold it (its replica set) before the answer is 404.

    Raises:
        Problem: as `find_task`.
    """
    await driver.saved()  # what it shows is on disk here (a commit may be in flight)
    try:
        return find_task(driver.node, text)
    except Problem as problem:
        text = text.strip().lower()
        if problem.status != 404 or len(text) != 64:
            raise
        await driver.fetch([bytes.fromhex(text)], READ_TIMEOUT)
        return find_task(driver.node, text)
