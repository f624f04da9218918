"""SqliteStore on a real database file: round trips, persistence, conflicts, WAL."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracker.errors import ReleaseConflictError, StorageError
from tracker.protocol import Release
from tracker.sqlite_store import SqliteStore
from tracker.store import SCHEMA_VERSION, DeviceRecord, Store, StoredReport
from tracker.wire import CheckIn, Report

R1 = Release.create("acme-router", "1.0.0", 1)
R2 = Release.create("acme-router", "2.0.0", 2)
OTHER = Release.create("other-thing", "0.1", 1)


def report(device_id: str = "dev-1", status: int = 0) -> Report:
    return Report(device_id=device_id, product="acme-router", from_version="1.0.0",
                  to_version="2.0.0", status=status, message="done \u2713",
                  bytes_origin=1000, bytes_peers=24, timings_s={"download": 0.25, "install": 3.0})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tracker.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path)
    yield s
    s.close()


def test_sqlite_store_satisfies_the_store_interface(store: SqliteStore) -> None:
    typed: Store = store
    assert typed.releases() == []


def test_releases_round_trip_sorted_by_product_and_counter(store: SqliteStore) -> None:
    assert store.add_release(R2, 100.0) is True
    assert store.add_release(OTHER, 101.0) is True
    assert store.add_release(R1, 102.0) is True
    assert store.releases() == [R1, R2, OTHER]
    assert store.releases("acme-router") == [R1, R2]
    assert store.releases("nothing") == []
    assert store.registered_releases("other-thing") == [(OTHER, 101.0)]


def test_release_without_a_time_is_dated_by_the_stores_clock(db_path: Path) -> None:
    store = SqliteStore(db_path, clock=lambda: 1234.5)
    try:
        assert store.add_release(R1) is True
        assert store.registered_releases() == [(R1, 1234.5)]
    finally:
        store.close()


def test_adding_an_identical_release_again_is_a_no_op(store: SqliteStore) -> None:
    assert store.add_release(R1, 100.0) is True
    assert store.add_release(R1, 200.0) is False
    assert store.registered_releases() == [(R1, 100.0)]


def test_same_version_with_another_counter_is_a_conflict(store: SqliteStore) -> None:
    store.add_release(R1, 100.0)
    with pytest.raises(ReleaseConflictError, match=r"acme-router 1\.0\.0 with counter 1"):
        store.add_release(Release.create("acme-router", "1.0.0", 5), 101.0)
    assert store.releases() == [R1]


def test_same_counter_with_another_version_is_a_conflict(store: SqliteStore) -> None:
    store.add_release(R1, 100.0)
    with pytest.raises(ReleaseConflictError, match="already registered"):
        store.add_release(Release.create("acme-router", "1.0.1", 1), 101.0)
    # Another product may reuse both version and counter.
    assert store.add_release(Release.create("other-thing", "1.0.0", 1), 102.0) is True


def test_checkins_upsert_the_device_record(store: SqliteStore) -> None:
    store.record_checkin(CheckIn("dev-2", "acme-router", "hw1", "1.0.0", 1), 10.0)
    store.record_checkin(CheckIn("dev-1", "acme-router", "hw1", "1.0.0", 1), 11.0)
    store.record_checkin(CheckIn("dev-1", "acme-router", "hw1", "2.0.0", 2), 12.0)
    assert store.devices() == [
        DeviceRecord("dev-1", "acme-router", "hw1", "2.0.0", 2, 12.0),
        DeviceRecord("dev-2", "acme-router", "hw1", "1.0.0", 1, 10.0),
    ]


def test_reports_round_trip_in_arrival_order(store: SqliteStore) -> None:
    first = store.add_report(report("dev-1"), 20.0)[0]
    second = store.add_report(report("dev-2", status=40), 21.0)[0]
    third = store.add_report(report("dev-1", status=10), 22.0)[0]
    assert first < second < third
    assert store.reports() == [
        StoredReport.from_report(first, 20.0, report("dev-1")),
        StoredReport.from_report(second, 21.0, report("dev-2", status=40)),
        StoredReport.from_report(third, 22.0, report("dev-1", status=10)),
    ]
    assert store.reports()[1].report == report("dev-2", status=40)
    assert store.reports()[1].status == 40
    assert [r.report_id for r in store.reports("dev-1")] == [first, third]
    assert store.reports("dev-9") == []


def test_everything_persists_after_close_and_reopen(db_path: Path) -> None:
    store = SqliteStore(db_path)
    store.add_release(R1, 1.0)
    store.record_checkin(CheckIn("dev-1", "acme-router", "hw1", "1.0.0", 1), 2.0)
    report_id = store.add_report(report(), 3.0)[0]
    store.close()

    reopened = SqliteStore(db_path, create=False)
    try:
        assert reopened.releases() == [R1]
        assert reopened.devices() == [DeviceRecord("dev-1", "acme-router", "hw1", "1.0.0", 1,
                                                   2.0)]
        assert reopened.reports() == [StoredReport.from_report(report_id, 3.0, report())]
    finally:
        reopened.close()


def test_wal_mode_and_schema_version_are_on_disk(store: SqliteStore, db_path: Path) -> None:
    assert store.journal_mode() == "wal"
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)]
    raw.close()


def test_a_second_connection_sees_committed_writes(store: SqliteStore, db_path: Path) -> None:
    other = SqliteStore(db_path)
    try:
        other.add_release(R1, 1.0)  # e.g. `tracker release add` while the server runs
        assert store.releases() == [R1]
    finally:
        other.close()


def test_opening_a_missing_database_without_create_fails(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        SqliteStore(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="cannot open"):
        SqliteStore(path)


def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE users (name TEXT)")
    raw.close()
    with pytest.raises(StorageError, match="not a tracker"):
        SqliteStore(path)


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    SqliteStore(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(StorageError, match="schema version"):
        SqliteStore(db_path)


def test_sqlite_errors_become_storage_errors(store: SqliteStore, db_path: Path) -> None:
    with sqlite3.connect(db_path) as raw:
        raw.execute("DROP TABLE reports")
    raw.close()
    with pytest.raises(StorageError, match="no such table") as info:
        store.add_report(report(), 1.0)
    assert isinstance(info.value.__cause__, sqlite3.Error)


def test_a_closed_store_refuses_calls_and_closes_twice(store: SqliteStore) -> None:
    store.close()
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.releases()


def test_concurrent_threads_are_serialised(store: SqliteStore) -> None:
    def writer(n: int) -> None:
        for i in range(20):
            store.add_report(report(f"dev-{n}"), float(i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.reports()) == 80
