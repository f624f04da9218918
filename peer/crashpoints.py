"""Named crash points: a test facility that kills the agent at a chosen step.

The agent calls :func:`crash_point` with a name at every step where power loss or a
``kill -9`` matters (after each chunk is written, mid apply, before and after each
fsync and rename, around the boot-control write and the health check, before the
report). Two environment variables, read once when this module is imported, turn it on:

- ``SWARMOTA_CRASH_AT=name[:nth]``: the process kills itself with SIGKILL the ``nth``
  time (default 1) it passes the point ``name``; nothing is flushed or cleaned up, as
  after a power cut that spares the page cache.
- ``SWARMOTA_CRASH_TRACE=file``: every point passed is appended to ``file``, one name a
  line (how a test enumerates the points of a clean update).
- ``SWARMOTA_CRASH_ACTION=hang``: instead of dying, the process writes
  ``SWARMOTA-CRASH-POINT <name>`` to stderr and blocks there, so that a test can cut the
  power of the whole machine at that instant (the qemu test kills the VM).

With neither set (production), :func:`crash_point` returns at once: one global lookup
and a comparison. :func:`fsio_hook` adapts a prefix to the hook parameter of
``infra.fsio`` (which knows nothing of crash points), so the atomic writes of the
journal, boot control and slots expose ``<prefix>.before_fsync``, ``.after_fsync``,
``.before_rename``, ``.after_rename``, ``.after_dir_fsync``.

Never set these variables on a real device.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

__all__ = [
    "CRASH_ACTION_ENV",
    "CRASH_AT_ENV",
    "CRASH_TRACE_ENV",
    "CrashPlan",
    "configure",
    "crash_point",
    "fsio_hook",
    "parse_crash_at",
]

CRASH_AT_ENV = "SWARMOTA_CRASH_AT"
CRASH_TRACE_ENV = "SWARMOTA_CRASH_TRACE"
CRASH_ACTION_ENV = "SWARMOTA_CRASH_ACTION"


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hang(name: str) -> None:
    os.write(2, f"SWARMOTA-CRASH-POINT {name}\n".encode())
    while True:  # until the power is cut
        time.sleep(3600)


def parse_crash_at(value: str) -> tuple[str, int]:
    """``"name"`` or ``"name:nth"`` -> ``(name, nth)``; raises ``ValueError``."""
    name, sep, nth = value.strip().rpartition(":")
    if not sep:
        name, nth = value.strip(), "1"
    if not name or not nth.isdigit() or int(nth) < 1:
        raise ValueError(f"{CRASH_AT_ENV} must be NAME or NAME:N (N >= 1), got {value!r}")
    return name, int(nth)


@dataclass
class CrashPlan:
    """Where to crash and where to trace; counts passes per name (thread-safe)."""

    crash_at: tuple[str, int] | None
    trace_path: str | None
    kill: Callable[[], None] = field(default=_kill)
    _passed: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def passed(self, name: str) -> None:
        with self._lock:
            count = self._passed.get(name, 0) + 1
            self._passed[name] = count
            if self.trace_path is not None:
                fd = os.open(self.trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{name}\n".encode())
                finally:
                    os.close(fd)
            if self.crash_at == (name, count):
                self.kill()


_plan: CrashPlan | None = None


def configure(environ: Mapping[str, str] | None = None) -> CrashPlan | None:
    """(Re)read the two variables from ``environ`` (default ``os.environ``); returns
    the active plan, ``None`` when neither is set. Raises ``ValueError`` on a bad
    ``SWARMOTA_CRASH_AT``."""
    global _plan
    env = os.environ if environ is None else environ
    at, trace = env.get(CRASH_AT_ENV), env.get(CRASH_TRACE_ENV)
    _plan = None
    if at or trace:
        _plan = CrashPlan(parse_crash_at(at) if at else None, trace or None)
        if at and env.get(CRASH_ACTION_ENV) == "hang":
            _plan.kill = partial(_hang, at)
    return _plan


def crash_point(name: str) -> None:
    """Pass the crash point ``name``: trace it and die here if so configured."""
    if _plan is not None:
        _plan.passed(name)


def fsio_hook(prefix: str) -> Callable[[str], None] | None:
    """A hook for ``infra.fsio`` naming its steps ``<prefix>.<step>``; ``None`` (no
    overhead at all) when crash points are off."""
    if _plan is None:
        return None
    return lambda step: crash_point(f"{prefix}.{step}")


configure()
