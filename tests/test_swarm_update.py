"""Swarm delivery through the real agent: devices, seeder and tracker on loopback.

Every device runs ``update_once`` in swarm mode with its own libtorrent session on its
own address (127.0.0.11, .12, ...; TCP only, DHT/LSD/UPnP/NAT-PMP off), finds the others
only through our tracker's ``/announce``, and takes from the origin (127.0.0.1, rate
limited like a CDN-to-home link) only chunks no connected peer has. Misbehaving peers
are played by :mod:`tests.fake_bt_peer` on 127.0.0.4/.5, announced to the same tracker
from their own address so that devices dial them.

Threats and scenarios covered: a fleet pulling the same payload from the CDN once per
device; a peer sending corrupt pieces (banned, honest peers not); a swarm of only lying
or silent peers (the origin finishes within the stall budget); an origin torrent that
does not match the signed info-hash (swarm refused, direct download); upload policy
(metered network, low battery: nothing uploaded).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from swarmota.demo import update_fleet
from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.errors import StatusCode
from swarmota.peer.policy import upload_policy
from swarmota.peer.state import DeviceState
from swarmota.peer.swarm import SwarmConfig
from swarmota.seeder.origin import OriginConfig
from swarmota.seeder.seeding import PayloadSeeder, SeedingConfig
from tests.fake_bt_peer import FakeBtPeer, Mode
from tests.release_env import (
    ReleaseEnv,
    announce_fake,
    killed_mid_download,
    off_base_device,
    start_env,
)

ORIGIN_RATE_BYTES_PER_S = 512 * 1024
STALL_S = 2.0  # the stall window of off_base_device
LIAR_HOST = "127.0.0.4"
SILENT_HOST = "127.0.0.5"


@pytest.fixture
async def slow_env(tmp_path: Path, nursery: trio.Nursery,
                   images: tuple[bytes, bytes]) -> AsyncIterator[ReleaseEnv]:
    """v1 and v2 behind an origin limited to 512 KiB/s (all responses together)."""
    yield await start_env(nursery, tmp_path, *images, origin_config=OriginConfig(
        rate_limit_bytes_per_s=ORIGIN_RATE_BYTES_PER_S, rate_limit_burst_bytes=16 * 1024))


def payload_requests_bytes(env: ReleaseEnv) -> int:
    return env.origin.statistics().bytes_payloads


def assert_on_v2(env: ReleaseEnv, dev: DeviceState, result: UpdateResult, *,
                 seeding: bool = False) -> None:
    assert result.status == StatusCode.OK, result.message
    bc = dev.bootctl()
    assert dev.slot_path(bc.primary).read_bytes() == env.v2 and not bc.pending
    if not seeding:
        assert not list(dev.downloads_dir.iterdir()), "work area removed"
    mine = env.reports(dev.config().device_id)
    assert mine and (mine[-1].status, mine[-1].to_version) == (0, "2.0.0"), "reported"


async def test_fleet_shares_the_payload_and_pulls_it_from_the_origin_about_once(
        slow_env: ReleaseEnv) -> None:
    env = slow_env
    full = env.m2.full_payload
    devices = [off_base_device(env, f"dev-{i}", seed_time_s=60) for i in range(4)]
    results = await update_fleet(devices)
    for dev in devices:
        assert_on_v2(env, dev, results[dev.config().device_id])
    served = payload_requests_bytes(env)
    torrents = 4 * (env.origin_bytes(full) - full.size)
    # Each device downloading alone would cost 4 x the payload; the swarm costs ~1x.
    assert served - torrents <= 1.5 * full.size, (served, full.size)
    assert sum(r.bytes_peers for r in results.values()) >= 2 * full.size
    reports = {r.device_id: r for r in env.reports()}
    for device_id, result in results.items():
        assert reports[device_id].bytes_peers == result.bytes_peers
        assert reports[device_id].bytes_origin == result.bytes_origin
        assert result.download_mode == "swarm" and result.banned_peers == []


async def test_seeder_and_devices_meet_through_the_tracker_and_spare_the_origin(
        slow_env: ReleaseEnv, nursery: trio.Nursery) -> None:
    env = slow_env
    full = env.m2.full_payload
    seeder = PayloadSeeder(env.repo.origin_dir, SeedingConfig(
        swarm=SwarmConfig(listen_host="127.0.0.2"),
        announce_urls=(f"{env.tracker_url}/announce",)))
    await nursery.start(seeder.run)
    devices = [off_base_device(env, f"dev-{i}", seed_time_s=60) for i in range(3)]
    results = await update_fleet(devices)
    digests = set()
    for dev in devices:
        assert_on_v2(env, dev, results[dev.config().device_id])
        digests.add(hashlib.sha256(dev.slot_path("b").read_bytes()).hexdigest())
    assert len(digests) == 1
    # The seeder has every piece from the start: the origin sends only torrent files.
    torrents = 3 * (env.origin_bytes(full) - full.size)
    assert payload_requests_bytes(env) - torrents < full.size
    assert seeder.statistics().bytes_uploaded_payload > 0


async def start_seeding_device(env: ReleaseEnv, name: str, nursery: trio.Nursery,
                               **config: object) -> tuple[DeviceState, trio.Event]:
    """A device updated to v2 that then keeps seeding (until the nursery is cancelled);
    ``config``: more device settings (e.g. an upload limit)."""
    dev = off_base_device(env, name, seed_time_s=120, **config)
    seeding = trio.Event()
    outcome: list[UpdateResult] = []

    def on_seeding(result: UpdateResult, _: float) -> None:
        outcome.append(result)
        seeding.set()

    nursery.start_soon(functools.partial(update_once, dev, on_seeding=on_seeding))
    with trio.fail_after(60):
        await seeding.wait()
    assert_on_v2(env, dev, outcome[0], seeding=True)
    return dev, seeding


async def test_lying_peer_is_banned_and_honest_peers_are_not(slow_env: ReleaseEnv) -> None:
    env = slow_env
    full = env.m2.full_payload
    assert full.info_hash is not None
    async with trio.open_nursery() as nursery:
        # the honest peer uploads slowly, so that the victim surely asks the liar too
        # (on a loaded machine it could otherwise get everything before the liar's
        # handshake, and the test would show nothing)
        await start_seeding_device(env, "honest", nursery,
                                   upload_rate_limit_bytes_per_s=96 * 1024)
        with FakeBtPeer(bytes.fromhex(full.info_hash)[:20], full.chunk_count,
                        mode=Mode.LIAR, host=LIAR_HOST) as liar:
            await announce_fake(env, full, liar)
            victim = off_base_device(env, "victim")
            result = await update_once(victim)
            stats = liar.stats()
        nursery.cancel_scope.cancel()
    assert_on_v2(env, victim, result)
    assert stats.handshakes >= 1 and stats.pieces_sent >= 1, "the liar was asked and lied"
    assert [p.rsplit(":", 1)[0] for p in result.banned_peers] == [LIAR_HOST]
    assert result.bytes_peers > 0, "the honest device served pieces"


async def test_only_lying_and_silent_peers_the_origin_finishes_the_job(
        slow_env: ReleaseEnv) -> None:
    env = slow_env
    full = env.m2.full_payload
    assert full.info_hash is not None
    announce_hash = bytes.fromhex(full.info_hash)[:20]
    with FakeBtPeer(announce_hash, full.chunk_count, mode=Mode.LIAR, host=LIAR_HOST) as liar, \
            FakeBtPeer(announce_hash, full.chunk_count, mode=Mode.SILENT,
                       host=SILENT_HOST) as silent:
        await announce_fake(env, full, liar)
        await announce_fake(env, full, silent)
        dev = off_base_device(env, "alone")
        started = trio.current_time()
        result = await update_once(dev)
        elapsed = trio.current_time() - started
        liar_stats, silent_stats = liar.stats(), silent.stats()
    assert_on_v2(env, dev, result)
    assert liar_stats.handshakes >= 1 and silent_stats.handshakes >= 1
    assert [p.rsplit(":", 1)[0] for p in result.banned_peers] == [LIAR_HOST]
    assert result.bytes_peers <= liar_stats.piece_bytes_sent  # only the lies
    # Every piece is "available" from the silent peer, so the origin waits for the stall
    # budget, then sends the rest: bounded in time and in bytes.
    lower_bound_s = full.size / ORIGIN_RATE_BYTES_PER_S
    assert elapsed < lower_bound_s + STALL_S + 20
    assert result.bytes_origin <= env.origin_bytes(full) + 4 * full.chunk_size


async def test_only_a_trickling_peer_the_origin_takes_over_after_the_stall_window(
        slow_env: ReleaseEnv) -> None:
    """An honest peer that sends real pieces at 2 KiB/s: not banned, and the origin does
    not wait for it beyond ``swarm_stall_s``."""
    env = slow_env
    full = env.m2.full_payload
    assert full.info_hash is not None
    data = (env.repo.origin_dir / full.path).read_bytes()
    with FakeBtPeer(bytes.fromhex(full.info_hash)[:20], full.chunk_count, mode=Mode.SLOW,
                    host=SILENT_HOST, payload=data, piece_size_bytes=full.chunk_size,
                    slow_bytes_per_s=2048) as slow:
        await announce_fake(env, full, slow)
        dev = off_base_device(env, "patient")
        started = trio.current_time()
        result = await update_once(dev)
        elapsed = trio.current_time() - started
        stats = slow.stats()
    assert_on_v2(env, dev, result)
    assert stats.handshakes >= 1 and stats.requests >= 1, "the slow peer was asked"
    assert result.banned_peers == []
    assert elapsed < full.size / ORIGIN_RATE_BYTES_PER_S + STALL_S + 20
    assert result.bytes_origin <= env.origin_bytes(full)


async def test_torrent_not_matching_the_signed_info_hash_is_refused_and_the_origin_used(
        env: ReleaseEnv) -> None:
    full = env.m2.full_payload
    torrent = env.repo.origin_dir / f"{full.path}.torrent"
    other = env.repo.origin_dir / f"{env.m1.full_payload.path}.torrent"
    torrent.write_bytes(other.read_bytes())
    dev = off_base_device(env, "dev-1")
    result = await update_once(dev)
    assert_on_v2(env, dev, result)
    assert result.download_mode == "direct"
    assert result.swarm_note is not None and "not the signed" in result.swarm_note
    assert result.bytes_peers == 0


async def test_metered_and_low_battery_devices_upload_nothing(
        slow_env: ReleaseEnv, tmp_path: Path) -> None:
    env = slow_env
    battery = tmp_path / "capacity"
    battery.write_text("12\n")
    metered = off_base_device(env, "metered", seed_time_s=60, network_metered=True)
    low = off_base_device(env, "low-battery", seed_time_s=60,
                          battery_percent_path=str(battery), min_battery_percent_to_upload=30)
    sharing = [off_base_device(env, f"sharing-{i}", seed_time_s=60) for i in range(2)]
    results = await update_fleet([metered, low, *sharing])
    for dev in (metered, low, *sharing):
        assert_on_v2(env, dev, results[dev.config().device_id])
    assert results["metered"].bytes_uploaded == 0
    assert results["low-battery"].bytes_uploaded == 0
    # they still download from the others, who do share
    assert results["metered"].bytes_peers + results["low-battery"].bytes_peers > 0
    assert sum(results[d.config().device_id].bytes_uploaded for d in sharing) > 0


@pytest.mark.parametrize(("metered", "battery", "allowed"), [
    (False, None, True), (True, None, False), (False, "80", True), (False, "12", False),
    (False, "not a number", False),
])
def test_upload_policy_metered_network_and_battery(
        env_config_dir: Path, metered: bool, battery: str | None, allowed: bool) -> None:
    from swarmota.peer.config import DeviceConfig

    path = None
    if battery is not None:
        path = env_config_dir / "capacity"
        path.write_text(battery + "\n")
    config = DeviceConfig(device_id="d", product="acme-router", hardware_id="hw",
                          origin_url="http://127.0.0.1:1", tracker_url="http://127.0.0.1:2",
                          network_metered=metered, min_battery_percent_to_upload=30,
                          battery_percent_path=None if path is None else str(path))
    policy = upload_policy(config)
    assert policy.allowed is allowed, policy.reason


@pytest.fixture
def env_config_dir(tmp_path: Path) -> Path:
    return tmp_path


async def test_killed_mid_swarm_download_resumes_without_refetching_verified_chunks(
        tmp_path: Path, nursery: trio.Nursery, images: tuple[bytes, bytes]) -> None:
    """SIGKILL the agent (a real ``swarmota peer update`` process) in the middle of a swarm
    download from a slow origin; the next pass keeps every piece on disk that matches the
    torrent (libtorrent hashes the file: resume data is kept only from clean stops),
    fetches only the rest, and installs v2."""
    env = await start_env(nursery, tmp_path, *images, origin_config=OriginConfig(
        rate_limit_bytes_per_s=128 * 1024, rate_limit_burst_bytes=16 * 1024))
    full = env.m2.full_payload
    dev = off_base_device(env, "killed")
    work = dev.downloads_dir / full.sha256
    done_at_kill = await killed_mid_download(dev, full.chunk_count // 5)
    assert dev.bootctl().slot(dev.bootctl().primary).version == "0.9.0", "still on the old slot"
    assert not (work / "resume.dat").exists(), "a crash leaves no (stale) resume data"

    result = await update_once(dev)
    assert_on_v2(env, dev, result)
    assert result.chunks_reused >= done_at_kill, (result.chunks_reused, done_at_kill)
    # (the device's own count: the origin may still be pushing bytes to the dead process)
    torrent_bytes = env.origin_bytes(full) - full.size
    assert result.bytes_origin <= (full.chunk_count - result.chunks_reused) * full.chunk_size \
        + torrent_bytes, (result.bytes_origin, result.chunks_reused)


async def test_peer_status_shows_live_download_progress(
        tmp_path: Path, nursery: trio.Nursery, images: tuple[bytes, bytes]) -> None:
    """While a swarm download runs, ``swarmota peer status`` tells how far it is and where
    the bytes come from."""
    # ~7 s for the payload: the status commands (a Python start each) see it running
    env = await start_env(nursery, tmp_path, *images, origin_config=OriginConfig(
        rate_limit_bytes_per_s=96 * 1024, rate_limit_burst_bytes=16 * 1024))
    dev = off_base_device(env, "watched")
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(update_once, dev, seed_time_s=0))
        with trio.fail_after(30):
            while not (dev.progress() or {}).get("chunks_done"):
                await trio.sleep(0.05)
        status = await trio.run_process(
            [sys.executable, "-m", "swarmota.cli", "peer", "status", str(dev.root)],
            capture_stdout=True)
        seen.append(status.stdout.decode())
        as_json = await trio.run_process(
            [sys.executable, "-m", "swarmota.cli", "peer", "status", str(dev.root), "--json"],
            capture_stdout=True)
    text = seen[0]
    assert "now: downloading full payload" in text and "(swarm mode)" in text
    assert "from the origin" in text and "chunks" in text
    progress = json.loads(as_json.stdout)["progress"]
    assert progress is None or progress["chunks_total"] == env.m2.full_payload.chunk_count
    assert dev.progress() is None, "no progress record once the pass is over"
