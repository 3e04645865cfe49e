"""`peer.version.installed_version` reads the version as `importlib.metadata` does, cheaply."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest

from peer import version


def test_it_agrees_with_importlib_metadata() -> None:
    assert version.installed_version() == metadata.version(version.DISTRIBUTION)


def test_the_first_path_entry_holding_the_distribution_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "first" / "grapevine_agents-9.1.dist-info").mkdir(parents=True)
    (tmp_path / "second" / "grapevine_agents-9.2.dist-info").mkdir(parents=True)
    (tmp_path / "file").write_text("not a directory")
    paths = [str(tmp_path / "missing"), str(tmp_path / "file"), str(tmp_path / "first")]
    monkeypatch.setattr(sys, "path", [*paths, str(tmp_path / "second")])
    assert version.installed_version() == "9.1"


def test_two_copies_in_one_place_are_left_to_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "grapevine_agents-9.1.dist-info").mkdir()
    (tmp_path / "grapevine_agents-9.2.dist-info").mkdir()
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(metadata, "version", lambda name: f"metadata's pick of {name}")
    assert version.installed_version() == "metadata's pick of grapevine-agents"


def test_nothing_installed_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert version.installed_version() == version.UNINSTALLED
