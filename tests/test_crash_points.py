"""Crash at every point (../shared/RELIABILITY.md, "Apply, A/B and boot").

Like MCUboot's simulator, which interrupts an update at every flash operation in turn:
a clean update (a real ``swarmota peer update`` process, direct download mode) records
the named crash points it passes (``SWARMOTA_CRASH_TRACE``); then, for each point, a
fresh device is updated by a process that SIGKILLs itself there
(``SWARMOTA_CRASH_AT=name:nth``), and another ``peer update`` (the "reboot") runs.
After it, every device must:

- boot a verified slot: boot control names no pending slot, and the booted slot's bytes
  hash to its boot-control record; the committed slot is v2;
- never have taken the interruption for a verdict on the (healthy) release: the
  restart ends in status 0, the tracker heard 0 and only 0 from the device (no 40, no
  41), and the rollout, which halts at the first failure, never halts. A kill costs at
  most one boot attempt of the budget (3): one interrupted attempt is retried;
- have promoted no partial file: no temporary file in ``slots/``, an empty
  ``downloads/`` once the update is done;
- not have downloaded a verified chunk again: the restart's origin bytes (the device's
  own count, in its ``--json`` result) are at most the payload minus the chunks that
  were on disk and valid at the kill;
- have reported the outcome to the tracker.

Both a full-image update (a device on an image no delta applies to) and a delta update
(a device on v1). The points tried: every distinct name at its first pass, the last
chunk written, and every pass of ``journal.after_rename`` (the instant after each state
transition is persisted, before its side effects). A SIGKILL leaves the page cache
intact, so ``before_fsync``/``after_fsync`` end exactly like ``before_rename`` and
``after_dir_fsync`` like ``after_rename``: those are skipped unless
``SWARMOTA_TEST_EVERY_CRASH_POINT=1`` (torn writes, what fsync is for, are the subject of
``tests/test_apply_faults.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from swarmota.demo import make_image, mutate_image
from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import CHUNK_DIGEST_BYTES, Payload, ReleaseManifest, sha256_hex
from swarmota.peer.config import DeviceConfig
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
from tests.release_env import HARDWARE_ID, PRODUCT

PARALLEL = 6
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Published:
    repo: Repository
    v1: bytes
    v2: bytes
    off_base: bytes
    m2: ReleaseManifest


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """One repository for the module: v2 with a delta from v1 (and a full payload)."""
    work = tmp_path_factory.mktemp("crash-repo")
    v1 = make_image(512 * 1024, seed=21)
    v2 = mutate_image(v1, seed=22)
    repo = Repository.create(work / "repo")
    (work / "v1.img").write_bytes(v1)
    (work / "v2.img").write_bytes(v2)
    m2 = publish_release(repo, work / "v2.img", product=PRODUCT, version="2.0.0",
                         release_counter=2, compatibility=[HARDWARE_ID], zstd_level=3,
                         bases=[work / "v1.img"])
    assert m2.delta_for(sha256_hex(v1)) is not None
    return Published(repo, v1, v2, random.Random(5).randbytes(64 * 1024), m2)


@dataclass
class Fleet:
    pub: Published
    workdir: Path
    origin_url: str
    tracker_url: str
    db: Path
    made: int = 0

    def device(self, name: str, kind: str) -> tuple[DeviceState, bytes]:
        self.made += 1
        image = self.pub.v1 if kind == "delta" else self.pub.off_base
        img = self.workdir / f"factory-{kind}.img"
        if not img.exists():
            img.write_bytes(image)
        config = DeviceConfig(device_id=name, product=PRODUCT, hardware_id=HARDWARE_ID,
                              origin_url=self.origin_url, tracker_url=self.tracker_url,
                              download_mode="direct", retry_backoff_s=0.01,
                              http_timeout_s=10.0, chunk_attempts=3, seed_time_s=0)
        state = init_device(self.workdir / "devices" / name, config,
                            root_json=self.pub.repo.root_bytes(), image=img,
                            version="1.0.0" if kind == "delta" else "0.9.0",
                            release_counter=1)
        return state, image

    def reports(self, device_id: str) -> list[int]:
        store = SqliteStore(self.db)
        try:
            return [r.status for r in store.reports() if r.device_id == device_id]
        finally:
            store.close()


async def start_fleet(nursery: trio.Nursery, pub: Published, workdir: Path) -> Fleet:
    db = workdir / "tracker.sqlite"
    origin_url = await nursery.start(serve_origin, OriginApp(pub.repo.origin_dir,
                                                             OriginConfig()), ListenConfig())
    tracker_url = await nursery.start(serve_tracker, TrackerConfig(db_path=db))
    store = SqliteStore(db)
    try:
        # Every device at once; the first failure halts the rollout: a kill (a power
        # cut) is never a verdict on the release, so nothing may ever fail
        register_release(store, Release.from_manifest(pub.m2), RolloutPlan(
            stages_percent=(100.0,), min_successes=0, soak_s=0.0, halt_min_sample=1,
            halt_failure_count=1))
    finally:
        store.close()
    return Fleet(pub, workdir, origin_url, tracker_url, db)


async def peer_update(dev: DeviceState, **env: str) -> tuple[int, dict[str, object] | None]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SWARMOTA_CRASH")}
    environ.update(env)
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "swarmota.cli", "peer", "update", str(dev.root), "--json"],
            env=environ, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    out = json.loads(proc.stdout) if proc.returncode >= 0 and proc.stdout else None
    return proc.returncode, out


def valid_bytes_on_disk(dev: DeviceState, payload: Payload) -> int:
    """Bytes of ``payload``'s chunks on disk, logged as verified and still valid."""
    work = dev.downloads_dir / payload.sha256
    try:
        logged = {int(x) for x in (work / "verified.log").read_text().split() if x.isdigit()}
        data = (work / "payload.part").read_bytes()
    except FileNotFoundError:
        return 0
    total = 0
    for index in logged:
        offset, length = payload.chunk_span(index)
        if sha256_hex(data[offset:offset + length]) == payload.chunks[index]:
            total += length
    return total


SAME_AS_A_NEIGHBOUR_UNDER_SIGKILL = (".before_fsync", ".after_fsync", ".after_dir_fsync")


def points_to_try(trace: list[str]) -> list[tuple[str, int]]:
    counts = Counter(trace)
    points: list[tuple[str, int]] = []
    every = os.environ.get("SWARMOTA_TEST_EVERY_CRASH_POINT") == "1"
    for name in dict.fromkeys(trace):
        if name.endswith(SAME_AS_A_NEIGHBOUR_UNDER_SIGKILL) and not every:
            continue
        nths = {1}
        if name == "download.chunk_written":
            nths.add(counts[name])
        if name == "journal.after_rename":
            nths = set(range(1, counts[name] + 1))
        points.extend((name, n) for n in sorted(nths))
    return points


def check_boots_a_verified_slot(dev: DeviceState, where: str) -> str:
    bc = dev.bootctl()
    assert not bc.pending, f"{where}: a switch is still pending"
    record = bc.slot(bc.primary)
    data = dev.slot_path(bc.primary).read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (record.size, record.sha256), \
        f"{where}: the booted slot does not match its boot-control record"
    assert record.version is not None
    return record.version


def check_no_partial_files(dev: DeviceState, where: str) -> None:
    leftovers = [p.name for p in dev.slot_path("a").parent.iterdir()
                 if p.name not in ("a.img", "b.img")]
    assert not leftovers, f"{where}: partial slot files left: {leftovers}"
    assert not list(dev.downloads_dir.iterdir()), f"{where}: download space not reclaimed"


async def crash_every_point(pub: Published, tmp_path: Path, kind: str) -> None:
    async with trio.open_nursery() as nursery:
        fleet = await start_fleet(nursery, pub, tmp_path)
        payload = (pub.m2.delta_for(sha256_hex(pub.v1)) if kind == "delta"
                   else pub.m2.full_payload)
        assert payload is not None
        # 1. a clean, traced update
        dev, _ = fleet.device(f"{kind}-clean", kind)
        trace_file = tmp_path / f"{kind}.trace"
        code, out = await peer_update(dev, SWARMOTA_CRASH_TRACE=str(trace_file))
        assert code == 0 and out is not None and out["payload_kind"] == kind, out
        trace = trace_file.read_text().split()
        for expected in ("download.chunk_written", "journal.before_fsync",
                         "journal.after_rename", "slot_write.mid", "slot_write.before_rename",
                         "bootctl.switch.before_write", "bootctl.switch.after_rename",
                         "bootctl.commit.after_read_back", "health.before", "health.after",
                         "report.before_queue", "report.before_send", "outbox.before_rename"):
            assert expected in trace, (expected, sorted(set(trace)))
        points = points_to_try(trace)
        failures: list[str] = []
        limiter = trio.CapacityLimiter(PARALLEL)

        async def one(i: int, name: str, nth: int) -> None:
            async with limiter:
                where = f"{kind} update killed at {name}:{nth}"
                try:
                    await crash_and_restart(fleet, kind, payload, f"{kind}-{i}", name, nth,
                                            where)
                except AssertionError as exc:
                    failures.append(str(exc))

        async with trio.open_nursery() as runs:
            for i, (name, nth) in enumerate(points):
                runs.start_soon(one, i, name, nth)
        nursery.cancel_scope.cancel()
    print(f"{kind}: {len(set(trace))} crash point names, {len(trace)} passes, "
          f"{len(points)} kills")
    assert not failures, "\n".join(failures)


async def crash_and_restart(fleet: Fleet, kind: str, payload: Payload, name: str,
                            point: str, nth: int, where: str) -> None:
    dev, _ = fleet.device(name, kind)
    code, _ = await peer_update(dev, SWARMOTA_CRASH_AT=f"{point}:{nth}")
    assert code == -9, f"{where}: the agent was not killed (exit {code})"
    killed = dev.bootctl()
    assert not killed.pending or killed.tries_remaining >= 2, \
        f"{where}: one kill cost more than one of the 3 boot attempts"
    on_disk = valid_bytes_on_disk(dev, payload)
    # the "reboot"
    code, out = await peer_update(dev)
    assert out is not None, f"{where}: restart crashed (exit {code})"
    assert code == 0, f"{where}: restart did not finish the update: {out}"
    # the payload's chunk list comes first, unless the killed pass kept it
    chunk_list = payload.chunk_count * CHUNK_DIGEST_BYTES
    assert int(out["bytes_origin"]) <= payload.size - on_disk + chunk_list, \
        f"{where}: downloaded {out['bytes_origin']} bytes, {on_disk} of {payload.size} " \
        "were verified on disk already"
    version = check_boots_a_verified_slot(dev, where)
    assert version == "2.0.0", where
    assert dev.slot_path(dev.bootctl().primary).read_bytes() == fleet.pub.v2, where
    check_no_partial_files(dev, where)
    statuses = fleet.reports(dev.config().device_id)
    assert statuses == [0], f"{where}: reports {statuses}"
    assert dev.outbox() == [], f"{where}: reports left undelivered"


async def test_crash_at_every_point_of_a_full_image_update(
        published: Published, tmp_path: Path) -> None:
    await crash_every_point(published, tmp_path, "full")


async def test_crash_at_every_point_of_a_delta_update(
        published: Published, tmp_path: Path) -> None:
    await crash_every_point(published, tmp_path, "delta")
