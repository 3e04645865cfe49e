"""Pools of spawned agents: when one more instance of a role is worth it, and when to retire one.

Invariants:
- The decision is pure: `plan(settings, now, agents, waiting_since, free_elsewhere)` reads no
  clock and touches no state; the host (`peer.agents.host`) gathers the inputs and applies the
  plan on a timer every `check_interval(settings)` seconds.
- Only spawned agents are pooled: a declared agent (from the peer's config) never retires, and
  its roles are never grown by the pool (the operator sized them).
- A role grows by at most one instance per check, only from a spawned agent serving it (the
  template), only while its oldest open task has waited longer than `grow_after` and no other
  live peer advertises a free slot for it, and never beyond `max_spawned` spawned agents.
- An agent retires only when spawned, running nothing, idle for at least `idle_retire` seconds
  (a new agent counts as idle since it was added, so a freshly grown one is kept at least that
  long: the hysteresis that stops grow/retire flapping), and no work of its roles is waiting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peer.agents.spec import PoolSettings

MIN_CHECK_INTERVAL = 0.5
MAX_CHECK_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One agent as the pool sees it."""

    name: str
    roles: tuple[str, ...]
    spawned: bool
    """Added at runtime (by a spawn task or by the pool); declared agents are never pooled."""
    running: int
    """Executions it runs now, suspended ones included: one waiting on children is not idle."""
    idle_since: float
    """When it last finished work, or was added if it never ran any (monotonic seconds)."""


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """What to change now: agents to clone (one new instance each) and agents to retire."""

    grow: tuple[str, ...] = ()
    """Names of template agents, one per role to grow; the host adds a copy of each."""
    retire: tuple[str, ...] = ()
    """Names of agents to remove."""


def check_interval(settings: PoolSettings) -> float:
    """Seconds between two pool checks: half of `grow_after`, within 0.5 to 5 seconds, so a
    wait is noticed at most half a threshold late without polling faster than needed."""
    return min(MAX_CHECK_INTERVAL, max(MIN_CHECK_INTERVAL, settings.grow_after / 2))


def plan(
    settings: PoolSettings,
    now: float,
    agents: Sequence[PoolMember],
    waiting_since: Mapping[str, float],
    free_elsewhere: frozenset[str],
) -> PoolPlan:
    """Decide which roles grow by one spawned instance and which spawned agents retire.

    Args:
        settings: the pool limits.
        now: the current time, on the clock of `idle_since` and `waiting_since`.
        agents: every agent of this peer, declared and spawned.
        waiting_since: per role, since when its oldest open task has waited (unclaimed in the
            network, or claimed here and waiting for a free agent); roles with none are absent.
        free_elsewhere: roles some other live peer advertises with a free execution slot.

    Returns:
        The plan; empty when nothing should change.
    """
    spawned = sum(1 for a in agents if a.spawned)
    room = max(0, settings.max_spawned - spawned)
    grow: list[str] = []
    grown_roles: set[str] = set()
    templates = sorted((a for a in agents if a.spawned), key=lambda a: a.name)
    for template in templates:
        if len(grow) >= room:
            break
        for role in template.roles:
            if role in grown_roles:
                continue
            since = waiting_since.get(role)
            if since is None or now - since <= settings.grow_after or role in free_elsewhere:
                continue
            grow.append(template.name)
            grown_roles.update(template.roles)
            break
    retire = tuple(
        a.name
        for a in templates
        if a.running == 0
        and now - a.idle_since >= settings.idle_retire
        and not any(role in waiting_since for role in a.roles)
    )
    return PoolPlan(tuple(grow), retire)
