"""Secret files a peer reads (issue 11, finding 9): the network key, its keyring copy and the
operator's API token are refused, in one line naming the file and the fix, when group or others
may read or write them; `grapevine agent` is run as a user would run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peer.api_token import TokenError, find_token, read_token_file
from peer.keys import keyring_path
from peer.runtime.keyring import encode_key, generate_network_key
from peer.secret_files import ExposedSecretError, read_secret_file

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = ["--bind", "127.0.0.1:0", "--api", "127.0.0.1:0"]


def environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPEVINE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", "agent", *LOOPBACK, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=environ(),
        check=False,
    )


def write_key(path: Path, mode: int) -> Path:
    path.write_text(encode_key(generate_network_key()) + "\n")
    path.chmod(mode)
    return path


def assert_refused(result: subprocess.CompletedProcess[str], path: Path, mode: int) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"grapevine agent: {path} is accessible by group or others")
    assert f"(mode {mode:o})" in result.stderr
    assert f"run `chmod 600 {path}`" in result.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_agent_refuses_a_network_key_file_others_may_read_or_write(
    tmp_path: Path, mode: int
) -> None:
    key = write_key(tmp_path / "network.key", mode)
    result = agent("--network-key-file", str(key), "--data-dir", str(tmp_path / "data"))
    assert_refused(result, key, mode)


def test_agent_refuses_a_shared_keyring_copy_in_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    copy = write_key(keyring_path(data), 0o644)
    assert_refused(agent("--data-dir", str(data)), copy, 0o644)


def test_agent_refuses_an_operator_token_file_others_may_read(tmp_path: Path) -> None:
    key = write_key(tmp_path / "network.key", 0o600)
    token = tmp_path / "operator.token"
    token.write_text("the-operators-token\n")
    token.chmod(0o644)
    result = agent(
        "--network-key-file", str(key), "--api-token-file", str(token),
        "--data-dir", str(tmp_path / "data"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{token} is accessible by group or others (mode 644)" in result.stderr
    assert f"run `chmod 600 {token}`" in result.stderr


def test_agent_starts_with_private_key_and_token_files(tmp_path: Path) -> None:
    key = write_key(tmp_path / "network.key", 0o600)
    token = tmp_path / "operator.token"
    token.write_text("the-operators-token\n")
    token.chmod(0o600)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "peer.cli", "agent", *LOOPBACK,
            "--network-key-file", str(key), "--api-token-file", str(token),
            "--data-dir", str(tmp_path / "data"), "--no-agents",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=environ(),
    )  # fmt: skip
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert "listening on" in first, first + process.stderr.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_peer_refuses_a_shared_token_file_but_a_client_presents_it(tmp_path: Path) -> None:
    token = tmp_path / "api.token"
    token.write_text("some-token\n")
    token.chmod(0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        read_token_file(token)
    found = find_token(token_file=token, env={})
    assert found is not None and found.value == "some-token"
    token.chmod(0o600)
    assert read_token_file(token) == "some-token"


def test_read_secret_file_checks_the_opened_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"x")
    path.chmod(0o600)
    assert read_secret_file(path, "a secret") == b"x"
    path.chmod(0o660)
    with pytest.raises(ExposedSecretError) as refused:
        read_secret_file(path, "a secret")
    assert str(refused.value) == (
        f"{path} is accessible by group or others (mode 660); it holds a secret: "
        f"run `chmod 600 {path}`"
    )
    with pytest.raises(FileNotFoundError):
        read_secret_file(tmp_path / "missing", "a secret")
