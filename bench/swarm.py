"""Swarm benchmark: a fleet on loopback, swarm mode against direct mode, same payload.

One run publishes one release (a generated firmware-like image, full payload only),
then for every fleet size N and both download modes, ``--repeat`` times, starts a
**fresh** origin server (rate limited: all its responses together get
``--origin-mib-s``, like a CDN-to-home link) and a fresh tracker on 127.0.0.1, provisions
N devices (each with its own libtorrent session on its own address, 127.0.0.11 and up)
and updates them all at once through the real agent (``peer.agent.update_once``).
There is no seeder: the origin is the only source of the payload, so the lower bound
of the fleet's completion time is ``payload / origin rate`` however the devices share.

Measured per run:

* origin egress: every byte the origin server sent (metadata, manifests, torrents and
  payload chunks), and the part under ``payloads/``, each divided by the payload size;
* completion: seconds from the start until each device has every chunk of the payload,
  each verified ("delivered": check-in, metadata and transfer), median and slowest
  device, the slowest divided by the lower bound; and until it has installed and
  committed the update ("installed": a final pass over the whole file and decompressing
  into the slot are the same device-local work in both modes, and here every device
  does them at once on the same 2 cores and disk);
* bytes per device from the origin and from peers (the agent's own counts).

Results are medians over the repetitions. In direct mode every device downloads the
payload from the origin itself, as fleets do today: the baseline. Devices that finish
keep seeding until the whole fleet is done (then the run ends), as deployed devices
seed for their ``seed_time_s``.

Run: ``.venv/bin/python -m bench.swarm [--devices 4 8 16] [--repeat 3] [--image-mib 64]
[--origin-mib-s 4] [--out bench/results]``. Writes ``swarm.json`` and ``swarm.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.delta import machine_info
from swarmota.demo import write_images
from swarmota.infra.fsio import atomic_write_bytes
from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import ReleaseManifest
from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.config import DOWNLOAD_MODES, DeviceConfig
from swarmota.peer.state import DeviceState, init_device
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

__all__ = ["RunResult", "main", "render_markdown", "run_bench", "run_fleet"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
PRODUCT = "acme-router"
HARDWARE_ID = "acme-router-hw1"
TARGETS = {"origin_egress_x_payload": 1.1, "completion_x_lower_bound": 1.25}
TARGET_FLEET = 16
MAX_DEVICES = 200  # addresses 127.0.0.11 .. 127.0.0.210
RUN_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class RunResult:
    """One fleet update: N devices in one mode."""

    devices: int
    mode: str
    ok: bool
    payload_bytes: int
    origin_bytes_total: int
    origin_bytes_payloads: int
    completion_s: list[float]  # per device: update committed, sorted
    delivered_s: list[float]  # per device: payload downloaded and verified, sorted
    bytes_origin: list[int]  # per device (agent's count)
    bytes_peers: list[int]
    timings_s: list[dict[str, float]]  # per device, by phase (the agent's timings)
    banned_peers: list[list[str]]  # per device: the peers its swarm banned (host:port)
    cpu_s: float  # this process (devices and servers), user + system
    failures: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "devices": self.devices, "mode": self.mode, "ok": self.ok,
            "payload_bytes": self.payload_bytes,
            "origin_bytes_total": self.origin_bytes_total,
            "origin_bytes_payloads": self.origin_bytes_payloads,
            "completion_s": self.completion_s, "delivered_s": self.delivered_s,
            "bytes_origin": self.bytes_origin,
            "bytes_peers": self.bytes_peers, "timings_s": self.timings_s,
            "banned_peers": self.banned_peers,
            "cpu_s": self.cpu_s, "failures": self.failures,
        }


def publish(workdir: Path, image_bytes: int) -> tuple[Repository, ReleaseManifest,
                                                      ReleaseManifest, Path]:
    """A repository with v1 and v2 of a generated image; returns it, both manifests and
    the v1 image devices start from (v2 is published without deltas: full payload)."""
    images = write_images(workdir / "images", image_bytes)
    repo = Repository.create(workdir / "repo")
    m1 = publish_release(repo, images / "v1.img", product=PRODUCT, version="1.0.0",
                         release_counter=1, compatibility=[HARDWARE_ID], zstd_level=3)
    m2 = publish_release(repo, images / "v2.img", product=PRODUCT, version="2.0.0",
                         release_counter=2, compatibility=[HARDWARE_ID], zstd_level=3)
    return repo, m1, m2, images / "v1.img"


async def run_fleet(workdir: Path, repo: Repository, releases: Sequence[ReleaseManifest],
                    base_image: Path, *, devices: int, mode: str,
                    origin_rate_bytes_per_s: int,
                    on_servers: Callable[[str], Awaitable[None]] | None = None,
                    device_config: dict[str, Any] | None = None) -> RunResult:
    """Update ``devices`` devices from v1 to the newest of ``releases`` at once.

    ``on_servers(tracker_url)`` runs once origin and tracker listen, before the devices
    start (e.g. to announce other peers); ``device_config``: more DeviceConfig fields."""
    db = workdir / "tracker.sqlite"
    store = SqliteStore(db)
    try:
        for m in releases:  # every device at once: the benchmark measures delivery
            register_release(store, Release.from_manifest(m), RolloutPlan.everyone(),
                             actor="bench")
    finally:
        store.close()
    target = releases[-1]
    payload = target.full_payload
    origin = OriginApp(repo.origin_dir, OriginConfig(
        rate_limit_bytes_per_s=origin_rate_bytes_per_s, rate_limit_burst_bytes=64 * 1024))
    finished: dict[str, tuple[float, UpdateResult]] = {}
    async with trio.open_nursery() as servers:
        origin_url = await servers.start(serve_origin, origin, ListenConfig())
        tracker_url = await servers.start(serve_tracker, TrackerConfig(db_path=db))
        if on_servers is not None:
            await on_servers(tracker_url)
        states = []
        for n in range(devices):
            config = DeviceConfig(
                device_id=f"bench-{n:03d}", product=PRODUCT, hardware_id=HARDWARE_ID,
                origin_url=origin_url, tracker_url=tracker_url, download_mode=mode,
                swarm_listen=f"{device_host(n)}:0", seed_time_s=RUN_TIMEOUT_S,
                http_timeout_s=120.0, **(device_config or {}))
            states.append(init_device(workdir / "devices" / config.device_id, config,
                                      root_json=repo.root_bytes(), image=base_image,
                                      version="1.0.0", release_counter=1))
        all_done = trio.Event()
        started = time.monotonic()
        cpu_before = _cpu_s()

        def done(device_id: str, result: UpdateResult) -> None:
            if device_id not in finished:
                finished[device_id] = (time.monotonic() - started, result)
            if len(finished) == devices:
                all_done.set()

        async def one(state: DeviceState) -> None:
            device_id = state.config().device_id
            result = await update_once(state, on_seeding=lambda r, _s: done(device_id, r))
            done(device_id, result)

        with trio.move_on_after(RUN_TIMEOUT_S):
            async with trio.open_nursery() as fleet:
                for state in states:
                    fleet.start_soon(one, state)
                await all_done.wait()
                fleet.cancel_scope.cancel()
        stats = origin.statistics()
        cpu = _cpu_s() - cpu_before
        servers.cancel_scope.cancel()
    failures = [f"{device_id}: {r.message}" for device_id, (_, r) in sorted(finished.items())
                if not (r.status == 0 and r.updated)]
    missing = devices - len(finished)
    if missing:
        failures.append(f"{missing} devices did not finish within {RUN_TIMEOUT_S:.0f} s")
    ordered = [finished[k] for k in sorted(finished)]
    return RunResult(
        devices=devices, mode=mode, ok=not failures, payload_bytes=payload.size,
        origin_bytes_total=stats.bytes_total, origin_bytes_payloads=stats.bytes_payloads,
        completion_s=sorted(round(t, 3) for t, _ in ordered),
        delivered_s=sorted(round(_delivered_s(r), 3) for _, r in ordered),
        bytes_origin=[r.bytes_origin for _, r in ordered],
        bytes_peers=[r.bytes_peers for _, r in ordered],
        timings_s=[dict(r.timings_s) for _, r in ordered], cpu_s=round(cpu, 3),
        failures=failures, banned_peers=[list(r.banned_peers) for _, r in ordered])


def device_host(n: int) -> str:
    """The loopback address of device ``n`` (0-based) in a benchmark fleet."""
    return f"127.0.0.{11 + n}"


def _delivered_s(result: UpdateResult) -> float:
    """When the device had every chunk of the payload, each verified: its check-in and
    metadata phases plus the download's transfer (the agent's ``transfer_*`` timings;
    devices start together). Not counted: the final pass over the whole file and
    decompressing into the slot, the same device-local work in both modes, which here
    16 devices do at once on 2 cores and one disk."""
    t = result.timings_s
    return t.get("checkin", 0.0) + t.get("metadata", 0.0) + sum(
        v for k, v in t.items() if k.startswith("transfer_"))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize(runs: Sequence[RunResult], origin_rate_bytes_per_s: int) -> dict[str, Any]:
    """Medians over the repetitions of one (devices, mode) cell."""
    payload = runs[0].payload_bytes
    lower_bound = payload / origin_rate_bytes_per_s

    def med(values: Callable[[RunResult], float]) -> float:
        return float(statistics.median(values(r) for r in runs))

    return {
        "devices": runs[0].devices, "mode": runs[0].mode, "runs": len(runs),
        "all_ok": all(r.ok for r in runs),
        "lower_bound_s": round(lower_bound, 3),
        "origin_egress_x_payload": round(med(lambda r: r.origin_bytes_total / payload), 3),
        "origin_payload_egress_x_payload": round(
            med(lambda r: r.origin_bytes_payloads / payload), 3),
        "delivered_median_s": round(med(lambda r: statistics.median(r.delivered_s)), 3),
        "delivered_slowest_s": round(med(lambda r: max(r.delivered_s)), 3),
        "completion_x_lower_bound": round(med(lambda r: max(r.delivered_s)) / lower_bound, 3),
        "installed_median_s": round(med(lambda r: statistics.median(r.completion_s)), 3),
        "installed_slowest_s": round(med(lambda r: max(r.completion_s)), 3),
        "device_bytes_origin_median": int(med(lambda r: statistics.median(r.bytes_origin))),
        "device_bytes_peers_median": int(med(lambda r: statistics.median(r.bytes_peers))),
        "cpu_s_per_device": round(med(lambda r: r.cpu_s / r.devices), 3),
        "phase_median_s": {
            phase: round(med(lambda r, p=phase: statistics.median(  # type: ignore[misc]
                t.get(p, 0.0) for t in r.timings_s)), 3)
            for phase in ("checkin", "metadata", "download_full", "install", "total")},
    }


async def run_bench(workdir: Path, *, fleet_sizes: Sequence[int], repeat: int,
                    image_bytes: int, origin_rate_bytes_per_s: int,
                    modes: Sequence[str] = DOWNLOAD_MODES,
                    progress: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark; returns a JSON-ready result."""
    repo, m1, m2, base_image = await trio.to_thread.run_sync(publish, workdir, image_bytes)
    payload = m2.full_payload
    progress(f"payload {payload.size:,} bytes ({payload.chunk_count} chunks of "
             f"{payload.chunk_size // 1024} KiB); origin {origin_rate_bytes_per_s:,} B/s; "
             f"lower bound {payload.size / origin_rate_bytes_per_s:.2f} s")
    runs: list[RunResult] = []
    cells: list[dict[str, Any]] = []
    for n in fleet_sizes:
        for mode in modes:
            cell = []
            for rep in range(repeat):
                run_dir = workdir / f"run-{n}-{mode}-{rep}"
                run_dir.mkdir()
                result = await run_fleet(run_dir, repo, [m1, m2], base_image, devices=n,
                                         mode=mode,
                                         origin_rate_bytes_per_s=origin_rate_bytes_per_s)
                cell.append(result)
                progress(f"  {n:>3} devices {mode:<6} run {rep + 1}/{repeat}: "
                         f"{'ok' if result.ok else 'FAILED'}, slowest delivered "
                         f"{max(result.delivered_s, default=0):.2f} s, origin "
                         f"{result.origin_bytes_total / payload.size:.2f}x payload")
            runs += cell
            cells.append(summarize(cell, origin_rate_bytes_per_s))
    return {
        "benchmark": "swarm", "repeat": repeat, "image_bytes": image_bytes,
        "payload_bytes": payload.size, "chunk_size": payload.chunk_size,
        "origin_rate_bytes_per_s": origin_rate_bytes_per_s,
        "lower_bound_s": round(payload.size / origin_rate_bytes_per_s, 3),
        "targets": {**TARGETS, "fleet": TARGET_FLEET, "mode": "swarm"},
        "cells": cells, "ratios": _ratios(cells), "runs": [r.to_json() for r in runs],
        "notes": [
            "one process: all devices share this machine's 2 cores with the servers",
            "no seeder: the rate-limited origin is the only source of the payload",
            "origin egress counts every byte the origin sent, metadata included",
            "delivered: start of the fleet update until a device has every chunk, each "
            "verified (check-in, metadata, transfer); installed: until it has committed v2 "
            "(adds a pass over the whole payload and decompressing into the slot, every "
            "device at once on the same 2 cores and disk)",
        ],
    }


def _ratios(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Swarm against direct, side by side per fleet size."""
    by = {(c["devices"], c["mode"]): c for c in cells}
    out = []
    for (n, mode), swarm in sorted(by.items()):
        direct = by.get((n, "direct"))
        if mode != "swarm" or direct is None:
            continue
        out.append({
            "devices": n,
            "origin_egress_direct_over_swarm": round(
                direct["origin_egress_x_payload"] / swarm["origin_egress_x_payload"], 2),
            "completion_direct_over_swarm": round(
                direct["delivered_slowest_s"] / swarm["delivered_slowest_s"], 2),
        })
    return out


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Swarm benchmark", "",
        f"Payload {result['payload_bytes']:,} bytes (chunks of "
        f"{result['chunk_size'] // 1024} KiB), origin limited to "
        f"{result['origin_rate_bytes_per_s'] / (1 << 20):g} MiB/s; lower bound (payload / "
        f"origin rate) {result['lower_bound_s']:.2f} s. Medians of {result['repeat']} runs. "
        f"Targets for {TARGET_FLEET} devices in swarm mode: origin egress <= "
        f"{TARGETS['origin_egress_x_payload']}x the payload, completion <= "
        f"{TARGETS['completion_x_lower_bound']}x the lower bound.", "",
        "| devices | mode | origin egress / payload | of it payloads/ | delivered median s "
        "| slowest s | slowest / lower bound | installed slowest s | per device from origin "
        "| from peers | CPU s per device | ok |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in result["cells"]:
        lines.append(
            f"| {c['devices']} | {c['mode']} | {c['origin_egress_x_payload']:.3f} "
            f"| {c['origin_payload_egress_x_payload']:.3f} | {c['delivered_median_s']:.2f} "
            f"| {c['delivered_slowest_s']:.2f} | {c['completion_x_lower_bound']:.2f} "
            f"| {c['installed_slowest_s']:.2f} "
            f"| {c['device_bytes_origin_median']:,} | {c['device_bytes_peers_median']:,} "
            f"| {c['cpu_s_per_device']:.2f} | {'yes' if c['all_ok'] else 'NO'} |")
    if result["ratios"]:
        lines += ["", "| devices | origin egress direct / swarm | slowest delivery "
                      "direct / swarm |", "|---:|---:|---:|"]
        for r in result["ratios"]:
            lines.append(f"| {r['devices']} | {r['origin_egress_direct_over_swarm']:.2f}x "
                         f"| {r['completion_direct_over_swarm']:.2f}x |")
    lines += ["", "Notes: " + "; ".join(result["notes"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.swarm",
        description="Update fleets of devices on loopback from a rate-limited origin, in "
                    "swarm mode and in direct mode, and compare origin egress and fleet "
                    "completion time. Writes swarm.json and swarm.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 8, 16],
                        help="fleet sizes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; medians")
    parser.add_argument("--image-mib", type=int, default=64,
                        help="image size (the v2 full payload is ~65%% of it)")
    parser.add_argument("--origin-mib-s", type=float, default=4.0,
                        help="origin egress limit (all responses together), MiB/s")
    parser.add_argument("--modes", nargs="+", choices=DOWNLOAD_MODES,
                        default=list(DOWNLOAD_MODES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for swarm.json and swarm.md")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if any(not 1 <= n <= MAX_DEVICES for n in args.devices):
        parser.error(f"fleet sizes must be within 1..{MAX_DEVICES}")
    if not 1 <= args.image_mib <= 1024 or args.origin_mib_s <= 0:
        parser.error("--image-mib must be 1..1024 and --origin-mib-s positive")
    rate = int(args.origin_mib_s * (1 << 20))
    with tempfile.TemporaryDirectory(prefix="bench-swarm-") as tmp:
        result = trio.run(lambda: run_bench(
            Path(tmp), fleet_sizes=args.devices, repeat=args.repeat,
            image_bytes=args.image_mib << 20, origin_rate_bytes_per_s=rate,
            modes=args.modes))
    result["machine"] = machine_info({})
    markdown = render_markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "swarm.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(args.out / "swarm.md", markdown.encode())
    print()
    print(markdown)
    return 0 if all(c["all_ok"] for c in result["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
