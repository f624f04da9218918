"""Footprint benchmark: what the device agent costs a device in memory and CPU.

Routers have little RAM, so this measures ``swarmota peer run`` (the agent as a daemon,
a separate process, exactly as a device runs it) from the outside, through ``/proc``:

* **RSS**: ``VmRSS`` and its peak ``VmHWM`` (``/proc/PID/status``), and the split of the
  resident set into anonymous memory (the heap: Python objects, buffers, libtorrent's
  queues) and file-backed pages (the interpreter, shared libraries, files mapped by
  libtorrent) from ``/proc/PID/smaps_rollup``; summed over the process and its children
  (the agent starts none unless a health command or hook is configured);
* **CPU**: user + system time per second of wall time (``/proc/PID/stat``).

Setup, on loopback, in this process: the real images of ``../shared/data``
(``rootfs-openssl-3.0.17`` is the installed base, ``3.0.20`` the update) are published
twice at the release zstd level, once with the full payload only and once with a delta
from the base as well (a device on the base takes the delta); a real origin server and a
real tracker serve them; one device is provisioned on the base image. Then, each
``--repeat`` times, with a fresh tracker database and device:

* ``idle``: the agent checks in every ``--idle-poll-s`` with nothing offered, for
  ``--idle-s`` after its first check-in; CPU is counted over that window only (the
  start-up, importing the agent, is reported beside it);
* ``update``: once the agent has checked in, the rollout of the update starts; measured
  from then until the agent has committed it: delta then full payload, each in direct
  mode (chunks from the origin over HTTP) and in swarm mode (libtorrent, with a seeder
  on loopback beside the origin). Peak RSS is ``VmHWM`` at the end of the update (exact,
  whatever the sampling interval); the anonymous and file-backed peaks are the largest
  sampled values. After the commit the agent is sampled a little longer: what it keeps.

Where the memory goes: the interpreter's floor and what importing the agent's pieces
adds (python alone; + trio, httpx; + cryptography, tuf; + libtorrent; + zstandard,
bsdiff4; the agent's modules; the whole command line that ``swarmota peer run`` loads),
each in a fresh interpreter; and the buffers an update holds by construction (the
delta apply's base, delta and result images, the zstd window of the full payload,
libtorrent's queued-disk-bytes bound), set beside the measured increments.

Timings and CPU are medians of the runs. Run: ``.venv/bin/python -m bench.footprint
[--repeat 3] [--idle-s 60] [--data ../shared/data] [--out bench/results]`` (or
``swarmota bench footprint``). Writes ``footprint.json`` and ``footprint.md``. Without
the images it says so and exits 2.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import trio
import zstandard

from bench.delta import DEFAULT_DATA, IMAGE_GLOB, load_images, machine_info
from swarmota.infra.fsio import atomic_write_bytes
from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import Payload, ReleaseManifest
from swarmota.peer.config import DeviceConfig
from swarmota.peer.delta import decode_bsdiff_container
from swarmota.peer.state import DeviceState, init_device
from swarmota.peer.swarm import SwarmConfig, session_settings
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.publish import DEFAULT_ZSTD_LEVEL, publish_release
from swarmota.seeder.repository import Repository
from swarmota.seeder.seeding import PayloadSeeder, SeedingConfig
from swarmota.seeder.server import serve_origin
from swarmota.tracker.catalogue import register_release, start_rollout
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore

__all__ = [
    "IMPORT_STEPS",
    "UPDATE_CELLS",
    "Sample",
    "main",
    "measure_imports",
    "parse_proc",
    "render_markdown",
    "run_bench",
    "sample_tree",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
PRODUCT = "acme-router"
HARDWARE_ID = "acme-router-hw1"
BASE_VERSION = "3.0.17"
TARGET_VERSION = "3.0.20"
PAYLOAD_KINDS = ("delta", "full")
UPDATE_CELLS: tuple[tuple[str, str], ...] = (
    ("delta", "direct"), ("delta", "swarm"), ("full", "direct"), ("full", "swarm"))
DEVICE_HOST = "127.0.0.11"
SEEDER_HOST = "127.0.0.3"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_AFTER_S = 2.0  # sampled this long after the commit: what the agent keeps
_STOP_GRACE_S = 10.0

# Cumulative: each step imports its modules and those of every step before it.
IMPORT_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python alone", ()),
    ("+ trio, httpx", ("trio", "httpx")),
    ("+ cryptography, tuf", ("cryptography.x509",
                             "cryptography.hazmat.primitives.asymmetric.ed25519",
                             "tuf.ngclient")),
    ("+ libtorrent", ("libtorrent",)),
    ("+ zstandard, bsdiff4", ("zstandard", "bsdiff4")),
    ("+ the agent (swarmota.peer.cli)", ("swarmota.peer.cli",)),
    ("+ the command line (swarmota.cli)", ("swarmota.cli",)),
)

# Both run as ``python -c CODE BLOCKED ...``: BLOCKED (comma-separated top-level names)
# cannot be imported, as on a device where those packages are not installed.
_BLOCK = (
    "import sys\n"
    "sys.modules.update(dict.fromkeys(\n"
    "    [n for n in sys.argv[1].split(',') if n and n not in sys.modules], None))\n"
)
_IMPORT_PROBE = _BLOCK + (
    "for name in sys.argv[2:]:\n"
    "    __import__(name)\n"
    "tops = sorted({m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
    "              - set(sys.stdlib_module_names))\n"
    "status = open('/proc/self/status').read()\n"
    "rollup = open('/proc/self/smaps_rollup').read()\n"
    "sys.stdout.write(repr((tops, len(sys.modules), status, rollup)))\n"
)
_AGENT = _BLOCK + "from swarmota.cli import main\nsys.exit(main(sys.argv[2:]))\n"


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def product_distributions(root: str = "swarmota") -> set[str]:
    """The distributions ``root`` needs, recursively, without optional extras (what a
    device install of the agent brings), as normalised names."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if _dist_key(name) in seen:
            continue
        seen.add(_dist_key(name))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement.partition(";")[2].replace("extra==", "extra =="):
                continue  # only with an extra
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
            if match:
                todo.append(match.group(1))
    return seen


def foreign_packages() -> list[str]:
    """Top-level import names installed here that belong to no distribution of the
    product's dependency closure (test, lint and benchmark tools): a device has none of
    them, and some libraries import them when present (httpx loads click, rich and
    pygments for its command line)."""
    product = product_distributions()
    return sorted(top for top, dists in metadata.packages_distributions().items()
                  if not any(_dist_key(d) in product for d in dists))


# --- /proc -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One look at a process tree. Memory in KiB; ``cpu_s`` is user + system time of the
    live processes plus what their waited-for children used; ``t_s``: monotonic time."""

    t_s: float
    rss_kib: int
    hwm_kib: int
    anon_kib: int
    file_kib: int
    cpu_s: float
    threads: int
    processes: int


def parse_proc(status: str, rollup: str, stat: str) -> dict[str, float]:
    """The numbers this benchmark reads from ``/proc/PID/{status,smaps_rollup,stat}``:
    ``rss_kib``, ``hwm_kib``, ``threads`` (status), ``anon_kib`` and ``file_kib``
    (smaps_rollup: ``Anonymous`` and ``Rss`` minus it; without smaps_rollup, status's
    ``RssAnon`` and ``RssFile``), ``cpu_s`` (stat: utime + stime + cutime + cstime).

    Raises:
        ValueError: a field is missing or malformed.
    """
    fields = _kib_fields(status)
    out: dict[str, float] = {"rss_kib": fields["VmRSS"], "hwm_kib": fields["VmHWM"],
                             "threads": _int_field(status, "Threads")}
    roll = _kib_fields(rollup)
    if "Rss" in roll and "Anonymous" in roll:
        out["anon_kib"] = roll["Anonymous"]
        out["file_kib"] = roll["Rss"] - roll["Anonymous"]
    else:
        out["anon_kib"] = fields["RssAnon"]
        out["file_kib"] = fields["RssFile"] + fields.get("RssShmem", 0)
    rest = stat[stat.rindex(")") + 2:].split()  # fields 3.. of proc(5): after "(comm)"
    out["cpu_s"] = sum(int(v) for v in rest[11:15]) / _CLK_TCK  # utime stime cutime cstime
    return out


def _kib_fields(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name.strip()] = int(parts[0])
    return out


def _int_field(text: str, name: str) -> int:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.strip())
    raise ValueError(f"no {name} in /proc status")


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _read_proc(pid: int) -> dict[str, float] | None:
    base = Path(f"/proc/{pid}")
    try:
        return parse_proc((base / "status").read_text(), (base / "smaps_rollup").read_text(),
                          (base / "stat").read_text())
    except (OSError, ValueError):  # gone (or a zombie: no memory fields left)
        return None


def sample_tree(pid: int, *, clock: Callable[[], float] = time.monotonic) -> Sample | None:
    """Sample ``pid`` and its descendants (``None`` once ``pid`` is gone). Peaks
    (``hwm_kib``) are summed: exact for one process, an upper bound for several."""
    pids, seen = [pid], set()
    total: dict[str, float] = {}
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        numbers = _read_proc(p)
        if numbers is None:
            if p == pid:
                return None
            continue
        for key, value in numbers.items():
            total[key] = total.get(key, 0) + value
        pids += _children(p)
    return Sample(t_s=clock(), rss_kib=int(total["rss_kib"]), hwm_kib=int(total["hwm_kib"]),
                  anon_kib=int(total["anon_kib"]), file_kib=int(total["file_kib"]),
                  cpu_s=total["cpu_s"], threads=int(total["threads"]), processes=len(seen))


async def _sample_forever(pid: int, interval_s: float, into: list[Sample]) -> None:
    while True:
        sample = sample_tree(pid)
        if sample is None:
            return
        into.append(sample)
        await trio.sleep(interval_s)


def window_stats(samples: Sequence[Sample], t0: float, t1: float) -> dict[str, Any]:
    """CPU and memory of ``samples`` between ``t0`` and ``t1`` (monotonic seconds):
    CPU seconds and percent of one core, resident set at the start and end, the largest
    sampled RSS, anonymous and file-backed sizes, the peak (``VmHWM``) at the end, the
    most threads. Raises ``ValueError`` if no sample falls in the window."""
    inside = [s for s in samples if t0 <= s.t_s <= t1]
    if len(inside) < 2:
        raise ValueError("fewer than two samples in the window: sample more often")
    first, last = inside[0], inside[-1]
    wall = last.t_s - first.t_s
    cpu = last.cpu_s - first.cpu_s
    return {
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
        "cpu_percent": round(100.0 * cpu / wall, 2) if wall > 0 else 0.0,
        "rss_start_kib": first.rss_kib, "rss_end_kib": last.rss_kib,
        "rss_median_kib": int(statistics.median(s.rss_kib for s in inside)),
        "rss_max_sampled_kib": max(s.rss_kib for s in inside),
        "hwm_kib": last.hwm_kib,
        "anon_median_kib": int(statistics.median(s.anon_kib for s in inside)),
        "file_median_kib": int(statistics.median(s.file_kib for s in inside)),
        "anon_max_kib": max(s.anon_kib for s in inside),
        "file_max_kib": max(s.file_kib for s in inside),
        "threads_max": max(s.threads for s in inside),
        "processes_max": max(s.processes for s in inside),
        "samples": len(inside),
    }


# --- where the memory goes: imports ------------------------------------------------------

def _probe_imports(modules: Sequence[str], blocked: Sequence[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, ",".join(blocked), *modules],
                          cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"importing {modules} failed: {proc.stderr[-2000:]}")
    tops, count, status, rollup = ast.literal_eval(proc.stdout)
    fields, roll = _kib_fields(status), _kib_fields(rollup)
    return {"rss_kib": fields["VmRSS"], "anon_kib": roll["Anonymous"],
            "file_kib": roll["Rss"] - roll["Anonymous"], "modules": count, "tops": tops}


def measure_imports(steps: Sequence[tuple[str, tuple[str, ...]]] = IMPORT_STEPS, *,
                    repeat: int = 3, blocked: Sequence[str] = ()) -> list[dict[str, Any]]:
    """RSS of a fresh interpreter after each cumulative import step (medians of
    ``repeat`` interpreters) and what each step adds to the one before; the new
    top-level packages each step loads (``blocked``: names that cannot be imported)."""
    out: list[dict[str, Any]] = []
    modules: list[str] = []
    previous: dict[str, Any] | None = None
    for label, names in steps:
        modules += names
        runs = [_probe_imports(modules, blocked) for _ in range(repeat)]
        step: dict[str, Any] = {"step": label, "imports": list(names)}
        for key in ("rss_kib", "anon_kib", "file_kib", "modules"):
            step[key] = int(statistics.median(r[key] for r in runs))
        step["added_kib"] = step["rss_kib"] - (previous["rss_kib"] if previous else 0)
        step["new_packages"] = sorted(set(runs[0]["tops"]) - set(
            previous["tops"] if previous else ()))
        step["tops"] = runs[0]["tops"]
        out.append(step)
        previous = step
    for step in out:
        del step["tops"]
    return out


# --- releases ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    """One repository with the base release (counter 1) and the update (counter 2)."""

    kind: str
    repo: Repository
    base: ReleaseManifest
    update: ReleaseManifest
    payload: Payload  # what a device on the base downloads
    base_image: Path


def publish(workdir: Path, base_image: Path, target_image: Path, kind: str, *,
            zstd_level: int = DEFAULT_ZSTD_LEVEL) -> Published:
    """Publish the base and the update into a new repository; the update with a delta
    from the base when ``kind`` is ``delta`` (a device on the base then takes it)."""
    repo = Repository.create(workdir / f"repo-{kind}")
    common: dict[str, Any] = {"product": PRODUCT, "compatibility": [HARDWARE_ID],
                              "zstd_level": zstd_level}
    m1 = publish_release(repo, base_image, version="1.0.0", release_counter=1, **common)
    m2 = publish_release(repo, target_image, version="2.0.0", release_counter=2,
                         bases=[base_image] if kind == "delta" else [], **common)
    payload = next(p for p in m2.payloads if p.kind == kind)
    return Published(kind, repo, m1, m2, payload, base_image)


# --- one device --------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """How a run is paced: sampling interval, the agent's poll interval, the idle window
    and the time limits."""

    sample_interval_s: float = 0.1
    idle_poll_s: float = 5.0
    update_poll_s: float = 0.5
    idle_s: float = 60.0
    startup_timeout_s: float = 120.0
    update_timeout_s: float = 600.0


class _Lines:
    """Status lines of ``peer run`` (one per pass), read from its stdout."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = trio.Event()

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for data in stream:
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                if b" status " in line:
                    self.lines.append(line.decode(errors="replace"))
                    self.changed.set()
                    self.changed = trio.Event()

    async def wait_for(self, count: int) -> str:
        while len(self.lines) < count:
            await self.changed.wait()
        return self.lines[count - 1]


async def run_device(workdir: Path, published: Published, *, mode: str, update: bool,
                     seeder: bool, timing: Timing, blocked: Sequence[str] = ()
                     ) -> dict[str, Any]:
    """Serve ``published`` on loopback, provision a device on its base, run
    ``swarmota peer run`` (``blocked``: top-level packages it cannot import) and measure
    it: idle (``update`` false) or while it installs the update.

    Raises:
        RuntimeError: the update failed.
        trio.TooSlowError: the agent did not check in or finish in time.
    """
    db = workdir / "tracker.sqlite"
    store = SqliteStore(db)
    try:
        register_release(store, Release.from_manifest(published.base), RolloutPlan.everyone(),
                         actor="bench")
        # known to the tracker (its swarm accepts the seeder's announces), offered to nobody
        register_release(store, Release.from_manifest(published.update), None, actor="bench")
    finally:
        store.close()
    origin = OriginApp(published.repo.origin_dir, OriginConfig())
    async with trio.open_nursery() as servers:
        origin_url = await servers.start(serve_origin, origin, ListenConfig())
        tracker_url = await servers.start(serve_tracker, TrackerConfig(db_path=db))
        if seeder:
            seeding = PayloadSeeder(published.repo.origin_dir, SeedingConfig(
                swarm=SwarmConfig(listen_host=SEEDER_HOST),
                announce_urls=(f"{tracker_url}/announce",)))
            await servers.start(seeding.run)
        state = init_device(workdir / "device", DeviceConfig(
            device_id="footprint-1", product=PRODUCT, hardware_id=HARDWARE_ID,
            origin_url=origin_url, tracker_url=tracker_url, download_mode=mode,
            swarm_listen=f"{DEVICE_HOST}:0", seed_time_s=0.0),
            root_json=published.repo.root_bytes(), image=published.base_image,
            version="1.0.0", release_counter=1)
        poll_s = timing.update_poll_s if update else timing.idle_poll_s
        result = await _measure_agent(workdir, state, published, db, update=update,
                                      poll_s=poll_s, timing=timing, blocked=blocked)
        servers.cancel_scope.cancel()
    return result


async def _measure_agent(workdir: Path, state: DeviceState, published: Published,
                         db: Path, *, update: bool, poll_s: float, timing: Timing,
                         blocked: Sequence[str]) -> dict[str, Any]:
    argv = [sys.executable, "-c", _AGENT, ",".join(blocked), "peer", "run", str(state.root),
            "--poll-interval-s", str(poll_s), "--jitter-fraction", "0", "--dbus", "none",
            "--seed-time-s", "0"]
    samples: list[Sample] = []
    lines = _Lines()
    with open(workdir / "agent.log", "wb") as log:
        started = time.monotonic()
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=log,
                                                cwd=REPO_ROOT)
        try:
            async with trio.open_nursery() as tasks:
                assert proc.stdout is not None
                tasks.start_soon(lines.read, proc.stdout)
                tasks.start_soon(_sample_forever, proc.pid, timing.sample_interval_s, samples)
                with trio.fail_after(timing.startup_timeout_s):
                    await lines.wait_for(1)  # started and checked in: nothing offered
                ready = time.monotonic()
                out: dict[str, Any] = {"startup_s": round(ready - started, 3),
                                       "startup_cpu_s": _cpu_at(samples, ready)}
                if update:
                    out.update(await _update_window(state, published, db, lines, samples,
                                                    timing))
                else:
                    await trio.sleep(timing.idle_s)
                    out["idle"] = window_stats(samples, ready, time.monotonic())
                    out["passes"] = len(lines.lines)
                tasks.cancel_scope.cancel()
        finally:
            await _stop(proc)
    return out


async def _update_window(state: DeviceState, published: Published, db: Path,
                         lines: _Lines, samples: list[Sample], timing: Timing
                         ) -> dict[str, Any]:
    seen = len(lines.lines)
    store = SqliteStore(db)
    try:
        start_rollout(store, Release.from_manifest(published.update), RolloutPlan.everyone(),
                      now=time.time(), actor="bench")
    finally:
        store.close()
    offered = time.monotonic()
    with trio.fail_after(timing.update_timeout_s):
        while True:
            seen += 1
            line = await lines.wait_for(seen)
            result = state.last_result() or {}
            if result.get("updated") or result.get("status", 0) != 0:
                break
    done = time.monotonic()
    if not (result.get("updated") and state.bootctl().committed == "b"):
        raise RuntimeError(f"the update failed: {line}")
    await trio.sleep(_AFTER_S)
    after = samples[-1]
    return {
        "update": window_stats(samples, offered, done),
        "rss_after_kib": after.rss_kib, "anon_after_kib": after.anon_kib,
        "file_after_kib": after.file_kib,
        "payload_kind": result.get("payload_kind"),
        "bytes_origin": result.get("bytes_origin", 0),
        "bytes_peers": result.get("bytes_peers", 0),
        "agent_timings_s": result.get("timings_s", {}),
    }


def _cpu_at(samples: Sequence[Sample], t: float) -> float:
    before = [s for s in samples if s.t_s <= t]
    return round(before[-1].cpu_s, 3) if before else 0.0


async def _stop(proc: trio.Process) -> None:
    """SIGTERM (the agent exits at once when idle), SIGKILL after a grace period."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(_STOP_GRACE_S):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    with trio.CancelScope(shield=True):
        await proc.wait()


# --- contributors by construction --------------------------------------------------------

def contributors(delta: Published, full: Published) -> dict[str, Any]:
    """The buffers an update holds by construction, in KiB: a delta is applied in
    memory (base image, delta payload, decoded streams, result image); the full payload
    is decompressed as a stream through the frame's zstd window; libtorrent keeps up to
    ``max_queued_disk_bytes`` of verified pieces before they are written."""
    base_bytes = delta.base_image.stat().st_size
    delta_path = delta.repo.origin_dir / delta.payload.path
    full_path = full.repo.origin_dir / full.payload.path
    image_bytes = delta.update.image.size
    streams = 0
    if delta.payload.encoding == "bsdiff-zstd":
        base = delta.base_image.read_bytes()
        control, diff, extra, _ = decode_bsdiff_container(
            delta_path.read_bytes(), max_target_bytes=image_bytes, base=base)
        streams = len(control) + len(diff) + len(extra)
    with open(full_path, "rb") as fh:
        window = zstandard.get_frame_parameters(fh.read(18)).window_size
    queued = int(session_settings(SwarmConfig())["max_queued_disk_bytes"])
    kib = 1024
    return {
        "image_kib": image_bytes // kib,
        "delta_encoding": delta.payload.encoding,
        "delta_payload_kib": delta.payload.size // kib,
        "delta_decoded_streams_kib": streams // kib,
        "delta_apply_holds_kib": (base_bytes + delta.payload.size + streams
                                  + image_bytes) // kib,
        "full_payload_kib": full.payload.size // kib,
        "full_zstd_window_kib": window // kib,
        "full_install_holds_kib": (window + (1 << 20)) // kib,  # window + a 1 MiB block
        "libtorrent_max_queued_disk_kib": queued // kib,
    }


# --- the benchmark -----------------------------------------------------------------------

def _median_of(runs: Sequence[dict[str, Any]], path: Sequence[str]) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(value)
    return float(statistics.median(values))


def _summary(runs: Sequence[dict[str, Any]], section: str,
             extra: Iterable[str] = ()) -> dict[str, Any]:
    keys = [k for k, v in runs[0][section].items() if isinstance(v, int | float)]
    out: dict[str, Any] = {k: _median_of(runs, (section, k)) for k in keys}
    for k in ("startup_s", "startup_cpu_s", *extra):
        out[k] = _median_of(runs, (k,))
    return {k: (round(v, 3) if k.endswith(("_s", "percent")) else int(v))
            for k, v in out.items()}


async def run_bench(base_image: Path, target_image: Path, workdir: Path, *,
                    repeat: int = 3, timing: Timing = Timing(),
                    cells: Sequence[tuple[str, str]] = UPDATE_CELLS,
                    import_steps: Sequence[tuple[str, tuple[str, ...]]] = IMPORT_STEPS,
                    zstd_level: int = DEFAULT_ZSTD_LEVEL, device_like: bool = True,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark; returns a JSON-ready result. ``device_like``: the agent and
    the import ladder cannot import :func:`foreign_packages` (as on a device)."""
    blocked = foreign_packages() if device_like else []
    load_before = os.getloadavg()
    progress("publishing the releases (full payload; full payload and delta)")
    published: dict[str, Published] = {}
    for kind in PAYLOAD_KINDS:
        published[kind] = await trio.to_thread.run_sync(functools.partial(
            publish, workdir, base_image, target_image, kind, zstd_level=zstd_level))
    progress("import ladder (fresh interpreters)")
    imports = await trio.to_thread.run_sync(
        lambda: measure_imports(import_steps, repeat=repeat, blocked=blocked))
    # the whole ladder's last step again, with every installed package importable
    [dev_venv] = await trio.to_thread.run_sync(
        lambda: measure_imports([("all", tuple(m for _, ms in import_steps for m in ms))],
                                repeat=repeat))
    idle_runs = []
    for rep in range(repeat):
        run_dir = workdir / f"idle-{rep}"
        run_dir.mkdir()
        run = await run_device(run_dir, published["delta"], mode="swarm", update=False,
                               seeder=False, timing=timing, blocked=blocked)
        idle_runs.append(run)
        progress(f"  idle run {rep + 1}/{repeat}: RSS {run['idle']['rss_end_kib'] / 1024:.1f} "
                 f"MiB, CPU {run['idle']['cpu_percent']:.2f} %")
    updates = []
    for kind, mode in cells:
        runs = []
        for rep in range(repeat):
            run_dir = workdir / f"update-{kind}-{mode}-{rep}"
            run_dir.mkdir()
            run = await run_device(run_dir, published[kind], mode=mode, update=True,
                                   seeder=mode == "swarm", timing=timing,
                                   blocked=blocked)
            if run["payload_kind"] != kind:
                raise RuntimeError(f"the device took the {run['payload_kind']} payload, "
                                   f"not the {kind}")
            runs.append(run)
            progress(f"  {kind} {mode} run {rep + 1}/{repeat}: peak RSS "
                     f"{run['update']['hwm_kib'] / 1024:.1f} MiB, "
                     f"{run['update']['wall_s']:.1f} s, CPU {run['update']['cpu_s']:.2f} s")
        updates.append({
            "payload": kind, "mode": mode, "payload_bytes": published[kind].payload.size,
            "median": _summary(runs, "update", ("rss_after_kib", "anon_after_kib",
                                                "file_after_kib", "bytes_origin",
                                                "bytes_peers")),
            "runs": runs})
    return {
        "benchmark": "footprint", "repeat": repeat, "timing": asdict(timing),
        "zstd_level": zstd_level,
        "images": {"base": base_image.name, "target": target_image.name,
                   "base_bytes": base_image.stat().st_size,
                   "target_bytes": target_image.stat().st_size},
        "imports": imports, "blocked_packages": blocked,
        "imports_with_dev_packages": {
            "rss_kib": dev_venv["rss_kib"],
            "more_than_device_kib": dev_venv["rss_kib"] - imports[-1]["rss_kib"],
            "more_packages": sorted(set(dev_venv["new_packages"]) - {
                p for step in imports for p in step["new_packages"]})},
        "idle": {"median": _summary(idle_runs, "idle", ("passes",)), "runs": idle_runs},
        "updates": updates,
        "contributors": contributors(published["delta"], published["full"]),
        # the machine's load (1, 5, 15 min) at the start and the end: CPU times are
        # the agent's own, but wall times stretch on a busy machine
        "load_average": {"start": [round(v, 2) for v in load_before],
                         "end": [round(v, 2) for v in os.getloadavg()]},
        "notes": [
            "the agent is `swarmota peer run --dbus none --seed-time-s 0` in its own "
            "process, sampled from /proc every "
            f"{timing.sample_interval_s:g} s; tracker, origin and seeder run in the "
            "benchmark's process on the same machine and are not counted",
            "peak RSS is VmHWM (exact); anonymous and file-backed peaks are sampled maxima",
            "update windows run from the start of the rollout until the agent reported the "
            f"commit; the agent polls every {timing.update_poll_s:g} s then",
            "idle CPU depends on the poll interval: a deployed agent polls when the "
            "tracker asks (poll_after_s, an hour by default), not every "
            f"{timing.idle_poll_s:g} s",
        ],
    }


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """Idle RSS, CPU idle %, and the largest peak RSS of each payload kind (MiB)."""
    idle = result["idle"]["median"]
    peaks: dict[str, float] = {}
    for cell in result["updates"]:
        peak = cell["median"]["hwm_kib"] / 1024
        peaks[cell["payload"]] = max(peaks.get(cell["payload"], 0.0), peak)
    return {"idle_rss_mib": round(idle["rss_end_kib"] / 1024, 1),
            "idle_cpu_percent": idle["cpu_percent"],
            "peak_rss_mib": {k: round(v, 1) for k, v in peaks.items()}}


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def render_markdown(result: dict[str, Any]) -> str:
    t = result["timing"]
    idle = result["idle"]["median"]
    head = headline(result)
    images = result["images"]
    lines = [
        "# Footprint of the device agent", "",
        f"`swarmota peer run` on one device, base image `{images['base']}` "
        f"({images['base_bytes']:,} bytes), update `{images['target']}` "
        f"({images['target_bytes']:,} bytes), payloads at zstd level "
        f"{result['zstd_level']}. Medians of {result['repeat']} runs; memory in MiB.", "",
        f"**Idle RSS {head['idle_rss_mib']} MiB, CPU {head['idle_cpu_percent']:.2f} % of "
        f"one core** checking in every {t['idle_poll_s']:g} s; **peak RSS** "
        + ", ".join(f"{v} MiB during a {k} update" for k, v in head["peak_rss_mib"].items())
        + " (the largest of direct and swarm mode).", "",
        "## Where the memory goes: imports", "",
        "A fresh interpreter after each cumulative step (RSS, anonymous and file-backed "
        "parts), and what the step adds.", "",
        "| step | RSS | added | anonymous | file-backed | modules | new packages |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in result["imports"]:
        packages = ", ".join(s["new_packages"][:12]) + (
            f" (+{len(s['new_packages']) - 12})" if len(s["new_packages"]) > 12 else "")
        lines.append(f"| {s['step']} | {_mib(s['rss_kib'])} | {_mib(s['added_kib'])} "
                     f"| {_mib(s['anon_kib'])} | {_mib(s['file_kib'])} | {s['modules']} "
                     f"| {packages} |")
    dev = result["imports_with_dev_packages"]
    lines += [
        "", f"Packages outside the product's dependency closure cannot be imported here "
        f"(a device does not have them; {len(result['blocked_packages'])} blocked). With "
        f"them importable, as in a development checkout, the last step takes "
        f"{_mib(dev['rss_kib'])} MiB ({_mib(dev['more_than_device_kib'])} more: "
        f"{', '.join(dev['more_packages']) or 'nothing else'}).",
        "", "## Idle", "",
        f"Checking in every {t['idle_poll_s']:g} s with nothing offered, for "
        f"{t['idle_s']:g} s after the first check-in.", "",
        "| RSS | peak (VmHWM) | anonymous | file-backed | CPU % | CPU s | check-ins "
        "| threads | start-up s | start-up CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {_mib(idle['rss_end_kib'])} | {_mib(idle['hwm_kib'])} "
        f"| {_mib(idle['anon_median_kib'])} | {_mib(idle['file_median_kib'])} "
        f"| {idle['cpu_percent']:.2f} | {idle['cpu_s']:.2f} | {idle['passes']} "
        f"| {idle['threads_max']} | {idle['startup_s']:.2f} | {idle['startup_cpu_s']:.2f} |",
        "", "## During an update", "",
        "From the start of the rollout until the agent committed the update; "
        "\"after\": 2 s after the commit, back to idle.", "",
        "| payload | mode | payload bytes | s | CPU s | CPU % | RSS before | peak (VmHWM) "
        "| peak anonymous | peak file-backed | after | threads | from peers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in result["updates"]:
        m = cell["median"]
        lines.append(
            f"| {cell['payload']} | {cell['mode']} | {cell['payload_bytes']:,} "
            f"| {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['cpu_percent']:.1f} "
            f"| {_mib(m['rss_start_kib'])} | {_mib(m['hwm_kib'])} | {_mib(m['anon_max_kib'])} "
            f"| {_mib(m['file_max_kib'])} | {_mib(m['rss_after_kib'])} | {m['threads_max']} "
            f"| {m['bytes_peers']:,} |")
    c = result["contributors"]
    lines += [
        "", "## What an update holds by construction", "",
        "| buffer | MiB |", "|---|---:|",
        f"| delta apply ({c['delta_encoding']}): base image + delta payload + decoded "
        f"streams + result image | {_mib(c['delta_apply_holds_kib'])} |",
        f"| of it: image | {_mib(c['image_kib'])} |",
        f"| of it: decoded bsdiff streams | {_mib(c['delta_decoded_streams_kib'])} |",
        f"| full payload install: zstd window + 1 MiB block | "
        f"{_mib(c['full_install_holds_kib'])} |",
        f"| libtorrent max_queued_disk_bytes (verified pieces not yet written) | "
        f"{_mib(c['libtorrent_max_queued_disk_kib'])} |",
        "", "Notes: " + "; ".join(result["notes"]) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.footprint",
        description="Measure the device agent's footprint: RSS and CPU of 'swarmota peer "
                    "run' idle and while it installs an update of the real images "
                    f"(../shared/data: {BASE_VERSION} -> {TARGET_VERSION}; delta and full "
                    "payload, direct and swarm mode), and what importing its pieces "
                    "costs. Writes footprint.json and footprint.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"directory with {IMAGE_GLOB} (zstd-compressed images)")
    parser.add_argument("--base-version", default=BASE_VERSION,
                        help="image the device runs")
    parser.add_argument("--target-version", default=TARGET_VERSION, help="the update")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians")
    parser.add_argument("--idle-s", type=float, default=60.0,
                        help="idle window after the first check-in")
    parser.add_argument("--idle-poll-s", type=float, default=5.0,
                        help="the agent's poll interval while idle")
    parser.add_argument("--sample-interval-s", type=float, default=0.1,
                        help="how often /proc is read")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for footprint.json and footprint.md")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if not (0 < args.idle_s <= 3600 and args.idle_poll_s > 0
            and 0.01 <= args.sample_interval_s <= 5):
        parser.error("--idle-s must be within (0, 3600], --idle-poll-s positive and "
                     "--sample-interval-s within [0.01, 5]")
    if not Path("/proc/self/smaps_rollup").exists():
        print("footprint: needs Linux /proc (smaps_rollup)", file=sys.stderr)
        return 2
    if not args.data.is_dir() or not any(args.data.glob(IMAGE_GLOB)):
        print(f"footprint: no data: {args.data} has no {IMAGE_GLOB}", file=sys.stderr)
        return 2
    timing = Timing(sample_interval_s=args.sample_interval_s, idle_poll_s=args.idle_poll_s,
                    idle_s=args.idle_s)
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        images = dict(load_images(args.data, work / "images"))
        missing = {args.base_version, args.target_version} - set(images)
        if missing:
            print(f"footprint: no data: no image of {', '.join(sorted(missing))} in "
                  f"{args.data}", file=sys.stderr)
            return 2
        result = trio.run(lambda: run_bench(
            images[args.base_version], images[args.target_version], work,
            repeat=args.repeat, timing=timing))
    result["machine"] = machine_info({})
    result["data"] = str(args.data)
    markdown = render_markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "footprint.json",
                       (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(args.out / "footprint.md", markdown.encode())
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
