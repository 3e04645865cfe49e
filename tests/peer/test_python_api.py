"""The Python API's parts without a network (issue 13): `@role`, `Task` (input, delegate,
budget, progress), `Agent` in code, finding roles in modules, and the checks against the
configured agents. `tests/e2e/test_python_roles.py` and `test_examples.py` drive it as a user.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import pytest

import peer
from peer.agents.ports import AgentInput, AgentOutput, Budget, ChildResult, TaskView
from peer.agents.spec import AgentSpec, TreeLimits
from peer.agents.tools import Toolbox
from peer.python_api.serving import (
    Served,
    ServeError,
    collect,
    encode_result,
    load_modules,
    role_handlers,
    settings_with,
)
from peer.runtime.executor import Outcome, RoleHandler, Work
from peer.runtime.progress import ProgressLog
from peer.settings import AgentSettings


@dataclass
class Network:
    """An in-memory task network: each child runs once, when first waited for."""

    handlers: dict[str, RoleHandler] = field(default_factory=dict)
    views: dict[bytes, TaskView] = field(default_factory=dict)
    usage: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """Usage each role's result reports (an agent's model calls)."""
    events: list[tuple[str, bytes]] = field(default_factory=list)
    results: dict[bytes, asyncio.Future[ChildResult]] = field(default_factory=dict)

    def submit_child(self, parent: bytes, role: str, data: bytes, priority: int) -> bytes:
        task_id = hashlib.sha256(parent + role.encode() + data).digest()[:8]
        self.views.setdefault(task_id, TaskView(task_id, parent, role, data, "pending", (0, 0, 0)))
        return task_id

    async def wait_result(self, task_id: bytes) -> ChildResult:
        if task_id not in self.results:
            self.results[task_id] = asyncio.ensure_future(self._run(task_id))
        return await asyncio.shield(self.results[task_id])

    async def _run(self, task_id: bytes) -> ChildResult:
        view = self.views[task_id]
        work = Work(task_id, 1, view.role, view.input, 0, 0.0, view.parent)
        try:
            answer = await self.handlers[view.role](work)
        except Exception as exc:
            return ChildResult("failed", str(exc).encode(), (0, 0, 0))
        outcome = answer if isinstance(answer, Outcome) else Outcome(answer)
        usage = self.usage.get(view.role, outcome.usage)
        self.views[task_id] = replace(view, state="done", usage=usage)
        return ChildResult(outcome.outcome, outcome.output, usage)

    def suspend(self, task_id: bytes) -> None:
        self.events.append(("suspend", task_id))

    def resume(self, task_id: bytes) -> None:
        self.events.append(("resume", task_id))

    def task(self, task_id: bytes) -> TaskView | None:
        return self.views.get(task_id)

    def children(self, task_id: bytes) -> list[TaskView]:
        return [v for v in self.views.values() if v.parent == task_id]

    def role_available(self, role: str) -> bool:
        return role in self.handlers


ROOT = b"root-task-id"


async def run_root(network: Network, role: str, data: bytes) -> Outcome:
    """Run a root task of `role` (epoch 1) through its handler."""
    network.views[ROOT] = TaskView(ROOT, b"", role, data, "running", (0, 0, 0))
    result = await network.handlers[role](Work(ROOT, 1, role, data))
    assert isinstance(result, Outcome)
    return result


def serve(network: Network, *roles: peer.Role, limits: TreeLimits | None = None) -> None:
    handlers = role_handlers(roles, network, limits or TreeLimits(), None)
    network.handlers.update(handlers)


@peer.role("shout")
async def shout(task: peer.Task) -> str:
    return task.input.upper()


async def test_a_role_is_its_function_and_answers_text() -> None:
    assert isinstance(shout, peer.Role) and shout.name == "shout"
    network = Network()
    serve(network, shout)
    assert await run_root(network, "shout", b"hello") == Outcome(b"HELLO")
    # An agent's delegation arrives as an AgentInput: the request is the input.
    given = AgentInput("from an agent", Budget(100), depth=1).encode()
    assert (await run_root(network, "shout", given)).output == b"FROM AN AGENT"


async def test_results_json_and_failures() -> None:
    @peer.role("facts")
    async def facts(task: peer.Task) -> Any:
        return {"topic": task.json()["topic"], "count": 2, "id": task.id, "epoch": task.epoch}

    network = Network()
    serve(network, facts)
    output = (await run_root(network, "facts", b'{"topic": "bees"}')).output
    assert json.loads(output) == {"topic": "bees", "count": 2, "id": ROOT.hex(), "epoch": 1}
    assert encode_result(b"\x00raw") == b"\x00raw"
    assert encode_result(None) == b"null"
    with pytest.raises(TypeError, match="returned object, which is neither text nor JSON"):
        encode_result(object())


def test_bad_declarations_fail_at_decoration() -> None:
    with pytest.raises(ValueError, match="role 'echo' is reserved"):
        peer.role("echo")
    with pytest.raises(ValueError, match="role 'two words'"):
        peer.role("two words")
    with pytest.raises(ValueError, match="max_concurrent must be >= 1"):
        peer.role("x", max_concurrent=0)

    def plain(task: peer.Task) -> str:
        return ""

    with pytest.raises(TypeError, match="must be an `async def` function"):
        peer.role("x")(plain)  # type: ignore[arg-type]

    async def two(task: peer.Task, other: int) -> str:
        return ""

    with pytest.raises(TypeError, match="exactly one argument, the task \\(it takes 2\\)"):
        peer.role("x")(two)  # type: ignore[arg-type]


async def test_delegate_runs_a_child_with_the_depth_and_budget() -> None:
    seen: list[tuple[str, int, Budget]] = []

    @peer.role("writer")
    async def writer(task: peer.Task) -> str:
        seen.append((task.input, task.depth, task.budget))
        return f"draft on {task.input}"

    @peer.role("boss")
    async def boss(task: peer.Task) -> str:
        first, second = await asyncio.gather(
            task.delegate("writer", "bees"), task.delegate("writer", {"topic": "wasps"})
        )
        return f"{first} | {second} | spent {task.spent.tokens}"

    network = Network(usage={"writer": (30, 10, 0)})
    serve(network, writer, boss)
    given = AgentInput("plan", Budget(tokens=1000)).encode()
    result = await run_root(network, "boss", given)
    assert result.output == b'draft on bees | draft on {"topic": "wasps"} | spent 80'
    assert sorted(seen) == [("bees", 1, Budget(1000)), ('{"topic": "wasps"}', 1, Budget(1000))]
    # Suspended once while both children ran, resumed once.
    assert network.events == [("suspend", ROOT), ("resume", ROOT)]


async def test_an_agent_child_answers_with_its_answer() -> None:
    async def agent(work: Work) -> Outcome:
        return Outcome(AgentOutput("the answer", "a1", "grapevine/offline", 1).encode())

    @peer.role("boss")
    async def boss(task: peer.Task) -> str:
        return await task.delegate("researcher", "q")

    network = Network(handlers={"researcher": agent})
    serve(network, boss)
    assert (await run_root(network, "boss", b"go")).output == b"the answer"


async def test_refusals_and_failed_children_raise() -> None:
    @peer.role("boom")
    async def boom(task: peer.Task) -> str:
        raise RuntimeError("no luck")

    outcomes: list[str] = []

    @peer.role("boss")
    async def boss(task: peer.Task) -> str:
        for role, request in (("nobody", "x"), ("boss", task.input), ("boom", "y")):
            try:
                await task.delegate(role, request)
            except peer.DelegationRefused as exc:
                outcomes.append(f"refused: {exc}")
            except peer.ChildFailed as exc:
                outcomes.append(f"{exc.outcome}: {exc}")
        return "ok"

    network = Network()
    serve(network, boom, boss)
    await run_root(network, "boss", b"go")
    assert outcomes == [
        "refused: no live peer serves the role 'nobody'",
        "refused: loop: this task is itself 'boss' with that request",
        "failed: child task of role 'boom' failed: no luck",
    ]


async def test_depth_fan_out_and_budget_limits() -> None:
    @peer.role("leaf")
    async def leaf(task: peer.Task) -> str:
        return "leaf"

    @peer.role("boss")
    async def boss(task: peer.Task) -> str:
        answers = []
        for i in range(3):
            try:
                answers.append(await task.delegate("leaf", str(i)))
            except peer.DelegationRefused as exc:
                answers.append(str(exc))
        return "\n".join(answers)

    network = Network(usage={"leaf": (60, 0, 0)})
    serve(network, leaf, boss, limits=TreeLimits(max_children=2))
    text = (await run_root(network, "boss", AgentInput("go", Budget(1000)).encode())).output
    assert text.decode().splitlines() == [
        "leaf",
        "leaf",
        "fan-out limit: this task already has 2 of 2 children",
    ]

    network = Network(usage={"leaf": (600, 0, 0)})
    serve(network, leaf, boss)
    text = (await run_root(network, "boss", AgentInput("go", Budget(1000)).encode())).output
    assert text.decode().splitlines() == [
        "leaf",
        "leaf",
        "budget exhausted: used 1200 of 1000 tokens",
    ]

    network = Network()
    serve(network, leaf, boss, limits=TreeLimits(max_depth=1))
    deep = AgentInput("go", depth=1).encode()
    assert (await run_root(network, "boss", deep)).output.decode().splitlines()[0] == (
        "depth limit: a child would be at depth 2, the tree's limit is 1"
    )


async def test_a_rerun_reuses_the_child_its_predecessor_created() -> None:
    @peer.role("leaf")
    async def leaf(task: peer.Task) -> str:
        return "leaf"

    @peer.role("boss")
    async def boss(task: peer.Task) -> str:
        return await task.delegate("leaf", "once")

    network = Network()
    serve(network, leaf, boss)
    steps = ProgressLog(lambda: 0.0)
    network.handlers.update(role_handlers([boss], network, TreeLimits(), steps))
    await run_root(network, "boss", b"go")
    await run_root(network, "boss", b"go")  # a takeover re-runs the same task
    assert len(network.children(ROOT)) == 1
    reported = [dict(step.detail) for step in steps.steps(ROOT)]
    assert [(d["role"], d["reused"]) for d in reported] == [("leaf", False), ("leaf", True)]


async def test_progress_is_a_note_step_and_a_logged_task_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @peer.role("busy")
    async def busy(task: peer.Task) -> str:
        task.progress("found sources", count=3)
        return "done"

    network = Network()
    steps = ProgressLog(lambda: 0.0)
    network.handlers.update(role_handlers([busy], network, TreeLimits(), steps))
    with caplog.at_level(logging.INFO, logger="peer.python_api.task"):
        await run_root(network, "busy", b"go")
    (record,) = caplog.records
    assert record.getMessage() == (
        f"task {ROOT.hex()} progress: role=busy epoch=1 found sources count=3"
    )
    assert vars(record)["event"] == "progress" and vars(record)["count"] == 3
    # ... and a "note" step, which the watch stream and the tree show as it happens.
    [step] = steps.steps(ROOT)
    assert step.kind == "note" and dict(step.detail) == {"message": "found sources", "count": 3}


# --- agents in code ------------------------------------------------------------------------


class Depth(Enum):
    BRIEF = "brief"
    FULL = "full"


def lookup(topic: str, depth: Depth = Depth.BRIEF, lang: Literal["en", "fr"] = "en") -> str:
    """Look a topic up.

    Args:
        topic: what to look up.
    """
    return f"{topic}:{depth.value}:{lang}"


def test_an_agent_is_an_agents_table() -> None:
    agent = peer.Agent(
        "researcher", system="You research.", tools=[lookup, "final_answer"], budget=5000
    )
    assert agent.spec == AgentSpec(
        name="researcher",
        roles=("researcher",),
        system="You research.",
        tools=(f"{__name__}:lookup", "final_answer"),
        budget=Budget(5000),
    )
    box = Toolbox.load(agent.spec.tools)
    schema = box.tools["lookup"].schema["function"]["parameters"]
    assert schema["properties"]["lang"]["enum"] == ["en", "fr"]
    assert peer.Agent("w", roles="writer", max_concurrent=2).spec.roles == ("writer",)


def test_bad_agents_say_where() -> None:
    with pytest.raises(ValueError, match=r"^Agent\('a'\)\.max_concurrent: must be an integer"):
        peer.Agent("a", max_concurrent=0)
    with pytest.raises(ValueError, match=r"^Agent\('a'\)\.roles\[0\]: 'echo' is reserved"):
        peer.Agent("a", roles="echo")

    def nested(x: str) -> str:
        return x

    with pytest.raises(ValueError, match="is not a top-level function of its module"):
        peer.Agent("a", tools=[nested])
    with pytest.raises(ValueError, match="is not a top-level function"):
        peer.Agent("a", tools=[lambda x: x])


# --- finding what to serve -----------------------------------------------------------------


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "crew_roles.py").write_text(
        textwrap.dedent(
            """
            import peer

            @peer.role("boss", max_concurrent=2)
            async def boss(task):
                return await task.delegate("writer", task.input)

            writer = peer.Agent("writer", system="You write.")
            """
        )
    )
    (tmp_path / "empty_module.py").write_text("X = 1\n")
    yield tmp_path
    for name in ("crew_roles", "empty_module"):
        sys.modules.pop(name, None)


def test_modules_in_the_current_directory_are_found(modules: Path) -> None:
    served = load_modules(["crew_roles"])
    assert [r.name for r in served.roles] == ["boss"]
    assert [a.name for a in served.agents] == ["writer"]
    assert served.roles[0].max_concurrent == 2
    assert collect(["crew_roles", shout]).roles[1] is shout
    with pytest.raises(ServeError, match=r"module 'empty_module' .* defines no roles"):
        load_modules(["empty_module"])
    with pytest.raises(ServeError, match="no module named 'missing_mod'"):
        load_modules(["missing_mod"])


def test_settings_with_adds_agents_and_refuses_clashes(modules: Path) -> None:
    served = load_modules(["crew_roles"])
    settings = settings_with(AgentSettings(), served)
    assert [spec.name for spec in settings.agents] == ["writer"]
    configured = AgentSettings(agents=(AgentSpec("lead", ("boss",)),))
    with pytest.raises(ServeError, match=r"role 'boss' is served both by crew_roles\.boss and by"):
        settings_with(configured, served)
    named = AgentSettings(agents=(AgentSpec("writer", ("other",)),))
    with pytest.raises(ServeError, match="agent 'writer' is defined both in code and in"):
        settings_with(named, served)
    with pytest.raises(ServeError, match="seed-only"):
        settings_with(AgentSettings(no_agents=True), served)
    assert settings_with(AgentSettings(no_agents=True), Served()) == AgentSettings(no_agents=True)
    in_code = peer.Agent("lead", roles="boss")
    with pytest.raises(ServeError, match=r"role 'boss' is served both by .* in code"):
        collect([served.roles[0], in_code])


def test_import_peer_loads_none_of_the_api() -> None:
    import subprocess

    probe = "import sys, peer; print(sorted(m for m in sys.modules if m.startswith('peer')))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "['peer']", done.stderr
