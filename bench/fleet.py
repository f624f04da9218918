"""Fleet benchmark on a shaped home network: how much origin bandwidth and time swarmota saves.

Run as root: ``.venv/bin/python -m bench.fleet`` (or ``swarmota bench fleet``). It
creates its own network namespace (:mod:`bench.netns`), brings up loopback inside it and
shapes it with ``tc``: everything the origin (127.0.1.1) sends goes through a link of
``--origin-mbit`` (a CDN-to-home link), everything else (device to device, the tracker)
through the LAN class, unshaped unless ``--lan-mbit`` is given. The benchmark then runs
again inside the namespace (``--inside``); on the way out, also on Ctrl-C, SIGTERM or
an error, every process inside is killed and the namespace deleted.

Inside, one run publishes v1 and v2 of a generated firmware-like image twice: once with
the full payload only, once with a delta from v1 as well (devices on v1 take the delta).
Then, for each payload kind, each fleet size and each scenario, ``--repeat`` times, with
a fresh origin server (unlimited: ``tc`` is the bottleneck; by default nginx with
docs/ORIGIN.md's configuration, as a CDN would serve the tree, ``--origin python`` for
the embedded server in this process) and a fresh tracker (in this process):

* ``baseline``: each device downloads the payload from the origin with a plain HTTP
  client (one GET, stdlib ``urllib``, SHA-256 checked), as fleets do today;
* ``direct``: the swarmota agent in direct mode (``swarmota peer update``);
* ``swarm``: the swarmota agent in swarm mode; no seeder, so the origin is the only
  source and ``payload / origin rate`` is the lower bound of the fleet's completion.

Devices are separate processes with their own addresses (127.0.2.10 and up for their
BitTorrent sessions), started together: each loads its program first and all are
released at once (:mod:`bench.launch`), so that times are not those of dozens of
interpreters starting on two cores. A swarm-mode device that has installed keeps seeding until the
whole fleet is done (deployed devices seed for their ``seed_time_s``).

Measured per run: origin egress (bytes the origin server sent, and on the shaped link as
``tc`` counts them, headers included) over the payload size; per device: when the
payload was delivered (every chunk verified: check-in, metadata and transfer phases of
the agent) and when the update was installed (process exit for the baseline, the
committed result for the agent), bytes from the origin and from peers; CPU seconds per
device (user + system of the device processes). Results are medians over the repetitions,
with the lower bound beside them, in ``fleet.json``, ``fleet.md`` and, when matplotlib
is installed (``pip install -e '.[plot]'``), ``fleet.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.delta import machine_info
from bench.netns import (
    ORIGIN_CLASS,
    NetnsError,
    Shaping,
    class_sent_bytes,
    exec_argv,
    missing_privileges,
    shaped_namespace,
)
from bench.origin_nginx import nginx_binary, run_nginx_origin
from swarmota.demo import write_images
from swarmota.infra.fsio import atomic_write_bytes
from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import Payload, ReleaseManifest
from swarmota.peer.config import DeviceConfig
from swarmota.peer.state import init_device
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.publish import publish_release
from swarmota.seeder.repository import Repository
from swarmota.seeder.server import serve_origin
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore

__all__ = ["DeviceRun", "FleetConfig", "RunResult", "main", "render_markdown", "summarize"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
SCENARIOS = ("baseline", "direct", "swarm")
PAYLOAD_KINDS = ("full", "delta")
ORIGINS = ("nginx", "python")
ORIGIN_IP = "127.0.1.1"
TRACKER_IP = "127.0.1.2"
MAX_DEVICES = 200  # 127.0.2.10 .. 127.0.2.209
PRODUCT = "acme-router"
HARDWARE_ID = "acme-router-hw1"
TARGETS = {
    # bytes sent by the origin and the tracker together (moving bytes from the CDN to the
    # tracker is no saving), completion, and the saving against plain downloads
    "full": {"origin_tracker_x_payload": 1.05, "completion_x_lower_bound": 1.15,
             "baseline_over_swarm_origin_egress": 10.0},
    "delta": {"origin_tracker_x_payload": 1.15, "completion_x_lower_bound": 1.5,
              "baseline_over_swarm_origin_egress": 10.0},
}
TARGET_FLEET = 16
_POLL_S = 0.05
_STOP_GRACE_S = 10.0
_LOAD_TIMEOUT_S = 120.0
# What ``swarmota peer update`` imports, loaded before the start signal: swarmota.cli
# builds its whole command tree (seeder, tracker, demo...) before running a command, and
# 16 interpreters compiling those modules at once took 0.4 s of CPU each, in the
# middle of the fleet's update. Likewise the system's CA bundle (0.2 s on a loaded
# machine), which a device's daemon (``peer run``) loads once, not at every update.
_AGENT_MODULES = ",".join(("swarmota.cli", "swarmota.peer.agent", "swarmota.peer.cli",
                           "swarmota.seeder.cli", "swarmota.tracker.cli", "swarmota.demo",
                           "swarmota.tlscli",
                           "swarmota.peer.http:_system_tls_context"))


@dataclass(frozen=True)
class FleetConfig:
    fleet_sizes: tuple[int, ...] = (4, 8, 16)
    repeat: int = 3
    image_bytes: int = 32 << 20
    origin_rate_bits_per_s: int = 20_000_000
    lan_rate_bits_per_s: int = 0
    scenarios: tuple[str, ...] = SCENARIOS
    kinds: tuple[str, ...] = PAYLOAD_KINDS
    run_timeout_s: float = 1800.0
    origin: str = "nginx"
    """``nginx``: docs/ORIGIN.md's configuration, run by nginx (a CDN's role);
    ``python``: the embedded origin server, in the benchmark's process."""

    @property
    def origin_rate_bytes_per_s(self) -> float:
        return self.origin_rate_bits_per_s / 8

    def shaping(self) -> Shaping:
        return Shaping(ORIGIN_IP, self.origin_rate_bits_per_s, self.lan_rate_bits_per_s,
                       counted_ips=(TRACKER_IP,))


@dataclass(frozen=True)
class DeviceRun:
    """One device in one run. Times are seconds from the start of the fleet update."""

    device_id: str
    ok: bool
    message: str
    delivered_s: float
    installed_s: float
    bytes_origin: int
    bytes_peers: int
    bytes_metadata: int = 0  # TUF metadata (the agent's count; not in bytes_origin)
    timings_s: dict[str, float] = field(default_factory=dict)  # the agent's phases


@dataclass(frozen=True)
class RunResult:
    """One fleet update: N devices, one scenario, one payload kind."""

    kind: str
    scenario: str
    devices: int
    payload_bytes: int
    origin_bytes_total: int
    origin_bytes_payloads: int  # torrent files included
    origin_link_bytes: int  # through the shaped class, as tc counts (headers included)
    cpu_s: float  # all device processes, user + system
    servers_cpu_s: float = 0.0  # the origin's (nginx, or in this process) and this process's
    load_1m: float = 0.0  # the machine's load average (1 min) when the devices were released
    origin_bytes_metadata: int = 0  # TUF metadata (metadata/)
    origin_bytes_targets: int = 0  # release manifests (targets/)
    origin_bytes_torrents: int = 0  # .torrent files (of origin_bytes_payloads)
    origin_bytes_chunk_lists: int = 0  # .chunks files (of origin_bytes_payloads)
    tracker_link_bytes: int = 0  # everything the tracker sent, as tc counts
    device_runs: list[DeviceRun] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and all(d.ok for d in self.device_runs)


# --- the fleet ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    repo: Repository
    releases: tuple[ReleaseManifest, ...]
    payload: Payload  # what a device on v1 downloads
    base_image: Path


def publish(workdir: Path, images: Path, kind: str) -> Published:
    """v1 and v2 of the generated image; v2 with a delta from v1 when ``kind`` is delta."""
    repo = Repository.create(workdir / f"repo-{kind}")
    common: dict[str, Any] = {"product": PRODUCT, "compatibility": [HARDWARE_ID],
                              "zstd_level": 3}
    m1 = publish_release(repo, images / "v1.img", version="1.0.0", release_counter=1,
                         **common)
    m2 = publish_release(repo, images / "v2.img", version="2.0.0", release_counter=2,
                         bases=[images / "v1.img"] if kind == "delta" else [], **common)
    payload = m2.payloads[1] if kind == "delta" else m2.full_payload
    return Published(repo, (m1, m2), payload, images / "v1.img")


async def run_fleet(workdir: Path, published: Published, *, kind: str, scenario: str,
                    devices: int, config: FleetConfig, namespace: str | None) -> RunResult:
    """Update ``devices`` devices from v1 to v2 at once in ``scenario``; measure."""
    db = workdir / "tracker.sqlite"
    store = SqliteStore(db)
    try:
        for m in published.releases:  # every device at once: the benchmark measures delivery
            register_release(store, Release.from_manifest(m), RolloutPlan.everyone(),
                             actor="bench")
    finally:
        store.close()
    payload = published.payload
    lower_bound = payload.size / config.origin_rate_bytes_per_s
    timeout = min(config.run_timeout_s, 120.0 + 4 * devices * lower_bound)
    with contextlib.ExitStack() as stack:
        async with trio.open_nursery() as servers:
            if config.origin == "nginx":
                nginx = stack.enter_context(run_nginx_origin(
                    published.repo.origin_dir, workdir, host=ORIGIN_IP))
                origin_url, origin_stats, origin_cpu = nginx.url, nginx.statistics, nginx.cpu_s
            else:
                origin = OriginApp(published.repo.origin_dir, OriginConfig())
                origin_url = await servers.start(serve_origin, origin,
                                                 ListenConfig(host=ORIGIN_IP))
                origin_stats, origin_cpu = origin.statistics, lambda: 0.0
            tracker_url = await servers.start(serve_tracker, TrackerConfig(
                db_path=db, listen=ListenConfig(host=TRACKER_IP)))
            argvs, states = _device_commands(workdir, published, scenario, devices,
                                             origin_url, tracker_url, timeout)
            link_before = _link_bytes(namespace, config)
            cpu_before, servers_before = _children_cpu_s(), time.process_time() + origin_cpu()
            load = os.getloadavg()[0]  # the machine is shared: how busy it was
            started, ended, outputs, failures = await _run_devices(argvs, states, timeout)
            cpu = _children_cpu_s() - cpu_before
            servers_cpu = time.process_time() + origin_cpu() - servers_before
            link_after = _link_bytes(namespace, config)
            stats = origin_stats()
            servers.cancel_scope.cancel()
    runs = [_device_run(f"dev-{i:03d}", states[i], ended[i], outputs[i], started)
            for i in range(devices)]
    return RunResult(kind=kind, scenario=scenario, devices=devices, payload_bytes=payload.size,
                     origin_bytes_total=stats.bytes_total,
                     origin_bytes_payloads=stats.bytes_payloads,
                     origin_link_bytes=link_after[0] - link_before[0],
                     cpu_s=round(cpu, 3), servers_cpu_s=round(servers_cpu, 3),
                     load_1m=round(load, 2),
                     device_runs=runs, failures=failures,
                     origin_bytes_metadata=stats.bytes_metadata,
                     origin_bytes_targets=stats.bytes_targets,
                     origin_bytes_torrents=stats.bytes_torrents,
                     origin_bytes_chunk_lists=stats.bytes_chunk_lists,
                     tracker_link_bytes=link_after[1] - link_before[1])


def _device_commands(workdir: Path, published: Published, scenario: str, devices: int,
                     origin_url: str, tracker_url: str,
                     timeout: float) -> tuple[list[list[str]], list[Path | None]]:
    argvs: list[list[str]] = []
    states: list[Path | None] = []
    payload_url = f"{origin_url}/{published.payload.path}"
    for i in range(devices):
        device_id = f"dev-{i:03d}"
        if scenario == "baseline":
            out = workdir / "downloads" / device_id
            out.parent.mkdir(parents=True, exist_ok=True)
            argvs.append(["bench.httpget", payload_url, str(out), published.payload.sha256])
            states.append(None)
            continue
        config = DeviceConfig(
            device_id=device_id, product=PRODUCT, hardware_id=HARDWARE_ID,
            origin_url=origin_url, tracker_url=tracker_url, download_mode=scenario,
            swarm_listen=f"127.0.2.{10 + i}:0", seed_time_s=timeout, http_timeout_s=120.0)
        state = init_device(workdir / "devices" / device_id, config,
                            root_json=published.repo.root_bytes(),
                            image=published.base_image, version="1.0.0", release_counter=1)
        argvs.append([_AGENT_MODULES, "peer", "update", str(state.root), "--json"])
        states.append(state.root)
    return argvs, states


async def _run_devices(argvs: Sequence[list[str]], states: Sequence[Path | None],
                       timeout: float
                       ) -> tuple[float, list[float | None], list[bytes], list[str]]:
    """Start every device process (through :mod:`bench.launch`), release them together
    once all are loaded, and wait until each is done: its process exited or (agents) its
    committed result is on disk; then stop those still seeding. Returns the wall time of
    the release, per device the wall time it was done and its standard output (without
    the ``ready`` line), and failures."""
    n = len(argvs)
    ended: list[float | None] = [None] * n
    outputs = [bytearray() for _ in range(n)]
    loaded = [trio.Event() for _ in range(n)]
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        procs = [await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench.launch", *argv], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO_ROOT)
            for argv in argvs]
        for i, proc in enumerate(procs):
            nursery.start_soon(_drain, proc, outputs[i], loaded[i])
        try:
            with trio.move_on_after(_LOAD_TIMEOUT_S):
                for event in loaded:
                    await event.wait()
            started = time.time()
            for proc in procs:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    assert proc.stdin is not None
                    await proc.stdin.send_all(b"go\n")
            with trio.move_on_after(timeout) as scope:
                while any(e is None for e in ended):
                    for i, proc in enumerate(procs):
                        if ended[i] is None and (proc.poll() is not None
                                                 or _result_written(states[i])):
                            ended[i] = time.time()
                    await trio.sleep(_POLL_S)
            if scope.cancelled_caught:
                failures.append(f"{sum(e is None for e in ended)} devices did not finish "
                                f"within {timeout:.0f} s")
        finally:
            with trio.CancelScope(shield=True):
                await _stop(procs)
    return started, ended, [bytes(o) for o in outputs], failures


async def _drain(proc: trio.Process, into: bytearray, loaded: trio.Event) -> None:
    """Collect a device's standard output; ``loaded`` once it said ``ready`` (or ended)."""
    assert proc.stdout is not None
    try:
        while chunk := await proc.stdout.receive_some(65536):
            into += chunk
            if not loaded.is_set() and b"ready\n" in into:
                del into[:into.index(b"ready\n") + len(b"ready\n")]
                loaded.set()
    finally:
        loaded.set()


async def _stop(procs: Sequence[trio.Process]) -> None:
    """SIGTERM to those still running (seeding), SIGKILL after a grace period."""
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(_STOP_GRACE_S):
        for proc in procs:
            await proc.wait()
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _result_written(state: Path | None) -> bool:
    return state is not None and (state / "last_result.json").exists()


def _device_run(device_id: str, state: Path | None, ended: float | None, output: bytes,
                started: float) -> DeviceRun:
    if ended is None:
        return DeviceRun(device_id, False, "did not finish", 0.0, 0.0, 0, 0)
    if state is None:  # baseline: the fetch process printed its own result
        try:
            fetched = json.loads(output.decode().strip().splitlines()[-1])
        except (ValueError, IndexError, UnicodeDecodeError):
            return DeviceRun(device_id, False, f"fetch printed {output[-200:]!r}",
                             0.0, 0.0, 0, 0)
        return DeviceRun(device_id, bool(fetched.get("ok")), str(fetched.get("message", "")),
                         round(float(fetched.get("seconds", 0.0)), 3), round(ended - started, 3),
                         int(fetched.get("bytes", 0)), 0)
    try:
        result = json.loads((state / "last_result.json").read_bytes())
    except (OSError, ValueError):
        return DeviceRun(device_id, False, "no readable last_result.json", 0.0, 0.0, 0, 0)
    timings: dict[str, float] = result.get("timings_s", {})
    # the agent's own wall time from its check-in to every chunk verified; an agent from
    # before it overlapped its phases: the sum of its check-in, metadata, chunk list and
    # transfer phases (without the gaps between them)
    delivered = timings.get("delivered", timings.get("checkin", 0.0) + timings.get(
        "metadata", 0.0) + timings.get("chunk_list", 0.0) + sum(
        v for k, v in timings.items() if k.startswith("transfer_")))
    installed = float(result.get("finished_at", ended)) - started
    ok = result.get("status") == 0 and bool(result.get("updated")) \
        and result.get("to_version") == "2.0.0"
    return DeviceRun(device_id, ok, str(result.get("message", "")), round(delivered, 3),
                     round(installed, 3), int(result.get("bytes_origin", 0)),
                     int(result.get("bytes_peers", 0)), int(result.get("bytes_metadata", 0)),
                     {k: float(v) for k, v in timings.items()})


def _link_bytes(namespace: str | None, config: FleetConfig) -> tuple[int, int]:
    """Bytes sent so far by the origin and by the tracker, as tc counts them."""
    if namespace is None:
        return 0, 0
    try:
        sent = class_sent_bytes()
    except NetnsError:
        return 0, 0
    return (sent.get(ORIGIN_CLASS, 0),
            sent.get(config.shaping().counted_class(TRACKER_IP), 0))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- results -----------------------------------------------------------------------------


def summarize(runs: Sequence[RunResult], origin_rate_bytes_per_s: float) -> dict[str, Any]:
    """Medians over the repetitions of one (kind, scenario, devices) cell."""
    first = runs[0]
    payload = first.payload_bytes
    lower_bound = payload / origin_rate_bytes_per_s

    def med(value: Callable[[RunResult], float]) -> float:
        return float(statistics.median(value(r) for r in runs))

    def per_device(r: RunResult, attr: str) -> list[float]:
        return [float(getattr(d, attr)) for d in r.device_runs] or [0.0]

    return {
        "kind": first.kind, "scenario": first.scenario, "devices": first.devices,
        "runs": len(runs), "all_ok": all(r.ok for r in runs),
        "payload_bytes": payload, "lower_bound_s": round(lower_bound, 3),
        "origin_egress_x_payload": round(med(lambda r: r.origin_bytes_total / payload), 3),
        "origin_link_x_payload": round(med(lambda r: r.origin_link_bytes / payload), 3),
        # what the origin served plus what the tracker sent (tc: its bodies and headers)
        "origin_tracker_x_payload": round(med(
            lambda r: (r.origin_bytes_total + r.tracker_link_bytes) / payload), 3),
        "origin_tracker_link_x_payload": round(med(
            lambda r: (r.origin_link_bytes + r.tracker_link_bytes) / payload), 3),
        # where they went: payload chunks (over the payload), per device the rest
        "origin_chunks_x_payload": round(med(
            lambda r: (r.origin_bytes_payloads - r.origin_bytes_torrents
                       - r.origin_bytes_chunk_lists) / payload), 3),
        "origin_metadata_per_device": int(med(lambda r: r.origin_bytes_metadata / r.devices)),
        "origin_manifest_per_device": int(med(lambda r: r.origin_bytes_targets / r.devices)),
        "origin_torrent_per_device": int(med(lambda r: r.origin_bytes_torrents / r.devices)),
        "origin_chunk_list_per_device": int(med(
            lambda r: r.origin_bytes_chunk_lists / r.devices)),
        "tracker_per_device": int(med(lambda r: r.tracker_link_bytes / r.devices)),
        "device_bytes_metadata_median": int(med(
            lambda r: statistics.median(per_device(r, "bytes_metadata")))),
        "delivered_median_s": round(med(
            lambda r: statistics.median(per_device(r, "delivered_s"))), 3),
        "delivered_slowest_s": round(med(lambda r: max(per_device(r, "delivered_s"))), 3),
        "installed_median_s": round(med(
            lambda r: statistics.median(per_device(r, "installed_s"))), 3),
        "installed_slowest_s": round(med(lambda r: max(per_device(r, "installed_s"))), 3),
        "completion_x_lower_bound": round(
            med(lambda r: max(per_device(r, "delivered_s"))) / lower_bound, 3),
        "device_bytes_origin_median": int(med(
            lambda r: statistics.median(per_device(r, "bytes_origin")))),
        "device_bytes_peers_median": int(med(
            lambda r: statistics.median(per_device(r, "bytes_peers")))),
        "cpu_s_per_device": round(med(lambda r: r.cpu_s / r.devices), 3),
        "servers_cpu_s": round(med(lambda r: r.servers_cpu_s), 3),
        "load_1m": [r.load_1m for r in runs],
        "failures": sorted({f for r in runs for f in r.failures}
                           | {f"{d.device_id}: {d.message}" for r in runs
                              for d in r.device_runs if not d.ok}),
    }


def ratios(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Baseline and direct against swarm, side by side per payload kind and fleet size."""
    by = {(c["kind"], c["scenario"], c["devices"]): c for c in cells}
    out = []
    for (kind, scenario, n), swarm in sorted(by.items()):
        if scenario != "swarm":
            continue
        row: dict[str, Any] = {"kind": kind, "devices": n}
        for other in ("baseline", "direct"):
            cell = by.get((kind, other, n))
            if cell is None:
                continue
            row[f"origin_egress_{other}_over_swarm"] = round(
                cell["origin_egress_x_payload"] / max(swarm["origin_egress_x_payload"], 1e-9),
                2)
            row[f"slowest_{other}_over_swarm"] = round(
                cell["delivered_slowest_s"] / max(swarm["delivered_slowest_s"], 1e-9), 2)
        out.append(row)
    return out


def check_targets(cells: Sequence[dict[str, Any]],
                  rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets for 16 devices in swarm mode, per payload kind (:data:`TARGETS`):
    origin and tracker bytes together, as served and on the link."""
    out = []
    for c in cells:
        if c["scenario"] != "swarm" or c["devices"] != TARGET_FLEET:
            continue
        target = TARGETS[c["kind"]]
        row = next((r for r in rows if r["kind"] == c["kind"]
                    and r["devices"] == TARGET_FLEET), {})
        saving = row.get("origin_egress_baseline_over_swarm")
        out.append({
            "kind": c["kind"],
            "origin_tracker_x_payload": c["origin_tracker_x_payload"],
            "origin_tracker_link_x_payload": c["origin_tracker_link_x_payload"],
            "origin_tracker_target": target["origin_tracker_x_payload"],
            "origin_tracker_met": c["origin_tracker_x_payload"]
            <= target["origin_tracker_x_payload"],
            "origin_tracker_link_met": c["origin_tracker_link_x_payload"]
            <= target["origin_tracker_x_payload"],
            "completion_x_lower_bound": c["completion_x_lower_bound"],
            "completion_target": target["completion_x_lower_bound"],
            "completion_met": c["completion_x_lower_bound"]
            <= target["completion_x_lower_bound"],
            "baseline_over_swarm_origin_egress": saving,
            "saving_met": saving is not None
            and saving >= target["baseline_over_swarm_origin_egress"],
        })
    return out


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lan = cfg["lan_rate_bits_per_s"]
    lan_text = f"{lan / 1e6:g} Mbit/s" if lan else "unshaped"
    lines = [
        "# Fleet benchmark (shaped network namespace)", "",
        f"Origin link {cfg['origin_rate_bits_per_s'] / 1e6:g} Mbit/s (tc HTB on the "
        f"namespace's loopback, everything the origin sends), LAN {lan_text}; "
        f"image {cfg['image_bytes']:,} bytes; medians of {cfg['repeat']} runs; devices are "
        "separate processes. Lower bound = payload / origin rate. Targets for "
        f"{TARGET_FLEET} devices in swarm mode: bytes sent by the origin and the tracker "
        "together <= " + ", ".join(
            f"{t['origin_tracker_x_payload']}x the payload and completion <= "
            f"{t['completion_x_lower_bound']}x the lower bound ({kind} payload)"
            for kind, t in TARGETS.items()) + ".", "",
        "| payload | devices | scenario | payload bytes | lower bound s | origin + tracker "
        "/ payload | on the link | origin egress / payload | delivered median s "
        "| slowest s | slowest / lower bound | installed slowest s | per device from "
        "origin | from peers | CPU s per device | servers CPU s | load (1 min) | ok |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        "---|",
    ]
    for c in result["cells"]:
        lines.append(
            f"| {c['kind']} | {c['devices']} | {c['scenario']} | {c['payload_bytes']:,} "
            f"| {c['lower_bound_s']:.2f} | {c['origin_tracker_x_payload']:.3f} "
            f"| {c['origin_tracker_link_x_payload']:.3f} "
            f"| {c['origin_egress_x_payload']:.3f} | {c['delivered_median_s']:.2f} "
            f"| {c['delivered_slowest_s']:.2f} | {c['completion_x_lower_bound']:.2f} "
            f"| {c['installed_slowest_s']:.2f} | {c['device_bytes_origin_median']:,} "
            f"| {c['device_bytes_peers_median']:,} | {c['cpu_s_per_device']:.2f} "
            f"| {c.get('servers_cpu_s', 0.0):.2f} "
            f"| {' '.join(f'{x:g}' for x in c.get('load_1m', []))} "
            f"| {'yes' if c['all_ok'] else 'NO'} |")
    lines += ["", "Where the origin's and the tracker's bytes went (medians; per device: "
                  "the run's total over its devices):", "",
              "| payload | devices | scenario | payload chunks / payload | TUF metadata per "
              "device | release manifest per device | chunk list per device | torrent per "
              "device | tracker per device (on the link) | overhead per device |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        overhead = sum(c[k] for k in _PER_DEVICE_KEYS.values())
        lines.append(
            f"| {c['kind']} | {c['devices']} | {c['scenario']} "
            f"| {c['origin_chunks_x_payload']:.3f} | {c['origin_metadata_per_device']:,} "
            f"| {c['origin_manifest_per_device']:,} | {c['origin_chunk_list_per_device']:,} "
            f"| {c['origin_torrent_per_device']:,} | {c['tracker_per_device']:,} "
            f"| {overhead:,} |")
    if result["ratios"]:
        lines += ["", "| payload | devices | origin egress baseline / swarm | direct / swarm "
                      "| slowest baseline / swarm | direct / swarm |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in result["ratios"]:
            lines.append(
                f"| {r['kind']} | {r['devices']} "
                f"| {_x(r.get('origin_egress_baseline_over_swarm'))} "
                f"| {_x(r.get('origin_egress_direct_over_swarm'))} "
                f"| {_x(r.get('slowest_baseline_over_swarm'))} "
                f"| {_x(r.get('slowest_direct_over_swarm'))} |")
    for t in result["targets_checked"]:
        lines += ["", f"Targets, {t['kind']} payload, {TARGET_FLEET} devices, swarm: origin "
                      f"+ tracker {t['origin_tracker_x_payload']:.3f}x the payload "
                      f"(<= {t['origin_tracker_target']}x: "
                      f"{_met(t['origin_tracker_met'])}; on the link, headers included, "
                      f"{t['origin_tracker_link_x_payload']:.3f}x: "
                      f"{_met(t['origin_tracker_link_met'])}), completion "
                      f"{t['completion_x_lower_bound']:.2f}x the lower bound "
                      f"(<= {t['completion_target']}x: {_met(t['completion_met'])}), "
                      f"{_x(t['baseline_over_swarm_origin_egress'])} less origin egress "
                      f"than the baseline ({_met(t['saving_met'])})."]
    lines += ["", "Notes: " + "; ".join(result["notes"]) + "."]
    return "\n".join(lines) + "\n"


_PER_DEVICE_KEYS = {"TUF metadata": "origin_metadata_per_device",
                    "release manifest": "origin_manifest_per_device",
                    "chunk list": "origin_chunk_list_per_device",
                    "torrent": "origin_torrent_per_device",
                    "tracker": "tracker_per_device"}
_BYTE_KINDS: tuple[tuple[str, Callable[[dict[str, Any]], float]], ...] = (
    ("payload chunks", lambda c: float(c["origin_chunks_x_payload"])),
    *((label, lambda c, key=key: c[key] * c["devices"] / c["payload_bytes"])
      for label, key in _PER_DEVICE_KEYS.items()),
)


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def plot(result: dict[str, Any], path: Path) -> str | None:
    """``fleet.png``: slowest completion and origin + tracker bytes against fleet size,
    per scenario and payload kind, and in swarm mode those bytes by kind (payload
    chunks, TUF metadata, release manifest, torrent, tracker). Returns why it was not
    drawn, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]')"
    kinds = [k for k in PAYLOAD_KINDS if any(c["kind"] == k for c in result["cells"])]
    fig, axes = plt.subplots(3, len(kinds), figsize=(6 * len(kinds), 12), squeeze=False)
    for col, kind in enumerate(kinds):
        cells = [c for c in result["cells"] if c["kind"] == kind]
        for scenario in SCENARIOS:
            mine = sorted((c for c in cells if c["scenario"] == scenario),
                          key=lambda c: c["devices"])
            if not mine:
                continue
            sizes = [c["devices"] for c in mine]
            axes[0][col].plot(sizes, [c["delivered_slowest_s"] for c in mine], marker="o",
                              label=scenario)
            axes[1][col].plot(sizes, [c["origin_tracker_x_payload"] for c in mine],
                              marker="o", label=scenario)
        bound = cells[0]["lower_bound_s"]
        axes[0][col].axhline(bound, linestyle="--", color="grey", label="lower bound")
        axes[0][col].set_title(f"{kind} payload: slowest device")
        axes[0][col].set_ylabel("seconds")
        axes[1][col].set_title(f"{kind} payload: origin + tracker bytes")
        axes[1][col].set_ylabel("x payload size")
        swarm = sorted((c for c in cells if c["scenario"] == "swarm"),
                       key=lambda c: c["devices"])
        bottom = [0.0] * len(swarm)
        labels = [str(c["devices"]) for c in swarm]
        for label, value in _BYTE_KINDS:
            heights = [value(c) for c in swarm]
            axes[2][col].bar(labels, heights, bottom=bottom, label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axes[2][col].set_title(f"{kind} payload, swarm: origin + tracker bytes by kind")
        axes[2][col].set_ylabel("x payload size")
        for row in (0, 1, 2):
            axes[row][col].set_xlabel("devices")
            axes[row][col].legend()
            axes[row][col].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# --- the whole benchmark -------------------------------------------------------------------


async def run_bench(workdir: Path, config: FleetConfig, *, namespace: str | None,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    images = write_images(workdir / "images", config.image_bytes)
    runs: list[RunResult] = []
    cells: list[dict[str, Any]] = []
    for kind in config.kinds:
        published = await trio.to_thread.run_sync(publish, workdir, images, kind)
        payload = published.payload
        progress(f"{kind} payload {payload.size:,} bytes; lower bound "
                 f"{payload.size / config.origin_rate_bytes_per_s:.2f} s")
        for n in config.fleet_sizes:
            for scenario in config.scenarios:
                cell = []
                for rep in range(config.repeat):
                    run_dir = workdir / f"run-{kind}-{n}-{scenario}-{rep}"
                    run_dir.mkdir()
                    result = await run_fleet(run_dir, published, kind=kind, scenario=scenario,
                                             devices=n, config=config, namespace=namespace)
                    cell.append(result)
                    slowest = max((d.delivered_s for d in result.device_runs), default=0.0)
                    progress(f"  {kind:<5} {n:>3} devices {scenario:<8} run {rep + 1}/"
                             f"{config.repeat}: {'ok' if result.ok else 'FAILED'}, slowest "
                             f"{slowest:.2f} s, origin "
                             f"{result.origin_bytes_total / payload.size:.2f}x payload")
                runs += cell
                cells.append(summarize(cell, config.origin_rate_bytes_per_s))
    rows = ratios(cells)
    return {
        "benchmark": "fleet", "config": asdict(config),
        "cells": cells, "ratios": rows, "targets": TARGETS,
        "targets_checked": check_targets(cells, rows),
        "runs": [{**asdict(r), "ok": r.ok} for r in runs],
        "notes": [
            "every device is its own process on its own address; "
            + ("the origin is nginx with docs/ORIGIN.md's configuration (a CDN's role), "
               "the tracker runs in the benchmark's process"
               if config.origin == "nginx" else
               "the origin (the embedded Python server) and the tracker run in the "
               "benchmark's process")
            + "; all share this machine's 2 cores",
            "no seeder: the shaped origin is the only source of the payload",
            "origin egress counts every byte the origin server sent (metadata included); "
            "'on the link' is what tc counted through the origin's class, headers included",
            "delivered: how long a device took to have every chunk verified, without "
            "process start-up (agent: from the start of its check-in, wall time, its "
            "own clock; baseline: its GET); installed: from the fleet's start until the "
            "agent committed v2 (adds start-up, a pass over the payload and decompressing "
            "into the slot) or the baseline's process ended",
            "CPU per device: user + system of the device processes, start-up included; "
            "servers CPU: the origin's and the tracker's, the whole run; load: the "
            "machine's 1-minute load average at each run's start (2 cores, shared with "
            "other work)",
            "the origin link's queue is HTB's default leaf, a 1000-packet pfifo (up to "
            "64 KiB a packet on loopback): small answers wait behind queued payload "
            "bytes (fq_codel, fq, sfq and codel were not in the kernel of the published "
            "runs)",
            "no round-trip delay is emulated (the sch_netem module is not available here)",
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    config = FleetConfig(
        fleet_sizes=tuple(args.devices), repeat=args.repeat, image_bytes=args.image_mib << 20,
        origin_rate_bits_per_s=int(args.origin_mbit * 1e6),
        lan_rate_bits_per_s=int(args.lan_mbit * 1e6), scenarios=tuple(args.scenarios),
        kinds=tuple(args.kinds), run_timeout_s=args.run_timeout_s, origin=args.origin)
    if args.inside:
        return _inside(config, args.out, args.namespace)
    problem = missing_privileges()
    if problem is not None:
        print(f"bench.fleet: {problem}", file=sys.stderr)
        return 2
    return _outside(config, list(sys.argv[1:] if argv is None else argv))


def _outside(config: FleetConfig, argv: list[str]) -> int:
    """Create the shaped namespace, run the benchmark inside it, always tear it down."""
    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with shaped_namespace(config.shaping(), prefix="swarmota-fleet") as ns:
            print(f"network namespace {ns}: origin {ORIGIN_IP} at "
                  f"{config.origin_rate_bits_per_s / 1e6:g} Mbit/s, LAN "
                  f"{config.lan_rate_bits_per_s / 1e6:g} Mbit/s (0: unshaped)", flush=True)
            inner = exec_argv(ns, [sys.executable, "-m", "bench.fleet", "--inside",
                                   "--namespace", ns, *argv])
            proc = subprocess.Popen(inner, cwd=REPO_ROOT)
            try:
                return proc.wait()
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=_STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    except NetnsError as exc:
        print(f"bench.fleet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.fleet: interrupted; namespace removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _inside(config: FleetConfig, out: Path, namespace: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        result = trio.run(lambda: run_bench(Path(tmp), config, namespace=namespace))
    result["machine"] = machine_info({})
    out.mkdir(parents=True, exist_ok=True)
    why_not = plot(result, out / "fleet.png")
    if why_not is not None:
        result["notes"].append(f"no plot: {why_not}")
    markdown = render_markdown(result)
    atomic_write_bytes(out / "fleet.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(out / "fleet.md", markdown.encode())
    print()
    print(markdown)
    return 0 if all(c["all_ok"] for c in result["cells"]) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description="Fleet benchmark on a shaped network (root required): a network "
                    "namespace whose origin link is slow and whose LAN is fast; devices "
                    "update from v1 to v2 as plain HTTP downloads (baseline), swarmota "
                    "direct mode and swarm mode, for a full payload and a delta. Writes "
                    "fleet.json, fleet.md and (with matplotlib) fleet.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 8, 16],
                        help="fleet sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; medians")
    parser.add_argument("--image-mib", type=int, default=32, help="image size")
    parser.add_argument("--origin-mbit", type=float, default=20.0,
                        help="origin egress link (CDN to home), Mbit/s")
    parser.add_argument("--lan-mbit", type=float, default=0.0,
                        help="LAN rate between devices, Mbit/s (0: unshaped)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--kinds", nargs="+", choices=PAYLOAD_KINDS,
                        default=list(PAYLOAD_KINDS), help="payload kinds")
    parser.add_argument("--run-timeout-s", type=float, default=1800.0,
                        help="upper bound of one fleet update")
    parser.add_argument("--origin", choices=ORIGINS, default=ORIGINS[0],
                        help="the origin server: nginx with docs/ORIGIN.md's configuration "
                             "(a CDN's role; Debian package nginx-light), or the embedded "
                             "Python server in the benchmark's process")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for fleet.json, fleet.md, fleet.png")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--namespace", default=None, help=argparse.SUPPRESS)
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if any(not 1 <= n <= MAX_DEVICES for n in args.devices):
        parser.error(f"fleet sizes must be within 1..{MAX_DEVICES}")
    if not 1 <= args.image_mib <= 1024:
        parser.error("--image-mib must be within 1..1024")
    if args.origin_mbit < 0.1 or args.lan_mbit < 0:
        parser.error("--origin-mbit must be >= 0.1 and --lan-mbit >= 0")
    if args.origin == "nginx" and nginx_binary() is None:
        parser.error("--origin nginx: nginx is not installed (apt-get install nginx-light), "
                     "or use --origin python")


if __name__ == "__main__":
    sys.exit(main())
