"""The boss of the research crew: a role served by a Python function.

Served by `grapevine agent --handlers crew_boss`. A task of role `research` takes a topic,
asks two researchers (LLM agents, on whichever peer serves them) for notes at once, then a
writer for a brief built on those notes, and answers with the brief and the notes.
"""

from __future__ import annotations

import asyncio

from peer import Task, role

ANGLES = ("what is known", "what is still open")


@role("research")
async def research(task: Task) -> str:
    topic = task.input.strip()
    task.progress("asking the researchers", topic=topic, angles=len(ANGLES))
    notes = await asyncio.gather(
        *(task.delegate("researcher", f"Research {angle} about {topic}.") for angle in ANGLES)
    )
    task.progress("notes gathered")
    sections = "\n\n".join(
        f"## {angle}\n\n{note}" for angle, note in zip(ANGLES, notes, strict=True)
    )
    brief = await task.delegate(
        "writer",
        f"Write a short brief on {topic} for a general reader from these notes:\n\n" + sections,
    )
    return f"# {topic}\n\n{brief}\n\n# Notes\n\n{sections}\n"
