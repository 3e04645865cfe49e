"""The model calls of a task, counted from its checkpoints: made, repeated, and their tokens.

Every model call of an agent's run is logged as checkpoints with its run's epoch and owner
(`peer.agents.checkpoints`: a "call" entry before it, a "reply" entry with its usage after),
so whoever holds a task's checkpoints can count what its takeovers wasted.

Rules (one home: `count_model_calls`):
- A call is made for every "call" entry that is not a copy. Its tokens are those on the
  "reply" entry of the same run and step (none while it is in flight, or if it was lost).
- A call is repeated when an earlier "call" entry (in (epoch, seq) order) has the same step:
  the earlier run had started that step and its answer was not taken over (it was in flight
  when its peer died, or not recorded in time). `repeated_tokens` are the tokens the repeats
  cost (the lost call's own cost is unknown when it never answered).
- A call resumed is a copied "reply": an answer taken over instead of calling again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from peer.agents.checkpoints import CheckpointView, decode, usage_of


@dataclass(slots=True)
class RunCalls:
    """The model calls of one run (epoch, owner)."""

    epoch: int
    owner: bytes
    model_calls: int = 0
    model_calls_repeated: int = 0
    model_calls_resumed: int = 0
    model_tokens: int = 0
    repeated_tokens: int = 0


@dataclass(slots=True)
class ModelCalls:
    """The model calls of a task over all its runs."""

    runs: list[RunCalls] = field(default_factory=list)

    @property
    def model_calls(self) -> int:
        return sum(run.model_calls for run in self.runs)

    @property
    def model_calls_repeated(self) -> int:
        return sum(run.model_calls_repeated for run in self.runs)

    @property
    def model_tokens(self) -> int:
        return sum(run.model_tokens for run in self.runs)

    @property
    def repeated_tokens(self) -> int:
        return sum(run.repeated_tokens for run in self.runs)


def count_model_calls(checkpoints: Sequence[CheckpointView]) -> ModelCalls:
    """Count the model calls a task's checkpoints log (rules in the module docstring)."""
    counted = ModelCalls()
    by_run: dict[tuple[int, bytes], RunCalls] = {}
    started: set[int] = set()
    repeats: set[tuple[int, bytes, int]] = set()
    for checkpoint in sorted(checkpoints, key=lambda c: (c.epoch, c.seq)):
        entry = decode(checkpoint.data)
        step = entry.get("step") if entry is not None else None
        if entry is None or not isinstance(step, int):
            continue
        key = (checkpoint.epoch, checkpoint.owner)
        run = by_run.get(key)
        if run is None:
            run = by_run[key] = RunCalls(checkpoint.epoch, checkpoint.owner)
            counted.runs.append(run)
        copy = entry.get("copy") is True
        if entry["k"] == "call" and not copy:
            run.model_calls += 1
            if step in started:
                run.model_calls_repeated += 1
                repeats.add((*key, step))
            started.add(step)
        elif entry["k"] == "reply" and copy:
            run.model_calls_resumed += 1
        elif entry["k"] == "reply":
            usage = usage_of(entry.get("usage"))
            tokens = usage[0] + usage[1] if usage is not None else 0
            run.model_tokens += tokens
            if (*key, step) in repeats:
                run.repeated_tokens += tokens
    return counted
