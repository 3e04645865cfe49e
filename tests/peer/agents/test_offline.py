"""The offline stand-in model (peer/agents/offline.py): planning, combining, answering, tools."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest

from peer.agents.offline import (
    ASPECTS,
    LABEL,
    MAX_PARTS,
    OFFLINE_MODEL,
    OfflineModel,
    OfflineReply,
    register_with_litellm,
)
from peer.agents.ports import ToolCall

REQUEST = "Write a policy report on urban cycling infrastructure in Lyon"
MODEL = OfflineModel()


def tools(*names: str) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in names
    ]


def conversation(system: str, request: str = REQUEST) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": request}]


def answered(messages: list[dict[str, Any]], reply: OfflineReply, results: list[str]) -> None:
    """Append the reply's tool calls (OpenAI format) and one result per call."""
    messages.append(
        {
            "role": "assistant",
            "content": reply.content or None,
            "tool_calls": [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                }
                for c in reply.tool_calls
            ],
        }
    )
    for call, result in zip(reply.tool_calls, results, strict=True):
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


def sentences(text: str) -> int:
    return len(re.findall(r"[.!?](\s|$)", text))


def test_answer_is_a_labelled_deterministic_paragraph() -> None:
    reply = MODEL.reply(conversation("You are helpful."), [])
    assert reply.tool_calls == ()
    assert reply.content.startswith(LABEL)
    assert 3 <= sentences(reply.content.removeprefix(LABEL)) <= 5
    assert "urban cycling infrastructure" in reply.content
    assert MODEL.reply(conversation("You are helpful."), []) == reply
    other = MODEL.reply(conversation("You are helpful.", "Plan a school garden"), [])
    assert other.content != reply.content and "school garden" in other.content


def test_answer_through_final_answer_when_offered() -> None:
    reply = MODEL.reply(conversation("You are helpful."), tools("final_answer", "delegate"))
    (call,) = reply.tool_calls
    assert call.name == "final_answer" and reply.content == ""
    assert call.arguments["answer"].startswith(LABEL)


@pytest.mark.parametrize(
    ("system", "request_text", "parts"),
    [
        ("Delegate to: worker", REQUEST, 3),
        ("You are the boss.\nDELEGATE TO:  worker  \nparts: 5", REQUEST, 5),
        ("Delegate to: worker\nParts: 2", f"{REQUEST} in 4 parts", 4),
        ("Delegate to: worker", f"{REQUEST}, 6 sections please", 6),
        ("Delegate to: worker", f"{REQUEST} in 15 parts", 15),
        ("Delegate to: worker", f"{REQUEST} in 500 parts", MAX_PARTS),
        ("Delegate to: worker\nParts: 0", REQUEST, 1),
        # A section of a split keeps the system's parts: no cascade of the request's override.
        ("Delegate to: worker\nParts: 2", f"Section 1 of 3 — Goals: {REQUEST} in 4 parts", 2),
    ],
)
def test_plan_delegates_distinct_sections(system: str, request_text: str, parts: int) -> None:
    reply = MODEL.reply(conversation(system, request_text), tools("delegate", "final_answer"))
    assert len(reply.tool_calls) == parts
    assert {c.name for c in reply.tool_calls} == {"delegate"}
    assert {c.arguments["role"] for c in reply.tool_calls} == {"worker"}
    requests = [c.arguments["request"] for c in reply.tool_calls]
    assert len(set(requests)) == parts and len({c.id for c in reply.tool_calls}) == parts
    for i, sub in enumerate(requests, 1):
        assert sub.startswith(f"Section {i} of {parts} — ") and sub.endswith(request_text)
    aspects = [sub.split(" — ")[1].split(":")[0] for sub in requests]
    if parts <= len(ASPECTS):
        assert aspects == sorted(aspects, key=ASPECTS.index)  # report order
    else:
        assert aspects[len(ASPECTS) :] == [f"Part {i}" for i in range(13, parts + 1)]


def test_plan_aspects_depend_on_the_request() -> None:
    plans = {
        tuple(c.arguments["request"].split(":")[0] for c in reply.tool_calls)
        for reply in (
            MODEL.reply(conversation("Delegate to: w", f"Topic {i}"), tools("delegate"))
            for i in range(10)
        )
    }
    assert len(plans) > 1


def test_no_plan_without_delegate_tool_or_directive() -> None:
    no_tool = MODEL.reply(conversation("Delegate to: worker"), tools("final_answer"))
    assert [c.name for c in no_tool.tool_calls] == ["final_answer"]
    assert MODEL.reply(conversation("Be brief."), tools("delegate")).content.startswith(LABEL)


def test_combine_merges_results_in_order_under_headings() -> None:
    messages = conversation("Delegate to: worker\nParts: 3")
    offered = tools("delegate", "final_answer")
    plan = MODEL.reply(messages, offered)
    subs = [c.arguments["request"] for c in plan.tool_calls]
    results = [MODEL.reply(conversation("You are a worker.", sub), []).content for sub in subs[:2]]
    # The third child's result arrives as an agent output (JSON), as the runtime may pass it.
    results.append(json.dumps({"answer": f"{LABEL}third part text", "agent": "w"}))
    answered(messages, plan, results)
    (final,) = MODEL.reply(messages, offered).tool_calls
    text = final.arguments["answer"]
    assert final.name == "final_answer"
    assert text.startswith(LABEL) and text.count(LABEL) == 1
    assert text.splitlines()[0] == f"{LABEL}{REQUEST} — combined from 3 delegated sections."
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings == [sub.split(" — ")[1].split(":")[0] for sub in subs]
    assert text.index(results[0].removeprefix(LABEL)) < text.index(results[1].removeprefix(LABEL))
    assert text.endswith("third part text")
    # Without final_answer the same text comes as content.
    assert MODEL.reply(messages, tools("delegate")).content == text


def test_spawn_comes_first_then_the_plan() -> None:
    messages = conversation("Spawn: researcher\nDelegate to: researcher\nParts: 2")
    offered = tools("spawn_agent", "delegate", "final_answer")
    spawn = MODEL.reply(messages, offered)
    (call,) = spawn.tool_calls
    assert call.name == "spawn_agent"
    assert call.arguments["role"] == "researcher" and call.arguments["model"] == OFFLINE_MODEL
    assert call.arguments["system"]
    answered(messages, spawn, ["spawned researcher on peer 1a2b"])
    plan = MODEL.reply(messages, offered)
    assert [c.name for c in plan.tool_calls] == ["delegate", "delegate"]
    assert {c.id for c in plan.tool_calls}.isdisjoint({call.id})


def test_save_writes_the_file_before_the_final_answer() -> None:
    messages = conversation("Save to: report.md")
    offered = tools("write_file", "final_answer")
    (write,) = MODEL.reply(messages, offered).tool_calls
    assert write.name == "write_file" and write.arguments["path"] == "report.md"
    answered(messages, MODEL.reply(messages, offered), ["wrote 420 bytes"])
    (final,) = MODEL.reply(messages, offered).tool_calls
    assert final.name == "final_answer"
    assert final.arguments["answer"] == write.arguments["content"]


def test_token_counts_are_a_characters_over_four_estimate() -> None:
    messages = conversation("You are helpful.")
    offered = tools("final_answer")
    reply = MODEL.reply(messages, offered)
    prompt = json.dumps([messages, offered], sort_keys=True, ensure_ascii=False)
    assert reply.prompt_tokens == math.ceil(len(prompt) / 4)
    (call,) = reply.tool_calls
    completion = call.name + json.dumps(call.arguments, ensure_ascii=False)
    assert reply.completion_tokens == math.ceil(len(completion) / 4)


def test_content_parts_and_missing_user_message() -> None:
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Delegate to: w"}]},
        {"role": "user", "content": [{"type": "text", "text": REQUEST}]},
    ]
    assert len(MODEL.reply(parts, tools("delegate")).tool_calls) == 3
    assert MODEL.reply([], []).content.startswith(LABEL)


async def test_litellm_round_trip_keeps_tool_calls() -> None:
    from peer.agents.llm import import_litellm

    litellm = import_litellm()
    register_with_litellm()  # idempotent: still one entry
    assert [i["provider"] for i in litellm.custom_provider_map].count("grapevine") == 1
    messages = conversation("Delegate to: worker\nParts: 4")
    offered = tools("delegate", "final_answer")
    response = await litellm.acompletion(
        model=OFFLINE_MODEL, messages=messages, tools=offered, _skip_mcp_handler=True
    )
    direct = MODEL.reply(messages, offered)
    got = [
        ToolCall(c.id, c.function.name, json.loads(c.function.arguments))
        for c in response.choices[0].message.tool_calls
    ]
    assert tuple(got) == direct.tool_calls
    assert response.choices[0].finish_reason == "tool_calls"
    assert response.usage.prompt_tokens == direct.prompt_tokens
    assert response.usage.completion_tokens == direct.completion_tokens
