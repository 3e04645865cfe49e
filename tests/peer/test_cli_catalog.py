"""The catalog of `grapevine` commands agrees with the groups that register them, and a command
line imports only the group of the command it runs (`peer.cli.catalog`, issue 13)."""

from __future__ import annotations

import argparse

import pytest

from peer.cli import catalog
from peer.cli.main import build_parser
from tests.peer.test_cli_imports import run_probe

GROUPS = sorted({group for group, _ in catalog.COMMANDS.values()})


def top_commands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """The top-level commands in `--help` order: name -> (summary, parser)."""
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {action.dest: str(action.help) for action in group._choices_actions}
    return {name: (helps[name], sub) for name, sub in group.choices.items()}


def test_the_whole_parser_lists_the_catalog_in_order_with_its_summaries() -> None:
    commands = top_commands(build_parser())
    assert list(commands) == list(catalog.COMMANDS)
    assert {name: help for name, (help, _) in commands.items()} == {
        name: summary for name, (_, summary) in catalog.COMMANDS.items()
    }


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_registers_exactly_its_catalog_commands(group: str) -> None:
    # Running a command builds its group's parsers only: the other names would each cost one.
    commands = top_commands(build_parser({group}))
    own = [name for name, (g, _) in catalog.COMMANDS.items() if g == group]
    assert list(commands) == own
    assert all(sub.get_default("handler") for _, sub in commands.values())


def test_without_a_command_every_name_is_listed_and_none_is_built() -> None:
    # `grapevine --help` and a mistyped command: the list and "did you mean" need every name.
    commands = top_commands(build_parser(set()))
    assert list(commands) == list(catalog.COMMANDS)
    assert not any(sub.get_default("handler") for _, sub in commands.values())


def test_the_command_is_the_first_word() -> None:
    assert catalog.groups_for(["submit", "--role", "members", "x"]) == {"peer.cli.tasks"}
    assert catalog.groups_for(["keys", "list"]) == {"peer.cli.network"}
    assert catalog.groups_for(["--help"]) == set()
    assert catalog.groups_for(["--version", "members"]) == set()
    assert catalog.groups_for(["membrs"]) == set()
    assert catalog.groups_for([]) == set()


PROBE = """
import json, sys
from peer.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def groups_loaded(*argv: str) -> tuple[object, list[str]]:
    """Run `grapevine ARGV` in a fresh interpreter: its exit code and the groups it imported."""
    answer = run_probe(PROBE, *argv)
    modules = answer["modules"]
    assert isinstance(modules, list)
    return answer["code"], [group for group in GROUPS if group in modules]


def test_help_and_version_import_no_group() -> None:
    assert groups_loaded("--help") == (0, [])
    assert groups_loaded("--version") == (0, [])
    assert groups_loaded("membrs") == (2, [])


def test_a_command_imports_only_its_own_group() -> None:
    # Nothing listens on port 9 of 127.0.0.1: the command runs its client up to the connection.
    assert groups_loaded("members", "--api", "127.0.0.1:9") == (1, ["peer.cli.network"])
    assert groups_loaded("keygen", "--json") == (0, ["peer.cli.launch"])
    assert groups_loaded("simulate", "--nodes", "0") == (2, ["peer.cli.simulate"])
