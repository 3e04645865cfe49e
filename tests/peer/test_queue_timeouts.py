"""Queue timeouts (peer/runtime/queue_timeouts.py): the rule, durability across a restart, the
enforcing loop, against a fake driver; the API's `queue_timeout` field over a socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from peer.http.app import PeerApi
from peer.runtime.driver import Driver
from peer.runtime.queue_timeouts import (
    DEFAULT_QUEUE_TIMEOUT,
    HOME_GRACE,
    Queued,
    QueueTimeouts,
    expiry_reason,
)
from protocol.tasks.messages import Cancel, Claim, TaskRecord
from protocol.tasks.state import TaskState
from tests.peer.inprocess import API_HEADERS, API_TOKEN, in_process_peer

ME = b"m" * 32
OTHER = b"o" * 32
KEY = bytes(range(32, 64))


def state(origin: bytes = ME, *, claimed: bool = False, cancelled: bool = False) -> TaskState:
    task_id = b"t" * 32
    st = TaskState(task_id, 0.0)
    st.record = TaskRecord(
        b"k", 100.0, "summarize", b"", 0, b"", "", b"n", 0.0, "", b"", task_id, origin
    )
    if claimed:
        st.claim = cast(Claim, object())
    if cancelled:
        st.cancel = Cancel(task_id, KEY, "asked", b"", OTHER)
    return st


QUEUED = Queued(b"t" * 32, "summarize", 600.0, 100.0)


@pytest.mark.parametrize(
    ("st", "served", "reason"),
    [
        (state(), False, "queue timeout: no live peer served role 'summarize' for 600 s"),
        (
            state(),
            True,
            "queue timeout: no peer claimed it within 600 s (the peers serving 'summarize' "
            "were busy)",
        ),
        (state(claimed=True), False, None),  # claimed once: never touched
        (state(cancelled=True), False, None),  # final already
        (state(OTHER), False, None),  # submitted elsewhere: not ours to cancel
        (None, False, None),  # unknown here (compacted, or never submitted)
        (TaskState(b"t" * 32, 0.0), False, None),  # no record yet
    ],
)
def test_expiry_reason(st: TaskState | None, served: bool, reason: str | None) -> None:
    assert expiry_reason(st, ME, QUEUED, served) == reason


def test_the_default_is_ten_minutes() -> None:
    assert DEFAULT_QUEUE_TIMEOUT == 600.0
    assert QUEUED.deadline == 700.0


@dataclass
class FakeNode:
    node_id: bytes = ME
    tasks: dict[bytes, TaskState] = field(default_factory=dict)
    roles: set[str] = field(default_factory=set)

    def task(self, task_id: bytes) -> TaskState | None:
        return self.tasks.get(task_id)

    def capable(self, role: str) -> list[bytes]:
        return [ME] if role in self.roles else []

    def open_tasks(self) -> list[TaskState]:
        return [st for st in self.tasks.values() if st.cancel is None]


@dataclass
class FakeDriver:
    node: FakeNode = field(default_factory=FakeNode)
    now: float = 1000.0
    cancelled: list[tuple[bytes, str]] = field(default_factory=list)

    def wall(self) -> float:
        return self.now

    def cancel_task(self, task_id: bytes, reason: str, outcome: str = "cancelled") -> None:
        assert outcome == "failed", "a queue timeout ends its task failed"
        self.cancelled.append((task_id, reason))
        st = self.node.tasks[task_id]
        st.cancel = Cancel(task_id, KEY, reason, b"", ME, outcome)

    def expire_task(self, task_id: bytes, reason: str) -> bool:
        # The node decides whether we are the arbiter; here: always.
        self.cancel_task(task_id, reason, "failed")
        return True


def timeouts(fake: FakeDriver, data_dir: Path) -> QueueTimeouts:
    return QueueTimeouts(cast(Driver, fake), data_dir)


async def test_a_deadline_survives_a_restart_and_passes_once(tmp_path: Path) -> None:
    fake = FakeDriver()
    st = state()
    fake.node.tasks[st.task_id] = st
    first = timeouts(fake, tmp_path)
    first.hold(st.task_id, "summarize", 5.0, 100.0)
    await first.close()  # the peer stops (or dies: the row was committed by `hold`)

    again = timeouts(fake, tmp_path)
    assert again.deadline(st.task_id) == 105.0
    assert again.expire(104.9) == [] and fake.cancelled == []
    assert again.expire(105.0) == [st.task_id]
    assert fake.cancelled == [
        (st.task_id, "queue timeout: no live peer served role 'summarize' for 5 s")
    ]
    assert again.expire(10_000.0) == []  # acted on once
    await again.close()
    assert timeouts(fake, tmp_path).deadline(st.task_id) is None  # the row is gone


async def test_a_claimed_task_is_left_alone_and_forgotten(tmp_path: Path) -> None:
    fake = FakeDriver()
    st = state(claimed=True)
    fake.node.tasks[st.task_id] = st
    queue = timeouts(fake, tmp_path)
    queue.hold(st.task_id, "summarize", 5.0, 100.0)
    assert queue.expire(200.0) == [] and fake.cancelled == []
    assert queue.deadline(st.task_id) is None
    await queue.close()


async def test_a_later_hold_of_the_same_task_wins(tmp_path: Path) -> None:
    fake = FakeDriver()
    st = state()
    fake.node.tasks[st.task_id] = st
    queue = timeouts(fake, tmp_path)
    queue.hold(st.task_id, "summarize", 5.0, 100.0)
    queue.hold(st.task_id, "summarize", 50.0, 100.0)  # the same key, resubmitted
    assert queue.expire(120.0) == []
    assert queue.expire(150.0) == [st.task_id]
    await queue.close()


async def test_the_loop_ends_a_task_at_its_deadline(tmp_path: Path) -> None:
    fake = FakeDriver(now=time.time())
    fake.wall = time.time  # type: ignore[method-assign]
    st = state()
    fake.node.tasks[st.task_id] = st
    queue = timeouts(fake, tmp_path)
    queue.start()
    started = time.monotonic()
    queue.hold(st.task_id, "summarize", 0.3, time.time())
    while not fake.cancelled:
        assert time.monotonic() - started < 3, "the deadline passed unnoticed"
        await asyncio.sleep(0.02)
    assert time.monotonic() - started >= 0.25
    await queue.close()


async def test_the_home_ends_a_queued_task_submitted_elsewhere_after_its_grace(
    tmp_path: Path,
) -> None:
    fake = FakeDriver()
    st = state(OTHER)  # its origin is another peer, whose own timeout never came
    assert st.record is not None
    st.record = replace(st.record, queue_timeout=5.0)  # created at 100
    plain = state(OTHER)
    plain.task_id = b"p" * 32
    fake.node.tasks = {st.task_id: st, plain.task_id: plain}
    queue = timeouts(fake, tmp_path)
    assert queue.expire_held(105.0 + HOME_GRACE - 0.1) == []
    assert queue.expire_held(105.0 + HOME_GRACE) == [st.task_id]
    assert fake.cancelled == [
        (st.task_id, "queue timeout: no live peer served role 'summarize' for 5 s")
    ]
    assert queue.expire_held(10_000.0) == []  # ended once; the one without a timeout: never
    await queue.close()


# --- the API ------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[PeerApi, TestClient[Any, Any]]]:
    async with in_process_peer(1, KEY) as first, in_process_peer(2, KEY) as second:
        assert await second.driver.join([first.driver.node.addr], timeout=5.0) is not None
        served = PeerApi(first.driver, first.transport, tmp_path, lambda: None, token=API_TOKEN)
        served.queue_timeouts.start()
        client: TestClient[Any, Any] = TestClient(TestServer(served.app), headers=API_HEADERS)
        await client.start_server()
        try:
            yield served, client
        finally:
            await client.close()
            await served.stop()


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"queue_timeout": 5}, "queue_timeout applies to a queued task: add queue: true"),
        ({"queue": True, "queue_timeout": -1}, "queue_timeout must be a number of seconds"),
        ({"queue": True, "queue_timeout": "5"}, "queue_timeout must be a number of seconds"),
        ({"queue": True, "queue_timeout": True}, "queue_timeout must be a number of seconds"),
    ],
)
async def test_bad_queue_timeouts_are_refused(
    api: tuple[PeerApi, TestClient[Any, Any]], body: dict[str, Any], detail: str
) -> None:
    _, client = api
    r = await client.post("/v1/tasks", json={"role": "nobody", "input": "x", **body})
    assert r.status == 400
    assert detail in (await r.json())["detail"]
    r = await client.get("/v1/tasks")
    assert (await r.json())["tasks"] == []  # nothing was submitted


async def test_a_queued_submission_holds_its_deadline(
    api: tuple[PeerApi, TestClient[Any, Any]],
) -> None:
    served, client = api
    for extra, seconds in (({}, DEFAULT_QUEUE_TIMEOUT), ({"queue_timeout": 30}, 30.0)):
        body = {"role": "nobody", "input": str(extra), "queue": True, **extra}
        r = await client.post("/v1/tasks", json=body)
        assert r.status == 202, await r.text()
        task = await (await client.get(f"/v1/tasks/{(await r.json())['id']}")).json()
        deadline = served.queue_timeouts.deadline(bytes.fromhex(task["id"]))
        assert deadline == task["created"] + seconds
    body = {"role": "nobody", "input": "none", "queue": True, "queue_timeout": 0}
    r = await client.post("/v1/tasks", json=body)
    assert r.status == 202
    assert served.queue_timeouts.deadline(bytes.fromhex((await r.json())["id"])) is None


async def test_a_queued_task_waited_on_ends_at_its_timeout(
    api: tuple[PeerApi, TestClient[Any, Any]],
) -> None:
    _, client = api
    started = time.monotonic()
    body = {"role": "nobody", "input": "x", "queue": True, "queue_timeout": 1, "wait": True}
    r = await client.post("/v1/tasks", json=body)
    assert r.status == 200, await r.text()
    task = await r.json()
    assert 1.0 <= time.monotonic() - started < 8
    assert task["state"] == "failed" and task["result"] is None
    assert task["cancel"]["outcome"] == "failed"
    assert task["cancel"]["reason"] == "queue timeout: no live peer served role 'nobody' for 1 s"
