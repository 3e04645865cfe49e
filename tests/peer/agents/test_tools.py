"""Tools: schemas from signatures, the workspace jail, import-path tools, errors."""

from __future__ import annotations

import os
import textwrap
import threading
from pathlib import Path

import pytest

from peer.agents import jail
from peer.agents.jail import relative_parts
from peer.agents.tools import MAX_FILE, Toolbox, ToolContext, describe


async def _no_delegate(role: str, request: str) -> str:
    return f"delegated {role}: {request}"


async def _no_spawn(role: str, system: str, model: str) -> str:
    return f"spawned {role} on {model}"


def _context(workspace: Path) -> ToolContext:
    return ToolContext(workspace, _no_delegate, _no_spawn)


@pytest.fixture
def tools_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "mytools.py").write_text(
        textwrap.dedent(
            '''
            import asyncio
            import socket


            def add(a: int, b: float = 1.5, tags: list[str] | None = None) -> float:
                """Add two numbers.

                Args:
                    a: the first.
                    b: the second.
                """
                return a + b


            def words(text: str, upper: bool, keep: list[str]) -> dict:
                """Split text."""
                out = [w.upper() if upper else w for w in text.split() if w in keep]
                return {"words": out}


            async def slow(text: str) -> str:
                await asyncio.sleep(0)
                return text[::-1]


            def broken(text: str) -> str:
                raise RuntimeError("disk on fire")


            def untyped(x):
                return x


            def opaque(sock: socket.socket) -> str:
                return "no JSON schema describes a socket"


            NOT_CALLABLE = 3
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "mytools"


def test_builtin_schemas() -> None:
    box = Toolbox.load(["delegate", "spawn_agent", "read_file", "write_file", "final_answer"])
    by_name = {s["function"]["name"]: s for s in box.schemas}
    assert list(by_name) == ["delegate", "spawn_agent", "read_file", "write_file", "final_answer"]
    delegate = by_name["delegate"]
    assert delegate["type"] == "function"
    function = delegate["function"]
    assert function["description"].startswith("Give part of the work to an agent")
    assert function["parameters"] == {
        "type": "object",
        "properties": {
            "role": {
                "type": "string",
                "description": 'the role that should do it, e.g. "researcher".',
            },
            "request": {
                "type": "string",
                "description": "what it should do, self-contained: "
                "it sees nothing else of this task.",
            },
        },
        "required": ["role", "request"],
    }
    assert by_name["write_file"]["function"]["parameters"]["required"] == ["path", "content"]
    assert "context" not in str(box.schemas)


def test_import_path_tool_schema(tools_module: str) -> None:
    box = Toolbox.load([f"{tools_module}:words"])
    (schema,) = box.schemas
    assert schema["function"]["name"] == "words"
    assert schema["function"]["description"] == "Split text."
    assert schema["function"]["parameters"]["properties"] == {
        "text": {"type": "string"},
        "upper": {"type": "boolean"},
        "keep": {"type": "array", "items": {"type": "string"}},
    }


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:f", "tool 'no_such_module_xyz:f': cannot import no_such_module_xyz"),
        ("{m}:missing", "has no function 'missing'"),
        ("{m}:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
        ("{m}:untyped", "parameter 'x' must be annotated with a type pydantic can describe"),
        ("{m}:opaque", "parameter 'sock': <class 'socket.socket'> has no JSON schema"),
        ("shell", "tool 'shell': neither a built-in"),
    ],
)
def test_load_errors_name_the_tool(tools_module: str, name: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Toolbox.load([name.format(m=tools_module)])
    assert message in str(info.value)


def test_duplicate_tool_names() -> None:
    with pytest.raises(ValueError, match="already named 'final_answer'"):
        Toolbox.load(["final_answer", "peer.agents.tools:final_answer"])


async def test_calls_sync_async_and_errors(tools_module: str, tmp_path: Path) -> None:
    box = Toolbox.load([f"{tools_module}:words", f"{tools_module}:slow", f"{tools_module}:broken"])
    ctx = _context(tmp_path)
    assert await box.call("slow", {"text": "abc"}, ctx) == "cba"
    result = await box.call("words", {"text": "a b c", "upper": True, "keep": ["a", "c"]}, ctx)
    assert result == '{"words": ["A", "C"]}'
    assert await box.call("broken", {"text": "x"}, ctx) == "error: RuntimeError: disk on fire"
    assert (await box.call("nope", {}, ctx)).startswith("error: there is no tool 'nope'")
    assert await box.call("slow", {}, ctx) == "error: slow: missing argument(s) text"
    assert await box.call("slow", {"text": "a", "x": 1}, ctx) == (
        "error: slow: unknown argument(s) x"
    )
    assert await box.call("slow", {"text": 5}, ctx) == (
        "error: slow: argument 'text' must be string, got int"
    )
    assert "must be boolean" in await box.call("words", {"text": "a", "upper": 1, "keep": []}, ctx)
    assert await box.call("words", {"text": "a", "upper": True, "keep": [1]}, ctx) == (
        "error: words: argument 'keep[0]' must be string, got int"
    )


async def test_int_accepted_for_float(tmp_path: Path) -> None:
    def scale(x: float) -> float:
        """Scale."""
        return x * 2

    box = Toolbox([describe("scale", scale)])
    assert await box.call("scale", {"x": 2}, _context(tmp_path)) == "4.0"


async def test_context_tools(tmp_path: Path) -> None:
    box = Toolbox.load(["delegate", "spawn_agent", "final_answer"])
    ctx = _context(tmp_path)
    assert await box.call("delegate", {"role": "r", "request": "q"}, ctx) == "delegated r: q"
    assert (
        await box.call("spawn_agent", {"role": "r", "system": "s", "model": "m"}, ctx)
        == "spawned r on m"
    )
    assert await box.call("final_answer", {"answer": "42"}, ctx) == "42"


async def test_read_write_in_the_workspace(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    box = Toolbox.load(["read_file", "write_file"])
    ctx = _context(workspace)
    result = await box.call("write_file", {"path": "a/b/c.txt", "content": "héllo"}, ctx)
    assert result == "wrote 6 bytes to a/b/c.txt"
    assert (workspace / "a" / "b" / "c.txt").read_text() == "héllo"
    assert await box.call("read_file", {"path": "a/b/c.txt"}, ctx) == "héllo"
    assert await box.call("read_file", {"path": "./a/b/../b/c.txt"}, ctx) == (
        "error: ValueError: './a/b/../b/c.txt' contains '..'; the workspace is the limit"
    )
    missing = await box.call("read_file", {"path": "none.txt"}, ctx)
    assert missing.startswith("error: FileNotFoundError")


async def test_size_cap(tmp_path: Path) -> None:
    box = Toolbox.load(["read_file", "write_file"])
    ctx = _context(tmp_path)
    big = "x" * (MAX_FILE + 1)
    assert "KiB limit" in await box.call("write_file", {"path": "big", "content": big}, ctx)
    assert not (tmp_path / "big").exists()
    (tmp_path / "big").write_text(big)
    assert "KiB limit" in await box.call("read_file", {"path": "big"}, ctx)


@pytest.fixture(params=["openat2", "walk"])
def opener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each jail test runs with `openat2` (where the kernel has it) and with the walk."""
    if request.param == "walk":
        monkeypatch.setattr(jail.OPENAT2, "available", False)
    elif not jail.OPENAT2.available:
        pytest.skip("no openat2 here")
    return str(request.param)


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "", ".", "a/..\\..\\x"])
def test_jail_refuses(tmp_path: Path, path: str) -> None:
    with pytest.raises(ValueError):
        relative_parts(path)


async def test_jail_refuses_symlinks_out(tmp_path: Path, opener: str) -> None:
    workspace = tmp_path / "ws"
    outside = tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s3cret")
    os.symlink(outside, workspace / "link")
    os.symlink(outside / "secret", workspace / "secret")
    os.symlink("inner.txt", workspace / "ok")
    (workspace / "inner.txt").write_text("fine")
    box = Toolbox.load(["read_file", "write_file"])
    ctx = _context(workspace)
    for path in ("link/secret", "secret"):
        assert "leads outside the workspace" in await box.call("read_file", {"path": path}, ctx)
    result = await box.call("write_file", {"path": "link/new.txt", "content": "x"}, ctx)
    assert "leads outside the workspace" in result and not (outside / "new.txt").exists()
    assert await box.call("write_file", {"path": "secret", "content": "x"}, ctx) != "wrote"
    assert (outside / "secret").read_text() == "s3cret"
    # No link is followed, even one that stays inside the workspace.
    assert "through a symbolic link" in await box.call("read_file", {"path": "ok"}, ctx)
    assert await box.call("read_file", {"path": "inner.txt"}, ctx) == "fine"
    assert relative_parts("sub/new.txt") == ("sub", "new.txt")


def _outside_and_workspace(tmp_path: Path) -> tuple[Path, Path]:
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    (workspace / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("s3cret")
    (workspace / "sub" / "secret").write_text("inside")
    return workspace, outside


def _swap_after_validation(
    monkeypatch: pytest.MonkeyPatch, workspace: Path, outside: Path
) -> list[str]:
    """Once a path is validated, replace the workspace's "sub" by a link to `outside`, as
    a racing process would between a check and the open."""
    validated: list[str] = []
    check = jail.relative_parts

    def check_then_swap(path: str) -> tuple[str, ...]:
        parts = check(path)
        validated.append(path)
        (workspace / "sub").rename(workspace / "old-sub")
        os.symlink(outside, workspace / "sub")
        return parts

    monkeypatch.setattr(jail, "relative_parts", check_then_swap)
    return validated


async def test_a_link_swapped_in_after_validation_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opener: str
) -> None:
    workspace, outside = _outside_and_workspace(tmp_path)
    validated = _swap_after_validation(monkeypatch, workspace, outside)
    result = await Toolbox.load(["read_file"]).call(
        "read_file", {"path": "sub/secret"}, _context(workspace)
    )
    assert validated == ["sub/secret"] and (workspace / "sub").is_symlink()
    assert "s3cret" not in result and "through a symbolic link" in result


async def test_a_link_swapped_in_after_validation_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opener: str
) -> None:
    workspace, outside = _outside_and_workspace(tmp_path)
    validated = _swap_after_validation(monkeypatch, workspace, outside)
    result = await Toolbox.load(["write_file"]).call(
        "write_file", {"path": "sub/secret", "content": "pwned"}, _context(workspace)
    )
    assert validated == ["sub/secret"] and "through a symbolic link" in result
    assert (outside / "secret").read_text() == "s3cret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


async def test_a_link_flipping_during_reads_never_leaks(tmp_path: Path, opener: str) -> None:
    """A racing process flips "sub" between a directory and a link out while reads run."""
    workspace, outside = _outside_and_workspace(tmp_path)
    (workspace / "real").mkdir()
    (workspace / "real" / "secret").write_text("inside")
    box, ctx = Toolbox.load(["read_file"]), _context(workspace)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            for target in (outside, workspace / "real"):
                os.symlink(target, workspace / "next")
                os.replace(workspace / "next", workspace / "sub")

    (workspace / "sub" / "secret").unlink()
    (workspace / "sub").rmdir()
    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        results = [await box.call("read_file", {"path": "sub/secret"}, ctx) for _ in range(300)]
    finally:
        stop.set()
        flipper.join()
    assert not any("s3cret" in result for result in results)


async def test_only_regular_files(tmp_path: Path, opener: str) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dir").mkdir()
    box, ctx = Toolbox.load(["read_file", "write_file"]), _context(tmp_path)
    assert "not a regular file" in await box.call("read_file", {"path": "pipe"}, ctx)
    assert "not a regular file" in await box.call("read_file", {"path": "dir"}, ctx)
    written = await box.call("write_file", {"path": "dir", "content": "x"}, ctx)
    assert written.startswith("error:")
    assert await box.call("write_file", {"path": "a.txt/b", "content": "x"}, ctx) != "wrote"
