"""``tracker rollout watch`` (tracker/watch.py): redraws in place on a terminal, prints
changes elsewhere, ends with the code of the phase reached, is bounded by --max-s, and
outlives a tracker that is briefly unreachable. A scripted sequence of rollout answers
and a fake clock; the real tracker is watched in tests/test_operator_cli.py."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from swarmota.tracker.errors import AdminApiError
from swarmota.tracker.watch import END_PHASES, EXIT_TIMEOUT, WatchConfig, exit_code_of, watch


class Script:
    """Answers one rollout phase per read (the last one repeats), raising the errors
    given in its place; a clock that the watch's sleeps move."""

    def __init__(self, *steps: str | Exception) -> None:
        self.steps = list(steps)
        self.reads = 0
        self.now = 0.0
        self.slept: list[float] = []

    def fetch(self) -> dict[str, Any]:
        step = self.steps[min(self.reads, len(self.steps) - 1)]
        self.reads += 1
        if isinstance(step, Exception):
            raise step
        return {"phase": step, "stage": "canary"}

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def run(self, config: WatchConfig, render: Callable[[Any], list[str]] | None = None
            ) -> tuple[int, str]:
        out = io.StringIO()
        code = watch(self.fetch, render or (lambda r: [f"phase {r['phase']}"]), out, config,
                     sleep=self.sleep, monotonic=lambda: self.now, clock=lambda: 0.0)
        return code, out.getvalue()


@pytest.mark.parametrize("phase", sorted(END_PHASES))
def test_the_watch_ends_with_the_code_of_the_phase_reached(phase: str) -> None:
    script = Script("active", "active", "paused", phase)
    code, out = script.run(WatchConfig(interval_s=2))
    assert code == END_PHASES[phase] and script.reads == 4 and script.slept == [2, 2, 2]
    frames = out.split("--- ")[1:]  # not a terminal: a frame per change only
    assert [f.splitlines()[1] for f in frames] == ["phase active", "phase paused",
                                                   f"phase {phase}"]
    assert "\x1b" not in out
    assert len(set(END_PHASES.values())) == len(END_PHASES)  # each says which


def test_on_a_terminal_each_frame_is_redrawn_in_place() -> None:
    code, out = Script("active", "active", "halted").run(WatchConfig(redraw=True, width=30),
                                                         lambda r: ["x" * 50, r["phase"]])
    assert code == 3
    frames = out.split("\x1b[4A\r\x1b[J")  # up over the last frame's 4 lines, clear
    assert len(frames) == 3
    assert all(line == "x" * 29 for f in frames for line in f.splitlines()[2:3])
    assert frames[-1].splitlines()[-1] == "halted"


def test_max_s_bounds_the_watch() -> None:
    script = Script("active")
    code, _ = script.run(WatchConfig(interval_s=2, max_s=5))
    assert code == EXIT_TIMEOUT and script.slept == [2, 2, 1] and script.now == 5


def test_until_phase_stops_at_a_phase_that_does_not_end_the_rollout() -> None:
    assert exit_code_of("active", {"active"}) == 0 and exit_code_of("active") is None
    code, _ = Script("scheduled", "active").run(WatchConfig(until_phases=frozenset({"active"})))
    assert code == 0


def test_an_unreachable_tracker_is_retried_and_an_error_answer_ends_the_watch() -> None:
    down = AdminApiError("cannot reach the tracker: connection refused", 0)
    code, out = Script("active", down, down, "completed").run(WatchConfig())
    assert code == 0 and out.count("cannot reach the tracker") == 2
    with pytest.raises(AdminApiError, match="HTTP 404"):
        Script(AdminApiError("HTTP 404: no rollout", 404)).run(WatchConfig())


def test_json_prints_one_line_per_change() -> None:
    code, out = Script("active", "active", "aborted").run(WatchConfig(as_json=True))
    assert code == 4
    assert [json.loads(line)["phase"] for line in out.splitlines()] == ["active", "aborted"]
