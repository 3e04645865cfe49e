"""run_agent end to end in-process: ready line, join, API leave, restart with the same data."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peer.api_token import read_token_file, token_path
from peer.cli.agent import run_agent
from peer.keys import NO_KEY_HELP
from peer.runtime.keyring import encode_key, generate_network_key
from peer.settings import AgentSettings
from scripts.local_cluster import free_port

pytestmark = pytest.mark.asyncio


def _auth(peer: AgentSettings) -> dict[str, str]:
    """The header carrying the token `peer` generated in its data directory (none yet: {})."""
    path = token_path(peer.data_dir)
    return {"Authorization": f"Bearer {read_token_file(path)}"} if path.exists() else {}


async def _get(peer: AgentSettings, path: str) -> Any:
    url = f"http://{peer.api}{path}"
    async with aiohttp.ClientSession() as http, http.get(url, headers=_auth(peer)) as r:
        return await r.json()


async def _until_up(peer: AgentSettings) -> None:
    async with asyncio.timeout(5):
        while True:
            try:
                await _get(peer, "/v1/health")
                return
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)


async def test_refuses_to_start_without_a_key(tmp_path: Path, capsys: Any) -> None:
    code = await run_agent(AgentSettings(data_dir=tmp_path), handle_signals=False)
    assert code == 2
    assert NO_KEY_HELP in capsys.readouterr().err


async def test_two_agents_join_leave_and_restart(tmp_path: Path, capsys: Any) -> None:
    key_file = tmp_path / "network.key"
    key_file.write_text(encode_key(generate_network_key()) + "\n")
    key_file.chmod(0o600)
    ports = [free_port() for _ in range(4)]
    seed = AgentSettings(
        bind=f"127.0.0.1:{ports[0]}",
        api=f"127.0.0.1:{ports[1]}",
        data_dir=tmp_path / "a",
        network_key_file=key_file,
        profile="local",
        no_agents=True,
    )
    joiner = AgentSettings(
        bind=f"127.0.0.1:{ports[2]}",
        api=f"127.0.0.1:{ports[3]}",
        data_dir=tmp_path / "b",
        network_key_file=key_file,
        profile="local",
        join=(seed.bind,),
    )
    stop_seed = asyncio.Event()
    seed_task = asyncio.create_task(run_agent(seed, stop=stop_seed, handle_signals=False))
    await _until_up(seed)
    joiner_task = asyncio.create_task(run_agent(joiner, handle_signals=False))
    await _until_up(joiner)

    async with asyncio.timeout(5):
        while len((await _get(seed, "/v1/members"))["members"]) < 2:
            await asyncio.sleep(0.05)
    first = await _get(joiner, "/v1/self")
    members = {m["address"]: m for m in (await _get(seed, "/v1/members"))["members"]}
    assert members[seed.bind]["roles"] == [] and members[seed.bind]["self"]
    async with asyncio.timeout(5):  # the joiner's advertised roles arrive by gossip
        while ["echo", "sleep"] not in [
            m["roles"] for m in (await _get(seed, "/v1/members"))["members"]
        ]:
            await asyncio.sleep(0.05)

    async with (
        aiohttp.ClientSession(headers=_auth(joiner)) as http,
        http.post(f"http://{joiner.api}/v1/leave") as r,
    ):
        assert r.status == 202
    assert await asyncio.wait_for(joiner_task, 6) == 0
    err = capsys.readouterr().err
    assert f"listening on {joiner.bind} (api {joiner.api}), network" in err

    restarted = asyncio.create_task(run_agent(joiner, handle_signals=False))
    await _until_up(joiner)
    second = await _get(joiner, "/v1/self")
    assert second["id"] == first["id"] and second["incarnation"] > first["incarnation"]
    async with asyncio.timeout(5):
        while True:
            status = {m["id"]: m["status"] for m in (await _get(seed, "/v1/members"))["members"]}
            if status.get(first["id"]) == "alive":
                break
            await asyncio.sleep(0.05)
    async with aiohttp.ClientSession(headers=_auth(joiner)) as http:
        await http.post(f"http://{joiner.api}/v1/leave")
    stop_seed.set()
    assert await asyncio.wait_for(asyncio.gather(restarted, seed_task), 8) == [0, 0]
