"""The workspace jail and hard links (issue 11, finding 8): a hard link inside the workspace to a
file outside it is never written through, as the agent's `write_file` tool meets it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peer.agents import jail
from peer.agents.tools import Toolbox, ToolContext


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


async def test_a_hard_link_to_a_file_outside_is_neither_truncated_nor_overwritten(
    tmp_path: Path, opener: str
) -> None:
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    (workspace / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    os.link(outside / "precious", workspace / "sub" / "notes.txt")  # made by a local user
    box, ctx = (
        Toolbox.load(["write_file", "read_file"]),
        ToolContext(workspace, _no_delegate, _no_spawn),
    )
    for content in ("", "pwned"):
        result = await box.call("write_file", {"path": "sub/notes.txt", "content": content}, ctx)
        assert result.startswith("error: ValueError: 'sub/notes.txt' has 2 hard links")
        assert (outside / "precious").read_text() == "keep me"
    # A file with one name is written as before, new or existing.
    (outside / "precious").unlink()
    assert os.stat(workspace / "sub" / "notes.txt").st_nlink == 1
    for path in ("sub/notes.txt", "sub/new.txt"):
        assert await box.call("write_file", {"path": path, "content": "ok"}, ctx) == (
            f"wrote 2 bytes to {path}"
        )
        assert await box.call("read_file", {"path": path}, ctx) == "ok"


def test_two_names_inside_the_workspace_are_refused_too(tmp_path: Path, opener: str) -> None:
    (tmp_path / "a.txt").write_text("one")
    os.link(tmp_path / "a.txt", tmp_path / "b.txt")
    with pytest.raises(ValueError, match="hard links"):
        jail.write_beneath(tmp_path, "b.txt", b"two")
    assert (tmp_path / "a.txt").read_text() == "one"
