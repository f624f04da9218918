"""Tracker beyond one process: SQLite against PostgreSQL, N processes behind nginx,
opentracker as the reference, and a check-in storm into PostgreSQL.

``run_scale`` (``python -m bench.tracker --db postgresql [--processes N]``) measures,
side by side in the same rounds and with the same wrk scripts as the pinned benchmark
(:mod:`bench.tracker`), lean check-ins and lean announces (signed with ``--signed``)
against:

- ``sqlite``: one tracker process on SQLite (the default deployment);
- ``pg``: one tracker process on PostgreSQL (``--db postgresql``: a throwaway server
  started for the run, ``fsync`` on, as in production; or ``--db postgresql://...``);
- ``xN`` (``--processes N``, N > 1): N tracker processes on PostgreSQL and Redis
  (throwaway), behind nginx (round robin over their lean endpoints, trusted proxy
  127.0.0.1), all pinned to the tracker CPU;
- ``opentracker`` (when Debian's ``opentracker`` is installed): the same announce load
  against it, the bench's info-hash whitelisted, pinned to the tracker CPU.

Every figure comes with requests per second of tracker CPU time (the sum over the
tracker processes; PostgreSQL's, Redis's and nginx's CPU are reported apart), which
stays meaningful on a machine other people use; and the ratios to ``sqlite`` are taken
within each round.

``run_storm`` (``--storm N``): N distinct devices (lab mode: the storm measures the
database, not signatures) check in once each through the real HTTP API (the lean
endpoint) of a tracker on a throwaway PostgreSQL, as fast as wrk can send them; bounded
by a timeout. Reported: check-ins/s, p50/p99, the devices stored, and the database size
per device.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.delta import machine_info
from bench.servers import PostgresServer, run_postgres, run_redis
from bench.tracker import (
    _LUA_ANNOUNCE,
    _LUA_CHECKIN,
    _LUA_DONE,
    _LUA_SIGNED,
    _SIGNED_RATE_CAP,
    INFO_HASH,
    PRODUCT,
    _cpu_seconds,
    _Fleet,
    _lua,
    _prepare,
    _run_wrk,
    start_tracker,
    wrk_and_cpus,
    wrk_figures,
)
from swarmota.tracker.store import open_store

__all__ = ["render_scale", "render_storm", "run_nginx", "run_scale", "run_storm"]

_PHASES = ("checkin-lean", "announce-lean")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_nginx(workdir: Path, upstreams: list[str], cpu: int | None = None
              ) -> Iterator[str]:
    """nginx on a free loopback port, round robin over ``upstreams`` (keep-alive to
    them, ``X-Forwarded-For`` added, a failed GET tried on the next one); its URL.

    Raises:
        RuntimeError: nginx is missing or did not start.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx not found: apt-get install nginx-light")
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    port = _free_port()
    servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in upstreams)
    (prefix / "nginx.conf").write_text(f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    upstream trackers {{
{servers}
        keepalive 64;
        # below the trackers' idle timeout (30 s): else a POST sent on a connection the
        # tracker is closing gets a 502 (nginx retries only idempotent requests)
        keepalive_timeout 20s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://trackers;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_next_upstream error timeout;
        }}
    }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                             "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    try:
        if cpu is not None:
            os.sched_setaffinity(proc.pid, {cpu})
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(timeout=10)


def _wait_port(port: int, proc: subprocess.Popen[Any]) -> None:
    import socket

    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("a server did not start") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _opentracker(workdir: Path, cpu: int | None) -> Iterator[tuple[str, int] | None]:
    """opentracker with the bench's info-hash whitelisted: ``(url, pid)``, or ``None``
    when it is not installed."""
    binary = shutil.which("opentracker")
    if binary is None:
        yield None
        return
    whitelist = workdir / "opentracker-whitelist.txt"
    whitelist.write_text(INFO_HASH[:40] + "\n")
    port = _free_port()
    proc = subprocess.Popen([binary, "-i", "127.0.0.1", "-p", str(port), "-P", str(port),
                             "-w", str(whitelist)], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if cpu is not None:
            os.sched_setaffinity(proc.pid, {cpu})
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pids_of(name: str) -> list[int]:
    """Processes whose command is ``name`` (the throwaway servers' CPU, reported apart)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


def _cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += _cpu_seconds(pid)
    return total


def run_scale(workdir: Path, *, devices: int, duration_s: float, runs: int,
              connections: int, db: str, processes: int, signed: bool,
              wrk: str = "wrk") -> dict[str, Any]:
    """See the module docstring; a JSON-ready dict.

    Raises:
        RuntimeError: wrk, PostgreSQL, Redis or nginx is missing, or a server failed.
    """
    wrk_path, tracker_cpu, load_cpu = wrk_and_cpus(wrk)
    workdir.mkdir(parents=True, exist_ok=True)
    scripts = {"checkin-lean": workdir / "checkin.lua", "announce-lean": workdir / "ann.lua"}
    scripts["checkin-lean"].write_text(_lua(_LUA_CHECKIN, devices))
    scripts["announce-lean"].write_text(_lua(_LUA_ANNOUNCE, devices))
    fleet = _Fleet(workdir, devices) if signed else None
    ca = None if fleet is None else fleet.ca_pem
    procs: list[subprocess.Popen[str]] = []
    with contextlib.ExitStack() as stack:
        pg: PostgresServer | None = None
        if db == "postgresql":
            pg = stack.enter_context(run_postgres(fsync=True, settings={
                "shared_buffers": "256MB", "max_connections": "100"}))
            db_url = pg.url()
        else:
            db_url = db
        try:
            targets: dict[str, tuple[str, list[int]]] = {}
            sqlite_db = workdir / "sqlite.db"
            _prepare(sqlite_db)
            proc, _, lean = start_tracker(sqlite_db, tracker_cpu, ca)
            procs.append(proc)
            targets["sqlite"] = (lean, [proc.pid])
            _prepare(db_url)
            proc, _, lean = start_tracker(db_url, tracker_cpu, ca)
            procs.append(proc)
            targets["pg"] = (lean, [proc.pid])
            if processes > 1:
                redis = stack.enter_context(run_redis())
                many = [start_tracker(db_url, tracker_cpu, ca, extra=[
                    "--redis", redis.url, "--trusted-proxy", "127.0.0.1/32"])
                    for _ in range(processes)]
                procs += [p for p, _, _ in many]
                url = stack.enter_context(run_nginx(workdir, [le for _, _, le in many],
                                                 load_cpu))
                targets[f"x{processes}"] = (url, [p.pid for p, _, _ in many])
            reference = stack.enter_context(_opentracker(workdir, tracker_cpu))
            servers = {"postgres": _pids_of("postgres"), "redis": _pids_of("redis-server")}
            run = functools.partial(_run_wrk, wrk_path, load_cpu, connections=connections)

            def measure(kind: str, target: str, pids: list[int],
                        seconds: float) -> dict[str, Any]:
                if fleet is None:
                    return run(target, scripts[kind], duration_s=seconds, pid=pids)
                requests = workdir / "signed.tsv"
                fleet.write_requests(requests, "checkin" if kind == "checkin-lean"
                                     else "announce",
                                     int(_SIGNED_RATE_CAP[kind] * max(1.0, seconds)))
                script = workdir / "signed.lua"
                script.write_text(_LUA_SIGNED.replace("REQUESTS", str(requests)) + _LUA_DONE)
                return run(target, script, duration_s=seconds, pid=pids)

            warm = max(1.0, duration_s / 2)
            for target, pids in targets.values():
                for kind in _PHASES:
                    measure(kind, target, pids, warm)
            rounds: list[dict[str, Any]] = []
            for _ in range(runs):
                this: dict[str, Any] = {}
                for kind in _PHASES:
                    for name, (target, pids) in targets.items():
                        before = {k: _cpu_of(v) for k, v in servers.items()}
                        result = measure(kind, target, pids, duration_s)
                        result["server_cpu_s"] = {k: round(_cpu_of(v) - before[k], 3)
                                                  for k, v in servers.items()}
                        this[f"{kind}-{name}"] = result
                    if kind == "announce-lean" and reference is not None:
                        result = run(reference[0], scripts["announce-lean"],
                                     duration_s=duration_s, pid=reference[1])
                        # opentracker closes the connection after every answer, which
                        # wrk counts as a read error: only wrong answers are errors
                        result["errors"] = result["non2xx"]
                        this["announce-opentracker"] = result
                rounds.append(this)
            size = None
            with open_store(db_url) as store:
                database_bytes = getattr(store, "database_bytes", None)
                if callable(database_bytes):
                    size = database_bytes()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    keys = ("requests_per_s", "p50_ms", "p99_ms", "requests_per_cpu_s")
    medians = {phase: {key: statistics.median(r[phase][key] or 0 for r in rounds)
                       for key in keys} for phase in rounds[0]}
    for phase in medians:
        medians[phase]["errors"] = sum(r[phase]["errors"] for r in rounds)
        medians[phase]["exhausted"] = any(r[phase].get("exhausted") for r in rounds)
    ratios = {}
    for phase in rounds[0]:
        kind = "announce-lean" if phase == "announce-opentracker" else phase.rsplit("-", 1)[0]
        base = f"{kind}-sqlite"
        if phase != base:
            ratios[phase] = {key: round(statistics.median(
                (r[phase][key] or 0) / r[base][key] for r in rounds if r[base][key]), 3)
                for key in ("requests_per_s", "requests_per_cpu_s")}
    return {"mode": "scale", "db": "postgresql (throwaway, fsync on)" if pg else "given URL",
            "processes": processes, "signed": signed, "devices": devices,
            "duration_s": duration_s, "runs": runs, "connections": connections,
            "tracker_cpu": tracker_cpu, "load_cpu": load_cpu,
            "opentracker": reference is not None, "database_bytes_after": size,
            "machine": machine_info({}), "loadavg_after": os.getloadavg(),
            "median": medians, "versus_sqlite": ratios, "rounds": rounds}


def render_scale(result: dict[str, Any]) -> str:
    lines = [
        "# Tracker beyond one process",
        "",
        f"`python -m bench.tracker --db postgresql --processes {result['processes']}"
        + (" --signed" if result["signed"] else "") + "`: every tracker pinned to CPU "
        f"{result['tracker_cpu']}, wrk (and nginx) to CPU {result['load_cpu']}, "
        f"{result['connections']} keep-alive connections, {result['devices']} simulated "
        f"devices, {result['runs']} rounds of {result['duration_s']} s per phase; medians. "
        "Lean endpoint for both check-ins and announces"
        + (", every request signed (ECDSA P-256)" if result["signed"] else ", lab mode")
        + ". `-sqlite`: one process on SQLite; `-pg`: one process on PostgreSQL "
        f"({result['db']}); `-x{result['processes']}`: that many processes on PostgreSQL "
        "and Redis behind nginx; `announce-opentracker`: Debian's opentracker, the same "
        "announce script (it closes the connection after each answer; wrk reconnects). "
        "req/CPU-s = requests per second of tracker CPU (summed over the "
        "tracker processes; database, Redis and nginx CPU not included: see "
        "server CPU). Load average after the run: "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_after'])} (a shared 2-CPU "
        "machine: read the ratios and req/CPU-s, not the wall rates).",
        "",
        "| phase | req/s | p50 ms | p99 ms | req/CPU-s | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase, m in result["median"].items():
        lines.append(f"| {phase} | {m['requests_per_s']:.0f} | {m['p50_ms']:.2f} | "
                     f"{m['p99_ms']:.2f} | {m['requests_per_cpu_s']:.0f} | {m['errors']}"
                     + (" (list ran out)" if m.get("exhausted") else "") + " |")
    lines += ["", "Ratios to the same phase on SQLite, within each round (medians):", "",
              "| phase | req/s ratio | req/CPU-s ratio |", "|---|---:|---:|"]
    for phase, ratio in result["versus_sqlite"].items():
        lines.append(f"| {phase} | {ratio['requests_per_s']:.3f} | "
                     f"{ratio['requests_per_cpu_s']:.3f} |")
    lines += ["", "Server CPU seconds per phase (first round): " + ", ".join(
        f"{phase}: {r.get('server_cpu_s', {})}" for phase, r in result["rounds"][0].items()
        if r.get("server_cpu_s")), ""]
    if result.get("database_bytes_after"):
        lines += [f"PostgreSQL database size after the run: "
                  f"{result['database_bytes_after'] / 1e6:.1f} MB.", ""]
    lines += [f"Machine: `{result['machine']}`", ""]
    return "\n".join(lines)


_LUA_STORM = """
local counter = 0
local devices = DEVICES
request = function()
  local i = counter
  if counter >= devices then
    i = 0  -- a device already stored, not a new one (the bench stops wrk meanwhile)
  end
  counter = counter + 1
  return wrk.format("POST", "/v1/checkin", {["content-type"] = "application/json"},
    string.format('{"device_id": "storm-%07d", "product": "PRODUCT", "hardware_id": "hw1", '
      .. '"version": "1.0.0", "release_counter": 1, "network_id": "net-%d", '
      .. '"region": "eu-%d"}', i, math.floor(i / 4), i % 8))
end
"""


def run_storm(workdir: Path, *, devices: int, connections: int, timeout_s: float,
              wrk: str = "wrk", progress: Callable[[str], None] = print) -> dict[str, Any]:
    """See the module docstring; a JSON-ready dict.

    Raises:
        RuntimeError: wrk or PostgreSQL is missing, or the storm did not finish in
            ``timeout_s``.
    """
    wrk_path, tracker_cpu, load_cpu = wrk_and_cpus(wrk)
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "storm.lua"
    script.write_text(_lua(_LUA_STORM, devices))
    with run_postgres(fsync=True, settings={"shared_buffers": "256MB"}) as pg:
        url = pg.url()
        _prepare(url)
        with open_store(url) as store:
            empty = store.database_bytes()  # type: ignore[attr-defined]
        proc, api, lean = start_tracker(url, tracker_cpu)
        try:
            progress(f"storm: {devices} devices check in once each through {lean}")
            server_pids = _pids_of("postgres")
            server_before = _cpu_of(server_pids)
            tracker_before = _cpu_seconds(proc.pid)
            result = _storm_wrk(wrk_path, load_cpu, lean, api, script, devices=devices,
                                connections=connections, timeout_s=timeout_s)
            tracker_cpu_s = _cpu_seconds(proc.pid) - tracker_before
            server_cpu = _cpu_of(server_pids) - server_before
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        with open_store(url) as store:
            stored = sum(n for (product, _), n in store.count_devices().items()
                         if product == PRODUCT)
            size = store.database_bytes()  # type: ignore[attr-defined]
    if stored < devices:
        raise RuntimeError(f"the storm stored {stored} of {devices} devices")
    return {"mode": "storm", "devices": devices, "stored": stored,
            "connections": connections, "wall_s": result["elapsed_s"],
            "requests": result["requests"],
            "checkins_per_s": result["requests_per_s"], "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"], "errors": result["errors"],
            "tracker_cpu_s": round(tracker_cpu_s, 1),
            "checkins_per_tracker_cpu_s": round(result["requests"] / tracker_cpu_s),
            "postgres_cpu_s": round(server_cpu, 1),
            "database_bytes_empty": empty, "database_bytes": size,
            "bytes_per_device": round((size - empty) / stored),
            "machine": machine_info({}), "loadavg_after": os.getloadavg()}


def _storm_wrk(wrk: str, cpu: int | None, url: str, api: str, script: Path, *, devices: int,
               connections: int, timeout_s: float) -> dict[str, Any]:
    """wrk until the tracker counted ``devices`` check-ins (read from its ``/metrics``),
    then SIGINT: wrk prints its figures for the time it really ran.

    Raises:
        RuntimeError: not done within ``timeout_s``, or wrk printed no figures.
    """
    import httpx

    cmd = [wrk, "-t1", f"-c{connections}", f"-d{round(timeout_s) + 60}s", "--timeout", "10s",
           "-s", str(script), url]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            time.sleep(0.5)
            text = httpx.get(api + "/metrics", timeout=30).text
            found = re.search(r"^swarmota_tracker_checkins_total (\d+)$", text, re.MULTILINE)
            if found and int(found.group(1)) >= devices:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the storm did not finish within {timeout_s} s")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return wrk_figures(out, err)


def render_storm(result: dict[str, Any]) -> str:
    return "\n".join([
        "# Check-in storm into PostgreSQL",
        "",
        f"`python -m bench.tracker --storm {result['devices']}`: {result['devices']} "
        "distinct devices check in once each (lab mode) through the lean endpoint of one "
        "tracker process on a throwaway PostgreSQL (fsync on), wrk with "
        f"{result['connections']} connections; tracker pinned to one CPU, wrk to the "
        "other, PostgreSQL unpinned. Load average after the run: "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_after'])}.",
        "",
        "| devices stored | wall s | check-ins/s | p50 ms | p99 ms | check-ins per tracker "
        "CPU-s | PostgreSQL CPU s | DB bytes per device | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['stored']} | {result['wall_s']} | {result['checkins_per_s']:.0f} | "
        f"{result['p50_ms']:.2f} | {result['p99_ms']:.2f} | "
        f"{result['checkins_per_tracker_cpu_s']:.0f} | {result['postgres_cpu_s']} | "
        f"{result['bytes_per_device']} | {result['errors']} |",
        "",
        f"Database: {result['database_bytes_empty'] / 1e6:.1f} MB empty, "
        f"{result['database_bytes'] / 1e6:.1f} MB after (tables and indexes; "
        "a signed fleet adds each device's request counter and certificate fingerprint).",
        "",
        f"Machine: `{result['machine']}`",
        "",
    ])
