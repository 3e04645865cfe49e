"""The tree rules (peer/agents/tree.py): depth, fan-out, loops, reuse and budgets."""

from __future__ import annotations

import pytest

from peer.agents.ports import AgentInput, Budget, TaskView
from peer.agents.spec import AgentSpec, TreeLimits
from peer.agents.tree import (
    Ledger,
    budget_for,
    check_depth,
    check_fan_out,
    find_child,
    find_loop,
    request_of,
    subtree_usage,
)


class Views:
    """Just enough of a TaskPort for the pure rules: task() and children()."""

    def __init__(self, *views: TaskView) -> None:
        self.views = {view.task_id: view for view in views}

    def task(self, task_id: bytes) -> TaskView | None:
        return self.views.get(task_id)

    def children(self, task_id: bytes) -> list[TaskView]:
        return [v for v in self.views.values() if v.parent == task_id]

    # The rest of TaskPort is never called by the rules.
    def submit_child(self, parent: bytes, role: str, data: bytes, priority: int) -> bytes:
        raise AssertionError("the rules never submit")

    async def wait_result(self, task_id: bytes) -> object:
        raise AssertionError("the rules never wait")

    def suspend(self, task_id: bytes) -> None:
        raise AssertionError

    def resume(self, task_id: bytes) -> None:
        raise AssertionError

    def role_available(self, role: str) -> bool:
        raise AssertionError


def _view(
    task_id: bytes,
    parent: bytes,
    role: str,
    request: str,
    usage: tuple[int, int, int] = (0, 0, 0),
    depth: int = 0,
) -> TaskView:
    return TaskView(task_id, parent, role, AgentInput(request, depth=depth).encode(), "done", usage)


def test_depth_limit() -> None:
    limits = TreeLimits(max_depth=2)
    assert check_depth(0, limits) is None and check_depth(1, limits) is None
    assert (
        check_depth(2, limits) == "depth limit: a child would be at depth 3, the tree's limit is 2"
    )
    assert check_depth(0, TreeLimits(max_depth=0)) is not None


def test_fan_out_limit() -> None:
    limits = TreeLimits(max_children=2)
    assert check_fan_out(1, limits) is None
    assert check_fan_out(2, limits) == "fan-out limit: this task already has 2 of 2 children"


def test_loop_guard_self_and_ancestors() -> None:
    port = Views(
        _view(b"root", b"", "boss", "write a brief"),
        _view(b"mid", b"root", "admin", "plan the brief"),
        _view(b"leaf", b"mid", "worker", "research x"),
    )
    own = ("worker", "research x")
    assert find_loop(port, b"mid", own, ("worker", "research x")) is not None
    assert "ancestor 1 level(s) up" in str(
        find_loop(port, b"mid", own, ("admin", "plan the brief"))
    )
    assert "ancestor 2 level(s) up" in str(find_loop(port, b"mid", own, ("boss", "write a brief")))
    assert find_loop(port, b"mid", own, ("boss", "another brief")) is None
    assert find_loop(port, b"mid", own, ("admin", "write a brief")) is None
    assert find_loop(port, b"", own, ("boss", "write a brief")) is None


def test_loop_guard_is_cycle_safe_and_plain_text_inputs() -> None:
    a = TaskView(b"a", b"b", "x", b"plain request", "running", (0, 0, 0))
    b = TaskView(b"b", b"a", "y", b"other", "running", (0, 0, 0))
    port = Views(a, b)
    assert find_loop(port, b"a", ("z", "q"), ("z", "nothing")) is None  # terminates
    assert find_loop(port, b"a", ("z", "q"), ("x", "plain request")) is not None
    assert request_of(b"plain request") == "plain request"
    assert request_of(AgentInput("r", Budget(5), 2).encode()) == "r"
    assert request_of(b'{"request": 5}') == '{"request": 5}'  # a bad AgentInput stays text


def test_find_child_for_reuse() -> None:
    port = Views(
        _view(b"p", b"", "boss", "brief"),
        _view(b"c1", b"p", "worker", "part 1"),
        _view(b"c2", b"p", "worker", "part 2"),
        _view(b"other", b"elsewhere", "worker", "part 1"),
    )
    found = find_child(port, b"p", "worker", "part 2")
    assert found is not None and found.task_id == b"c2"
    assert find_child(port, b"p", "checker", "part 2") is None
    assert find_child(port, b"q", "worker", "part 1") is None


def test_subtree_usage_counts_descendants_once() -> None:
    port = Views(
        _view(b"c", b"p", "w", "1", usage=(1, 1, 1)),
        _view(b"g1", b"c", "w", "2", usage=(10, 20, 30)),
        _view(b"g2", b"c", "w", "3", usage=(100, 0, 0)),
        _view(b"gg", b"g1", "w", "4", usage=(1000, 0, 5)),
    )
    assert subtree_usage(port, b"c", (1, 1, 1)) == (1111, 21, 36)
    assert subtree_usage(port, b"gg", (7, 0, 0)) == (7, 0, 0)


def test_budget_for_prefers_input_then_agent_then_default() -> None:
    limits = TreeLimits(default_budget=Budget(tokens=99))
    spec = AgentSpec("a", ("r",), budget=Budget(tokens=50))
    assert budget_for(Budget(tokens=10), spec, limits) == Budget(tokens=10)
    # The input limits the cost, the agent's cap still limits the tokens.
    assert budget_for(Budget(cost_micro=3), spec, limits) == Budget(tokens=50, cost_micro=3)
    assert budget_for(Budget(), spec, limits) == Budget(tokens=50)
    assert budget_for(Budget(), AgentSpec("a", ("r",)), limits) == Budget(tokens=99)


@pytest.mark.parametrize(
    ("asked", "agent", "default", "expected"),
    [
        (Budget(tokens=10**12), Budget(tokens=10_000), Budget(tokens=99), Budget(tokens=10_000)),
        (Budget(tokens=10**12), Budget(), Budget(tokens=10_000), Budget(tokens=10_000)),
        (
            Budget(tokens=10**12, cost_micro=10**12),
            Budget(tokens=10_000, cost_micro=7),
            None,
            Budget(tokens=10_000, cost_micro=7),
        ),
        (Budget(tokens=5), Budget(tokens=10_000), None, Budget(tokens=5)),
        (Budget(tokens=5), Budget(cost_micro=9), None, Budget(tokens=5, cost_micro=9)),
        (Budget(tokens=10**12), Budget(), Budget(), Budget(tokens=10**12)),  # no cap at all
    ],
)
def test_the_operators_budget_is_a_cap(
    asked: Budget, agent: Budget, default: Budget | None, expected: Budget
) -> None:
    limits = TreeLimits() if default is None else TreeLimits(default_budget=default)
    assert budget_for(asked, AgentSpec("a", ("r",), budget=agent), limits) == expected


def test_ledger_exhaustion() -> None:
    ledger = Ledger(Budget(tokens=100, cost_micro=50))
    assert ledger.exhausted() is None
    ledger.charge_call(40, 20, 10)
    assert ledger.exhausted() is None and ledger.own == (40, 20, 10)
    ledger.charge_child((30, 10, 0))
    assert ledger.exhausted() == "budget exhausted: used 100 of 100 tokens"
    costly = Ledger(Budget(cost_micro=50))
    costly.charge_call(10**6, 10**6, 50)
    assert costly.exhausted() == "budget exhausted: used 50 of 50 micro-dollars"
    assert Ledger(Budget()).exhausted() is None


def test_ledger_split_keeps_the_reserve_and_returns_the_rest() -> None:
    ledger = Ledger(Budget(tokens=1000, cost_micro=0))
    ledger.charge_call(100, 100, 7)
    assert ledger.split(2, 0.25) == Budget(tokens=300)  # 800 left, 600 shared, unlimited cost
    ledger.charge_child((150, 50, 0))  # one child spent 200 of its 300: 100 back to the parent
    ledger.charge_child((100, 0, 0))
    assert ledger.tokens_used == 500
    assert ledger.split(1, 0.5) == Budget(tokens=250)
    assert ledger.split(3, 0.0) == Budget(tokens=166)
    assert Ledger(Budget()).split(4, 0.25) == Budget()  # unlimited stays unlimited


def test_ledger_split_refuses_a_zero_share() -> None:
    ledger = Ledger(Budget(tokens=10, cost_micro=1000))
    ledger.charge_call(9, 0, 0)
    refusal = ledger.split(2, 0.25)
    assert refusal == "budget: 1 of 10 tokens remain, too little to share among 2 delegate call(s)"
    costly = Ledger(Budget(tokens=0, cost_micro=2))
    assert isinstance(costly.split(3, 0.0), str)
