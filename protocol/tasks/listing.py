"""Network listings: pages of the tasks each peer arbitrates, asked of peers and answered.

A network listing (`GET /v1/tasks?scope=network`) is gathered by one peer from every live
member. Each answers a `TaskList` with a `TaskPage` of the tasks it holds and arbitrates (it is
the first of their replica set in its own view), so while views agree every task is reported by
exactly one peer; the gatherer merges the pages (`merge_pages`) and de-duplicates by id all the
same, since views differ under churn. A task whose arbiter does not hold it yet (a replica that
has just joined) is missing from the listing until the shard reaches it.

Invariants:
- Pure and deterministic: time is an argument, request ids come from the node's injected rng,
  and every page is in task id order.
- A page holds summaries of tasks with a record, ids strictly above the cursor, sorted by id,
  at most the limit asked (capped at `MAX_PAGE` whatever was asked); `more` says whether the
  answering peer arbitrates more that match.
- What a sender can make us do is bounded: pages are answered only to a known member at its
  known address (the sender of an envelope is not authenticated, so the answer goes where that
  member signed it is, never where the envelope says), at most `ANSWER_BURST` at once and
  `ANSWER_RATE` a second per member (a token bucket), and refused ones are dropped and counted.
- A page is accepted only as the answer to a request this peer sent to that very peer, within
  `REQUEST_TTL`, once, with at most the limit asked, in order, above the cursor and matching
  the filters asked; anything else is dropped, noted (`Dropped`) and counted by reason. A page
  changes no task state: it is kept for the host to collect (`page`) until it expires.
- Requests awaiting an answer and pages awaiting collection are each at most `MAX_PENDING`;
  beyond that the oldest are forgotten (their answers then count as unsolicited).
- `merge_pages` keeps the smallest `limit` ids over all pages. A task an answering peer
  arbitrates, above the cursor and at most the next cursor, is in the merged page: a peer that
  left it out filled its page with smaller ids, all of them in the merged page before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from protocol.codec import encode_message
from protocol.effects import Dropped
from protocol.member_table import Rng
from protocol.tasks.core import TaskCore
from protocol.tasks.messages import MAX_PAGE, TaskList, TaskPage, TaskSummary
from protocol.tasks.state import TaskState
from protocol.wire import MAX_UINT

REQUEST_TTL = 10.0
"""Seconds a request waits for its page, and a page for the host to collect it. A gatherer
gives up on a peer after seconds (`peer.runtime.task_listing`); later answers are of no use."""
MAX_PENDING = 4096
"""Requests awaiting an answer (and pages awaiting collection) kept at most: one listing asks
every live member once per page, so this covers a few listings at once of a large network."""
ANSWER_RATE = 20.0
"""Pages answered per second to one member, sustained. Each answer sorts the ids held here;
twenty a second lets a client page through 10,000 tasks a second at `MAX_PAGE` a page."""
ANSWER_BURST = 40
"""Pages answered to one member in a burst (the token bucket's size)."""
FINAL_STATES = frozenset({"done", "failed", "cancelled"})

Entry = TypeVar("Entry")


@dataclass(frozen=True, slots=True)
class PageQuery:
    """What a page lists: ids strictly above `after` (b"": from the first), at most `limit`
    (capped at `MAX_PAGE`), in `state`, of `role` and claimed by `owner` unless those are
    empty."""

    after: bytes = b""
    limit: int = MAX_PAGE
    state: str = ""
    role: str = ""
    owner: bytes = b""

    @property
    def capped(self) -> int:
        """The limit a page honours: 1 to `MAX_PAGE`."""
        return min(max(self.limit, 1), MAX_PAGE)


@dataclass(frozen=True, slots=True)
class Asked:
    """A request sent and not answered yet: to whom, what for, when."""

    peer: bytes
    query: PageQuery
    at: float


def summary_of(st: TaskState) -> TaskSummary:
    """The listing row of a task held with its record."""
    rec = st.record
    assert rec is not None, "only tasks with a record are listed"
    claim, accepted = st.claim, st.accepted
    return TaskSummary(
        st.task_id,
        rec.role,
        st.state,
        accepted.outcome if accepted is not None else "",
        rec.origin,
        claim.owner if claim is not None else b"",
        claim.epoch if claim is not None else 0,
        rec.created,
    )


def page_of(
    held: Mapping[bytes, TaskState], arbitrates: Callable[[bytes], bool], query: PageQuery
) -> tuple[tuple[TaskSummary, ...], bool]:
    """The page of `query` over the tasks `held` here that this peer `arbitrates`.

    Returns:
        The summaries in id order, and whether more tasks match past them.
    """
    limit = query.capped
    found: list[TaskSummary] = []
    for task_id in sorted(t for t in held if t > query.after):
        st = held[task_id]
        rec = st.record
        if rec is None or (query.role and rec.role != query.role):
            continue
        if query.owner and (st.claim is None or st.claim.owner != query.owner):
            continue
        if (query.state and st.state != query.state) or not arbitrates(task_id):
            continue  # the arbiter last: it may hash the live members
        if len(found) == limit:
            return tuple(found), True
        found.append(summary_of(st))
    return tuple(found), False


def page_fault(page: TaskPage, query: PageQuery) -> str | None:
    """Why `page` cannot be the answer to `query`, or None if it can."""
    if len(page.tasks) > query.capped:
        return "more rows than asked for"
    if page.more and not page.tasks:
        return "more to come after an empty page"
    previous = query.after
    for s in page.tasks:
        if s.task_id <= previous:
            return "rows out of order or not past the cursor"
        if (query.state and s.state != query.state) or (query.role and s.role != query.role):
            return "a row outside the filters asked"
        if query.owner and s.owner != query.owner:
            return "a row outside the filters asked"
        previous = s.task_id
    return None


def merge_pages(
    pages: Iterable[tuple[Sequence[TaskSummary], bool]], limit: int
) -> tuple[list[TaskSummary], bytes | None]:
    """Merge the pages of one query from several peers (each with its `more` flag).

    Duplicates (two peers that each hold themselves the arbiter) keep the most advanced row:
    final before open, then the higher epoch, then a fixed order of the other fields, so the
    result does not depend on the order the pages came in.

    Returns:
        The smallest `limit` ids over all pages, in id order, and the cursor of the next page
        (the largest id returned) or None when no peer has more.
    """
    best: dict[bytes, TaskSummary] = {}
    more = False
    for rows, page_more in pages:
        more = more or page_more
        for row in rows:
            known = best.get(row.task_id)
            if known is None or _advance(row) > _advance(known):
                best[row.task_id] = row
    ids = sorted(best)
    chosen = [best[t] for t in ids[:limit]]
    if chosen and (more or len(ids) > limit):
        return chosen, chosen[-1].task_id
    return chosen, None


def _advance(
    row: TaskSummary,
) -> tuple[bool, int, str, str, bytes, bytes, float, str]:
    return (
        row.state in FINAL_STATES,
        row.epoch,
        row.state,
        row.outcome,
        row.owner,
        row.origin,
        row.created,
        row.role,
    )


class Listing:
    """This peer's side of network listings: pages asked of peers, and pages answered.

    Args:
        core: the task plane whose held tasks are listed, and whose port, view and counters
            the listing shares.
    """

    def __init__(self, core: TaskCore) -> None:
        self.core = core
        self.pending: dict[int, Asked] = {}
        """Requests sent and not answered, oldest first."""
        self.answers: dict[int, tuple[float, TaskPage]] = {}
        """Pages received and not expired, by request, with when they were asked, oldest
        first."""
        self.buckets: dict[bytes, tuple[float, float]] = {}
        """Per member asking us: (tokens left, when counted)."""

    def own_page(self, query: PageQuery) -> tuple[tuple[TaskSummary, ...], bool]:
        """The page this peer answers `query` with (see `page_of`)."""
        core = self.core
        return page_of(core.tasks, lambda t: core.replica_set(t)[0] == core.node_id, query)

    def page(self, request: int) -> TaskPage | None:
        """The page received for `request`, if it came and has not expired."""
        found = self.answers.get(request)
        return found[1] if found is not None else None

    def ask(
        self, now: float, peers: Iterable[bytes], query: PageQuery, rng: Rng
    ) -> dict[bytes, int]:
        """Send `query` to each of `peers` known here (not this peer).

        Returns:
            The request id sent to each peer asked; its page is `page(id)` once it came.
        """
        self._expire(now)
        core = self.core
        asked: dict[bytes, int] = {}
        for peer in peers:
            addr = core.view.addr_of(peer)
            if addr is None or peer == core.node_id or peer in asked:
                continue
            # Random ids: a member forging another's envelope cannot guess which page is
            # awaited, so it cannot slip rows into a listing.
            request = rng.randrange(1, MAX_UINT)
            self.pending[request] = Asked(peer, query, now)
            asked[peer] = request
            msg = TaskList(request, query.after, query.capped, query.state, query.role, query.owner)
            core.port.send(addr, [encode_message(msg)], piggyback=False)
        _trim(self.pending)
        return asked

    def on_list(self, now: float, src: str, sender: bytes, msg: TaskList) -> None:
        """Answer a peer's request with our page, if it may have one now."""
        if self.core.view.addr_of(sender) != src:
            self._drop(src, "task list from a sender not known here")
            return
        if not self._take_token(now, sender):
            self._drop(src, "task list rate-limited")
            return
        query = PageQuery(msg.after, msg.limit, msg.state, msg.role, msg.owner)
        rows, more = self.own_page(query)
        page = TaskPage(msg.request, rows, more)
        self.core.port.send(src, [encode_message(page)], piggyback=False)

    def on_page(self, now: float, src: str, sender: bytes, msg: TaskPage) -> None:
        """Keep a page that answers one of our requests; drop anything else."""
        asked = self.pending.get(msg.request)
        if asked is None or asked.peer != sender or now - asked.at > REQUEST_TTL:
            self._drop(src, "task page not asked for")
            return
        fault = page_fault(msg, asked.query)
        if fault is not None:
            self._drop(src, f"task page with {fault}")
            return
        del self.pending[msg.request]
        self.answers[msg.request] = (asked.at, msg)
        _trim(self.answers)

    def _take_token(self, now: float, sender: bytes) -> bool:
        tokens, at = self.buckets.get(sender, (float(ANSWER_BURST), now))
        tokens = min(float(ANSWER_BURST), tokens + (now - at) * ANSWER_RATE)
        if tokens < 1.0:
            self.buckets[sender] = (tokens, now)
            return False
        self.buckets[sender] = (tokens - 1.0, now)
        if len(self.buckets) > MAX_PENDING:
            # Forget the members whose bucket has refilled: they start full anyway.
            full = ANSWER_BURST / ANSWER_RATE
            self.buckets = {p: b for p, b in self.buckets.items() if now - b[1] < full}
        return True

    def _expire(self, now: float) -> None:
        for request in [r for r, a in self.pending.items() if now - a.at > REQUEST_TTL]:
            del self.pending[request]
        for request in [r for r, (at, _) in self.answers.items() if now - at > REQUEST_TTL]:
            del self.answers[request]

    def _drop(self, src: str, reason: str) -> None:
        self.core.counters[reason] += 1
        self.core.port.note(Dropped(src, reason))


def _trim(table: dict[int, Entry]) -> None:
    """Forget the oldest entries beyond `MAX_PENDING`."""
    while len(table) > MAX_PENDING:
        del table[next(iter(table))]
