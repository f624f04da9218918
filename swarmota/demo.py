"""``swarmota demo``: a full publish and fleet update on loopback, in a temporary directory.

Creates a TUF repository, publishes v1 and v2 of a generated firmware-like image, starts
the origin server and the tracker on 127.0.0.1, provisions a fleet of devices on v1,
updates them all to v2 concurrently, prints a report and exits non-zero if any device
did not end up with verified v2 bytes in its active slot. Needs nothing outside this
package.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from infra.http_serve import ListenConfig
from peer.agent import UpdateResult, update_once
from peer.config import DeviceConfig
from peer.state import DeviceState, init_device
from seeder.origin import OriginApp
from seeder.publish import publish_release
from seeder.repository import Repository
from seeder.server import serve_origin
from tracker.config import TrackerConfig
from tracker.protocol import Release
from tracker.server import serve_tracker
from tracker.store import SqliteStore

__all__ = ["DemoOutcome", "add_parser", "make_image", "mutate_image", "run_demo"]

PRODUCT = "acme-router"
HARDWARE_ID = "acme-router-hw1"


def make_image(size_bytes: int, *, seed: int) -> bytes:
    """A firmware-like image: compressible text and tables mixed with random blobs."""
    rng = random.Random(seed)
    out = bytearray()
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(3, 10)))
             for _ in range(400)]
    while len(out) < size_bytes:
        kind = rng.random()
        if kind < 0.45:
            out += b" ".join(rng.choice(words) for _ in range(rng.randint(50, 400))) + b"\n"
        elif kind < 0.75:
            out += rng.randbytes(rng.randint(512, 8192))
        else:
            out += bytes([rng.randrange(256)]) * rng.randint(64, 4096)
    return bytes(out[:size_bytes])


def mutate_image(image: bytes, *, seed: int, fraction: float = 0.05) -> bytes:
    """A plausible next version: a few regions rewritten, a little appended."""
    rng = random.Random(seed)
    out = bytearray(image)
    for _ in range(max(1, int(len(out) * fraction) // 4096)):
        at = rng.randrange(max(1, len(out) - 4096))
        out[at:at + 4096] = rng.randbytes(4096)
    out += rng.randbytes(len(image) // 100)
    return bytes(out)


@dataclass(frozen=True)
class DemoOutcome:
    ok: bool
    results: dict[str, UpdateResult]
    origin_bytes_payloads: int
    origin_bytes_total: int
    payload_size: int
    reports_stored: int
    elapsed_s: float


async def run_demo(workdir: Path, *, devices: int = 4, image_size_bytes: int = 4 << 20,
                   zstd_level: int = 9, out: Any = sys.stdout) -> DemoOutcome:
    """Run the whole demo in ``workdir``; return what happened."""

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    started = time.monotonic()
    v1 = make_image(image_size_bytes, seed=1)
    v2 = mutate_image(v1, seed=2)
    images = workdir / "images"
    images.mkdir(parents=True)
    (images / "v1.img").write_bytes(v1)
    (images / "v2.img").write_bytes(v2)

    say(f"[1/5] creating a TUF repository in {workdir / 'repo'}")
    repo = Repository.create(workdir / "repo")
    say(f"[2/5] publishing v1, then v2 with a delta from v1 ({len(v2):,} byte images, "
        f"zstd level {zstd_level})")
    m1 = await trio.to_thread.run_sync(lambda: publish_release(
        repo, images / "v1.img", product=PRODUCT, version="1.0.0", release_counter=1,
        compatibility=[HARDWARE_ID], zstd_level=zstd_level))
    m2 = await trio.to_thread.run_sync(lambda: publish_release(
        repo, images / "v2.img", product=PRODUCT, version="2.0.0", release_counter=2,
        compatibility=[HARDWARE_ID], zstd_level=zstd_level, bases=[images / "v1.img"]))
    full = m2.full_payload
    delta = m2.delta_for(m1.image.sha256)
    assert delta is not None
    payload_size = delta.size
    say(f"      v2 full payload: {full.size:,} bytes ({full.chunk_count} chunks of "
        f"{full.chunk_size // 1024} KiB)")
    say(f"      v2 delta from v1 ({delta.encoding}): {delta.size:,} bytes "
        f"({100 * delta.size / full.size:.1f}% of the full payload, "
        f"{delta.chunk_count} chunks)")

    db = workdir / "tracker.sqlite"
    store = SqliteStore(db)
    try:
        for m in (m1, m2):
            store.add_release(Release.from_manifest(m))
    finally:
        store.close()

    origin = OriginApp(repo.origin_dir)
    results: dict[str, UpdateResult] = {}
    async with trio.open_nursery() as nursery:
        origin_url = await nursery.start(serve_origin, origin, ListenConfig())
        tracker_url = await nursery.start(serve_tracker, TrackerConfig(db_path=db))
        say(f"[3/5] origin at {origin_url}, tracker at {tracker_url}")

        states = []
        for n in range(devices):
            device_id = f"device-{n + 1:02d}"
            config = DeviceConfig(device_id=device_id, product=PRODUCT, hardware_id=HARDWARE_ID,
                                  origin_url=origin_url, tracker_url=tracker_url)
            states.append(init_device(workdir / "devices" / device_id, config,
                                      root_json=repo.root_bytes(), image=images / "v1.img",
                                      version="1.0.0", release_counter=1))
        say(f"[4/5] {devices} devices provisioned on v1.0.0; updating them all")

        async def one(state: DeviceState) -> None:
            results[state.config().device_id] = await update_once(state)

        async with trio.open_nursery() as fleet:
            for state in states:
                fleet.start_soon(one, state)
        nursery.cancel_scope.cancel()

    want = hashlib.sha256(v2).hexdigest()
    ok = True
    say("[5/5] report")
    say(f"  {'device':<11} {'status':>6} {'result':<9} {'payload':<7} {'from origin':>12} "
        f"{'time s':>7}  slot")
    for state in states:
        device_id = state.config().device_id
        res = results[device_id]
        bc = state.bootctl()
        slot_ok = hashlib.sha256(state.slot_path(bc.primary).read_bytes()).hexdigest() == want
        good = res.status == 0 and res.updated and slot_ok and not bc.pending
        ok &= good
        say(f"  {device_id:<11} {int(res.status):>6} {'updated' if good else 'FAILED':<9} "
            f"{res.payload_kind or '-':<7} {res.bytes_origin:>12,} "
            f"{res.timings_s.get('total', 0.0):>7.2f}  "
            f"{bc.primary}={bc.slot(bc.primary).version}"
            + ("" if good else f"  ({res.message})"))
    stats = origin.statistics()
    store = SqliteStore(db)
    try:
        reports = store.reports()
    finally:
        store.close()
    elapsed = time.monotonic() - started
    say(f"  origin served {stats.bytes_total:,} bytes ({stats.bytes_payloads:,} payload, "
        f"{stats.bytes_metadata + stats.bytes_targets:,} metadata and manifests); "
        f"{devices} devices x {payload_size:,} byte delta = {devices * payload_size:,}; "
        f"full images would have been {devices * full.size:,}")
    say(f"  tracker stored {len(reports)} reports; demo took {elapsed:.1f} s")
    say("demo OK: every device runs verified v2.0.0" if ok else "demo FAILED")
    return DemoOutcome(ok=ok and len(reports) == devices, results=results,
                       origin_bytes_payloads=stats.bytes_payloads,
                       origin_bytes_total=stats.bytes_total, payload_size=payload_size,
                       reports_stored=len(reports), elapsed_s=elapsed)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="publish, serve and update a fleet on loopback",
        description="Full walk-through on 127.0.0.1 in a temporary directory: repository, "
                    "v1 and v2 releases, origin and tracker servers, a fleet of devices "
                    "updated from v1 to v2, and a report. Exit code 0 only if every device "
                    "ends on verified v2.")
    p.add_argument("--devices", type=int, default=4, help="fleet size (default 4)")
    p.add_argument("--image-mib", type=int, default=4, help="image size in MiB (default 4)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep everything in this (new) directory instead of a temporary one")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if not 1 <= args.devices <= 64 or not 1 <= args.image_mib <= 1024:
        print("error: --devices must be 1..64 and --image-mib 1..1024", file=sys.stderr)
        return 2
    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            print(f"error: {args.workdir} is not empty", file=sys.stderr)
            return 2
        args.workdir.mkdir(parents=True, exist_ok=True)
        outcome = trio.run(lambda: run_demo(args.workdir, devices=args.devices,
                                            image_size_bytes=args.image_mib << 20))
        return 0 if outcome.ok else 1
    tmp = Path(tempfile.mkdtemp(prefix="swarmota-demo-"))
    try:
        outcome = trio.run(lambda: run_demo(tmp, devices=args.devices,
                                            image_size_bytes=args.image_mib << 20))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if outcome.ok else 1
