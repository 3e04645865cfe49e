"""The offline model's `Repeat:` and `Think:` directives (peer/agents/offline.py): a task of a
known number of model calls, each taking a known time, through the real model client."""

from __future__ import annotations

from pathlib import Path

from peer.agents.llm import ModelClient
from peer.agents.model_settings import LlmSettings
from peer.agents.offline import MAX_THINK, OFFLINE_MODEL, OfflineModel
from peer.agents.ports import AgentOutput
from peer.agents.runtime import AgentRuntime
from peer.agents.spec import AgentSpec, TreeLimits
from peer.agents.tools import Toolbox
from peer.runtime.executor import Work
from tests.peer.agents.test_runtime import MemoryPort

ROUND_TOOL = "tests.peer.agents.test_offline_rounds:work_round"
SYSTEM = "You work in rounds.\nRepeat: work_round 4\nThink: 0.25"


def work_round(round: int) -> str:
    """Do one round of the work.

    Args:
        round: which round, from 1.
    """
    return f"round {round} done"


async def test_repeat_makes_n_tool_rounds_then_answers_each_call_thinking(tmp_path: Path) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    client = ModelClient(LlmSettings(offline_via_litellm=False), sleep=sleep)
    tools = (ROUND_TOOL, "final_answer")
    spec = AgentSpec("rounds", ("rounds",), model=OFFLINE_MODEL, system=SYSTEM, tools=tools)
    runtime = AgentRuntime(
        spec, client, MemoryPort(), Toolbox.load(tools), TreeLimits(), tmp_path / "ws"
    )
    outcome = await runtime.run(Work(b"t", 1, "rounds", b"Plan the garden"))

    assert outcome.outcome == "ok", outcome.output
    output = AgentOutput.decode(outcome.output)
    assert output is not None and output.steps == 5, "four rounds, then the answer"
    assert output.answer.endswith(
        " Rounds: round 1 done; round 2 done; round 3 done; round 4 done."
    )
    assert slept == [0.25] * 5


def test_repeat_arguments_count_the_rounds_and_think_is_bounded() -> None:
    model = OfflineModel()
    offered = [
        {"type": "function", "function": {"name": n}} for n in ("work_round", "final_answer")
    ]
    messages = [
        {"role": "system", "content": "Repeat: work_round 2"},
        {"role": "user", "content": "go"},
    ]
    first = model.reply(messages, offered)
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("work_round", {"round": 1})]
    call = first.tool_calls[0]
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call.id, "function": {"name": "work_round", "arguments": '{"round": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "ok"},
    ]
    second = model.reply(messages, offered)
    assert [(c.name, c.arguments) for c in second.tool_calls] == [("work_round", {"round": 2})]
    assert model.reply(messages, offered[1:]).tool_calls[0].name == "final_answer", "not offered"

    def think(text: str) -> float:
        return model.think_seconds([{"role": "system", "content": text}])

    assert think("Think: 1.5") == 1.5
    assert think("Think: 1e9") == MAX_THINK
    assert think("Think: soon") == think("Think: nan") == think("nothing") == 0.0
