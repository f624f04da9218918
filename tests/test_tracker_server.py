"""The real tracker on loopback: hypercorn + ASGI app + SQLite, driven with httpx."""

from __future__ import annotations

import functools
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from swarmota.infra.http_serve import ListenConfig, parse_listen
from swarmota.manifest import (
    MIN_CHUNK_SIZE_BYTES,
    ImageInfo,
    Payload,
    ReleaseManifest,
    chunk_hashes,
    sha256_hex,
)
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore
from tests.tracker_cli import run_cli

NOW = 1_700_000_000.0

CHECKIN = {"device_id": "dev-1", "product": "acme-router", "hardware_id": "acme-router-hw1",
           "version": "1.0.0", "release_counter": 1}
REPORT = {"device_id": "dev-1", "product": "acme-router", "from_version": "1.0.0",
          "to_version": "2.0.0", "status": 0, "message": "installed and healthy",
          "bytes_origin": 4096, "bytes_peers": 0, "timings_s": {"download": 0.5}}


@dataclass
class Tracker:
    url: str
    db_path: Path
    client: httpx.AsyncClient


@pytest.fixture
async def tracker(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Tracker]:
    config = TrackerConfig(db_path=tmp_path / "tracker.db",
                           listen=ListenConfig(host="127.0.0.1", port=0),
                           poll_after_s=60, max_body_bytes=4096, poll_jitter_fraction=0)
    url = await nursery.start(functools.partial(serve_tracker, config, clock=lambda: NOW))
    assert url.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        yield Tracker(url, config.db_path, client)


def add_release(db_path: Path, release: Release) -> None:
    """Register ``release`` with a rollout to every device at once."""
    with SqliteStore(db_path) as store:
        register_release(store, release, RolloutPlan.everyone(), now=NOW)


def build_manifest(version: str = "2.0.0", counter: int = 2) -> ReleaseManifest:
    image = b"new firmware image " * 100
    payload = b"pretend zstd payload " * 50
    return ReleaseManifest(
        product="acme-router", version=version, release_counter=counter,
        compatibility=("acme-router-hw1",), update_type="image",
        image=ImageInfo(size=len(image), sha256=sha256_hex(image)),
        payloads=(Payload(kind="full", encoding="zstd", size=len(payload),
                          sha256=sha256_hex(payload), chunk_size=MIN_CHUNK_SIZE_BYTES,
                          chunks=tuple(chunk_hashes(payload, MIN_CHUNK_SIZE_BYTES))),),
    )


def assert_json_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


# --- the API ----------------------------------------------------------------------------


async def test_health(tracker: Tracker) -> None:
    response = await tracker.client.get("/v1/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"ok": True}


async def test_checkin_is_offered_a_release_once_it_is_added(tracker: Tracker) -> None:
    response = await tracker.client.post("/v1/checkin", json=CHECKIN)
    assert response.status_code == 200
    assert response.json() == {"release": None, "poll_after_s": 60}

    add_release(tracker.db_path, Release.create("acme-router", "2.0.0", 2))
    add_release(tracker.db_path, Release.create("acme-router", "1.0.0", 1))
    response = await tracker.client.post("/v1/checkin", json=CHECKIN)
    assert response.json() == {
        "release": {"product": "acme-router", "version": "2.0.0", "release_counter": 2,
                    "target": "releases/acme-router/2.0.0.json"},
        "poll_after_s": 60,
    }

    updated = {**CHECKIN, "version": "2.0.0", "release_counter": 2}
    response = await tracker.client.post("/v1/checkin", json=updated)
    assert response.json()["release"] is None

    with sqlite3.connect(tracker.db_path) as raw:
        rows = raw.execute("SELECT device_id, version, release_counter, last_seen "
                           "FROM devices").fetchall()
    raw.close()
    assert rows == [("dev-1", "2.0.0", 2, NOW)]


async def test_report_is_stored_in_the_sqlite_file(tracker: Tracker) -> None:
    response = await tracker.client.post("/v1/report", json=REPORT)
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    with sqlite3.connect(tracker.db_path) as raw:
        rows = raw.execute("SELECT device_id, from_version, to_version, status, message, "
                           "bytes_origin, bytes_peers, timings_json, received_at "
                           "FROM reports").fetchall()
    raw.close()
    assert rows == [("dev-1", "1.0.0", "2.0.0", 0, "installed and healthy", 4096, 0,
                     '{"download": 0.5}', NOW)]


async def test_bad_checkin_gets_400_with_the_reason(tracker: Tracker) -> None:
    response = await tracker.client.post("/v1/checkin", json={**CHECKIN, "extra": 1})
    assert "unknown keys 'extra'" in assert_json_error(response, 400)
    response = await tracker.client.post("/v1/checkin", content=b"not json")
    assert "not valid UTF-8 JSON" in assert_json_error(response, 400)


async def test_bad_report_gets_400_and_stores_nothing(tracker: Tracker) -> None:
    response = await tracker.client.post("/v1/report", json={**REPORT, "status": 7})
    assert "report.status" in assert_json_error(response, 400)
    with sqlite3.connect(tracker.db_path) as raw:
        assert raw.execute("SELECT count(*) FROM reports").fetchone() == (0,)
    raw.close()


async def test_unknown_path_gets_404(tracker: Tracker) -> None:
    response = await tracker.client.get("/v1/nothing")
    assert_json_error(response, 404)
    response = await tracker.client.post("/v1/checkin/", json=CHECKIN)
    assert_json_error(response, 404)


async def test_wrong_method_gets_405_with_allow(tracker: Tracker) -> None:
    response = await tracker.client.get("/v1/checkin")
    assert_json_error(response, 405)
    assert response.headers["allow"] == "POST"
    response = await tracker.client.post("/v1/health", json={})
    assert_json_error(response, 405)
    assert response.headers["allow"] == "GET"


async def test_oversize_body_gets_413(tracker: Tracker) -> None:
    body = json.dumps({**REPORT, "message": "x" * 5000}).encode()
    response = await tracker.client.post("/v1/report", content=body)
    assert "limit of 4096 bytes" in assert_json_error(response, 413)


async def test_oversize_chunked_body_gets_413_while_streaming(tracker: Tracker) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 1000

    response = await tracker.client.post("/v1/report", content=chunks())
    assert "content-length" not in response.request.headers
    assert "limit of 4096 bytes" in assert_json_error(response, 413)


async def test_server_stops_cleanly_and_closes_the_database(tmp_path: Path) -> None:
    config = TrackerConfig(db_path=tmp_path / "t.db", listen=ListenConfig(port=0))
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_tracker, config)
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/v1/health")).status_code == 200
        nursery.cancel_scope.cancel()
    # Closed cleanly: the WAL was checkpointed and removed by the last connection.
    assert not (tmp_path / "t.db-wal").exists()
    store = SqliteStore(config.db_path, create=False)
    store.close()


# --- the command line -------------------------------------------------------------------
# (release add, release list, reports and devices go through the admin API now:
# tests/test_operator_cli.py)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8470", ("127.0.0.1", 8470)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:8470", ("::1", 8470)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_listen_addresses_are_parsed(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text, reason", [
    ("127.0.0.1", "expected HOST:PORT"),
    (":8470", "missing or invalid host"),
    ("::1:8470", "in brackets"),
    ("[::1]8470", "expected [IPV6]:PORT"),
    ("[::1:8470", "missing ']'"),
    ("[nope]:1", "not an IPv6 address"),
    ("host:http", "not a number"),
    ("host:-1", "not a number"),
    ("host:65536", "outside 0..65535"),
])
def test_bad_listen_addresses_are_refused_clearly(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_listen(text)


def test_listen_option_errors_come_from_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("serve", "--db", "x.db", "--listen", "::1:80")
    assert info.value.code == 2
    assert "--listen" in capsys.readouterr().err

