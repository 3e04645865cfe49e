"""The embedded offline model: a deterministic stand-in so every feature runs without network.

It is a tiny rule-based "model" that reads the conversation the way the agent loop builds it
(OpenAI chat format) and answers with tool calls or text. Theory of operation, one rule per
step, applied to the whole conversation so far (it keeps no state between calls):

1. Directives come from the system prompt, one per line, case-insensitive:
   `Delegate to: ROLE`, `Parts: N` (default 3), `Spawn: ROLE`, `Save to: FILENAME`,
   `Repeat: TOOL N`, `Think: SECONDS`.
   A request may override the parts with "in N parts" or "N sections" (not a request that is
   itself a section, so a split does not cascade down a delegation tree).
2. Spawn: `spawn_agent` offered, a `Spawn:` directive, and no spawn_agent result yet →
   one spawn_agent call.
3. Plan: `delegate` offered, a `Delegate to:` directive, and no delegate result yet →
   N delegate calls, one per section, each naming a distinct aspect of the request.
3b. Repeat: a `Repeat: TOOL N` directive, TOOL offered and fewer than N results of it →
   one TOOL call with {"round": results so far + 1}; so a task makes N + 1 model calls
   (the durable-steps tests use it to have a task of a known number of steps). The answer
   ends with "Rounds: " and the TOOL results in order.
4. Compose the answer text: the merged delegate results (in the order of the calls) under
   headings with a one-line introduction, or else a 3-5 sentence paragraph from templates.
5. Save: `write_file` offered, a `Save to:` directive and no write_file result yet →
   write_file(path, text) — the save comes before the answer, so the file exists when the
   task's result is accepted.
6. Answer: a `final_answer` call if offered, else plain content.

`Think: SECONDS` (at most `MAX_THINK`) makes every reply take that long (`think_seconds`; the
callers wait), a stand-in for a real model's latency so a test can land a crash during a call.

Invariants:
- Deterministic: the same messages and tools give the same reply, byte for byte; every choice
  is seeded by a hash of the request text (no unseeded `random`, no clocks).
- Every answer text starts with `LABEL`, so nobody mistakes it for a real model.
- Token counts are an estimate (ceil(characters / 4)) of the prompt (messages and tool
  schemas) and of the completion; the offline model costs nothing.
- litellm is imported only by the functions that register and serve the provider, never at
  module import (it costs seconds and ~170 MB).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from peer.agents.ports import ToolCall

PROVIDER = "grapevine"
"""The litellm custom provider name: every model string "grapevine/..." is this stand-in."""
OFFLINE_MODEL = f"{PROVIDER}/offline"
LABEL = "[offline stand-in model] "
DEFAULT_PARTS = 3
MAX_PARTS = 24
"""More sections than this are cut: a request cannot make one task fan out without bound."""
MAX_REPEAT = 64
"""Most calls a `Repeat:` directive asks for."""
MAX_THINK = 60.0
"""Longest a `Think:` directive makes a reply take, in seconds."""

ASPECTS = (
    "Goals",
    "Stakeholders",
    "Costs and funding",
    "Risks",
    "Timeline",
    "Measures",
    "Equity",
    "Legal framework",
    "Communication",
    "Monitoring",
    "Alternatives",
    "Recommendations",
)
"""The aspects a plan splits a request into, in the order a report presents them."""

_DIRECTIVE = re.compile(
    r"^\s*(delegate to|parts|spawn|save to|repeat|think)\s*:\s*(.+?)\s*$", re.I | re.M
)
_REPEAT = re.compile(r"([\w.:-]+)\s+(\d{1,3})")
_PARTS_IN_REQUEST = re.compile(r"\bin\s+(\d{1,3})\s+parts\b|\b(\d{1,3})\s+sections\b", re.I)
_SECTION = re.compile(r"^Section (\d+) of (\d+) — ([^:]+): ", re.S)
_WORD = re.compile(r"[A-Za-zÀ-ÿ][A-Za-zÀ-ÿ'-]+")
_STOPWORD_TEXT = """
    a about above after again all also an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers him his how i if in into is it its itself just me more
    most my no nor not now of off on once only or other our out over own same she should so some
    such than that the their them then there these they this those through to too under until
    up very was we were what when where which while who whom why will with would you your
    please write draft give make prepare create describe explain short brief parts part
    sections section report note"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_COMMAND_TEXT = (
    "please write draft give make prepare create describe explain produce compose outline"
)
_COMMANDS = frozenset(_COMMAND_TEXT.split())


@dataclass(frozen=True, slots=True)
class OfflineReply:
    """One reply of the offline model, before any provider format."""

    content: str
    tool_calls: tuple[ToolCall, ...]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class _Directives:
    delegate_to: str | None
    parts: int
    spawn: str | None
    save_to: str | None
    repeat: tuple[str, int] | None


class OfflineModel:
    """The stand-in model; stateless, so one instance may serve any number of conversations."""

    def think_seconds(self, messages: list[dict[str, Any]]) -> float:
        """How long a reply to this conversation takes: its `Think:` directive, else 0."""
        system = "\n".join(_text(m) for m in messages if m.get("role") == "system")
        for key, value in _DIRECTIVE.findall(system):
            if key.lower() == "think":
                try:
                    seconds = float(value)
                except ValueError:
                    return 0.0
                return min(max(seconds, 0.0), MAX_THINK) if math.isfinite(seconds) else 0.0
        return 0.0

    def reply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> OfflineReply:
        """Answer a conversation in OpenAI chat format with the tools offered.

        Args:
            messages: system, user, assistant (with `tool_calls`) and tool messages.
            tools: OpenAI tool schemas ({"type": "function", "function": {"name": ...}}).

        Returns:
            Text or tool calls, with estimated token counts (see the module rules).
        """
        offered = {_tool_name(t) for t in tools}
        system = "\n".join(_text(m) for m in messages if m.get("role") == "system")
        request = next((_text(m) for m in messages if m.get("role") == "user"), "")
        directives = _directives(system, request)
        calls, results = _tool_history(messages)
        seed = _seed(request)
        step = sum(1 for m in messages if m.get("role") == "assistant")

        def call(index: int, name: str, arguments: dict[str, Any]) -> ToolCall:
            return ToolCall(f"call_{seed:016x}_{step}_{index}", name, arguments)

        planned: tuple[ToolCall, ...] = ()
        content = ""
        if directives.spawn and "spawn_agent" in offered and "spawn_agent" not in results:
            arguments = {
                "role": directives.spawn,
                "system": f"You are the {directives.spawn} agent. Answer requests briefly.",
                "model": OFFLINE_MODEL,
            }
            planned = (call(0, "spawn_agent", arguments),)
        elif directives.delegate_to and "delegate" in offered and "delegate" not in results:
            planned = tuple(
                call(i, "delegate", {"role": directives.delegate_to, "request": sub})
                for i, sub in enumerate(_plan(request, directives.parts, seed))
            )
        elif (
            directives.repeat is not None
            and directives.repeat[0] in offered
            and len(results.get(directives.repeat[0], [])) < directives.repeat[1]
        ):
            name, _ = directives.repeat
            planned = (call(0, name, {"round": len(results.get(name, [])) + 1}),)
        else:
            if "delegate" in results:
                text = _combine(request, calls.get("delegate", []), results["delegate"])
            else:
                text = _paragraph(request, seed)
            if directives.repeat is not None and directives.repeat[0] in results:
                text += " Rounds: " + "; ".join(results[directives.repeat[0]]) + "."
            if directives.save_to and "write_file" in offered and "write_file" not in results:
                arguments = {"path": directives.save_to, "content": text}
                planned = (call(0, "write_file", arguments),)
            elif "final_answer" in offered:
                planned = (call(0, "final_answer", {"answer": text}),)
            else:
                content = text
        prompt = json.dumps([messages, tools], sort_keys=True, ensure_ascii=False, default=str)
        completion = content + "".join(
            c.name + json.dumps(c.arguments, ensure_ascii=False) for c in planned
        )
        return OfflineReply(
            content, planned, _estimate_tokens(prompt), _estimate_tokens(completion)
        )


def register_with_litellm() -> None:
    """Make "grapevine/..." model strings work with `litellm.acompletion`; idempotent.

    Adds a `litellm.CustomLLM` for provider "grapevine" to `litellm.custom_provider_map`
    (litellm consults the map on every call). Imports litellm, so call it only when a model
    call through litellm is about to happen.
    """
    import litellm

    if any(item["provider"] == PROVIDER for item in litellm.custom_provider_map):
        return
    litellm.custom_provider_map.append(
        {"provider": PROVIDER, "custom_handler": _litellm_handler_class()()}
    )


def _litellm_handler_class() -> type[Any]:
    """Build the CustomLLM subclass; a function so litellm is imported only when needed."""
    from litellm.llms.custom_llm import CustomLLM

    model = OfflineModel()

    class OfflineProvider(CustomLLM):
        """litellm's view of the offline model: OpenAI-format replies with usage."""

        def completion(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(model.think_seconds(list(kwargs.get("messages") or [])))
            return _model_response(model, kwargs)

        async def acompletion(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(model.think_seconds(list(kwargs.get("messages") or [])))
            return _model_response(model, kwargs)

    return OfflineProvider


def _model_response(model: OfflineModel, kwargs: dict[str, Any]) -> Any:
    """Turn an offline reply into a `litellm.ModelResponse` (tools arrive in optional_params)."""
    import litellm

    messages: list[dict[str, Any]] = list(kwargs.get("messages") or [])
    tools: list[dict[str, Any]] = list((kwargs.get("optional_params") or {}).get("tools") or [])
    reply = model.reply(messages, tools)
    tool_calls = [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        for c in reply.tool_calls
    ]
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
    finish = "tool_calls" if tool_calls else "stop"
    if tool_calls:
        message["tool_calls"] = tool_calls
    return litellm.ModelResponse(
        model=kwargs.get("model") or OFFLINE_MODEL,
        choices=[{"index": 0, "message": message, "finish_reason": finish}],
        usage={
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    )


def _tool_name(tool: dict[str, Any]) -> str:
    function = tool.get("function")
    if isinstance(function, dict):
        return str(function.get("name", ""))
    return str(tool.get("name", ""))


def _text(message: dict[str, Any]) -> str:
    """The text of a message; content may be a string or a list of typed parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _directives(system: str, request: str) -> _Directives:
    found: dict[str, str] = {}
    for key, value in _DIRECTIVE.findall(system):
        found.setdefault(key.lower(), value)
    parts = DEFAULT_PARTS
    if found.get("parts", "").isdigit():
        parts = int(found["parts"])
    override = _PARTS_IN_REQUEST.search(request)
    if override and not _SECTION.match(request):
        parts = int(override.group(1) or override.group(2))
    repeat = _REPEAT.fullmatch(found.get("repeat", ""))
    return _Directives(
        found.get("delegate to"),
        max(1, min(parts, MAX_PARTS)),
        found.get("spawn"),
        found.get("save to"),
        (repeat.group(1), min(int(repeat.group(2)), MAX_REPEAT)) if repeat else None,
    )


def _tool_history(
    messages: list[dict[str, Any]],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
    """The tool calls made so far and their results, both grouped by tool name, in order.

    Returns:
        (name → arguments of each call, name → result texts in the order of the calls).
    """
    names: dict[str, str] = {}
    calls: dict[str, list[dict[str, Any]]] = {}
    order: dict[str, int] = {}
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for raw in message.get("tool_calls") or []:
            function = raw.get("function") or {}
            name = str(function.get("name", raw.get("name", "")))
            arguments = function.get("arguments", raw.get("arguments", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    arguments = {}
            names[str(raw.get("id", ""))] = name
            order[str(raw.get("id", ""))] = len(calls.setdefault(name, []))
            calls[name].append(arguments if isinstance(arguments, dict) else {})
    by_position: dict[str, dict[int, str]] = {}
    for message in messages:
        call_id = str(message.get("tool_call_id", ""))
        if message.get("role") == "tool" and call_id in names:
            by_position.setdefault(names[call_id], {})[order[call_id]] = _text(message)
    results = {name: [got[i] for i in sorted(got)] for name, got in by_position.items()}
    return calls, results


def _seed(request: str) -> int:
    return int.from_bytes(hashlib.sha256(request.encode()).digest()[:8], "big")


def _plan(request: str, parts: int, seed: int) -> list[str]:
    """Distinct sub-requests; aspects picked by the seed but kept in report order."""
    if parts <= len(ASPECTS):
        picked = sorted(random.Random(seed).sample(range(len(ASPECTS)), parts))
        aspects = [ASPECTS[i] for i in picked]
    else:
        aspects = [*ASPECTS, *(f"Part {i}" for i in range(len(ASPECTS) + 1, parts + 1))]
    return [f"Section {i} of {parts} — {aspect}: {request}" for i, aspect in enumerate(aspects, 1)]


def _combine(request: str, calls: list[dict[str, Any]], answers: list[str]) -> str:
    """Merge the delegate results under headings, in the order of the calls."""
    sections = []
    for i, answer in enumerate(answers):
        sub = str(calls[i].get("request", "")) if i < len(calls) else ""
        heading = match.group(3) if (match := _SECTION.match(sub)) else f"Part {i + 1}"
        sections.append(f"## {heading}\n\n{_answer_text(answer)}")
    subject = _SECTION.sub("", request).strip().rstrip(".") or "the request"
    intro = f"{LABEL}{subject} — combined from {len(answers)} delegated sections."
    return "\n\n".join([intro, *sections])


def _answer_text(result: str) -> str:
    """The answer in a delegate result: plain text, or an agent output's JSON "answer"."""
    try:
        body = json.loads(result)
    except ValueError:
        body = None
    text = (
        body["answer"] if isinstance(body, dict) and isinstance(body.get("answer"), str) else result
    )
    return text.removeprefix(LABEL).strip()


_OPENINGS = (
    "This note covers {topic}.",
    "The request concerns {topic}.",
    "What follows is a short take on {topic}.",
)
_MIDDLES = (
    "The central question is {a}: it should be settled before anything else is decided.",
    "{A} and {b} depend on each other, so they are best planned together.",
    "A practical first step is to agree who owns {a} and how progress on {b} is measured.",
    "Experience elsewhere suggests starting small with {a} and widening once {b} is understood.",
    "The main risk is treating {b} as an afterthought to {a}.",
)
_CLOSINGS = (
    "In short: clear goals, named owners and a review date for {a}.",
    "A review after a few months would show whether {a} is on track.",
)


def _paragraph(request: str, seed: int) -> str:
    """A deterministic 3-5 sentence paragraph built from templates and the request's words."""
    rng = random.Random(seed)
    section = _SECTION.match(request)
    subject = _SECTION.sub("", request)
    phrases = _key_phrases(subject) or ["the matter at hand"]
    a = phrases[0]
    b = phrases[1] if len(phrases) > 1 else "its consequences"
    topic = _topic(subject)
    if section:
        topic = f"the {section.group(3).lower()} of {topic}"
    fill = {"topic": topic, "a": a, "A": a[:1].upper() + a[1:], "b": b}
    middles = rng.sample(_MIDDLES, rng.randint(1, 3))
    sentences = [rng.choice(_OPENINGS), *middles, rng.choice(_CLOSINGS)]
    return LABEL + " ".join(s.format(**fill) for s in sentences)


def _topic(subject: str) -> str:
    """The request without its leading command ("Write a report on X" → "a report on X")."""
    words = subject.split()
    while words and words[0].lower().strip(",:") in _COMMANDS:
        words.pop(0)
    topic = " ".join(words[:16]).rstrip(".?!:;,")
    return topic or "the request"


def _key_phrases(text: str) -> list[str]:
    """Runs of content words, longest first (ties in text order), at most four."""
    runs: list[list[str]] = [[]]
    for token in text.split():
        word = token.strip(".,;:!?()[]\"'“”")
        if _WORD.fullmatch(word) and len(word) >= 3 and word.lower() not in _STOPWORDS:
            runs[-1].append(word)
        elif runs[-1]:
            runs.append([])
    phrases: list[str] = []
    for run in sorted((r for r in runs if r), key=len, reverse=True):
        phrase = " ".join(run)
        if phrase.lower() not in (p.lower() for p in phrases):
            phrases.append(phrase)
    return phrases[:4]


def _estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))
