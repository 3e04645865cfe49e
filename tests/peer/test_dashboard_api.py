"""The dashboard's way in (issue 12), over real sockets as a browser or an attacker meets it: the
one-time login link sets an HttpOnly, SameSite=Strict session cookie and redirects to a clean
URL; the cookie then reads the API but changes nothing; without it `/` says how to get in and
shows no data; the assets are packaged and served with a strict content policy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peer.api_token import read_token_file, token_path
from peer.build import Peer, build_peer
from peer.http.dashboard import ASSETS, browser_host, static_file
from peer.node_ids import node_id_text
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings
from tests.peer.inprocess import MemoryStore

KEY = bytes(range(32))
PAGE = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
"""What a browser's page load sends."""


@asynccontextmanager
async def serving(data_dir: Path) -> AsyncIterator[Peer]:
    """A peer serving its API on 127.0.0.1 (a free port), its state in memory."""
    settings = AgentSettings(
        bind="127.0.0.1:0", api="127.0.0.1:0", data_dir=data_dir, profile="local"
    )
    async with build_peer(
        settings, on_leave=lambda: None, keyring=Keyring(KEY), store=MemoryStore()
    ) as peer:
        yield peer


def login_url(peer: Peer) -> str:
    assert peer.api is not None
    url = peer.api.dashboard.login_url(peer.api.address)
    assert url is not None
    return url


def base(peer: Peer) -> str:
    assert peer.api is not None
    return f"http://{peer.api.address}"


async def get(
    url: str, headers: dict[str, str], cookie: str | None = None, method: str = "GET"
) -> tuple[int, Any, str]:
    """One request with no cookie jar (each test says which cookie it sends); no redirects."""
    if cookie is not None:
        headers = {**headers, "Cookie": cookie}
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.request(method, url, headers=headers, allow_redirects=False) as r,
    ):
        return r.status, r.headers, await r.text()


async def log_in(peer: Peer, url: str, data_dir: Path) -> str:
    """Visit `url` as a browser would; return the "name=value" of the cookie it set."""
    status, headers, _ = await get(url, PAGE)
    assert status == 303 and headers["Location"] == "/"
    morsels = SimpleCookie(headers["Set-Cookie"])
    assert len(morsels) == 1
    ((name, morsel),) = morsels.items()
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert not morsel["expires"] and not morsel["max-age"]  # ends with the browser session
    token = read_token_file(token_path(data_dir))
    assert token not in morsel.value  # the cookie jar never holds the token
    return f"{name}={morsel.value}"


async def test_the_one_time_link_sets_a_strict_cookie_that_opens_the_page(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path / "data") as peer:
        url = login_url(peer)
        assert url.startswith(f"{base(peer)}/?token=")
        cookie = await log_in(peer, url, tmp_path / "data")
        assert peer.api is not None and peer.api.dashboard.login_url(peer.api.address) is None
        status, headers, page = await get(f"{base(peer)}/", PAGE, cookie)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert '<script src="/dashboard/app.js"' in page and 'id="fleet"' in page
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        # The link works once: a second visit sets nothing and shows how to get in.
        status, headers, page = await get(url, PAGE)
        assert status == 401 and "Set-Cookie" not in headers
        assert "works once" in page and "api.token" in page


async def test_the_cookie_reads_the_api_but_changes_nothing(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        cookie = await log_in(peer, login_url(peer), tmp_path / "data")
        for path in ("/v1/self", "/v1/members", "/v1/tasks/stats", "/v1/agents", "/metrics"):
            status, _, _ = await get(f"{base(peer)}{path}", {}, cookie)
            assert status == 200, path
        for path in ("/v1/leave", "/v1/tasks", "/v1/events"):
            headers = {"Content-Type": "application/json", "Origin": base(peer)}
            status, _, _ = await get(f"{base(peer)}{path}", headers, cookie, method="POST")
            assert status == 401, path
        assert peer.api is not None and not peer.driver.leaving
        assert not list(peer.driver.node.held_tasks())
        # Host and Origin are still checked for a request with the cookie.
        port = peer.api.address.rsplit(":", 1)[1]
        status, _, _ = await get(f"{base(peer)}/v1/self", {"Host": f"evil.example:{port}"}, cookie)
        assert status == 403
        status, _, _ = await get(f"{base(peer)}/v1/self", {"Origin": "http://evil.example"}, cookie)
        assert status == 403


async def test_without_a_session_the_page_says_how_to_get_in_and_shows_no_data(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path / "data") as peer:
        assert peer.api is not None
        own_id = node_id_text(peer.driver.node.node_id)[:10]
        for cookie in (None, f"grapevine-session-{peer.api.address.rsplit(':', 1)[1]}=forged"):
            status, headers, page = await get(f"{base(peer)}/", PAGE, cookie)
            assert status == 401 and headers["Content-Type"].startswith("text/html")
            assert "?token=" in page and "api.token" in page
            assert "app.js" not in page and own_id not in page
            status, headers, _ = await get(f"{base(peer)}/v1/self", {}, cookie)
            assert status == 401
        status, _, page = await get(f"{base(peer)}/?token=wrong", PAGE)
        assert status == 401 and "not valid" in page and "refresh" not in page


async def test_a_page_reached_from_another_site_reloads_once_from_its_own(
    tmp_path: Path,
) -> None:
    # A SameSite=Strict cookie stays home on cross-site navigations: the sign-in page then
    # loads `/` again from its own origin, which sends the cookie; from there it does not.
    async with serving(tmp_path / "data") as peer:
        cross = {**PAGE, "Sec-Fetch-Site": "cross-site"}
        status, _, page = await get(f"{base(peer)}/", cross)
        assert status == 401 and '<meta http-equiv="refresh" content="0">' in page
        for site in ("same-origin", "none"):
            headers = {**PAGE, "Sec-Fetch-Site": site}
            status, _, page = await get(f"{base(peer)}/", headers)
            assert status == 401 and "refresh" not in page
        cookie = await log_in(peer, login_url(peer), tmp_path / "data")
        status, _, page = await get(
            f"{base(peer)}/", {**PAGE, "Sec-Fetch-Site": "same-origin"}, cookie
        )
        assert status == 200 and "app.js" in page
        # A client that is not a browser gets the API's usual 401 problem at `/`.
        status, headers, _ = await get(f"{base(peer)}/", {"Accept": "application/json"})
        assert status == 401 and headers["Content-Type"].startswith("application/problem+json")
        for asset in ASSETS:
            status, _, _ = await get(f"{base(peer)}/dashboard/{asset}", PAGE)
            assert status == 401, asset


async def test_the_api_token_itself_logs_in_a_second_browser(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        await log_in(peer, login_url(peer), tmp_path / "data")
        token = read_token_file(token_path(tmp_path / "data"))
        cookie = await log_in(peer, f"{base(peer)}/?token={token}", tmp_path / "data")
        status, _, _ = await get(f"{base(peer)}/v1/members", {}, cookie)
        assert status == 200


async def test_the_assets_are_packaged_and_served_with_their_types(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        cookie = await log_in(peer, login_url(peer), tmp_path / "data")
        for asset, content_type in ASSETS.items():
            status, headers, body = await get(f"{base(peer)}/dashboard/{asset}", {}, cookie)
            assert status == 200 and headers["Content-Type"].startswith(content_type)
            assert body.encode() == static_file(asset) and len(body) > 1000
            assert headers["X-Content-Type-Options"] == "nosniff"
        status, _, _ = await get(f"{base(peer)}/dashboard/../api.token", {}, cookie)
        assert status == 404
        status, _, _ = await get(f"{base(peer)}/dashboard/index.py", {}, cookie)
        assert status == 404
    # No third-party code and nothing fetched from elsewhere: the page works offline.
    for name in ("index.html", *ASSETS):
        text = static_file(name).decode().replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:8946", "127.0.0.1:8946"),
        ("0.0.0.0:8946", "127.0.0.1:8946"),
        ("[::]:8946", "[::1]:8946"),
        ("10.0.0.5:8946", "10.0.0.5:8946"),
        ("[fd00::5]:8946", "[fd00::5]:8946"),
    ],
)
def test_the_login_link_names_an_address_a_browser_can_reach(address: str, host: str) -> None:
    assert browser_host(address) == host
