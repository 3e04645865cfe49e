"""Reads at a peer outside a task's home (`TaskRead`, decision 69): the answer carries what the
reader lacks, so a tree or a wait polled every few seconds does not re-send each task's whole
history."""

from __future__ import annotations

from protocol.tasks.messages import Checkpoint, Claim, Result, TaskRecord
from protocol.wire import Message
from tests.protocol.fakes import Link, addr, opened
from tests.protocol.test_tasks import audience_of, cluster, starts, submit

PEERS = 8
OBJECTS = (TaskRecord, Claim, Checkpoint, Result)


def objects_sent_to(link: Link, reader: int, since: int) -> list[tuple[str, Message]]:
    """(sender, task object) of every task object sent to `reader` after log entry `since`."""
    return [
        (src, message)
        for _, src, send in link.log[since:]
        if send.addr == addr(reader)
        for message in opened(send.data)
        if isinstance(message, OBJECTS)
    ]


def read(link: Link, reader: int, task_id: bytes) -> list[tuple[str, Message]]:
    """Read the task at `reader` (`Node.fetch`); the task objects that came back."""
    mark = len(link.log)
    link.run(reader, link.node(reader).fetch(link.now, [task_id]))
    link.advance(link.now + 1.0)
    return objects_sent_to(link, reader, mark)


def test_a_read_sends_the_reader_only_what_it_lacks() -> None:
    link = cluster(PEERS, serving=range(1, PEERS))
    task_id = submit(link)
    [(owner, epoch)] = starts(link, task_id)
    outside = set(range(PEERS)) - audience_of(task_id, list(range(PEERS)), [*range(1, PEERS)], 0)
    reader = min(outside)
    assert task_id not in link.node(reader).tasks.tasks
    fx, _ = link.node(owner).checkpoint(link.now, task_id, epoch, b"step 1")
    link.run(owner, fx)

    first = read(link, reader, task_id)  # holding none of it: the whole task
    assert {type(m) for _, m in first} == {TaskRecord, Claim, Checkpoint}

    for step in (b"step 2", b"step 3"):
        fx, _ = link.node(owner).checkpoint(link.now, task_id, epoch, step)
        link.run(owner, fx)
    link.run(owner, link.node(owner).complete(link.now, task_id, epoch, "ok", b"answer"))
    link.advance(link.now + 0.5)
    second = read(link, reader, task_id)  # an older copy: only the new steps and the result
    assert second, "the reader was sent nothing new"
    assert all(isinstance(m, Checkpoint | Result) for _, m in second)
    assert {m.seq for _, m in second if isinstance(m, Checkpoint)} == {2, 3}
    held = link.node(reader).tasks.tasks[task_id]
    assert held.digest() == link.node(owner).tasks.tasks[task_id].digest()

    assert read(link, reader, task_id) == []  # held alike: nothing at all
