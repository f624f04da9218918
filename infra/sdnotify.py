"""systemd service notifications (``sd_notify``): readiness, status and the watchdog.

Under systemd with ``Type=notify`` (and ``WatchdogSec=``), the service manager gives the
service ``NOTIFY_SOCKET`` (a unix datagram socket: a path, or ``@name`` in the abstract
namespace) and ``WATCHDOG_USEC``. A service sends ``READY=1`` once it serves (the
tracker and the origin once they listen, ``swarmota peer run`` once its D-Bus name is
owned, when it has one), ``STATUS=`` lines, ``WATCHDOG=1`` every half ``WATCHDOG_USEC``
from its event loop, and ``STOPPING=1`` on the way out. A loop blocked or deadlocked
stops the pings, and systemd restarts the service. ``WATCHDOG_PID``, when set, must be
this process.

Errors: sending never raises (a lost notification is logged); a malformed
``WATCHDOG_USEC`` is ignored with a warning.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

__all__ = ["SystemdNotifier", "service_ready", "service_stopping"]

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Notifications to the service manager at ``address``; ``watchdog_s``: the
    watchdog period (None: no watchdog)."""

    def __init__(self, address: str, watchdog_s: float | None) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = watchdog_s
        self.sent = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     pid: int | None = None) -> SystemdNotifier | None:
        """The notifier systemd asked for in ``environ`` (default: ``os.environ``), or
        None when not run under a notifying service manager."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address or not address.startswith(("/", "@")):
            return None
        return cls(address, _watchdog_s(env, os.getpid() if pid is None else pid))

    async def notify(self, *lines: str) -> None:
        """Send ``lines`` (``KEY=value`` each) in one datagram."""
        data = "\n".join(lines).encode()
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                await sock.sendto(data, self.address)
            except OSError as exc:
                log.warning("systemd notification %r not sent: %s", lines, exc)
                return
        self.sent += 1

    async def keep_alive(self) -> None:
        """``WATCHDOG=1`` every ``watchdog_s / 2`` until cancelled (nothing without a
        watchdog)."""
        if self.watchdog_s is None:
            return
        while True:
            await self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_s / 2)


async def service_ready(nursery: trio.Nursery, status: str,
                        environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
    """Tell the service manager, when one asked (``NOTIFY_SOCKET``), that the service
    is ready, with ``status``; feed its watchdog from ``nursery`` until that closes.
    Returns the notifier (None: not run under a notifying service manager)."""
    notifier = SystemdNotifier.from_environ(environ)
    if notifier is not None:
        await notifier.notify("READY=1", f"STATUS={status}")
        nursery.start_soon(notifier.keep_alive)
    return notifier


async def service_stopping(notifier: SystemdNotifier | None, status: str) -> None:
    """``STOPPING=1`` with ``status`` (nothing without a notifier)."""
    if notifier is not None:
        await notifier.notify("STOPPING=1", f"STATUS={status}")


def _watchdog_s(env: Mapping[str, str], pid: int) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(pid):
        return None  # the watchdog is another process's (e.g. our parent's)
    if not usec.isdigit() or int(usec) == 0:
        log.warning("WATCHDOG_USEC=%r ignored: not a positive integer", usec)
        return None
    return int(usec) / 1e6
