"""`protocol/` stays pure: no I/O, clocks, randomness sources or host packages (docs/design.md §1).

The checker walks every module's imports with `ast`, so a forbidden import fails the suite even
if it sits inside a function or under `if TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "protocol"

FORBIDDEN = frozenset(
    {
        "asyncio",
        "aiohttp",
        "socket",
        "time",
        "random",
        "os",
        "litellm",
        "peer",
        "bootstrap",
        "sqlite3",
        "threading",
        "subprocess",
        "selectors",
        "signal",
    }
)
ALLOWED_IN_SIM = frozenset({"random"})
"""The simulator owns its seeded `random.Random`; the machines it runs receive it injected."""


def imported_top_levels(source: str) -> set[str]:
    """Top-level names of every absolute module imported by `source`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def purity_violations(root: Path) -> list[str]:
    """Return "path: module" for every forbidden import under the package directory `root`."""
    violations: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        allowed = ALLOWED_IN_SIM if relative.parts[0] == "sim" else frozenset()
        bad = (imported_top_levels(path.read_text(encoding="utf-8")) & FORBIDDEN) - allowed
        violations.extend(f"{relative}: {name}" for name in sorted(bad))
    return violations


def test_protocol_package_is_pure() -> None:
    assert PROTOCOL_DIR.is_dir()
    assert purity_violations(PROTOCOL_DIR) == []


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [
        ("machine.py", "import time\n", ["machine.py: time"]),
        ("machine.py", "import os.path\n", ["machine.py: os"]),
        ("machine.py", "from asyncio import sleep\n", ["machine.py: asyncio"]),
        ("machine.py", "from peer.runtime.driver import Driver\n", ["machine.py: peer"]),
        ("machine.py", "def f():\n    import socket\n", ["machine.py: socket"]),
        ("machine.py", "import random\n", ["machine.py: random"]),
        ("sim/net.py", "import random\n", []),
        ("sim/net.py", "import threading\n", ["sim/net.py: threading"]),
        ("machine.py", "from . import time\nimport hashlib, msgpack\n", []),
        ("machine.py", "from protocol.wire import Ping\n", []),
    ],
)
def test_checker_catches_violations(
    tmp_path: Path, relative: str, source: str, expected: list[str]
) -> None:
    (tmp_path / "__init__.py").write_text('"""A pure package."""\n')
    target = tmp_path / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    assert purity_violations(tmp_path) == expected
