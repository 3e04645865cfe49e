"""The local API's boundary (issue 11, findings 1 and 9), over real sockets as an attacker or a
user would meet it: the bearer token on every route, Host and Origin checks, JSON bodies only,
invalid text refused as 400 naming the field, and how the CLI and the client find the token."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peer.api_token import find_token, read_token_file, token_path
from peer.build import Peer, build_peer
from peer.client import ApiError, GrapevineClient
from peer.http.guard import HOSTS_KEPT, RequestGuard
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings, SettingsError, load_settings
from tests.peer.inprocess import MemoryStore

REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
SOME_ID = "ab" * 32


@asynccontextmanager
async def serving(data_dir: Path, **fields: Any) -> AsyncIterator[Peer]:
    """A peer serving its API on 127.0.0.1 (a free port), its state in memory."""
    settings = AgentSettings(
        bind="127.0.0.1:0", api="127.0.0.1:0", data_dir=data_dir, profile="local", **fields
    )
    async with build_peer(
        settings, on_leave=lambda: None, keyring=Keyring(KEY), store=MemoryStore()
    ) as peer:
        yield peer


def address(peer: Peer) -> str:
    assert peer.api is not None
    return peer.api.address


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    peer: Peer, method: str, path: str, headers: dict[str, str], data: bytes | None = None
) -> tuple[int, dict[str, Any], Any]:
    """One raw request; returns (status, headers, decoded JSON body or None)."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"http://{address(peer)}{path}", headers=headers, data=data) as r,
    ):
        text = await r.text()
        return r.status, dict(r.headers), json.loads(text) if text else None


def routes(peer: Peer) -> list[tuple[str, str]]:
    """Every route the API serves, with its parameters filled in, plus an unknown one."""
    assert peer.api is not None
    found = [("GET", "/v1/nope")]
    for route in peer.api.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter", "")
        found.append((route.method, path.replace("{id}", SOME_ID).replace("{digest}", SOME_ID)))
    return found


async def test_every_route_refuses_a_missing_or_wrong_token(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        checked = routes(peer)
        assert ("POST", "/v1/leave") in checked and ("POST", "/v1/keys") in checked
        assert len(checked) > 15
        for headers in ({}, bearer("not-the-token"), {"Authorization": "Basic eDp5"}):
            for method, path in checked:
                status, answer_headers, body = await call(peer, method, path, headers)
                assert status == 401, (method, path, headers)
                if method == "HEAD":
                    continue  # the same answer without its body
                assert answer_headers["Content-Type"].startswith("application/problem+json")
                assert answer_headers["WWW-Authenticate"].startswith("Bearer")
                assert (
                    "Authorization: Bearer" in body["detail"] and "--token-file" in body["detail"]
                )
        token = read_token_file(token_path(tmp_path / "data"))
        for path in ("/v1/self", "/v1/members", "/v1/tasks", "/v1/keys", "/v1/agents"):
            status, _, _ = await call(peer, "GET", path, bearer(token))
            assert status == 200, path


async def test_foreign_host_and_origin_are_refused(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        token = bearer(read_token_file(token_path(tmp_path / "data")))
        port = address(peer).rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{int(port) + 1}"):
            status, _, body = await call(peer, "GET", "/v1/self", {**token, "Host": host})
            assert status == 403 and "Host" in body["detail"], host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            status, _, _ = await call(peer, "GET", "/v1/self", {**token, "Host": host})
            assert status == 200, host
        own = {**token, "Origin": f"http://127.0.0.1:{port}"}
        assert (await call(peer, "GET", "/v1/self", own))[0] == 200
        for origin in ("http://evil.example", "null", f"https://127.0.0.1:{port}"):
            status, _, _ = await call(peer, "GET", "/v1/self", {**token, "Origin": origin})
            assert status == 403, origin


async def test_a_cross_origin_simple_post_creates_no_task(tmp_path: Path) -> None:
    body = json.dumps({"role": "echo", "input": "pwned"}).encode()
    async with serving(tmp_path / "data") as peer:
        token = bearer(read_token_file(token_path(tmp_path / "data")))
        simple = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
        for headers in (simple, {**simple, **token}):
            status, _, _ = await call(peer, "POST", "/v1/tasks", headers, body)
            assert status in (401, 403)
        status, _, _ = await call(peer, "POST", "/v1/keys", simple, b'{"action": "install"}')
        assert status in (401, 403)
        assert (await call(peer, "POST", "/v1/leave", simple))[0] in (401, 403)
        assert not list(peer.driver.node.held_tasks())
        status, _, listed = await call(peer, "GET", "/v1/tasks", token)
        assert status == 200 and listed == {"tasks": []}


async def test_a_body_that_is_not_json_typed_is_415_and_changes_nothing(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        token = bearer(read_token_file(token_path(tmp_path / "data")))
        event = json.dumps({"name": "e", "payload": ""}).encode()
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            headers = {**token, "Content-Type": kind}
            status, _, body = await call(peer, "POST", "/v1/events", headers, event)
            assert status == 415 and "application/json" in body["detail"], kind
        assert peer.driver.node.ltime == 0
        headers = {**token, "Content-Type": "application/json; charset=utf-8"}
        assert (await call(peer, "POST", "/v1/events", headers, event))[0] == 202


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/v1/tasks", b'{"role": "\\ud800", "input": "x"}', "role"),
        (
            "/v1/tasks",
            b'{"role": "echo", "input": "x", "idempotency_key": "k\\udfff"}',
            "idempotency_key",
        ),
        ("/v1/tasks", b'{"role": "echo", "input": "\\udc80"}', "input"),
        ("/v1/tasks", b'{"role": "ech\xff", "input": "x"}', "role"),
        ("/v1/events", b'{"name": "\\ud83d"}', "name"),
        ("/v1/events", b'{"name": "ok", "payload": "\xed\xa0\x80"}', "payload"),
        ("/v1/keys", b'{"action": "install", "key": "\\ud800"}', "key"),
    ],
)
async def test_invalid_text_in_a_body_is_400_naming_the_field(
    tmp_path: Path, path: str, raw: bytes, field: str
) -> None:
    async with serving(tmp_path / "data") as peer:
        headers = {
            **bearer(read_token_file(token_path(tmp_path / "data"))),
            "Content-Type": "application/json",
        }
        status, _, body = await call(peer, "POST", path, headers, raw)
        assert status == 400 and repr(field) in body["detail"], body
        assert list(peer.driver.node.held_tasks()) == [] and peer.driver.node.ltime == 0


async def test_a_body_nested_deeper_than_the_decoder_goes_is_400(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        headers = {
            **bearer(read_token_file(token_path(tmp_path / "data"))),
            "Content-Type": "application/json",
        }
        deep = b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        status, _, body = await call(peer, "POST", "/v1/events", headers, deep)
        assert status == 400 and "not valid JSON" in body["detail"]


async def test_invalid_text_in_a_query_or_path_is_400(tmp_path: Path) -> None:
    async with serving(tmp_path / "data") as peer:
        token = bearer(read_token_file(token_path(tmp_path / "data")))
        for query in ("role=%ff", "role=%ed%a0%80", "state=done&role=a%c3"):
            status, _, body = await call(peer, "GET", f"/v1/tasks?{query}", token)
            assert status == 400 and "'role'" in body["detail"], query
        status, _, body = await call(peer, "GET", "/v1/tasks/%ff%fe", token)
        assert status == 400 and "path" in body["detail"]


async def test_the_token_file_is_private_and_kept_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serving(data):
        first = read_token_file(token_path(data))
    assert stat.S_IMODE(token_path(data).stat().st_mode) == 0o600
    assert len(first) >= 43  # 32 random bytes, URL-safe base64
    async with serving(data) as peer:
        assert read_token_file(token_path(data)) == first
        async with GrapevineClient(address(peer), data_dir=data) as client:
            assert (await client.health())["status"] == "ok"
    assert [p.name for p in data.iterdir() if "token" in p.name] == ["api.token"]


async def test_the_operators_token_file_is_used_and_none_is_generated(tmp_path: Path) -> None:
    operator = tmp_path / "operator.token"
    operator.write_text("the-operators-token\n")
    operator.chmod(0o600)
    async with serving(tmp_path / "data", api_token_file=operator) as peer:
        assert not token_path(tmp_path / "data").exists()
        async with GrapevineClient(address(peer), "the-operators-token") as client:
            assert (await client.self_info())["api"] == address(peer)
        async with GrapevineClient(address(peer), "wrong-token") as client:
            with pytest.raises(ApiError) as refused:
                await client.health()
        assert refused.value.status == 401


def test_find_token_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, text in (("flag", "from-flag"), ("env-file", "from-env-file")):
        (tmp_path / name).write_text(text)
    for name, text in (("given", "from-data-dir"), ("env-dir", "from-env-dir")):
        (tmp_path / name).mkdir()
        token_path(tmp_path / name).write_text(text)
    env = {
        "GRAPEVINE_API_TOKEN": "from-env",
        "GRAPEVINE_API_TOKEN_FILE": str(tmp_path / "env-file"),
        "GRAPEVINE_DATA_DIR": str(tmp_path / "env-dir"),
    }

    def found(**kwargs: Any) -> str | None:
        token = find_token(env=env, **kwargs)
        return None if token is None else token.value

    assert found(token_file=tmp_path / "flag", data_dir=tmp_path / "given") == "from-flag"
    assert found(data_dir=tmp_path / "given") == "from-data-dir"
    assert found() == "from-env"
    del env["GRAPEVINE_API_TOKEN"]
    assert found() == "from-env-file"
    del env["GRAPEVINE_API_TOKEN_FILE"]
    assert found() == "from-env-dir"
    del env["GRAPEVINE_DATA_DIR"]
    monkeypatch.chdir(tmp_path)
    assert found() is None
    (tmp_path / "grapevine-data").mkdir()
    token_path(tmp_path / "grapevine-data").write_text("from-default-dir")
    assert found() == "from-default-dir"
    with pytest.raises(ValueError, match="nowhere"):
        find_token(token_file=tmp_path / "nowhere", env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        find_token(token_file=tmp_path / "empty", env={})


async def grapevine(*args: str, cwd: Path = REPO, **env: str) -> tuple[int, str, str]:
    """Run `python -m peer.cli ARGS` as a user would; returns (exit code, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRAPEVINE_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "peer.cli",
        *args,
        cwd=cwd,
        env={**environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_finds_the_token_or_says_how_to_pass_it(tmp_path: Path) -> None:
    data = tmp_path / "grapevine-data"  # the default data directory, seen from tmp_path
    async with serving(data) as peer:
        api = address(peer)
        token = read_token_file(token_path(data))
        (tmp_path / "token").write_text(token)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        runs = await asyncio.gather(
            grapevine("health", "--api", api, "--data-dir", str(data)),
            grapevine("health", "--api", api, cwd=tmp_path),
            grapevine("health", "--api", api, "--token-file", str(tmp_path / "token")),
            grapevine("health", "--api", api, GRAPEVINE_API_TOKEN=token),
            grapevine("health", "--api", api, GRAPEVINE_DATA_DIR=str(data)),
            grapevine("health", "--api", api, cwd=elsewhere),
            grapevine("health", "--api", api, GRAPEVINE_API_TOKEN="wrong"),
            grapevine("health", "--api", api, "--data-dir", str(elsewhere)),
        )
    for code, out, err in runs[:5]:
        assert code == 0 and "ok" in out, err
    code, _, err = runs[5]
    assert code == 1 and err.count("\n") == 1 and "none was found" in err
    assert "--token-file" in err and "GRAPEVINE_API_TOKEN" in err and "--data-dir" in err
    code, _, err = runs[6]
    assert (
        code == 1
        and err.count("\n") == 1
        and "refused the API token from $GRAPEVINE_API_TOKEN" in err
    )
    code, _, err = runs[7]
    assert code == 2 and err.count("\n") == 1 and "api.token" in err and "Traceback" not in err


def test_an_api_beyond_loopback_needs_the_operators_token(tmp_path: Path) -> None:
    key = tmp_path / "network.key"
    key.write_text("A" * 43 + "=\n")
    key.chmod(0o600)
    base = [sys.executable, "-m", "peer.cli", "agent", "--network-key-file", str(key)]
    flags = ["--bind", "127.0.0.1:0", "--api", "0.0.0.0:0", "--data-dir", str(tmp_path / "d")]
    result = subprocess.run(
        [*base, *flags],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("GRAPEVINE_")},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "0.0.0.0:0 is not a loopback address" in result.stderr
    assert "--api-token-file" in result.stderr
    assert not (tmp_path / "d").exists()


def test_the_operators_token_file_comes_from_a_flag_the_environment_or_the_config(
    tmp_path: Path,
) -> None:
    config = tmp_path / "peer.toml"
    config.write_text('api = "0.0.0.0:8946"\napi_token_file = "op.token"\n')
    from_file = load_settings({}, {}, config)
    assert from_file.api_token_file == tmp_path / "op.token"
    from_env = load_settings({"api": "0.0.0.0:1"}, {"GRAPEVINE_API_TOKEN_FILE": "/t"}, None)
    assert from_env.api_token_file == Path("/t")
    flagged = load_settings({"api": "[::]:1", "api_token_file": "/f"}, {}, None)
    assert flagged.api_token_file == Path("/f")
    for api in ("127.0.0.1:1", "localhost:1", "[::1]:1", "127.0.0.2:1"):
        assert load_settings({"api": api}, {}, None).api_token_file is None
    for api in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "example.org:1"):
        with pytest.raises(SettingsError, match="--api-token-file"):
            load_settings({"api": api}, {}, None)


def test_the_hosts_a_guard_accepts_follow_its_names_and_stay_few() -> None:
    # The accepted Host values are kept per socket address (parsing it for every request was
    # about 1% of a busy peer's CPU): a name given at start must still count, and a guard
    # reached on many addresses keeps a bounded number.
    class Transport:
        def __init__(self, ip: str) -> None:
            self.ip = ip

        def get_extra_info(self, name: str) -> object:
            return (self.ip, 8080) if name == "sockname" else None

    class Request:
        def __init__(self, ip: str) -> None:
            self.transport = Transport(ip)

    guard = RequestGuard("a-token")
    assert guard._allowed_hosts(Request("10.0.0.1")) == {"10.0.0.1:8080"}  # type: ignore[arg-type]
    guard.names = frozenset({"api.example"})
    hosts = guard._allowed_hosts(Request("10.0.0.1"))  # type: ignore[arg-type]
    assert hosts == {"10.0.0.1:8080", "api.example:8080"}
    for n in range(HOSTS_KEPT * 2):
        guard._allowed_hosts(Request(f"10.1.{n // 256}.{n % 256}"))  # type: ignore[arg-type]
    assert 0 < len(guard._hosts) <= HOSTS_KEPT
    assert "localhost:8080" in guard._allowed_hosts(Request("127.0.0.1"))  # type: ignore[arg-type]
