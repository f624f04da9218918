"""Time windows such as ``"02:00-05:00"`` or ``"sat,sun 10:00-16:00"`` (UTC). Pure.

The device's maintenance windows (``peer/install_policy.py``) and a rollout's advance
windows (``tracker/rollout.py``) share this syntax: ``[DAY,DAY ]HH:MM-HH:MM``, days
``mon`` .. ``sun``; an end before the start wraps midnight (the day is that of the
start); ``24:00`` ends at midnight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Window", "parse_window"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW_RE = re.compile(r"(?:(?P<days>[a-z]{3}(?:,[a-z]{3})*)\s+)?"
                        r"(?P<h1>\d\d):(?P<m1>\d\d)-(?P<h2>\d\d):(?P<m2>\d\d)")


@dataclass(frozen=True)
class Window:
    """Minutes of the day ``[start_min, end_min)`` (end < start wraps midnight) on
    ``days`` (0 = Monday; empty = every day, the day being that of the start)."""

    start_min: int
    end_min: int
    days: frozenset[int] = frozenset()

    def contains(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start_min <= self.end_min:
            return self.start_min <= minute < self.end_min and self._day(day)
        if minute >= self.start_min:
            return self._day(day)
        return minute < self.end_min and self._day((day - 1) % 7)

    def _day(self, day: int) -> bool:
        return not self.days or day in self.days


def parse_window(text: str) -> Window:
    """``"HH:MM-HH:MM"`` or ``"sat,sun HH:MM-HH:MM"`` (UTC); raises ``ValueError``."""
    match = _WINDOW_RE.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"window {text!r} is not [DAY,DAY ]HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(match[g]) for g in ("h1", "m1", "h2", "m2"))
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise ValueError(f"window {text!r}: no such time of day")
    days: frozenset[int] = frozenset()
    if match["days"]:
        names = match["days"].split(",")
        unknown = [d for d in names if d not in _DAYS]
        if unknown:
            raise ValueError(f"window {text!r}: unknown day {unknown[0]!r} (mon..sun)")
        days = frozenset(_DAYS.index(d) for d in names)
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ValueError(f"window {text!r} is empty")
    return Window(start, end, days)
