"""Three tracker processes behind a real nginx (round robin) on one PostgreSQL and one
Redis (throwaway servers), and a fleet of signed devices whose requests land on
different processes: rollout admissions exact, ``max_in_flight`` held across
processes, a halt decided by one process seen by all within its bound, peers announced
to one process handed out by another, a revocation refused everywhere within
``revocation_refresh_s``, and a process killed mid-fleet losing nothing that was
answered. Skipped, with the reason, where PostgreSQL, Redis or nginx is missing."""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
import trio

from bench.servers import PostgresServer, RedisServer
from bench.tracker import start_tracker
from bench.tracker_scale import run_nginx
from swarmota.infra.devca import create_ca, issue_device_cert
from swarmota.infra.deviceauth import RequestSigner
from swarmota.tracker.admin import hash_token, new_token
from swarmota.tracker.bittorrent import SwarmInfo
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import DEFAULT_REVOCATION_REFRESH_S
from swarmota.tracker.director import ROLLOUT_CACHE_S
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.store import Store, TokenRecord, open_store

TIMEOUT_S = 30
_counter = itertools.count(1)


@dataclass
class Tracker:
    proc: subprocess.Popen[str]
    api: str
    lean: str

    def metric(self, name: str) -> int:
        text = httpx.get(self.api + "/metrics", timeout=TIMEOUT_S).text
        return sum(int(m.group(1)) for m in re.finditer(
            rf"^swarmota_tracker_{name}(?:{{[^}}]*}})? (\d+)$", text, re.MULTILINE))


@dataclass
class Cluster:
    db_url: str
    nginx: str
    trackers: list[Tracker]
    ca_dir: Path
    ids_dir: Path
    admin_token: str
    signers: dict[str, RequestSigner] = field(default_factory=dict)

    def signer(self, device: str, role: str = "device") -> RequestSigner:
        if device not in self.signers:
            files = issue_device_cert(self.ca_dir, self.ids_dir / device, device, role=role)
            self.signers[device] = RequestSigner(files.cert.read_bytes(),
                                                 files.key.read_bytes())
        return self.signers[device]

    def store(self) -> Store:
        return open_store(self.db_url)


def _start_tracker(db_url: str, redis_url: str, ca: Path) -> Tracker:
    proc, api, lean = start_tracker(db_url, None, ca, extra=[
        "--redis", redis_url, "--trusted-proxy", "127.0.0.1/32"])
    return Tracker(proc, api, lean)


@pytest.fixture(scope="module")
def cluster(postgres_server: PostgresServer, redis_server: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    tmp = tmp_path_factory.mktemp("cluster")
    postgres_server.psql("CREATE SCHEMA many_processes")
    db_url = postgres_server.url(schema="many_processes")
    ca = create_ca(tmp / "fleet-ca")
    token = new_token()
    with open_store(db_url) as store:
        store.add_token(TokenRecord(hash_token(token), "ops", "admin", 0.0, None))
    trackers = [_start_tracker(db_url, redis_server.url, ca) for _ in range(3)]
    try:
        with run_nginx(tmp, [t.lean for t in trackers]) as url:
            yield Cluster(db_url, url, trackers, tmp / "fleet-ca", tmp / "ids", token)
    finally:
        for tracker in trackers:
            tracker.proc.terminate()
        for tracker in trackers:
            try:
                tracker.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                tracker.proc.kill()
                tracker.proc.wait()
        postgres_server.psql("DROP SCHEMA many_processes CASCADE")


# --- a signed device -------------------------------------------------------------------


def release(product: str, info_hash: str) -> Release:
    base = Release.create(product, "2.0.0", 2)
    return Release(base.product, base.version, base.release_counter, base.target,
                   (SwarmInfo(info_hash, product, "2.0.0", "full"),))


async def signed(client: httpx.AsyncClient, cluster: Cluster, base: str, device: str,
                 method: str, target: str, body: bytes = b"", *,
                 role: str = "device") -> httpx.Response:
    headers = dict(cluster.signer(device, role).headers(method, target.encode(), body,
                                                        next(_counter)))
    if method == "POST":
        headers["content-type"] = "application/json"
    return await client.request(method, base + target, content=body or None,
                                headers=headers)


def checkin_body(device: str, product: str) -> bytes:
    return (f'{{"device_id": "{device}", "product": "{product}", "hardware_id": "hw1", '
            f'"version": "1.0.0", "release_counter": 1}}').encode()


def report_body(device: str, product: str, status: int, report_id: str) -> bytes:
    return (f'{{"device_id": "{device}", "product": "{product}", "from_version": "1.0.0", '
            f'"to_version": "2.0.0", "status": {status}, "message": "", "bytes_origin": 10, '
            f'"bytes_peers": 90, "timings_s": {{}}, "report_id": "{report_id}"}}').encode()


async def checkin(client: httpx.AsyncClient, cluster: Cluster, device: str, product: str,
                  base: str | None = None) -> Any:
    response = await signed(client, cluster, base or cluster.nginx, device, "POST",
                            "/v1/checkin", checkin_body(device, product))
    assert response.status_code == 200, response.text
    return response.json()


def announce_target(info_hash: str, device: str | None, port: int, left: int) -> str:
    query = (f"info_hash={quote_from_bytes(bytes.fromhex(info_hash)[:20])}"
             f"&peer_id={quote_from_bytes(f'-XX0001-{port:012d}'.encode())}&port={port}"
             f"&left={left}&compact=1")
    return "/announce?" + query + (f"&device_id={device}" if device else "")


def peers_of(body: bytes) -> list[tuple[str, int]]:
    assert b"failure reason" not in body, body
    raw = body.split(b"5:peers", 1)[1]
    length, _, rest = raw.partition(b":")
    data = rest[: int(length)]
    return [(socket.inet_ntoa(data[i:i + 4]), int.from_bytes(data[i + 4:i + 6], "big"))
            for i in range(0, len(data), 6)]


# --- the scenarios ------------------------------------------------------------------------


async def test_admissions_are_exact_and_max_in_flight_holds_across_processes(
        cluster: Cluster) -> None:
    product = "cap-router"
    plan = RolloutPlan(stages_percent=(100.0,), max_in_flight=5, min_successes=1,
                       soak_s=0)
    with cluster.store() as store:
        register_release(store, release(product, "a1" * 32), plan, now=time.time())
    devices = [f"cap-{i:02d}" for i in range(30)]
    before = [t.metric("checkins_total") for t in cluster.trackers]
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        answers: dict[str, Any] = {}

        async def one(device: str) -> None:
            answers[device] = await checkin(client, cluster, device, product)

        async with trio.open_nursery() as nursery:
            for device in devices:
                nursery.start_soon(one, device)
        offered = sorted(d for d, a in answers.items() if a["release"] is not None)
        assert len(offered) == 5  # the cap, with 30 devices on 3 processes at once
        for device in offered:  # they finish: the next five may go
            response = await signed(client, cluster, cluster.nginx, device, "POST",
                                    "/v1/report", report_body(device, product, 0,
                                                              f"done-{device}"))
            assert response.status_code == 200
        async with trio.open_nursery() as nursery:
            for device in devices:
                if device not in offered:
                    nursery.start_soon(one, device)
    second = sorted(d for d, a in answers.items()
                    if a["release"] is not None and d not in offered)
    assert len(second) == 5
    with cluster.store() as store:
        state = store.rollout_of(product, "2.0.0")
        assert state is not None
        assert (state.totals.admitted, state.totals.succeeded) == (10, 5)
        assert len(store.admissions(state.rollout_id)) == 10
    after = [t.metric("checkins_total") for t in cluster.trackers]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


async def test_a_halt_decided_by_one_process_is_seen_by_all_within_its_bound(
        cluster: Cluster) -> None:
    product = "halt-router"
    info_hash = "b2" * 32
    with cluster.store() as store:
        register_release(store, release(product, info_hash), RolloutPlan.everyone(),
                         now=time.time())
    first, *others = cluster.trackers
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        assert (await checkin(client, cluster, "halt-1", product))["release"] is not None
        # an admitted device announces to every process: peers flow (the gate is open)
        for port, tracker in enumerate(cluster.trackers, 7100):
            response = await signed(client, cluster, tracker.lean, "halt-1", "GET",
                                    announce_target(info_hash, "halt-1", port, 100))
            assert response.status_code == 200 and b"failure" not in response.content
        response = await client.post(
            f"{first.api}/v1/admin/rollouts/{product}/2.0.0/abort",
            headers={"authorization": f"Bearer {cluster.admin_token}"})
        assert response.status_code == 200, response.text
        decided = time.monotonic()
        # check-ins read the rollout in their transaction: at once, on every process
        for i, tracker in enumerate(cluster.trackers):
            answer = await checkin(client, cluster, f"halt-new-{i}", product, tracker.lean)
            assert answer["release"] is None
        # announces trust a cached rollout for at most ROLLOUT_CACHE_S
        bound = ROLLOUT_CACHE_S + 1.0
        for tracker in others:
            while True:
                response = await signed(client, cluster, tracker.lean, "halt-1", "GET",
                                        announce_target(info_hash, "halt-1", 7200, 100))
                if b"5:peers0:" in response.content:
                    break
                assert time.monotonic() - decided < bound, "the abort did not reach it"
                await trio.sleep(0.1)


async def test_peers_announced_to_one_process_are_handed_out_by_another(
        cluster: Cluster) -> None:
    product = "swarm-router"
    info_hash = "c3" * 32
    with cluster.store() as store:
        register_release(store, release(product, info_hash), RolloutPlan.everyone(),
                         now=time.time())
    one, two, three = cluster.trackers
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        # the operator's seeder announces to process one, from 127.0.0.5 (via nginx's
        # X-Forwarded-For the address is its own, not the proxy's)
        seeder = await signed(client, cluster, one.lean, "seeder-1", "GET",
                              announce_target(info_hash, None, 7301, 0), role="seed")
        assert seeder.status_code == 200
        await checkin(client, cluster, "leech-1", product)
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.6")
        async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT_S) as far:
            response = await signed(far, cluster, cluster.nginx, "leech-1", "GET",
                                    announce_target(info_hash, "leech-1", 7302, 100))
            assert ("127.0.0.1", 7301) in peers_of(response.content)
        for tracker in (two, three):
            response = await signed(client, cluster, tracker.lean, "leech-1", "GET",
                                    announce_target(info_hash, "leech-1", 7302, 100))
            assert set(peers_of(response.content)) == {("127.0.0.1", 7301),
                                                       ("127.0.0.6", 7302)} - {
                ("127.0.0.1", 7302)}
        # a replayed announce is refused by every process, whichever accepted it
        target = announce_target(info_hash, "leech-1", 7302, 100)
        headers = dict(cluster.signer("leech-1").headers("GET", target.encode(), b"",
                                                         next(_counter)))
        first = await client.get(one.lean + target, headers=headers)
        assert b"failure reason" not in first.content
        for tracker in (one, two, three):
            again = await client.get(tracker.lean + target, headers=headers)
            assert b"replayed request" in again.content


async def test_a_revocation_is_refused_by_every_process_within_the_refresh_bound(
        cluster: Cluster) -> None:
    device = "rev-1"
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        for tracker in cluster.trackers:
            await checkin(client, cluster, device, "any-product", tracker.lean)
        response = await client.post(
            f"{cluster.trackers[0].api}/v1/admin/devices/{device}/revoke",
            json={"reason": "stolen"},
            headers={"authorization": f"Bearer {cluster.admin_token}"})
        assert response.status_code == 200, response.text
        revoked = time.monotonic()
        pending = list(cluster.trackers)
        while pending:
            tracker = pending[0]
            answer = await signed(client, cluster, tracker.lean, device, "POST",
                                  "/v1/checkin", checkin_body(device, "any-product"))
            if answer.status_code == 401:
                assert "revoked" in answer.json()["error"]
                pending.pop(0)
                continue
            assert time.monotonic() - revoked < DEFAULT_REVOCATION_REFRESH_S + 1.0
            await trio.sleep(0.2)


async def test_a_process_killed_mid_fleet_loses_nothing_answered(cluster: Cluster) -> None:
    """kill -9 one process while 40 devices check in and report through nginx; devices
    retry what failed (as the agent does); every report is counted once, every
    admission exactly."""
    product = "kill-router"
    plan = RolloutPlan(stages_percent=(100.0,), min_successes=1, soak_s=0,
                       halt_failure_count=10**6, halt_failure_rate=1.0)
    with cluster.store() as store:
        register_release(store, release(product, "d4" * 32), plan, now=time.time())
    devices = [f"kill-{i:02d}" for i in range(40)]
    victim = cluster.trackers[2]

    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        async def retried(device: str, target: str, body: bytes) -> httpx.Response:
            for _ in range(20):
                try:
                    response = await signed(client, cluster, cluster.nginx, device, "POST",
                                            target, body)
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code == 200:
                    return response
                await trio.sleep(0.1)
            raise AssertionError(f"{device}: {target} never answered")

        async def life(device: str, delay: float) -> None:
            await trio.sleep(delay)
            answer = (await retried(device, "/v1/checkin",
                                    checkin_body(device, product))).json()
            assert answer["release"]["version"] == "2.0.0"
            await retried(device, "/v1/report",
                          report_body(device, product, 0, f"report-{device}"))

        async with trio.open_nursery() as nursery:
            for i, device in enumerate(devices):
                nursery.start_soon(life, device, i * 0.02)
            await trio.sleep(0.3)
            victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    with cluster.store() as store:
        state = store.rollout_of(product, "2.0.0")
        assert state is not None
        assert (state.totals.admitted, state.totals.succeeded) == (40, 40)
        reports = [r for r in store.reports(product=product, limit=1000)]
        assert sorted(r.device_id for r in reports) == devices  # each stored once
