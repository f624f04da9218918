"""Shared fixtures: a published repository with v1 and v2, a real origin server and a
real tracker on 127.0.0.1, and a factory for provisioned devices; and the checks of the
invariants of ../shared/RELIABILITY.md that the attack tests share."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
import trio

from swarmota.demo import make_image, mutate_image
from swarmota.infra.devca import ServerFiles, create_ca, issue_device_cert, issue_server_cert
from swarmota.infra.http_serve import ListenConfig, serve_asgi
from swarmota.manifest import CHUNK_DIGEST_BYTES, Payload, ReleaseManifest, sha256_hex
from swarmota.peer.agent import update_once
from swarmota.peer.announce_relay import AnnounceRelay
from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import StatusCode
from swarmota.peer.http import HttpClient, TlsPolicy
from swarmota.peer.identity import install_identity, load_identity_dir
from swarmota.peer.state import DeviceState, init_device
from swarmota.peer.swarm import SwarmConfig
from swarmota.seeder.keys import load_private_key
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.publish import publish_release
from swarmota.seeder.repository import KeySetup, Repository
from swarmota.seeder.seeding import PayloadSeeder, SeedingConfig
from swarmota.seeder.server import serve_origin
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import TRACKER_TLS_MIN_VERSION, serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore
from tests.fake_bt_peer import FakeBtPeer

PRODUCT = "acme-router"
HARDWARE_ID = "acme-router-hw1"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ReleaseEnv:
    """A repository with v1 (counter 1) and v2 (counter 2), served on loopback."""

    workdir: Path
    repo: Repository
    origin: OriginApp
    origin_url: str
    tracker_url: str
    db: Path
    v1: bytes
    v2: bytes
    m1: ReleaseManifest
    m2: ReleaseManifest
    devices_made: int = 0

    def image_path(self, name: str, data: bytes) -> Path:
        path = self.workdir / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(data)
        return path

    def device(self, name: str = "dev-1", *, image: bytes | None = None, version: str = "1.0.0",
               counter: int = 1, health_command: Sequence[str] = (),
               tracker_url: str | None = None, health_timeout_s: float = 10.0,
               chunk_attempts: int = 3, mode: str = "swarm", seed_time_s: float = 0.0,
               origin_url: str | None = None, **swarm: Any) -> DeviceState:
        """A provisioned device; each gets its own loopback address for the swarm.
        ``origin_url``: another origin (e.g. a faulty one) instead of the env's."""
        self.devices_made += 1
        swarm = {"retry_backoff_s": 0.01, "http_timeout_s": 10.0, **swarm}
        config = DeviceConfig(device_id=name, product=PRODUCT, hardware_id=HARDWARE_ID,
                              origin_url=origin_url or self.origin_url,
                              tracker_url=tracker_url or self.tracker_url,
                              health_command=tuple(health_command),
                              health_timeout_s=health_timeout_s, chunk_attempts=chunk_attempts,
                              download_mode=mode, seed_time_s=seed_time_s,
                              swarm_listen=f"127.0.0.{10 + self.devices_made}:0", **swarm)
        data = self.v1 if image is None else image
        img = self.image_path(f"factory-{version}.img", data)
        return init_device(self.workdir / "devices" / name, config,
                           root_json=self.repo.root_bytes(), image=img, version=version,
                           release_counter=counter)

    @staticmethod
    def direct_bytes(payload: Payload) -> int:
        """What a direct-mode device fetches from the origin for ``payload``: its chunk
        list (the manifest it reads is the compact one) and the payload."""
        return payload.chunk_count * CHUNK_DIGEST_BYTES + payload.size

    def origin_bytes(self, payload: Payload) -> int:
        """What a lone swarm-mode device fetches from the origin: chunk list, torrent
        and payload."""
        torrent = self.repo.origin_dir / f"{payload.path}.torrent"
        return self.direct_bytes(payload) + torrent.stat().st_size

    def reports(self, device_id: str | None = None) -> list:  # type: ignore[type-arg]
        store = SqliteStore(self.db)
        try:
            return list(store.reports(device_id))
        finally:
            store.close()

    def register(self, m: ReleaseManifest) -> None:
        store = SqliteStore(self.db)
        try:
            # the device's own retries are under test here: re-offer after a rollback
            register_release(store, Release.from_manifest(m),
                             RolloutPlan.everyone(retry_rolled_back=True))
        finally:
            store.close()


def publish(repo: Repository, workdir: Path, data: bytes, version: str,
            counter: int, *, swarm_ca: bytes | None = None) -> ReleaseManifest:
    """Publish (and, if the targets keys are offline, sign with ``offline/targets*.pem``
    until live)."""
    path = workdir / "images" / f"publish-{version}.img"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    manifest = publish_release(repo, path, product=PRODUCT, version=version,
                               release_counter=counter, compatibility=[HARDWARE_ID],
                               zstd_level=3, swarm_ca=swarm_ca)
    for key in sorted(repo.offline_dir.glob("targets*.pem")):
        if repo.staged() is None:
            break
        repo.sign(load_private_key(key))
    return manifest


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI request (test apps)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def offer_app(release: dict[str, object] | None) -> Any:
    """The ASGI app of a compromised (or spoofed) tracker that offers ``release`` to
    everyone, accepts every report without storing it, and answers anything else with
    ``{"ok": true}`` (an announce gets no peers)."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await read_body(receive)  # the request is not looked at
        answer = {"release": release, "poll_after_s": 60} if scope["path"] == "/v1/checkin" \
            else {"ok": True}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    return app


async def serve_offer(nursery: trio.Nursery, release: dict[str, object]) -> str:
    """Serve :func:`offer_app` on 127.0.0.1; return its URL."""
    url: str = await nursery.start(serve_asgi, offer_app(release), ListenConfig())
    return url


async def start_env(nursery: trio.Nursery, workdir: Path, v1: bytes, v2: bytes, *,
                    origin_config: OriginConfig | None = None,
                    origin_listen: ListenConfig | None = None,
                    tracker_listen: ListenConfig | None = None,
                    fleet_ca: Path | None = None,
                    keys: KeySetup | None = None,
                    origin_ca_file: Path | None = None) -> ReleaseEnv:
    """Publish v1 and v2, start the origin (``origin_config``: e.g. a rate limit) and the
    tracker on 127.0.0.1 (``*_listen``: e.g. TLS certificates), register both releases.
    With ``fleet_ca`` (a CA certificate) the swarms are private to it and the tracker
    accepts only requests signed by its identities; ``keys``: the repository's key
    setup (default: one key per role, targets on the host). The tracker verifies releases
    registered through its admin API against the repository (``root.json`` in
    ``workdir``; ``origin_ca_file`` trusts an HTTPS origin)."""
    repo = Repository.create(workdir / "repo", keys=keys or KeySetup())
    swarm_ca = None if fleet_ca is None else fleet_ca.read_bytes()
    m1 = publish(repo, workdir, v1, "1.0.0", 1, swarm_ca=swarm_ca)
    m2 = publish(repo, workdir, v2, "2.0.0", 2, swarm_ca=swarm_ca)
    db = workdir / "tracker.sqlite"
    origin = OriginApp(repo.origin_dir, origin_config or OriginConfig())
    origin_url = await nursery.start(serve_origin, origin, origin_listen or ListenConfig())
    root = workdir / "root.json"
    root.write_bytes(repo.root_bytes())
    tracker_url = await nursery.start(serve_tracker, TrackerConfig(
        db_path=db, listen=tracker_listen or ListenConfig(), device_ca=fleet_ca,
        repository_root=root, origin_url=origin_url, origin_ca_file=origin_ca_file))
    env = ReleaseEnv(workdir, repo, origin, origin_url, tracker_url, db, v1, v2, m1, m2)
    env.register(m1)
    env.register(m2)
    return env


@pytest.fixture(scope="session")
def images() -> tuple[bytes, bytes]:
    v1 = make_image(1 << 20, seed=11)
    return v1, mutate_image(v1, seed=12)


@pytest.fixture
async def env(tmp_path: Path, nursery: trio.Nursery,
              images: tuple[bytes, bytes]) -> AsyncIterator[ReleaseEnv]:
    yield await start_env(nursery, tmp_path, *images)


async def killed_at(dev: DeviceState, point: str) -> None:
    """Run ``swarmota peer update`` until it SIGKILLs itself at crash point ``point``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SWARMOTA_CRASH")}
    environ["SWARMOTA_CRASH_AT"] = point
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "swarmota.cli", "peer", "update", str(dev.root)],
            env=environ, cwd=REPO_ROOT, capture_stdout=True, capture_stderr=True,
            check=False)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])


def off_base_device(env: ReleaseEnv, name: str, *, stall_s: float = 2.0,
                    **kwargs: object) -> DeviceState:
    """A device on an image no delta applies to: it needs v2's full payload."""
    image = random.Random(name).randbytes(64 * 1024)
    return env.device(name, image=image, version="0.9.0", counter=1, swarm_stall_s=stall_s,
                      **kwargs)  # type: ignore[arg-type]


async def announce_fake(env: ReleaseEnv, payload: Payload, fake: FakeBtPeer) -> None:
    """Announce ``fake`` to the tracker as a seed, from the fake's own address."""
    assert payload.info_hash is not None
    info_hash = bytes.fromhex(payload.info_hash)[:20]
    query = (f"info_hash={quote_from_bytes(info_hash)}&peer_id={quote_from_bytes(fake.peer_id)}"
             f"&port={fake.port}&uploaded=0&downloaded=0&left=0&compact=1&event=started")
    transport = httpx.AsyncHTTPTransport(local_address=fake.host)
    async with httpx.AsyncClient(transport=transport) as client:
        answer = await client.get(f"{env.tracker_url}/announce?{query}")
    assert answer.status_code == 200 and b"failure" not in answer.content, answer.content


async def killed_mid_download(dev: DeviceState, chunks: int) -> int:
    """Run ``swarmota peer update`` (seed time 0) and SIGKILL it once its progress shows
    at least ``chunks`` chunks done, and half a second more (libtorrent writes verified
    pieces within 0.2 s); return the chunks done at the kill."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "swarmota.cli", "peer", "update", str(dev.root),
         "--seed-time-s", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT)
    try:
        with trio.fail_after(60):
            while True:
                progress = dev.progress() or {}
                done_at_kill: int = progress.get("chunks_done", 0)
                if done_at_kill >= chunks:
                    break
                assert proc.poll() is None, "the agent finished before it could be killed"
                await trio.sleep(0.05)
            await trio.sleep(0.5)
            assert proc.poll() is None, "the agent finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    return done_at_kill


# --- the invariants of ../shared/RELIABILITY.md ------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def trusted_versions(dev: DeviceState) -> dict[str, int]:
    """The version of each top-level role in the device's trusted metadata (invariant 3)."""
    out = {}
    for role in ("root", "timestamp", "snapshot", "targets"):
        path = dev.trust_dir / f"{role}.json"
        if path.exists():
            out[role] = json.loads(path.read_bytes())["signed"]["version"]
    return out


def assert_nothing_unverified_kept(dev: DeviceState, payloads: Sequence[Payload] = ()) -> None:
    """Invariant 4: no temporary slot file; the download area holds only work areas of
    ``payloads``, each exactly the payload's size, and every chunk its log calls verified
    is."""
    assert not list(dev.slot_path("a").parent.glob(".*")), "no temporary slot files left"
    known = {p.sha256: p for p in payloads}
    for entry in dev.downloads_dir.iterdir():
        assert entry.name in known, f"unexpected download leftover {entry}"
        payload = known[entry.name]
        for file in entry.rglob("*"):
            assert file.stat().st_size <= payload.size, f"{file}: more than declared kept"
        part = entry / "payload.part"
        if not part.exists():
            continue
        assert part.stat().st_size == payload.size, "nothing beyond the declared size kept"
        log = entry / "verified.log"
        data = part.read_bytes()
        for line in (log.read_text().split() if log.exists() else []):
            offset, length = payload.chunk_span(int(line))
            assert sha256_hex(data[offset:offset + length]) == payload.chunks[int(line)]


def assert_untouched(dev: DeviceState, v1: bytes, payloads: Sequence[Payload] = ()) -> None:
    """Invariants 2 and 4 for a refused update of a device on v1: slot a byte-identical
    and committed, nothing promoted to slot b, no unverified data kept."""
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "a" and not bc.pending
    assert dev.slot_path("a").read_bytes() == v1
    assert not dev.slot_path("b").exists(), "nothing promoted to the inactive slot"
    assert bc.min_release_counter == 1
    assert_nothing_unverified_kept(dev, payloads)


async def expect_refused(env: ReleaseEnv, dev: DeviceState, status: StatusCode,
                         words: str, *, payloads: Sequence[Payload] = ()) -> None:
    """Run one pass that must fail with ``status`` and ``words`` in its message (1),
    leave the device on v1 (2, 4) with its trusted metadata where it was or moved
    forward to valid versions only (3: python-tuf persists a role only after accepting
    it, so the versions never go down), and report the failure to the tracker (6)."""
    before = trusted_versions(dev)
    reports = len(env.reports())
    result = await update_once(dev)
    assert result.status == status, result.message
    assert words in result.message, result.message
    assert_untouched(dev, env.v1, payloads or (*env.m1.payloads, *env.m2.payloads))
    after = trusted_versions(dev)
    assert all(after[role] >= version for role, version in before.items()), (before, after)
    stored = env.reports()[reports:]
    assert [(r.device_id, r.status) for r in stored] == [(dev.config().device_id, int(status))]
    assert words in stored[0].message


async def expect_clean_run(env: ReleaseEnv, dev: DeviceState) -> None:
    """Invariant 5: once the fault is gone, the next pass installs v2 and commits it,
    leaves no download behind, and reports success."""
    reports = len(env.reports())
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "b" and dev.slot_path("b").read_bytes() == env.v2
    assert dev.slot_path("a").read_bytes() == env.v1
    assert not list(dev.downloads_dir.iterdir()), "the work area is reclaimed"
    assert [r.status for r in env.reports()[reports:]] == [0]


@dataclass
class Fleet:
    env: ReleaseEnv
    pki: Path
    pins: tuple[str, ...]
    server_ca: Path
    seeder: PayloadSeeder

    def device(self, name: str, *, ca: str | None = "fleet-ca", **extra: Any) -> DeviceState:
        """A device pinned to the fleet's servers, with an identity of ``ca``;
        ``extra``: more :meth:`ReleaseEnv.device` options."""
        dev = self.env.device(name, tls_pins=self.pins, tls_ca_file=str(self.server_ca),
                              **{"seed_time_s": 3.0, **extra})
        if ca is not None:
            files = issue_device_cert(self.pki / ca, self.pki / f"{ca}-{name}", name)
            install_identity(dev.root, files.cert, files.key, name)
        return dev


@pytest.fixture
async def fleet(tmp_path: Path, nursery: trio.Nursery,
                images: tuple[bytes, bytes]) -> AsyncIterator[Fleet]:
    async with open_fleet(nursery, tmp_path, images) as started:
        yield started


@asynccontextmanager
async def open_fleet(nursery: trio.Nursery, tmp_path: Path, images: tuple[bytes, bytes],
                     origin_config: OriginConfig | None = None) -> AsyncIterator[Fleet]:
    """A private fleet in ``tmp_path``: a server CA and a fleet CA (and ``other-ca``,
    one the tracker does not trust), the origin (``origin_config``: e.g. a rate limit)
    and the tracker over HTTPS (the tracker accepts only fleet identities), v1 and v2
    published to private swarms and registered, and a seeder announcing through a
    signed relay; all in ``nursery``."""
    pki = tmp_path / "pki"
    server_ca = create_ca(pki / "server-ca")
    origin: ServerFiles = issue_server_cert(pki / "server-ca", pki / "origin", ["127.0.0.1"])
    tracker = issue_server_cert(pki / "server-ca", pki / "tracker", ["127.0.0.1"],
                                backup=True)
    fleet_ca = create_ca(pki / "fleet-ca")
    create_ca(pki / "other-ca")
    env = await start_env(
        nursery, tmp_path, *images, fleet_ca=fleet_ca, origin_ca_file=server_ca,
        origin_config=origin_config,
        origin_listen=ListenConfig(certfile=str(origin.cert), keyfile=str(origin.key)),
        tracker_listen=ListenConfig(certfile=str(tracker.cert), keyfile=str(tracker.key),
                                    tls_min_version=TRACKER_TLS_MIN_VERSION))
    assert tracker.backup_pin is not None
    pins = (origin.pin, tracker.pin, tracker.backup_pin)
    seed_files = issue_device_cert(pki / "fleet-ca", pki / "seeder", "seeder-1", role="seed")
    seed_identity = load_identity_dir(seed_files.cert.parent)
    tls = TlsPolicy(pins=frozenset(pins), ca_file=str(server_ca))
    async with HttpClient(timeout_s=10.0, tls=tls, identity=seed_identity) as http:
        relay = AnnounceRelay(http, env.tracker_url)
        await nursery.start(relay.serve)
        seeder = PayloadSeeder(env.repo.origin_dir, SeedingConfig(
            swarm=SwarmConfig(listen_host="127.0.0.2", ssl_listen=True),
            announce_urls=(relay.announce_url,), torrent_trackers=False,
            identity=(seed_identity.cert_pem, seed_identity.key_pem)))
        await nursery.start(seeder.run)
        yield Fleet(env, pki, pins, server_ca, seeder)
