"""Shared fixtures: a published repository with v1 and v2, a real origin server and a
real tracker on 127.0.0.1, and a factory for provisioned devices."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from infra.http_serve import ListenConfig
from manifest import Payload, ReleaseManifest
from peer.config import DeviceConfig
from peer.state import DeviceState, init_device
from seeder.origin import OriginApp, OriginConfig
from seeder.publish import publish_release
from seeder.repository import Repository
from seeder.server import serve_origin
from swarmota.demo import make_image, mutate_image
from tracker.catalogue import register_release
from tracker.config import TrackerConfig
from tracker.protocol import Release
from tracker.rollout import RolloutPlan
from tracker.server import serve_tracker
from tracker.store import SqliteStore

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
               **swarm: Any) -> DeviceState:
        """A provisioned device; each gets its own loopback address for the swarm."""
        self.devices_made += 1
        config = DeviceConfig(device_id=name, product=PRODUCT, hardware_id=HARDWARE_ID,
                              origin_url=self.origin_url,
                              tracker_url=tracker_url or self.tracker_url,
                              health_command=tuple(health_command),
                              health_timeout_s=health_timeout_s, chunk_attempts=chunk_attempts,
                              retry_backoff_s=0.01, http_timeout_s=10.0,
                              download_mode=mode, seed_time_s=seed_time_s,
                              swarm_listen=f"127.0.0.{10 + self.devices_made}:0", **swarm)
        data = self.v1 if image is None else image
        img = self.image_path(f"factory-{version}.img", data)
        return init_device(self.workdir / "devices" / name, config,
                           root_json=self.repo.root_bytes(), image=img, version=version,
                           release_counter=counter)

    def origin_bytes(self, payload: Payload) -> int:
        """What a lone swarm-mode device fetches from the origin: torrent + payload."""
        torrent = self.repo.origin_dir / f"{payload.path}.torrent"
        return payload.size + torrent.stat().st_size

    def reports(self) -> list:  # type: ignore[type-arg]
        store = SqliteStore(self.db)
        try:
            return list(store.reports())
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
    path = workdir / "images" / f"publish-{version}.img"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return publish_release(repo, path, product=PRODUCT, version=version,
                           release_counter=counter, compatibility=[HARDWARE_ID], zstd_level=3,
                           swarm_ca=swarm_ca)


async def start_env(nursery: trio.Nursery, workdir: Path, v1: bytes, v2: bytes, *,
                    origin_config: OriginConfig | None = None,
                    origin_listen: ListenConfig | None = None,
                    tracker_listen: ListenConfig | None = None,
                    fleet_ca: Path | None = None) -> ReleaseEnv:
    """Publish v1 and v2, start the origin (``origin_config``: e.g. a rate limit) and the
    tracker on 127.0.0.1 (``*_listen``: e.g. TLS certificates), register both releases.
    With ``fleet_ca`` (a CA certificate) the swarms are private to it and the tracker
    accepts only requests signed by its identities."""
    repo = Repository.create(workdir / "repo")
    swarm_ca = None if fleet_ca is None else fleet_ca.read_bytes()
    m1 = publish(repo, workdir, v1, "1.0.0", 1, swarm_ca=swarm_ca)
    m2 = publish(repo, workdir, v2, "2.0.0", 2, swarm_ca=swarm_ca)
    db = workdir / "tracker.sqlite"
    origin = OriginApp(repo.origin_dir, origin_config or OriginConfig())
    origin_url = await nursery.start(serve_origin, origin, origin_listen or ListenConfig())
    tracker_url = await nursery.start(serve_tracker, TrackerConfig(
        db_path=db, listen=tracker_listen or ListenConfig(), device_ca=fleet_ca))
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
