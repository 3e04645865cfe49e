"""Decoding the wire shapes of task messages (the task record, checkpoints, anti-entropy
shards, listing pages), for `protocol.codec`.

Invariants: as `protocol.codec`'s: every field is checked by `protocol.fields`, derived fields
are computed here and never trusted from the sender, and any violation raises
`RemoteProtocolError`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from protocol import fields
from protocol.errors import RemoteProtocolError
from protocol.identity import NODE_ID_BYTES
from protocol.tasks.messages import (
    MAX_CHECKPOINTS,
    MAX_NONCE,
    MAX_PAGE,
    MAX_PROGRESS_FIELDS,
    MAX_PROGRESS_TEXT,
    SHARDS,
    Checkpoint,
    ProgressValue,
    TaskPage,
    TaskProgress,
    TaskRecord,
    TaskShards,
    TaskSummary,
    is_traceparent,
    task_id_of,
)
from protocol.wire import MAX_NAME_CHARS, MAX_UINT


def checkpoint_from(f: list[Any]) -> Checkpoint:
    key, author = fields.signer(f[4])
    epoch, seq = fields.uint(f[2]), fields.uint(f[3])
    if epoch < 1:
        raise RemoteProtocolError("a checkpoint belongs to a claimed run: epoch 1 or more")
    if not 1 <= seq <= MAX_CHECKPOINTS:
        raise RemoteProtocolError(f"a checkpoint's sequence number runs 1 to {MAX_CHECKPOINTS}")
    data = fields.inline_payload(f[5])
    return Checkpoint(fields.node_id(f[1]), epoch, seq, key, data, fields.signature(f[6]), author)


def task_record(f: list[Any]) -> TaskRecord:
    key, origin = fields.signer(f[1])
    created, timeout = f[2], f[9]
    if type(created) is not float or type(timeout) is not float or not 0.0 <= timeout <= 1e9:
        raise RemoteProtocolError("task created and timeout must be non-negative floats")
    role, data, priority, parent = (
        fields.name(f[3]),
        fields.inline_payload(f[4]),
        fields.uint(f[5]),
        f[6],
    )
    if type(parent) is not bytes or len(parent) not in (0, NODE_ID_BYTES):
        raise RemoteProtocolError("task parent must be a task id or empty")
    idem, nonce = f[7], f[8]
    if type(idem) is not str or len(idem) > MAX_NAME_CHARS:
        raise RemoteProtocolError(f"idempotency key must be at most {MAX_NAME_CHARS} chars")
    if type(nonce) is not bytes or len(nonce) > MAX_NONCE:
        raise RemoteProtocolError(f"task nonce must be at most {MAX_NONCE} bytes")
    traceparent = f[10]
    if type(traceparent) is not str or not is_traceparent(traceparent):
        raise RemoteProtocolError("task traceparent must be empty or a W3C traceparent (v00)")
    queue_timeout = 0.0
    if len(f) == 13:
        queue_timeout = f[12]
        # Present only when there is one: one encoding per record.
        if type(queue_timeout) is not float or not 0.0 < queue_timeout <= 1e9:
            raise RemoteProtocolError("a task's queue timeout must be a positive float")
    task_id = task_id_of(
        origin, idem, nonce, role, hashlib.sha256(data).digest(), priority, parent, timeout
    )
    return TaskRecord(
        key,
        created,
        role,
        data,
        priority,
        parent,
        idem,
        nonce,
        timeout,
        traceparent,
        fields.signature(f[11]),
        task_id,
        origin,
        queue_timeout,
    )


def digest_entry(v: Any) -> tuple[bytes, bytes]:
    if not isinstance(v, list) or len(v) != 2 or type(v[1]) is not bytes or len(v[1]) != 8:
        raise RemoteProtocolError("a task digest entry is [task id, 8-byte digest]")
    return (fields.node_id(v[0]), v[1])


def task_shards_from(f: list[Any]) -> TaskShards:
    level = fields.uint(f[1])
    if level > 1:
        raise RemoteProtocolError("task shards level must be 0 (summary) or 1 (answer)")
    shards: list[tuple[int, bytes]] = []
    for row in fields.array(f[2]):
        if not isinstance(row, list) or len(row) != 2 or type(row[1]) is not bytes:
            raise RemoteProtocolError("a task shard is [shard, digest]")
        shard = fields.uint(row[0])
        if shard >= SHARDS or len(row[1]) not in (0, 8):
            raise RemoteProtocolError("a task shard is [0-255, 8-byte or empty digest]")
        shards.append((shard, row[1]))
    if len({s for s, _ in shards}) != len(shards):
        raise RemoteProtocolError("task shards repeat a shard")
    entries = tuple(digest_entry(e) for e in fields.array(f[3]))
    return TaskShards(level, tuple(shards), entries, optional_id(f[4]))


def optional_id(v: Any) -> bytes:
    """A task or node id, or empty (a listing's first page, an unclaimed task's owner)."""
    return b"" if v == b"" else fields.node_id(v)


def optional_name(v: Any) -> str:
    """A name that may be empty (a listing's filters, a summary's outcome)."""
    if type(v) is not str or len(v) > MAX_NAME_CHARS:
        raise RemoteProtocolError(f"expected a string of at most {MAX_NAME_CHARS} chars")
    return v


def summary_fields(s: TaskSummary) -> list[Any]:
    return [
        s.task_id,
        s.role,
        s.state,
        s.outcome,
        s.origin,
        s.owner,
        fields.encodable(s.epoch),
        float(s.created),
    ]


def task_progress_from(f: list[Any]) -> TaskProgress:
    """A progress report: [kind, task id, epoch, step kind, time, [[key, value], ...]], and
    for a relayed one [runner, via task id, via epoch] after them."""
    epoch, time = fields.uint(f[2]), f[4]
    if epoch < 1:
        raise RemoteProtocolError("a progress report's epoch starts at 1")
    if type(time) is not float or not (math.isfinite(time) and time >= 0.0):
        raise RemoteProtocolError("a progress report's time must be a non-negative float")
    pairs = fields.array(f[5])
    if len(pairs) > MAX_PROGRESS_FIELDS:
        raise RemoteProtocolError(f"a progress report has at most {MAX_PROGRESS_FIELDS} fields")
    detail: list[tuple[str, ProgressValue]] = []
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise RemoteProtocolError("a progress field is a [key, value] pair")
        detail.append((fields.name(pair[0]), _progress_value(pair[1])))
    if len({key for key, _ in detail}) != len(detail):
        raise RemoteProtocolError("a progress report names a field twice")
    owner, via, via_epoch = b"", b"", 0
    if len(f) > 6:
        owner, via, via_epoch = fields.node_id(f[6]), fields.node_id(f[7]), fields.uint(f[8])
        if via_epoch < 1:
            raise RemoteProtocolError("a relayed progress report's via epoch starts at 1")
    return TaskProgress(
        fields.node_id(f[1]), epoch, fields.name(f[3]), time, tuple(detail), owner, via, via_epoch
    )


def _progress_value(v: Any) -> ProgressValue:
    if v is None or type(v) is bool:
        return v
    if type(v) is int and -MAX_UINT - 1 <= v <= MAX_UINT:
        return v
    if type(v) is float and math.isfinite(v):
        return v
    if type(v) is str and len(v) <= MAX_PROGRESS_TEXT:
        return v
    raise RemoteProtocolError(
        f"a progress value is null, a boolean, a 64-bit integer, a finite float or a string "
        f"of at most {MAX_PROGRESS_TEXT} chars"
    )


def task_page_from(f: list[Any]) -> TaskPage:
    rows, more = fields.array(f[2]), f[3]
    if len(rows) > MAX_PAGE or type(more) is not bool:
        raise RemoteProtocolError(f"a task page has at most {MAX_PAGE} rows and a boolean more")
    return TaskPage(fields.uint(f[1]), tuple(summary_from(r) for r in rows), more)


def summary_from(v: Any) -> TaskSummary:
    if not isinstance(v, list) or len(v) != 8:
        raise RemoteProtocolError("a task summary has 8 fields")
    task_id, role, state, outcome, origin, owner, epoch, created = v
    if type(created) is not float or not math.isfinite(created):
        raise RemoteProtocolError("a task summary's created time must be a finite float")
    return TaskSummary(
        fields.node_id(task_id),
        fields.name(role),
        fields.name(state),
        optional_name(outcome),
        fields.node_id(origin),
        optional_id(owner),
        fields.uint(epoch),
        created,
    )
