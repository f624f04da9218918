"""``swarmota tracker rollout watch``: a live view of one rollout until it ends.

The view is :func:`tracker.render.render_rollout` of the rollout, read again every
``interval_s``: phase, stage, counts per stage (offered, downloading, succeeded, failed,
rolled back, in flight), bytes from the origin and from peers, the halt reason and the
failing devices. On a terminal it is redrawn in place (cursor up, clear to the end of
the screen; lines cut to the terminal's width so the count of lines holds); elsewhere
(a pipe, a log file) a frame is printed, under a time stamp, only when it changed.
``--json`` prints the rollout's JSON, one line each time it changed.

The watch ends when the rollout reaches a phase of :data:`END_PHASES` (or one of
``until_phases``), with the exit code that phase has (:func:`exit_code_of`), or when
``max_s`` has passed (:data:`EXIT_TIMEOUT`). A tracker that cannot be reached (status 0)
is retried until then; an error answer (401, 404, ...) ends the watch with
:class:`~tracker.errors.AdminApiError`. Time and sleeping are passed in, so tests
control them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, TextIO

from swarmota.tracker.errors import AdminApiError
from swarmota.tracker.render import local_time, zone_name

__all__ = ["END_PHASES", "EXIT_TIMEOUT", "WatchConfig", "exit_code_of", "watch"]

END_PHASES: Final[Mapping[str, int]] = {"completed": 0, "halted": 3, "aborted": 4,
                                        "revoked": 5}
"""Phases that end a watch, and the exit code each gives."""
EXIT_TIMEOUT: Final = 6
"""The exit code when ``max_s`` passed before the rollout ended."""

Json = Mapping[str, Any]


@dataclass(frozen=True)
class WatchConfig:
    """``interval_s`` between reads; ``max_s``: give up after (``None``: never);
    ``until_phases``: phases that end the watch besides :data:`END_PHASES`;
    ``redraw``: redraw in place (a terminal) instead of printing changes; ``width``:
    the terminal's columns (lines are cut to it when redrawing); ``as_json``: print
    JSON lines."""

    interval_s: float = 2.0
    max_s: float | None = None
    until_phases: frozenset[str] = frozenset()
    redraw: bool = False
    width: int = 200
    as_json: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.interval_s <= 3600:
            raise ValueError("interval_s must be within (0, 3600]")
        if self.max_s is not None and self.max_s < 0:
            raise ValueError("max_s must not be negative")


def exit_code_of(phase: str, until_phases: Collection[str] = ()) -> int | None:
    """The exit code a watch ends with at ``phase``, ``None`` if it goes on."""
    if phase in END_PHASES:
        return END_PHASES[phase]
    return 0 if phase in until_phases else None


def watch(fetch: Callable[[], Json], render: Callable[[Json], list[str]], out: TextIO,
          config: WatchConfig, *, sleep: Callable[[float], None] = time.sleep,
          monotonic: Callable[[], float] = time.monotonic,
          clock: Callable[[], float] = time.time) -> int:
    """Show the rollout ``fetch`` reads, as ``render`` draws it, on ``out`` until it
    ends; the exit code (see the module docstring).

    Raises:
        AdminApiError: the tracker answered an error (not a transport failure).
    """
    start = monotonic()
    shown = 0
    last: tuple[str, ...] | None = None
    last_answer: Json | None = None
    while True:
        problem = ""
        try:
            answer: Json | None = fetch()
        except AdminApiError as exc:
            if exc.status != 0:
                raise
            answer, problem = None, f"{exc}; retrying"
        code = None if answer is None else exit_code_of(str(answer["phase"]),
                                                        config.until_phases)
        frame = list(render(answer)) if answer is not None else list(last or ())
        if problem:
            frame.append(problem)
        now = clock()
        if config.as_json:
            if answer is not None and answer != last_answer:
                out.write(json.dumps(answer, sort_keys=True) + "\n")
            elif problem:
                out.write(json.dumps({"error": problem}) + "\n")
        elif config.redraw:
            lines = [f"{local_time(now)} {zone_name()}: every {config.interval_s:g} s, "
                     "Ctrl-C to stop", "", *frame]
            lines = [line[:config.width - 1] for line in lines]
            if shown:
                out.write(f"\x1b[{shown}A\r\x1b[J")
            out.write("\n".join(lines) + "\n")
            shown = len(lines)
        elif tuple(frame) != last:
            out.write(f"--- {local_time(now)} {zone_name()}\n" + "\n".join(frame) + "\n")
        out.flush()
        if answer is not None:
            last, last_answer = tuple(frame), answer
        if code is not None:
            return code
        waited = monotonic() - start
        if config.max_s is not None and waited >= config.max_s:
            return EXIT_TIMEOUT
        pause = config.interval_s
        if config.max_s is not None:
            pause = min(pause, config.max_s - waited)
        sleep(max(pause, 0.0))
