"""Network listings (protocol/tasks/listing.py): pages of the tasks each peer arbitrates, asked
and answered between real Nodes on the in-memory link, and the pure merge of pages.

Each test names the rule it checks: every task is reported by its arbiter alone; pages are in id
order past the cursor and capped; merged pages cover every task once; hostile or unsolicited
answers are dropped and counted; answers are rate-limited per member.
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from protocol.codec import decode_message, encode_message
from protocol.effects import Dropped
from protocol.errors import RemoteProtocolError
from protocol.tasks.listing import (
    ANSWER_BURST,
    ANSWER_RATE,
    REQUEST_TTL,
    PageQuery,
    merge_pages,
)
from protocol.tasks.messages import MAX_PAGE, TaskList, TaskPage, TaskSummary, task_id_of
from protocol.tasks.state import hrw_score
from protocol.wire import Kind
from tests.protocol.fakes import Link, addr, envelope, mesh, node_id, of_type, opened

PEERS = 6


def network(tasks: int, peers: int = PEERS) -> tuple[Link, list[bytes]]:
    """`peers` joined peers holding `tasks` tasks submitted round-robin at each of them."""
    link = mesh(peers)
    ids = []
    for n in range(tasks):
        at = n % peers
        fx, task_id = link.node(at).submit(link.now, "writer", b"%d" % n, nonce=b"%d" % n)
        link.run(at, fx)
        ids.append(task_id)
    link.advance(link.now + 2.0)
    return link, ids


def gather(link: Link, at: int, query: PageQuery) -> tuple[list[TaskSummary], bytes | None]:
    """One merged page gathered by peer `at` from every peer, as the host does it."""
    node = link.node(at)
    others = [node_id(i) for i in range(PEERS) if i != at]
    fx, asked = node.ask_task_pages(link.now, others, query)
    link.run(at, fx)
    pages = [node.own_task_page(query)]
    for request in asked.values():
        page = node.task_page(request)
        assert page is not None, "every peer answers at once on the link"
        pages.append((page.tasks, page.more))
    return merge_pages(pages, query.capped)


def summary(n: int, state: str = "pending", epoch: int = 0) -> TaskSummary:
    return TaskSummary(bytes([n]) * 32, "writer", state, "", node_id(1), b"", epoch, 1.0)


def drops(link: Link, at: int) -> list[str]:
    return [d.reason for d in link.notes_of(at, Dropped)]


# --- pages ----------------------------------------------------------------------------------


def test_each_task_is_reported_by_its_arbiter_alone() -> None:
    link, ids = network(40)
    reported: list[bytes] = []
    for i in range(PEERS):
        node = link.node(i)
        rows, more = node.own_task_page(PageQuery())
        assert not more
        assert [r.task_id for r in rows] == sorted(r.task_id for r in rows)
        for row in rows:
            assert node.replica_set(row.task_id)[0] == node_id(i)
        reported += [r.task_id for r in rows]
    assert sorted(reported) == sorted(ids), "every task once, by one peer"
    held = sum(len(list(link.node(i).held_tasks())) for i in range(PEERS))
    assert held > len(ids), "replicas hold copies, yet only the arbiter reports them"


def test_a_network_listing_pages_through_every_task_once_from_any_peer() -> None:
    link, ids = network(30)
    for at in (0, 3):
        seen: list[bytes] = []
        cursor = b""
        pages = 0
        while True:
            rows, cursor_next = gather(link, at, PageQuery(after=cursor, limit=7))
            assert len(rows) <= 7
            seen += [r.task_id for r in rows]
            pages += 1
            if cursor_next is None:
                break
            assert cursor_next == rows[-1].task_id
            cursor = cursor_next
        assert seen == sorted(ids), "in id order, each task exactly once, across pages"
        assert pages == 5


def test_summaries_carry_the_task_as_held() -> None:
    link, ids = network(6)
    rows, _ = gather(link, 0, PageQuery())
    assert [r.task_id for r in rows] == sorted(ids)
    for row in rows:
        holder = next(i for i in range(PEERS) if link.node(i).task(row.task_id) is not None)
        st = link.node(holder).task(row.task_id)
        assert st is not None and st.record is not None
        assert (row.role, row.state, row.outcome) == ("writer", "pending", "")
        assert (row.origin, row.owner, row.epoch) == (st.record.origin, b"", 0)
        assert row.created == st.record.created


def test_filters_and_cursor_select_the_rows() -> None:
    link, ids = network(12)
    rows, _ = gather(link, 1, PageQuery(after=sorted(ids)[5]))
    assert [r.task_id for r in rows] == sorted(ids)[6:]
    assert gather(link, 1, PageQuery(state="done"))[0] == []
    assert gather(link, 1, PageQuery(role="other"))[0] == []
    assert len(gather(link, 1, PageQuery(state="pending", role="writer"))[0]) == 12


def test_the_owner_filter_selects_the_tasks_a_member_claimed() -> None:
    link = mesh(PEERS)
    for i in (2, 4):  # the only members serving the role: a claimed task is one of theirs
        link.run(i, link.node(i).serve(link.now, ("writer",), 50))
    for n in range(30):
        fx, _ = link.node(n % PEERS).submit(link.now, "writer", b"%d" % n, nonce=b"%d" % n)
        link.run(n % PEERS, fx)
    link.advance(link.now + 10.0)
    everything, _ = gather(link, 1, PageQuery())
    by_owner = {
        owner: [r.task_id for r in everything if r.owner == owner]
        for owner in (node_id(2), node_id(4))
    }
    claimed = [r for r in everything if r.owner]
    assert len(everything) == 30 and all(by_owner.values())
    assert sum(len(ids) for ids in by_owner.values()) == len(claimed)  # unclaimed: in neither
    for owner, ids in by_owner.items():
        rows, _ = gather(link, 1, PageQuery(owner=owner))
        assert [r.task_id for r in rows] == sorted(ids)
        assert {r.owner for r in rows} == {owner}
    assert gather(link, 1, PageQuery(owner=node_id(3)))[0] == []  # serves nothing, owns none
    # The filter applies before the limit: a small page holds only the owner's tasks.
    rows, cursor = gather(link, 1, PageQuery(limit=3, owner=node_id(4)))
    assert [r.task_id for r in rows] == sorted(by_owner[node_id(4)])[:3] and cursor is not None


def test_the_limit_is_capped_whatever_a_peer_asks() -> None:
    link = mesh(2)
    submitted = 0
    n = 0
    while submitted < MAX_PAGE + 5:  # tasks peer 0 arbitrates (ranks first of the two)
        n += 1
        data = b"%d" % n
        digest = hashlib.sha256(data).digest()
        task_id = task_id_of(node_id(0), "", data, "writer", digest, 0, b"", 0.0)
        if hrw_score(task_id, node_id(0)) > hrw_score(task_id, node_id(1)):
            fx, _ = link.node(0).submit(link.now, "writer", data, nonce=data)
            link.run(0, fx)
            submitted += 1
    fx = link.node(0).handle(link.now, addr(1), envelope(1, TaskList(5, b"", 10**9, "", "")))
    [send] = fx.sends
    [page] = opened(send.data)
    assert send.addr == addr(1) and isinstance(page, TaskPage) and page.request == 5
    assert len(page.tasks) == MAX_PAGE and page.more
    assert PageQuery(limit=10**9).capped == MAX_PAGE and PageQuery(limit=0).capped == 1


def test_ask_sends_to_known_peers_only_never_to_itself() -> None:
    link, _ = network(2)
    node = link.node(0)
    stranger = b"\x07" * 32
    fx, asked = node.ask_task_pages(link.now, [node_id(0), stranger, node_id(2)], PageQuery())
    assert set(asked) == {node_id(2)}
    # Only the asks count: a replica sync may fall due in the same call.
    asks = [(s.addr, m) for s in fx.sends for m in opened(s.data) if isinstance(m, TaskList)]
    [(to, msg)] = asks
    assert to == addr(2) and msg.request == asked[node_id(2)]


# --- merging --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pages", "limit", "ids", "cursor"),
    [
        # nothing anywhere
        ([], 5, [], None),
        ([((), False)], 5, [], None),
        # all fits, no one has more
        ([((summary(1), summary(4)), False), ((summary(2),), False)], 5, [1, 2, 4], None),
        # more rows than the limit: the smallest ids, cursor at the last returned
        ([((summary(1), summary(4)), False), ((summary(2), summary(3)), False)], 3, [1, 2, 3], 3),
        # a peer has more past its page: a next page even when the merge fits
        ([((summary(1),), True), ((summary(2),), False)], 5, [1, 2], 2),
        # a peer that filled its page with smaller ids hides no task below the cursor
        ([((summary(1), summary(2)), True), ((summary(3), summary(9)), False)], 2, [1, 2], 2),
        # two peers reporting the same task (views differ): once
        ([((summary(1),), False), ((summary(1), summary(2)), False)], 5, [1, 2], None),
    ],
)
def test_merge_pages(
    pages: list[tuple[tuple[TaskSummary, ...], bool]],
    limit: int,
    ids: list[int],
    cursor: int | None,
) -> None:
    rows, next_cursor = merge_pages(pages, limit)
    assert [r.task_id[0] for r in rows] == ids
    assert next_cursor == (None if cursor is None else bytes([cursor]) * 32)


def test_merge_keeps_the_most_advanced_row_whatever_the_order() -> None:
    old, new = summary(1, "running", epoch=1), summary(1, "done", epoch=1)
    later = summary(1, "running", epoch=2)
    for pages in ([((old,), False), ((new,), False)], [((new,), False), ((old,), False)]):
        assert merge_pages(pages, 5)[0] == [new]
    assert merge_pages([((later,), False), ((old,), False)], 5)[0] == [later]


# --- hostile and unsolicited answers --------------------------------------------------------


SMALL = PageQuery(limit=3)


def asked_of(link: Link, peer: int, query: PageQuery = SMALL) -> int:
    """Peer 0 asks `peer` for a page without delivering it; return the request id."""
    fx, asked = link.node(0).ask_task_pages(link.now, [node_id(peer)], query)
    link.effects.append((addr(0), fx))  # sent nowhere: the test answers in its place
    return asked[node_id(peer)]


def answer(link: Link, peer: int, page: TaskPage) -> None:
    link.run(0, link.node(0).handle(link.now, addr(peer), envelope(peer, page)))


@pytest.mark.parametrize(
    ("rows", "more", "reason"),
    [
        ((summary(1), summary(2), summary(3), summary(4)), False, "more rows than asked for"),
        ((summary(2), summary(1)), False, "rows out of order or not past the cursor"),
        ((summary(1), summary(1)), False, "rows out of order or not past the cursor"),
        ((), True, "more to come after an empty page"),
    ],
)
def test_a_page_that_cannot_answer_the_request_is_dropped_and_counted(
    rows: tuple[TaskSummary, ...], more: bool, reason: str
) -> None:
    link = mesh(3)
    request = asked_of(link, 1)
    answer(link, 1, TaskPage(request, rows, more))
    assert link.node(0).task_page(request) is None
    assert f"task page with {reason}" in drops(link, 0)
    assert link.node(0).task_counters()[f"task page with {reason}"] == 1


def test_a_page_outside_the_filters_or_before_the_cursor_is_dropped() -> None:
    link = mesh(3)
    request = asked_of(link, 1, PageQuery(after=summary(5).task_id, limit=3))
    answer(link, 1, TaskPage(request, (summary(4),), False))
    assert "task page with rows out of order or not past the cursor" in drops(link, 0)
    request = asked_of(link, 1, PageQuery(state="done", limit=3))
    answer(link, 1, TaskPage(request, (summary(4, "pending"),), False))
    assert "task page with a row outside the filters asked" in drops(link, 0)
    assert link.node(0).task_page(request) is None
    request = asked_of(link, 1, PageQuery(owner=node_id(2), limit=3))
    answer(link, 1, TaskPage(request, (summary(4),), False))  # unclaimed: not node 2's
    assert drops(link, 0).count("task page with a row outside the filters asked") == 2
    assert link.node(0).task_page(request) is None


def test_unsolicited_duplicate_misaddressed_and_late_pages_are_dropped_and_counted() -> None:
    link = mesh(3)
    before = link.node(0).task_counters().get("task page not asked for", 0)
    answer(link, 1, TaskPage(12345, (summary(1),), False))  # no such request
    request = asked_of(link, 1)
    answer(link, 2, TaskPage(request, (summary(1),), False))  # asked of 1, not of 2
    assert link.node(0).task_page(request) is None
    answer(link, 1, TaskPage(request, (summary(1),), False))  # the real answer
    page = link.node(0).task_page(request)
    assert page is not None and page.tasks == (summary(1),)
    answer(link, 1, TaskPage(request, (summary(2),), False))  # a second answer
    assert link.node(0).task_page(request) == page, "the first answer stands"
    late = asked_of(link, 1)
    link.now += REQUEST_TTL + 1.0
    answer(link, 1, TaskPage(late, (summary(1),), False))
    assert link.node(0).task_page(late) is None
    counted = link.node(0).task_counters()["task page not asked for"] - before
    assert counted == 4
    assert drops(link, 0).count("task page not asked for") == 4


def test_a_page_asked_for_expires_once_its_time_is_up() -> None:
    link = mesh(3)
    request = asked_of(link, 1)
    answer(link, 1, TaskPage(request, (), False))
    assert link.node(0).task_page(request) == TaskPage(request, (), False)
    link.now += REQUEST_TTL + 1.0
    asked_of(link, 2)  # asking again forgets what expired
    assert link.node(0).task_page(request) is None


def test_a_list_from_a_sender_not_known_here_gets_no_answer() -> None:
    link = mesh(3)
    stranger = envelope(9, TaskList(1, b"", 10, "", ""))
    fx = link.node(0).handle(link.now, addr(9), stranger)
    assert not fx.sends
    assert "task list from a sender not known here" in [
        d.reason for d in of_type(fx.notes, Dropped)
    ]


def test_answers_to_one_member_are_rate_limited() -> None:
    link, _ = network(3, peers=3)
    node = link.node(0)

    def ask(peer: int) -> bool:
        fx = node.handle(link.now, addr(peer), envelope(peer, TaskList(1, b"", 5, "", "")))
        return any(isinstance(m, TaskPage) for s in fx.sends for m in opened(s.data))

    answered = [ask(1) for _ in range(ANSWER_BURST + 5)]
    assert answered == [True] * ANSWER_BURST + [False] * 5
    assert node.task_counters()["task list rate-limited"] == 5
    assert ask(2), "another member has its own budget"
    link.now += 1.0
    refill = [ask(1) for _ in range(int(ANSWER_RATE) + 1)]
    assert refill == [True] * int(ANSWER_RATE) + [False]


# --- codec bounds ---------------------------------------------------------------------------


def test_the_decoder_refuses_oversized_pages_and_bad_cursors() -> None:
    rows = tuple(
        TaskSummary(n.to_bytes(32, "big"), "r", "done", "ok", node_id(1), b"", 0, 0.0)
        for n in range(MAX_PAGE + 1)
    )
    with pytest.raises(RemoteProtocolError):
        decode_message(encode_message(TaskPage(1, rows, False)))
    assert decode_message(encode_message(TaskPage(1, rows[:MAX_PAGE], False))) is not None
    with pytest.raises(RemoteProtocolError):
        decode_message(encode_message(TaskList(1, b"short", 5, "", "")))
    raw = encode_message(TaskPage(1, (summary(1),), False))
    assert raw[1] == Kind.TASK_PAGE
    for bad_owner in (b"x", "x"):
        row = [summary(1).task_id, "r", "done", "", node_id(1), bad_owner, 0, 0.0]
        with pytest.raises(RemoteProtocolError):
            decode_message(msgpack.packb([Kind.TASK_PAGE, 1, [row], False]))
