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
(an emergency fix), not the battery or the network; so does a release a local client
asked to install now (``InstallNow``, ``peer.control``), and both ignore a local
client's postponement (``Postpone``). A deferred release is not an
attempt: nothing is downloaded, written or reported; the next poll asks again.
The free-space check always applies: the payload (delta or full) and the image must
fit besides ``reserve_bytes``, or the attempt fails with status 30 before any download.

:func:`decide` is pure (values in, decision out); :func:`load_policy` parses the file
strictly (unknown keys, wrong types and malformed windows are :class:`ConfigError`
naming the file and the key); :class:`PolicyPowerSource` reads the battery and charging
state from a file or a command (the pluggable :class:`PowerSource`).
"""

from __future__ import annotations

import subprocess
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from swarmota.infra.timewindows import Window, parse_window
from swarmota.peer.errors import ConfigError

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

_COMMAND_TIMEOUT_S = 5.0


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
           now_s: float, install_now: bool = False,
           postponed_until_s: float = 0.0) -> Decision:
    """Whether to start an attempt now (free space is checked separately, later).

    ``install_now``: a local client asked for this release now (``InstallNow``): like a
    critical release, it skips the windows, the delay and a postponement, never the
    battery or network rules. ``postponed_until_s``: a local client's ``Postpone``
    defers releases until then (seconds since the epoch), except critical ones.
    """
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
    if install_now:
        return Decision(True, "installed now on request")
    if postponed_until_s > now_s:
        return Decision(False, f"postponed on request: {postponed_until_s - now_s:.0f} s left")
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
