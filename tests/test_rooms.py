"""The rooms stay apart: no import cycles and no private name used outside its module.

The checker reads `protocol/`, `peer/` and `bootstrap/` with `ast` (nothing is imported), so
an import inside a function or under `if TYPE_CHECKING` counts like any other: a cycle hidden
in a lazy import is still a cycle a reader has to untangle.

A private name is one that starts with a single underscore. It is used outside its module when
- another project module imports it (`from peer.http.common import _parse`), or
- code reads it as an attribute of something other than `self` or `cls` and the module does
  not define that name itself (`opener._senders` outside the module that defines `_senders`).
The second rule is a reading of the code, not of its types, so it may name a method that
happens to share a name with one of the module's own: that is allowed on purpose.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "peer", "bootstrap")

PUBLIC_UNDERSCORE = frozenset(
    {"_replace", "_asdict", "_fields", "_make", "_value_", "_name_", "_SubParsersAction"}
)
"""Underscored names the standard library offers as its API: namedtuple's and enum's methods,
and argparse's `_SubParsersAction`, the only type of what `add_subparsers()` returns."""


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages under `root`."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` names, resolving relative imports."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """(imported project module, name taken from it or "") for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    yield submodule, ""
                elif source in modules:
                    yield source, alias.name


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (itself excluded)."""
    modules = _modules(root)
    return {
        name: {target for target, _ in _imports(name, path, modules) if target != name}
        for name, path in modules.items()
    }


def import_cycles(root: Path) -> list[list[str]]:
    """Every strongly connected group of two or more modules, each sorted (Tarjan's algorithm)."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for target in sorted(graph.get(name, ())):
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == name:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(groups)


def _own_names(tree: ast.Module) -> set[str]:
    """Every name the module defines or assigns anywhere (functions, classes, attributes)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


STDLIB_PUBLIC = {("os", "_exit")}
"""Standard library names that start with an underscore and are documented public API."""


def private_uses(root: Path) -> list[str]:
    """ "path:line: name" for every private name used outside the module that defines it."""
    modules = _modules(root)
    found: list[str] = []
    for name, path in modules.items():
        relative = path.relative_to(root)
        for source, taken in _imports(name, path, modules):
            if taken and _is_private(taken):
                found.append(f"{relative}: imports {source}.{taken}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = _own_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in STDLIB_PUBLIC:
                continue
            if node.attr not in own:
                found.append(f"{relative}:{node.lineno}: reads .{node.attr}")
    return sorted(found)


def test_no_import_cycles_among_project_modules() -> None:
    assert import_cycles(ROOT) == []


def test_no_private_name_is_used_outside_its_module() -> None:
    assert private_uses(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        target = tmp_path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"peer/a.py": "from peer.b import x\n", "peer/b.py": "x = 1\n"}, []),
        (
            {"peer/a.py": "from peer.b import x\n", "peer/b.py": "from peer.a import y\n"},
            [["peer.a", "peer.b"]],
        ),
        (
            {"peer/a.py": "def f():\n    from peer import b\n", "peer/b.py": "import peer.a\n"},
            [["peer.a", "peer.b"]],
        ),
        (
            {
                "peer/x/__init__.py": "",
                "peer/x/a.py": "from . import b\n",
                "peer/x/b.py": "from .c import z\n",
                "peer/x/c.py": "from peer.x.a import q\n",
            },
            [["peer.x.a", "peer.x.b", "peer.x.c"]],
        ),
    ],
)
def test_cycle_checker_finds_cycles(
    tmp_path: Path, files: dict[str, str], expected: list[list[str]]
) -> None:
    assert import_cycles(_tree(tmp_path, files)) == expected


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"peer/a.py": "from peer.b import _x\n", "peer/b.py": "_x = 1\n"},
            ["peer/a.py: imports peer.b._x"],
        ),
        ({"peer/a.py": "def f(o):\n    return o._senders\n"}, ["peer/a.py:2: reads ._senders"]),
        ({"peer/a.py": "class A:\n    def f(self):\n        return self._x\n"}, []),
        (
            {"peer/a.py": "class A:\n    _x = 1\n    def eq(self, o):\n        return o._x\n"},
            [],
        ),
        ({"peer/a.py": "def f(p):\n    return p._replace(a=1)\n"}, []),
        ({"peer/a.py": "from peer.b import __version__\n", "peer/b.py": ""}, []),
        ({"peer/a.py": "import os\nos._exit(0)\n"}, []),
        ({"peer/a.py": "import os\nos._wrap_close\n"}, ["peer/a.py:2: reads ._wrap_close"]),
    ],
)
def test_private_name_checker(tmp_path: Path, files: dict[str, str], expected: list[str]) -> None:
    assert private_uses(_tree(tmp_path, files)) == expected
