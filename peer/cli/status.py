"""`grapevine status`: the fleet overview in the terminal, as the local peer sees it.

Members with their status, roles, free slots, agents and model spend (what each advertises in
its peer state); the tasks this peer holds by state; its own agents and model calls. It reads
the JSON endpoints the other commands read (`/v1/members`, `/v1/tasks/stats`, `/v1/agents`),
one after the other on one kept-alive connection (no event loop: `peer.client_blocking`), and
changes nothing.

Invariants:
- `--json` prints `{members, tasks, agents}` exactly as the API sent each, plus `summary`, the
  figures the human view computes (`summarize`): scripts read the same numbers people do.
- The human view is `render_status`, a pure function of the three answers; a field a peer did
  not send shows as "-" or "?" (`peer.cli.render`'s rule), never as an error.
- The network's agents and spend are the sums over alive members of what their signed peer
  states advertise (`agents`, `spend_micro` in `/v1/members`; decision 47), refreshed every
  few seconds, and so are the tokens, spend and rate-limit waits per model across the network
  (decision 59); calls and the last per-model table are the local peer's (`/v1/agents`).
"""

from __future__ import annotations

import argparse
from typing import Any

from peer.cli import render
from peer.cli.common import api_option, client_command, json_option
from peer.cli.parsing import EXIT_OK, Subcommands, add_command
from peer.client import GrapevineClient, JsonObject

TASK_STATES = ("pending", "running", "done", "failed", "cancelled")
MEMBER_STATUSES = ("alive", "suspect", "dead", "left")


def register(commands: Subcommands) -> None:
    """Add `status` to `grapevine`."""
    status = add_command(
        commands,
        "status",
        "Show what the local peer sees of the network: every member with its status, roles, "
        "free slots, agents and model spend (summed over alive members); the tasks this peer "
        "holds, by "
        "state, with executions, duplicates, takeovers and fenced runs; what runs here; its "
        "agents; and its model calls, tokens and spend. --json prints the three API answers "
        "it reads (members, tasks, agents) and the summary computed from them.",
        "  grapevine status\n  grapevine status --json | jq .summary",
        (api_option(), json_option()),
    )
    client_command(status, show_status)


async def show_status(client: GrapevineClient, args: argparse.Namespace) -> int:
    """Fetch the three answers and print them (see the module invariants)."""
    members = await client.members()
    tasks = await client.task_stats()
    agents = await client.agents()
    if args.json:
        summary = summarize(members, tasks, agents)
        whole = {"members": members, "tasks": tasks, "agents": agents, "summary": summary}
        print(render.as_json(whole))
    else:
        print(render_status(members, tasks, agents))
    return EXIT_OK


def summarize(members: list[JsonObject], tasks: JsonObject, agents: JsonObject) -> JsonObject:
    """The figures of the overview: members by status, alive members' free slots, roles,
    agents, spend and breakers not closed (what their peer states advertise: decision 54),
    every member's runs summed (decision 64), tasks held by state, and the model spend here
    (tokens and micro-dollars)."""
    by_status = dict.fromkeys(MEMBER_STATUSES, 0)
    free_slots, network_agents, network_spend, roles = 0, 0, 0, set()
    for member in members:
        status = str(member.get("status", "?"))
        by_status[status] = by_status.get(status, 0) + 1
        if status == "alive":
            free_slots += _count(member.get("free_slots"))
            network_agents += _count(member.get("agents"))
            network_spend += _count(member.get("spend_micro"))
            roles |= {str(role) for role in member.get("roles") or []}
    breakers = [
        {
            "member": str(member.get("short_id") or member.get("id") or "?"),
            "model": str(_object(use).get("model", "?")),
            "breaker": str(_object(use).get("breaker", "?")),
        }
        for member in members
        if member.get("status") == "alive"
        for use in member.get("models") or []
        if _object(use).get("breaker", "closed") != "closed"
    ]
    network_models: dict[str, dict[str, int]] = {}
    for member in members:
        if member.get("status") != "alive":
            continue
        for use in member.get("models") or []:
            name = str(_object(use).get("model", "?"))
            row = network_models.setdefault(name, dict.fromkeys(NETWORK_MODEL_COUNTS, 0))
            row["peers"] += 1
            for key in NETWORK_MODEL_COUNTS[1:]:
                row[key] += _count(_object(use).get(key))
    # Each member counts its own executions (decision 64): their sum is the network's.
    runs = dict.fromkeys(RUN_NAMES, 0)
    for member in members:
        for key in RUN_NAMES:
            runs[key] += _count(_object(member.get("runs")).get(key))
    totals = _object(tasks.get("totals"))
    by_state = {state: _count(totals.get(state)) for state in TASK_STATES}
    spend = dict.fromkeys(("calls", "prompt_tokens", "completion_tokens", "cost_micro"), 0)
    for stats in _object(agents.get("model")).values():
        for key in spend:
            spend[key] += _count(_object(stats).get(key))
    return {
        "members": by_status,
        "free_slots": free_slots,
        "agents": network_agents,
        "spend_micro": network_spend,
        "roles": sorted(roles),
        "breakers": breakers,
        "models": dict(sorted(network_models.items())),
        "runs": runs,
        "tasks": by_state,
        "spend": spend,
    }


RUN_NAMES = ("started", "ok", "failed", "duplicates", "takeovers", "fenced", "cancelled")
"""The run counts each member advertises (`runs` in GET /v1/members, `protocol.wire.RUN_COUNTS`;
the CLI does not import the protocol)."""
NETWORK_MODEL_COUNTS = ("peers", "tokens", "spend_micro", "waits", "waiting")
"""What `summarize` sums per model over the alive members' advertised models (decision 59)."""


def render_status(members: list[JsonObject], tasks: JsonObject, agents: JsonObject) -> str:
    """The human overview: four sections, one blank line apart."""
    summary = summarize(members, tasks, agents)
    return "\n\n".join(
        [
            _fleet(members, summary),
            _tasks(tasks, summary),
            _agents(agents),
            _spend(agents, summary),
        ]
    )


def _fleet(members: list[JsonObject], summary: JsonObject) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in summary["members"].items() if n)
    ordered = sorted(members, key=lambda m: (not m.get("self"), str(m.get("address", ""))))
    rows = [
        [
            render.short(m.get("short_id") or m.get("id")) + (" (self)" if m.get("self") else ""),
            str(m.get("address", "-")),
            str(m.get("status", "?")),
            ",".join(str(r) for r in m.get("roles") or []) or "-",
            render.number(m.get("free_slots")),
            render.number(m.get("queue_len")),
            render.number(m.get("load")),
            render.number(m.get("agents")),
            _dollars(m.get("spend_micro")),
        ]
        for m in ordered
    ]
    header = ["MEMBER", "ADDRESS", "STATUS", "ROLES", "FREE", "QUEUE", "LOAD", "AGENTS", "SPEND"]
    roles = ", ".join(summary["roles"]) or "none"
    tripped = "".join(
        f"\nbreaker {b['breaker'].replace('_', ' ')}: {b['model']} at {render.short(b['member'])}"
        for b in summary["breakers"]
    )
    runs = ", ".join(f"{render.number(summary['runs'].get(key))} {key}" for key in RUN_NAMES)
    fleet = (
        f"fleet: {len(members)} members ({counts or 'none'}); {summary['free_slots']} free "
        f"slots, {summary['agents']} agents and {_dollars(summary['spend_micro'])} of model "
        f"spend on alive members; roles served: {roles}\n"
        f"runs across the network (as members last advertised them): {runs}\n"
        f"{render.table(header, rows)}{tripped}"
    )
    if not summary["models"]:
        return fleet
    model_rows = [
        [
            name,
            render.number(use["peers"]),
            render.number(use["tokens"]),
            _dollars(use["spend_micro"]),
            render.number(use["waits"]),
            render.number(use["waiting"]),
        ]
        for name, use in summary["models"].items()
    ]
    model_header = ["MODEL", "PEERS", "TOKENS", "SPEND", "WAITS", "WAITING"]
    return (
        f"{fleet}\nmodels across the network (as alive members advertise them):\n"
        f"{render.table(model_header, model_rows)}"
    )


def _tasks(tasks: JsonObject, summary: JsonObject) -> str:
    totals = _object(tasks.get("totals"))
    here = _object(tasks.get("here"))
    states = ", ".join(f"{state} {n}" for state, n in summary["tasks"].items())
    runs = ", ".join(
        f"{render.number(totals.get(key))} {key}"
        for key in ("executions", "duplicates", "takeovers", "fenced")
    )
    calls = (
        f"{render.number(totals.get('model_calls'))} made, "
        f"{render.number(totals.get('model_calls_repeated'))} repeated after a takeover "
        f"({render.number(totals.get('repeated_tokens'))} tokens)"
    )
    return (
        f"tasks held here: {render.number(totals.get('tasks'))} ({states})\n"
        f"runs of them: {runs}\n"
        f"model calls of them: {calls}\n"
        f"executing here: {render.number(here.get('executor_running'))} running, "
        f"{render.number(here.get('executor_suspended'))} suspended, "
        f"{render.number(here.get('executor_waiting'))} waiting for a slot"
    )


def _agents(agents: JsonObject) -> str:
    hosted = [_object(a) for a in agents.get("agents") or []]
    roles = ", ".join(str(r) for r in agents.get("roles") or []) or "none"
    if not hosted:
        return f"agents here: none; roles served here: {roles}"
    rows = [
        [
            str(a.get("name", "?")),
            ",".join(str(r) for r in a.get("roles") or []) or "-",
            str(a.get("model", "?")),
            f"{render.number(a.get('running'))}/{render.number(a.get('max_concurrent'))}",
        ]
        for a in hosted
    ]
    table = render.table(["AGENT", "ROLES", "MODEL", "RUNNING"], rows)
    return f"agents here: {len(hosted)}; roles served here: {roles}\n{table}"


def _spend(agents: JsonObject, summary: JsonObject) -> str:
    spend = summary["spend"]
    tokens = spend["prompt_tokens"] + spend["completion_tokens"]
    line = (
        f"model spend here: {_dollars(spend['cost_micro'])}, {tokens} tokens "
        f"({spend['prompt_tokens']} prompt, {spend['completion_tokens']} completion) "
        f"in {spend['calls']} calls"
    )
    models = _object(agents.get("model"))
    if not models:
        return line
    rows = []
    for name in sorted(models):
        stats = _object(models[name])
        rows.append(
            [
                name,
                render.number(stats.get("calls")),
                render.number(stats.get("errors")),
                render.number(stats.get("prompt_tokens")),
                render.number(stats.get("completion_tokens")),
                _dollars(stats.get("cost_micro")),
                str(stats.get("breaker", "?")),
            ]
        )
    header = ["MODEL", "CALLS", "ERRORS", "PROMPT", "COMPLETION", "COST", "BREAKER"]
    return f"{line}\n{render.table(header, rows)}"


def _dollars(micro: object) -> str:
    return f"${micro / 1e6:.6f}" if isinstance(micro, int) else "?"


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
