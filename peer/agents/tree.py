"""The rules that keep a delegation tree finite: depth, fan-out, loops and budgets.

Theory of operation. A task at depth d may create children at depth d + 1 while
d + 1 <= `max_depth`, at most `max_children` of them. A delegate is refused when its
(role, request) is that of the task itself or of any ancestor (a loop), or when this execution
has already asked for it (the model asking twice). Budgets flow down: a task runs under what
its input asks, capped by the budget of the operator of the peer running it; a parent keeps
`parent_reserve` of what remains for its own calls and splits the rest equally among the
delegate calls of one model turn; when the children end, their actual usage (their whole
subtree's, as known here) is charged and the unspent rest is the parent's again. Before every
model call the runtime stops a task whose budget is spent.

Invariants:
- The checks are pure functions over a `TaskPort`'s views; they never submit or wait.
- A refusal is a reason string the runtime gives back to the model as the tool's result
  ("refused: ..."), never an exception: the model can change its plan.
- Every walk over the task graph is bounded and cycle-safe, since gossiped parents are data
  from other peers.
"""

from __future__ import annotations

from dataclasses import dataclass

from peer.agents.ports import AgentInput, Budget, TaskPort, TaskView, Usage
from peer.agents.spec import AgentSpec, TreeLimits

MAX_WALK = 256
"""Most tasks any walk over ancestors or a subtree visits."""


def request_of(data: bytes) -> str:
    """The request a task input carries (its text when it is not an `AgentInput`)."""
    try:
        return AgentInput.decode(data).request
    except ValueError:
        return data.decode("utf-8", errors="replace")


def budget_for(given: Budget, spec: AgentSpec, limits: TreeLimits) -> Budget:
    """The budget a task runs under: what its input asks, capped by the operator's.

    The operator's cap is the agent's `budget`, else `limits.default_budget`. Per unit, the
    smaller of the two limits applies (0 = unlimited, so a unit only one of them limits keeps
    that limit): a task may ask for less than the cap, never for more.
    """
    cap = spec.budget if spec.budget.tokens or spec.budget.cost_micro else limits.default_budget
    return Budget(
        tokens=tighter_limit(given.tokens, cap.tokens),
        cost_micro=tighter_limit(given.cost_micro, cap.cost_micro),
    )


def tighter_limit(asked: int, cap: int) -> int:
    """The smaller of two limits where 0 means unlimited."""
    if not asked or not cap:
        return asked or cap
    return min(asked, cap)


def check_depth(depth: int, limits: TreeLimits) -> str | None:
    """Why a task at `depth` may not create a child, or None if it may."""
    if depth + 1 > limits.max_depth:
        return (
            f"depth limit: a child would be at depth {depth + 1}, "
            f"the tree's limit is {limits.max_depth}"
        )
    return None


def check_fan_out(existing: int, limits: TreeLimits) -> str | None:
    """Why a task that has `existing` children may not create one more, or None."""
    if existing + 1 > limits.max_children:
        return f"fan-out limit: this task already has {existing} of {limits.max_children} children"
    return None


def find_loop(
    port: TaskPort, parent: bytes, own: tuple[str, str], wanted: tuple[str, str]
) -> str | None:
    """Why delegating `wanted` (role, request) from a task would loop, or None.

    Args:
        port: where the ancestors are looked up (`port.task(...).parent`, at most `MAX_WALK`
            of them, each once).
        parent: the task's parent (b"" for a root).
        own: the task's own (role, request).
        wanted: the (role, request) of the delegate call.
    """
    role = wanted[0]
    if wanted == own:
        return f"loop: this task is itself {role!r} with that request"
    current, seen, level = parent, set[bytes](), 1
    while current and current not in seen and level <= MAX_WALK:
        seen.add(current)
        view = port.task(current)
        if view is None:
            break
        if (view.role, request_of(view.input)) == wanted:
            return f"loop: an ancestor {level} level(s) up is already {role!r} with that request"
        current, level = view.parent, level + 1
    return None


def find_child(port: TaskPort, task_id: bytes, role: str, request: str) -> TaskView | None:
    """The oldest existing child of `task_id` with this role and request, if any.

    An execution re-run after a takeover finds the children its predecessor created here and
    waits for them instead of submitting (and paying for) them again.
    """
    for child in port.children(task_id):
        if child.role == role and request_of(child.input) == request:
            return child
    return None


def subtree_usage(port: TaskPort, task_id: bytes, own: Usage) -> Usage:
    """`own` (the task's usage) plus the usage of every descendant known here."""
    prompt, completion, cost = own
    stack = [task_id]
    seen = {task_id}
    while stack and len(seen) < MAX_WALK:
        for child in port.children(stack.pop()):
            if child.task_id in seen:
                continue
            seen.add(child.task_id)
            stack.append(child.task_id)
            prompt += child.usage[0]
            completion += child.usage[1]
            cost += child.usage[2]
    return prompt, completion, cost


@dataclass(slots=True)
class Ledger:
    """What one execution has spent against its budget: its own calls and its children.

    Args:
        budget: the limit (0 = unlimited in that unit).
    """

    budget: Budget
    own: tuple[int, int, int] = (0, 0, 0)
    """Prompt tokens, completion tokens and cost of this execution's own model calls."""
    children_tokens: int = 0
    children_cost: int = 0

    @property
    def tokens_used(self) -> int:
        return self.own[0] + self.own[1] + self.children_tokens

    @property
    def cost_used(self) -> int:
        return self.own[2] + self.children_cost

    def charge_call(self, prompt: int, completion: int, cost: int) -> None:
        """Count one of this execution's own model calls."""
        self.own = (self.own[0] + prompt, self.own[1] + completion, self.own[2] + cost)

    def charge_child(self, usage: Usage) -> None:
        """Count what a finished child (and its subtree) actually spent."""
        self.children_tokens += usage[0] + usage[1]
        self.children_cost += usage[2]

    def exhausted(self) -> str | None:
        """Why no further model call may be made, or None."""
        if self.budget.tokens and self.tokens_used >= self.budget.tokens:
            return f"budget exhausted: used {self.tokens_used} of {self.budget.tokens} tokens"
        if self.budget.cost_micro and self.cost_used >= self.budget.cost_micro:
            return (
                f"budget exhausted: used {self.cost_used} of {self.budget.cost_micro} micro-dollars"
            )
        return None

    def split(self, calls: int, parent_reserve: float) -> Budget | str:
        """Each child's share when one turn makes `calls` delegate calls, or why there is none.

        The parent keeps `parent_reserve` of what remains; the rest is split equally. A unit
        that is unlimited stays unlimited; a limited unit whose share would be 0 is a refusal
        (a 0 would mean unlimited to the child).
        """
        shares = []
        for limit, used, unit in (
            (self.budget.tokens, self.tokens_used, "tokens"),
            (self.budget.cost_micro, self.cost_used, "micro-dollars"),
        ):
            if not limit:
                shares.append(0)
                continue
            share = int(max(0, limit - used) * (1.0 - parent_reserve)) // max(1, calls)
            if share < 1:
                return (
                    f"budget: {max(0, limit - used)} of {limit} {unit} remain, too little "
                    f"to share among {calls} delegate call(s)"
                )
            shares.append(share)
        return Budget(tokens=shares[0], cost_micro=shares[1])
