"""The pool decision (peer/agents/pool.py): when to grow a spawned role and retire an agent."""

from __future__ import annotations

import pytest

from peer.agents.pool import PoolMember, PoolPlan, check_interval, plan
from peer.agents.spec import PoolSettings

SETTINGS = PoolSettings(max_spawned=3, idle_retire=60.0, grow_after=5.0)
NOW = 1000.0


def spawned(name: str, role: str, running: int = 0, idle_since: float = NOW) -> PoolMember:
    return PoolMember(name, (role,), True, running, idle_since)


def declared(name: str, role: str, running: int = 0, idle_since: float = 0.0) -> PoolMember:
    return PoolMember(name, (role,), False, running, idle_since)


CASES: list[tuple[str, list[PoolMember], dict[str, float], frozenset[str], PoolPlan]] = [
    ("nothing waits, nothing changes", [spawned("w-1", "w")], {}, frozenset(), PoolPlan()),
    (
        "waited longer than grow_after, no free slot elsewhere: grow one",
        [spawned("w-1", "w", running=1)],
        {"w": NOW - 6.0},
        frozenset(),
        PoolPlan(grow=("w-1",)),
    ),
    (
        "waited exactly grow_after: not yet",
        [spawned("w-1", "w", running=1)],
        {"w": NOW - 5.0},
        frozenset(),
        PoolPlan(),
    ),
    (
        "another peer has a free slot for the role: it will claim, do not grow",
        [spawned("w-1", "w", running=1)],
        {"w": NOW - 30.0},
        frozenset({"w"}),
        PoolPlan(),
    ),
    (
        "two instances of one role: still one more per check",
        [spawned("w-1", "w", running=1), spawned("w-2", "w", running=1)],
        {"w": NOW - 30.0},
        frozenset(),
        PoolPlan(grow=("w-1",)),
    ),
    (
        "two waiting roles, room for one more agent: the first template by name grows",
        [spawned("a-1", "a", running=1), spawned("b-1", "b", running=1)],
        {"a": NOW - 9.0, "b": NOW - 9.0},
        frozenset(),
        PoolPlan(grow=("a-1",)),
    ),
    (
        "max_spawned caps growth (declared agents do not count)",
        [
            spawned("a-1", "a", running=1),
            spawned("b-1", "b", running=1),
            declared("boss", "boss"),
            spawned("c-1", "c", running=1),
        ],
        {"a": NOW - 9.0, "b": NOW - 9.0},
        frozenset(),
        PoolPlan(),
    ),
    (
        "no room at all",
        [spawned("a-1", "a", 1), spawned("a-2", "a", 1), spawned("a-3", "a", 1)],
        {"a": NOW - 9.0},
        frozenset(),
        PoolPlan(),
    ),
    (
        "a declared role is never grown by the pool",
        [declared("boss", "boss", running=1)],
        {"boss": NOW - 60.0},
        frozenset(),
        PoolPlan(),
    ),
    (
        "idle long enough: retire",
        [spawned("w-1", "w", idle_since=NOW - 60.0)],
        {},
        frozenset(),
        PoolPlan(retire=("w-1",)),
    ),
    (
        "new agent (idle since it was added) is kept for idle_retire: hysteresis",
        [spawned("w-1", "w", idle_since=NOW - 59.9)],
        {},
        frozenset(),
        PoolPlan(),
    ),
    (
        "running work is never retired",
        [spawned("w-1", "w", running=1, idle_since=NOW - 600.0)],
        {},
        frozenset(),
        PoolPlan(),
    ),
    (
        "a declared agent is never retired",
        [declared("boss", "boss", idle_since=NOW - 10_000.0)],
        {},
        frozenset(),
        PoolPlan(),
    ),
    (
        "idle but work of its role waits (just arrived): keep it",
        [spawned("w-1", "w", idle_since=NOW - 600.0)],
        {"w": NOW - 0.1},
        frozenset(),
        PoolPlan(),
    ),
    (
        "one busy, one idle instance: grow is not needed when nothing waits; the idle retires",
        [spawned("w-1", "w", running=1), spawned("w-2", "w", idle_since=NOW - 61.0)],
        {},
        frozenset(),
        PoolPlan(retire=("w-2",)),
    ),
]


@pytest.mark.parametrize(
    ("agents", "waiting", "free", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(
    agents: list[PoolMember],
    waiting: dict[str, float],
    free: frozenset[str],
    expected: PoolPlan,
) -> None:
    assert plan(SETTINGS, NOW, agents, waiting, free) == expected


def test_max_spawned_counts_existing_spawned_agents() -> None:
    settings = PoolSettings(max_spawned=2, idle_retire=60.0, grow_after=5.0)
    agents = [spawned("a-1", "a", running=1), spawned("b-1", "b", running=1)]
    assert plan(settings, NOW, agents, {"a": 0.0, "b": 0.0}, frozenset()) == PoolPlan()
    settings = PoolSettings(max_spawned=3, idle_retire=60.0, grow_after=5.0)
    assert plan(settings, NOW, agents, {"a": 0.0, "b": 0.0}, frozenset()).grow == ("a-1",)
    settings = PoolSettings(max_spawned=4, idle_retire=60.0, grow_after=5.0)
    assert plan(settings, NOW, agents, {"a": 0.0, "b": 0.0}, frozenset()).grow == ("a-1", "b-1")


def test_an_agent_of_two_roles_grows_once_for_both() -> None:
    agents = [PoolMember("ab-1", ("a", "b"), True, 1, NOW)]
    assert plan(SETTINGS, NOW, agents, {"a": 0.0, "b": 0.0}, frozenset()).grow == ("ab-1",)


@pytest.mark.parametrize(
    ("grow_after", "interval"),
    [(0.0, 0.5), (0.4, 0.5), (2.0, 1.0), (5.0, 2.5), (10.0, 5.0), (600.0, 5.0)],
)
def test_check_interval(grow_after: float, interval: float) -> None:
    settings = PoolSettings(grow_after=grow_after)
    assert check_interval(settings) == interval
