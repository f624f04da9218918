"""Backups of the tracker: a consistent copy of the live database (the tracker keeps
serving and writing), restores refused where they would do harm, and a rollout backed
up mid-way, restored into a fresh tracker, that devices carry on with."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio

from swarmota.cli import main
from swarmota.demo import canary_plan
from swarmota.infra.http_serve import ListenConfig
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.repository import Repository
from swarmota.seeder.server import serve_origin
from swarmota.tracker.backup import BackupError, backup_database, inspect_backup, restore_database
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import AuditEntry
from tests.release_env import ReleaseEnv, publish


def audit_rows(n: int, start: int = 0) -> list[AuditEntry]:
    return [AuditEntry(float(i), "test", "write", str(i), "ok", "") for i in range(start,
                                                                                  start + n)]


def test_backup_of_a_database_being_written_is_a_consistent_snapshot(tmp_path: Path) -> None:
    db = tmp_path / "tracker.sqlite"
    with SqliteStore(db) as store:
        store.add_audit(audit_rows(500))
    stop = threading.Event()
    written = [500]

    def writer() -> None:  # another process's tracker, in effect: its own connection
        with SqliteStore(db) as store:
            while not stop.is_set() and written[0] < 100_000:
                store.add_audit(audit_rows(50, written[0]))
                written[0] += 50

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        infos = [backup_database(db, tmp_path / f"b{i}.sqlite") for i in range(5)]
    finally:
        stop.set()
        thread.join()
    for info in infos:
        with sqlite3.connect(info.path) as conn:
            rows = conn.execute("SELECT count(*), max(CAST(target AS INTEGER)) FROM audit"
                                ).fetchone()
        assert rows[0] % 50 == 0 and rows[1] == rows[0] - 1, "whole transactions only"
        assert inspect_backup(info.path).sha256 == info.sha256
        assert not Path(f"{info.path}-wal").exists(), "a backup is one self-contained file"
    with pytest.raises(BackupError, match="exists"):
        backup_database(db, infos[0].path)


def test_restore_is_refused_into_a_running_tracker_and_over_data(tmp_path: Path) -> None:
    source = tmp_path / "source.sqlite"
    with SqliteStore(source) as store:
        store.add_audit(audit_rows(3))
    backup = backup_database(source, tmp_path / "backup.sqlite").path
    target = tmp_path / "target.sqlite"
    with SqliteStore(target) as running:
        running.add_audit(audit_rows(1))
        with pytest.raises(BackupError, match="in use"):
            restore_database(backup, target, force=True)
    with pytest.raises(BackupError, match="already holds data"):
        restore_database(backup, target)
    info = restore_database(backup, target, force=True)
    assert info.schema_version >= 5
    with SqliteStore(target, create=False) as store:
        assert len(store.audit()) == 3
    fresh = tmp_path / "new" / "tracker.sqlite"
    fresh.parent.mkdir()
    restore_database(backup, fresh)  # absent target: no --force needed


@pytest.mark.parametrize("damage", ["flip", "foreign", "future"])
def test_a_damaged_or_foreign_backup_is_refused(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "tracker.sqlite"
    with SqliteStore(db) as store:
        store.add_audit(audit_rows(2000))
    backup = backup_database(db, tmp_path / "backup.sqlite").path
    if damage == "flip":
        data = bytearray(backup.read_bytes())
        for offset in range(4096, len(data), 4096):
            data[offset + 100] ^= 0xFF
        backup.write_bytes(bytes(data))
    elif damage == "foreign":
        backup.unlink()
        with sqlite3.connect(backup) as conn:
            conn.execute("CREATE TABLE x (y)")
    else:
        with sqlite3.connect(backup) as conn:
            conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(BackupError):
        restore_database(backup, tmp_path / "restored.sqlite")
    assert not (tmp_path / "restored.sqlite").exists()


def test_backup_and_restore_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "tracker.sqlite"
    with SqliteStore(db) as store:
        store.add_audit(audit_rows(2))
    out = tmp_path / "backup.sqlite"
    assert main(["tracker", "backup", "--db", str(db), str(out)]) == 0
    assert "schema" in capsys.readouterr().out
    assert main(["tracker", "restore", "--db", str(db), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["tracker", "restore", "--db", str(db), str(out), "--force"]) == 0


async def test_rollout_backed_up_mid_way_goes_on_in_a_restored_tracker(
        tmp_path: Path, nursery: trio.Nursery, images: tuple[bytes, bytes]) -> None:
    """v2 rolls out canary first. After the canary succeeded the database is backed up
    (live); the tracker's host dies; a fresh tracker on the restored database takes its
    address, and the rest of the fleet updates as the rollout says."""
    v1, v2 = images
    repo = Repository.create(tmp_path / "repo")
    m1 = publish(repo, tmp_path, v1, "1.0.0", 1)
    m2 = publish(repo, tmp_path, v2, "2.0.0", 2)
    origin_url = await nursery.start(serve_origin, OriginApp(repo.origin_dir, OriginConfig()),
                                     ListenConfig())
    first_db = tmp_path / "first" / "tracker.sqlite"
    first_db.parent.mkdir()
    with SqliteStore(first_db) as store:
        register_release(store, Release.from_manifest(m1), None)
        register_release(store, Release.from_manifest(m2), canary_plan(["canary"]))

    async with trio.open_nursery() as first_tracker:
        url = await first_tracker.start(serve_tracker, TrackerConfig(
            db_path=first_db, listen=ListenConfig()))
        env = ReleaseEnv(tmp_path, repo, OriginApp(repo.origin_dir), origin_url, url,
                         first_db, v1, v2, m1, m2)
        canary = env.device("canary", mode="direct")
        others = [env.device(f"dev-{i}", mode="direct") for i in range(2)]
        for dev in others:  # told to wait: the canary goes first
            result = await update_once(dev)
            assert result.status == StatusCode.OK and not result.attempted
        assert (await update_once(canary)).updated
        backup = backup_database(first_db, tmp_path / "backup.sqlite")  # tracker running
        assert backup.rows["reports"] == 1
        first_tracker.cancel_scope.cancel()  # the tracker's host dies

    second_db = tmp_path / "second" / "tracker.sqlite"
    second_db.parent.mkdir()
    restore_database(backup.path, second_db)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    await nursery.start(serve_tracker, TrackerConfig(
        db_path=second_db, listen=ListenConfig(host=host, port=int(port))))
    env.db = second_db
    for dev in others:
        result = await update_once(dev)
        assert result.status == StatusCode.OK and result.updated, result.message
    assert not (await update_once(canary)).attempted
    with SqliteStore(second_db, create=False) as store:
        reports = store.reports()
    assert sorted(r.device_id for r in reports) == ["canary", "dev-0", "dev-1"]

