"""`--task-retention`, `GRAPEVINE_TASK_RETENTION` and `[tasks] retention`: layering, the
duration forms, and one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.settings import SettingsError, load_settings, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("30s", 30.0),
        ("1.5m", 90.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        (" 10S ", 10.0),
        (45, 45.0),
        (0.5, 0.5),
    ],
)
def test_durations_are_seconds_or_a_number_with_a_unit(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "10x", "0", "-5m", "inf", "nan", "h", True, [1]])
def test_bad_durations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_the_default_is_a_day() -> None:
    assert load_settings({}, {}, None).task_retention == 86400.0


def test_flag_over_environment_over_config_file(tmp_path: Path) -> None:
    config = tmp_path / "peer.toml"
    config.write_text("[tasks]\nretention = '2h'\n")
    env = {"GRAPEVINE_TASK_RETENTION": "30m"}
    assert load_settings({}, {}, config).task_retention == 7200.0
    assert load_settings({}, env, config).task_retention == 1800.0
    assert load_settings({"task_retention": "45s"}, env, config).task_retention == 45.0
    config.write_text("[tasks]\nretention = 120\n")
    assert load_settings({}, {}, config).task_retention == 120.0


def test_bad_values_give_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as flag:
        load_settings({"task_retention": "soon"}, {}, None)
    assert str(flag.value) == (
        "task_retention from --task-retention: 'soon' is not a duration "
        "(seconds, or a number with s, m, h or d)"
    )
    with pytest.raises(SettingsError, match="from GRAPEVINE_TASK_RETENTION: '0s' must be a pos"):
        load_settings({}, {"GRAPEVINE_TASK_RETENTION": "0s"}, None)
    config = tmp_path / "peer.toml"
    config.write_text("[tasks]\nretention = '1w'\n")
    with pytest.raises(SettingsError, match=r"task_retention from .*peer.toml: '1w' is not"):
        load_settings({}, {}, config)
    config.write_text("[tasks]\nretain = '1h'\n")
    with pytest.raises(SettingsError, match=r"unknown key\(s\) retain in \[tasks\]"):
        load_settings({}, {}, config)
    config.write_text("tasks = 3\n")
    with pytest.raises(SettingsError, match=r"'tasks' must be a table"):
        load_settings({}, {}, config)


def test_the_tombstone_grace_follows_the_retention_unless_given(tmp_path: Path) -> None:
    assert load_settings({}, {}, None).tombstone_grace is None
    config = tmp_path / "peer.toml"
    config.write_text("[tasks]\nretention = '2h'\ntombstone_grace = '3d'\n")
    env = {"GRAPEVINE_TOMBSTONE_GRACE": "5h"}
    assert load_settings({}, {}, config).tombstone_grace == 3 * 86400.0
    assert load_settings({}, env, config).tombstone_grace == 5 * 3600.0
    assert load_settings({"tombstone_grace": "90s"}, env, config).tombstone_grace == 90.0
    with pytest.raises(SettingsError, match="tombstone_grace from --tombstone-grace: '0' must"):
        load_settings({"tombstone_grace": "0"}, {}, None)
