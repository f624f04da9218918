"""A fleet with identities end to end (issue 8): HTTPS origin and tracker with pinned
keys, a tracker that accepts only requests signed by fleet identities, private swarms
(SSL torrents of the fleet CA), a seeder with a seed identity announcing through the
relay, devices updating through the real agent.

Threats covered: a device without an identity, or with a certificate from another CA,
is refused by the tracker (status 10, its slot untouched, nothing stored for it, the
next run with a fleet identity succeeds); fleet members share the payload in the private
swarm and their reports are stored; a stolen report cannot be replayed.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote_from_bytes

import httpx
import pytest
import trio

from swarmota.infra.devca import issue_device_cert
from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.errors import StatusCode
from swarmota.peer.http import HttpClient, TlsPolicy
from swarmota.peer.identity import install_identity, load_identity_dir
from swarmota.peer.state import DeviceState
from swarmota.tracker.sqlite_store import SqliteStore
from tests.release_env import Fleet, ReleaseEnv


def assert_untouched(dev: DeviceState, v1: bytes) -> None:
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "a" and not bc.pending
    assert dev.slot_path("a").read_bytes() == v1
    assert not dev.slot_path("b").exists()


def tracker_knows(env: ReleaseEnv, device_id: str) -> bool:
    store = SqliteStore(env.db)
    try:
        return store.device(device_id) is not None or any(
            r.device_id == device_id for r in store.reports())
    finally:
        store.close()


async def test_fleet_members_update_through_the_private_swarm_and_are_reported(
        fleet: Fleet) -> None:
    env = fleet.env
    devices = [fleet.device("dev-1"), fleet.device("dev-2")]
    results: dict[str, UpdateResult] = {}

    async def one(dev: DeviceState) -> None:
        results[dev.config().device_id] = await update_once(dev)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for dev in devices:
                nursery.start_soon(one, dev)
    for dev in devices:
        result = results[dev.config().device_id]
        assert result.status == StatusCode.OK, result.message
        assert result.download_mode == "swarm"
        bc = dev.bootctl()
        assert dev.slot_path(bc.primary).read_bytes() == env.v2 and not bc.pending
    # the payload moved between fleet members over TLS (the seeder or each other)
    assert sum(r.bytes_peers for r in results.values()) > 0
    assert {r.device_id for r in env.reports()} == {"dev-1", "dev-2"}


@pytest.mark.parametrize("ca", [None, "other-ca"], ids=["no-identity", "foreign-ca"])
async def test_device_without_a_fleet_identity_is_refused_and_keeps_its_slot(
        fleet: Fleet, ca: str | None) -> None:
    env = fleet.env
    outsider = fleet.device("outsider-1", ca=ca)
    result = await update_once(outsider)
    assert result.status == StatusCode.DOWNLOAD_FAILED and "401" in result.message
    assert not result.attempted
    assert_untouched(outsider, env.v1)
    assert not tracker_knows(env, "outsider-1")
    # provisioned with a fleet identity, the same device updates on its next run
    files = issue_device_cert(fleet.pki / "fleet-ca", fleet.pki / "late", "outsider-1")
    install_identity(outsider.root, files.cert, files.key, "outsider-1")
    assert (await update_once(outsider)).status == StatusCode.OK


async def test_a_captured_report_replayed_to_the_tracker_is_refused(fleet: Fleet) -> None:
    """An attacker who got hold of a signed report (e.g. from a log of a TLS-terminating
    proxy) sends it again: refused, and the tracker still holds one report."""
    env = fleet.env
    dev = fleet.device("dev-1")
    identity = load_identity_dir(dev.root / "identity")
    body = (b'{"device_id":"dev-1","product":"acme-router","from_version":"1.0.0",'
            b'"to_version":"2.0.0","status":40,"message":"","bytes_origin":0,'
            b'"bytes_peers":0,"timings_s":{}}')
    headers = dict(identity.signer.headers("POST", b"/v1/report", body,
                                           identity.next_counter()))
    headers["content-type"] = "application/json"
    ctx = TlsPolicy(ca_file=str(fleet.server_ca)).ssl_context()
    async with httpx.AsyncClient(verify=ctx) as client:
        first = await client.post(f"{env.tracker_url}/v1/report", content=body,
                                  headers=headers)
        again = await client.post(f"{env.tracker_url}/v1/report", content=body,
                                  headers=headers)
    assert first.status_code == 200, first.text
    assert again.status_code == 401 and "replayed" in again.json()["error"]
    assert len(env.reports()) == 1


async def test_seeder_serve_with_a_seed_identity_joins_the_private_swarm(
        fleet: Fleet, tmp_path: Path) -> None:
    """`swarmota seeder serve --identity` (the CLI, its own process): its announces go,
    signed and pinned, through its relay; the tracker counts it as a seed of the
    release's swarm, next to the fixture's seeder."""
    env = fleet.env
    files = issue_device_cert(fleet.pki / "fleet-ca", tmp_path / "seeder-2", "seeder-2",
                              role="seed")
    dev = fleet.device("dev-1")
    identity = load_identity_dir(dev.root / "identity")
    full = env.m2.full_payload
    assert full.info_hash is not None
    query = "info_hash=" + quote_from_bytes(bytes.fromhex(full.info_hash)[:20])
    tls = TlsPolicy(pins=frozenset(fleet.pins), ca_file=str(fleet.server_ca))

    async def seeds() -> int:
        async with HttpClient(timeout_s=10.0, tls=tls, identity=identity) as http:
            status, body = await http.get_tracker(f"{env.tracker_url}/scrape?{query}",
                                                  max_bytes=4096)
        assert status == 200, body
        return int(body.split(b"8:completei", 1)[1].split(b"e", 1)[0])

    with trio.fail_after(30):
        while await seeds() < 1:  # the fixture's seeder
            await trio.sleep(0.2)
    pins = [arg for pin in fleet.pins for arg in ("--tracker-pin", pin)]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(functools.partial(
            trio.run_process,
            [sys.executable, "-m", "swarmota.cli", "seeder", "serve", str(env.repo.path),
             "--listen", "127.0.0.1:0", "--seed-listen", "127.0.0.6:0",
             "--identity", str(files.cert.parent),
             "--announce-url", f"{env.tracker_url}/announce",
             "--tracker-ca-file", str(fleet.server_ca), *pins],
            check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        try:
            with trio.fail_after(60):
                while await seeds() < 2:
                    await trio.sleep(0.3)
        finally:
            process.terminate()
