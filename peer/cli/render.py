"""Human renderings of the local API's objects for the `grapevine` command (pure functions).

Invariants:
- Every function takes decoded API objects (docs/http-api.md) and returns text; none prints,
  reads the clock (except to show a timestamp in local time) or raises on missing fields: a
  field a peer did not send is shown as "-" or "?".
- `--json` output never comes from here except `as_json`, which keeps the API's field names.
- Imports only the standard library: the client commands print through here and start fast
  (the task tree, drawn with box-drawing guides, is `peer.cli.render_tree`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from peer.client import JsonObject

_MEMBER_STATE = {
    "member-joined": "alive",
    "member-updated": "alive",
    "member-recovered": "alive",
    "member-suspected": "suspect",
    "member-down": "dead",
    "member-left": "left",
}
"""The status a member is in after each membership event of the event stream."""


def as_json(value: Any) -> str:
    """Indented JSON with sorted keys, as every `--json` prints it."""
    return json.dumps(value, indent=2, sort_keys=True)


def members_table(members: Sequence[JsonObject]) -> str:
    """The `grapevine members` table, ourselves first (marked "(self)"), then by address, and a
    summary line such as "5 members: 4 alive, 1 dead". SEEN is the local time this peer last
    heard from the member ("-" for ourselves and for members not heard from since it started)."""
    ordered = sorted(members, key=lambda m: (not m.get("self"), str(m.get("address", ""))))
    rows = [
        [
            short(m.get("short_id") or m.get("id")) + (" (self)" if m.get("self") else ""),
            str(m.get("address", "-")),
            str(m.get("status", "?")),
            str(m.get("incarnation", "?")),
            ",".join(str(r) for r in m.get("roles") or []) or "-",
            number(m.get("free_slots")),
            number(m.get("queue_len")),
            number(m.get("load")),
            "-" if m.get("last_seen") is None else clock(m.get("last_seen")),
        ]
        for m in ordered
    ]
    header = ["ID", "ADDRESS", "STATUS", "INC", "ROLES", "SLOTS", "QUEUE", "LOAD", "SEEN"]
    counts: dict[str, int] = {}
    for m in members:
        status = str(m.get("status", "?"))
        counts[status] = counts.get(status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"{table(header, rows)}\n{len(members)} members: {summary}"


def agents_table(status: JsonObject) -> str:
    """The `grapevine agents` table (name, roles, model, load) and the roles the peer serves,
    e.g. "2 agents; roles served here: critic, writer"."""
    agents = [a for a in status.get("agents") or [] if isinstance(a, dict)]
    rows = [
        [
            str(a.get("name", "?")),
            ",".join(str(r) for r in a.get("roles") or []) or "-",
            str(a.get("model", "?")),
            f"{number(a.get('running'))}/{number(a.get('max_concurrent'))}",
            number(a.get("suspended")),
            duration(a.get("idle_for")) if a.get("idle_for") is not None else "-",
        ]
        for a in agents
    ]
    roles = ", ".join(str(r) for r in status.get("roles") or []) or "none"
    count = f"{len(agents)} agent{'' if len(agents) == 1 else 's'}" if agents else "no agents"
    summary = f"{count}; roles served here: {roles}"
    if not rows:
        return summary
    header = ["NAME", "ROLES", "MODEL", "RUNNING", "SUSPENDED", "IDLE"]
    return f"{table(header, rows)}\n{summary}"


def event_line(event: JsonObject) -> str:
    """One line for an event of `/v1/events`, e.g.
    "14:03:22 member-down k3j4h5l2mn 10.0.0.7:7946 (dead, incarnation 3)"."""
    kind = str(event.get("type", "?"))
    when = clock(event.get("time"))
    if kind == "event":
        text = (
            f"{when} event {event.get('name')} from {short(event.get('origin'))} "
            f"(ltime {event.get('ltime')})"
        )
        payload = str(event.get("payload") or "")
        return f"{text}: {payload}" if payload else text
    state = _MEMBER_STATE.get(kind)
    if state is not None:
        who = short(event.get("short_id") or event.get("id"))
        address = f" {event['address']}" if event.get("address") else ""
        return f"{when} {kind} {who}{address} ({state}, incarnation {event.get('incarnation')})"
    rest = {k: v for k, v in event.items() if k not in ("type", "time")}
    return f"{when} {kind} {json.dumps(rest, sort_keys=True)}"


def self_table(info: JsonObject) -> str:
    """`grapevine self`: one "name  value" line per field, uptime as a duration."""
    rows = []
    for key, value in info.items():
        shown = duration(value) if key == "uptime" else number(value)
        rows.append([key.replace("_", " "), shown])
    return table([], rows)


def health_line(health: JsonObject) -> str:
    """`grapevine health`, e.g. "ok: 5 members alive, up 3m12s"."""
    uptime = health.get("uptime")
    up = f", up {duration(uptime)}" if isinstance(uptime, int | float) else ""
    return f"{health.get('status', '?')}: {health.get('members_alive', '?')} members alive{up}"


def metrics_table(metrics: JsonObject) -> str:
    """`grapevine metrics`: one line per counter; per-reason counters one line per reason."""
    rows: list[list[str]] = []
    for key, value in metrics.items():
        label = key.replace("_", " ")
        if isinstance(value, dict):
            if not value:
                rows.append([label, "0"])
            rows.extend([f"{label} ({reason})", number(n)] for reason, n in sorted(value.items()))
        else:
            rows.append([label, number(value)])
    return table([], rows)


def keyring_table(keyring: JsonObject) -> str:
    """The key ids of a keyring: the primary first, then each accepted one."""
    rows = [["primary", str(keyring.get("primary", "?"))]]
    rows += [["accepted", str(key_id)] for key_id in keyring.get("accepted") or []]
    return table([], rows)


def tasks_table(tasks: list[JsonObject]) -> str:
    """The `grapevine tasks` table and a count line."""
    rows = [
        [
            str(t.get("id", "?"))[:12],
            str(t.get("role", "?")),
            str(t.get("state", "?")),
            short(t.get("owner")) if t.get("owner") else "-",
            str(t.get("epoch", "?")),
            str(t.get("duplicates", 0)),
            clock(t.get("created")),
        ]
        for t in tasks
    ]
    header = ["ID", "ROLE", "STATE", "OWNER", "EPOCH", "DUP", "CREATED"]
    return f"{table(header, rows)}\n{len(tasks)} tasks"


def task_details(task: JsonObject) -> str:
    """The `grapevine task` view: fields, execution log, result, and the cancel that ended
    it (who, why) if one did."""
    result = task.get("result") if isinstance(task.get("result"), dict) else None
    lines = [
        f"id          {task.get('id')}",
        f"role        {task.get('role')}",
        f"state       {task.get('state')}",
        f"owner       {task.get('owner') or '-'} (epoch {task.get('epoch')})",
        f"priority    {task.get('priority')}",
        f"created     {clock(task.get('created'))}",
        f"key         {task.get('idempotency_key') or '-'}",
        f"duplicates  {task.get('duplicates')}",
    ]
    for entry in task.get("executions") or []:
        outcome = f" {entry.get('outcome')}" if entry.get("outcome") else ""
        lines.append(
            f"execution   epoch {entry.get('epoch')} {short(entry.get('owner'))} "
            f"{entry.get('phase')}{outcome}"
        )
    if result is not None:
        lines.append(
            f"result      {result.get('outcome')} (epoch {result.get('epoch')}, "
            f"{short(result.get('owner'))})"
        )
        answer = answer_text(str(result.get("output", "")))
        lines.append("output      " + answer.replace("\n", "\n" + " " * 12))
    cancel = task.get("cancel") if isinstance(task.get("cancel"), dict) else None
    if cancel is not None:
        lines.append(
            f"ended       {cancel.get('outcome')} by {short(cancel.get('by'))}: "
            f"{cancel.get('reason')}"
        )
    return "\n".join(lines)


ANSWER_FIELDS = ("answer", "text", "output", "result", "content")
"""Fields of a JSON object output whose text is the answer, the first present wins (an agent's
output is `{"agent", "answer", "model", "steps"}`: peer.agents.ports.AgentOutput)."""


def answer_text(output: str) -> str:
    """A task's output as a person reads it.

    A JSON string is unwrapped; a JSON object shows the text of its first field named in
    `ANSWER_FIELDS` (an agent's answer), else the object indented; anything else (plain text,
    a number) is the output as it is.
    """
    try:
        value = json.loads(output)
    except (ValueError, RecursionError):
        return output
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for name in ANSWER_FIELDS:
            if isinstance(value.get(name), str):
                return str(value[name])
        return json.dumps(value, indent=2, ensure_ascii=False)
    if isinstance(value, list):
        return json.dumps(value, indent=2, ensure_ascii=False)
    return output


def tree_totals(tree: JsonObject) -> str:
    """The line under `grapevine tree`, e.g. "3 tasks, 3 executions, 0 duplicates, 240 tokens
    (200 prompt, 40 completion), cost $0.000014, 4 model calls (1 repeated after a takeover,
    60 tokens)"."""
    totals = tree.get("totals")
    if not isinstance(totals, dict):
        totals = {}
    prompt, completion = totals.get("prompt_tokens", 0), totals.get("completion_tokens", 0)
    tokens = prompt + completion if isinstance(prompt, int) and isinstance(completion, int) else "?"
    cost = totals.get("cost_microdollars")
    dollars = f"${cost / 1e6:.6f}" if isinstance(cost, int) else "?"
    line = (
        f"{number(totals.get('tasks'))} tasks, {number(totals.get('executions'))} executions, "
        f"{number(totals.get('duplicates'))} duplicates, {tokens} tokens ({number(prompt)} "
        f"prompt, {number(completion)} completion), cost {dollars}, "
        f"{number(totals.get('model_calls'))} model calls "
        f"({number(totals.get('model_calls_repeated'))} repeated after a takeover, "
        f"{number(totals.get('repeated_tokens'))} tokens)"
    )
    if tree.get("truncated"):
        line += "; deeper tasks left out"
    return line


def table(header: list[str], rows: Sequence[list[str]]) -> str:
    """Left-aligned columns two spaces apart; `header` may be empty."""
    lines = ([header] if header else []) + list(rows)
    if not lines:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def clock(value: object) -> str:
    """Local time of day ("14:03:22") of a Unix timestamp or ISO 8601 string; "--:--:--" if
    it is neither."""
    from datetime import datetime  # few commands show a time: `grapevine` starts faster

    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value).strftime("%H:%M:%S")
        if isinstance(value, str):
            return datetime.fromisoformat(value).astimezone().strftime("%H:%M:%S")
    except (ValueError, OverflowError, OSError):
        pass
    return "--:--:--"


def short(node_id: object) -> str:
    """The 10-character short form of a node id ("?" when absent)."""
    return str(node_id)[:10] if node_id else "?"


def number(value: object) -> str:
    """A counter or gauge for a table: floats with two decimals, None as "-"."""
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def duration(seconds: object) -> str:
    """A compact duration: "42.0s", "3m12s", "5h07m", "2d3h"."""
    if not isinstance(seconds, int | float):
        return number(seconds)
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"
