"""The slot ledger: a suspended execution frees its slot; resuming takes it back at once."""

from __future__ import annotations

import pytest

from protocol.slots import SlotLedger

# Each case: the steps (operation, key), the limit, then the expected returns of each step
# (None for start and finish), slots used, slots free and whether one more fits.
CASES = [
    ("empty", [], 2, [], 0, 2, True),
    ("one running", [("start", "a")], 2, [None], 1, 1, True),
    ("full", [("start", "a"), ("start", "b")], 2, [None, None], 2, 0, False),
    (
        "a suspended execution frees its slot",
        [("start", "a"), ("start", "b"), ("suspend", "a")],
        2,
        [None, None, True],
        1,
        1,
        True,
    ),
    (
        "resume takes the slot back even beyond the limit",
        [("start", "a"), ("suspend", "a"), ("start", "b"), ("start", "c"), ("resume", "a")],
        2,
        [None, True, None, None, True],
        3,
        0,
        False,
    ),
    ("suspending twice changes nothing", [("start", "a"), ("suspend", "a"), ("suspend", "a")],
     1, [None, True, False], 0, 1, True),
    ("suspending what is not running changes nothing", [("suspend", "a")], 1, [False], 0, 1, True),
    ("resuming what is not suspended changes nothing", [("start", "a"), ("resume", "a")], 1,
     [None, False], 1, 0, False),
    (
        "finishing a suspended execution forgets it",
        [("start", "a"), ("suspend", "a"), ("finish", "a"), ("resume", "a")],
        1,
        [None, True, None, False],
        0,
        1,
        True,
    ),
    ("finishing what is not running is a no-op", [("finish", "a")], 1, [None], 0, 1, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("steps", "limit", "returns", "used", "free", "room"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_slot_ledger(
    steps: list[tuple[str, str]],
    limit: int,
    returns: list[bool | None],
    used: int,
    free: int,
    room: bool,
) -> None:
    ledger: SlotLedger[str, int] = SlotLedger()
    got: list[bool | None] = []
    for op, key in steps:
        match op:
            case "start":
                ledger.start(key, 0)
                got.append(None)
            case "finish":
                ledger.finish(key)
                got.append(None)
            case "suspend":
                got.append(ledger.suspend(key))
            case "resume":
                got.append(ledger.resume(key))
    assert got == returns
    assert (ledger.used(), ledger.free(limit), ledger.has_room(limit)) == (used, free, room)
    assert ledger.suspended <= set(ledger.running)


def test_clear_forgets_everything() -> None:
    ledger: SlotLedger[str, int] = SlotLedger()
    ledger.start("a", 1)
    ledger.start("b", 2)
    ledger.suspend("a")
    ledger.clear()
    assert ledger.running == {} and ledger.suspended == set() and ledger.used() == 0
