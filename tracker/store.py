"""Tracker storage: the :class:`Store` interface and its SQLite implementation.

The only tracker module that imports ``sqlite3``; every ``sqlite3.Error`` (and the
``OSError`` of creating the database directory) becomes a
:class:`~tracker.errors.StorageError`.

All methods are blocking. An async caller runs them in a worker thread
(``trio.to_thread.run_sync``) and should allow one such thread at a time
(``limiter=trio.CapacityLimiter(1)``), since the store has one connection. The
:class:`SqliteStore` additionally serialises calls with an internal lock, so it stays
correct if several threads call it anyway.

Time is passed in: ``now`` arguments (seconds since the epoch), or for
``add_release`` without ``now`` the ``clock`` given to :class:`SqliteStore`.

The database (WAL journal, ``synchronous=NORMAL``) can be opened by several processes
at once: ``swarmota tracker release add`` may register a release while the server
runs, and the server sees it on the next check-in.

Schema versions: 1 (releases, devices, reports); 2 adds ``swarms``, the BitTorrent
swarms of registered releases' payloads (full v2 info-hash, its 20-byte announce form,
product, version, payload kind); 3 adds rollouts, admin tokens and the audit log; 4
adds ``device_counters``, the last request counter accepted from each device (replay
protection of signed check-ins and reports, :mod:`infra.deviceauth`); 5 adds the
certificates devices signed check-ins and reports with (``device_counters.cert_sha256``,
the last one, and ``device_certificates``, every one) and ``revoked_certificates``.
Opening an older database migrates it in place (one transaction); releases registered
before keep working, without swarms.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tracker.bittorrent import SwarmInfo
from tracker.errors import (
    ConflictError,
    ReleaseConflictError,
    RequestError,
    StaleStateError,
    StorageError,
)
from tracker.protocol import Release
from tracker.rollout import Admission, RolloutPlan, RolloutState, StageCounters
from tracker.wire import CheckIn, Report

__all__ = ["SCHEMA_VERSION", "AuditEntry", "DeviceRecord", "RevokedCertificate",
           "SqliteStore", "Store", "StoredReport", "TokenRecord"]

SCHEMA_VERSION = 5
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
_MIGRATIONS: dict[int, str] = {1: _SCHEMA_SWARMS, 2: _SCHEMA_ROLLOUTS,
                               3: _SCHEMA_DEVICE_COUNTERS, 4: _SCHEMA_REVOCATION}
"""DDL that takes a database from version ``key`` to ``key + 1``."""


@dataclass(frozen=True)
class StoredReport:
    """A report as stored: its row id and arrival time (epoch s), then what the device sent.

    The fields after ``received_at`` are those of :class:`~tracker.protocol.Report`.
    """

    report_id: int
    received_at: float
    device_id: str
    product: str
    from_version: str
    to_version: str
    status: int
    message: str
    bytes_origin: int
    bytes_peers: int
    timings_s: dict[str, float]

    @classmethod
    def from_report(cls, report_id: int, received_at: float, report: Report) -> StoredReport:
        return cls(report_id, received_at, report.device_id, report.product,
                   report.from_version, report.to_version, report.status, report.message,
                   report.bytes_origin, report.bytes_peers, dict(report.timings_s))

    @property
    def report(self) -> Report:
        """What the device sent."""
        return Report(self.device_id, self.product, self.from_version, self.to_version,
                      self.status, self.message, self.bytes_origin, self.bytes_peers,
                      dict(self.timings_s))


@dataclass(frozen=True)
class DeviceRecord:
    """What a device said at its latest check-in, and when (``last_seen``, epoch s)."""

    device_id: str
    product: str
    hardware_id: str
    version: str
    release_counter: int
    last_seen: float
    network_id: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class TokenRecord:
    """An admin token as stored: the SHA-256 hex of the token, never the token itself.

    ``expires_at`` (epoch s) is ``None`` for a token that does not expire.
    """

    token_hash: str
    name: str
    role: str
    created_at: float
    expires_at: float | None


@dataclass(frozen=True)
class AuditEntry:
    """One line of the append-only audit log.

    ``actor``: the token's name, ``tracker`` for rollout decisions, or ``anonymous``;
    ``action``: what was asked or decided (``rollout.create``, ``rollout.pause``,
    ``rollout.halted``, ``auth`` ...); ``target``: what it was about (e.g.
    ``acme-router 2.0.0``); ``outcome``: ``ok``, ``refused`` or ``decided``;
    ``detail``: free text. ``entry_id`` is 0 for an entry not stored yet.
    """

    at: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str
    entry_id: int = 0


@dataclass(frozen=True)
class RevokedCertificate:
    """A device certificate the tracker refuses: its fingerprint (hex SHA-256 of the
    DER), the device it was issued to, when (epoch s), by whom and why."""

    cert_sha256: str
    device_id: str
    revoked_at: float
    actor: str
    reason: str


class Store(Protocol):
    """Storage of the release catalogue, device check-ins and reports (blocking)."""

    def add_release(self, release: Release, now: float | None = None) -> bool:
        """Register ``release`` and its swarms at ``now`` (default: the store's clock).

        Returns ``True`` if added, ``False`` if exactly this release was already there.
        Registering a known release again adds the swarms it did not have yet (and
        returns ``True`` if there were any).

        Raises:
            ReleaseConflictError: another release holds its version or counter, or one
                of its info-hashes (or their 20-byte announce form).
            StorageError: the database failed.
        """
        ...

    def swarm_of(self, announce_hash: bytes) -> SwarmInfo | None:
        """The registered swarm announced as ``announce_hash`` (20 bytes), if any."""
        ...

    def swarms(self, product: str | None = None) -> list[SwarmInfo]:
        """Registered swarms (of ``product`` if given), by product, version, then order
        of registration."""
        ...

    def releases(self, product: str | None = None) -> list[Release]:
        """Registered releases (of ``product`` if given), by product then counter."""
        ...

    def record_checkin(self, checkin: CheckIn, now: float) -> None:
        """Remember what the device runs, with ``last_seen = now``."""
        ...

    def add_report(self, report: Report, now: float) -> int:
        """Store ``report`` received at ``now``; return its id (increasing)."""
        ...

    def reports(self, device_id: str | None = None) -> list[StoredReport]:
        """Stored reports (of ``device_id`` if given), oldest first."""
        ...

    def devices(self) -> list[DeviceRecord]:
        """Every device that ever checked in, by device id."""
        ...

    def device(self, device_id: str) -> DeviceRecord | None:
        """What ``device_id`` said at its latest check-in, if it ever checked in."""
        ...

    # --- replay protection (schema 4) ---------------------------------------------------

    def advance_counter(self, device_id: str, counter: int, now: float,
                        cert_sha256: str | None = None) -> int | None:
        """Accept ``counter`` as ``device_id``'s newest signed-request counter if it is
        above the last one accepted (or none was): ``None`` then, and it is stored with
        ``cert_sha256``, the certificate the request was signed with (also added to the
        device's certificates, :meth:`device_certificates`); otherwise nothing changes
        and the stored counter is returned. One atomic compare-and-set, so two tracker
        processes on one database never both accept the same counter."""
        ...

    def device_certificates(self, device_id: str) -> list[str]:
        """Fingerprints of every certificate ``device_id`` signed an accepted request
        with (check-ins and reports; announces and scrapes as :meth:`record_certificate`
        adds them; schema 5 on), the last check-in's or report's first."""
        ...

    def record_certificate(self, device_id: str, cert_sha256: str, now: float) -> None:
        """Remember that ``device_id`` signed an accepted request with ``cert_sha256``
        (kept once; what a revocation of the device takes)."""
        ...

    # --- revocation (schema 5) ------------------------------------------------------------

    def revoke_certificates(self, revoked: Sequence[RevokedCertificate],
                            audit: Sequence[AuditEntry] = ()) -> list[str]:
        """Add ``revoked`` to the revoked certificates and append ``audit``, in one
        transaction; return the fingerprints that were revoked already (those keep
        their first record)."""
        ...

    def revoked_certificates(self) -> list[RevokedCertificate]:
        """Every revoked certificate, oldest revocation first."""
        ...

    def revoked_fingerprints(self) -> dict[str, str]:
        """The fingerprint of every revoked certificate, with its device id."""
        ...

    def device_counter(self, device_id: str) -> int | None:
        """The last counter accepted from ``device_id`` by :meth:`advance_counter`."""
        ...

    # --- rollouts (schema 3) ------------------------------------------------------------

    def create_rollout(self, state: RolloutState, audit: Sequence[AuditEntry] = ()) -> None:
        """Store a new rollout (and audit entries) in one transaction.

        Raises:
            RequestError: its release is not registered.
            ConflictError: the release already has a rollout.
            StorageError: the database failed.
        """
        ...

    def rollouts(self, product: str | None = None) -> list[RolloutState]:
        """Every rollout (of ``product`` if given), by product then release counter."""
        ...

    def rollout_of(self, product: str, version: str) -> RolloutState | None:
        """The rollout of one release, if it has one."""
        ...

    def admission(self, rollout_id: str, device_id: str) -> Admission | None:
        """A device's admission record in a rollout, if it was admitted."""
        ...

    def save_rollout(self, state: RolloutState, admissions: Sequence[Admission] = (),
                     audit: Sequence[AuditEntry] = ()) -> None:
        """Write a rollout's new state, changed admissions and audit entries at once,
        if nobody saved the rollout since ``state`` was read (``state.revision``).

        Raises:
            StaleStateError: it was saved since (nothing written; read it again).
            StorageError: the database failed.
        """
        ...

    def in_flight(self, rollout_id: str, since: float) -> int:
        """Devices offered or downloading, whose admission changed at or after ``since``."""
        ...

    # --- control plane --------------------------------------------------------------------

    def add_token(self, record: TokenRecord) -> None:
        """Store an admin token record (its hash)."""
        ...

    def token(self, token_hash: str) -> TokenRecord | None:
        """The token record with this hash, if any."""
        ...

    def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append audit entries."""
        ...

    def audit(self, *, since: float = 0.0, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries at or after ``since``, oldest first, at most ``limit``."""
        ...

    def prune_audit(self, before: float) -> int:
        """Drop audit entries older than ``before`` (retention); return how many."""
        ...

    def close(self) -> None:
        """Release the database; further calls raise StorageError. Idempotent."""
        ...


class SqliteStore:
    """:class:`Store` on one SQLite database file, through one connection.

    ``SqliteStore(path)`` opens the database, creating it (and its directory) unless
    ``create`` is false, turns on WAL and ``synchronous=NORMAL`` and checks the schema
    version. ``clock`` (epoch seconds) only dates releases added without ``now``.
    Thread-safe (one internal lock); every method may raise :class:`StorageError`.
    A context manager that closes the store on exit.

    Raises:
        StorageError: the file is missing (``create=False``), not a database, another
            application's database, from a newer schema, or cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = _connect(self.path, create)

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- releases ---------------------------------------------------------------------

    def add_release(self, release: Release, now: float | None = None) -> bool:
        added_at = self._clock() if now is None else now
        with self._transaction("add release") as conn:
            new_swarms = self._new_swarms(conn, release)
            rows = conn.execute(
                "SELECT version, counter FROM releases "
                "WHERE product = ? AND (version = ? OR counter = ?)",
                (release.product, release.version, release.release_counter),
            ).fetchall()
            for version, counter in rows:
                if version == release.version and counter == release.release_counter:
                    _insert_swarms(conn, new_swarms)
                    return bool(new_swarms)
            if rows:
                version, counter = rows[0]
                raise ReleaseConflictError(
                    f"cannot add {release.product} {release.version} with counter "
                    f"{release.release_counter}: {release.product} {version} with counter "
                    f"{counter} is already registered (versions and counters are unique "
                    "per product)"
                )
            conn.execute(
                "INSERT INTO releases (product, version, counter, target, added_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (release.product, release.version, release.release_counter, release.target,
                 added_at),
            )
            _insert_swarms(conn, new_swarms)
            return True

    @staticmethod
    def _new_swarms(conn: sqlite3.Connection, release: Release) -> list[SwarmInfo]:
        """``release``'s swarms not stored yet; refuses hashes held by another release."""
        new = []
        for swarm in release.swarms:
            row = conn.execute(
                "SELECT info_hash, product, version FROM swarms "
                "WHERE info_hash = ? OR announce_hash = ?",
                (swarm.info_hash, swarm.announce_hash),
            ).fetchone()
            if row is None:
                new.append(swarm)
            elif tuple(row) != (swarm.info_hash, swarm.product, swarm.version):
                raise ReleaseConflictError(
                    f"cannot add {release.product} {release.version}: its payload "
                    f"info-hash {swarm.info_hash} clashes with {row[0]} of {row[1]} "
                    f"{row[2]} (same hash or same first 20 bytes)")
        return new

    def swarm_of(self, announce_hash: bytes) -> SwarmInfo | None:
        with self._connection("look up swarm") as conn:
            row = conn.execute(
                "SELECT info_hash, product, version, payload_kind FROM swarms "
                "WHERE announce_hash = ?", (bytes(announce_hash),)).fetchone()
        return None if row is None else _row_to_swarm(row)

    def swarms(self, product: str | None = None) -> list[SwarmInfo]:
        sql, params = _of_product("SELECT info_hash, product, version, payload_kind FROM swarms",
                                  product, "product, version, rowid")
        with self._connection("list swarms") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_row_to_swarm(row) for row in rows]

    def releases(self, product: str | None = None) -> list[Release]:
        return [release for release, _ in self.registered_releases(product)]

    def registered_releases(self, product: str | None = None) -> list[tuple[Release, float]]:
        """Like :meth:`releases`, with when each was registered (``added_at``, epoch s)."""
        sql, params = _of_product("SELECT product, version, counter, target, added_at "
                                  "FROM releases", product, "product, counter")
        with self._connection("list releases") as conn:
            rows = conn.execute(sql, params).fetchall()
        swarms: dict[tuple[str, str], list[SwarmInfo]] = {}
        for swarm in self.swarms(product):
            swarms.setdefault((swarm.product, swarm.version), []).append(swarm)
        return [(_row_to_release(row[:4], swarms.get((row[0], row[1]), [])), float(row[4]))
                for row in rows]

    # --- devices ----------------------------------------------------------------------

    def record_checkin(self, checkin: CheckIn, now: float) -> None:
        with self._transaction("record check-in") as conn:
            conn.execute(
                "INSERT INTO devices (device_id, product, hardware_id, version, "
                "release_counter, last_seen, network_id, region) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET product = excluded.product, "
                "hardware_id = excluded.hardware_id, version = excluded.version, "
                "release_counter = excluded.release_counter, last_seen = excluded.last_seen, "
                "network_id = excluded.network_id, region = excluded.region",
                (checkin.device_id, checkin.product, checkin.hardware_id, checkin.version,
                 checkin.release_counter, now, checkin.network_id, checkin.region),
            )

    def devices(self) -> list[DeviceRecord]:
        with self._connection("list devices") as conn:
            rows = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id").fetchall()
        return [_row_to_device(r) for r in rows]

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._connection("look up device") as conn:
            row = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?",
                               (device_id,)).fetchone()
        return None if row is None else _row_to_device(row)

    # --- replay protection --------------------------------------------------------------

    def advance_counter(self, device_id: str, counter: int, now: float,
                        cert_sha256: str | None = None) -> int | None:
        with self._transaction("advance request counter") as conn:
            changed = conn.execute(
                "INSERT INTO device_counters (device_id, counter, updated_at, cert_sha256) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                "counter = excluded.counter, updated_at = excluded.updated_at, "
                "cert_sha256 = excluded.cert_sha256 "
                "WHERE device_counters.counter < excluded.counter",
                (device_id, counter, now, cert_sha256)).rowcount
            if changed == 1:
                if cert_sha256 is not None:
                    conn.execute("INSERT INTO device_certificates (device_id, cert_sha256, "
                                 "first_seen) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                                 (device_id, cert_sha256, now))
                return None
            row = conn.execute("SELECT counter FROM device_counters WHERE device_id = ?",
                               (device_id,)).fetchone()
        if row is None:  # pragma: no cover - the upsert either wrote or found a row
            raise RuntimeError("request counter neither stored nor found")
        return int(row[0])

    def device_counter(self, device_id: str) -> int | None:
        with self._connection("look up request counter") as conn:
            row = conn.execute("SELECT counter FROM device_counters WHERE device_id = ?",
                               (device_id,)).fetchone()
        return None if row is None else int(row[0])

    def record_certificate(self, device_id: str, cert_sha256: str, now: float) -> None:
        with self._transaction("record device certificate") as conn:
            conn.execute("INSERT INTO device_certificates (device_id, cert_sha256, "
                         "first_seen) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                         (device_id, cert_sha256, now))

    def device_certificates(self, device_id: str) -> list[str]:
        with self._connection("list device certificates") as conn:
            last = conn.execute("SELECT cert_sha256 FROM device_counters WHERE device_id = ?",
                                (device_id,)).fetchone()
            rows = conn.execute("SELECT cert_sha256 FROM device_certificates WHERE "
                                "device_id = ? ORDER BY first_seen DESC, cert_sha256",
                                (device_id,)).fetchall()
        out = [] if last is None or last[0] is None else [str(last[0])]
        return out + [str(r[0]) for r in rows if str(r[0]) not in out]

    # --- revocation ---------------------------------------------------------------------

    def revoke_certificates(self, revoked: Sequence[RevokedCertificate],
                            audit: Sequence[AuditEntry] = ()) -> list[str]:
        with self._transaction("revoke certificates") as conn:
            already = []
            for record in revoked:
                if conn.execute(
                        "INSERT INTO revoked_certificates (cert_sha256, device_id, "
                        "revoked_at, actor, reason) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT DO NOTHING",
                        (record.cert_sha256, record.device_id, record.revoked_at,
                         record.actor, record.reason)).rowcount != 1:
                    already.append(record.cert_sha256)
            # Every certificate the device signed an accepted request with is revoked
            # now, so its counter has nothing left to protect; reset, so that a thief
            # who pushed it up with the stolen key cannot lock out the device's next
            # certificate (whose counters start from the device's clock).
            for device_id in {record.device_id for record in revoked}:
                conn.execute("UPDATE device_counters SET counter = 0 WHERE device_id = ?",
                             (device_id,))
            _insert_audit(conn, audit)
        return already

    def revoked_certificates(self) -> list[RevokedCertificate]:
        with self._connection("list revoked certificates") as conn:
            rows = conn.execute("SELECT cert_sha256, device_id, revoked_at, actor, reason "
                                "FROM revoked_certificates ORDER BY revoked_at, rowid"
                                ).fetchall()
        return [RevokedCertificate(str(r[0]), str(r[1]), float(r[2]), str(r[3]), str(r[4]))
                for r in rows]

    def revoked_fingerprints(self) -> dict[str, str]:
        with self._connection("read revoked certificates") as conn:
            rows = conn.execute("SELECT cert_sha256, device_id FROM revoked_certificates"
                                ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    # --- rollouts -----------------------------------------------------------------------

    def create_rollout(self, state: RolloutState, audit: Sequence[AuditEntry] = ()) -> None:
        with self._transaction("create rollout") as conn:
            row = conn.execute("SELECT counter FROM releases WHERE product = ? AND version = ?",
                               (state.product, state.version)).fetchone()
            if row is None:
                raise RequestError(f"no release {state.product} {state.version} is "
                                   "registered")
            if int(row[0]) != state.release_counter:
                raise RuntimeError("rollout built with the wrong release counter")
            taken = conn.execute(
                "SELECT rollout_id FROM rollouts WHERE rollout_id = ? OR "
                "(product = ? AND version = ?)",
                (state.rollout_id, state.product, state.version)).fetchone()
            if taken is not None:
                raise ConflictError(f"{state.product} {state.version} already has a "
                                    f"rollout ({taken[0]})")
            conn.execute(
                "INSERT INTO rollouts (rollout_id, product, version, counter, plan_json, "
                "phase, stage, stage_started_at, created_at, halt_reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (state.rollout_id, state.product, state.version, state.release_counter,
                 json.dumps(state.plan.to_json(), sort_keys=True), state.phase, state.stage,
                 state.stage_started_at, state.created_at, state.halt_reason))
            _write_stages(conn, state)
            _insert_audit(conn, audit)

    def rollouts(self, product: str | None = None) -> list[RolloutState]:
        sql, params = _of_product(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts", product,
                                  "product, counter")
        with self._connection("list rollouts") as conn:
            rows = conn.execute(sql, params).fetchall()
            return [_row_to_rollout(conn, row) for row in rows]

    def rollout_of(self, product: str, version: str) -> RolloutState | None:
        with self._connection("look up rollout") as conn:
            row = conn.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts "
                               "WHERE product = ? AND version = ?",
                               (product, version)).fetchone()
            return None if row is None else _row_to_rollout(conn, row)

    def admission(self, rollout_id: str, device_id: str) -> Admission | None:
        with self._connection("look up admission") as conn:
            row = conn.execute(
                "SELECT device_id, stage, status, updated_at FROM rollout_devices "
                "WHERE rollout_id = ? AND device_id = ?", (rollout_id, device_id)).fetchone()
        if row is None:
            return None
        return Admission(str(row[0]), int(row[1]), str(row[2]), float(row[3]))

    def save_rollout(self, state: RolloutState, admissions: Sequence[Admission] = (),
                     audit: Sequence[AuditEntry] = ()) -> None:
        with self._transaction("save rollout") as conn:
            cursor = conn.execute(
                "UPDATE rollouts SET phase = ?, stage = ?, stage_started_at = ?, "
                "halt_reason = ?, revision = revision + 1 "
                "WHERE rollout_id = ? AND revision = ?",
                (state.phase, state.stage, state.stage_started_at, state.halt_reason,
                 state.rollout_id, state.revision))
            if cursor.rowcount != 1:
                row = conn.execute("SELECT revision FROM rollouts WHERE rollout_id = ?",
                                   (state.rollout_id,)).fetchone()
                if row is None:
                    raise StorageError(f"rollout {state.rollout_id} is not stored")
                raise StaleStateError(f"rollout {state.rollout_id} changed since it was "
                                      f"read (revision {state.revision}, now {row[0]})")
            _write_stages(conn, state)
            conn.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, stage, status, "
                "updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (rollout_id, device_id) "
                "DO UPDATE SET stage = excluded.stage, status = excluded.status, "
                "updated_at = excluded.updated_at",
                [(state.rollout_id, a.device_id, a.stage, a.status, a.updated_at)
                 for a in admissions])
            _insert_audit(conn, audit)

    def in_flight(self, rollout_id: str, since: float) -> int:
        with self._connection("count in flight") as conn:
            row = conn.execute(
                "SELECT count(*) FROM rollout_devices WHERE rollout_id = ? AND status IN "
                "('offered', 'downloading') AND updated_at >= ?",
                (rollout_id, since)).fetchone()
        return int(row[0])

    # --- control plane ------------------------------------------------------------------

    def add_token(self, record: TokenRecord) -> None:
        with self._transaction("add token") as conn:
            conn.execute("INSERT INTO admin_tokens (token_hash, name, role, created_at, "
                         "expires_at) VALUES (?, ?, ?, ?, ?)",
                         (record.token_hash, record.name, record.role, record.created_at,
                          record.expires_at))

    def token(self, token_hash: str) -> TokenRecord | None:
        with self._connection("look up token") as conn:
            row = conn.execute("SELECT token_hash, name, role, created_at, expires_at "
                               "FROM admin_tokens WHERE token_hash = ?",
                               (token_hash,)).fetchone()
        if row is None:
            return None
        return TokenRecord(str(row[0]), str(row[1]), str(row[2]), float(row[3]),
                           None if row[4] is None else float(row[4]))

    def add_audit(self, entries: Sequence[AuditEntry]) -> None:
        with self._transaction("append audit") as conn:
            _insert_audit(conn, entries)

    def audit(self, *, since: float = 0.0, limit: int = 1000) -> list[AuditEntry]:
        with self._connection("read audit") as conn:
            rows = conn.execute(
                "SELECT at, actor, action, target, outcome, detail, id FROM audit "
                "WHERE at >= ? ORDER BY id LIMIT ?", (since, limit)).fetchall()
        return [AuditEntry(float(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]),
                           str(r[5]), int(r[6])) for r in rows]

    def prune_audit(self, before: float) -> int:
        with self._transaction("prune audit") as conn:
            return int(conn.execute("DELETE FROM audit WHERE at < ?", (before,)).rowcount)

    # --- reports ----------------------------------------------------------------------

    def add_report(self, report: Report, now: float) -> int:
        timings = json.dumps(report.timings_s, sort_keys=True, allow_nan=False)
        with self._transaction("store report") as conn:
            cursor = conn.execute(
                "INSERT INTO reports (device_id, product, from_version, to_version, status, "
                "message, bytes_origin, bytes_peers, timings_json, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (report.device_id, report.product, report.from_version, report.to_version,
                 report.status, report.message, report.bytes_origin, report.bytes_peers,
                 timings, now),
            )
            report_id = cursor.lastrowid
        if report_id is None:  # pragma: no cover - sqlite always sets it after an INSERT
            raise RuntimeError("sqlite did not return the new report id")
        return report_id

    def reports(self, device_id: str | None = None) -> list[StoredReport]:
        sql = ("SELECT id, received_at, device_id, product, from_version, to_version, status, "
               "message, bytes_origin, bytes_peers, timings_json FROM reports")
        params: tuple[str, ...] = ()
        if device_id is not None:
            sql += " WHERE device_id = ?"
            params = (device_id,)
        sql += " ORDER BY id"
        with self._connection("list reports") as conn:
            rows = conn.execute(sql, params).fetchall()
        out = []
        for row in rows:
            try:
                timings = {str(k): float(v) for k, v in json.loads(row[10]).items()}
            except (ValueError, TypeError, AttributeError) as exc:
                raise StorageError(f"report {row[0]}: corrupt timings_json: {exc}") from exc
            out.append(StoredReport(int(row[0]), float(row[1]), str(row[2]), str(row[3]),
                                    str(row[4]), str(row[5]), int(row[6]), str(row[7]),
                                    int(row[8]), int(row[9]), timings))
        return out

    # --- lifecycle --------------------------------------------------------------------

    def journal_mode(self) -> str:
        """The connection's journal mode (``"wal"`` once opened)."""
        with self._connection("read journal mode") as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.close()
            except sqlite3.Error as exc:
                raise StorageError(f"closing {self.path}: {exc}") from exc

    @contextmanager
    def _connection(self, what: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and translate sqlite3 errors; no transaction (one statement)."""
        with self._lock:
            if self._conn is None:
                raise StorageError(f"{what}: the tracker store is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StorageError(f"{what} in {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), committed unless the body raises."""
        with self._connection(what) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise


_DEVICE_COLUMNS = ("device_id, product, hardware_id, version, release_counter, last_seen, "
                   "network_id, region")
_ROLLOUT_COLUMNS = ("rollout_id, product, version, counter, plan_json, phase, stage, "
                    "stage_started_at, created_at, halt_reason, revision")
_STAGE_FIELDS = ("admitted", "downloading", "succeeded", "failed", "rolled_back",
                 "bytes_origin", "bytes_peers")


def _row_to_device(r: tuple[Any, ...]) -> DeviceRecord:
    return DeviceRecord(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), float(r[5]),
                        None if r[6] is None else str(r[6]),
                        None if r[7] is None else str(r[7]))


def _row_to_rollout(conn: sqlite3.Connection, row: tuple[Any, ...]) -> RolloutState:
    (rollout_id, product, version, counter, plan_json, phase, stage, stage_started_at,
     created_at, halt_reason, revision) = row
    try:
        plan = RolloutPlan.from_json(json.loads(plan_json))
    except (ValueError, RequestError) as exc:
        raise StorageError(f"rollout {rollout_id}: corrupt plan: {exc}") from exc
    stages = {int(r[0]): StageCounters(*(int(v) for v in r[1:])) for r in conn.execute(
        f"SELECT stage, {', '.join(_STAGE_FIELDS)} FROM rollout_stages WHERE rollout_id = ?",
        (rollout_id,))}
    counters = tuple(stages.get(i, StageCounters()) for i in range(len(plan.stage_names)))
    return RolloutState(str(rollout_id), str(product), str(version), int(counter), plan,
                        str(phase), int(stage), float(stage_started_at), float(created_at),
                        counters, str(halt_reason), revision=int(revision))


def _write_stages(conn: sqlite3.Connection, state: RolloutState) -> None:
    conn.executemany(
        f"INSERT OR REPLACE INTO rollout_stages (rollout_id, stage, {', '.join(_STAGE_FIELDS)})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(state.rollout_id, i, *(getattr(c, f) for f in _STAGE_FIELDS))
         for i, c in enumerate(state.counters)])


def _of_product(select: str, product: str | None, order_by: str) -> tuple[str, tuple[str, ...]]:
    """``select`` restricted to ``product`` when given, ordered: ``(sql, params)``."""
    if product is None:
        return f"{select} ORDER BY {order_by}", ()
    return f"{select} WHERE product = ? ORDER BY {order_by}", (product,)


def _insert_audit(conn: sqlite3.Connection, entries: Sequence[AuditEntry]) -> None:
    conn.executemany(
        "INSERT INTO audit (at, actor, action, target, outcome, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(e.at, e.actor, e.action, e.target, e.outcome, e.detail) for e in entries])


def _row_to_release(row: tuple[Any, ...], swarms: list[SwarmInfo]) -> Release:
    product, version, counter, target = row
    try:
        return Release(str(product), str(version), int(counter), str(target), tuple(swarms))
    except RequestError as exc:
        raise StorageError(f"corrupt release row {row!r}: {exc}") from exc


def _row_to_swarm(row: tuple[Any, ...]) -> SwarmInfo:
    try:
        return SwarmInfo(str(row[0]), str(row[1]), str(row[2]), str(row[3]))
    except RequestError as exc:
        raise StorageError(f"corrupt swarm row {row!r}: {exc}") from exc


def _insert_swarms(conn: sqlite3.Connection, swarms: list[SwarmInfo]) -> None:
    conn.executemany(
        "INSERT INTO swarms (info_hash, announce_hash, product, version, payload_kind) "
        "VALUES (?, ?, ?, ?, ?)",
        [(s.info_hash, s.announce_hash, s.product, s.version, s.payload_kind)
         for s in swarms],
    )


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


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
    """Pragmas, then create the schema or check its version."""
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
                _run_script(conn, _SCHEMA)
                _run_script(conn, _SCHEMA_SWARMS)
                _run_script(conn, _SCHEMA_ROLLOUTS)
                _run_script(conn, _SCHEMA_DEVICE_COUNTERS)
                _run_script(conn, _SCHEMA_REVOCATION)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)",
                             (SCHEMA_VERSION,))
            else:
                row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
                version = row[0]
                if isinstance(version, int) and 1 <= version < SCHEMA_VERSION:
                    for step in range(version, SCHEMA_VERSION):
                        _run_script(conn, _MIGRATIONS[step])
                    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
                    version = SCHEMA_VERSION
                if version != SCHEMA_VERSION:
                    raise StorageError(f"{path}: tracker schema version {version!r}, this "
                                       f"swarmota supports {SCHEMA_VERSION}")
        except BaseException:
            conn.rollback()
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open tracker database {path}: {exc}") from exc
