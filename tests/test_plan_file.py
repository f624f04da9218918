"""Rollout plans from TOML plan files and flags (tracker/plan_file.py, pure), and the
plan options of the command line (tracker/client_cli.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import re
from pathlib import Path

import pytest

from swarmota.tracker.client_cli import PLAN_FLAGS, add_plan_options, plan_from_args
from swarmota.tracker.errors import RequestError
from swarmota.tracker.plan_file import PLAN_KEYS, build_plan, parse_plan_file, parse_time
from swarmota.tracker.rollout import RolloutPlan

PARIS_SUMMER = dt.timezone(dt.timedelta(hours=2), "CEST")

FULL = b"""
canary_devices = ["dev-1", "dev-2"]
canary_label = "canary-eu"
stages_percent = [5, 25, 100]
soak_s = 7200
min_successes = 20
min_success_rate = 0.9
canary_halt_failure_count = 2
halt_min_sample = 30
halt_failure_rate = 0.1
halt_failure_count = 50
max_in_flight = 200
in_flight_timeout_s = 1800
retry_rolled_back = true
start_at = 2025-06-02T09:00:00
advance_windows = ["mon,tue,wed,thu 07:00-15:00"]
"""


def test_a_plan_file_sets_every_threshold_and_a_local_start_time() -> None:
    fields = parse_plan_file(FULL, "plan.toml", tz=PARIS_SUMMER)
    plan = build_plan(fields, {}, source="plan.toml")
    assert plan == RolloutPlan(
        canary_devices=("dev-1", "dev-2"), canary_label="canary-eu",
        stages_percent=(5, 25, 100), soak_s=7200, min_successes=20, min_success_rate=0.9,
        canary_halt_failure_count=2, halt_min_sample=30, halt_failure_rate=0.1,
        halt_failure_count=50, max_in_flight=200, in_flight_timeout_s=1800,
        retry_rolled_back=True,
        start_at=dt.datetime(2025, 6, 2, 7, 0, tzinfo=dt.UTC).timestamp(),
        advance_windows=("mon,tue,wed,thu 07:00-15:00",))
    assert set(fields) == set(PLAN_KEYS)  # the example covers every field


@pytest.mark.parametrize("value", ["2025-06-02T07:00:00Z", "2025-06-02T09:00:00+02:00",
                                   '"2025-06-02T07:00Z"', "1748847600"])
def test_start_at_is_a_toml_datetime_an_iso_string_or_epoch_seconds(value: str) -> None:
    fields = parse_plan_file(f"start_at = {value}".encode(), "p.toml")
    assert fields["start_at"] == 1748847600.0


def test_flags_override_the_plan_file() -> None:
    fields = parse_plan_file(b"soak_s = 7200\ncanary_devices = ['dev-1']\n", "p.toml")
    plan = build_plan(fields, {"soak_s": 60.0, "halt_failure_rate": 0.2})
    assert (plan.soak_s, plan.canary_devices, plan.halt_failure_rate) == (60.0, ("dev-1",),
                                                                         0.2)


@pytest.mark.parametrize("text, words", [
    (b"soak = 10", "p.toml: unknown key 'soak'; a plan file takes canary_devices"),
    (b"soak_s = 'long'", "p.toml: key 'soak_s': expected a number, got 'long'"),
    (b"min_successes = 2.5", "p.toml: key 'min_successes': expected a whole number"),
    (b"halt_failure_rate = 5", "p.toml: key 'halt_failure_rate': halt_failure_rate must "
                               "be within 0..1"),
    (b"stages_percent = [50, 10, 100]", "p.toml: key 'stages_percent': stages_percent "
                                        "must increase"),
    (b"stages_percent = 100", "p.toml: key 'stages_percent': expected a list"),
    (b"canary_devices = ['dev 1']", "p.toml: key 'canary_devices': 'dev 1' is not a "
                                    "device id"),
    (b"retry_rolled_back = 1", "p.toml: key 'retry_rolled_back': expected true or false"),
    (b"start_at = 2025-06-02", "p.toml: key 'start_at': expected a date and time"),
    (b"start_at = 'tomorrow'", "p.toml: key 'start_at': 'tomorrow' is not an ISO 8601"),
    (b"advance_windows = ['09:00-25:00']", "p.toml: key 'advance_windows': "
                                           "advance_windows: window '09:00-25:00'"),
    (b"halt_failure_count = 0", "p.toml: key 'halt_failure_count': halt_failure_count "
                                "and canary_halt_failure_count must be at least 1"),
    (b"soak_s = [", "p.toml: not a valid TOML file"),
    (b"\xff = 1", "p.toml: not a valid TOML file"),
])
def test_a_bad_plan_file_is_refused_naming_the_file_and_the_key(text: bytes,
                                                                words: str) -> None:
    with pytest.raises(RequestError) as exc:
        parse_plan_file(text, "p.toml")
    assert words in str(exc.value)


def test_a_naive_time_is_local_and_a_zoned_one_is_not() -> None:
    assert parse_time("2025-06-02T09:00", "t", tz=PARIS_SUMMER) == \
        parse_time("2025-06-02T07:00Z", "t") == 1748847600.0
    with pytest.raises(RequestError, match="t: 'noon' is not an ISO 8601"):
        parse_time("noon", "t")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_plan_options(parser, registering=True)
    return parser


def test_every_plan_field_has_a_flag() -> None:
    assert set(PLAN_FLAGS) == set(PLAN_KEYS)
    text = _parser().format_help()
    assert all(flag in text for flag in PLAN_FLAGS.values())


def test_plan_options_build_the_plan(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text("canary_devices = ['dev-1']\nsoak_s = 7200\nhalt_min_sample = 5\n")
    args = _parser().parse_args([
        "--plan-file", str(plan_file), "--soak-s", "60", "--canary-max-failures", "2",
        "--halt-failure-rate", "10%", "--min-success-rate", "0.9", "--stages", "5,50,100",
        "--advance-window", "mon 08:00-12:00", "--advance-window", "tue 08:00-12:00",
        "--start-at", "2025-06-02T07:00Z", "--retry-rolled-back", "--max-in-flight", "20"])
    plan = plan_from_args(args)
    assert plan == RolloutPlan(
        canary_devices=("dev-1",), soak_s=60, halt_min_sample=5,
        canary_halt_failure_count=2, halt_failure_rate=0.1, min_success_rate=0.9,
        stages_percent=(5, 50, 100), advance_windows=("mon 08:00-12:00", "tue 08:00-12:00"),
        start_at=1748847600.0, retry_rolled_back=True, max_in_flight=20)
    assert plan_from_args(_parser().parse_args(["--no-rollout"])) is None
    everyone = plan_from_args(_parser().parse_args(["--everyone", "--halt-failure-count",
                                                    "3"]))
    assert everyone == RolloutPlan(stages_percent=(100.0,), min_successes=0, soak_s=0.0,
                                   halt_failure_count=3)


@pytest.mark.parametrize("argv, words", [
    (["--everyone", "--canary", "dev-1"], "--everyone offers the release to every device "
                                          "at once: it takes no --plan-file and no staging "
                                          "options (--canary)"),
    (["--no-rollout", "--soak-s", "5"], "--no-rollout starts no rollout"),
    (["--plan-file", "/nonexistent/plan.toml"], "cannot read plan file "
                                                "/nonexistent/plan.toml"),
])
def test_contradicting_plan_options_are_refused(argv: list[str], words: str) -> None:
    with pytest.raises(RequestError) as exc:
        plan_from_args(_parser().parse_args(argv))
    assert words in str(exc.value)


@pytest.mark.parametrize("argv", [["--stages", "10,5"], ["--halt-failure-rate", "7"],
                                  ["--start-at", "next week"], ["--canary", "-x"],
                                  ["--advance-window", "always"], ["--min-successes", "-1"]])
def test_bad_plan_flags_are_argument_errors(argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_the_plan_file_documented_for_operators_is_valid() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS-CLI.md").read_text()
    found = re.search(r"```toml\n(# plan\.toml.*?)```", text, re.S)
    assert found is not None
    plan = build_plan(parse_plan_file(found.group(1).encode(), "OPERATIONS-CLI.md"), {})
    assert plan.canary_devices == ("dev-1", "dev-2") and plan.stages_percent == (5, 25, 100)
    assert plan.start_at == dt.datetime(2025, 6, 2, 7, 0, tzinfo=dt.UTC).timestamp()
