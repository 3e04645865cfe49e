"""`grapevine simulate` argument handling: durations, one-line errors, deterministic JSON."""

from __future__ import annotations

import argparse
import json

import pytest

from peer.cli import simulate as simulate_cmd


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("12", 12.0), ("0.5", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert simulate_cmd.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-3s", "3 parsecs", "1e"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        simulate_cmd.parse_duration(text)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss", "2"], "--loss must be in [0, 1)"),
        (["--nodes", "0"], "--nodes must be at least 1"),
        (["--duplicate", "-0.1"], "--duplicate must be in [0, 1]"),
        (["--nodes", "3", "--crashes", "3"], "--crashes plus --pauses must be below --nodes"),
        (["--partition", "0s"], "--partition must be a positive duration"),
        (["--tasks", "-1"], "--tasks must not be negative"),
        (["--replication", "-1"], "--replication must not be negative"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert simulate_cmd.run(parse(*argv)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"grapevine simulate: {message}") and err.count("\n") == 1


def test_partition_extends_the_default_duration() -> None:
    params = simulate_cmd.params_from(parse("--partition", "30s"))
    assert params.partition == (simulate_cmd.PARTITION_AT, 30.0, 0.5)
    assert params.duration == simulate_cmd.PARTITION_AT + 30.0 + simulate_cmd.AFTER_HEAL


def test_json_differs_only_in_wall_time(capsys: pytest.CaptureFixture[str]) -> None:
    reports = []
    for _ in range(2):
        assert simulate_cmd.run(parse("--nodes", "12", "--crashes", "1", "--json")) == 0
        report = json.loads(capsys.readouterr().out)
        assert isinstance(report.pop("wall"), float)
        reports.append(report)
    assert reports[0] == reports[1]
    assert reports[0]["nodes"] == 12 and reports[0]["crash_detection_max_s"] is not None


def test_table_names_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate_cmd.main(["--nodes", "8", "--duration", "20s"]) == 0
    out = capsys.readouterr().out
    assert "false positives" in out and "wall time" in out and "reached 99.99% after" in out
