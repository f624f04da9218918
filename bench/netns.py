"""A throwaway network namespace whose loopback is shaped like a home network (root only).

Benchmarks run their servers and devices inside it, on its own loopback (127.0.0.0/8),
so that nothing they send can leave the machine and ``tc`` shapes their traffic without
touching the host's interfaces. One HTB tree on the namespace's ``lo``:

* class ``1:10``: every packet whose source address is the origin's (``origin_ip``), at
  ``origin_rate_bits_per_s``: the CDN-to-home link;
* class ``1:20``: everything else (LAN traffic between devices), at
  ``lan_rate_bits_per_s``, or effectively unlimited when that is 0;
* classes ``1:30``, ``1:31``, ...: one per address of ``counted_ips`` (the tracker), at
  the LAN rate, so that what each of those servers sends is counted on its own
  (:meth:`Shaping.counted_class`).

:func:`shaped_namespace` creates it (after removing namespaces of this kind left behind by
a process that no longer exists), yields its name, and on the way out, also on Ctrl-C,
SIGTERM (the caller turns it into an exception) or an error, kills every process still
inside and deletes it. :func:`exec_argv` prefixes a command line so that it runs inside.

Errors: :class:`NetnsError` with the failing command and what it printed. Nothing here
is imported by the product.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

__all__ = [
    "NetnsError",
    "Shaping",
    "class_sent_bytes",
    "exec_argv",
    "missing_privileges",
    "shaped_namespace",
]

ORIGIN_CLASS = "1:10"
LAN_CLASS = "1:20"
_UNLIMITED = "100gbit"
_QUANTUM_BYTES = 200_000  # >= lo's 64 KiB packets
_COMMAND_TIMEOUT_S = 30.0
_COUNTED_CLASS_BASE = 30
_MAX_COUNTED = 8


class NetnsError(Exception):
    """A namespace or traffic-control command failed."""


@dataclass(frozen=True)
class Shaping:
    """How the namespace's loopback is shaped."""

    origin_ip: str
    origin_rate_bits_per_s: int
    lan_rate_bits_per_s: int = 0  # 0: unshaped
    counted_ips: tuple[str, ...] = ()  # senders counted in classes of their own

    def __post_init__(self) -> None:
        for ip in (self.origin_ip, *self.counted_ips):
            if not re.fullmatch(r"127\.\d{1,3}\.\d{1,3}\.\d{1,3}", ip):
                raise ValueError(f"address {ip!r} is not a loopback address")
        if self.origin_ip in self.counted_ips or len(set(self.counted_ips)) != len(
                self.counted_ips) or len(self.counted_ips) > _MAX_COUNTED:
            raise ValueError(f"counted addresses must be distinct, at most {_MAX_COUNTED}, "
                             "and not the origin's")
        if self.origin_rate_bits_per_s < 8_000:
            raise ValueError("the origin rate must be at least 8 kbit/s")
        if self.lan_rate_bits_per_s < 0:
            raise ValueError("the LAN rate must be >= 0 (0: unshaped)")

    def counted_class(self, ip: str) -> str:
        """The HTB class that counts what ``ip`` (one of ``counted_ips``) sends."""
        return f"1:{_COUNTED_CLASS_BASE + self.counted_ips.index(ip)}"

    def burst_bytes(self, rate_bits_per_s: int) -> int:
        """HTB bucket: 10 ms at the rate, at least two 64 KiB loopback packets."""
        return max(2 * 65536, rate_bits_per_s // 8 // 100)


def missing_privileges(euid: int | None = None) -> str | None:
    """Why this process cannot build a shaped namespace, or None when it can."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return ("the fleet benchmark creates a network namespace and shapes it with tc: "
                "run it as root (e.g. sudo)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return (f"missing {' and '.join(missing)}: install iproute2 "
                "(apt-get install -y iproute2)")
    return None


def exec_argv(namespace: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``namespace``."""
    return ["ip", "netns", "exec", namespace, *argv]


@contextmanager
def shaped_namespace(shaping: Shaping, *, prefix: str = "swarmota-bench") -> Iterator[str]:
    """Create a namespace with a shaped loopback; yield its name; always tear it down.

    Raises:
        NetnsError: a command failed (the namespace is removed again).
    """
    _remove_stale(prefix)
    name = f"{prefix}-{os.getpid()}"
    _run(["ip", "netns", "add", name])
    try:
        _setup(name, shaping)
        yield name
    finally:
        _teardown(name)


def class_sent_bytes(namespace: str | None = None) -> dict[str, int]:
    """Bytes sent so far through each HTB class of the loopback of ``namespace`` (None:
    the namespace this process runs in)."""
    argv = ["tc", "-s", "class", "show", "dev", "lo"]
    out = _run(argv if namespace is None else exec_argv(namespace, argv))
    sent: dict[str, int] = {}
    for match in re.finditer(r"class htb (\S+) .*?\n\s*Sent (\d+) bytes", out):
        sent[match.group(1)] = int(match.group(2))
    return sent


def _setup(name: str, shaping: Shaping) -> None:
    def tc(*args: str) -> None:
        _run(exec_argv(name, ["tc", *args]))

    _run(exec_argv(name, ["ip", "link", "set", "lo", "up"]))
    origin_rate = str(shaping.origin_rate_bits_per_s)
    lan_rate = str(shaping.lan_rate_bits_per_s) if shaping.lan_rate_bits_per_s else _UNLIMITED
    quantum = str(_QUANTUM_BYTES)
    tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "20")
    tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb",
       "rate", _UNLIMITED, "quantum", quantum)
    origin_burst = str(shaping.burst_bytes(shaping.origin_rate_bits_per_s))
    tc("class", "add", "dev", "lo", "parent", "1:1", "classid", ORIGIN_CLASS, "htb",
       "rate", origin_rate, "ceil", origin_rate, "burst", origin_burst,
       "cburst", origin_burst, "quantum", quantum)
    lan = ["class", "add", "dev", "lo", "parent", "1:1", "classid", LAN_CLASS, "htb",
           "rate", lan_rate, "ceil", lan_rate, "quantum", quantum]
    if shaping.lan_rate_bits_per_s:
        lan_burst = str(shaping.burst_bytes(shaping.lan_rate_bits_per_s))
        lan += ["burst", lan_burst, "cburst", lan_burst]
    tc(*lan)
    for ip in shaping.counted_ips:
        tc(*lan[:7], shaping.counted_class(ip), *lan[8:])
        tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
           "u32", "match", "ip", "src", f"{ip}/32", "flowid", shaping.counted_class(ip))
    tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
       "match", "ip", "src", f"{shaping.origin_ip}/32", "flowid", ORIGIN_CLASS)


def _teardown(name: str) -> None:
    """Kill what still runs inside, then delete the namespace (best effort, both)."""
    try:
        pids = _run(["ip", "netns", "pids", name]).split()
    except NetnsError:
        pids = []
    for pid in pids:
        with suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
    with suppress(NetnsError):
        _run(["ip", "netns", "del", name])


def _remove_stale(prefix: str) -> None:
    """Delete ``<prefix>-<pid>`` namespaces whose creating process is gone."""
    try:
        listing = _run(["ip", "netns", "list"])
    except NetnsError:
        return
    for line in listing.splitlines():
        match = re.match(rf"{re.escape(prefix)}-(\d+)\b", line.strip())
        if match and not _alive(int(match.group(1))):
            _teardown(match.group(0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=_COMMAND_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited with {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode(errors="replace")
