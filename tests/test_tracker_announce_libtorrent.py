"""The real thing: two libtorrent sessions find each other only through our tracker.

A payload's v2 torrent names ``<tracker>/announce``; its release (whose manifest payload
carries the torrent's info-hash) is registered in the tracker's database. A seeder on
127.0.0.2 and a leecher on 127.0.0.3 (TCP only, DHT/LSD/UPnP/NAT-PMP off, no web seed,
no ``connect_peer``) announce to the real tracker on 127.0.0.1; the leecher must end up
with identical bytes. Threat covered: a tracker that hands out nothing usable, or the
requester itself, would leave the leecher stalled until the timeout.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import trio

from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import ImageInfo, Payload, ReleaseManifest, chunk_hashes, sha256_hex
from swarmota.peer.swarm import SwarmConfig, SwarmSession, make_torrent
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.registry import SwarmRegistry
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker, serve_tracker_endpoints
from swarmota.tracker.sqlite_store import SqliteStore

PIECE = 16 * 1024
SIZE = 2 * 1024 * 1024
TIMEOUT_S = 60


def manifest_for(data: bytes, info_hash: str) -> ReleaseManifest:
    return ReleaseManifest(
        product="acme-router", version="2.0.0", release_counter=2,
        compatibility=("acme-router-hw1",), update_type="image",
        image=ImageInfo(size=len(data), sha256=sha256_hex(data)),
        payloads=(Payload(kind="full", encoding="zstd", size=len(data),
                          sha256=sha256_hex(data), chunk_size=PIECE,
                          chunks=tuple(chunk_hashes(data, PIECE)), info_hash=info_hash),),
    )


@pytest.mark.parametrize("endpoint", ["api", "lean"])
async def test_leecher_finds_the_seeder_through_the_tracker_only(
        tmp_path: Path, nursery: trio.Nursery, endpoint: str) -> None:
    """Through the main (hypercorn) listener and through the lean endpoint."""
    db = tmp_path / "tracker.db"
    registry = SwarmRegistry(interval_s=300)
    config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0),
                           announce_listen=("127.0.0.1", 0))
    urls = await nursery.start(functools.partial(serve_tracker_endpoints, config,
                                                 registry=registry))
    tracker_url = urls.api if endpoint == "api" else urls.announce

    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    data = random.Random(42).randbytes(SIZE)
    payload = seed_dir / "payload.zst"
    payload.write_bytes(data)
    torrent = await trio.to_thread.run_sync(functools.partial(
        make_torrent, payload, piece_size_bytes=PIECE, trackers=[f"{tracker_url}/announce"]))

    release = Release.from_manifest(manifest_for(data, torrent.info_hash))
    assert [s.announce_hash for s in release.swarms] == [torrent.announce_hash]
    with SqliteStore(db) as store:
        assert register_release(store, release, RolloutPlan.everyone())[0] is True

    leech_dir = tmp_path / "leech"
    leech_dir.mkdir()
    with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as seeder, \
            SwarmSession(SwarmConfig(listen_host="127.0.0.3")) as leecher:
        seeder_ref = seeder.add_payload(torrent.data, seed_dir, seed_mode=True)
        with trio.fail_after(TIMEOUT_S):  # the seeder announces first
            while registry.statistics().seeds < 1:
                await trio.sleep(0.05)

        ref = leecher.add_payload(torrent.data, leech_dir)
        await leecher.wait_complete(ref, timeout_s=TIMEOUT_S)

        assert ref.path.read_bytes() == data
        stats = leecher.statistics(ref)
        assert stats.num_web_seeds == 0
        assert stats.bytes_downloaded_payload >= SIZE
        assert seeder.statistics(seeder_ref).bytes_uploaded_payload >= SIZE
        assert registry.statistics().peers == 2

        # Removing a torrent announces "stopped": the tracker forgets the peer.
        leecher.remove(ref)
        seeder.remove(seeder_ref)
        with trio.fail_after(TIMEOUT_S):
            while registry.statistics().peers:
                await trio.sleep(0.05)

    registry_stats = registry.statistics()
    assert registry_stats.announces >= 2
    assert registry_stats.refused == 0
    assert registry_stats.downloads == 1  # the leecher announced "completed"
    assert registry_stats.peers == 0  # both announced "stopped"


async def test_the_swarm_follows_the_rollout_for_real_clients(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """A canary (admitted) and an outsider (not admitted) both announce with their device
    id in the tracker URL, as ``peer.swarm_fetch`` does; only the canary gets the seeder
    (and the seeder never hears of the outsider)."""
    import httpx

    from swarmota.peer.swarm_fetch import announce_urls

    db = tmp_path / "tracker.db"
    registry = SwarmRegistry(interval_s=300)
    config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0))
    tracker_url = await nursery.start(functools.partial(serve_tracker, config,
                                                        registry=registry))
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    data = random.Random(7).randbytes(SIZE)
    (seed_dir / "payload.zst").write_bytes(data)
    torrent = await trio.to_thread.run_sync(functools.partial(
        make_torrent, seed_dir / "payload.zst", piece_size_bytes=PIECE,
        trackers=[f"{tracker_url}/announce"]))
    with SqliteStore(db) as store:
        register_release(store, Release.from_manifest(manifest_for(data, torrent.info_hash)),
                         RolloutPlan(canary_devices=("canary-1",)))
    async with httpx.AsyncClient(base_url=tracker_url, timeout=5) as client:
        for device in ("canary-1", "outsider-1"):
            answer = (await client.post("/v1/checkin", json={
                "device_id": device, "product": "acme-router", "hardware_id": "hw1",
                "version": "1.0.0", "release_counter": 1, "network_id": "home-1"})).json()
            assert (answer["release"] is not None) == (device == "canary-1")

    announce = (f"{tracker_url}/announce",)
    dirs = {name: tmp_path / name for name in ("canary", "outsider")}
    for d in dirs.values():
        d.mkdir()
    with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as seeder, \
            SwarmSession(SwarmConfig(listen_host="127.0.0.3")) as canary, \
            SwarmSession(SwarmConfig(listen_host="127.0.0.4")) as outsider:
        seeder.add_payload(torrent.data, seed_dir, seed_mode=True)
        with trio.fail_after(TIMEOUT_S):
            while registry.statistics().seeds < 1:
                await trio.sleep(0.05)
        out_ref = outsider.add_payload(torrent.data, dirs["outsider"], torrent_urls=False,
                                       trackers=announce_urls(announce, "outsider-1"))
        ref = canary.add_payload(torrent.data, dirs["canary"], torrent_urls=False,
                                 trackers=announce_urls(announce, "canary-1"))
        await canary.wait_complete(ref, timeout_s=TIMEOUT_S)
        assert ref.path.read_bytes() == data
        with trio.fail_after(TIMEOUT_S):  # the outsider has been answered (with nobody)
            while not outsider.pieces(out_ref).tracker_replied:
                await trio.sleep(0.05)
        await trio.sleep(1.0)
        assert outsider.statistics(out_ref).bytes_downloaded_payload == 0
        assert registry.statistics().peers == 2  # seeder and canary, never the outsider
    with SqliteStore(db) as store:
        state = store.rollout_of("acme-router", "2.0.0")
        assert state is not None and state.counters[0].downloading == 1
