"""Rollout plans from a TOML plan file and from command-line values. Pure.

A plan file holds :class:`~tracker.rollout.RolloutPlan` fields as top-level keys; a
key left out takes the plan's default (docs/OPERATIONS-CLI.md has the whole format)::

    canary_devices = ["dev-1", "dev-2"]
    canary_label = "canary-eu"
    stages_percent = [1, 10, 50, 100]
    soak_s = 7200
    min_successes = 10
    min_success_rate = 0.95
    canary_halt_failure_count = 1
    halt_min_sample = 10
    halt_failure_rate = 0.05
    halt_failure_count = 20
    max_in_flight = 200
    in_flight_timeout_s = 3600
    retry_rolled_back = false
    start_at = 2025-06-02T09:00:00+02:00
    advance_windows = ["mon,tue,wed,thu 07:00-15:00"]

``start_at`` is a TOML date-time (with an offset, or without one: local time), an ISO
8601 string (the same), or epoch seconds; ``advance_windows`` are UTC
(:mod:`infra.timewindows`).

:func:`parse_plan_file` turns a file's bytes into plan fields (a JSON-able dict, as the
admin API takes a plan), :func:`build_plan` lays command-line values over them and
validates the result. Every error is a :class:`~tracker.errors.RequestError` whose
message starts with the file and names the key.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Mapping
from typing import Any, Final

from swarmota.infra.ids import DEVICE_ID_RE
from swarmota.tracker.errors import RequestError
from swarmota.tracker.rollout import RolloutPlan

__all__ = ["MAX_PLAN_FILE_BYTES", "PLAN_KEYS", "build_plan", "parse_plan_file", "parse_time"]

MAX_PLAN_FILE_BYTES: Final = 1024 * 1024
PLAN_KEYS: Final = tuple(RolloutPlan().to_json())
"""The keys a plan file (and the admin API's plan object) may hold."""

_LISTS: Final = {"canary_devices": str, "stages_percent": float, "advance_windows": str}
_INTS: Final = ("min_successes", "halt_min_sample", "halt_failure_count",
                "canary_halt_failure_count", "max_in_flight")
_NUMBERS: Final = ("min_success_rate", "halt_failure_rate", "soak_s", "in_flight_timeout_s")


def parse_time(value: object, what: str, *, tz: dt.tzinfo | None = None) -> float:
    """Epoch seconds of ``value``: an ISO 8601 date-time string or a ``datetime`` (with
    an offset or ``Z``; without one it is local time, or ``tz``'s), or a number of
    epoch seconds. ``what`` names the value in errors.

    Raises:
        RequestError: anything else, e.g. a date without a time.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    when = value
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise RequestError(f"{what}: {value[:64]!r} is not an ISO 8601 date and time, "
                               "e.g. 2025-06-02T09:00 (local time) or "
                               "2025-06-02T07:00Z (UTC)") from None
    if not isinstance(when, dt.datetime):
        raise RequestError(f"{what}: expected a date and time (e.g. 2025-06-02T09:00 "
                           "local, 2025-06-02T07:00Z UTC), got "
                           f"{type(value).__name__} {str(value)[:64]!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=tz) if tz is not None else when.astimezone()
    return when.timestamp()


def parse_plan_file(data: bytes, source: str, *, tz: dt.tzinfo | None = None
                    ) -> dict[str, Any]:
    """The plan fields of a plan file (``source``: its name, for errors), each key
    checked on its own; ``start_at`` as epoch seconds (local times in ``tz``, default
    the local zone).

    Raises:
        RequestError: not UTF-8 TOML, too large, an unknown key, a value of the wrong
            type or out of range; the message starts with ``source`` and names the key.
    """
    if len(data) > MAX_PLAN_FILE_BYTES:
        raise RequestError(f"{source}: larger than {MAX_PLAN_FILE_BYTES} bytes: not a "
                           "plan file")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RequestError(f"{source}: not a valid TOML file: {exc}") from None
    fields: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in PLAN_KEYS:
            raise RequestError(f"{source}: unknown key {key!r}; a plan file takes "
                               f"{', '.join(PLAN_KEYS)}")
        fields[key] = _field(source, key, value, tz)
    return fields


def build_plan(base: Mapping[str, Any], overrides: Mapping[str, Any], *,
               source: str = "plan") -> RolloutPlan:
    """The plan of ``base`` (e.g. a plan file's fields) with ``overrides`` (e.g. the
    command line's) laid over it; missing fields take the defaults.

    Raises:
        RequestError: a bad value or combination; the message starts with ``source``.
    """
    merged = {**base, **overrides}
    for key, value in overrides.items():
        _check_alone(source, key, value)
    try:
        return RolloutPlan.from_json(merged)
    except RequestError as exc:
        raise RequestError(f"{source}: {_bare(exc)}") from None


def _field(source: str, key: str, value: object, tz: dt.tzinfo | None) -> Any:
    where = f"{source}: key {key!r}"
    if key == "start_at":
        return parse_time(value, where, tz=tz)
    if key in _LISTS:
        if not isinstance(value, list):
            raise RequestError(f"{where}: expected a list, e.g. {key} = [...]")
        item = _LISTS[key]
        for entry in value:
            ok = (isinstance(entry, int | float) and not isinstance(entry, bool)
                  if item is float else isinstance(entry, str))
            if not ok:
                raise RequestError(f"{where}: every entry must be a "
                                   f"{'number' if item is float else 'string'}, got "
                                   f"{str(entry)[:64]!r}")
            if key == "canary_devices" and not DEVICE_ID_RE.fullmatch(str(entry)):
                raise RequestError(f"{where}: {str(entry)[:64]!r} is not a device id")
    elif key in _INTS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(f"{where}: expected a whole number, got {str(value)[:64]!r}")
    elif key in _NUMBERS:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise RequestError(f"{where}: expected a number, got {str(value)[:64]!r}")
    elif key == "retry_rolled_back":
        if not isinstance(value, bool):
            raise RequestError(f"{where}: expected true or false")
    elif key == "canary_label" and not isinstance(value, str):
        raise RequestError(f"{where}: expected a string")
    _check_alone(source, key, value)
    return value


def _check_alone(source: str, key: str, value: object) -> None:
    """Validate one field with every other at its default, so that the error names it."""
    try:
        RolloutPlan.from_json({key: value})
    except RequestError as exc:
        raise RequestError(f"{source}: key {key!r}: {_bare(exc)}") from None
    except TypeError:  # a value of a type the plan cannot even compare
        raise RequestError(f"{source}: key {key!r}: a value of the wrong type") from None


def _bare(exc: RequestError) -> str:
    return str(exc).removeprefix("plan: ")
