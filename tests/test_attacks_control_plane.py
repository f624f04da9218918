"""Rollout and control plane (RELIABILITY.md, "Rollout and control plane") end to end:
canary failures halting a rollout with real devices, and a load of many devices checking
in, announcing and reporting at once against the real tracker (hypercorn + SQLite on
127.0.0.1). Admin tokens and concurrent admin actions are tested on the tracker app in
tests/test_tracker_director.py; forged and replayed reports are out of this file's scope.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import trio

from swarmota.demo import mutate_image
from swarmota.infra.http_serve import ListenConfig
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from swarmota.seeder.publish import publish_release
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.registry import SwarmRegistry
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore
from tests.release_env import HARDWARE_ID, PRODUCT, ReleaseEnv


async def test_canary_failures_halt_the_rollout_and_devices_outside_never_get_it(
        env: ReleaseEnv) -> None:
    """v3 goes to two canaries first; its health check fails on the first: it falls
    back to its committed v2 slot (byte-identical) and reports 40, and the rollout halts
    by itself at once (the default canary rule: any failing canary), naming the device,
    its status and its message. Neither the other canary nor a device outside the
    canary group is ever offered v3."""
    v3 = mutate_image(env.v2, seed=61)
    m3 = publish_release(env.repo, env.image_path("v3.img", v3), product=PRODUCT,
                         version="3.0.0", release_counter=3, compatibility=[HARDWARE_ID],
                         zstd_level=3)
    with SqliteStore(env.db) as store:
        register_release(store, Release.from_manifest(m3), RolloutPlan(
            canary_devices=("canary-1", "canary-2"), min_successes=2, soak_s=0))
    on_v2 = {"image": env.v2, "version": "2.0.0", "counter": 2, "mode": "direct"}
    first, second = [env.device(name, health_command=["false"], **on_v2)  # type: ignore[arg-type]
                     for name in ("canary-1", "canary-2")]
    outsider = env.device("dev-9", **on_v2)  # type: ignore[arg-type]
    result = await update_once(first)
    assert result.status == StatusCode.POSTCHECK_FAILED, result.message
    bc = first.bootctl()
    assert bc.primary == bc.committed == "a" and not bc.pending
    assert first.slot_path("a").read_bytes() == env.v2
    assert not list(first.downloads_dir.iterdir())
    with SqliteStore(env.db) as store:
        state = store.rollout_of(PRODUCT, "3.0.0")
        assert state is not None and state.phase == "halted", state
        assert state.halt_reason.startswith(
            "canary stage: 1 failed of 1 offered (limit 1): canary-1 (stage canary, "
            "status 40 post-check-failed): health check exited 1"), state.halt_reason
        assert [e.action for e in store.audit()][-1] == "rollout.halted"
    assert [(r.device_id, r.status) for r in env.reports()] == [("canary-1", 40)]
    for dev in (second, outsider, first):  # nobody new; a canary that rolled back: not again
        again = await update_once(dev)
        assert again.status == StatusCode.OK and not again.attempted and not again.updated
        assert dev.bootctl().committed == "a" and dev.slot_path("a").read_bytes() == env.v2


DEVICES = 400  # x (check-in + announce + report) = 1200 requests, plus health probes
CONCURRENCY = 32
MAX_PEERS = 100


def announce_query(info_hash: bytes, n: int) -> str:
    peer_id = f"-LD0001-{n:012d}".encode()
    return (f"info_hash={quote_from_bytes(info_hash)}&peer_id={quote_from_bytes(peer_id)}"
            f"&port={10000 + n}&uploaded=0&downloaded=0&left=1000&compact=1"
            f"&event=started&device_id=load-{n}")


async def test_many_devices_checking_in_announcing_and_reporting_at_once(
        env: ReleaseEnv, tmp_path: Path, nursery: trio.Nursery) -> None:
    """400 devices, 32 at a time, each check in, announce and report against one real
    tracker (hypercorn + SQLite) whose peer registry holds at most 100 peers. The health
    endpoint answers throughout (each probe within a generous 15 s), memory stays
    bounded (the registry keeps 100 peers and refuses the rest), and every report is
    stored."""
    db = tmp_path / "load.sqlite"
    with SqliteStore(db) as store:
        register_release(store, Release.from_manifest(env.m2), RolloutPlan.everyone())
    registry = SwarmRegistry(max_peers_per_swarm=MAX_PEERS, max_peers_total=MAX_PEERS)
    url = await nursery.start(functools.partial(
        serve_tracker, TrackerConfig(db_path=db, listen=ListenConfig()), registry=registry))
    full = env.m2.full_payload
    assert full.info_hash is not None
    info_hash = bytes.fromhex(full.info_hash)[:20]
    limiter = trio.CapacityLimiter(CONCURRENCY)
    outcomes: dict[str, int] = {"checkin": 0, "announce": 0, "report": 0}
    probes: list[int] = []
    done = trio.Event()
    limits = httpx.Limits(max_connections=CONCURRENCY + 2)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def device(n: int) -> None:
            async with limiter:
                body = {"device_id": f"load-{n}", "product": PRODUCT,
                        "hardware_id": HARDWARE_ID, "version": "1.0.0", "release_counter": 1}
                answer = await client.post("/v1/checkin", json=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["release"]["version"] == "2.0.0"
                outcomes["checkin"] += 1
                answer = await client.get(f"/announce?{announce_query(info_hash, n)}")
                assert answer.status_code == 200 and b"failure" not in answer.content
                outcomes["announce"] += 1
                report: dict[str, object] = {"device_id": f"load-{n}", "product": PRODUCT,
                          "from_version": "1.0.0", "to_version": "2.0.0",
                          "status": 0, "message": f"load {n}",
                          "bytes_origin": 1, "bytes_peers": 0, "timings_s": {}}
                answer = await client.post("/v1/report", json=report)
                assert answer.status_code == 200, answer.text
                outcomes["report"] += 1

        async def probe() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=15) as health:
                while not done.is_set():
                    with trio.fail_after(15):
                        answer = await health.get("/v1/health")
                    assert answer.status_code == 200 and answer.json() == {"ok": True}
                    probes.append(outcomes["report"])
                    await trio.sleep(0.05)

        with trio.fail_after(300):
            async with trio.open_nursery() as load:
                load.start_soon(probe)
                async with trio.open_nursery() as fleet:
                    for n in range(DEVICES):
                        fleet.start_soon(device, n)
                done.set()
    assert outcomes == {"checkin": DEVICES, "announce": DEVICES, "report": DEVICES}
    assert any(0 < seen < DEVICES for seen in probes), "health answered during the load"
    stats = registry.statistics()
    assert stats.peers <= MAX_PEERS and stats.refused >= DEVICES - MAX_PEERS
    with SqliteStore(db) as store:
        stored = store.reports()
    assert len(stored) == DEVICES
    assert {r.device_id for r in stored} == {f"load-{n}" for n in range(DEVICES)}
    assert all(r.status == 0 and r.message == f"load {r.device_id[5:]}" for r in stored)
