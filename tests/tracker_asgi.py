"""The tracker over ASGI (no sockets) on a real SQLite store and a fake clock: the
helpers and fixtures (``clock``, ``store``, ``app``) the director's tests share."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from swarmota.tracker.admin import hash_token, new_token
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.bittorrent import SwarmInfo
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.protocol import Release
from swarmota.tracker.registry import SwarmRegistry
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import TokenRecord

PRODUCT = "acme-router"
INFO_HASH = "ab" * 32
ANNOUNCE_HASH = bytes.fromhex(INFO_HASH)[:20]
START = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def release(version: str = "2.0.0", counter: int = 2, info_hash: str | None = None) -> Release:
    base = Release.create(PRODUCT, version, counter)
    swarms = () if info_hash is None else (SwarmInfo(info_hash, PRODUCT, version, "full"),)
    return Release(base.product, base.version, base.release_counter, base.target, swarms)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "tracker.db", clock=clock) as s:
        yield s


@pytest.fixture
def app(store: SqliteStore, clock: Clock) -> TrackerApp:
    config = TrackerConfig(db_path=store.path, poll_after_s=600, paced_poll_after_s=60)
    registry = SwarmRegistry(interval_s=300, clock=clock, rng=random.Random(1))
    return TrackerApp(Director(store, config, clock=clock, registry=registry,
                               rng=random.Random(7), monotonic=trio.current_time))


async def call(app: TrackerApp, method: str, path: str, body: Any = None, *,
               token: str | None = None, query: bytes = b"",
               client: tuple[str, int] = ("127.0.0.2", 40000)) -> tuple[int, Any]:
    data = b"" if body is None else json.dumps(body).encode()
    headers = [(b"content-length", str(len(data)).encode())]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers,
             "query_string": query, "client": client}
    await app(scope, receive, send)
    raw = b"".join(m.get("body", b"") for m in sent[1:])
    content_type = dict(sent[0]["headers"])[b"content-type"]
    if content_type == b"application/json":
        return sent[0]["status"], json.loads(raw)
    return sent[0]["status"], raw


def checkin_body(device: str, counter: int = 1, **extra: str) -> dict[str, Any]:
    return {"device_id": device, "product": PRODUCT, "hardware_id": "hw1",
            "version": f"{counter}.0.0", "release_counter": counter, **extra}


def report_body(device: str, status: int, to_version: str = "2.0.0") -> dict[str, Any]:
    return {"device_id": device, "product": PRODUCT, "from_version": "1.0.0",
            "to_version": to_version, "status": status, "message": "", "bytes_origin": 100,
            "bytes_peers": 900, "timings_s": {}}


async def offered(app: TrackerApp, device: str, counter: int = 1,
                  **extra: str) -> str | None:
    status, answer = await call(app, "POST", "/v1/checkin", checkin_body(device, counter,
                                                                         **extra))
    assert status == 200, answer
    return None if answer["release"] is None else str(answer["release"]["version"])


def token_for(store: SqliteStore, role: str, expires_at: float | None = None) -> str:
    token = new_token()
    store.add_token(TokenRecord(hash_token(token), f"{role}-user", role, 0.0, expires_at))
    return token


