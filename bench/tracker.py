"""Tracker load benchmark: many simulated devices checking in and announcing at once.

The figure that counts (``--mode pinned``, the default) measures the way the target is
stated, ">= 5,000 announces/s on one core with p99 < 20 ms": the tracker runs as
``swarmota tracker serve`` in its own process pinned to one CPU
(``os.sched_setaffinity``), with its main (hypercorn) listener and the lean BitTorrent
endpoint (``--announce-listen``); the load comes from ``wrk`` (Debian package ``wrk``;
``apt-get install wrk``) pinned to another CPU, ``--connections`` keep-alive connections,
a Lua script varying the device id, peer id and port of every request over
``--devices`` simulated devices (one swarm of ``--devices`` peers, 50 handed out per
announce, the swarm gate on for every device). Bounded: each phase lasts
``--duration-s`` (wrk stops itself; the subprocess has a hard timeout) and there are
``--runs`` rounds. Per round and phase: requests/s, wrk's p50/p99 latency, and the
tracker's CPU time (user + system, from ``/proc``), hence requests per CPU-second, which
stays meaningful when other processes share the CPUs. The report gives medians.

Phases: ``checkin`` (``POST /v1/checkin``, hypercorn; done once up front too, so every
device is known and admitted), ``announce-lean`` (``GET /announce`` on the lean
endpoint) and ``announce-hypercorn`` (the same on the main listener), interleaved in
every round so that both see the same machine.

``--signed`` (pinned mode) measures what device authentication costs, side by side in
the same rounds: a second tracker process, pinned to the same CPU, runs with
``--device-ca`` (a fleet CA made for the run, one identity per simulated device from
:func:`infra.devca.issue_device_cert`), and each phase runs again against it with every
request signed (:mod:`infra.deviceauth`): phases ``announce-lean-signed``,
``announce-hypercorn-signed`` and ``checkin-signed``; and ``announce-lean-keyed``: the
same announces authenticated by each device's announce key (HMAC-SHA256, taken from a
signed check-in's answer) instead of a signature. wrk cannot sign, so the signed
requests (counters increasing per device across phases) are made before each phase and
replayed in order by a Lua script that reads them from a file; it stops when the list
runs out (``exhausted`` in the result; the phase is then shorter). Refusals by the
signed tracker (a failure reason has HTTP status 200) are read from its ``/metrics``
and counted as errors. Results go to ``tracker-signed.json`` and ``tracker-signed.md``.

``--mode inprocess`` keeps the older, coarser view: ``asgi`` calls the application
directly (the app's own cost), ``http`` goes through hypercorn with an httpx client in
the same process.

``--baseline CHECKOUT`` runs every phase against a tracker of another commit too (a
checkout made with ``git worktree add``; its own code, its own database schema), in the
same rounds on the same CPU: phases ``-baseline``, and the ratios of the medians
(``tracker-vs-baseline.json`` and ``.md``).

Run: ``.venv/bin/python -m bench.tracker [--devices 1000] [--duration-s 5] [--runs 5]
[--connections 32] [--signed] [--baseline DIR] [--out bench/results]``. Writes ``tracker.json`` and
``tracker.md`` (``tracker-signed.*`` with ``--signed``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import trio

from bench.delta import machine_info
from swarmota.infra.devca import create_ca, issue_device_cert
from swarmota.infra.deviceauth import AnnounceKey, RequestSigner
from swarmota.infra.http_serve import ListenConfig
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.bittorrent import SwarmInfo
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import open_store
from swarmota.tracker.wire import encode_json, parse_announce_key

INFO_HASH = "5a" * 32
PRODUCT = "bench-router"

Request = Callable[[int], Awaitable[int]]


def _checkin_body(i: int) -> bytes:
    return encode_json({"device_id": f"dev-{i:06d}", "product": PRODUCT,
                        "hardware_id": "hw1", "version": "1.0.0", "release_counter": 1,
                        "network_id": f"net-{i // 4}"})


def _announce_query(i: int) -> bytes:
    peer_id = quote_from_bytes(f"-BT0001-{i:012d}".encode()).encode()
    return (b"info_hash=" + quote_from_bytes(bytes.fromhex(INFO_HASH)[:20]).encode()
            + b"&peer_id=" + peer_id + f"&port={10000 + i % 50000}&left=1000&compact=1"
            f"&device_id=dev-{i:06d}".encode())


async def _drive(request: Request, total: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            started = time.perf_counter()
            status = await request(i)
            latencies.append(time.perf_counter() - started)
            errors += status != 200

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": total, "errors": errors, "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(total / elapsed, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 3),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1,
                                                 int(0.99 * len(latencies)))], 3),
            "max_ms": round(1000 * latencies[-1], 3)}


def _asgi_requests(app: TrackerApp, devices: int) -> dict[str, Request]:
    async def call(method: str, path: str, body: bytes, query: bytes, i: int) -> int:
        status = 0

        async def receive() -> MutableMapping[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])

        scope = {"type": "http", "method": method, "path": path, "query_string": query,
                 "headers": [(b"content-length", str(len(body)).encode())],
                 "client": (f"127.0.{(i % devices) // 250}.{(i % devices) % 250 + 1}",
                            40000)}
        await app(scope, receive, send)
        return status

    return {
        "checkin": lambda i: call("POST", "/v1/checkin", _checkin_body(i % devices), b"", i),
        "announce": lambda i: call("GET", "/announce", b"", _announce_query(i % devices), i),
    }


def _http_requests(client: httpx.AsyncClient, devices: int) -> dict[str, Request]:
    async def checkin(i: int) -> int:
        response = await client.post("/v1/checkin", content=_checkin_body(i % devices),
                                     headers={"content-type": "application/json"})
        return response.status_code

    async def announce(i: int) -> int:
        response = await client.get("/announce?" + _announce_query(i % devices).decode())
        return response.status_code

    return {"checkin": checkin, "announce": announce}


def _prepare(db: Path | str) -> None:
    base = Release.create(PRODUCT, "2.0.0", 2)
    release = Release(base.product, base.version, base.release_counter, base.target,
                      (SwarmInfo(INFO_HASH, PRODUCT, "2.0.0", "full"),))
    with open_store(db) as store:
        register_release(store, release, RolloutPlan.everyone(), actor="bench")


async def run_bench(workdir: Path, *, devices: int, requests: int, concurrency: int,
                    transports: Sequence[str]) -> dict[str, Any]:
    """Every transport, check-ins then announces; the result as a JSON-ready dict."""
    results: dict[str, Any] = {"devices": devices, "requests_per_phase": requests,
                               "concurrency": concurrency, "machine": machine_info({}),
                               "transports": {}}
    for transport in transports:
        db = workdir / f"{transport}.sqlite"
        _prepare(db)
        config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0),
                               max_peers_per_swarm=max(2000, devices))
        phases: dict[str, Any] = {}
        if transport == "asgi":
            with SqliteStore(db) as store:
                app = TrackerApp(Director(store, config))
                calls = _asgi_requests(app, devices)
                for phase in ("checkin", "announce"):
                    phases[phase] = await _drive(calls[phase], requests, concurrency)
        else:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(functools.partial(serve_tracker, config))
                limits = httpx.Limits(max_connections=concurrency,
                                      max_keepalive_connections=concurrency)
                async with httpx.AsyncClient(base_url=url, limits=limits,
                                             timeout=30) as client:
                    calls = _http_requests(client, devices)
                    for phase in ("checkin", "announce"):
                        phases[phase] = await _drive(calls[phase], requests, concurrency)
                nursery.cancel_scope.cancel()
        results["transports"][transport] = phases
    return results


# --- pinned: the tracker in its own process on one CPU, wrk on another ----------------

_LUA_DONE = """
done = function(summary, latency, requests)
  io.write(string.format(
    "WRK-JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, "
    .. "\\"p99_us\\": %d, \\"non2xx\\": %d, \\"socket_errors\\": %d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout))
end
"""

_LUA_ANNOUNCE = """
local counter = 0
local devices = DEVICES
local hash = string.rep("%5A", 20)
request = function()
  local i = counter % devices
  counter = counter + 1
  return wrk.format("GET", string.format(
    "/announce?info_hash=%s&peer_id=-BT0001-%012d&port=%d&left=1000&compact=1"
    .. "&device_id=dev-%06d", hash, i, 10000 + i, i))
end
"""

_LUA_CHECKIN = """
local counter = 0
local devices = DEVICES
request = function()
  local i = counter % devices
  counter = counter + 1
  return wrk.format("POST", "/v1/checkin", {["content-type"] = "application/json"},
    string.format('{"device_id": "dev-%06d", "product": "PRODUCT", "hardware_id": "hw1", '
      .. '"version": "1.0.0", "release_counter": 1, "network_id": "net-%d"}',
      i, math.floor(i / 4)))
end
"""


_LUA_SIGNED = r"""
local reqs = {}
local n = 0
local i = 0
init = function(args)
  for line in io.lines("REQUESTS") do
    local method, path, cert, sig, body = line:match(
      "^(%u+)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    local headers = {["swarmota-device-cert"] = cert, ["swarmota-signature"] = sig}
    if cert == "" then
      headers = {["swarmota-announce-auth"] = sig}
    end
    if method == "POST" then
      headers["content-type"] = "application/json"
    else
      body = nil
    end
    n = n + 1
    reqs[n] = wrk.format(method, path, headers, body)
  end
end
request = function()
  if i >= n then
    io.write("WRK-EXHAUSTED\n")
    wrk.thread:stop()
    return reqs[n]
  end
  i = i + 1
  return reqs[i]
end
"""

# Upper bounds of the signed request rates (requests/s), to size the pre-signed lists.
_SIGNED_RATE_CAP = {"announce-lean": 12_000, "announce-hypercorn": 3_000, "checkin": 2_000,
                    "checkin-lean": 5_000, "announce-lean-keyed": 25_000}


def _lua(script: str, devices: int) -> str:
    return (script.replace("DEVICES", str(devices)).replace("PRODUCT", PRODUCT)
            + _LUA_DONE)


class _Fleet:
    """One identity per simulated device, and the counter each has reached."""

    def __init__(self, workdir: Path, devices: int) -> None:
        self.ca_pem = create_ca(workdir / "fleet-ca")
        self.signers = []
        for i in range(devices):
            files = issue_device_cert(workdir / "fleet-ca", workdir / "ids" / str(i),
                                      f"dev-{i:06d}")
            self.signers.append(RequestSigner(files.cert.read_bytes(),
                                              files.key.read_bytes()))
        self.counters = [0] * devices
        self.keys: list[AnnounceKey] = []

    def fetch_keys(self, api: str) -> None:
        """Check every device in once (signed) at ``api`` and keep its announce key."""
        self.keys = []
        with httpx.Client(timeout=30) as client:
            for i, signer in enumerate(self.signers):
                body = _checkin_body(i)
                self.counters[i] += 1
                headers = dict(signer.headers("POST", b"/v1/checkin", body, self.counters[i]))
                answer = client.post(api + "/v1/checkin", content=body, headers={
                    **headers, "content-type": "application/json"})
                answer.raise_for_status()
                grant = parse_announce_key(answer.json())
                if grant is None:
                    raise RuntimeError("the signed tracker handed out no announce key")
                self.keys.append(AnnounceKey(signer.device_id, signer.cert_sha256,
                                             grant.expires, grant.key))

    def write_requests(self, path: Path, phase: str, count: int) -> None:
        """``count`` signed requests of ``phase`` (``checkin``, ``announce``, or
        ``announce-keyed``: with the announce keys of :meth:`fetch_keys`), device after
        device, one per line."""
        devices = len(self.signers)
        with path.open("w") as out:
            for j in range(count):
                i = j % devices
                if phase == "checkin":
                    method, target, body = "POST", b"/v1/checkin", _checkin_body(i)
                else:
                    method, body = "GET", b""
                    target = b"/announce?" + _announce_query(i)
                self.counters[i] += 1
                if phase == "announce-keyed":
                    (_, mac), = self.keys[i].headers(method, target, body, self.counters[i])
                    auth = ["", mac]
                else:
                    headers = dict(self.signers[i].headers(method, target, body,
                                                           self.counters[i]))
                    auth = [headers["swarmota-device-cert"], headers["swarmota-signature"]]
                out.write("\t".join([method, target.decode("ascii"), *auth,
                                     body.decode("utf-8")]) + "\n")


def _refused(api: str) -> int:
    """Requests the tracker at ``api`` refused for their identity so far."""
    text = httpx.get(api + "/metrics", timeout=10).text
    return sum(int(m.group(1)) for m in re.finditer(
        r"^swarmota_tracker_device_auth_refused_total\{[^}]*\} (\d+)$", text, re.MULTILINE))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_wrk(wrk: str, cpu: int | None, url: str, script: Path, *, connections: int,
             duration_s: float, pid: int | Sequence[int],
             refused: Callable[[], int] | None = None) -> dict[str, Any]:
    """One wrk run; its figures plus the tracker's CPU seconds meanwhile (the sum over
    ``pid``, one tracker process or several)."""
    pids = [pid] if isinstance(pid, int) else list(pid)
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
           "--timeout", "5s", "-s", str(script), url]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd] if shutil.which("taskset") else cmd
    refused_before = refused() if refused is not None else 0
    cpu_before = sum(_cpu_seconds(p) for p in pids)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60,
                          check=True)
    cpu_used = sum(_cpu_seconds(p) for p in pids) - cpu_before
    refusals = refused() - refused_before if refused is not None else 0
    figures = wrk_figures(done.stdout, done.stderr)
    return {**figures, "errors": figures["errors"] + refusals,
            "exhausted": "WRK-EXHAUSTED" in done.stdout,
            "tracker_cpu_s": round(cpu_used, 3),
            "requests_per_cpu_s": round(figures["requests"] / cpu_used, 1) if cpu_used else None}


def wrk_figures(stdout: str, stderr: str = "") -> dict[str, Any]:
    """The figures the ``_LUA_DONE`` script printed: requests, time, rates, p50/p99,
    errors (non-2xx and socket errors) and non-2xx apart.

    Raises:
        RuntimeError: wrk printed none.
    """
    match = re.search(r"WRK-JSON (\{.*\})", stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no figures: {stdout[-500:]} {stderr[-500:]}")
    raw = json.loads(match.group(1))
    elapsed = raw["duration_us"] / 1e6
    return {"requests": raw["requests"], "elapsed_s": round(elapsed, 3),
            "requests_per_s": round(raw["requests"] / elapsed, 1),
            "p50_ms": round(raw["p50_us"] / 1000, 3), "p99_ms": round(raw["p99_us"] / 1000, 3),
            "errors": raw["non2xx"] + raw["socket_errors"], "non2xx": raw["non2xx"]}


def start_tracker(db: Path | str, cpu: int | None, device_ca: Path | None = None, *,
                   source: Path | None = None, extra: Sequence[str] = ()
                   ) -> tuple[subprocess.Popen[str], str, str]:
    """``swarmota tracker serve`` with both listeners, pinned to ``cpu``, in lab mode
    or checking device signatures against ``device_ca``; its URLs. ``source``: run the
    code of that checkout (another commit) instead of this one; ``extra``: more
    arguments (``--redis URL``, ``--trusted-proxy CIDR``)."""
    auth = (["--allow-unauthenticated-devices"] if device_ca is None
            else ["--device-ca", str(device_ca)])
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from swarmota.cli import main; sys.exit(main())",
         "tracker", "serve", "--db", str(db), "--listen", "127.0.0.1:0",
         "--announce-listen", "127.0.0.1:0", *auth, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        **_source_options(source))
    try:
        if cpu is not None:
            os.sched_setaffinity(proc.pid, {cpu})
        assert proc.stdout is not None
        api = lean = None
        deadline = time.monotonic() + 60
        while (api is None or lean is None) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if found := re.search(r"tracker listening on (\S+)", line):
                api = found.group(1)
            if found := re.search(r"lean BitTorrent endpoint on (\S+?):? ", line):
                lean = found.group(1)
        if api is None or lean is None:
            raise RuntimeError("the tracker did not start")
        return proc, api, lean
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _source_options(source: Path | None) -> dict[str, Any]:
    """``subprocess`` options that run the code of the checkout ``source`` (its
    packages first on the path), or this one's (``None``)."""
    if source is None:
        return {}
    env = dict(os.environ, PYTHONPATH=str(source.resolve()))
    return {"cwd": str(source), "env": env}


def _prepare_with(db: Path, source: Path | None) -> None:
    """:func:`_prepare`, by the code of ``source`` (its schema) when given."""
    if source is None:
        _prepare(db)
        return
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from bench.tracker import _prepare; _prepare(Path(sys.argv[1]))",
                    str(db.resolve())], check=True, timeout=120, **_source_options(source))


def wrk_and_cpus(wrk: str = "wrk") -> tuple[str, int | None, int | None]:
    """The path of ``wrk``, and the CPU for the tracker and the one for the load (the
    first two this process may run on; None, None on a single CPU).

    Raises:
        RuntimeError: ``wrk`` is not installed.
    """
    wrk_path = shutil.which(wrk)
    if wrk_path is None:
        raise RuntimeError("wrk not found: apt-get install wrk (Debian/Ubuntu)")
    cpus = sorted(os.sched_getaffinity(0))
    tracker_cpu, load_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    return wrk_path, tracker_cpu, load_cpu


def run_pinned(workdir: Path, *, devices: int, duration_s: float, runs: int,
               connections: int, wrk: str = "wrk", signed: bool = False,
               baseline: Path | None = None) -> dict[str, Any]:
    """The pinned benchmark (see the module docstring); a JSON-ready dict. With
    ``signed``, every phase runs against a second, signature-checking tracker too.
    With ``baseline`` (a checkout of another commit, e.g. ``git worktree add DIR
    COMMIT``), every phase runs against a tracker of that code too, on the same CPU in
    the same rounds (phases ``-baseline``), and the result gives this code's medians as
    a ratio of the baseline's.

    Raises:
        RuntimeError: ``wrk`` is missing, or the tracker or wrk failed.
    """
    wrk_path, tracker_cpu, load_cpu = wrk_and_cpus(wrk)
    db = workdir / "pinned.sqlite"
    _prepare(db)
    announce_lua = workdir / "announce.lua"
    announce_lua.write_text(_lua(_LUA_ANNOUNCE, devices))
    checkin_lua = workdir / "checkin.lua"
    checkin_lua.write_text(_lua(_LUA_CHECKIN, devices))
    fleet = _Fleet(workdir, devices) if signed else None
    procs: list[subprocess.Popen[str]] = []
    try:
        proc, api, lean = start_tracker(db, tracker_cpu)
        procs.append(proc)
        run = functools.partial(_run_wrk, wrk_path, load_cpu, connections=connections,
                                pid=proc.pid)
        base_urls: dict[str, str] = {}
        base_run: Callable[..., dict[str, Any]] | None = None
        if baseline is not None:
            base_db = workdir / "baseline.sqlite"
            _prepare_with(base_db, baseline)
            base_proc, base_api, base_lean = start_tracker(base_db, tracker_cpu,
                                                            source=baseline)
            procs.append(base_proc)
            base_urls = {"announce-lean": base_lean, "announce-hypercorn": base_api,
                         "checkin": base_api, "checkin-lean": base_lean}
            base_run = functools.partial(_run_wrk, wrk_path, load_cpu,
                                         connections=connections, pid=base_proc.pid)
        signed_run: Callable[[str, str, float], dict[str, Any]] | None = None
        if fleet is not None:
            signed_db = workdir / "signed.sqlite"
            _prepare(signed_db)
            signed_proc, signed_api, signed_lean = start_tracker(
                signed_db, tracker_cpu, fleet.ca_pem)
            procs.append(signed_proc)
            urls = {"announce-lean": signed_lean, "announce-hypercorn": signed_api,
                    "checkin": signed_api, "checkin-lean": signed_lean,
                    "announce-lean-keyed": signed_lean}

            def signed_run(phase: str, kind: str, seconds: float) -> dict[str, Any]:
                requests = workdir / "signed-requests.tsv"
                fleet.write_requests(requests, kind,
                                     int(_SIGNED_RATE_CAP[phase] * max(1.0, seconds)))
                script = workdir / "signed.lua"
                script.write_text(_LUA_SIGNED.replace("REQUESTS", str(requests))
                                  + _LUA_DONE)
                return _run_wrk(wrk_path, load_cpu, urls[phase], script,
                                connections=connections, duration_s=seconds,
                                pid=signed_proc.pid,
                                refused=functools.partial(_refused, signed_api))

        # Warm-up: every device checks in (admitted) and announces once.
        warm_s = max(1.0, duration_s / 2)
        run(api, checkin_lua, duration_s=warm_s)
        run(lean, announce_lua, duration_s=warm_s)
        if base_run is not None:
            base_run(base_urls["checkin"], checkin_lua, duration_s=warm_s)
            base_run(base_urls["announce-lean"], announce_lua, duration_s=warm_s)
        if signed_run is not None and fleet is not None:
            signed_run("checkin", "checkin", warm_s)
            signed_run("announce-lean", "announce", warm_s)
            fleet.fetch_keys(signed_api)
        rounds: list[dict[str, Any]] = []
        for _ in range(runs):
            this: dict[str, Any] = {}
            for phase, url, script in (("announce-lean", lean, announce_lua),
                                       ("announce-hypercorn", api, announce_lua),
                                       ("checkin", api, checkin_lua),
                                       ("checkin-lean", lean, checkin_lua)):
                this[phase] = run(url, script, duration_s=duration_s)
                if base_run is not None:
                    this[f"{phase}-baseline"] = base_run(base_urls[phase], script,
                                                         duration_s=duration_s)
                if signed_run is not None:
                    kind = "checkin" if phase.startswith("checkin") else "announce"
                    this[f"{phase}-signed"] = signed_run(phase, kind, duration_s)
                    if phase == "announce-lean":
                        this["announce-lean-keyed"] = signed_run(
                            "announce-lean-keyed", "announce-keyed", duration_s)
            rounds.append(this)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    medians = {phase: {key: statistics.median(r[phase][key] or 0 for r in rounds)
                       for key in ("requests_per_s", "p50_ms", "p99_ms",
                                   "requests_per_cpu_s")}
               for phase in rounds[0]}
    for phase in medians:
        medians[phase]["errors"] = sum(r[phase]["errors"] for r in rounds)
        medians[phase]["exhausted"] = any(r[phase]["exhausted"] for r in rounds)
    lean_median = medians["announce-lean"]
    versus = {phase: {key: round(medians[phase][key] / medians[f"{phase}-baseline"][key], 3)
                      for key in ("requests_per_s", "requests_per_cpu_s")
                      if medians[f"{phase}-baseline"][key]}
              for phase in ("announce-lean", "announce-hypercorn", "checkin", "checkin-lean")
              if f"{phase}-baseline" in medians}
    return {"mode": "pinned", "baseline": None if baseline is None else str(baseline),
            "versus_baseline": versus, "devices": devices, "duration_s": duration_s, "runs": runs,
            "connections": connections, "tracker_cpu": tracker_cpu, "load_cpu": load_cpu,
            "signed": signed,
            "load_generator": "wrk -t1 (Lua: distinct device id, peer id, port)",
            "machine": machine_info({}), "loadavg_after": os.getloadavg(),
            "target": {"announces_per_s": 5000, "p99_ms": 20,
                       "met_wall": lean_median["requests_per_s"] >= 5000
                       and lean_median["p99_ms"] < 20},
            "median": medians, "rounds": rounds}


def render_markdown(result: dict[str, Any]) -> str:
    """``tracker.md``: the medians and every round of a pinned run."""
    lines = [
        "# Tracker benchmark",
        "",
        f"`python -m bench.tracker`: tracker pinned to CPU {result['tracker_cpu']}, "
        f"wrk pinned to CPU {result['load_cpu']}, {result['connections']} keep-alive "
        f"connections, {result['devices']} simulated devices (one swarm), "
        f"{result['runs']} rounds of {result['duration_s']} s per phase; medians. "
        + ("Phases `-signed`: a second tracker process on the same CPU with "
           "`--device-ca`, every request signed by the device's fleet identity "
           "(ECDSA P-256), pre-signed and replayed in order by wrk; "
           "`announce-lean-keyed`: the same tracker, each announce authenticated by "
           "the device's announce key (HMAC-SHA256) instead. "
           if result.get("signed") else "") +
        "req/CPU-s = requests per second of tracker CPU time (robust to other load on "
        f"the machine; load average after the run: "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_after'])}).",
        "",
        "| phase | req/s | p50 ms | p99 ms | req/CPU-s | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase, m in result["median"].items():
        ran_out = " (pre-signed list ran out)" if m.get("exhausted") else ""
        lines.append(f"| {phase} | {m['requests_per_s']:.0f} | {m['p50_ms']:.2f} | "
                     f"{m['p99_ms']:.2f} | {m['requests_per_cpu_s']:.0f} | "
                     f"{m['errors']}{ran_out} |")
    if result.get("versus_baseline"):
        lines += ["", f"This code against the baseline checkout `{result['baseline']}` "
                  "(same CPU, same rounds; medians, ratio > 1: this code is faster):", "",
                  "| phase | req/s ratio | req/CPU-s ratio |", "|---|---:|---:|"]
        for phase, ratio in result["versus_baseline"].items():
            lines.append(f"| {phase} | {ratio.get('requests_per_s', 0):.3f} | "
                         f"{ratio.get('requests_per_cpu_s', 0):.3f} |")
    lines += ["", "Every round:", "", "| round | phase | req/s | p50 ms | p99 ms | "
              "req/CPU-s |", "|---:|---|---:|---:|---:|---:|"]
    for i, r in enumerate(result["rounds"], 1):
        for phase, m in r.items():
            lines.append(f"| {i} | {phase} | {m['requests_per_s']:.0f} | {m['p50_ms']:.2f} "
                         f"| {m['p99_ms']:.2f} | {m['requests_per_cpu_s'] or 0:.0f} |")
    lines += ["", f"Machine: `{json.dumps(result['machine'])}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pinned", "inprocess"), default="pinned")
    parser.add_argument("--devices", type=_positive, default=1000)
    parser.add_argument("--duration-s", type=_positive, default=5,
                        help="pinned: seconds per phase and round")
    parser.add_argument("--runs", type=_positive, default=5, help="pinned: rounds")
    parser.add_argument("--connections", type=_positive, default=32,
                        help="pinned: wrk keep-alive connections")
    parser.add_argument("--signed", action="store_true",
                        help="pinned: also run every phase against a tracker with "
                             "--device-ca, every request signed (tracker-signed.*)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                        help="pinned: also run every phase against a tracker of this "
                             "checkout (e.g. 'git worktree add /tmp/base COMMIT'), same CPU, "
                             "same rounds; the report gives the ratios (tracker-vs-baseline.*)")
    parser.add_argument("--db", metavar="URL", default=None,
                        help="pinned: also run the lean phases against trackers on this "
                             "PostgreSQL ('postgresql': a throwaway server for the run, "
                             "or postgresql://...), side by side with SQLite, and "
                             "opentracker as the reference when installed "
                             "(tracker-scale.*; bench/tracker_scale.py)")
    parser.add_argument("--processes", type=_positive, default=1,
                        help="with --db: also N tracker processes on it and a throwaway "
                             "Redis, behind nginx")
    parser.add_argument("--storm", type=_positive, default=None, metavar="DEVICES",
                        help="a check-in storm: DEVICES distinct devices into a throwaway "
                             "PostgreSQL (tracker-storm.*)")
    parser.add_argument("--storm-timeout-s", type=_positive, default=600)
    parser.add_argument("--requests", type=_positive, default=5000,
                        help="inprocess: requests per phase")
    parser.add_argument("--concurrency", type=_positive, default=64,
                        help="inprocess: concurrent clients")
    parser.add_argument("--transport", nargs="+", choices=("asgi", "http"),
                        default=["asgi", "http"], help="inprocess: transports")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.storm is not None or args.db is not None:
        from bench.tracker_scale import render_scale, render_storm, run_scale, run_storm
        with tempfile.TemporaryDirectory(prefix="swarmota-bench-tracker-") as tmp:
            if args.storm is not None:
                result = run_storm(Path(tmp), devices=args.storm,
                                   connections=args.connections,
                                   timeout_s=args.storm_timeout_s)
                name, text = "tracker-storm", render_storm(result)
            else:
                result = run_scale(Path(tmp), devices=args.devices,
                                   duration_s=args.duration_s, runs=args.runs,
                                   connections=args.connections, db=args.db,
                                   processes=args.processes, signed=args.signed)
                name, text = "tracker-scale" + ("-signed" if args.signed else ""), \
                    render_scale(result)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(text)
        print(text)
        return 0
    with tempfile.TemporaryDirectory(prefix="swarmota-bench-tracker-") as tmp:
        if args.mode == "pinned":
            result = run_pinned(Path(tmp), devices=args.devices, duration_s=args.duration_s,
                                runs=args.runs, connections=args.connections,
                                signed=args.signed, baseline=args.baseline)
        else:
            result = trio.run(functools.partial(
                run_bench, Path(tmp), devices=args.devices, requests=args.requests,
                concurrency=args.concurrency, transports=args.transport))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "pinned":
        name = ("tracker-vs-baseline" if args.baseline is not None
                else "tracker-signed" if args.signed else "tracker")
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(render_markdown(result))
        for phase, m in result["median"].items():
            print(f"{phase:27} {m['requests_per_s']:8.0f} req/s  p50 {m['p50_ms']:6.2f} ms"
                  f"  p99 {m['p99_ms']:6.2f} ms  {m['requests_per_cpu_s']:8.0f} req/CPU-s"
                  f"  errors {m['errors']}" + ("  (list exhausted)" if m["exhausted"] else ""))
        return 0
    (args.out / "tracker-inprocess.json").write_text(json.dumps(result, indent=2) + "\n")
    for transport, phases in result["transports"].items():
        for phase, r in phases.items():
            print(f"{transport:5} {phase:8} {r['requests_per_s']:8.0f} req/s  "
                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                  f"errors {r['errors']}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
