"""Reads through hard links (issue 11, finding 8): the agent's `read_file` refuses a file with
more than one name, says why, and the refusal is counted per workspace and exported by the
peer's metrics."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.agents import jail
from peer.agents.spec import AgentSpec
from peer.agents.tools import Toolbox, ToolContext
from peer.build import build_peer
from peer.runtime.keyring import Keyring
from peer.settings import AgentSettings
from tests.peer.inprocess import MemoryStore


async def _no_delegate(role: str, request: str) -> str:
    return f"delegated {role}: {request}"


async def _no_spawn(role: str, system: str, model: str) -> str:
    return f"spawned {role} on {model}"


@pytest.fixture(params=["openat2", "walk"])
def opener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with `openat2` (where the kernel has it) and with the component walk."""
    if request.param == "walk":
        monkeypatch.setattr(jail.OPENAT2, "available", False)
    elif not jail.OPENAT2.available:
        pytest.skip("no openat2 here")
    return str(request.param)


async def test_a_hard_link_to_a_file_outside_is_not_read(tmp_path: Path, opener: str) -> None:
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    (workspace / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("the operator's secret")
    os.link(outside / "secret", workspace / "sub" / "notes.txt")  # made by a local user
    box, ctx = Toolbox.load(["read_file"]), ToolContext(workspace, _no_delegate, _no_spawn)
    before = jail.refusals_in(workspace)["read", "hard_link"]

    result = await box.call("read_file", {"path": "sub/notes.txt"}, ctx)

    assert result.startswith("error: ValueError: 'sub/notes.txt' has 2 hard links")
    assert "not read" in result and "secret" not in result.replace("'sub/notes.txt'", "")
    assert jail.refusals_in(workspace)["read", "hard_link"] == before + 1
    # Once the other name is gone the file has one name and is read as before.
    (outside / "secret").unlink()
    assert await box.call("read_file", {"path": "sub/notes.txt"}, ctx) == "the operator's secret"
    assert jail.refusals_in(workspace)["read", "hard_link"] == before + 1


def test_two_names_inside_the_workspace_are_not_read_either(tmp_path: Path, opener: str) -> None:
    (tmp_path / "a.txt").write_text("one")
    os.link(tmp_path / "a.txt", tmp_path / "b.txt")
    for name in ("a.txt", "b.txt"):
        with pytest.raises(ValueError, match="hard links") as refused:
            jail.read_beneath(tmp_path, name, 1024)
        assert type(refused.value) is ValueError  # the tool shows "ValueError: ..."


def test_refusals_are_counted_by_operation_and_reason_per_workspace(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "big").write_bytes(b"x" * 2048)
    os.symlink("/etc/hostname", one / "out")
    for path in ("/etc/passwd", "../x", "big", "out"):
        with pytest.raises(ValueError):
            jail.read_beneath(one, path, 1024)
    with pytest.raises(ValueError):
        jail.write_beneath(one, "out", b"no")
    counted = jail.refusals_in(one)
    assert counted == {
        ("read", "bad_path"): 2,
        ("read", "too_large"): 1,
        ("read", "link"): 1,
        ("write", "link"): 1,
    }
    assert jail.refusals_in(two) == {}  # another workspace counts apart


async def test_the_peers_metrics_export_the_refusals() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        settings = AgentSettings(
            bind="127.0.0.1:0",
            data_dir=Path(scratch),
            profile="local",
            agents=(AgentSpec("writer", ("section",)),),
        )
        async with build_peer(settings, keyring=Keyring(bytes(32)), store=MemoryStore()) as peer:
            assert peer.host is not None
            workspace = peer.host.workspace
            (workspace / "a.txt").write_text("one")
            os.link(workspace / "a.txt", workspace / "b.txt")
            ctx = ToolContext(workspace, _no_delegate, _no_spawn)
            result = await Toolbox.load(["read_file"]).call("read_file", {"path": "b.txt"}, ctx)
            assert result.startswith("error: ValueError: 'b.txt' has 2 hard links")
            body = peer.metrics.exposition().decode()

    samples = {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        if family.name == "grapevine_workspace_refusals"
        for s in family.samples
    }
    assert len(samples) == 2 * len(jail.JAIL_REFUSALS)  # every label pair, zeros included
    assert samples[(("operation", "read"), ("reason", "hard_link"))] == 1
    assert samples[(("operation", "write"), ("reason", "hard_link"))] == 0
