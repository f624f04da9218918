"""The control plane an operator runs a fleet with: rollout phases and halt rules, new
generations, reports stored once, the inventory following reports, devices, tags and
per-device states over the admin API. The real app on a real SQLite store, over ASGI,
with a fake wall clock."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from swarmota.tracker.app import TrackerApp
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.sqlite_store import _MIGRATIONS, SqliteStore
from swarmota.tracker.store import SCHEMA_VERSION
from swarmota.tracker.wire import MAX_LOG_TAIL_BYTES, MIN_POLL_AFTER_S
from tests.tracker_asgi import (
    PRODUCT,
    START,
    Clock,
    call,
    checkin_body,
    offered,
    release,
    report_body,
    token_for,
)

ROLLOUT = f"/v1/admin/rollouts/{PRODUCT}/2.0.0"


async def report(app: TrackerApp, device: str, status: int, **extra: Any) -> dict[str, Any]:
    code, answer = await call(app, "POST", "/v1/report",
                              {**report_body(device, status), **extra})
    assert code == 200, answer
    return dict(answer)


async def admin(app: TrackerApp, store: SqliteStore, method: str, path: str,
                body: Any = None, role: str = "admin") -> tuple[int, Any]:
    path, _, query = path.partition("?")
    return await call(app, method, f"/v1/admin/{path}", body, token=token_for(store, role),
                      query=query.encode())


# --- halt rules ----------------------------------------------------------------------------


async def test_one_failing_canary_halts_the_default_plan_and_the_api_names_it(
        app: TrackerApp, store: SqliteStore) -> None:
    """The operator's report: a canary whose health check fails (40) did not halt the
    default plan. Now any canary failure halts it, and the halt names the device, its
    status, its stage and its message."""
    register_release(store, release(), RolloutPlan(canary_devices=("c1", "c2", "c3")),
                     now=START)
    for device in ("c1", "c2", "c3"):
        assert await offered(app, device) == "2.0.0"
    await report(app, "c1", 0)
    await report(app, "c2", 40, message="health check exited 3: /data not mounted",
                 log_tail="boot: mounting /data\nerror: /data not mounted\n")
    status, rollout = await admin(app, store, "GET", f"rollouts/{PRODUCT}/2.0.0",
                                  role="viewer")
    assert status == 200 and rollout["phase"] == "halted"
    assert rollout["halt_reason"] == (
        "canary stage: 1 failed of 3 offered (limit 1): c2 (stage canary, status 40 "
        "post-check-failed): health check exited 3: /data not mounted")
    assert rollout["failures"] == [{"device_id": "c2", "stage": "canary", "status": 40,
                                    "status_name": "post-check-failed",
                                    "message": "health check exited 3: /data not mounted",
                                    "at": START}]
    # the device's page has the log tail of that attempt
    status, device = await admin(app, store, "GET", "devices/c2", role="viewer")
    assert status == 200
    assert device["rollout"]["state"] == "rolled back" and device["rollout"]["status"] == 40
    assert device["reports"][0]["log_tail"].endswith("error: /data not mounted\n")
    assert app.statistics().halts == 1


async def test_a_percentage_stage_halts_on_its_failure_rate_after_the_minimum_sample(
        app: TrackerApp, store: SqliteStore) -> None:
    plan = RolloutPlan(stages_percent=(100.0,), halt_min_sample=4, halt_failure_rate=0.3,
                       halt_failure_count=100)
    register_release(store, release(), plan, now=START)
    devices = [f"d{i}" for i in range(6)]
    for device in devices:
        assert await offered(app, device) == "2.0.0"
    for device, status in zip(devices, (0, 30, 0, 0), strict=False):
        await report(app, device, status)
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.phase == "active"  # 1/4 = 25 % <= 30 %
    await report(app, devices[4], 20)                      # 2/5 = 40 %
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.phase == "halted"
    assert state.halt_reason.startswith("stage 100%: failure rate 2/5 over 0.3")
    assert "d4 (stage 100%, status 20 verify-failed)" in state.halt_reason


async def test_an_interrupted_rollback_is_no_verdict_on_the_release(
        app: TrackerApp, store: SqliteStore) -> None:
    """Status 41: every boot attempt was interrupted (power loss). The device is back in
    flight, offered again; the canary rule does not fire."""
    register_release(store, release(), RolloutPlan(canary_devices=("c1",)), now=START)
    assert await offered(app, "c1") == "2.0.0"
    await report(app, "c1", 41, message="3 boot attempts interrupted")
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.phase == "active" and state.totals.failures == 0
    assert await offered(app, "c1") == "2.0.0"


# --- phases ----------------------------------------------------------------------------


async def test_a_scheduled_rollout_offers_nothing_until_its_start_time(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    plan = RolloutPlan.everyone()
    scheduled = RolloutPlan.from_json({**plan.to_json(), "start_at": START + 3600})
    register_release(store, release(), scheduled, now=START)
    assert store.rollout_of(PRODUCT, "2.0.0").phase == "scheduled"  # type: ignore[union-attr]
    assert await offered(app, "d1") is None
    clock.now = START + 3600
    assert await offered(app, "d1") == "2.0.0"
    assert [e.action for e in store.audit()][-1] == "rollout.started"


async def test_a_rollout_completes_once_its_last_stage_soaked_and_keeps_offering(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    plan = RolloutPlan(stages_percent=(100.0,), min_successes=2, soak_s=600)
    register_release(store, release(), plan, now=START)
    for device in ("a", "b"):
        assert await offered(app, device) == "2.0.0"
        await report(app, device, 0)
    assert store.rollout_of(PRODUCT, "2.0.0").phase == "active"  # type: ignore[union-attr]
    clock.now += 600
    assert await offered(app, "late") == "2.0.0"      # completed: still offered to all
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.phase == "completed"
    assert app.statistics().decisions.get("completed") == 1


async def test_stages_advance_only_inside_the_advance_windows(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    # START is 1970-01-12 13:46:40 UTC, a Monday
    plan = RolloutPlan(canary_devices=("c1",), min_successes=1, soak_s=0,
                       advance_windows=("02:00-05:00",))
    register_release(store, release(), plan, now=START)
    assert await offered(app, "c1") == "2.0.0"
    await report(app, "c1", 0)
    assert store.rollout_of(PRODUCT, "2.0.0").stage == 0  # type: ignore[union-attr]
    clock.now = START + (24 - 13) * 3600 + 14 * 60 + 2 * 3600 + 5  # next day, 02:01 UTC
    await offered(app, "dev-x")
    assert store.rollout_of(PRODUCT, "2.0.0").stage == 1  # type: ignore[union-attr]


async def test_abort_then_a_new_rollout_is_the_next_generation_and_history_is_kept(
        app: TrackerApp, store: SqliteStore) -> None:
    """The operator's report: abort was final (409 for ever). A halted or aborted
    release gets a new rollout, counted afresh."""
    register_release(store, release(), RolloutPlan(canary_devices=("c1",)), now=START)
    assert await offered(app, "c1") == "2.0.0"
    await report(app, "c1", 40)
    status, _ = await admin(app, store, "POST", f"rollouts/{PRODUCT}/2.0.0/abort")
    assert status == 200
    assert await offered(app, "c1") is None
    status, created = await admin(app, store, "POST", "rollouts",
                                  {"product": PRODUCT, "version": "2.0.0",
                                   "plan": "everyone"}, role="operator")
    assert status == 201 and created["generation"] == 2 and created["phase"] == "active"
    assert await offered(app, "c1") == "2.0.0"          # counted afresh: offered again
    status, again = await admin(app, store, "POST", "rollouts",
                                {"product": PRODUCT, "version": "2.0.0"}, role="operator")
    assert status == 409 and "only a halted or aborted one" in again["error"]
    status, shown = await admin(app, store, "GET", f"releases/{PRODUCT}/2.0.0",
                                role="viewer")
    assert [(r["generation"], r["phase"]) for r in shown["rollouts"]] == [
        (1, "aborted"), (2, "active")]
    status, listed = await admin(app, store, "GET", "rollouts?history=1", role="viewer")
    assert [r["generation"] for r in listed["rollouts"]] == [1, 2]


async def test_advance_moves_a_stage_at_once_and_is_audited(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(), RolloutPlan(canary_devices=("c1",)), now=START)
    status, answer = await admin(app, store, "POST", f"rollouts/{PRODUCT}/2.0.0/advance",
                                 role="operator")
    assert status == 200 and answer["stage"] == "1%"
    assert [e.action for e in store.audit()][-1] == "rollout.advance"
    status, answer = await admin(app, store, "POST", f"rollouts/{PRODUCT}/2.0.0/advance",
                                 role="viewer")
    assert status == 403


# --- reports and inventory --------------------------------------------------------------


async def test_a_report_sent_twice_after_a_crash_is_stored_and_counted_once(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(), RolloutPlan.everyone(), now=START)
    assert await offered(app, "d1") == "2.0.0"
    for _ in range(3):
        await report(app, "d1", 0, report_id="attempt-0001")
    assert len(store.reports()) == 1
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.totals.succeeded == 1
    assert state.totals.bytes_origin == 100  # bytes counted once too
    stats = app.statistics()
    assert stats.reports == 1 and stats.duplicate_reports == 2


async def test_the_inventory_follows_reports_not_only_check_ins(
        app: TrackerApp, store: SqliteStore) -> None:
    """The operator's report: the inventory showed 1.1 while devices ran 1.4."""
    register_release(store, release(), RolloutPlan.everyone(), now=START)
    assert await offered(app, "d1") == "2.0.0"
    await report(app, "d1", 0)
    device = store.device("d1")
    assert device is not None and (device.version, device.release_counter) == ("2.0.0", 2)
    await report(app, "d1", 30, message="late failure of an older attempt")
    device = store.device("d1")
    assert device is not None and device.version == "2.0.0"  # a failure moves nothing


async def test_a_log_tail_over_16_kib_is_refused(app: TrackerApp) -> None:
    status, answer = await call(app, "POST", "/v1/report",
                                {**report_body("d1", 30),
                                 "log_tail": "x" * (MAX_LOG_TAIL_BYTES + 1)})
    assert status == 400 and "log_tail" in answer["error"]


# --- devices over the API ----------------------------------------------------------------


async def test_devices_are_listed_filtered_and_paged_with_their_rollout_state(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(), RolloutPlan(canary_label="beta"), now=START)
    for i in range(5):
        labels = ["beta"] if i < 2 else []
        code, _ = await call(app, "POST", "/v1/checkin",
                             {**checkin_body(f"d{i}"), "labels": labels,
                              "network_id": f"net-{i % 2}"})
        assert code == 200
    await report(app, "d0", 0)
    status, page = await admin(app, store, "GET", "devices?limit=2", role="viewer")
    assert status == 200 and [d["device_id"] for d in page["devices"]] == ["d0", "d1"]
    assert page["next"] == "d1"
    status, page = await admin(app, store, "GET", "devices?limit=2&after=d1", role="viewer")
    assert [d["device_id"] for d in page["devices"]] == ["d2", "d3"]
    status, page = await admin(app, store, "GET", "devices?group=beta", role="viewer")
    assert [(d["device_id"], d["version"], d["rollout"]["state"]) for d in page["devices"]
            ] == [("d0", "2.0.0", "installed"), ("d1", "1.0.0", "offered")]
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None
    status, page = await admin(app, store, "GET",
                               f"devices?rollout={state.rollout_id}&status=offered",
                               role="viewer")
    assert [d["device_id"] for d in page["devices"]] == ["d1"]
    status, per = await admin(app, store, "GET", f"rollouts/{PRODUCT}/2.0.0/devices",
                              role="viewer")
    assert [(d["device_id"], d["state"], d["stage"]) for d in per["devices"]] == [
        ("d0", "installed", "canary"), ("d1", "offered", "canary")]
    status, answer = await admin(app, store, "GET", "devices?colour=red", role="viewer")
    assert status == 400 and "unknown query parameter" in answer["error"]


async def test_operator_tags_make_a_canary_group(
        app: TrackerApp, store: SqliteStore) -> None:
    code, _ = await call(app, "POST", "/v1/checkin", checkin_body("lab-7"))
    assert code == 200
    status, tagged = await admin(app, store, "POST", "devices/lab-7/tags",
                                 {"add": ["canary-eu"]}, role="operator")
    assert status == 200 and tagged["tags"] == ["canary-eu"]
    register_release(store, release(), RolloutPlan(canary_label="canary-eu"), now=START)
    assert await offered(app, "lab-7") == "2.0.0"
    assert await offered(app, "other") is None
    status, _ = await admin(app, store, "POST", "devices/nobody/tags", {"add": ["x"]},
                            role="operator")
    assert status == 404
    status, _ = await admin(app, store, "POST", "devices/lab-7/tags", {"add": ["x"]},
                            role="viewer")
    assert status == 403
    assert next(e.action for e in store.audit() if e.outcome == "ok") == "device.tag"


async def test_whoami_names_the_token(app: TrackerApp, store: SqliteStore) -> None:
    status, answer = await admin(app, store, "GET", "whoami", role="operator")
    assert status == 200 and answer == {"name": "operator-user", "role": "operator"}


# --- releases -------------------------------------------------------------------------------


async def test_a_byte_identical_image_republished_under_a_higher_counter_is_offered(
        app: TrackerApp, store: SqliteStore) -> None:
    """The standard recovery from a bad release: republish the known-good image. Its
    payload (and swarm) is the earlier release's, byte for byte."""
    info_hash = "cd" * 32
    register_release(store, release("2.0.0", 2, info_hash), RolloutPlan.everyone(),
                     now=START)
    register_release(store, release("2.0.1", 3, info_hash), RolloutPlan.everyone(),
                     now=START)
    assert await offered(app, "d1", counter=2) == "2.0.1"


# --- storage -------------------------------------------------------------------------------


def test_a_version_5_database_with_data_is_migrated_in_place(tmp_path: Path) -> None:
    db = tmp_path / "v5.db"
    raw = sqlite3.connect(db)
    for script in _MIGRATIONS[:5]:
        for statement in script.split(";"):
            if statement.strip():
                raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (5)")
    raw.execute("INSERT INTO releases VALUES ('acme-router', '2.0.0', 2, "
                "'releases/acme-router/2.0.0.json', 5.0)")
    raw.execute("INSERT INTO swarms VALUES (?, ?, 'acme-router', '2.0.0', 'full')",
                ("ab" * 32, bytes.fromhex("ab" * 20)))
    raw.execute("INSERT INTO rollouts (rollout_id, product, version, counter, plan_json, "
                "phase, stage, stage_started_at, created_at, halt_reason) VALUES "
                "('r1', 'acme-router', '2.0.0', 2, '{}', 'halted', 0, 1.0, 1.0, 'x')")
    raw.execute("INSERT INTO rollout_devices VALUES ('r1', 'd1', 0, 'failed', 2.0)")
    raw.execute("INSERT INTO reports (device_id, product, from_version, to_version, status, "
                "message, bytes_origin, bytes_peers, timings_json, received_at) VALUES "
                "('d1', 'acme-router', '1.0.0', '2.0.0', 30, 'no', 1, 2, '{}', 3.0)")
    raw.commit()
    raw.close()
    with SqliteStore(db, create=False) as store:
        state = store.rollout_of(PRODUCT, "2.0.0")
        assert state is not None and (state.generation, state.phase) == (1, "halted")
        assert store.admission("r1", "d1").code is None  # type: ignore[union-attr]
        assert store.reports()[0].log_tail == "" and store.reports()[0].device_report_id is None
        assert [s.version for s in store.swarms_of(bytes.fromhex("ab" * 20))] == ["2.0.0"]
        assert store.add_release(Release.create(PRODUCT, "2.0.1", 3), 6.0)
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    raw.close()


def test_a_fresh_database_and_a_migrated_one_have_the_same_schema(tmp_path: Path) -> None:
    """One source of truth: a new database runs the migrations from version 0."""
    old = tmp_path / "old.db"
    raw = sqlite3.connect(old)
    for statement in _MIGRATIONS[0].split(";"):
        if statement.strip():
            raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (1)")
    raw.commit()
    raw.close()
    SqliteStore(old).close()
    SqliteStore(tmp_path / "new.db").close()

    def schema(path: Path) -> list[tuple[str, str]]:
        conn = sqlite3.connect(path)
        try:
            return sorted(conn.execute("SELECT name, sql FROM sqlite_master "
                                       "WHERE sql IS NOT NULL").fetchall())
        finally:
            conn.close()

    assert schema(old) == schema(tmp_path / "new.db")


# --- a simulated fleet through the real app -----------------------------------------


async def simulate_fleet(app: TrackerApp, clock: Clock, devices: list[str], *,
                         failing: set[str], hours: float,
                         poll_s: float = 1800.0, install_s: float = 900.0) -> None:
    """``devices`` check in every ``poll_s`` (spread over the first poll); an offered
    device reports ``install_s`` later (40 if in ``failing``, else 0), then keeps
    polling. Every request goes through the ASGI app; the wall clock is the fake one."""
    events: list[tuple[float, int, str, str]] = []
    for n, device in enumerate(devices):
        events.append((START + poll_s * n / len(devices), n, "checkin", device))
    events.sort()
    seq = len(devices)
    installed: set[str] = set()
    while events:
        at, _, kind, device = events.pop(0)
        if at > START + hours * 3600:
            break
        clock.now = at
        seq += 1
        if kind == "checkin":
            counter = 2 if device in installed else 1
            version = await offered(app, device, counter=counter)
            follow = ("report", at + install_s) if version else ("checkin", at + poll_s)
        else:
            status = 40 if device in failing else 0
            await report(app, device, status)
            if status == 0:
                installed.add(device)
            follow = ("checkin", at + poll_s)
        events.append((follow[1], seq, follow[0], device))
        events.sort()


async def test_a_simulated_fleet_takes_a_good_release_to_completed_stage_by_stage(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    devices = [f"dev-{i:04d}" for i in range(300)]
    plan = RolloutPlan(canary_devices=tuple(devices[:5]), stages_percent=(10.0, 50.0, 100.0),
                       min_successes=5, soak_s=3600)
    register_release(store, release(), plan, now=START)
    await simulate_fleet(app, clock, devices, failing=set(), hours=12)
    # every device runs it: nobody checks in for it any more; time completes it
    assert [d.kind for d in await app.director.tick_rollouts()] == ["completed"]
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.phase == "completed", state.phase
    assert state.totals.succeeded == 300 and state.totals.failures == 0
    decisions = [e.action for e in store.audit() if e.actor == "tracker"]
    assert decisions == ["rollout.stage-advanced"] * 3 + ["rollout.completed"]
    assert all(d.version == "2.0.0" for d in store.devices())  # the inventory followed


async def test_a_simulated_fleet_stops_a_release_whose_one_canary_fails(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    devices = [f"dev-{i:04d}" for i in range(300)]
    plan = RolloutPlan(canary_devices=tuple(devices[:5]), stages_percent=(10.0, 50.0, 100.0),
                       min_successes=5, soak_s=3600)
    register_release(store, release(), plan, now=START)
    await simulate_fleet(app, clock, devices, failing={devices[3]}, hours=12)
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and (state.phase, state.stage_name) == ("halted", "canary")
    assert f"{devices[3]} (stage canary, status 40" in state.halt_reason
    assert state.totals.admitted <= 5  # nobody outside the canaries was ever offered it


async def test_no_device_is_told_to_come_back_in_less_than_the_minimum(
        store: SqliteStore, clock: Clock) -> None:
    """A tracker answering poll_after_s 0 made one device check in 671 times in 8 s."""
    with pytest.raises(ValueError, match="poll_after_s"):
        TrackerConfig(db_path=store.path, poll_after_s=0)
    config = TrackerConfig(db_path=store.path, poll_after_s=MIN_POLL_AFTER_S,
                           poll_jitter_fraction=0.5)
    app = TrackerApp(Director(store, config, clock=clock, rng=random.Random(3)))
    answers = []
    for n in range(50):
        code, answer = await call(app, "POST", "/v1/checkin", checkin_body(f"d{n}"))
        assert code == 200
        answers.append(answer["poll_after_s"])
    assert min(answers) == MIN_POLL_AFTER_S and max(answers) > MIN_POLL_AFTER_S  # jittered
