"""The documented nginx origin (docs/ORIGIN.md) for benchmarks: a CDN's role, served by
a real nginx instead of the embedded Python server.

A fleet's origin is a CDN or a web server in front of the published tree, not a Python
process sharing the benchmark's cores with the devices. :func:`run_nginx_origin` runs
Debian's nginx with the configuration docs/ORIGIN.md gives (its snippet and its
plain-HTTP lab server, only the root, address and port substituted), plus an access log
of status, body bytes and path, from which :meth:`NginxOrigin.statistics` counts what
the embedded origin counts (:class:`seeder.origin.OriginStats`: file bytes of 200 and
206 answers, by top-level directory, ``.torrent`` and ``.chunks`` apart).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from swarmota.seeder.origin import OriginStats, served_kind

__all__ = ["NginxOrigin", "documented_blocks", "main_config", "nginx_binary",
           "run_nginx_origin"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_DOCUMENTED_ROOT = "/srv/swarmota/REPO/origin"
_START_TIMEOUT_S = 15.0
_LOG_FORMAT = "$status $body_bytes_sent $uri"


def nginx_binary() -> str | None:
    """Debian's nginx (``nginx-light`` or ``nginx``), or ``None``."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def documented_blocks() -> list[str]:
    """The ```nginx blocks of docs/ORIGIN.md: the snippet, the HTTPS server and the
    plain-HTTP lab server."""
    text = (REPO_ROOT / "docs" / "ORIGIN.md").read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", text, flags=re.S)
    if len(blocks) != 3:
        raise RuntimeError("docs/ORIGIN.md: expected 3 nginx blocks (snippet, HTTPS "
                           f"server, lab server), found {len(blocks)}")
    return blocks


@dataclass
class NginxOrigin:
    """A running nginx origin: its URL, access log and processes."""

    url: str
    access_log: Path
    pid: int

    def statistics(self) -> OriginStats:
        """What nginx served so far, counted as :class:`OriginStats` counts (file
        bytes of 200 and 206 answers; ``requests``: every logged request)."""
        requests = total = r206 = r304 = 0
        by_dir: Counter[str] = Counter()
        by_suffix: Counter[str | None] = Counter()
        with contextlib.suppress(FileNotFoundError), open(self.access_log) as log:
            for line in log:
                status, sent, path = line.split(" ", 2)
                requests += 1
                r206 += status == "206"
                r304 += status == "304"
                if status not in ("200", "206"):
                    continue
                size = int(sent)
                total += size
                category, suffix = served_kind(path.strip().lstrip("/").split("/"))
                by_dir[category] += size
                by_suffix[suffix] += size
        return OriginStats(requests=requests, bytes_total=total,
                           bytes_metadata=by_dir["metadata"], bytes_targets=by_dir["targets"],
                           bytes_payloads=by_dir["payloads"],
                           bytes_torrents=by_suffix[".torrent"],
                           bytes_chunk_lists=by_suffix[".chunks"], responses_206=r206,
                           responses_304=r304)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the master and its workers so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        pids = [self.pid]
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                pids += [int(p) for p in (task / "children").read_text().split()]
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks


def main_config(prefix: Path, http: str, *, connections: int = 1024,
                access_log: str = "off") -> str:
    """A private nginx main configuration (``nginx -p PREFIX -c nginx.conf``, in the
    foreground, one worker, pid and error log under ``PREFIX``) whose ``http`` block
    holds ``http``, with ``access_log`` (the directive's arguments)."""
    return ("daemon off;\nworker_processes 1;\n"
            # a root master's workers would run as nobody, who may not read a private
            # temporary directory
            + (f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if os.getuid() == 0 else "")
            + f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log;\n"
            f"events {{ worker_connections {connections}; }}\n"
            f"http {{\nclient_body_temp_path {prefix}/body;\nproxy_temp_path {prefix}/proxy;\n"
            # after ``http``: a log format it defines must come first
            f"{http}\naccess_log {access_log};\n}}\n")


@contextlib.contextmanager
def run_nginx_origin(origin_dir: Path, workdir: Path, *, host: str = "127.0.0.1"
                     ) -> Iterator[NginxOrigin]:
    """nginx serving ``origin_dir`` on ``host`` (a free port) with docs/ORIGIN.md's
    configuration; stopped when the context ends.

    Raises:
        RuntimeError: nginx is not installed, refuses the configuration or did not start.
    """
    nginx = nginx_binary()
    if nginx is None:
        raise RuntimeError("nginx not found: apt-get install nginx-light")
    snippet, _https, lab_server = documented_blocks()
    prefix = workdir / "nginx-origin"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    port = _free_port(host)
    (prefix / "origin.conf").write_text(snippet.replace(_DOCUMENTED_ROOT, str(origin_dir)))
    server = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", lab_server)
    server = re.sub(r"listen 8460", f"listen {host}:{port}", server)
    server = server.replace("snippets/swarmota-origin.conf", str(prefix / "origin.conf"))
    access_log = prefix / "logs" / "access.log"
    (prefix / "nginx.conf").write_text(main_config(
        prefix, f"log_format counted '{_LOG_FORMAT}';\nkeepalive_requests 100000;\n{server}",
        access_log=f"{access_log} counted"))
    check = subprocess.run([nginx, "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx refused the origin configuration: {check.stderr.strip()}")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(host, port, proc)
        yield NginxOrigin(f"http://{host}:{port}", access_log, proc.pid)
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not listen on {host}:{port} within "
                                   f"{_START_TIMEOUT_S:.0f} s") from None
            time.sleep(0.02)
