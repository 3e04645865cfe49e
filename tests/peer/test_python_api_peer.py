"""Python roles and code agents in a whole peer (issue 13): `build_peer` declares them next to
the configured agents and the built-ins, the agent host keeps them when it re-declares its
roles, and `peer.serve` runs a peer from Python with the command's settings.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

import peer
from peer.agents.host import BUILTIN_SLOTS
from peer.agents.spec import AgentSpec
from peer.build import build_peer
from peer.keys import DEV_KEY
from peer.python_api.serving import collect, settings_with
from peer.runtime.executor import Outcome, Work
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings
from tests.peer.inprocess import MemoryStore


@peer.role("shout", max_concurrent=3)
async def shout(task: peer.Task) -> str:
    return task.input.upper()


writer = peer.Agent("writer", system="You write.")


async def test_python_roles_are_declared_with_the_agents(tmp_path: Path) -> None:
    configured = AgentSettings(
        bind="127.0.0.1:0",
        data_dir=tmp_path,
        profile="local",
        agents=(AgentSpec("lead", ("lead",)),),
    )
    settings = settings_with(configured, collect([shout, writer]))
    async with build_peer(
        settings,
        keyring=Keyring(DEV_KEY),
        store=MemoryStore(),
        rng=random.Random(1),
        python_roles=[shout],
    ) as built:
        host = built.host
        assert host is not None
        assert set(host.roles) >= {"shout", "lead", "writer", "echo", "sleep"}
        assert host.max_running == BUILTIN_SLOTS + 1 + 1 + 3
        declared = built.node.peer_states()[built.node.node_id]
        assert "shout" in declared.roles
        # Re-declaring (as a spawn or a retirement does) keeps the Python role.
        host.add(AgentSpec("extra", ("extra",)), spawned=True)
        assert "shout" in built.executor.handlers and "shout" in host.roles
        output = await built.executor.handlers["shout"](Work(b"t" * 32, 1, "shout", b"hi"))
        assert isinstance(output, Outcome) and output.output == b"HI"


async def test_a_peer_without_agents_serves_python_roles(tmp_path: Path) -> None:
    settings = AgentSettings(bind="127.0.0.1:0", data_dir=tmp_path, profile="local")
    async with build_peer(
        settings, keyring=Keyring(DEV_KEY), store=MemoryStore(), python_roles=[shout]
    ) as built:
        assert built.host is None
        declared = built.node.peer_states()[built.node.node_id]
        assert sorted(declared.roles) == ["echo", "shout", "sleep"]
        assert built.executor.max_running == BUILTIN_SLOTS + 3


async def test_serve_runs_the_commands_peer_until_stopped(tmp_path: Path) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(
        peer.serve(
            shout,
            writer,
            stop=stop,
            insecure_dev=True,
            bind="127.0.0.1:0",
            api="127.0.0.1:0",
            data_dir=tmp_path,
            profile="local",
        )
    )
    token = tmp_path / "api.token"
    for _ in range(200):
        if token.exists():
            break
        await asyncio.sleep(0.05)
    assert token.exists() and not running.done()
    stop.set()
    assert await asyncio.wait_for(running, 10) == 0


async def test_serve_refuses_before_starting(tmp_path: Path) -> None:
    with pytest.raises(peer.ServeError, match="seed-only"):
        await peer.serve(shout, insecure_dev=True, data_dir=tmp_path, no_agents=True)
    with pytest.raises(peer.ServeError, match="cannot serve 42"):
        await peer.serve(42, insecure_dev=True, data_dir=tmp_path)  # type: ignore[arg-type]
    assert peer.run(shout, insecure_dev=True, data_dir=tmp_path, no_agents=True) == 2
    assert not (tmp_path / "api.token").exists()
