"""Durable agent steps: what the agent loop records as checkpoints, and how a run resumes.

Theory of operation (issue 13, "Takeovers resume"). Each step of an agent's run is recorded
through the peer's `Driver.checkpoint` as a signed checkpoint held by the task's replicas and
audience. A run that starts where an earlier run of the task left checkpoints (a takeover at
epoch e + 1, or this owner's own run of the epoch before a restart) rebuilds the conversation
from them (`Resume`) and calls the model only for the steps nobody completed.

Payload: one compact JSON object (UTF-8, no spaces) per checkpoint, its kind under "k"; the
protocol treats it as opaque bytes. "step" numbers the run's model calls from 1.
- `{"k":"call","step":n}`: model call n is about to be made (written before the call, so a
  call in flight when the peer died is seen, and its repetition counted).
- `{"k":"reply","step":n,"content":str,"tools":[[id,name,arguments],...],
  "usage":[prompt,completion,cost_micro],"model":str}`: model call n answered.
- `{"k":"tool","step":n,"call":id,"result":str}`, plus `"charged":[prompt,completion,cost]`
  for a delegation charged to the budget: the result of one tool call of step n.
- `{"k":"child","role":str,"request":str,"child":hex}`: the child task this run submitted or
  reused for (role, request), written before waiting on it, so a resumed run waits on that
  child even where its record has not arrived yet.
A resumed run first re-records the "reply", "tool" and "child" checkpoints it resumed under
its own epoch, each with `"copy":true` (not calls made, only carried forward), so a second
takeover resumes from the second run's checkpoints alone. Unknown kinds are ignored.

Invariants:
- Recording never fails a task: a checkpoint the driver refuses (fenced, over
  `MAX_CHECKPOINT_BYTES`, `MAX_CHECKPOINTS` reached) stops this run's recording, so its
  checkpoints stay a prefix of the run and a later resume redoes the rest.
- A resume reads only the latest epoch (not above the run's own) that has checkpoints; within
  it, records in sequence order, and a reply for a step already answered starts that step
  again (the later branch wins). Only replies of contiguous steps 1..k are used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from peer.agents.ports import Completion, ToolCall, Usage
from protocol.errors import LocalProtocolError

log = logging.getLogger(__name__)


class CheckpointView(Protocol):
    """A checkpoint as the agents read it (`protocol.tasks.messages.Checkpoint`)."""

    @property
    def epoch(self) -> int: ...

    @property
    def seq(self) -> int: ...

    @property
    def owner(self) -> bytes: ...

    @property
    def data(self) -> bytes: ...


class CheckpointPort(Protocol):
    """Where checkpoints are recorded and read (`peer.runtime.driver.Driver`)."""

    def checkpoint(self, task_id: bytes, epoch: int, data: bytes) -> int:
        """Record a checkpoint of this peer's run; returns its sequence number.

        Raises:
            protocol.errors.LocalProtocolError: this peer does not run (task_id, epoch), the
                data is too large, or the run has too many checkpoints.
        """
        ...

    def checkpoints(self, task_id: bytes) -> Sequence[CheckpointView]:
        """Every checkpoint of the task held here, ordered by (epoch, seq)."""
        ...

    async def saved(self) -> bool:
        """Wait until every checkpoint recorded so far is on disk here and handed on to its
        holders; whether every record so far is on disk."""
        ...


def encode(entry: dict[str, Any]) -> bytes:
    """The payload of one checkpoint (see the module docstring)."""
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any] | None:
    """A checkpoint's entry, or None when it is not one this module wrote."""
    try:
        entry = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("k"), str):
        return None
    return entry


def reply_entry(step: int, reply: Completion) -> dict[str, Any]:
    """The "reply" entry of model call `step`."""
    return {
        "k": "reply",
        "step": step,
        "content": reply.content,
        "tools": [[call.id, call.name, call.arguments] for call in reply.tool_calls],
        "usage": [reply.prompt_tokens, reply.completion_tokens, reply.cost_micro],
        "model": reply.model,
    }


def usage_of(value: object) -> Usage | None:
    """A [prompt, completion, cost] list as a `Usage`, or None when malformed."""
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return value[0], value[1], value[2]
    return None


def _completion(entry: dict[str, Any]) -> Completion | None:
    usage = usage_of(entry.get("usage"))
    content, tools, model = entry.get("content"), entry.get("tools"), entry.get("model")
    if usage is None or not isinstance(content, str) or not isinstance(model, str):
        return None
    if not isinstance(tools, list):
        return None
    calls = []
    for item in tools:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], dict)):
            return None
        calls.append(ToolCall(str(item[0]), str(item[1]), item[2]))
    return Completion(content, tuple(calls), usage[0], usage[1], usage[2], model)


@dataclass(slots=True)
class Resume:
    """What a run takes over from the checkpoints of an earlier one."""

    epoch: int
    """The epoch the checkpoints were read from."""
    replies: list[Completion] = field(default_factory=list)
    """The answers of model calls 1..k, in order."""
    results: dict[tuple[int, str], tuple[str, Usage | None]] = field(default_factory=dict)
    """(step, call id) → the tool's result and what a delegation charged to the budget."""
    children: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """(role, request) → the child task submitted or reused for it."""
    entries: list[dict[str, Any]] = field(default_factory=list)
    """The entries used, in order: what a run at a later epoch records again as copies."""

    @classmethod
    def load(cls, checkpoints: Sequence[CheckpointView], epoch: int) -> Resume | None:
        """The resume point in the checkpoints of the latest epoch <= `epoch`; None if none.

        Args:
            checkpoints: the task's checkpoints, in (epoch, seq) order.
            epoch: the epoch of the run that resumes.
        """
        epochs = [c.epoch for c in checkpoints if c.epoch <= epoch]
        if not epochs:
            return None
        source = max(epochs)
        resume = cls(source)
        ordered = sorted((c for c in checkpoints if c.epoch == source), key=lambda c: c.seq)
        for checkpoint in ordered:
            entry = decode(checkpoint.data)
            if entry is not None:
                resume.add(entry)
        return resume if resume.replies or resume.children else None

    def add(self, entry: dict[str, Any]) -> None:
        """Take one entry into account, in the order recorded."""
        kind, step = entry["k"], entry.get("step")
        if kind == "reply" and isinstance(step, int) and 1 <= step <= len(self.replies) + 1:
            reply = _completion(entry)
            if reply is None:
                return
            # A step answered again (a restart redid it) drops what followed the old answer.
            del self.replies[step - 1 :]
            self.results = {key: got for key, got in self.results.items() if key[0] < step}
            self.replies.append(reply)
        elif kind == "tool" and isinstance(step, int) and 1 <= step <= len(self.replies):
            result, call = entry.get("result"), entry.get("call")
            if isinstance(result, str) and isinstance(call, str):
                self.results[(step, call)] = (result, usage_of(entry.get("charged")))
        elif kind == "child":
            role, request, child = entry.get("role"), entry.get("request"), entry.get("child")
            if isinstance(role, str) and isinstance(request, str) and isinstance(child, str):
                try:
                    self.children[(role, request)] = bytes.fromhex(child)
                except ValueError:
                    return
        else:
            return
        self.entries.append(entry)


class Journal:
    """Records the checkpoints of one run; stops quietly at the first one refused.

    Args:
        port: where checkpoints go; None records nothing.
        task_id: the task.
        epoch: the run's epoch.
    """

    def __init__(self, port: CheckpointPort | None, task_id: bytes, epoch: int) -> None:
        self._port = port
        self._task_id = task_id
        self._epoch = epoch
        self.stopped: str | None = None if port is not None else "no checkpoint port"

    def held(self) -> Sequence[CheckpointView]:
        """Every checkpoint of the task held here (none without a port)."""
        return () if self._port is None else self._port.checkpoints(self._task_id)

    def load(self) -> Resume | None:
        """What this run resumes from (`Resume.load` over the checkpoints held here)."""
        if self._port is None:
            return None
        return Resume.load(self.held(), self._epoch)

    def record(self, entry: dict[str, Any]) -> None:
        """Record one entry, unless recording has stopped."""
        if self._port is None or self.stopped is not None:
            return
        try:
            self._port.checkpoint(self._task_id, self._epoch, encode(entry))
        except LocalProtocolError as exc:
            self.stopped = str(exc)
            log.info(
                "task %s epoch %d: no further checkpoints of this run: %s",
                self._task_id.hex()[:16],
                self._epoch,
                exc,
            )

    async def saved(self) -> None:
        """Wait until what was recorded so far is on disk here and on its way to the task's
        holders: a step reported or returned after this survives this peer's death."""
        if self._port is not None:
            await self._port.saved()

    def carry(self, resume: Resume) -> None:
        """Record again, as copies under this run's epoch, what it resumed from an earlier one."""
        if resume.epoch == self._epoch:
            return  # this owner's own earlier run of the epoch: already recorded under it
        for entry in resume.entries:
            self.record({**entry, "copy": True})
