"""TrackerApp driven directly over ASGI on a real store (no sockets)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from swarmota.tracker.app import TrackerApp
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.errors import StorageError
from swarmota.tracker.metrics import TrackerStatistics
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import DeviceRecord

Message = MutableMapping[str, Any]

CHECKIN = {"device_id": "dev-1", "product": "acme-router", "hardware_id": "hw1",
           "version": "1.0.0", "release_counter": 1}
REPORT = {"device_id": "dev-1", "product": "acme-router", "from_version": "1.0.0",
          "to_version": "2.0.0", "status": 20, "message": "bad chunk", "bytes_origin": 10,
          "bytes_peers": 0, "timings_s": {}}


class Store(SqliteStore):
    """A real SQLite store that can be told to fail (``broken``) like a dying disk."""

    broken = False

    @contextmanager
    def _connection(self, what: str) -> Iterator[sqlite3.Connection]:
        if self.broken:
            raise StorageError(f"{what}: disk on fire")
        with super()._connection(what) as conn:
            yield conn

    def release_to_everyone(self, release: Release) -> None:
        """Register ``release`` with a rollout to every device at once."""
        register_release(self, release, RolloutPlan.everyone(), now=0.0)


class Exchange:
    """One scripted ASGI request: the body arrives in ``chunks``; records what was sent."""

    def __init__(self, chunks: Sequence[bytes], *, disconnect: bool = False) -> None:
        self.messages: list[Message] = [
            {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            for i, chunk in enumerate(chunks)
        ]
        if disconnect:
            self.messages[-1]["more_body"] = True
            self.messages.append({"type": "http.disconnect"})
        self.received = 0
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        message = self.messages[self.received]
        self.received += 1
        return message

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def json(self) -> Any:
        return json.loads(self.sent[1]["body"])


async def call(app: TrackerApp, method: str, path: str, chunks: Sequence[bytes] = (b"",),
               *, headers: Sequence[tuple[bytes, bytes]] = (),
               disconnect: bool = False) -> Exchange:
    exchange = Exchange(chunks, disconnect=disconnect)
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    await app(scope, exchange.receive, exchange.send)
    return exchange


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "tracker.db") as s:
        yield s


@pytest.fixture
def app(store: Store) -> TrackerApp:
    config = TrackerConfig(db_path=store.path, poll_after_s=30, max_body_bytes=1000,
                           poll_jitter_fraction=0)
    return TrackerApp(Director(store, config, clock=lambda: 42.0))


async def test_checkin_records_the_device_at_the_clocks_time(
        app: TrackerApp, store: Store) -> None:
    store.release_to_everyone(Release.create("acme-router", "2.0.0", 2))
    exchange = await call(app, "POST", "/v1/checkin", [json.dumps(CHECKIN).encode()])
    assert exchange.status == 200
    assert exchange.headers[b"content-type"] == b"application/json"
    assert exchange.json["release"]["version"] == "2.0.0"
    assert exchange.json["poll_after_s"] == 30
    assert store.devices() == [DeviceRecord("dev-1", "acme-router", "hw1", "1.0.0", 1, 42.0)]


async def test_body_split_over_several_messages_is_reassembled(
        app: TrackerApp, store: Store) -> None:
    body = json.dumps(REPORT).encode()
    exchange = await call(app, "POST", "/v1/report", [body[:10], body[10:50], body[50:]])
    assert exchange.status == 200 and exchange.json == {"ok": True}
    assert store.reports()[0].received_at == 42.0
    assert store.reports()[0].message == "bad chunk"


async def test_streaming_body_over_the_limit_is_refused_without_reading_the_rest(
        app: TrackerApp) -> None:
    exchange = await call(app, "POST", "/v1/report", [b" " * 600] * 10)
    assert exchange.status == 413
    assert exchange.received == 2  # stopped at the first chunk past the limit


async def test_declared_content_length_over_the_limit_is_refused_before_reading(
        app: TrackerApp) -> None:
    exchange = await call(app, "POST", "/v1/report", [b"{}"],
                          headers=[(b"content-length", b"1000000")])
    assert exchange.status == 413
    assert exchange.received == 0


async def test_client_disconnect_before_the_body_ends_sends_nothing(
        app: TrackerApp, store: Store) -> None:
    exchange = await call(app, "POST", "/v1/report", [b'{"device_id"'], disconnect=True)
    assert exchange.sent == []
    assert store.reports() == []


async def test_storage_failure_is_a_500_without_internals(
        app: TrackerApp, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.broken = True
    exchange = await call(app, "POST", "/v1/checkin", [json.dumps(CHECKIN).encode()])
    assert exchange.status == 500
    assert exchange.json == {"error": "tracker storage failure"}
    assert "disk on fire" in caplog.text


async def test_statistics_count_checkins_offers_reports_and_errors(
        app: TrackerApp, store: Store) -> None:
    assert app.statistics() == TrackerStatistics()
    await call(app, "POST", "/v1/checkin", [json.dumps(CHECKIN).encode()])
    store.release_to_everyone(Release.create("acme-router", "2.0.0", 2))
    await call(app, "POST", "/v1/checkin", [json.dumps(CHECKIN).encode()])
    await call(app, "POST", "/v1/report", [json.dumps(REPORT).encode()])
    await call(app, "POST", "/v1/report", [b"[]"])
    await call(app, "GET", "/v1/report")
    await call(app, "GET", "/nope")
    stats = app.statistics()
    assert (stats.checkins, stats.reports, stats.offers, stats.errors) == (2, 1, 1, 3)
    assert stats.reports_by_status["verify-failed"] == 1
