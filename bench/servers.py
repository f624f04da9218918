"""Throwaway PostgreSQL and Redis servers for tests and benchmarks (never the product).

Each one runs from its own temporary directory, listens on a unix socket there (and,
for PostgreSQL, on a loopback TCP port when asked), and is stopped (and the directory
removed) when its context ends; nothing is left behind, and nothing already running
on the machine is used. The binaries are Debian's (packages ``postgresql`` and
``redis-server``); :func:`postgres_binaries` finds PostgreSQL's under
``/usr/lib/postgresql/*/bin`` (Debian does not put ``initdb`` on the ``PATH``).

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user
(which the Debian package creates) and its directory is made that user's.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["PostgresServer", "RedisServer", "postgres_binaries", "postgres_missing",
           "redis_missing", "run_postgres", "run_redis"]

_START_TIMEOUT_S = 60.0


def postgres_binaries() -> Path | None:
    """The directory of ``initdb`` and ``postgres`` (the newest Debian version, else
    the ``PATH``'s), or ``None``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def postgres_missing() -> str | None:
    """Why a throwaway PostgreSQL cannot run here (``None``: it can)."""
    if postgres_binaries() is None:
        return "PostgreSQL is not installed (Debian package postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


def redis_missing() -> str | None:
    """Why a throwaway Redis cannot run here (``None``: it can)."""
    if shutil.which("redis-server") is None:
        return "Redis is not installed (Debian package redis-server)"
    return None


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway PostgreSQL: its directory, socket directory and TCP port
    (0: none)."""

    directory: Path
    socket_dir: Path
    port: int

    def url(self, database: str = "postgres", *, schema: str | None = None,
            tcp: bool = False) -> str:
        """A libpq URL of ``database`` as the superuser ``postgres``, over the unix socket
        (or loopback TCP), with ``schema`` first on the search path if given."""
        options = [] if schema is None else [f"options={quote('-csearch_path=' + schema)}"]
        if tcp:
            return f"postgresql://postgres@127.0.0.1:{self.port}/{database}" + (
                "?" + "&".join(options) if options else "")
        query = [f"host={quote(str(self.socket_dir), safe='')}", f"port={self.port or 5432}",
                 *options]
        return f"postgresql://postgres@/{database}?" + "&".join(query)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql (as superuser); its output."""
        binaries = postgres_binaries()
        psql = shutil.which("psql") or str((binaries or Path("/usr/bin")) / "psql")
        return subprocess.run(
            [psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
             "-p", str(self.port or 5432), "-U", "postgres", "-d", database, "-c", sql],
            capture_output=True, text=True, check=True, timeout=60).stdout


@dataclass(frozen=True)
class RedisServer:
    """A running throwaway Redis: its unix socket."""

    socket: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres() -> dict[str, Any]:
    """``subprocess`` options that run a command as the ``postgres`` user when we are
    root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def run_postgres(*, tcp: bool = False, fsync: bool = True,
                 settings: dict[str, str] | None = None) -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL for the ``with`` block (see the module docstring).
    ``tcp``: listen on a free loopback port too. ``fsync``: off for tests that never
    lose power (faster), on for benchmarks of the real cost. ``settings``: more
    ``postgres -c`` settings.

    Raises:
        RuntimeError: PostgreSQL is missing (:func:`postgres_missing`) or did not start.
    """
    missing = postgres_missing()
    binaries = postgres_binaries()
    if missing is not None or binaries is None:
        raise RuntimeError(missing or "PostgreSQL is not installed")
    directory = Path(tempfile.mkdtemp(prefix="swarmota-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        data = directory / "data"
        as_user = _as_postgres()
        if as_user:
            os.chown(directory, as_user["user"], as_user["group"])
        subprocess.run([str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120, cwd=directory,
                       **as_user)
        port = _free_port() if tcp else 0
        config = {"listen_addresses": "127.0.0.1" if tcp else "",
                  "unix_socket_directories": str(directory),
                  "port": str(port or 5432), "fsync": "on" if fsync else "off",
                  "synchronous_commit": "on" if fsync else "off",
                  "full_page_writes": "on" if fsync else "off",
                  "max_connections": "200", "shared_buffers": "128MB",
                  **(settings or {})}
        args = [str(binaries / "postgres"), "-D", str(data)]
        for key, value in config.items():
            args += ["-c", f"{key}={value}"]
        log = (directory / "postgres.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=directory,
                                **as_user)
        log.close()
        server = PostgresServer(directory, directory, port)
        socket_file = directory / f".s.PGSQL.{port or 5432}"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError("PostgreSQL exited at start: "
                                   + (directory / "postgres.log").read_text()[-2000:])
            if socket_file.exists():
                try:
                    server.psql("SELECT 1")
                    break
                except subprocess.CalledProcessError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start in time")
            time.sleep(0.05)
        yield server
    finally:
        if proc is not None:
            _stop(proc, signal.SIGINT)  # fast shutdown
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def run_redis() -> Iterator[RedisServer]:
    """A throwaway Redis (unix socket only, no persistence) for the ``with`` block.

    Raises:
        RuntimeError: Redis is missing or did not start.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("Redis is not installed (Debian package redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="swarmota-redis-"))
    sock = directory / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(directory),
         "--logfile", str(directory / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=directory)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError("Redis exited at start")
            if time.monotonic() > deadline:
                raise RuntimeError("Redis did not start in time")
            time.sleep(0.02)
        yield RedisServer(sock)
    finally:
        _stop(proc, signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
