"""The researchers and the writer of the research crew: LLM agents declared in Python, on a
peer started from Python.

    python crew_team.py team.toml

`team.toml` is a `grapevine agent --config` file (address, data directory, network key,
seeds); the `GRAPEVINE_*` variables work as they do for the command. The agents run on the
offline stand-in model, so the crew works with no network or key; give them a real model
(`model="openai/gpt-4o-mini"`, see docs/models.md) and the researcher calls `search_notes`.
"""

from __future__ import annotations

import enum
import sys
from typing import Literal

import peer


class Depth(enum.Enum):
    """How far a search goes."""

    QUICK = "quick"
    THOROUGH = "thorough"


def search_notes(
    query: str,
    depth: Depth = Depth.QUICK,
    audience: Literal["expert", "general"] = "general",
    limit: int | None = None,
) -> str:
    """Search the crew's shared notes.

    Args:
        query: what to look for, in a few words.
        depth: a quick look or a thorough one.
        audience: who the findings are for.
        limit: at most this many findings (none: all).
    """
    findings = [f"{query}: no notes yet ({depth.value} search, for a {audience} reader)"]
    return "\n".join(findings[:limit])


researcher = peer.Agent(
    "researcher",
    system="You research one angle of a topic and answer with concise notes.",
    tools=[search_notes, "final_answer"],
    max_concurrent=2,
)

writer = peer.Agent(
    "writer",
    system="You turn research notes into a short, clear brief.",
)


if __name__ == "__main__":
    raise SystemExit(peer.run(researcher, writer, config=sys.argv[1] if sys.argv[1:] else None))
