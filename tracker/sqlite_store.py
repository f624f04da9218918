"""The tracker's store on SQLite: :class:`SqliteStore` (the default, embedded).

The only tracker module that imports ``sqlite3`` (with :mod:`tracker.backup`); every
``sqlite3.Error`` (and the ``OSError`` of creating the database directory) becomes a
:class:`~tracker.errors.StorageError`. The statements are :mod:`tracker.sql_store`'s.

The database (WAL journal, ``synchronous=NORMAL``) can be opened by several processes
of one host at once: ``swarmota tracker release add`` may register a release while the
server runs, and the server sees it on the next check-in. Every transaction of a
decision is ``BEGIN IMMEDIATE`` ... ``COMMIT``: it holds the database's write lock from
its first read, so decisions of all processes are serialised.

Schema versions: 1 (releases, devices, reports); 2 adds ``swarms``, the BitTorrent
swarms of registered releases' payloads (full v2 info-hash, its 20-byte announce form,
product, version, payload kind); 3 adds rollouts, admin tokens and the audit log; 4
adds ``device_counters``, the last request counter accepted from each device (replay
protection of signed check-ins and reports, :mod:`infra.deviceauth`); 5 adds the
certificates devices signed check-ins and reports with (``device_counters.cert_sha256``,
the last one, and ``device_certificates``, every one) and ``revoked_certificates``; 6
(the control plane) adds report ids (a report resent after a crash is stored once) and
log tails, the labels and components devices declare, operator tags, release kinds
(image or component: a counter sequence each) and payload summaries, swarms shared by
releases with byte-identical payloads, rollout generations (a new rollout after a halt
or abort) with their latest failures, and each admitted device's last status code and
message; 7 adds ``secrets``, server secrets every process shares (the announce keys'
one). A new database runs every migration from version 0 (one source of truth,
:data:`_MIGRATIONS`); an older one runs those it lacks, in one transaction.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from swarmota.tracker.errors import StorageError
from swarmota.tracker.sql_store import Connection, Dialect, SqlStore, migrate, split_statements

__all__ = ["SqliteStore"]

_BUSY_TIMEOUT_MS = 5000

# Version 1 of the schema; later versions add _MIGRATIONS in order.
_SCHEMA = """
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE releases (
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    counter INTEGER NOT NULL,
    target TEXT NOT NULL,
    added_at REAL NOT NULL,
    UNIQUE (product, version),
    UNIQUE (product, counter)
);
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    hardware_id TEXT NOT NULL,
    version TEXT NOT NULL,
    release_counter INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    product TEXT NOT NULL,
    from_version TEXT NOT NULL,
    to_version TEXT NOT NULL,
    status INTEGER NOT NULL,
    message TEXT NOT NULL,
    bytes_origin INTEGER NOT NULL,
    bytes_peers INTEGER NOT NULL,
    timings_json TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX reports_by_device ON reports (device_id, id);
"""

_SCHEMA_SWARMS = """
CREATE TABLE swarms (
    info_hash TEXT PRIMARY KEY,
    announce_hash BLOB NOT NULL UNIQUE,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    payload_kind TEXT NOT NULL
);
CREATE INDEX swarms_by_release ON swarms (product, version);
"""
_SCHEMA_ROLLOUTS = """
CREATE TABLE rollouts (
    rollout_id TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    counter INTEGER NOT NULL,
    plan_json TEXT NOT NULL,
    phase TEXT NOT NULL,
    stage INTEGER NOT NULL,
    stage_started_at REAL NOT NULL,
    created_at REAL NOT NULL,
    halt_reason TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    UNIQUE (product, version)
);
CREATE TABLE rollout_stages (
    rollout_id TEXT NOT NULL,
    stage INTEGER NOT NULL,
    admitted INTEGER NOT NULL,
    downloading INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    rolled_back INTEGER NOT NULL,
    bytes_origin INTEGER NOT NULL,
    bytes_peers INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, stage)
);
CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    stage INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
ALTER TABLE devices ADD COLUMN network_id TEXT;
ALTER TABLE devices ADD COLUMN region TEXT;
CREATE TABLE admin_tokens (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_time ON audit (at);
"""
_SCHEMA_DEVICE_COUNTERS = """
CREATE TABLE device_counters (
    device_id TEXT PRIMARY KEY,
    counter INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""
_SCHEMA_REVOCATION = """
ALTER TABLE device_counters ADD COLUMN cert_sha256 TEXT;
CREATE TABLE device_certificates (
    device_id TEXT NOT NULL,
    cert_sha256 TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (device_id, cert_sha256)
);
CREATE TABLE revoked_certificates (
    cert_sha256 TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    revoked_at REAL NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""
_SCHEMA_CONTROL_PLANE = """
ALTER TABLE reports ADD COLUMN report_id TEXT;
ALTER TABLE reports ADD COLUMN log_tail TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX reports_by_report_id ON reports (device_id, report_id)
    WHERE report_id IS NOT NULL;
CREATE INDEX reports_by_time ON reports (received_at);
ALTER TABLE devices ADD COLUMN labels_json TEXT NOT NULL DEFAULT '[]';
ALTER TABLE devices ADD COLUMN components_json TEXT;
CREATE INDEX devices_by_product ON devices (product, version);
CREATE TABLE device_tags (
    device_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    added_at REAL NOT NULL,
    actor TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag);
CREATE TABLE releases_v6 (
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    counter INTEGER NOT NULL,
    target TEXT NOT NULL,
    added_at REAL NOT NULL,
    update_type TEXT NOT NULL DEFAULT 'image',
    component TEXT,
    payloads_json TEXT NOT NULL DEFAULT '[]',
    UNIQUE (product, version)
);
INSERT INTO releases_v6 (product, version, counter, target, added_at)
    SELECT product, version, counter, target, added_at FROM releases;
DROP TABLE releases;
ALTER TABLE releases_v6 RENAME TO releases;
CREATE UNIQUE INDEX releases_by_counter ON releases (product, ifnull(component, ''), counter);
CREATE TABLE swarms_v6 (
    info_hash TEXT NOT NULL,
    announce_hash BLOB NOT NULL,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    payload_kind TEXT NOT NULL,
    PRIMARY KEY (info_hash, product, version)
);
INSERT INTO swarms_v6 (info_hash, announce_hash, product, version, payload_kind)
    SELECT info_hash, announce_hash, product, version, payload_kind FROM swarms;
DROP TABLE swarms;
ALTER TABLE swarms_v6 RENAME TO swarms;
CREATE INDEX swarms_by_announce ON swarms (announce_hash);
CREATE INDEX swarms_by_release ON swarms (product, version);
CREATE TABLE rollouts_v6 (
    rollout_id TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    counter INTEGER NOT NULL,
    plan_json TEXT NOT NULL,
    phase TEXT NOT NULL,
    stage INTEGER NOT NULL,
    stage_started_at REAL NOT NULL,
    created_at REAL NOT NULL,
    halt_reason TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 1,
    failures_json TEXT NOT NULL DEFAULT '[]',
    UNIQUE (product, version, generation)
);
INSERT INTO rollouts_v6 (rollout_id, product, version, counter, plan_json, phase, stage,
                         stage_started_at, created_at, halt_reason, revision)
    SELECT rollout_id, product, version, counter, plan_json, phase, stage,
           stage_started_at, created_at, halt_reason, revision FROM rollouts;
DROP TABLE rollouts;
ALTER TABLE rollouts_v6 RENAME TO rollouts;
ALTER TABLE rollout_devices ADD COLUMN code INTEGER;
ALTER TABLE rollout_devices ADD COLUMN message TEXT NOT NULL DEFAULT '';
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id)
"""
_SCHEMA_SECRETS = """
CREATE TABLE secrets (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    created_at REAL NOT NULL
)
"""
_MIGRATIONS: tuple[str, ...] = (_SCHEMA, _SCHEMA_SWARMS, _SCHEMA_ROLLOUTS,
                                _SCHEMA_DEVICE_COUNTERS, _SCHEMA_REVOCATION,
                                _SCHEMA_CONTROL_PLANE, _SCHEMA_SECRETS)
"""The one source of truth of the SQLite schema: ``_MIGRATIONS[v]`` takes a database
from version ``v`` to ``v + 1``; a new database runs them all from 0."""



_DIALECT = Dialect(
    rowid="rowid",
    label_match="EXISTS (SELECT 1 FROM json_each(d.labels_json) WHERE value = ?)",
    for_update="",
    id_contains="instr(d.device_id, ?) > 0")


class _Connection:
    """An ``sqlite3.Connection`` as :class:`~swarmota.tracker.sql_store.Connection`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.raw = conn
        self.execute = conn.execute

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        return self.raw.executemany(sql, rows)


class SqliteStore(SqlStore):
    """:class:`~tracker.store.Store` on one SQLite database file, through one connection.

    ``SqliteStore(path)`` opens the database, creating it (and its directory) unless
    ``create`` is false, turns on WAL and ``synchronous=NORMAL`` and checks the schema
    version. ``clock`` (epoch seconds) only dates releases added without ``now``.
    Thread-safe (one internal lock, held for a whole :meth:`atomic` block); every
    method may raise :class:`StorageError`. A context manager that closes the store on
    exit.

    Raises:
        StorageError: the file is missing (``create=False``), not a database, another
            application's database, from a newer schema, or cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        super().__init__(_DIALECT, str(self.path), clock)
        self._conn = _Connection(_connect(self.path, create))

    def __enter__(self) -> SqliteStore:
        return self

    def journal_mode(self) -> str:
        """The connection's journal mode (``"wal"`` once opened)."""
        with self._connection("read journal mode") as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    def _open_connection(self) -> Connection:
        return self._conn

    def _begin(self, conn: Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def _commit(self, conn: Connection) -> None:
        conn.execute("COMMIT")

    def _rollback(self, conn: Connection) -> None:
        if self._conn.raw.in_transaction:
            self._conn.raw.rollback()

    def _translate(self, exc: Exception, what: str) -> Exception | None:
        if isinstance(exc, sqlite3.Error):
            return StorageError(f"{what} in {self.path}: {exc}")
        return None

    def _close_connection(self) -> None:
        try:
            self._conn.raw.close()
        except sqlite3.Error as exc:
            raise StorageError(f"closing {self.path}: {exc}") from exc


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    if not create and not path.is_file():
        raise StorageError(f"tracker database {path} does not exist")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                               timeout=_BUSY_TIMEOUT_MS / 1000)
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(f"cannot open tracker database {path}: {exc}") from exc
    try:
        _configure(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    """Pragmas, then bring the schema to the current version (a new database runs every
    migration from 0)."""
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"{path}: cannot enable WAL journal (got {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists is None:
                others = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                ).fetchone()[0]
                if others:
                    raise StorageError(f"{path} is an SQLite database but not a tracker's "
                                       "(no schema_version table)")
                version: object = 0
            else:
                version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            migrate(_Connection(conn), [(v + 1, s) for v, s in enumerate(_MIGRATIONS)],
                    version, str(path), split_statements)
        except BaseException:
            conn.rollback()
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open tracker database {path}: {exc}") from exc
