"""The Python client of the local HTTP API (peer/client.py), against a canned API."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from peer.client import ApiError, ClientError, GrapevineClient, base_url
from tests.peer.fake_api import DEAD_ID, EVENTS, KEY_ID, MEMBERS, SELF_ID, make_app


@pytest_asyncio.fixture
async def client() -> AsyncIterator[GrapevineClient]:
    server = TestServer(make_app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with GrapevineClient(f"127.0.0.1:{server.port}") as c:
            yield c
    finally:
        await server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("api", "url"),
    [
        ("127.0.0.1:8946", "http://127.0.0.1:8946"),
        ("[::1]:8946", "http://[::1]:8946"),
        ("http://localhost:9000/", "http://localhost:9000"),
    ],
)
def test_base_url_accepts_host_port_and_urls(api: str, url: str) -> None:
    assert base_url(api) == url


@pytest.mark.parametrize("api", ["127.0.0.1", "host:", ":80", "h:99999", "ftp://h:1"])
def test_base_url_refuses_what_is_not_an_address(api: str) -> None:
    with pytest.raises(ValueError, match="API address"):
        base_url(api)


@pytest.mark.asyncio
async def test_reads_return_the_api_objects(client: GrapevineClient) -> None:
    assert (await client.self_info())["id"] == SELF_ID
    assert (await client.health())["status"] == "ok"
    assert await client.members() == MEMBERS
    assert (await client.metrics())["rejected"] == {"unknown_key": 4}
    assert (await client.keys())["primary"] == KEY_ID


@pytest.mark.asyncio
async def test_commands_return_the_api_answers(client: GrapevineClient) -> None:
    assert await client.send_event("deploy", "v1") == {"origin": SELF_ID, "ltime": 8}
    assert await client.leave() == {"status": "leaving"}
    assert (await client.install_key("k"))["accepted"] == [KEY_ID, "feedf00d"]


@pytest.mark.asyncio
async def test_problem_details_become_api_error(client: GrapevineClient) -> None:
    with pytest.raises(ApiError) as caught:
        await client.send_event("too-big", "x" * 600)
    assert (caught.value.status, caught.value.title) == (413, "Event too large")
    assert caught.value.detail == "the payload exceeds 512 bytes"


@pytest.mark.asyncio
async def test_an_unknown_path_is_an_api_error_without_problem_body(
    client: GrapevineClient,
) -> None:
    with pytest.raises(ApiError) as caught:
        await client._request("GET", "/v1/nowhere")
    assert caught.value.status == 404


@pytest.mark.asyncio
async def test_followed_events_are_parsed_from_the_stream(client: GrapevineClient) -> None:
    received = [event async for event in client.events(follow=True)]
    assert received == EVENTS
    assert received[0]["id"] == DEAD_ID


@pytest.mark.asyncio
async def test_unfollowed_events_are_the_buffer(client: GrapevineClient) -> None:
    assert [event async for event in client.events(follow=False)] == EVENTS


@pytest.mark.asyncio
async def test_unreachable_peer_is_client_error_with_reason() -> None:
    api = f"127.0.0.1:{free_port()}"
    async with GrapevineClient(api) as c:
        with pytest.raises(ClientError) as caught:
            await c.members()
    assert caught.value.reason == "connection refused"
    assert str(caught.value) == f"cannot reach the peer API at {api} (connection refused)"


@pytest.mark.asyncio
async def test_using_the_client_outside_async_with_is_a_local_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await GrapevineClient().members()
