"""The demo's team: which agents each peer hosts, and the TOML config that says so.

Invariants:
- Peer p1 hosts the boss, every other peer an admin, and every peer a worker; each role has
  one agent per peer (peer.agents.spec), so a worker takes `WORKER_SLOTS` tasks at once.
- A config holds the peer's settings and its `[[agents]]`, never an address: the demo passes
  addresses as flags (port 0, then the seed it learned).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BOSS_PARTS = 2
"""Sections the boss splits the job into (one per admin when there are 3 peers)."""
ADMIN_PARTS = 3
"""Parts each admin splits its section into (one per worker task)."""
WORKER_SLOTS = 2
"""Tasks each peer's worker agent runs at once (`max_concurrent`)."""

BOSS_PROMPT = (
    "You lead a small team writing a city policy document. Split the job into {parts} "
    "sections, delegate each section to an admin with the delegate tool, then merge the "
    "admins' answers into one coherent document with final_answer."
)
ADMIN_PROMPT = (
    "You are responsible for one section of a city policy document. Split your section into "
    "{parts} parts, delegate each part to a worker with the delegate tool, then merge the "
    "workers' answers into the finished section with final_answer."
)
WORKER_PROMPT = (
    "You write one part of a city policy document: two or three short, concrete paragraphs "
    "with measures, owners and costs. Answer directly."
)


@dataclass(frozen=True, slots=True)
class TeamAgent:
    """One agent of the demo team, as written to its peer's `[[agents]]` table."""

    name: str
    role: str
    system: str
    tools: tuple[str, ...]
    max_concurrent: int


def team(peers: int) -> list[list[TeamAgent]]:
    """The agents of each peer: p1 the boss and a worker, the others an admin and a worker.

    Args:
        peers: how many peers (3 or more).

    Returns:
        One list of agents per peer, p1 first.
    """
    delegating = ("delegate", "final_answer")
    boss_prompt = BOSS_PROMPT.format(parts=BOSS_PARTS)
    admin_prompt = ADMIN_PROMPT.format(parts=ADMIN_PARTS)
    result = []
    for number in range(1, peers + 1):
        lead = (
            TeamAgent(
                "p1-boss",
                "boss",
                f"{boss_prompt}\nDelegate to: admin\nParts: {BOSS_PARTS}",
                delegating,
                1,
            )
            if number == 1
            else TeamAgent(
                f"p{number}-admin",
                "admin",
                f"{admin_prompt}\nDelegate to: worker\nParts: {ADMIN_PARTS}",
                delegating,
                1,
            )
        )
        worker = TeamAgent(
            f"p{number}-worker", "worker", WORKER_PROMPT, ("final_answer",), WORKER_SLOTS
        )
        result.append([lead, worker])
    return result


def config_text(agents: list[TeamAgent], model: str, key_file: Path, data_dir: Path) -> str:
    """The TOML config of one demo peer: its settings and its `[[agents]]`.

    Every model call goes through litellm, the offline model too (it is registered there as a
    custom provider): the demo runs the code path a real model takes. Peers import litellm
    before they start, so its seconds of import do not stall a running peer.
    """
    lines = [
        "[peer]",
        f"network_key_file = {_toml(str(key_file))}",
        f"data_dir = {_toml(str(data_dir))}",
        'profile = "local"',
    ]
    for agent in agents:
        lines += [
            "",
            "[[agents]]",
            f"name = {_toml(agent.name)}",
            f"roles = [{_toml(agent.role)}]",
            f"model = {_toml(model)}",
            f"system = {_toml(agent.system)}",
            f"tools = [{', '.join(_toml(tool) for tool in agent.tools)}]",
            f"max_concurrent = {agent.max_concurrent}",
        ]
    return "\n".join(lines) + "\n"


def _toml(text: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes; json.dumps never writes "\/").
    return json.dumps(text)
