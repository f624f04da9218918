"""Install policy: may this device download and install an offered release now?

Read from ``STATE/policy.toml`` (optional; without it everything is allowed):

```toml
[schedule]
windows = ["02:00-05:00", "sat,sun 10:00-16:00"]  # UTC; "22:00-04:00" wraps midnight
delay_s = 86400            # install a release only this long after it was first offered

[power]
min_battery_percent = 30   # below it, only while charging
battery_file = "/sys/class/power_supply/BAT0/capacity"   # or battery_command = [...]
charging_file = "/sys/class/power_supply/AC/online"      # or charging_command = [...]

[network]
download_when_metered = false   # default true; the device's network_metered setting
                                #   says when the network is metered

[storage]
reserve_bytes = 0          # free space to leave besides the payload and the new image
```

A release whose signed manifest says ``critical`` ignores the windows and the delay
(an emergency fix), not the battery or the network. A deferred release is not an
attempt: nothing is downloaded, written or reported; the next poll asks again.
The free-space check always applies: the payload (delta or full) and the image must
fit besides ``reserve_bytes``, or the attempt fails with status 30 before any download.

:func:`decide` is pure (values in, decision out); :func:`load_policy` parses the file
strictly (unknown keys, wrong types and malformed windows are :class:`ConfigError`
naming the file and the key); :class:`PolicyPowerSource` reads the battery and charging
state from a file or a command (the pluggable :class:`PowerSource`).
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from peer.errors import ConfigError

__all__ = [
    "Decision",
    "InstallPolicy",
    "PolicyPowerSource",
    "PowerReading",
    "PowerSource",
    "Window",
    "decide",
    "load_policy",
    "parse_window",
]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW_RE = re.compile(r"(?:(?P<days>[a-z]{3}(?:,[a-z]{3})*)\s+)?"
                        r"(?P<h1>\d\d):(?P<m1>\d\d)-(?P<h2>\d\d):(?P<m2>\d\d)")
_COMMAND_TIMEOUT_S = 5.0


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


@dataclass(frozen=True)
class InstallPolicy:
    windows: tuple[Window, ...] = ()
    delay_s: float = 0.0
    min_battery_percent: int = 0
    battery_file: str | None = None
    battery_command: tuple[str, ...] = ()
    charging_file: str | None = None
    charging_command: tuple[str, ...] = ()
    download_when_metered: bool = True
    reserve_bytes: int = 0


@dataclass(frozen=True)
class PowerReading:
    battery_percent: int | None  # None: unknown or no battery configured
    charging: bool | None


class PowerSource(Protocol):
    def read(self) -> PowerReading:
        """The battery and charging state now (blocking; call it in a worker thread)."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


def decide(policy: InstallPolicy, *, now: datetime, critical: bool, metered: bool,
           power: PowerReading | None, first_offered_at_s: float | None,
           now_s: float) -> Decision:
    """Whether to start an attempt now (free space is checked separately, later)."""
    if metered and not policy.download_when_metered:
        return Decision(False, "metered network")
    if policy.min_battery_percent:
        level = power.battery_percent if power else None
        charging = bool(power and power.charging)
        if not charging and (level is None or level < policy.min_battery_percent):
            shown = "unknown" if level is None else f"{level}%"
            return Decision(False, f"battery {shown}, below {policy.min_battery_percent}% "
                                   "and not charging")
    if critical:
        return Decision(True, "critical release")
    if policy.delay_s > 0:
        waited = 0.0 if first_offered_at_s is None else now_s - first_offered_at_s
        if waited < policy.delay_s:
            return Decision(False, f"install delay: {policy.delay_s - waited:.0f} s left")
    if policy.windows and not any(w.contains(now) for w in policy.windows):
        return Decision(False, "outside the maintenance windows")
    return Decision(True, "allowed")


def _reject_unknown(where: str, table: dict[str, Any], keys: Sequence[str]) -> None:
    extra = sorted(set(table) - set(keys))
    if extra:
        raise ValueError(f"[{where}]: unknown key {extra[0]!r} (known: {', '.join(keys)})")


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a table ([{name}])")
    return value


_MAX_DELAY_S = 10 * 365 * 86400


def _typed(table: dict[str, Any], where: str, key: str, kind: type | tuple[type, ...],
           default: Any) -> Any:
    value = table.get(key, default)
    if value is default:
        return value
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"[{where}] {key}: expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ValueError(f"[{where}] {key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                        "bool": "true or false", "list": "a list"}[k.__name__] for k in kinds)


def _command(table: dict[str, Any], where: str, key: str) -> tuple[str, ...]:
    value = _typed(table, where, key, list, [])
    if not all(isinstance(x, str) and x for x in value):
        raise ValueError(f"[{where}] {key}: expected a list of non-empty strings")
    return tuple(value)


def load_policy(path: Path) -> InstallPolicy:
    """Parse ``path`` (see the module docstring); a missing file is the default policy.

    Raises:
        ConfigError: unreadable, not TOML, unknown section or key, wrong type or range.
    """
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return InstallPolicy()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read policy {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"policy {path} is not valid TOML: {exc}") from None
    try:
        _reject_unknown("top level", doc, ("schedule", "power", "network", "storage"))
        schedule, power = _table(doc, "schedule"), _table(doc, "power")
        network, storage = _table(doc, "network"), _table(doc, "storage")
        _reject_unknown("schedule", schedule, ("windows", "delay_s"))
        _reject_unknown("power", power, ("min_battery_percent", "battery_file",
                                         "battery_command", "charging_file",
                                         "charging_command"))
        _reject_unknown("network", network, ("download_when_metered",))
        _reject_unknown("storage", storage, ("reserve_bytes",))
        windows_raw = _typed(schedule, "schedule", "windows", list, [])
        if not all(isinstance(w, str) for w in windows_raw):
            raise ValueError("[schedule] windows: expected a list of strings")
        windows = tuple(parse_window(w) for w in windows_raw)
        delay_raw = _typed(schedule, "schedule", "delay_s", (int, float), 0)
        battery = int(_typed(power, "power", "min_battery_percent", int, 0))
        reserve = int(_typed(storage, "storage", "reserve_bytes", int, 0))
        # (a 400-digit delay_s would overflow float(); inf and nan are no delays either)
        if not 0 <= delay_raw <= _MAX_DELAY_S or reserve < 0:
            raise ValueError("delay_s and reserve_bytes must be >= 0 (and delay_s a finite "
                             f"number of at most {_MAX_DELAY_S} s)")
        delay = float(delay_raw)
        if not 0 <= battery <= 100:
            raise ValueError("[power] min_battery_percent must be within 0..100")
        policy = InstallPolicy(
            windows=windows, delay_s=delay, min_battery_percent=battery,
            battery_file=_typed(power, "power", "battery_file", str, None),
            battery_command=_command(power, "power", "battery_command"),
            charging_file=_typed(power, "power", "charging_file", str, None),
            charging_command=_command(power, "power", "charging_command"),
            download_when_metered=_typed(network, "network", "download_when_metered", bool,
                                         True),
            reserve_bytes=reserve)
        if policy.battery_file and policy.battery_command:
            raise ValueError("[power]: battery_file and battery_command are exclusive")
        if policy.charging_file and policy.charging_command:
            raise ValueError("[power]: charging_file and charging_command are exclusive")
        if battery and not (policy.battery_file or policy.battery_command):
            raise ValueError("[power] min_battery_percent needs battery_file or "
                             "battery_command")
    except ValueError as exc:
        raise ConfigError(f"policy {path}: {exc}") from None
    return policy


class PolicyPowerSource:
    """Battery and charging state from the files or commands the policy names: a file
    holds a number (a percentage; for charging, 0 or 1), a command prints one. Anything
    unreadable counts as unknown."""

    def __init__(self, policy: InstallPolicy) -> None:
        self.policy = policy

    def read(self) -> PowerReading:
        p = self.policy
        level = _number(p.battery_file, p.battery_command)
        charging = _number(p.charging_file, p.charging_command)
        return PowerReading(level, None if charging is None else charging > 0)


def _number(file: str | None, command: tuple[str, ...]) -> int | None:
    try:
        if file:
            text = Path(file).read_text()
        elif command:
            text = subprocess.run(list(command), capture_output=True, text=True, check=True,
                                  timeout=_COMMAND_TIMEOUT_S).stdout
        else:
            return None
        return int(text.strip().rstrip("%"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
