"""The claim rule (protocol/tasks/claim_rule.py), one row per case, over a fake view.

Peers are named by one letter; `RANKED` is the HRW order the fake gives for every epoch (for
a takeover the owner taken over from is left out, as `Tasks.candidates` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from protocol.tasks.claim_rule import (
    ASK_RETRY,
    AskGrant,
    Decision,
    MakeClaim,
    Nothing,
    Pass,
    Resume,
    Wait,
    decide,
)
from protocol.tasks.messages import Cancel, Claim, EpochGrant, Result, TaskRecord
from protocol.tasks.state import TaskState

ROLE = "writer"
DELAY = 2.0
GRACE = 4.0
TASK = b"t" * 32
A, B, C = b"a" * 32, b"b" * 32, b"c" * 32
D = b"d" * 32
"""A member declared dead lately (`FakePeer.lately_dead`), ranked before A when in line."""
ARBITER = b"r" * 32
RANKED = [A, B, C]
SEEN = 10.0
"""When the task was first seen here."""


@dataclass
class FakeView:
    down: set[bytes] = field(default_factory=set)
    full: dict[bytes, float] = field(default_factory=dict)
    heard_only: set[bytes] = field(default_factory=set)
    """Declared down by another peer, not confirmed by this peer's own probes."""
    down_at: dict[bytes, float] = field(default_factory=dict)
    """When members in `down` were declared dead here (absent: long ago)."""

    def is_down(self, node_id: bytes) -> bool:
        return node_id in self.down or node_id in self.heard_only

    def confirmed_down(self, node_id: bytes) -> bool:
        return node_id in self.down

    def full_since(self, node_id: bytes) -> float | None:
        return self.full.get(node_id)

    def down_since(self, node_id: bytes) -> float | None:
        return self.down_at.get(node_id, -math.inf) if self.is_down(node_id) else None


@dataclass
class FakePeer:
    node_id: bytes
    roles: frozenset[str] = frozenset({ROLE})
    quiet_until: float = 0.0
    last_down: float = 0.0
    standby_delay: float = DELAY
    down_grace: float = GRACE
    running: bool = False
    room: bool = True
    lately_dead: list[bytes] = field(default_factory=list)
    """Members declared dead within the grace, kept in line for epoch 1 (`in_line`)."""

    def is_running(self, task_id: bytes) -> bool:
        return self.running

    def has_room(self) -> bool:
        return self.room

    def in_line(self, st: TaskState, epoch: int, now: float) -> list[bytes]:
        owner = st.claim.owner if epoch > 1 and st.claim is not None else b""
        ranked = [n for n in RANKED if n != owner]
        return [*self.lately_dead, *ranked] if epoch == 1 else ranked

    def arbiter(self, st: TaskState) -> bytes:
        return ARBITER


def record() -> TaskRecord:
    return TaskRecord(b"k", 0.0, ROLE, b"in", 0, b"", "key", b"", 0.0, "", b"", TASK, C)


def claim(owner: bytes, epoch: int = 1) -> Claim:
    return Claim(TASK, b"k", 1, epoch, b"", owner)


def task(
    *,
    held: bool = True,
    claimed_by: bytes | None = None,
    epoch: int = 1,
    owner_down_at: float | None = None,
    result_by: bytes | None = None,
    accepted: bool = False,
    cancelled: bool = False,
    grants: dict[int, bytes] | None = None,
    epoch_grants: tuple[tuple[int, bytes], ...] = (),
) -> TaskState:
    st = TaskState(TASK, SEEN)
    st.record = record() if held else None
    if claimed_by is not None:
        st.claim = claim(claimed_by, epoch)
        st.add_claim(st.claim)
        st.owner_down_at = owner_down_at
    if result_by is not None:
        r = Result(TASK, epoch, b"k", "ok", b"", (0, 0, 0), b"", result_by)
        st.add_result(r)
        if accepted:
            st.accepted = r
    if cancelled:
        st.cancel = Cancel(TASK, b"k", "stop", b"", C)
    st.grants = dict(grants or {})
    for e, grantee in epoch_grants:
        st.add_epoch_grant(EpochGrant(TASK, e, grantee, b"k", b"", ARBITER))
    return st


ROWS: list[tuple[str, FakeView, TaskState, float, FakePeer, Decision]] = [
    ("no record -> nothing", FakeView(), task(held=False), 20.0, FakePeer(A), Nothing()),
    (
        "accepted result -> nothing",
        FakeView(),
        task(claimed_by=B, result_by=B, accepted=True),
        20.0,
        FakePeer(A),
        Nothing(),
    ),
    ("cancelled -> nothing", FakeView(), task(cancelled=True), 20.0, FakePeer(A), Nothing()),
    ("running here -> nothing", FakeView(), task(), 20.0, FakePeer(A, running=True), Nothing()),
    (
        "role not served -> nothing",
        FakeView(),
        task(),
        20.0,
        FakePeer(A, roles=frozenset({"other"})),
        Nothing(),
    ),
    ("no claim, primary with room -> claim", FakeView(), task(), 20.0, FakePeer(A), MakeClaim(1)),
    ("no claim, primary full -> pass", FakeView(), task(), 20.0, FakePeer(A, room=False), Pass()),
    (
        "standby before its turn -> wait until first seen + rank * delay",
        FakeView(),
        task(),
        SEEN + 1.0,
        FakePeer(C),
        Wait(SEEN + 2 * DELAY),
    ),
    (
        "standby's turn counts from the last member down when later",
        FakeView(),
        task(),
        SEEN + 1.0,
        FakePeer(B, last_down=SEEN + 0.5),
        Wait(SEEN + 0.5 + DELAY),
    ),
    (
        "standby at its turn -> ask the primary",
        FakeView(),
        task(),
        SEEN + DELAY,
        FakePeer(B),
        AskGrant(A, 1, SEEN + DELAY + DELAY * ASK_RETRY),
    ),
    (
        "standby when all before it are full -> ask at once",
        FakeView(full={A: 1.0, B: 1.0}),
        task(),
        SEEN,
        FakePeer(C),
        AskGrant(A, 1, SEEN + DELAY * ASK_RETRY),
    ),
    (
        "standby whose turn came, without room -> pass",
        FakeView(full={A: 1.0}),
        task(),
        SEEN,
        FakePeer(B, room=False),
        Pass(),
    ),
    (
        "standby granted the epoch -> claim",
        FakeView(),
        task(grants={1: B}),
        SEEN,
        FakePeer(B),
        MakeClaim(1),
    ),
    (
        "granted to another live peer -> nothing",
        FakeView(),
        task(grants={1: C}),
        20.0,
        FakePeer(A),
        Nothing(),
    ),
    (
        "granted to a dead peer -> the rule applies again",
        FakeView(down={C}),
        task(grants={1: C}),
        20.0,
        FakePeer(A),
        MakeClaim(1),
    ),
    (
        "claimed by a live owner -> nothing",
        FakeView(),
        task(claimed_by=A),
        20.0,
        FakePeer(B),
        Nothing(),
    ),
    (
        "owner down -> the next asks the arbiter for epoch + 1",
        FakeView(down={A}),
        task(claimed_by=A, owner_down_at=15.0),
        20.0,
        FakePeer(B),
        AskGrant(ARBITER, 2, 20.0 + DELAY * ASK_RETRY),
    ),
    (
        "owner down, the arbiter granted epoch + 1 to us -> takeover",
        FakeView(down={A}),
        task(claimed_by=A, owner_down_at=15.0, epoch_grants=((2, B),)),
        20.0,
        FakePeer(B),
        MakeClaim(2),
    ),
    (
        "owner down, epoch + 1 granted to another live peer -> nothing",
        FakeView(down={A}),
        task(claimed_by=A, owner_down_at=15.0, epoch_grants=((2, C),)),
        20.0,
        FakePeer(B),
        Nothing(),
    ),
    (
        "owner down, its grantee down too -> ask the arbiter again",
        FakeView(down={A, C}),
        task(claimed_by=A, owner_down_at=15.0, epoch_grants=((2, C),)),
        20.0,
        FakePeer(B),
        AskGrant(ARBITER, 2, 20.0 + DELAY * ASK_RETRY),
    ),
    (
        "owner down, granted to us, no free slot -> pass",
        FakeView(down={A}),
        task(claimed_by=A, owner_down_at=15.0, epoch_grants=((2, B),)),
        20.0,
        FakePeer(B, room=False),
        Pass(),
    ),
    (
        "owner declared down by others, not by our own probes -> nothing (no takeover)",
        FakeView(heard_only={A}),
        task(claimed_by=A, owner_down_at=15.0),
        20.0,
        FakePeer(B),
        Nothing(),
    ),
    (
        "owner down -> the one after the next waits from the owner's death",
        FakeView(down={A}),
        task(claimed_by=A, owner_down_at=15.0),
        16.0,
        FakePeer(C),
        Wait(15.0 + DELAY),
    ),
    (
        "owner down within the grace -> wait until it has passed",
        FakeView(down={A}, down_at={A: 18.0}),
        task(claimed_by=A, owner_down_at=18.0),
        20.0,
        FakePeer(B),
        Wait(18.0 + GRACE),
    ),
    (
        "owner down for the grace -> ask the arbiter for epoch + 1",
        FakeView(down={A}, down_at={A: 18.0}),
        task(claimed_by=A, owner_down_at=18.0),
        18.0 + GRACE,
        FakePeer(B),
        AskGrant(ARBITER, 2, 18.0 + GRACE + DELAY * ASK_RETRY),
    ),
    (
        "first in line after a member dead lately -> its standby: wait a delay",
        FakeView(),
        task(),
        SEEN + 1.0,
        FakePeer(A, last_down=SEEN, lately_dead=[D]),
        Wait(SEEN + DELAY),
    ),
    (
        "first in line after a member dead lately -> then ask it, not claim",
        FakeView(),
        task(),
        SEEN + DELAY,
        FakePeer(A, last_down=SEEN, lately_dead=[D]),
        AskGrant(D, 1, SEEN + DELAY + DELAY * ASK_RETRY),
    ),
    (
        "granted by the member dead lately -> claim",
        FakeView(),
        task(grants={1: A}),
        SEEN + DELAY,
        FakePeer(A, last_down=SEEN, lately_dead=[D]),
        MakeClaim(1),
    ),
    (
        "our own claim without our result -> resume it",
        FakeView(),
        task(claimed_by=A),
        20.0,
        FakePeer(A),
        Resume(1),
    ),
    (
        "our own claim with our result -> nothing",
        FakeView(),
        task(claimed_by=A, result_by=A),
        20.0,
        FakePeer(A),
        Nothing(),
    ),
    ("not a candidate -> nothing", FakeView(), task(), 20.0, FakePeer(b"z" * 32), Nothing()),
    (
        "quiet after a stall -> wait until it ends",
        FakeView(),
        task(),
        20.0,
        FakePeer(A, quiet_until=25.0),
        Wait(25.0),
    ),
    (
        "restored and not joined -> nothing",
        FakeView(),
        task(),
        20.0,
        FakePeer(A, quiet_until=math.inf),
        Nothing(),
    ),
]


@pytest.mark.parametrize(
    ("view", "st", "now", "me", "expected"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_decide(
    view: FakeView, st: TaskState, now: float, me: FakePeer, expected: Decision
) -> None:
    assert decide(view, st, now, me) == expected
