"""The rough edges a new user hits (issue 13), each tried as a user would: `grapevine` run as a
subprocess against real peers on 127.0.0.1 — a role nobody serves, agent answers as text,
`agents`, `join`, `--version`, a seed that refuses our key, the gossip port given as the API.

The cluster: a seed and a peer joined to it (both serve the built-in roles echo and sleep), a
loner with the same key that joined nobody, and a stranger with another network key.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from scripts.local_cluster import (
    LocalCluster,
    Peer,
    child_env,
    grapevine_command,
    keygen,
    wait_ready,
    wait_views,
)
from tests.peer.test_cli_tasks import one_line_error

AGENT_OUTPUT = {"agent": "writer-1", "answer": "Hello\nworld", "model": "m", "steps": 2}
"""What an agent's task outputs (peer.agents.ports.AgentOutput), echoed back by `echo`."""


@dataclass
class Cluster:
    seed: Peer
    loner: Peer
    stranger: Peer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cli-rough-edges")
    with LocalCluster(root, extra_args=()) as peers:
        seed = peers.add()
        peers.add(join=[seed])
        loner = peers.add()
        stranger = peers.add(key_file=keygen(root / "other-network.key"))
        asyncio.run(wait_ready(peers.peers, timeout=30))
        pair = peers.peers[:2]
        asyncio.run(wait_views(pair, {p.node_id: "alive" for p in pair}, timeout=20))
        yield Cluster(seed, loner, stranger)


def grapevine(peer: Peer | None, *args: str) -> subprocess.CompletedProcess[str]:
    flags = peer.cli_flags() if peer is not None else []
    return subprocess.run(
        [*grapevine_command(), *args, *flags],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )


def post(peer: Peer, path: str, body: object) -> tuple[int, dict[str, object]]:
    """POST JSON to the peer's API with its token, as any HTTP client would."""
    token = (peer.data_dir / "api.token").read_text().strip()
    request = urllib.request.Request(
        f"http://{peer.api}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# --- a role nobody serves ----------------------------------------------------------------------


def test_a_role_nobody_serves_is_refused_naming_the_roles_served(cluster: Cluster) -> None:
    line = one_line_error(grapevine(cluster.seed, "submit", "--role", "ech", "hello"), 1)
    assert line.startswith("grapevine submit: Unprocessable Content: ")
    assert "no live peer serves the role 'ech' (did you mean 'echo'?)" in line
    assert "the network serves: echo, sleep" in line
    assert "--queue" in line
    listed = grapevine(cluster.seed, "tasks", "--role", "ech", "--json")
    assert json.loads(listed.stdout) == []  # nothing was submitted

    status, problem = post(cluster.seed, "/v1/tasks", {"role": "ech", "input": "hello"})
    assert status == 422
    assert (problem["role"], problem["roles"], problem["suggestion"]) == (
        "ech",
        ["echo", "sleep"],
        "echo",
    )
    status, problem = post(cluster.seed, "/v1/tasks", {"role": "translate", "input": "x"})
    assert (status, problem["suggestion"]) == (422, None)


def test_queue_submits_a_task_for_a_role_nobody_serves(cluster: Cluster) -> None:
    submitted = grapevine(
        cluster.seed, "submit", "--role", "summarize", "--queue", "--no-wait", "some text"
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    task = json.loads(grapevine(cluster.seed, "task", task_id, "--json").stdout)
    assert (task["role"], task["state"]) == ("summarize", "pending")
    assert grapevine(cluster.seed, "cancel", task_id).returncode == 0


def test_submit_names_the_task_before_waiting(cluster: Cluster) -> None:
    process = subprocess.Popen(
        [*grapevine_command(), "submit", "--role", "sleep", "2", *cluster.seed.cli_flags()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()
        still_waiting = process.poll() is None
        stdout, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert first.startswith("grapevine submit: task "), first + rest
    task_id = first.split()[3].removesuffix(";")
    assert len(task_id) == 64 and "accepted" in first
    assert still_waiting, "the id came only once the task had finished"
    assert process.returncode == 0, rest
    assert stdout == "slept 2 s\n"


# --- answers as text ---------------------------------------------------------------------------


def test_agent_answers_print_as_text_and_json_gives_the_object(cluster: Cluster) -> None:
    output = json.dumps(AGENT_OUTPUT)
    submitted = grapevine(cluster.seed, "submit", "--role", "echo", output)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout == "Hello\nworld\n"

    task_id = grapevine(cluster.seed, "submit", "--role", "echo", "--no-wait", output).stdout
    task_id = task_id.strip()
    grapevine(cluster.seed, "submit", "--role", "echo", output)  # same input: settled by now
    deadline = time.monotonic() + 20
    while (result := grapevine(cluster.seed, "result", task_id)).returncode != 0:
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.2)
    assert result.stdout == "Hello\nworld\n"
    as_json = json.loads(grapevine(cluster.seed, "result", task_id, "--json").stdout)
    assert json.loads(as_json["output"]) == AGENT_OUTPUT
    shown = grapevine(cluster.seed, "task", task_id).stdout.splitlines()
    assert "output      Hello" in shown and "            world" in shown
    task = json.loads(grapevine(cluster.seed, "task", task_id, "--json").stdout)
    assert json.loads(task["result"]["output"]) == AGENT_OUTPUT


def test_a_json_string_output_is_unwrapped_and_plain_text_kept(cluster: Cluster) -> None:
    quoted = grapevine(cluster.seed, "submit", "--role", "echo", '"a \\"quoted\\" answer"')
    assert quoted.stdout == 'a "quoted" answer\n', quoted.stderr
    plain = grapevine(cluster.seed, "submit", "--role", "echo", "just {text}")
    assert plain.stdout == "just {text}\n", plain.stderr


# --- agents, join, version ---------------------------------------------------------------------


def test_agents_lists_the_roles_the_peer_serves(cluster: Cluster) -> None:
    shown = grapevine(cluster.seed, "agents")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "no agents; roles served here: echo, sleep\n"
    answer = json.loads(grapevine(cluster.seed, "agents", "--json").stdout)
    assert (answer["agents"], answer["roles"]) == ([], ["echo", "sleep"])


def test_join_makes_a_running_peer_join_more_seeds(cluster: Cluster) -> None:
    joined = grapevine(cluster.loner, "join", cluster.seed.bind)
    assert joined.returncode == 0, joined.stderr
    assert joined.stdout == f"joined through {cluster.seed.bind}\n"
    deadline = time.monotonic() + 20
    while True:
        members = json.loads(grapevine(cluster.loner, "members", "--json").stdout)
        if {m["address"] for m in members if m["status"] == "alive"} >= {cluster.seed.bind}:
            break
        assert time.monotonic() < deadline, members
        time.sleep(0.3)
    line = one_line_error(grapevine(cluster.loner, "join", "not an address"), 1)
    assert line.startswith("grapevine join: Bad Request: seed 'not an address'")


def test_a_seed_that_refuses_our_network_key_is_named_in_one_line(cluster: Cluster) -> None:
    line = one_line_error(grapevine(cluster.stranger, "join", cluster.seed.bind), 1)
    assert line.startswith("grapevine join: Bad Gateway: no seed answered")
    assert f"{cluster.seed.bind} (it refused our network key: it belongs to another network" in (
        line
    )
    assert "HTTP 403" not in line


def test_a_peer_api_given_as_a_seed_is_named(cluster: Cluster) -> None:
    line = one_line_error(grapevine(cluster.stranger, "join", cluster.seed.api), 1)
    assert "not a peer's gossip port (is it a peer's API address?)" in line


def test_the_gossip_port_given_as_the_api_is_one_clear_line(cluster: Cluster) -> None:
    line = one_line_error(grapevine(None, "members", "--api", cluster.seed.bind), 2)
    assert line == (
        f"grapevine members: {cluster.seed.bind} is a peer's gossip port (its --bind address), "
        "not its API; the API is the address `grapevine agent` printed as (api ...): "
        "127.0.0.1:8946 unless its --api said otherwise"
    )


def test_version_and_self_report_the_installed_version(cluster: Cluster) -> None:
    installed = metadata.version("grapevine-agents")
    shown = grapevine(None, "--version")
    assert (shown.returncode, shown.stdout) == (0, f"grapevine {installed}\n")
    info = json.loads(grapevine(cluster.seed, "self", "--json").stdout)
    assert info["version"] == installed


# --- without a peer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("submit", "--rol", "echo", "x"), "unrecognized arguments: --rol"),
        (("members", "--jso"), "unrecognized arguments: --jso; did you mean '--json'?"),
        (("membrs",), "did you mean 'members'?"),
        (("tasks", "--state", "runing"), "did you mean 'running'?"),
        (("keys", "instal", "k"), "did you mean 'install'?"),
    ],
)
def test_no_abbreviated_flags_and_did_you_mean(args: tuple[str, ...], expected: str) -> None:
    line = one_line_error(grapevine(None, *args), 2)
    assert expected in line
    if args[1:2] == ("--rol",):
        assert "'--role'" in line


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    file = tmp_path / "not-a-dir"
    file.write_text("")
    agent = grapevine(None, "agent", "--insecure-dev", "--data-dir", str(file))
    line = one_line_error(agent, 2)
    assert line.startswith(f"grapevine agent: --data-dir {file} is a file, not a directory; ")
    client = one_line_error(grapevine(None, "members", "--data-dir", str(file)), 2)
    assert client.startswith(f"grapevine members: --data-dir {file} is a file, not a directory")


def test_a_peer_started_with_the_wrong_key_says_so_within_one_join_attempt(
    tmp_path: Path,
) -> None:
    # `grapevine agent --join SEED` whose seed refuses our key: one line naming the seed and
    # the key, after the first attempt (about 2 s), not after the whole backoff (about 13 s).
    with LocalCluster(tmp_path, extra_args=()) as peers:
        seed = peers.add()
        asyncio.run(wait_ready([seed], timeout=30))
        stranger = peers.add(key_file=keygen(tmp_path / "other-network.key"), join=[seed])
        deadline = time.monotonic() + 30
        while "no seed answered" not in stranger.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, stranger.log_tail()
            time.sleep(0.1)
    line = next(
        line
        for line in stranger.log_path.read_text(errors="replace").splitlines()
        if "no seed answered" in line
    )
    # one attempt: the retries and their backoff (about 13 s in all) are skipped
    assert f"no seed answered after 1 attempt: {seed.bind} (it refused our network key" in line
