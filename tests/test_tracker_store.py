"""The store's conformance suite: every behaviour of the Store interface, run against
SQLite (a real file) and a real PostgreSQL (a throwaway server, a fresh schema per
test; skipped, with the reason, where PostgreSQL is not installed). Engine-specific
behaviours (SQLite's WAL and file checks, PostgreSQL's reconnect) follow at the end."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from swarmota.tracker.app import TrackerApp
from swarmota.tracker.bittorrent import SwarmInfo
from swarmota.tracker.catalogue import register_release, start_rollout
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director, retry_stale
from swarmota.tracker.errors import (
    ConfigError,
    ConflictError,
    ReleaseConflictError,
    RequestError,
    StaleStateError,
    StorageError,
)
from swarmota.tracker.pg_store import PgStore
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import Admission, RolloutPlan, admit
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import (
    SCHEMA_VERSION,
    AuditEntry,
    DeviceFilter,
    DeviceRecord,
    RevokedCertificate,
    Store,
    StoredReport,
    TokenRecord,
    open_store,
    sqlite_path,
)
from swarmota.tracker.wire import CheckIn, ComponentVersion, Report
from tests.tracker_asgi import PRODUCT, START, call, checkin_body, offered, report_body

R1 = Release.create(PRODUCT, "1.0.0", 1)
R2 = Release.create(PRODUCT, "2.0.0", 2)
OTHER = Release.create("other-thing", "0.1", 1)


def with_swarm(release: Release, info_hash: str) -> Release:
    return Release(release.product, release.version, release.release_counter,
                   release.target, (SwarmInfo(info_hash, release.product, release.version,
                                              "full"),))


def report(device_id: str = "dev-1", status: int = 0, report_id: str | None = None,
           product: str = PRODUCT) -> Report:
    return Report(device_id=device_id, product=product, from_version="1.0.0",
                  to_version="2.0.0", status=status, message="done \u2713",
                  bytes_origin=1000, bytes_peers=24,
                  timings_s={"download": 0.25, "install": 3.0}, report_id=report_id)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/tracker.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url, clock=lambda: 1234.5) as s:
        yield s


def raw_sql(store_url: str, sql: str) -> None:
    """Run ``sql`` behind the store's back (a second connection)."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(store_url)) as raw:
            raw.execute(sql)
        raw.close()
    else:
        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


# --- opening ----------------------------------------------------------------------------


def test_open_store_picks_the_engine_by_url(store: Store, store_url: str) -> None:
    assert isinstance(store, SqliteStore if store_url.startswith("sqlite") else PgStore)
    assert store.releases() == []


def test_everything_persists_after_close_and_reopen(store_url: str) -> None:
    with open_store(store_url) as store:
        store.add_release(R1, 1.0)
        store.record_checkin(CheckIn("dev-1", PRODUCT, "hw1", "1.0.0", 1), 2.0)
        report_id = store.add_report(report(), 3.0)[0]
    with open_store(store_url, create=False) as reopened:
        assert reopened.releases() == [R1]
        assert reopened.devices() == [DeviceRecord("dev-1", PRODUCT, "hw1", "1.0.0", 1, 2.0)]
        assert reopened.reports() == [StoredReport.from_report(report_id, 3.0, report())]


def test_a_newer_schema_is_refused(store_url: str) -> None:
    open_store(store_url).close()
    raw_sql(store_url, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="schema version"):
        open_store(store_url)


def test_another_applications_database_is_refused(store_url: str) -> None:
    if store_url.startswith("sqlite"):
        sqlite_path(store_url).parent.mkdir(parents=True)
    raw_sql(store_url, "CREATE TABLE users (name TEXT)")
    with pytest.raises(StorageError, match="not a tracker"):
        open_store(store_url)


def test_a_closed_store_refuses_calls_and_closes_twice(store: Store) -> None:
    store.close()
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.releases()


# --- releases and swarms ------------------------------------------------------------------


def test_releases_round_trip_sorted_by_product_and_counter(store: Store) -> None:
    assert store.add_release(R2, 100.0) is True
    assert store.add_release(OTHER, 101.0) is True
    assert store.add_release(R1, 102.0) is True
    assert store.releases() == [R1, R2, OTHER]
    assert store.releases(PRODUCT) == [R1, R2]
    assert store.releases("nothing") == []
    assert store.release(PRODUCT, "2.0.0") == R2 and store.release(PRODUCT, "9") is None
    assert store.registered_releases("other-thing") == [(OTHER, 101.0)]


def test_release_without_a_time_is_dated_by_the_stores_clock(store: Store) -> None:
    assert store.add_release(R1) is True
    assert store.registered_releases() == [(R1, 1234.5)]


def test_adding_an_identical_release_again_is_a_no_op(store: Store) -> None:
    assert store.add_release(R1, 100.0) is True
    assert store.add_release(R1, 200.0) is False
    assert store.registered_releases() == [(R1, 100.0)]


def test_same_version_or_counter_in_a_sequence_is_a_conflict(store: Store) -> None:
    store.add_release(R1, 100.0)
    with pytest.raises(ReleaseConflictError, match=r"acme-router 1\.0\.0 with counter 1"):
        store.add_release(Release.create(PRODUCT, "1.0.0", 5), 101.0)
    with pytest.raises(ReleaseConflictError, match="already registered"):
        store.add_release(Release.create(PRODUCT, "1.0.1", 1), 101.0)
    # another product may reuse both; a component has a counter sequence of its own
    assert store.add_release(Release.create("other-thing", "1.0.0", 1), 102.0)
    component = Release(PRODUCT, "app-1", 1, "releases/acme-router/app-1.json",
                        update_type="app", component="app")
    assert store.add_release(component, 103.0)
    assert store.releases(PRODUCT) == [R1, component]


def test_swarms_are_registered_found_and_gained_later(store: Store) -> None:
    info_hash = "ab" * 32
    assert store.add_release(R2, 1.0)
    assert store.swarms_of(bytes.fromhex(info_hash)[:20]) == []
    assert store.add_release(with_swarm(R2, info_hash), 2.0) is True  # gains its swarm
    swarm = SwarmInfo(info_hash, PRODUCT, "2.0.0", "full")
    assert store.swarms_of(bytes.fromhex(info_hash)[:20]) == [swarm]
    assert store.swarms() == [swarm] and store.swarms("nothing") == []
    assert store.release(PRODUCT, "2.0.0") == with_swarm(R2, info_hash)


def test_releases_with_one_payload_share_its_swarm(store: Store) -> None:
    info_hash = "cd" * 32
    store.add_release(with_swarm(R1, info_hash), 1.0)
    store.add_release(with_swarm(R2, info_hash), 2.0)
    assert [s.version for s in store.swarms_of(bytes.fromhex(info_hash)[:20])] == [
        "1.0.0", "2.0.0"]


def test_an_info_hash_sharing_anothers_announce_form_is_refused(store: Store) -> None:
    store.add_release(with_swarm(R1, "ab" * 32), 1.0)
    with pytest.raises(ReleaseConflictError, match="first 20 bytes"):
        store.add_release(with_swarm(R2, "ab" * 20 + "cd" * 12), 2.0)
    assert store.releases() == [with_swarm(R1, "ab" * 32)]


# --- devices ------------------------------------------------------------------------------


def test_checkins_upsert_the_device_record(store: Store) -> None:
    store.record_checkin(CheckIn("dev-2", PRODUCT, "hw1", "1.0.0", 1), 10.0)
    store.record_checkin(CheckIn("dev-1", PRODUCT, "hw1", "1.0.0", 1), 11.0)
    store.record_checkin(CheckIn("dev-1", PRODUCT, "hw1", "2.0.0", 2, network_id="n1",
                                 region="eu", labels=("beta",)), 12.0)
    assert store.devices() == [
        DeviceRecord("dev-1", PRODUCT, "hw1", "2.0.0", 2, 12.0, "n1", "eu", ("beta",)),
        DeviceRecord("dev-2", PRODUCT, "hw1", "1.0.0", 1, 10.0),
    ]
    assert store.count_devices() == {(PRODUCT, "1.0.0"): 1, (PRODUCT, "2.0.0"): 1}
    assert store.count_devices("nothing") == {}


def test_stale_devices_are_counted_by_when_they_were_last_heard_of(store: Store) -> None:
    store.record_checkin(CheckIn("d1", PRODUCT, "hw1", "1.0.0", 1), 10.0)
    store.record_checkin(CheckIn("d2", PRODUCT, "hw1", "1.0.0", 1), 20.0)
    store.record_checkin(CheckIn("d3", "other-thing", "hw1", "0.1", 1), 5.0)
    assert store.count_devices(seen_before=20.0) == {(PRODUCT, "1.0.0"): 1,
                                                     ("other-thing", "0.1"): 1}
    assert store.count_devices(PRODUCT, seen_before=20.0) == {(PRODUCT, "1.0.0"): 1}
    assert store.count_devices(PRODUCT, seen_before=1.0) == {}


def test_devices_are_filtered_by_label_tag_version_time_and_paged(store: Store) -> None:
    for i, labels in enumerate([("beta",), (), ("beta", "eu"), ()]):
        store.record_checkin(CheckIn(f"d{i}", PRODUCT, "hw1", f"{1 + i % 2}.0.0",
                                     1 + i % 2, labels=labels), 10.0 + i)
    assert store.set_tags("d3", ["beta", "lab"], [], "ops", 20.0) == ("beta", "lab")
    assert store.set_tags("d3", [], ["lab"], "ops", 21.0) == ("beta",)
    with pytest.raises(RequestError, match="unknown device"):
        store.set_tags("nobody", ["x"], [], "ops", 22.0)

    def ids(where: DeviceFilter, limit: int | None = None) -> list[str]:
        return [d.device_id for d in store.devices(where, limit=limit)]

    assert ids(DeviceFilter(group="beta")) == ["d0", "d2", "d3"]
    assert ids(DeviceFilter(version="2.0.0")) == ["d1", "d3"]
    assert ids(DeviceFilter(seen_before=12.0)) == ["d0", "d1"]
    assert ids(DeviceFilter(seen_after=12.0, product=PRODUCT)) == ["d2", "d3"]
    assert ids(DeviceFilter(), limit=2) == ["d0", "d1"]
    assert ids(DeviceFilter(after="d1"), limit=2) == ["d2", "d3"]
    assert ids(DeviceFilter(search="2")) == ["d2"]
    assert ids(DeviceFilter(search="d", version="1.0.0")) == ["d0", "d2"]
    assert store.device("d3").tags == ("beta",)  # type: ignore[union-attr]
    assert store.device("nobody") is None


def test_device_ids_page_in_byte_order(store: Store) -> None:
    for device in ("b", "B", "a-1", "a_1", "A"):
        store.record_checkin(CheckIn(device, PRODUCT, "hw1", "1.0.0", 1), 1.0)
    assert [d.device_id for d in store.devices()] == ["A", "B", "a-1", "a_1", "b"]
    # a search is plain text: no wildcards, case-sensitive
    assert [d.device_id for d in store.devices(DeviceFilter(search="_"))] == ["a_1"]
    assert [d.device_id for d in store.devices(DeviceFilter(search="b"))] == ["b"]


def test_the_inventory_follows_installed_images_and_components(store: Store) -> None:
    store.record_checkin(CheckIn("d1", PRODUCT, "hw1", "1.0.0", 1, components=(
        ComponentVersion("app", "a1", 1),)), 10.0)
    store.record_installed("d1", R2, 20.0)
    store.record_installed("d1", R1, 30.0)  # an older release moves nothing back
    app2 = Release(PRODUCT, "a2", 2, "releases/acme-router/a2.json", update_type="app",
                   component="app")
    store.record_installed("d1", app2, 5.0)  # last_seen never moves back
    device = store.device("d1")
    assert device is not None and (device.version, device.release_counter) == ("2.0.0", 2)
    assert device.components == (ComponentVersion("app", "a2", 2),)
    assert device.last_seen == 20.0
    store.record_installed("unknown", R2, 40.0)  # not known: nothing
    assert store.device("unknown") is None


# --- reports -------------------------------------------------------------------------------


def test_reports_round_trip_in_arrival_order_and_filter(store: Store) -> None:
    first = store.add_report(report("dev-1"), 20.0)[0]
    second = store.add_report(report("dev-2", status=40), 21.0)[0]
    third = store.add_report(report("dev-1", status=10), 22.0)[0]
    assert first < second < third
    assert store.reports() == [
        StoredReport.from_report(first, 20.0, report("dev-1")),
        StoredReport.from_report(second, 21.0, report("dev-2", status=40)),
        StoredReport.from_report(third, 22.0, report("dev-1", status=10)),
    ]
    assert [r.report_id for r in store.reports("dev-1")] == [first, third]
    assert [r.report_id for r in store.reports(status=40)] == [second]
    assert [r.report_id for r in store.reports(newest_first=True, limit=2)] == [third, second]
    assert [r.report_id for r in store.reports(before_id=third, product=PRODUCT)] == [
        first, second]
    assert store.reports("dev-9") == []
    assert store.report_totals() == ({0: 1, 40: 1, 10: 1}, 3000, 72)
    assert store.prune_reports(21.0) == 1
    assert [r.report_id for r in store.reports()] == [second, third]


def test_a_resent_report_is_stored_once(store: Store) -> None:
    report_id, new = store.add_report(report("d1", report_id="attempt-1"), 1.0)
    assert new
    assert store.add_report(report("d1", report_id="attempt-1"), 2.0) == (report_id, False)
    assert store.add_report(report("d2", report_id="attempt-1"), 3.0)[1]  # another device's
    assert len(store.reports()) == 2


def test_recent_reports_are_counted_per_product_and_status(store: Store) -> None:
    store.add_report(report("d1"), 10.0)
    store.add_report(report("d2", status=40), 20.0)
    store.add_report(report("d3", status=40), 21.0)
    store.add_report(report("d4", product="other-thing"), 22.0)
    assert store.report_counts(20.0) == {(PRODUCT, 40): 2, ("other-thing", 0): 1}
    assert store.report_counts(0.0)[(PRODUCT, 0)] == 1
    assert store.report_counts(30.0) == {}


# --- request counters and revocation ---------------------------------------------------


def test_request_counters_only_move_up(store: Store) -> None:
    assert store.device_counter("d1") is None
    assert store.advance_counter("d1", 5, 1.0, "c1") is None
    assert store.advance_counter("d1", 5, 2.0, "c1") == 5  # a replay
    assert store.advance_counter("d1", 4, 2.0, "c1") == 5
    assert store.advance_counter("d1", 9, 3.0, "c2") is None
    assert store.device_counter("d1") == 9
    store.record_certificate("d1", "c3", 4.0)
    store.record_certificate("d1", "c3", 5.0)
    assert store.device_certificates("d1") == ["c2", "c3", "c1"]  # the last one first


def test_revoked_certificates_are_kept_once_and_reset_the_counter(store: Store) -> None:
    store.advance_counter("d1", 50, 1.0, "c1")
    first = RevokedCertificate("c1", "d1", 10.0, "admin", "stolen")
    audit = AuditEntry(10.0, "admin", "device.revoke", "d1", "ok", "")
    assert store.revoke_certificates([first], [audit]) == []
    assert store.revoke_certificates([RevokedCertificate("c1", "d1", 11.0, "x", "y"),
                                      RevokedCertificate("c2", "d1", 11.0, "x", "y")]) == ["c1"]
    assert store.revoked_certificates() == [first, RevokedCertificate("c2", "d1", 11.0, "x",
                                                                      "y")]
    assert store.revoked_fingerprints() == {"c1": "d1", "c2": "d1"}
    assert store.device_counter("d1") == 0  # the next certificate starts over
    assert [e.action for e in store.audit()] == ["device.revoke"]


# --- rollouts ------------------------------------------------------------------------------


def test_rollouts_are_created_listed_and_their_generations_kept(store: Store) -> None:
    store.add_release(R1, 1.0)
    store.add_release(R2, 1.0)
    _, first = register_release(store, R2, RolloutPlan(canary_devices=("c1",)), now=START)
    assert first is not None and first.generation == 1
    assert store.rollout(first.rollout_id) == first
    assert store.rollout_of(PRODUCT, "2.0.0") == first
    assert store.rollout_of(PRODUCT, "1.0.0") is None
    with pytest.raises(ConflictError, match="only a halted or aborted one"):
        start_rollout(store, R2, RolloutPlan.everyone(), now=START + 1, actor="t")
    with pytest.raises(RequestError, match="is registered"):
        start_rollout(store, Release.create(PRODUCT, "9.0.0", 9), RolloutPlan.everyone(), actor="t",
                      now=START)
    store.save_rollout(first.__class__(**{**first.__dict__, "phase": "aborted"}))
    second = start_rollout(store, R2, RolloutPlan.everyone(), now=START + 2, actor="t")
    assert second.generation == 2
    assert [r.rollout_id for r in store.rollouts()] == [second.rollout_id]
    assert [(r.generation, r.phase) for r in store.rollouts(PRODUCT, history=True)] == [
        (1, "aborted"), (2, "active")]
    assert store.rollout_of(PRODUCT, "2.0.0") == second


def test_admissions_are_saved_with_the_rollout_and_counted_in_flight(store: Store) -> None:
    store.add_release(R2, 1.0)
    _, state = register_release(store, R2, RolloutPlan.everyone(), now=START)
    assert state is not None
    for i, device in enumerate(["d2", "d0", "d1"]):
        result = admit(state, device, None, START + i)
        assert result.admission is not None and result.state is not None
        state = result.state
        store.save_rollout(state, [result.admission])
        state = store.rollout(state.rollout_id)  # type: ignore[assignment]
        assert state is not None
    assert state.totals.admitted == 3
    assert store.admission(state.rollout_id, "d0") == Admission("d0", state.stage, "offered",
                                                                START + 1)
    assert [a.device_id for a in store.admissions(state.rollout_id)] == ["d0", "d1", "d2"]
    assert [a.device_id for a in store.admissions(state.rollout_id, after="d0", limit=1)
            ] == ["d1"]
    assert store.admissions(state.rollout_id, status="downloading") == []
    assert store.in_flight(state.rollout_id, START + 1) == 2
    history = store.admissions_of("d1")
    assert [(h.rollout_id, h.version, h.generation) for h in history] == [
        (state.rollout_id, "2.0.0", 1)]


def test_a_rollout_saved_since_it_was_read_is_stale_and_nothing_is_written(
        store: Store) -> None:
    store.add_release(R2, 1.0)
    _, state = register_release(store, R2, RolloutPlan.everyone(), now=START)
    assert state is not None
    admitted = admit(state, "d1", None, START)
    assert admitted.state is not None and admitted.admission is not None
    store.save_rollout(admitted.state, [admitted.admission])
    again = admit(state, "d2", None, START)  # decided on the old read
    assert again.state is not None and again.admission is not None
    with pytest.raises(StaleStateError, match="changed since it was read"):
        store.save_rollout(again.state, [again.admission],
                           [AuditEntry(START, "x", "y", "z", "ok", "")])
    assert store.admission(state.rollout_id, "d2") is None and store.audit() == [
        e for e in store.audit() if e.action != "y"]


def test_a_decision_that_fails_half_way_writes_nothing(store: Store) -> None:
    """A decision is one transaction: when part of it fails, nothing of it is kept;
    nested blocks join the outer one."""
    with store.atomic("test"):
        store.record_checkin(CheckIn("d9", PRODUCT, "hw1", "1.0.0", 1), START)
    with pytest.raises(RuntimeError), store.atomic("doomed"):
        assert store.add_report(Report("d9", PRODUCT, "1.0.0", "2.0.0", 0, "", 0, 0, {}),
                                START)[1]
        with store.atomic("inner"):
            store.record_checkin(CheckIn("d9", PRODUCT, "hw1", "2.0.0", 2), START)
        raise RuntimeError("the decision failed half way")
    assert store.reports() == []
    assert store.device("d9").version == "1.0.0"  # type: ignore[union-attr]


# --- control plane ----------------------------------------------------------------------


def test_tokens_and_the_audit_log(store: Store) -> None:
    record = TokenRecord("ab" * 32, "ops", "operator", 1.0, None)
    store.add_token(record)
    assert store.token("ab" * 32) == record and store.token("cd" * 32) is None
    store.add_audit([AuditEntry(float(t), "ops", f"a{t}", "x", "ok", "") for t in range(5)])
    entries = store.audit(since=2.0, limit=2)
    assert [e.action for e in entries] == ["a2", "a3"] and entries[0].entry_id > 0
    assert store.prune_audit(3.0) == 3
    assert [e.action for e in store.audit()] == ["a3", "a4"]


# --- concurrency: several processes on one database -------------------------------------


def test_a_server_secret_is_made_once_and_shared_by_every_connection(
        store: Store, store_url: str) -> None:
    first = store.secret("announce-key", lambda: b"a" * 32, 1.0)
    assert first == b"a" * 32
    with open_store(store_url) as other:  # another process's connection
        assert other.secret("announce-key", lambda: b"b" * 32, 2.0) == first
        assert other.secret("other", lambda: b"\x00\xff" * 16, 2.0) == b"\x00\xff" * 16
    assert store.secret("other", lambda: b"c" * 32, 3.0) == b"\x00\xff" * 16


def test_threads_sharing_one_store_are_serialised(store: Store) -> None:
    def writer(n: int) -> None:
        for i in range(20):
            store.add_report(report(f"dev-{n}"), float(i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.reports()) == 80


def test_concurrent_decisions_on_two_connections_lose_no_update(store_url: str) -> None:
    """Two connections (two tracker processes) admit devices to one rollout at once,
    each decision a transaction retried when stale: every admission is counted."""
    with open_store(store_url) as setup:
        setup.add_release(R2, 1.0)
        register_release(setup, R2, RolloutPlan.everyone(), now=START)
    stores = [open_store(store_url) for _ in range(2)]
    errors: list[BaseException] = []

    def admit_all(store: Store, devices: list[str]) -> None:
        def decide(device: str) -> None:
            with store.atomic("admit"):
                state = store.rollout_of(PRODUCT, "2.0.0")
                assert state is not None
                result = admit(state, device, store.admission(state.rollout_id, device),
                               START)
                assert result.state is not None and result.admission is not None
                store.save_rollout(result.state, [result.admission])
        try:
            for device in devices:
                retry_stale(lambda device=device: decide(device))  # type: ignore[misc]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=admit_all,
                                args=(s, [f"p{n}-d{i}" for i in range(40)]))
               for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        state = stores[0].rollout_of(PRODUCT, "2.0.0")
        assert state is not None and state.totals.admitted == 80
        assert len(stores[1].admissions(state.rollout_id, limit=1000)) == 80
    finally:
        for s in stores:
            s.close()


async def test_two_trackers_on_one_database_count_every_device_once(
        store_url: str) -> None:
    clock: Callable[[], float] = lambda: START  # noqa: E731
    never_halts = RolloutPlan(stages_percent=(100.0,), min_successes=0, soak_s=0,
                              halt_failure_rate=1.0, halt_failure_count=10**6)
    with open_store(store_url) as setup:
        register_release(setup, R2, never_halts, now=START)
    stores = [open_store(store_url, clock=clock) for _ in range(2)]
    config = TrackerConfig(db_path=Path("unused.db"))
    apps = [TrackerApp(Director(s, config, clock=clock, monotonic=trio.current_time))
            for s in stores]

    async def device_life(app: TrackerApp, device: str) -> None:
        assert await offered(app, device) == "2.0.0"
        status, _ = await call(app, "POST", "/v1/report",
                               report_body(device, 0 if device[-1] != "7" else 30))
        assert status == 200

    try:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(device_life, apps[i % 2], f"dev-{i}")
        state = stores[0].rollout_of(PRODUCT, "2.0.0")
        assert state is not None
        assert (state.totals.admitted, state.totals.succeeded, state.totals.failed) == (
            40, 36, 4)
        status, answer = await call(apps[1], "POST", "/v1/checkin", checkin_body("late"))
        assert status == 200 and answer["release"]["version"] == "2.0.0"
    finally:
        for s in stores:
            s.close()


# --- engine specifics -------------------------------------------------------------------


def test_sqlite_wal_mode_and_schema_version_are_on_disk(tmp_path: Path) -> None:
    db_path = tmp_path / "t.db"
    with SqliteStore(db_path) as store:
        assert store.journal_mode() == "wal"
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)]
    raw.close()


def test_sqlite_a_missing_file_or_junk_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        SqliteStore(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match="cannot open"):
        SqliteStore(path)


def test_sqlite_errors_become_storage_errors(tmp_path: Path) -> None:
    db_path = tmp_path / "t.db"
    with SqliteStore(db_path) as store:
        raw_sql(f"sqlite:///{db_path}", "DROP TABLE reports")
        with pytest.raises(StorageError, match="no such table") as info:
            store.add_report(report(), 1.0)
        assert isinstance(info.value.__cause__, sqlite3.Error)


def test_database_urls_name_the_engine(tmp_path: Path) -> None:
    assert sqlite_path("sqlite:////abs/t.db") == Path("/abs/t.db")
    assert sqlite_path("sqlite:///rel/t.db") == Path("rel/t.db")
    assert sqlite_path("plain/t.db") == Path("plain/t.db")
    for bad in ("mysql://x/y", "sqlite://t.db", ""):
        with pytest.raises(ConfigError, match=r"database|SQLite URL|empty"):
            sqlite_path(bad)
    with pytest.raises(StorageError, match=r"cannot connect.*user:\*\*\*@"):
        open_store(f"postgresql://user:secret@/nodb?host={tmp_path}&connect_timeout=2")


def test_postgresql_recovers_when_its_connection_is_lost(pg_url: str) -> None:
    """The server restarted (here: the session is terminated): the call in flight
    fails with a StorageError, the next one reconnects."""
    with PgStore(pg_url) as store:
        store.add_release(R1, 1.0)
        raw_sql(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                        "pid <> pg_backend_pid() AND datname = current_database() "
                        "AND backend_type = 'client backend'")
        with pytest.raises(StorageError):
            store.releases()
        assert store.releases() == [R1]


def test_a_rollout_and_a_devices_admission_are_read_together(store: Store) -> None:
    store.add_release(R2, 1.0)
    assert store.rollout_with_admission(PRODUCT, "2.0.0", "d1") == (None, None)
    _, state = register_release(store, R2, RolloutPlan.everyone(), now=START)
    assert state is not None
    assert store.rollout_with_admission(PRODUCT, "2.0.0", "d1") == (state, None)
    result = admit(state, "d1", None, START)
    assert result.state is not None and result.admission is not None
    store.save_rollout(result.state, [result.admission])
    read, admission = store.rollout_with_admission(PRODUCT, "2.0.0", "d1")
    assert read == store.rollout_of(PRODUCT, "2.0.0") and read is not None
    assert read.totals.admitted == 1 and admission == result.admission
    assert store.rollout_with_admission(PRODUCT, "2.0.0", "d2") == (read, None)


def test_a_check_in_records_the_device_and_reads_its_newer_releases_rollouts(
        store: Store) -> None:
    store.add_release(R1, 1.0)
    store.add_release(R2, 1.0)
    r3 = Release.create(PRODUCT, "3.0.0", 3)
    _, state = register_release(store, r3, RolloutPlan.everyone(), now=START)
    assert state is not None
    checkin = CheckIn("d1", PRODUCT, "hw1", "1.0.0", 1, network_id="lan-1")
    read = store.check_in(checkin, START, counter=7, cert_sha256="c1")
    assert read.replay_floor is None
    assert read.candidates == ((r3, state, None), (R2, None, None))  # the newest first
    assert read.tags in (None, ())
    assert store.device("d1") == DeviceRecord("d1", PRODUCT, "hw1", "1.0.0", 1, START,
                                              "lan-1")
    assert store.device_counter("d1") == 7 and store.device_certificates("d1") == ["c1"]
    result = admit(state, "d1", None, START)
    assert result.state is not None and result.admission is not None
    store.save_rollout(result.state, [result.admission])
    store.set_tags("d1", ["canary"], [], "ops", START)
    again = store.check_in(checkin, START + 1, counter=8, cert_sha256="c1")
    assert again.candidates[0][1:] == (store.rollout_of(PRODUCT, "3.0.0"), result.admission)
    assert again.tags in (None, ("canary",))
    lab = store.check_in(CheckIn("d2", PRODUCT, "hw1", "2.0.0", 2), START + 2)  # unsigned
    assert lab.replay_floor is None and [c[0] for c in lab.candidates] == [r3]
    assert store.device("d2") is not None and store.device_counter("d2") is None
    assert store.check_in(CheckIn("d3", "unknown-product", "hw1", "1", 1), START).candidates \
        == ()


def test_a_replayed_check_in_writes_nothing_and_gives_the_stored_counter(
        store: Store) -> None:
    store.add_release(R2, 1.0)
    store.check_in(CheckIn("d1", PRODUCT, "hw1", "1.0.0", 1), START, counter=7,
                   cert_sha256="c1")
    for counter in (7, 3):
        replayed = store.check_in(CheckIn("d1", PRODUCT, "hw9", "1.0.0", 1), START + 5,
                                  counter=counter, cert_sha256="c2")
        assert replayed.replay_floor == 7 and replayed.candidates == ()
    device = store.device("d1")
    assert device is not None and (device.hardware_id, device.last_seen) == ("hw1", START)
    assert store.device_certificates("d1") == ["c1"]


def test_a_release_registered_through_another_connection_is_seen_at_the_next_check_in(
        store_url: str) -> None:
    """A store may keep the releases it read (they never change): one registered since,
    by another tracker process, is still read at the very next check-in."""
    with open_store(store_url) as first, open_store(store_url) as second:
        first.add_release(R1, 1.0)
        checkin = CheckIn("d1", PRODUCT, "hw1", "1.0.0", 1)
        assert first.check_in(checkin, START).candidates == ()
        _, state = register_release(second, R2, RolloutPlan.everyone(), now=START)
        assert first.check_in(checkin, START + 1).candidates == ((R2, state, None),)
        other = Release.create("other-product", "5", 5)
        second.add_release(other, 2.0)  # another product's release changes nothing here
        assert first.check_in(checkin, START + 2).candidates == ((R2, state, None),)


def test_a_batch_keeps_its_decisions_but_the_one_that_failed(store: Store) -> None:
    """Group commit: decisions queued together share one transaction; one that raises
    is undone alone."""
    with store.batch("three decisions"):
        with store.atomic("first"):
            store.record_checkin(CheckIn("d1", PRODUCT, "hw1", "1.0.0", 1), START)
        with pytest.raises(RuntimeError), store.atomic("second"):
            store.record_checkin(CheckIn("d2", PRODUCT, "hw1", "1.0.0", 1), START)
            raise RuntimeError("this decision failed")
        store.add_report(report("d3"), START)  # a write outside atomic: a decision too
        with store.atomic("fourth"):
            store.record_checkin(CheckIn("d1", PRODUCT, "hw1", "2.0.0", 2), START)
    assert [d.device_id for d in store.devices()] == ["d1"]
    assert store.device("d1").version == "2.0.0"  # type: ignore[union-attr]
    assert [r.device_id for r in store.reports()] == ["d3"]


def test_a_batch_undoes_alone_a_decision_the_database_refused(store: Store) -> None:
    """A decision whose statement the database refuses (here: a duplicate key) fails
    by itself, even where statements are sent ahead of their results (PostgreSQL's
    pipeline): the decisions around it are kept."""
    token = TokenRecord("ab" * 32, "ops", "admin", 1.0, None)
    store.add_token(token)
    with store.batch("three decisions"):
        store.record_checkin(CheckIn("d1", PRODUCT, "hw1", "1.0.0", 1), START)
        with pytest.raises(StorageError):
            store.add_token(token)
        store.record_checkin(CheckIn("d2", PRODUCT, "hw1", "1.0.0", 1), START)
    assert [d.device_id for d in store.devices()] == ["d1", "d2"]
    # on its own: refused, nothing kept
    with pytest.raises(StorageError), store.atomic("one decision"):
        store.record_checkin(CheckIn("d3", PRODUCT, "hw1", "1.0.0", 1), START)
        store.add_token(token)
    assert store.device("d3") is None
    assert store.token(token.token_hash) == token
