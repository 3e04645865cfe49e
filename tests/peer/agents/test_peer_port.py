"""`DriverTaskPort` (peer/agents/peer_port.py) on a real in-process peer over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from peer.agents.peer_port import DriverTaskPort, child_key
from peer.runtime.driver import Driver
from peer.runtime.executor import Executor, Work, builtin_roles
from peer.runtime.transport import Transport
from protocol.blobs import parse_blob_ref
from tests.peer.inprocess import in_process_peer

pytestmark = pytest.mark.asyncio

KEY = bytes(range(32))


class Env:
    def __init__(
        self, driver: Driver, transport: Transport, executor: Executor, release: asyncio.Event
    ) -> None:
        self.driver = driver
        self.transport = transport
        self.executor = executor
        self.port = DriverTaskPort(driver)
        self.release = release


@pytest_asyncio.fixture
async def env() -> AsyncIterator[Env]:
    release = asyncio.Event()

    async def hold(work: Work) -> bytes:
        await release.wait()
        return b"released"

    async with in_process_peer(1, KEY, roles={**builtin_roles(), "hold": hold}) as peer:
        peer.driver.join_now([peer.driver.node.addr])  # a network of one
        yield Env(peer.driver, peer.transport, peer.executor, release)


async def test_the_same_child_call_names_the_same_task(env: Env) -> None:
    root = env.driver.submit("hold", b"root", idempotency_key="root")
    first = env.port.submit_child(root, "echo", b"part 1", 0)
    again = env.port.submit_child(root, "echo", b"part 1", 0)
    other = env.port.submit_child(root, "echo", b"part 2", 0)
    assert first == again != other
    assert child_key(root, "echo", b"part 1").startswith("child:")
    assert len(child_key(root, "echo", b"part 1")) == len("child:") + 40
    assert child_key(root, "echo", b"x") != child_key(root, "echoes", b"x")


async def test_children_task_views_and_results(env: Env) -> None:
    root = env.driver.submit("hold", b"root", idempotency_key="root")
    ids = [env.port.submit_child(root, "echo", f"part {i}".encode(), 0) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*(env.port.wait_result(i) for i in ids)), 10.0)
    assert [r.outcome for r in results] == ["ok"] * 3
    assert [r.output for r in results] == [b"part 0", b"part 1", b"part 2"]
    children = env.port.children(root)
    assert sorted(c.task_id for c in children) == sorted(ids)
    assert {c.state for c in children} == {"done"}
    assert all(c.parent == root and c.role == "echo" and c.usage == (0, 0, 0) for c in children)
    view = env.port.task(root)
    assert view is not None and view.parent == b"" and view.role == "hold"
    assert view.state in ("pending", "running") and view.input == b"root"
    assert env.port.task(b"\x00" * 32) is None
    assert env.port.children(ids[0]) == []


async def test_failed_and_cancelled_children(env: Env) -> None:
    root = env.driver.submit("hold", b"root", idempotency_key="root")
    bad = env.port.submit_child(root, "sleep", b"not a number", 0)
    result = await asyncio.wait_for(env.port.wait_result(bad), 10.0)
    assert result.outcome == "failed" and b"sleep wants" in result.output
    held = env.port.submit_child(root, "hold", b"child", 0)
    waiting = asyncio.ensure_future(env.port.wait_result(held))
    await asyncio.sleep(0.2)
    env.driver.cancel_task(held, "no longer needed")
    result = await asyncio.wait_for(waiting, 10.0)
    assert (result.outcome, result.output, result.usage) == ("cancelled", b"", (0, 0, 0))


async def test_role_available_reads_the_advertised_roles(env: Env) -> None:
    assert env.port.role_available("echo")
    assert env.port.role_available("hold")
    assert not env.port.role_available("writer")
    env.driver.serve(("echo",), 4)
    assert not env.port.role_available("hold")


async def test_a_child_output_over_the_inline_limit_comes_back_as_its_bytes(
    tmp_path: Path,
) -> None:
    big = bytes(range(256)) * 400  # 100 KiB: above the 64 KiB inline limit

    async def produce(work: Work) -> bytes:
        return big

    roles = {**builtin_roles(), "produce": produce}
    async with in_process_peer(1, KEY, roles=roles, data_dir=tmp_path) as peer:
        driver = peer.driver
        driver.join_now([driver.node.addr])
        port = DriverTaskPort(driver, peer.blobs)
        root = driver.submit("echo", b"root", idempotency_key="root")
        child = port.submit_child(root, "produce", b"go", 0)
        result = await asyncio.wait_for(port.wait_result(child), 20)
        assert parse_blob_ref(driver.node.tasks.tasks[child].accepted.output) is not None  # type: ignore[union-attr]
        assert result.outcome == "ok" and result.output == big
