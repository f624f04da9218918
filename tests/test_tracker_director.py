"""The tracker as rollout director: rollouts, swarm gating, LAN-first, admin API, metrics.

The real app over a real SQLite store, driven over ASGI (no sockets) with a fake clock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
import trio

from swarmota.tracker.app import TrackerApp
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import ROLLOUT_CACHE_S, Director
from swarmota.tracker.errors import StaleStateError
from swarmota.tracker.rollout import RolloutPlan, apply_action, stage_of
from swarmota.tracker.sqlite_store import _SCHEMA, _SCHEMA_SWARMS, SqliteStore
from swarmota.tracker.store import SCHEMA_VERSION
from tests.tracker_asgi import (
    ANNOUNCE_HASH,
    INFO_HASH,
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

# --- offers follow the rollout --------------------------------------------------------------


async def test_a_release_without_a_rollout_is_offered_to_nobody(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(), None, now=START)
    assert await offered(app, "dev-1") is None


async def test_canaries_first_then_stages_with_soak_and_the_state_survives_a_restart(
        app: TrackerApp, store: SqliteStore, clock: Clock, tmp_path: Path) -> None:
    plan = RolloutPlan(canary_devices=("canary-1",), stages_percent=(50.0, 100.0),
                       min_successes=1, soak_s=100)
    register_release(store, release(), plan, rollout_id="r1", now=START)
    others = [f"dev-{i}" for i in range(40)]
    assert [await offered(app, d) for d in others] == [None] * 40
    assert await offered(app, "canary-1") == "2.0.0"

    clock.now += 100  # soaked, but the canary has not reported yet
    assert await offered(app, "dev-0") is None
    assert (await call(app, "POST", "/v1/report", report_body("canary-1", 0)))[0] == 200
    clock.now += 1
    half = {d for d in others if stage_of(plan, "r1", d) == 1}
    assert 10 < len(half) < 30
    assert {d for d in others if await offered(app, d) == "2.0.0"} == half

    # Reopened, the rollout is where it was.
    with SqliteStore(store.path, create=False) as again:
        state = again.rollout_of(PRODUCT, "2.0.0")
        assert state is not None and state.stage_name == "50%"
        assert state.counters[0].succeeded == 1 and state.counters[0].bytes_peers == 900
        assert state.counters[1].admitted == len(half)
        assert again.admission("r1", "canary-1") is not None
    assert app.statistics().stage_transitions == 1
    assert [e.action for e in store.audit()] == ["release.register", "rollout.create",
                                                 "rollout.stage-advanced"]


async def test_devices_declaring_the_canary_label_are_canaries(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(), RolloutPlan(canary_label="beta"), now=START)
    status, answer = await call(app, "POST", "/v1/checkin",
                                {**checkin_body("dev-7"), "labels": ["lab", "beta"]})
    assert status == 200 and answer["release"]["version"] == "2.0.0"
    assert await offered(app, "dev-8") is None
    status, answer = await call(app, "POST", "/v1/checkin",
                                {**checkin_body("dev-9"), "labels": ["no spaces"]})
    assert status == 400 and "checkin.labels" in answer["error"]


async def test_failing_canaries_halt_the_rollout_and_nobody_new_gets_it(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    canaries = ("c1", "c2", "c3", "c4")
    plan = RolloutPlan(canary_devices=canaries, min_successes=4, soak_s=0,
                       halt_min_sample=3, halt_failure_rate=0.2)
    register_release(store, release(), plan, now=START)
    for device in canaries:
        assert await offered(app, device) == "2.0.0"
    for device, status in zip(canaries[:3], (0, 30, 40), strict=True):
        await call(app, "POST", "/v1/report", report_body(device, status))
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.phase == "halted"
    # the default canary rule: the first failing canary halts, and the reason names it
    assert state.halt_reason.startswith("canary stage: 1 failed of 4 offered (limit 1): "
                                        "c2 (stage canary, status 30 install-failed)")
    # Nobody new, including the whole fleet: the rollout never left the canaries.
    clock.now += 10_000
    assert [await offered(app, f"dev-{i}") for i in range(50)] == [None] * 50
    assert await offered(app, "c2") is None         # failed: not offered again
    assert await offered(app, "c4") == "2.0.0"      # still in flight: may finish
    assert store.rollout_of(PRODUCT, "2.0.0").stage == 0  # type: ignore[union-attr]
    assert [e.action for e in store.audit()][-1] == "rollout.halted"
    assert app.statistics().halts == 1
    # A replayed report changes nothing.
    await call(app, "POST", "/v1/report", report_body("c2", 30))
    assert store.rollout_of(PRODUCT, "2.0.0").totals.failed == 1  # type: ignore[union-attr]


async def test_downgrades_are_never_offered_and_the_newest_admitted_release_wins(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release("2.0.0", 2), RolloutPlan.everyone(), now=START)
    register_release(store, release("3.0.0", 3), RolloutPlan(canary_devices=("c1",)),
                     now=START)
    assert await offered(app, "dev-1") == "2.0.0"      # not admitted to 3.0.0
    assert await offered(app, "c1") == "3.0.0"
    assert await offered(app, "dev-2", counter=5) is None  # nothing below its counter


async def test_a_stage_caps_downloads_in_flight_and_paces_check_ins(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    plan = RolloutPlan(stages_percent=(100.0,), min_successes=0, soak_s=0, max_in_flight=2)
    register_release(store, release(), plan, now=START)
    answers = [(await call(app, "POST", "/v1/checkin", checkin_body(f"d{i}")))[1]
               for i in range(3)]
    assert [a["release"] is not None for a in answers] == [True, True, False]
    assert 540 <= answers[0]["poll_after_s"] <= 660       # 600 s +- 10 % jitter
    assert 54 <= answers[2]["poll_after_s"] <= 66         # paced: come back soon
    assert len({a["poll_after_s"] for a in answers[:2]}) >= 1
    await call(app, "POST", "/v1/report", report_body("d0", 0))
    assert await offered(app, "d2") == "2.0.0"
    assert app.statistics().paced == 1
    # d1 and d2 in flight: d3 waits, until they have been silent for the timeout.
    assert await offered(app, "d3") is None
    clock.now += plan.in_flight_timeout_s - 1
    assert await offered(app, "d3") is None
    clock.now += 2
    assert await offered(app, "d3") == "2.0.0"


# --- the swarm follows the rollout, LAN first -----------------------------------------------


def announce_query(device: str | None, port: int, left: int = 100) -> bytes:
    query = (b"info_hash=" + quote_from_bytes(ANNOUNCE_HASH).encode() + b"&peer_id="
             + quote_from_bytes(f"-XX0001-{port:012d}".encode()).encode()
             + f"&port={port}&left={left}&compact=1".encode())
    if device is not None:
        query += f"&device_id={device}".encode()
    return query


async def announce(app: TrackerApp, device: str | None, port: int,
                   left: int = 100) -> list[int]:
    status, body = await call(app, "GET", "/announce", query=announce_query(device, port,
                                                                            left))
    assert status == 200
    assert b"failure reason" not in body, body
    peers = body.split(b"5:peers", 1)[1]
    length, _, rest = peers.partition(b":")
    raw = rest[: int(length)]
    return [int.from_bytes(raw[i + 4:i + 6], "big") for i in range(0, len(raw), 6)]


async def test_announces_get_peers_only_for_devices_admitted_to_the_release(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(info_hash=INFO_HASH), RolloutPlan(canary_devices=("c1",)),
                     now=START)
    assert await announce(app, None, 7000, left=0) == []          # the seeder
    assert await offered(app, "c1") == "2.0.0"
    assert await announce(app, "c1", 7001) == [7000]              # admitted canary
    assert await announce(app, "outsider", 7002) == []            # not admitted
    assert await announce(app, None, 7003) == []                  # anonymous leecher
    assert await announce(app, "c1", 7001) == [7000]              # nobody else joined
    assert app.statistics().announces_refused == 2
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.counters[0].downloading == 1  # c1 joined the swarm
    operator = token_for(store, "operator")
    status, _ = await call(app, "POST", f"/v1/admin/rollouts/{PRODUCT}/2.0.0/abort",
                           token=operator)
    assert status == 200
    assert await announce(app, "c1", 7001) == []                  # aborted: nobody


async def test_an_abort_by_another_tracker_process_stops_hand_out_within_the_cache_bound(
        app: TrackerApp, store: SqliteStore, clock: Clock, autojump_clock: trio.abc.Clock
        ) -> None:
    """The announce caches (rollout and admitted devices) never outlive a rollout change
    made elsewhere by more than the rollout cache's lifetime (trio's clock, jumped)."""
    register_release(store, release(info_hash=INFO_HASH), RolloutPlan.everyone(), now=START)
    assert await announce(app, None, 7000, left=0) == []          # the seeder
    assert await offered(app, "d1") == "2.0.0"
    for _ in range(3):                                            # cached: admitted
        assert await announce(app, "d1", 7001) == [7000]
    other = TrackerApp(Director(store, TrackerConfig(db_path=store.path), clock=clock))
    status, _ = await call(other, "POST", f"/v1/admin/rollouts/{PRODUCT}/2.0.0/abort",
                           token=token_for(store, "operator"))
    assert status == 200
    await trio.sleep(ROLLOUT_CACHE_S / 2)
    assert await announce(app, "d1", 7001) == [7000]              # within the bound
    await trio.sleep(ROLLOUT_CACHE_S / 2)
    assert await announce(app, "d1", 7001) == []                  # aborted: nobody
    assert await announce(app, None, 7002) == []                  # not even anonymous


async def test_hand_out_prefers_the_same_lan_then_the_same_region(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(info_hash=INFO_HASH), RolloutPlan.everyone(), now=START)
    homes = {"far": ("net-x", "eu"), "region": ("net-y", "us"), "lan": ("net-a", "us"),
             "me": ("net-a", "us"), "lan-seed": ("net-a", "us")}
    for device, (network_id, region) in homes.items():
        assert await offered(app, device, network_id=network_id, region=region) == "2.0.0"
    await announce(app, "far", 7000, left=0)
    await announce(app, "region", 7001, left=0)
    await announce(app, "lan", 7002)
    await announce(app, "lan-seed", 7003, left=0)
    # LAN first (seed before leecher), then the region, then anyone.
    assert await announce(app, "me", 7004) == [7003, 7002, 7001, 7000]


# --- admin API --------------------------------------------------------------------------------


async def test_admin_refuses_missing_expired_and_insufficient_tokens_without_change(
        app: TrackerApp, store: SqliteStore, clock: Clock) -> None:
    register_release(store, release(), RolloutPlan(), now=START)
    viewer = token_for(store, "viewer")
    expired = token_for(store, "admin", expires_at=clock.now - 1)
    path = f"/v1/admin/rollouts/{PRODUCT}/2.0.0/pause"
    assert (await call(app, "POST", path))[0] == 401
    assert (await call(app, "POST", path, token="sot_" + "x" * 43))[0] == 401
    status, answer = await call(app, "POST", path, token=expired)
    assert status == 401 and "expired" in answer["error"]
    status, answer = await call(app, "POST", path, token=viewer)
    assert status == 403 and "needs operator" in answer["error"]
    assert (await call(app, "GET", "/v1/admin/rollouts", token=viewer))[0] == 200
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None and state.phase == "active"
    refused = [e for e in store.audit() if e.outcome == "refused"]
    assert [e.actor for e in refused] == ["anonymous", "anonymous", "admin-user",
                                          "viewer-user"]
    assert app.statistics().admin_refused == 4


async def test_operators_create_and_steer_rollouts_and_admins_revoke(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(), None, now=START)
    operator, admin = token_for(store, "operator"), token_for(store, "admin")
    status, created = await call(app, "POST", "/v1/admin/rollouts", {
        "product": PRODUCT, "version": "2.0.0",
        "plan": {"canary_devices": ["c1"], "soak_s": 60}}, token=operator)
    assert status == 201 and created["stage"] == "canary" and created["phase"] == "active"
    again = await call(app, "POST", "/v1/admin/rollouts",
                       {"product": PRODUCT, "version": "2.0.0"}, token=operator)
    assert again[0] == 409
    assert (await call(app, "POST", "/v1/admin/rollouts",
                       {"product": PRODUCT, "version": "9.0.0"}, token=operator))[0] == 400
    base = f"/v1/admin/rollouts/{PRODUCT}/2.0.0"
    assert (await call(app, "POST", base + "/pause", token=operator))[1]["phase"] == "paused"
    assert (await call(app, "POST", base + "/pause", token=operator))[0] == 409
    assert (await call(app, "POST", base + "/resume", token=operator))[1]["phase"] == "active"
    assert (await call(app, "POST", base + "/revoke", token=operator))[0] == 403
    status, shown = await call(app, "POST", base + "/revoke", token=admin)
    assert status == 200 and shown["phase"] == "revoked"
    assert await offered(app, "c1") is None
    status, listing = await call(app, "GET", "/v1/admin/releases", token=operator)
    assert listing["releases"][0]["phase"] == "revoked"
    status, audit = await call(app, "GET", "/v1/admin/audit", token=admin)
    actions = [(e["action"], e["outcome"]) for e in audit["audit"]]
    assert ("rollout.revoke", "ok") in actions and ("rollout.pause", "refused") in actions
    assert (await call(app, "GET", "/v1/admin/audit", token=operator))[0] == 403
    assert (await call(app, "GET", "/v1/admin/nope", token=admin))[0] == 404


async def test_fleet_status_counts_stages_bytes_and_savings(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(), RolloutPlan.everyone(), now=START)
    viewer = token_for(store, "viewer")
    for device, status in (("a", 0), ("b", 0), ("c", 40)):
        await offered(app, device)
        await call(app, "POST", "/v1/report", report_body(device, status))
    _, fleet = await call(app, "GET", "/v1/admin/fleet", token=viewer)
    assert fleet["devices"] == 3
    assert fleet["reports"]["ok"] == 2 and fleet["reports"]["post-check-failed"] == 1
    assert fleet["bytes_origin"] == 300 and fleet["bandwidth_saved"] == 0.9
    _, rollouts = await call(app, "GET", "/v1/admin/rollouts", token=viewer)
    stage = rollouts["rollouts"][0]["stages"][1]
    assert (stage["offered"], stage["succeeded"], stage["rolled_back"]) == (3, 2, 1)


async def test_concurrent_admin_actions_are_serialised_to_one_final_state(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(), RolloutPlan(), now=START)
    operator = token_for(store, "operator")
    base = f"/v1/admin/rollouts/{PRODUCT}/2.0.0/"
    actions = ["pause", "resume", "force", "pause", "resume", "abort"] * 5
    results: list[tuple[str, int]] = []

    async def act(action: str) -> None:
        status, _ = await call(app, "POST", base + action, token=operator)
        results.append((action, status))

    async with trio.open_nursery() as nursery:
        for action in actions:
            nursery.start_soon(act, action)
    assert {status for _, status in results} <= {200, 409}
    # Replaying the accepted actions in audit order gives exactly the stored state.
    state = store.rollout_of(PRODUCT, "2.0.0")
    assert state is not None
    accepted = [e.action.removeprefix("rollout.") for e in store.audit()
                if e.outcome == "ok" and e.action.startswith("rollout.")
                and e.action != "rollout.create"]
    assert len(accepted) == sum(1 for _, status in results if status == 200)
    from swarmota.tracker.rollout import new_rollout
    replay, _ = new_rollout(state.rollout_id, PRODUCT, "2.0.0", 2, RolloutPlan(),
                            state.created_at)
    for action in accepted:
        replay, _ = apply_action(replay, action, 0.0)
    assert replay.phase == state.phase


async def test_metrics_count_check_ins_announces_reports_and_decisions(
        app: TrackerApp, store: SqliteStore) -> None:
    register_release(store, release(info_hash=INFO_HASH), RolloutPlan.everyone(), now=START)
    await offered(app, "a")
    await call(app, "POST", "/v1/report", report_body("a", 0))
    await call(app, "POST", "/v1/report", report_body("a", 20))
    await announce(app, "a", 7000)
    status, text = await call(app, "GET", "/metrics")
    assert status == 200
    lines = text.decode().splitlines()
    assert "swarmota_tracker_checkins_total 1" in lines
    assert 'swarmota_tracker_reports_total{status="ok"} 1' in lines
    assert 'swarmota_tracker_reports_total{status="verify-failed"} 1' in lines
    assert "swarmota_tracker_announces_total 1" in lines
    assert "# TYPE swarmota_tracker_rollout_decisions_total counter" in lines


async def test_audit_retention_drops_old_entries(app: TrackerApp, store: SqliteStore,
                                                 clock: Clock) -> None:
    register_release(store, release(), RolloutPlan(), now=clock.now)
    operator = token_for(store, "operator")
    clock.now += TrackerConfig(db_path=store.path).audit_retention_s + 1
    await call(app, "POST", f"/v1/admin/rollouts/{PRODUCT}/2.0.0/pause", token=operator)
    assert [e.action for e in store.audit()] == ["rollout.pause"]


# --- schema migration -------------------------------------------------------------------------


def test_a_version_2_database_is_migrated_and_its_releases_have_no_rollout(
        tmp_path: Path) -> None:
    db = tmp_path / "v2.db"
    raw = sqlite3.connect(db)
    for script in (_SCHEMA, _SCHEMA_SWARMS):
        for statement in script.split(";"):
            if statement.strip():
                raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (2)")
    raw.execute("INSERT INTO releases VALUES ('acme-router', '2.0.0', 2, "
                "'releases/acme-router/2.0.0.json', 5.0)")
    raw.execute("INSERT INTO devices VALUES ('d1', 'acme-router', 'hw', '1.0.0', 1, 4.0)")
    raw.commit()
    raw.close()
    with SqliteStore(db, create=False) as store:
        assert store.rollouts() == []
        device = store.device("d1")
        assert device is not None and device.network_id is None
        register_release(store, release(), RolloutPlan.everyone(), now=START)
        assert store.rollout_of(PRODUCT, "2.0.0") is not None
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    raw.close()


# --- several tracker processes on one database ----------------------------------------------


def test_a_rollout_saved_by_someone_else_since_it_was_read_is_refused(
        store: SqliteStore) -> None:
    register_release(store, release(), RolloutPlan(), now=START)
    with SqliteStore(store.path, create=False) as other:
        mine = store.rollout_of(PRODUCT, "2.0.0")
        theirs = other.rollout_of(PRODUCT, "2.0.0")
        assert mine is not None and theirs is not None
        other.save_rollout(apply_action(theirs, "pause", START)[0])
        with pytest.raises(StaleStateError, match="changed since it was read"):
            store.save_rollout(apply_action(mine, "abort", START)[0])
        state = store.rollout_of(PRODUCT, "2.0.0")
        assert state is not None and state.phase == "paused" and state.revision == 1
