"""One line of words for each event of a task stream (`GET /v1/tasks/{id}/watch`), shared by
`grapevine watch` and the progress line of `grapevine submit`.

Invariants:
- A pure function of the event object (docs/http-api.md, "Task events"); a field a peer did not
  send is shown as "?" and an event type this version does not know is shown by its name, so a
  newer peer never breaks an older CLI.
"""

from __future__ import annotations

from peer.cli.render import short
from peer.client import JsonObject


def event_text(event: JsonObject) -> str:
    """What the event says, e.g. "claimed by k3j4h5l2mn (epoch 1)" or "model call to gpt-4o:
    812 tokens, calls delegate"."""
    kind = str(event.get("type", "?")).removeprefix("task-")
    who = short(event.get("owner") or event.get("by"))
    epoch = event.get("epoch", "?")
    match kind:
        case "claimed":
            return f"claimed by {who} (epoch {epoch})"
        case "started":
            return f"running on {who} (epoch {epoch})"
        case "ended":
            return f"execution on {who} ended: {event.get('outcome', '?')}"
        case "result":
            return f"result accepted: {event.get('outcome', '?')} from {who}"
        case "cancelled":
            reason = event.get("reason")
            verb = "failed, given up by" if event.get("outcome") == "failed" else "cancelled by"
            return f"{verb} {who}" + (f": {reason}" if reason else "")
        case "child":
            return f"child task of {str(event.get('parent', '?'))[:10]}"
        case "progress":
            return _step_text(event)
        case _:
            return kind


def _step_text(event: JsonObject) -> str:
    detail = event.get("detail")
    fields = detail if isinstance(detail, dict) else {}
    step = event.get("step", "?")
    if step == "model-call":
        calls = fields.get("tool_calls")
        text = f"model call to {fields.get('model', '?')}: {fields.get('tokens', '?')} tokens"
        return text + (f", calls {calls}" if calls else ", answers")
    if step == "tool-call":
        return f"tool {fields.get('tool', '?')} returned {fields.get('chars', '?')} characters"
    if step == "delegation":
        child = str(fields.get("child", "?"))[:10]
        reused = " (reused from an earlier run)" if fields.get("reused") else ""
        return f"delegated to {fields.get('role', '?')}: task {child}{reused}"
    if step == "note":
        return str(fields.get("message", ""))
    if step == "step":
        how = "replayed from an earlier run" if fields.get("replayed") else "done"
        return f"step {fields.get('name', '?')}: {how}"
    return str(step)
