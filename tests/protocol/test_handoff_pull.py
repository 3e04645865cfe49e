"""The handoff pull (decisions 31 and 91): who sends its summary to every member, and who not.

A peer that joins a network holding tasks pulls its shards once, at its first anti-entropy
summary (`test_tasks.py`, `test_a_peer_that_joins_pulls_the_final_tasks_it_is_now_a_replica_of`).
A peer that was a member when the network's first tasks were made got them directly: peers
sent it task objects before any summary came, so it skips the pull. A restarted peer pulls
whatever came first.
"""

from __future__ import annotations

from protocol.tasks.messages import TaskShards
from tests.protocol.fakes import addr, envelope
from tests.protocol.test_tasks import FAST_SYNC, cluster, replicas, starts, submit

SKIPPED = "handoff pulls skipped: a member from the first tasks"
SUMMARY = TaskShards(0, (), (), b"")


def test_members_from_before_the_first_task_skip_the_pull_and_still_hold_their_tasks() -> None:
    link = cluster(4, config=FAST_SYNC)  # joined with no task anywhere: no summary yet
    ids = [submit(link, at=k % 4, key=f"first{k}") for k in range(24)]
    for task_id in ids:
        [(owner, epoch)] = starts(link, task_id)
        link.run(owner, link.node(owner).complete(link.now, task_id, epoch, "ok", b"r"))
    link.advance(link.now + 60.0)  # push-pull rounds: every peer's first summaries come
    for i in range(4):
        tasks = link.node(i).tasks
        assert tasks.counters["handoff pulls"] == 0 and tasks.counters[SKIPPED] == 1
        mine = [t for t in ids if i in replicas(t, list(range(4)))]
        assert mine and all(tasks.tasks[t].state == "done" for t in mine)


def test_a_peer_that_only_submitted_before_its_first_summary_still_pulls() -> None:
    # Its own objects say nothing of what the network made before it joined.
    link = cluster(3, config=FAST_SYNC)
    node = link.node(0)
    link.run(0, node.submit(link.now, "writer", b"mine", idempotency_key="own")[0])
    node.handle(link.now, addr(1), envelope(1, SUMMARY))
    assert node.tasks.pull_at is not None and node.tasks.counters[SKIPPED] == 0


def test_a_peer_that_received_task_objects_before_its_first_summary_skips_the_pull() -> None:
    link = cluster(3, config=FAST_SYNC)
    submit(link, at=1, key="theirs")
    node = link.node(0)
    assert node.tasks.took_part and not node.tasks.pulled
    node.handle(link.now, addr(1), envelope(1, SUMMARY))
    assert node.tasks.pulled and node.tasks.pull_at is None
    assert node.tasks.counters[SKIPPED] == 1


def test_a_restarted_peer_pulls_even_when_task_objects_came_first() -> None:
    link = cluster(3, config=FAST_SYNC)
    submit(link, at=1, key="theirs")
    node = link.node(0)
    node.tasks.hold()  # what restoring a stored object does, before any summary
    node.handle(link.now, addr(1), envelope(1, SUMMARY))
    assert node.tasks.pull_at is not None and not node.tasks.pulled
    assert node.tasks.counters[SKIPPED] == 0
