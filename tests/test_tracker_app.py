"""TrackerApp driven directly over ASGI with an in-memory store (no sockets)."""

from __future__ import annotations

import json
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tracker.app import TrackerApp, TrackerStatistics
from tracker.bittorrent import SwarmInfo
from tracker.config import TrackerConfig
from tracker.errors import StorageError
from tracker.protocol import Release
from tracker.rollout import Admission, RolloutPlan, RolloutState, new_rollout
from tracker.store import AuditEntry, DeviceRecord, Store, StoredReport, TokenRecord
from tracker.wire import CheckIn, Report

Message = MutableMapping[str, Any]

CHECKIN = {"device_id": "dev-1", "product": "acme-router", "hardware_id": "hw1",
           "version": "1.0.0", "release_counter": 1}
REPORT = {"device_id": "dev-1", "product": "acme-router", "from_version": "1.0.0",
          "to_version": "2.0.0", "status": 20, "message": "bad chunk", "bytes_origin": 10,
          "bytes_peers": 0, "timings_s": {}}


class MemoryStore:
    """A Store fake that keeps everything in lists; ``broken`` makes every call fail."""

    def __init__(self) -> None:
        self.catalogue: list[Release] = []
        self.checkins: list[tuple[CheckIn, float]] = []
        self.stored: list[StoredReport] = []
        self.rollout_states: dict[tuple[str, str], RolloutState] = {}
        self.admissions: dict[tuple[str, str], Admission] = {}
        self.tokens: dict[str, TokenRecord] = {}
        self.audit_log: list[AuditEntry] = []
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise StorageError("disk on fire")

    def add_release(self, release: Release, now: float | None = None) -> bool:
        self._check()
        if release in self.catalogue:
            return False
        self.catalogue.append(release)
        return True

    def releases(self, product: str | None = None) -> list[Release]:
        self._check()
        return [r for r in self.catalogue if product is None or r.product == product]

    def record_checkin(self, checkin: CheckIn, now: float) -> None:
        self._check()
        self.checkins.append((checkin, now))

    def add_report(self, report: Report, now: float) -> int:
        self._check()
        self.stored.append(StoredReport.from_report(len(self.stored) + 1, now, report))
        return len(self.stored)

    def reports(self, device_id: str | None = None) -> list[StoredReport]:
        self._check()
        return [s for s in self.stored if device_id is None or s.device_id == device_id]

    def devices(self) -> list[DeviceRecord]:
        self._check()
        return []

    def device(self, device_id: str) -> DeviceRecord | None:
        self._check()
        return None

    def swarm_of(self, announce_hash: bytes) -> SwarmInfo | None:
        self._check()
        return None

    def swarms(self, product: str | None = None) -> list[SwarmInfo]:
        self._check()
        return []

    def release_to_everyone(self, release: Release) -> None:
        """Register ``release`` with a rollout to every device at once."""
        self.catalogue.append(release)
        state, _ = new_rollout(f"r-{release.version}", release.product, release.version,
                               release.release_counter, RolloutPlan.everyone(), 0.0)
        self.create_rollout(state)

    def create_rollout(self, state: RolloutState, audit: Sequence[AuditEntry] = ()) -> None:
        self._check()
        self.rollout_states[(state.product, state.version)] = state
        self.audit_log.extend(audit)

    def rollouts(self, product: str | None = None) -> list[RolloutState]:
        self._check()
        return [r for r in self.rollout_states.values()
                if product is None or r.product == product]

    def rollout_of(self, product: str, version: str) -> RolloutState | None:
        self._check()
        return self.rollout_states.get((product, version))

    def admission(self, rollout_id: str, device_id: str) -> Admission | None:
        self._check()
        return self.admissions.get((rollout_id, device_id))

    def save_rollout(self, state: RolloutState, admissions: Sequence[Admission] = (),
                     audit: Sequence[AuditEntry] = ()) -> None:
        self._check()
        self.rollout_states[(state.product, state.version)] = state
        for a in admissions:
            self.admissions[(state.rollout_id, a.device_id)] = a
        self.audit_log.extend(audit)

    def in_flight(self, rollout_id: str, since: float) -> int:
        return sum(1 for (r, _), a in self.admissions.items()
                   if r == rollout_id and a.in_flight and a.updated_at >= since)

    def add_token(self, record: TokenRecord) -> None:
        self.tokens[record.token_hash] = record

    def token(self, token_hash: str) -> TokenRecord | None:
        self._check()
        return self.tokens.get(token_hash)

    def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        self._check()
        self.audit_log.extend(entries)

    def audit(self, *, since: float = 0.0, limit: int = 1000) -> list[AuditEntry]:
        return [e for e in self.audit_log if e.at >= since][:limit]

    def prune_audit(self, before: float) -> int:
        kept = [e for e in self.audit_log if e.at >= before]
        pruned = len(self.audit_log) - len(kept)
        self.audit_log = kept
        return pruned

    def close(self) -> None:
        pass


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
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def app(store: MemoryStore, tmp_path: Path) -> TrackerApp:
    config = TrackerConfig(db_path=tmp_path / "unused.db", poll_after_s=30, max_body_bytes=1000,
                           poll_jitter_fraction=0)
    typed: Store = store
    return TrackerApp(typed, config, clock=lambda: 42.0)


async def test_checkin_records_the_device_at_the_clocks_time(
        app: TrackerApp, store: MemoryStore) -> None:
    store.release_to_everyone(Release.create("acme-router", "2.0.0", 2))
    exchange = await call(app, "POST", "/v1/checkin", [json.dumps(CHECKIN).encode()])
    assert exchange.status == 200
    assert exchange.headers[b"content-type"] == b"application/json"
    assert exchange.json["release"]["version"] == "2.0.0"
    assert exchange.json["poll_after_s"] == 30
    assert store.checkins == [(CheckIn("dev-1", "acme-router", "hw1", "1.0.0", 1), 42.0)]


async def test_body_split_over_several_messages_is_reassembled(
        app: TrackerApp, store: MemoryStore) -> None:
    body = json.dumps(REPORT).encode()
    exchange = await call(app, "POST", "/v1/report", [body[:10], body[10:50], body[50:]])
    assert exchange.status == 200 and exchange.json == {"ok": True}
    assert store.stored[0].received_at == 42.0
    assert store.stored[0].message == "bad chunk"


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
        app: TrackerApp, store: MemoryStore) -> None:
    exchange = await call(app, "POST", "/v1/report", [b'{"device_id"'], disconnect=True)
    assert exchange.sent == []
    assert store.stored == []


async def test_storage_failure_is_a_500_without_internals(
        app: TrackerApp, store: MemoryStore, caplog: pytest.LogCaptureFixture) -> None:
    store.broken = True
    exchange = await call(app, "POST", "/v1/checkin", [json.dumps(CHECKIN).encode()])
    assert exchange.status == 500
    assert exchange.json == {"error": "tracker storage failure"}
    assert "disk on fire" in caplog.text


async def test_statistics_count_checkins_offers_reports_and_errors(
        app: TrackerApp, store: MemoryStore) -> None:
    assert app.statistics() == TrackerStatistics(checkins=0, reports=0, offers=0, errors=0)
    await call(app, "POST", "/v1/checkin", [json.dumps(CHECKIN).encode()])
    store.release_to_everyone(Release.create("acme-router", "2.0.0", 2))
    await call(app, "POST", "/v1/checkin", [json.dumps(CHECKIN).encode()])
    await call(app, "POST", "/v1/report", [json.dumps(REPORT).encode()])
    await call(app, "POST", "/v1/report", [b"[]"])
    await call(app, "GET", "/v1/report")
    await call(app, "GET", "/nope")
    assert app.statistics() == TrackerStatistics(checkins=2, reports=1, offers=1, errors=3)
