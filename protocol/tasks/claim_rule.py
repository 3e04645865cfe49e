"""The claim rule: what this peer does next about one task. One pure function, `decide`.

Invariants:
- Nothing is decided about a task without its record, or one with an accepted result or a
  cancel, or one running here, or one of a role this peer does not serve.
- Before `quiet_until` (after a stall, or restored and not yet joined) nothing is claimed: what
  was missed must arrive first. Restored and not joined (`quiet_until` infinite) means no
  wake-up either; joining decides again.
- Our own claim without our result is resumed (a restart), never claimed again.
- Epoch 1 when no claim is held; epoch + 1 only when the claim's owner is declared dead (the
  epoch is the fencing token). Otherwise nothing.
- A member declared dead here less than `down_grace` ago may be alive: a busy peer is declared
  dead and refutes seconds later, and meanwhile it runs what it claimed. For epoch 1 it keeps
  its place in line (the next peer asks it, as a standby asks its primary, and claims only
  once the grace has run out); its claim is taken over only after the grace (decision 80).
- A takeover epoch (e > 1) is claimed only with the arbiter's signed grant naming this peer
  (decision 25): the first candidate asks the task's arbiter at once, the others a standby
  delay per rank later; a grant of that epoch to another live peer means nothing for us.
- Among the live peers able to run that epoch, in HRW order (for a takeover, without the owner
  taken over from), the first is the primary: it claims with a free slot and passes without.
  Anyone else claims only with the primary's grant: its turn comes at once when every peer
  ranked before it is full, else `standby_delay * rank` after the task (or the last member
  down, or the owner's death) was seen; then it asks the primary, with a free slot, and asks
  again after `ASK_RETRY` standby delays, then after twice and four times that while the same
  peer leaves it unanswered (`ask_retry_after`; the host sends no ask between two: decision
  95).
- A grant of the epoch to another live peer means nothing for us.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from protocol.tasks.state import TaskState

ASK_RETRY = 0.25
"""A standby that asked the primary for a grant asks again after this many standby delays,
doubled at each unanswered ask to the same peer up to `ASK_BACKOFF_MAX` times as long."""
ASK_BACKOFF_MAX = 4
"""The longest wait between two asks to one peer, in `ASK_RETRY` standby delays (so one
standby delay: a standby whose asks or answers were lost learns of the claim within one
delay of the losses ending, as before within a quarter). An ask that
goes unanswered mostly waits in a crowded peer's input: 100 peers on two cores
(bench_agents) had standbys asking every 1.5 s for 50 s, and the asked peer read 20 of those
asks in a row 42 s late (decision 95)."""


def ask_retry_after(asks_in_a_row: int) -> float:
    """How many `ASK_RETRY` spans to wait after the `asks_in_a_row`-th ask (from 1) to one
    peer: 1, 2, then `ASK_BACKOFF_MAX` at most."""
    return float(min(2 ** max(0, asks_in_a_row - 1), ASK_BACKOFF_MAX))


DOWN_GRACE_PROBES = 4
"""Probe intervals a member declared dead keeps its place in line and its claims
(`down_grace`). A busy member falsely declared dead hears of it at its next probe of a peer
that holds it dead (the ack says so) and its refutation spreads by gossip: 100 peers on two
cores (bench_agents, WAN timings, 5 s probes) saw members back 13 to 25 s after they were
declared dead (decision 80)."""


class ClaimView(Protocol):
    """What the claim rule needs to know about membership."""

    def is_down(self, node_id: bytes) -> bool: ...
    def confirmed_down(self, node_id: bytes) -> bool: ...
    def full_since(self, node_id: bytes) -> float | None: ...
    def down_since(self, node_id: bytes) -> float | None: ...


class ClaimStanding(Protocol):
    """What the claim rule needs to know about this peer."""

    node_id: bytes
    roles: frozenset[str]
    quiet_until: float
    last_down: float
    standby_delay: float
    down_grace: float

    def is_running(self, task_id: bytes) -> bool: ...
    def has_room(self) -> bool: ...
    def in_line(self, st: TaskState, epoch: int, now: float) -> list[bytes]:
        """Peers able to run `epoch` of the task in HRW order, its primary first: the live
        ones and, for epoch 1, those declared dead here within the grace."""
        ...

    def arbiter(self, st: TaskState) -> bytes | None:
        """The task's arbiter: the first live member of its home (None: none is live)."""
        ...


@dataclass(frozen=True, slots=True)
class Nothing:
    """Nothing to do until something changes."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Look again at `until`."""

    until: float


@dataclass(frozen=True, slots=True)
class Resume:
    """Run our own claim of `epoch` again (it was made before a restart)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class MakeClaim:
    """Claim `epoch` and start running the task."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Pass:
    """Our turn, but no free slot: look again when one frees (or a standby asks)."""


@dataclass(frozen=True, slots=True)
class AskGrant:
    """Ask `grantor` (the primary for epoch 1, the arbiter for a takeover) for a grant of
    `epoch`, and look again at `retry_at`."""

    grantor: bytes
    epoch: int
    retry_at: float


Decision = Nothing | Wait | Resume | MakeClaim | Pass | AskGrant


def down_grace_ends(view: ClaimView, node_id: bytes, now: float, grace: float) -> float | None:
    """When the down grace of `node_id` ends, if it was declared dead here less than `grace`
    seconds before `now` (else None): until then its claims are not taken over."""
    down = view.down_since(node_id)
    return down + grace if down is not None and now < down + grace else None


def decide(view: ClaimView, st: TaskState, now: float, me: ClaimStanding) -> Decision:
    """What `me` does next about the task `st` at `now` (see the module's invariants)."""
    rec = st.record
    if rec is None or st.accepted is not None or st.cancel is not None:
        return Nothing()
    if me.is_running(st.task_id) or rec.role not in me.roles:
        return Nothing()
    if now < me.quiet_until:
        return Wait(me.quiet_until) if me.quiet_until != math.inf else Nothing()
    claim = st.claim
    if claim is not None and claim.owner == me.node_id:
        if (claim.epoch, me.node_id) not in st.results:
            return Resume(claim.epoch)
        return Nothing()
    if claim is None:
        epoch, since = 1, max(st.first_seen, me.last_down)
    elif view.confirmed_down(claim.owner):
        # A takeover needs this peer's own failure detector to agree: a death declaration
        # alone (one forged DEAD message) costs the owner at most a refutation. And the grace
        # to have passed: a busy owner declared dead is still running the task.
        epoch, since = claim.epoch + 1, st.owner_down_at or now
        grace_ends = down_grace_ends(view, claim.owner, now, me.down_grace)
        if grace_ends is not None:
            return Wait(grace_ends)
    else:
        return Nothing()
    ranked = me.in_line(st, epoch, now)
    if me.node_id not in ranked:
        return Nothing()
    rank = ranked.index(me.node_id)
    if epoch > 1:
        return _take_over(view, st, now, me, epoch, since, rank)
    granted = st.grants.get(epoch)
    if granted is not None and granted != me.node_id and not view.confirmed_down(granted):
        return Nothing()  # the primary let another peer claim this epoch
    if rank > 0 and granted != me.node_id:
        return _stand_by(view, now, me, epoch, since, ranked, rank)
    if not me.has_room():
        return Pass()  # a slot freeing here, or a standby's ask, moves it on
    return MakeClaim(epoch)


def _stand_by(
    view: ClaimView,
    now: float,
    me: ClaimStanding,
    epoch: int,
    since: float,
    ranked: list[bytes],
    rank: int,
) -> Decision:
    # A standby steps in only with the primary's grant. Its turn comes at once when every
    # peer ranked before it looks full (the usual case under load), else after a standby
    # delay per rank: by then the claim of a peer before it has normally arrived, and asking
    # heals one that was lost. With no free slot it passes and asks when one frees.
    if any(view.full_since(n) is None for n in ranked[:rank]):
        due = since + rank * me.standby_delay
        if now < due:
            return Wait(due)
    if not me.has_room():
        return Pass()
    return AskGrant(ranked[0], epoch, now + me.standby_delay * ASK_RETRY)


def _take_over(
    view: ClaimView,
    st: TaskState,
    now: float,
    me: ClaimStanding,
    epoch: int,
    since: float,
    rank: int,
) -> Decision:
    # The arbiter grants a takeover epoch to one peer at a time (it re-grants only once that
    # peer is down), so candidates ask it in rank order rather than race each other.
    if (epoch, me.node_id) not in st.epoch_grants:
        if any(e == epoch and not view.confirmed_down(grantee) for e, grantee in st.epoch_grants):
            return Nothing()  # granted to another live peer
        due = since + rank * me.standby_delay
        if now < due:
            return Wait(due)
        if not me.has_room():
            return Pass()
        arbiter = me.arbiter(st)
        if arbiter is None:
            return Nothing()  # no member of its home is up: a member's return decides again
        return AskGrant(arbiter, epoch, now + me.standby_delay * ASK_RETRY)
    if not me.has_room():
        return Pass()
    return MakeClaim(epoch)
