"""What `grapevine demo` shows: the live progress view and the final report.

Invariants:
- This module only renders; it never talks to a peer. `peer.demo.follow` gathers `Snapshot`s and
  `peer.demo.report` the `Report` from the peers' APIs; `peer.demo.command` hands them here.
- The live view goes to the console it is given (stdout in the default mode). On a terminal it
  redraws about four times a second; elsewhere (CI, a pipe) rich prints it once, when it stops,
  so a log holds one readable table instead of control sequences.
- The report's JSON form (`Report.as_json`) has exactly the keys `answer`, `tree` and `audit`;
  tree nodes are `{id, role, state, peer, node, agent, tokens, children}` and the audit is
  `{tasks, executions, duplicates, signatures_verified, tokens}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.tree import Tree

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class PeerCounts:
    """The demo's tasks one peer has claimed, by state."""

    name: str
    queued: int
    """Claimed by this peer but not started yet."""
    running: int
    done: int
    failed: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The job's task tree as the peers report it at one moment (merged across peers)."""

    peers: tuple[PeerCounts, ...]
    unclaimed: int
    """Tasks no peer has claimed yet."""
    total: int
    done: int
    running: int
    failed: int


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the demo prints once the job is finished."""

    answer: str
    tree: Json
    """The root node in the JSON form described in the module docstring."""
    audit: Json
    """`{tasks, executions, duplicates, signatures_verified, tokens}`."""
    prompt_tokens: int
    completion_tokens: int
    cost_microdollars: int
    model: str
    seconds: float
    """Wall time from submitting the job to its accepted result."""

    def as_json(self) -> Json:
        """The one object `grapevine demo --json` prints."""
        return {"answer": self.answer, "tree": self.tree, "audit": self.audit}


def audit_line(audit: Json) -> str:
    """One line with the audit figures, e.g. "audit: 9 tasks, 9 executions, ..."."""
    return (
        f"audit: {audit['tasks']} tasks, {audit['executions']} executions, "
        f"{audit['duplicates']} duplicates, {audit['signatures_verified']} signatures verified, "
        f"{audit['tokens']} tokens"
    )


class LiveView:
    """Progress bars per peer (queued, running, done) and one for the whole job.

    Use as a context manager; call `update` with each new snapshot.
    """

    def __init__(self, console: Console, peer_names: list[str]) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description:<6}"),
            BarColumn(bar_width=30),
            TextColumn(
                "{task.fields[queued]:>2} queued  {task.fields[running]:>2} running  "
                "{task.fields[done]:>2} done{task.fields[failed]}"
            ),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=4,
        )
        self._all = self._add("job")
        self._rows: dict[str, TaskID] = {name: self._add(name) for name in peer_names}

    def _add(self, description: str) -> TaskID:
        return self._progress.add_task(
            description, total=None, queued=0, running=0, done=0, failed=""
        )

    def __enter__(self) -> LiveView:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, snapshot: Snapshot) -> None:
        """Show `snapshot`: per-peer bars count that peer's claimed tasks."""
        queued = snapshot.unclaimed + sum(p.queued for p in snapshot.peers)
        self._progress.update(
            self._all,
            total=max(snapshot.total, 1),
            completed=snapshot.done + snapshot.failed,
            queued=queued,
            running=snapshot.running,
            done=snapshot.done,
            failed=_failed(snapshot.failed),
        )
        for counts in snapshot.peers:
            row = self._rows.get(counts.name)
            if row is None:
                continue
            claimed = counts.queued + counts.running + counts.done + counts.failed
            self._progress.update(
                row,
                total=max(claimed, 1),
                completed=counts.done + counts.failed,
                queued=counts.queued,
                running=counts.running,
                done=counts.done,
                failed=_failed(counts.failed),
            )


def _failed(count: int) -> str:
    return f"  [red]{count} failed[/]" if count else ""


def render_report(console: Console, report: Report) -> None:
    """Print the answer, the task tree, the token totals and the audit line."""
    console.print()
    console.print(
        Panel(Markdown(report.answer), title="answer", title_align="left", border_style="green")
    )
    console.print("[bold]task tree[/] (role, task, peer, agent, tokens)")
    console.print(_tree(report.tree))
    cost = f", ${report.cost_microdollars / 1e6:.4f}" if report.cost_microdollars else ""
    console.print(
        f"tokens: {report.prompt_tokens} prompt + {report.completion_tokens} completion = "
        f"{report.prompt_tokens + report.completion_tokens}{cost} (model {report.model}); "
        f"job finished in {report.seconds:.1f} s",
        soft_wrap=True,
    )
    console.print(audit_line(report.audit), markup=False, highlight=False, soft_wrap=True)


def _tree(node: Json, parent: Tree | None = None) -> Tree:
    branch = Tree(_label(node), guide_style="dim") if parent is None else parent.add(_label(node))
    for child in node.get("children", []):
        _tree(child, branch)
    return branch


def _label(node: Json) -> str:
    state = node.get("state", "")
    mark = "" if state == "done" else f" [red]{state}[/]"
    return (
        f"[bold]{node['role']}[/] [dim]{str(node['id'])[:8]}[/] "
        f"[cyan]{node['peer']}[/] {node['agent'] or '?'} {node['tokens']} tokens{mark}"
    )
