"""The tracker's store in SQL, written once for both engines: :class:`SqlStore`.

:class:`~tracker.sqlite_store.SqliteStore` and :class:`~tracker.pg_store.PgStore`
subclass it with a connection, transactions, error translation and the few fragments
in which their dialects differ (:class:`Dialect`); every statement of the
:class:`~tracker.store.Store` interface is here, with ``?`` placeholders (PostgreSQL's
adapter turns them into its own). Imports no database library.

Locking: one connection per store, one re-entrant lock held for each call and for a
whole :meth:`SqlStore.atomic` block, so several threads calling one store are
serialised. Concurrency between processes is the engine's: SQLite takes its write
lock at the start of each transaction (``BEGIN IMMEDIATE``); PostgreSQL runs READ
COMMITTED transactions, rollouts are saved with a compare-and-set on their revision,
counters with one conditional upsert, and read-modify-writes of one row lock it
(``FOR UPDATE``).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from swarmota.tracker.bittorrent import SwarmInfo
from swarmota.tracker.errors import (
    ConflictError,
    ReleaseConflictError,
    RequestError,
    StaleStateError,
    StorageError,
)
from swarmota.tracker.protocol import PayloadSummary, Release, newer_releases
from swarmota.tracker.rollout import (
    RESTARTABLE,
    Admission,
    FailureNote,
    RolloutPlan,
    RolloutState,
    StageCounters,
)
from swarmota.tracker.store import (
    SCHEMA_VERSION,
    AuditEntry,
    CheckinRead,
    DeviceFilter,
    DeviceRecord,
    RevokedCertificate,
    RolloutDevice,
    StoredReport,
    TokenRecord,
)
from swarmota.tracker.wire import CheckIn, ComponentVersion, Report

__all__ = ["ADVANCE_COUNTER", "DEVICE_INSERT", "DEVICE_UPSERT", "DEVICE_VALUES",
           "ROLLOUT_ADMISSION_SELECT", "Connection", "Cursor", "Dialect", "SqlStore",
           "device_row", "migrate", "rollouts_with_admissions", "split_statements"]

_LATER = "CASE WHEN last_seen > ? THEN last_seen ELSE ? END"
"""``max(last_seen, ?)`` in both dialects (the parameter given twice)."""


class Cursor(Protocol):
    """What a statement returns (``sqlite3.Cursor``, ``psycopg.Cursor``)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """A database connection as :class:`SqlStore` uses it: statements with ``?``
    placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any: ...


@dataclass(frozen=True)
class Dialect:
    """Where the engines' SQL differs.

    Attributes:
        rowid: the column that orders rows by insertion (SQLite's ``rowid``; a
            ``seq`` identity column in PostgreSQL).
        label_match: a condition true when ``d.labels_json`` (a JSON array of
            strings) holds the one ``?`` parameter.
        for_update: appended to a ``SELECT`` of one row that the transaction then
            rewrites (``FOR UPDATE`` where rows are locked; SQLite's transactions
            already hold the database's write lock).
        id_contains: a condition true when ``d.device_id`` contains the one ``?``
            parameter as plain text (no wildcards).
    """

    rowid: str
    label_match: str
    for_update: str
    id_contains: str


class SqlStore:
    """Every :class:`~tracker.store.Store` method over a :class:`Connection`; a
    subclass provides the connection and the engine's transactions and errors
    (:meth:`_open_connection`, :meth:`_begin`, :meth:`_commit`, :meth:`_rollback`,
    :meth:`_translate`, :meth:`_close_connection`, :attr:`describe`). A context
    manager that closes the store on exit."""

    def __init__(self, dialect: Dialect, describe: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.describe = describe
        self._clock = clock
        self._rowid = dialect.rowid
        self._label_match = dialect.label_match
        self._for_update = dialect.for_update
        self._id_contains = dialect.id_contains
        self._lock = threading.RLock()
        self._depth = 0  # open transaction blocks of the thread holding the lock
        self._current: Connection | None = None  # the connection of the open transaction
        self._batched = False  # inside batch(): each decision is a savepoint
        self._closed = False

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- what an engine provides ----------------------------------------------------------

    def _open_connection(self) -> Connection:
        """The connection to use now (opened again if it was lost, outside transactions).

        Raises:
            StorageError: it cannot be opened.
        """
        raise NotImplementedError

    def _begin(self, conn: Connection) -> None:
        raise NotImplementedError

    def _commit(self, conn: Connection) -> None:
        raise NotImplementedError

    def _rollback(self, conn: Connection) -> None:
        """Roll back the open transaction, if any (never raises)."""
        raise NotImplementedError

    def _translate(self, exc: Exception, what: str) -> Exception | None:
        """Our error for an engine's ``exc`` (``None``: not an engine error)."""
        raise NotImplementedError

    def _contended(self) -> None:
        """A transaction of this store was rolled back as stale (another process saved
        a rollout it read): the engine may make the next one exclusive, so that a
        decision retried under contention makes progress."""

    def _decision_starts(self, conn: Connection) -> None:
        """A decision starts (a transaction, or a savepoint of a batch): the engine may
        lock what the last contention asks for."""

    def _decision_ends(self, conn: Connection) -> None:
        """A decision of a batch ends: an engine that queues statements waits for
        their results here, so that an error is this decision's (undone alone)."""

    def _failed(self, conn: Connection) -> None:
        """A decision of a batch failed: make ``conn`` ready to roll back to its
        savepoint (an engine that queues statements clears what the error aborted)."""

    def _close_connection(self) -> None:
        """Close the connection, if open.

        Raises:
            StorageError: closing failed.
        """
        raise NotImplementedError

    # --- transactions ---------------------------------------------------------------------

    @contextmanager
    def atomic(self, what: str) -> Iterator[None]:
        with self._transaction(what):
            yield

    @contextmanager
    def batch(self, what: str) -> Iterator[None]:
        with self._transaction(what):
            self._batched = True
            try:
                yield
            finally:
                self._batched = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_connection()

    @contextmanager
    def _connection(self, what: str) -> Iterator[Connection]:
        """Hold the lock and translate the engine's errors (inside a transaction block,
        the block's statements; else one statement on its own)."""
        with self._lock:
            if self._closed:
                raise StorageError(f"{what}: the tracker store is closed")
            try:
                conn = self._current if self._depth else None
                yield conn if conn is not None else self._open_connection()
            except Exception as exc:
                ours = self._translate(exc, what)
                if ours is None:
                    raise
                raise ours from exc

    @contextmanager
    def _transaction(self, what: str) -> Iterator[Connection]:
        """One write transaction, committed unless the body raises; inside another one
        (:meth:`atomic`), part of it."""
        with self._connection(what) as conn:
            if self._depth == 1 and self._batched:  # a decision of a batch: a savepoint
                with self._savepoint(conn):
                    yield conn
                return
            if self._depth:
                self._depth += 1
                try:
                    yield conn
                finally:
                    self._depth -= 1
                return
            self._begin(conn)
            self._decision_starts(conn)
            self._current = conn
            self._depth = 1
            try:
                yield conn
                self._commit(conn)
            except StaleStateError:
                self._rollback(conn)
                self._contended()
                raise
            except BaseException:
                self._rollback(conn)
                raise
            finally:
                self._depth = 0
                self._current = None

    @contextmanager
    def _savepoint(self, conn: Connection) -> Iterator[None]:
        """A decision inside :meth:`batch`: kept when it ends, undone alone when it
        raises (the batch goes on). Savepoints are not released one by one (a round
        trip each): the batch's commit keeps them all. They share one name (one statement
        text, prepared once): a rollback to it goes to the newest, this decision's."""
        conn.execute("SAVEPOINT decision")
        self._depth += 1
        try:
            self._decision_starts(conn)
            yield
            self._decision_ends(conn)
        except BaseException as exc:
            self._failed(conn)
            conn.execute("ROLLBACK TO SAVEPOINT decision")
            if isinstance(exc, StaleStateError):
                self._contended()
            raise
        finally:
            self._depth -= 1

    # --- releases ---------------------------------------------------------------------

    def add_release(self, release: Release, now: float | None = None) -> bool:
        added_at = self._clock() if now is None else now
        with self._transaction("add release") as conn:
            new_swarms = self._new_swarms(conn, release)
            rows = conn.execute(
                "SELECT version, counter, coalesce(component, '') FROM releases "
                "WHERE product = ? AND (version = ? OR (counter = ? AND "
                "coalesce(component, '') = ?))",
                (release.product, release.version, release.release_counter,
                 release.component or ""),
            ).fetchall()
            for version, counter, component in rows:
                if (version == release.version and counter == release.release_counter
                        and component == (release.component or "")):
                    _insert_swarms(conn, new_swarms)
                    return bool(new_swarms)
            if rows:
                version, counter, component = rows[0]
                sequence = f"component {component}" if component else "image"
                raise ReleaseConflictError(
                    f"cannot add {release.product} {release.version} with counter "
                    f"{release.release_counter}: {release.product} {version} with counter "
                    f"{counter} ({sequence}) is already registered (versions are unique "
                    "per product, counters per product and sequence: the image's, or "
                    "one component's)"
                )
            conn.execute(
                "INSERT INTO releases (product, version, counter, target, added_at, "
                "update_type, component, payloads_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (release.product, release.version, release.release_counter, release.target,
                 added_at, release.update_type, release.component,
                 json.dumps([p.to_json() for p in release.payloads])),
            )
            _insert_swarms(conn, new_swarms)
            return True

    @staticmethod
    def _new_swarms(conn: Connection, release: Release) -> list[SwarmInfo]:
        """``release``'s swarms not stored yet; refuses an info-hash whose announce form
        (first 20 bytes) another info-hash has."""
        new = []
        for swarm in release.swarms:
            rows = conn.execute(
                "SELECT info_hash, product, version FROM swarms WHERE announce_hash = ?",
                (swarm.announce_hash,)).fetchall()
            for row in rows:
                if row[0] != swarm.info_hash:
                    raise ReleaseConflictError(
                        f"cannot add {release.product} {release.version}: its payload "
                        f"info-hash {swarm.info_hash} shares its first 20 bytes with "
                        f"{row[0]} of {row[1]} {row[2]}")
            if not any((row[1], row[2]) == (swarm.product, swarm.version) for row in rows):
                new.append(swarm)
        return new

    def release(self, product: str, version: str) -> Release | None:
        found = [r for r in self.releases(product) if r.version == version]
        return found[0] if found else None

    def swarms_of(self, announce_hash: bytes) -> list[SwarmInfo]:
        with self._connection("look up swarm") as conn:
            rows = conn.execute(
                "SELECT info_hash, product, version, payload_kind FROM swarms "
                f"WHERE announce_hash = ? ORDER BY {self._rowid}",
                (bytes(announce_hash),)).fetchall()
        return [_row_to_swarm(row) for row in rows]

    def swarms(self, product: str | None = None) -> list[SwarmInfo]:
        sql, params = _of_product("SELECT info_hash, product, version, payload_kind FROM swarms",
                                  product, f"product, version, {self._rowid}")
        with self._connection("list swarms") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_row_to_swarm(row) for row in rows]

    def releases(self, product: str | None = None) -> list[Release]:
        return [release for release, _ in self.registered_releases(product)]

    def registered_releases(self, product: str | None = None) -> list[tuple[Release, float]]:
        sql = ("SELECT r.product, r.version, r.counter, r.target, r.added_at, r.update_type, "
               "r.component, r.payloads_json, s.info_hash, s.payload_kind FROM releases r "
               "LEFT JOIN swarms s ON s.product = r.product AND s.version = r.version")
        params: tuple[str, ...] = ()
        if product is not None:
            sql, params = sql + " WHERE r.product = ?", (product,)
        sql += (f" ORDER BY r.product, coalesce(r.component, ''), r.counter, "
                f"s.{self._rowid}")
        with self._connection("list releases") as conn:
            rows = conn.execute(sql, params).fetchall()
        grouped: dict[tuple[str, str], tuple[Sequence[Any], list[SwarmInfo]]] = {}
        for row in rows:
            _, swarms = grouped.setdefault((row[0], row[1]), (row[:8], []))
            if row[8] is not None:
                swarms.append(_row_to_swarm((row[8], row[0], row[1], row[9])))
        return [(_row_to_release(head, swarms), float(head[4]))
                for head, swarms in grouped.values()]

    # --- devices ----------------------------------------------------------------------

    def record_checkin(self, checkin: CheckIn, now: float) -> None:
        with self._transaction("record check-in") as conn:
            conn.execute(f"{DEVICE_INSERT} VALUES ({DEVICE_VALUES}){DEVICE_UPSERT}",
                         device_row(checkin, now))

    def check_in(self, checkin: CheckIn, now: float, *, counter: int | None = None,
                 cert_sha256: str | None = None) -> CheckinRead:
        with self._transaction("record check-in"):
            if counter is not None:
                floor = self.advance_counter(checkin.device_id, counter, now, cert_sha256)
                if floor is not None:
                    return CheckinRead(floor)
            self.record_checkin(checkin, now)
            candidates = tuple(
                (release, *self.rollout_with_admission(release.product, release.version,
                                                       checkin.device_id))
                for release in newer_releases(checkin, self.releases(checkin.product)))
        return CheckinRead(None, candidates)

    def record_installed(self, device_id: str, release: Release, now: float) -> None:
        with self._transaction("record installed release") as conn:
            if release.component is None:
                conn.execute(
                    "UPDATE devices SET version = ?, release_counter = ?, "
                    f"last_seen = {_LATER} WHERE device_id = ? AND product = ? "
                    "AND release_counter <= ?",
                    (release.version, release.release_counter, now, now, device_id,
                     release.product, release.release_counter))
                return
            row = conn.execute("SELECT components_json FROM devices WHERE device_id = ? "
                               f"AND product = ?{self._for_update}",
                               (device_id, release.product)).fetchone()
            if row is None:
                return
            components = [c for c in _components(row[0]) or () if c.name != release.component]
            components.append(ComponentVersion(release.component, release.version,
                                               release.release_counter))
            conn.execute(f"UPDATE devices SET components_json = ?, last_seen = {_LATER} "
                         "WHERE device_id = ?",
                         (json.dumps([[c.name, c.version, c.release_counter]
                                      for c in sorted(components, key=lambda c: c.name)]),
                          now, now, device_id))

    def devices(self, where: DeviceFilter | None = None, *,
                limit: int | None = None) -> list[DeviceRecord]:
        f = where or DeviceFilter()
        clauses, params = [], []
        for column, value in (("d.product = ?", f.product), ("d.version = ?", f.version),
                              ("d.last_seen < ?", f.seen_before),
                              ("d.last_seen >= ?", f.seen_after),
                              ("d.device_id > ?", f.after),
                              (self._id_contains, f.search)):
            if value is not None:
                clauses.append(column)
                params.append(value)
        if f.group is not None:
            clauses.append(f"({self._label_match} OR EXISTS (SELECT 1 FROM device_tags t "
                           "WHERE t.device_id = d.device_id AND t.tag = ?))")
            params += [f.group, f.group]
        if f.rollout_id is not None:
            sub = ("EXISTS (SELECT 1 FROM rollout_devices a WHERE a.device_id = d.device_id "
                   "AND a.rollout_id = ?")
            params.append(f.rollout_id)
            if f.status is not None:
                sub += " AND a.status = ?"
                params.append(f.status)
            clauses.append(sub + ")")
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices d"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY d.device_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self._connection("list devices") as conn:
            rows = conn.execute(sql, params).fetchall()
            return _with_tags(conn, [_row_to_device(r) for r in rows])

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._connection("look up device") as conn:
            row = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices d "
                               "WHERE d.device_id = ?", (device_id,)).fetchone()
            return None if row is None else _with_tags(conn, [_row_to_device(row)])[0]

    def count_devices(self, product: str | None = None, *,
                      seen_before: float | None = None) -> dict[tuple[str, str], int]:
        clauses: list[str] = []
        params: list[str | float] = []
        for clause, value in (("product = ?", product), ("last_seen < ?", seen_before)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        sql = "SELECT product, version, count(*) FROM devices"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " GROUP BY product, version ORDER BY product, version"
        with self._connection("count devices") as conn:
            rows = conn.execute(sql, params).fetchall()
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    def set_tags(self, device_id: str, add: Sequence[str], remove: Sequence[str],
                 actor: str, now: float, audit: Sequence[AuditEntry] = ()) -> tuple[str, ...]:
        with self._transaction("tag device") as conn:
            if conn.execute("SELECT 1 FROM devices WHERE device_id = ?",
                            (device_id,)).fetchone() is None:
                raise RequestError(f"unknown device {device_id}")
            conn.executemany("DELETE FROM device_tags WHERE device_id = ? AND tag = ?",
                             [(device_id, t) for t in remove])
            conn.executemany("INSERT INTO device_tags (device_id, tag, added_at, actor) "
                             "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             [(device_id, t, now, actor) for t in add])
            _insert_audit(conn, audit)
            return _tags_of(conn, device_id)

    # --- replay protection --------------------------------------------------------------

    def advance_counter(self, device_id: str, counter: int, now: float,
                        cert_sha256: str | None = None) -> int | None:
        with self._transaction("advance request counter") as conn:
            changed = conn.execute(ADVANCE_COUNTER,
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
                                f"FROM revoked_certificates ORDER BY revoked_at, {self._rowid}"
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
            if conn.execute("SELECT 1 FROM rollouts WHERE rollout_id = ?",
                            (state.rollout_id,)).fetchone() is not None:
                raise ConflictError(f"rollout id {state.rollout_id} is taken")
            latest = conn.execute(
                "SELECT rollout_id, phase, generation FROM rollouts WHERE product = ? AND "
                "version = ? ORDER BY generation DESC LIMIT 1",
                (state.product, state.version)).fetchone()
            if latest is not None and str(latest[1]) not in RESTARTABLE:
                raise ConflictError(f"{state.product} {state.version} already has a "
                                    f"rollout ({latest[0]}, {latest[1]}); only a halted or "
                                    "aborted one may be followed by a new one")
            expected = 1 if latest is None else int(latest[2]) + 1
            if state.generation != expected:
                raise ConflictError(f"{state.product} {state.version}: the next rollout is "
                                    f"generation {expected}, not {state.generation}")
            conn.execute(
                "INSERT INTO rollouts (rollout_id, product, version, counter, plan_json, "
                "phase, stage, stage_started_at, created_at, halt_reason, generation, "
                "failures_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (state.rollout_id, state.product, state.version, state.release_counter,
                 json.dumps(state.plan.to_json(), sort_keys=True), state.phase, state.stage,
                 state.stage_started_at, state.created_at, state.halt_reason,
                 state.generation, _failures_to_json(state.failures)))
            _write_stages(conn, state)
            _insert_audit(conn, audit)

    def rollouts(self, product: str | None = None, *,
                 history: bool = False) -> list[RolloutState]:
        where = ""
        if not history:
            where = (" WHERE r.generation = (SELECT max(generation) FROM rollouts x "
                     "WHERE x.product = r.product AND x.version = r.version)")
        params: tuple[str, ...] = ()
        if product is not None:
            where += (" AND" if not history else " WHERE") + " r.product = ?"
            params = (product,)
        with self._connection("list rollouts") as conn:
            rows = conn.execute(f"{_ROLLOUT_SELECT}{where} ORDER BY r.product, r.counter, "
                                "r.generation, s.stage", params).fetchall()
        return _rollouts_of(rows)

    def rollout_of(self, product: str, version: str) -> RolloutState | None:
        with self._connection("look up rollout") as conn:
            rows = conn.execute(f"{_ROLLOUT_SELECT} WHERE r.rollout_id = (SELECT rollout_id "
                                "FROM rollouts WHERE product = ? AND version = ? "
                                "ORDER BY generation DESC LIMIT 1) ORDER BY s.stage",
                                (product, version)).fetchall()
        found = _rollouts_of(rows)
        return found[0] if found else None

    def rollout_with_admission(self, product: str, version: str, device_id: str
                               ) -> tuple[RolloutState | None, Admission | None]:
        with self._connection("look up rollout and admission") as conn:
            rows = conn.execute(
                f"{ROLLOUT_ADMISSION_SELECT} WHERE r.rollout_id = (SELECT rollout_id FROM "
                "rollouts WHERE product = ? AND version = ? ORDER BY generation DESC "
                "LIMIT 1) ORDER BY s.stage", (device_id, product, version)).fetchall()
        found = rollouts_with_admissions(rows)
        return found[0] if found else (None, None)

    def rollout(self, rollout_id: str) -> RolloutState | None:
        with self._connection("look up rollout") as conn:
            rows = conn.execute(f"{_ROLLOUT_SELECT} WHERE r.rollout_id = ? ORDER BY s.stage",
                                (rollout_id,)).fetchall()
        found = _rollouts_of(rows)
        return found[0] if found else None

    def admission(self, rollout_id: str, device_id: str) -> Admission | None:
        with self._connection("look up admission") as conn:
            row = conn.execute(
                f"SELECT {_ADMISSION_COLUMNS} FROM rollout_devices "
                "WHERE rollout_id = ? AND device_id = ?", (rollout_id, device_id)).fetchone()
        return None if row is None else _row_to_admission(row)

    def admissions(self, rollout_id: str, *, status: str | None = None,
                   after: str | None = None, limit: int | None = None) -> list[Admission]:
        sql = f"SELECT {_ADMISSION_COLUMNS} FROM rollout_devices WHERE rollout_id = ?"
        params: list[Any] = [rollout_id]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        if after is not None:
            sql += " AND device_id > ?"
            params.append(after)
        sql += " ORDER BY device_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self._connection("list admissions") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_row_to_admission(r) for r in rows]

    def admissions_of(self, device_id: str) -> list[RolloutDevice]:
        with self._connection("list a device's rollouts") as conn:
            rows = conn.execute(
                "SELECT r.rollout_id, r.product, r.version, r.generation, "
                f"{', '.join('a.' + c for c in _ADMISSION_COLUMNS.split(', '))} "
                "FROM rollout_devices a JOIN rollouts r ON r.rollout_id = a.rollout_id "
                f"WHERE a.device_id = ? ORDER BY r.created_at DESC, r.{self._rowid} DESC",
                (device_id,)).fetchall()
        return [RolloutDevice(str(r[0]), str(r[1]), str(r[2]), int(r[3]),
                              _row_to_admission(r[4:])) for r in rows]

    def save_rollout(self, state: RolloutState, admissions: Sequence[Admission] = (),
                     audit: Sequence[AuditEntry] = ()) -> None:
        with self._transaction("save rollout") as conn:
            cursor = conn.execute(
                "UPDATE rollouts SET phase = ?, stage = ?, stage_started_at = ?, "
                "halt_reason = ?, failures_json = ?, revision = revision + 1 "
                "WHERE rollout_id = ? AND revision = ?",
                (state.phase, state.stage, state.stage_started_at, state.halt_reason,
                 _failures_to_json(state.failures), state.rollout_id, state.revision))
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
                "updated_at, code, message) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (rollout_id, device_id) DO UPDATE SET stage = excluded.stage, "
                "status = excluded.status, updated_at = excluded.updated_at, "
                "code = excluded.code, message = excluded.message",
                [(state.rollout_id, a.device_id, a.stage, a.status, a.updated_at, a.code,
                  a.message) for a in admissions])
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

    def add_report(self, report: Report, now: float) -> tuple[int, bool]:
        timings = json.dumps(report.timings_s, sort_keys=True, allow_nan=False)
        with self._transaction("store report") as conn:
            if report.report_id is not None:
                row = conn.execute("SELECT id FROM reports WHERE device_id = ? AND "
                                   "report_id = ?", (report.device_id, report.report_id)
                                   ).fetchone()
                if row is not None:
                    return int(row[0]), False
            # A report resent to two processes at once: the second insert finds the
            # first (the unique index), and answers as for a resent one.
            row = conn.execute(
                "INSERT INTO reports (device_id, product, from_version, to_version, status, "
                "message, bytes_origin, bytes_peers, timings_json, received_at, report_id, "
                "log_tail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (report.device_id, report.product, report.from_version, report.to_version,
                 report.status, report.message, report.bytes_origin, report.bytes_peers,
                 timings, now, report.report_id, report.log_tail),
            ).fetchone()
            if row is None:
                raise StaleStateError(f"report {report.report_id} of {report.device_id} "
                                      "was stored meanwhile")
        return int(row[0]), True

    def reports(self, device_id: str | None = None, *, product: str | None = None,
                status: int | None = None, before_id: int | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[StoredReport]:
        sql = (f"SELECT {_REPORT_COLUMNS} FROM reports")
        clauses, params = [], []
        for clause, value in (("device_id = ?", device_id), ("product = ?", product),
                              ("status = ?", status), ("id < ?", before_id)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, limit))
        with self._connection("list reports") as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_row_to_report(row) for row in rows]

    def report_totals(self) -> tuple[dict[int, int], int, int]:
        with self._connection("sum reports") as conn:
            rows = conn.execute("SELECT status, count(*), sum(bytes_origin), "
                                "sum(bytes_peers) FROM reports GROUP BY status").fetchall()
        return ({int(r[0]): int(r[1]) for r in rows}, sum(int(r[2] or 0) for r in rows),
                sum(int(r[3] or 0) for r in rows))

    def secret(self, name: str, make: Callable[[], bytes], now: float) -> bytes:
        with self._transaction("read server secret") as conn:
            conn.execute("INSERT INTO secrets (name, value, created_at) VALUES (?, ?, ?) "
                         "ON CONFLICT (name) DO NOTHING", (name, make(), now))
            row = conn.execute("SELECT value FROM secrets WHERE name = ?",
                               (name,)).fetchone()
        return bytes(row[0])

    def report_counts(self, since: float) -> dict[tuple[str, int], int]:
        with self._connection("count recent reports") as conn:
            rows = conn.execute("SELECT product, status, count(*) FROM reports "
                                "WHERE received_at >= ? GROUP BY product, status",
                                (since,)).fetchall()
        return {(str(r[0]), int(r[1])): int(r[2]) for r in rows}

    def prune_reports(self, before: float) -> int:
        with self._transaction("prune reports") as conn:
            return int(conn.execute("DELETE FROM reports WHERE received_at < ?",
                                    (before,)).rowcount)

    # --- lifecycle --------------------------------------------------------------------

DEVICE_INSERT = ("INSERT INTO devices (device_id, product, hardware_id, version, "
                 "release_counter, last_seen, network_id, region, labels_json, "
                 "components_json)")
"""A device's row, followed by its values (:func:`device_row`) and
:data:`DEVICE_UPSERT`."""
DEVICE_VALUES = ", ".join("?" * 10)
"""The placeholders of :func:`device_row`."""
DEVICE_UPSERT = (" ON CONFLICT (device_id) DO UPDATE SET product = excluded.product, "
                 "hardware_id = excluded.hardware_id, version = excluded.version, "
                 "release_counter = excluded.release_counter, "
                 "last_seen = excluded.last_seen, network_id = excluded.network_id, "
                 "region = excluded.region, labels_json = excluded.labels_json, "
                 "components_json = excluded.components_json")
ADVANCE_COUNTER = (
    "INSERT INTO device_counters (device_id, counter, updated_at, cert_sha256) "
    "VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
    "counter = excluded.counter, updated_at = excluded.updated_at, "
    "cert_sha256 = excluded.cert_sha256 WHERE device_counters.counter < excluded.counter")
"""Store a request counter if it is above the device's last one (a compare-and-set:
``(device_id, counter, now, cert_sha256)``)."""
_DEVICE_COLUMNS = ("d.device_id, d.product, d.hardware_id, d.version, d.release_counter, "
                   "d.last_seen, d.network_id, d.region, d.labels_json, d.components_json")
_ROLLOUT_FIELDS = ("rollout_id", "product", "version", "counter", "plan_json", "phase",
                   "stage", "stage_started_at", "created_at", "halt_reason", "revision",
                   "generation", "failures_json")
_ROLLOUT_WIDTH = len(_ROLLOUT_FIELDS)
_ADMISSION_COLUMNS = "device_id, stage, status, updated_at, code, message"
_REPORT_COLUMNS = ("id, received_at, device_id, product, from_version, to_version, status, "
                   "message, bytes_origin, bytes_peers, timings_json, report_id, log_tail")
_STAGE_FIELDS = ("admitted", "downloading", "succeeded", "failed", "rolled_back",
                 "bytes_origin", "bytes_peers")
_ROLLOUT_SELECT = (f"SELECT {', '.join('r.' + f for f in _ROLLOUT_FIELDS)}, s.stage, "
                   f"{', '.join('s.' + f for f in _STAGE_FIELDS)} FROM rollouts r "
                   "LEFT JOIN rollout_stages s ON s.rollout_id = r.rollout_id")
"""A rollout with its stages' counters in one statement: a row per stage."""
ROLLOUT_ADMISSION_SELECT = (
    f"SELECT {', '.join('r.' + f for f in _ROLLOUT_FIELDS)}, s.stage, "
    f"{', '.join('s.' + f for f in _STAGE_FIELDS)}, "
    f"{', '.join('a.' + c for c in _ADMISSION_COLUMNS.split(', '))} FROM rollouts r "
    "LEFT JOIN rollout_stages s ON s.rollout_id = r.rollout_id "
    "LEFT JOIN rollout_devices a ON a.rollout_id = r.rollout_id AND a.device_id = ?")
"""The same, with one device's admission (``?``: its id) on every row."""


def _row_to_device(r: Sequence[Any]) -> DeviceRecord:
    try:
        labels = tuple(str(x) for x in json.loads(r[8]))
    except (ValueError, TypeError) as exc:
        raise StorageError(f"device {r[0]}: corrupt labels_json: {exc}") from exc
    return DeviceRecord(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]), float(r[5]),
                        None if r[6] is None else str(r[6]),
                        None if r[7] is None else str(r[7]), labels, _components(r[9]))


def _components(raw: str | None) -> tuple[ComponentVersion, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(ComponentVersion(str(n), str(v), int(c)) for n, v, c in json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise StorageError(f"corrupt components_json: {exc}") from exc


def _tags_of(conn: Connection, device_id: str) -> tuple[str, ...]:
    return tuple(str(r[0]) for r in conn.execute(
        "SELECT tag FROM device_tags WHERE device_id = ? ORDER BY tag", (device_id,)
    ).fetchall())


def _with_tags(conn: Connection, devices: list[DeviceRecord]) -> list[DeviceRecord]:
    if not devices:
        return devices
    tags: dict[str, list[str]] = {}
    ids = [d.device_id for d in devices]
    for start in range(0, len(ids), 500):  # SQLite's bound on host parameters
        part = ids[start:start + 500]
        for device_id, tag in conn.execute(
                "SELECT device_id, tag FROM device_tags WHERE device_id IN "
                f"({', '.join('?' * len(part))}) ORDER BY tag", part).fetchall():
            tags.setdefault(str(device_id), []).append(str(tag))
    return [replace(d, tags=tuple(tags[d.device_id])) if d.device_id in tags else d
            for d in devices]


def _row_to_admission(r: Sequence[Any]) -> Admission:
    return Admission(str(r[0]), int(r[1]), str(r[2]), float(r[3]),
                     None if r[4] is None else int(r[4]), str(r[5]))


def _row_to_report(row: Sequence[Any]) -> StoredReport:
    try:
        timings = {str(k): float(v) for k, v in json.loads(row[10]).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise StorageError(f"report {row[0]}: corrupt timings_json: {exc}") from exc
    return StoredReport(int(row[0]), float(row[1]), str(row[2]), str(row[3]), str(row[4]),
                        str(row[5]), int(row[6]), str(row[7]), int(row[8]), int(row[9]),
                        timings, None if row[11] is None else str(row[11]), str(row[12]))


def _rollouts_of(rows: Sequence[Sequence[Any]]) -> list[RolloutState]:
    """Rollouts from the rows of :data:`_ROLLOUT_SELECT` (one per stage, in order)."""
    grouped: dict[str, tuple[Sequence[Any], list[Sequence[Any]]]] = {}
    for row in rows:
        head = row[:_ROLLOUT_WIDTH]
        _, stages = grouped.setdefault(str(head[0]), (head, []))
        if row[_ROLLOUT_WIDTH] is not None:
            stages.append(row[_ROLLOUT_WIDTH:])
    return [_row_to_rollout(head, stages) for head, stages in grouped.values()]


def rollouts_with_admissions(rows: Sequence[Sequence[Any]]
                             ) -> list[tuple[RolloutState, Admission | None]]:
    """Rollouts with one device's admission (``None``: not admitted) from the rows of
    :data:`ROLLOUT_ADMISSION_SELECT` (each rollout's rows together, by stage)."""
    width = _ROLLOUT_WIDTH + 1 + len(_STAGE_FIELDS)
    grouped: dict[str, list[Sequence[Any]]] = {}
    for row in rows:
        grouped.setdefault(str(row[0]), []).append(row)
    return [(_rollouts_of([row[:width] for row in group])[0],
             None if group[0][width] is None else _row_to_admission(group[0][width:]))
            for group in grouped.values()]


def device_row(checkin: CheckIn, now: float) -> tuple[Any, ...]:
    """The parameters of a device's row (:data:`DEVICE_INSERT`) at a check-in."""
    components = (None if checkin.components is None else json.dumps(
        [[c.name, c.version, c.release_counter] for c in checkin.components]))
    return (checkin.device_id, checkin.product, checkin.hardware_id, checkin.version,
            checkin.release_counter, now, checkin.network_id, checkin.region,
            json.dumps(list(checkin.labels)), components)


def _row_to_rollout(row: Sequence[Any], stage_rows: Sequence[Sequence[Any]]) -> RolloutState:
    (rollout_id, product, version, counter, plan_json, phase, stage, stage_started_at,
     created_at, halt_reason, revision, generation, failures_json) = row
    try:
        plan = _plan_of(str(plan_json))
        failures = tuple(FailureNote(str(f[0]), int(f[1]), int(f[2]), str(f[3]), float(f[4]))
                         for f in json.loads(failures_json))
    except (ValueError, TypeError, IndexError, RequestError) as exc:
        raise StorageError(f"rollout {rollout_id}: corrupt plan or failures: {exc}") from exc
    stages = {int(r[0]): StageCounters(*(int(v) for v in r[1:])) for r in stage_rows}
    counters = tuple(stages.get(i, StageCounters()) for i in range(len(plan.stage_names)))
    return RolloutState(str(rollout_id), str(product), str(version), int(counter), plan,
                        str(phase), int(stage), float(stage_started_at), float(created_at),
                        counters, str(halt_reason), int(generation), failures,
                        revision=int(revision))


@functools.lru_cache(maxsize=256)
def _plan_of(plan_json: str) -> RolloutPlan:
    """A stored plan, parsed and validated once per distinct text (a rollout is read
    at every check-in and report of its product; plans are frozen values)."""
    return RolloutPlan.from_json(json.loads(plan_json))


def _failures_to_json(failures: Sequence[FailureNote]) -> str:
    return json.dumps([[f.device_id, f.stage, f.status, f.message, f.at] for f in failures])


def _write_stages(conn: Connection, state: RolloutState) -> None:
    conn.executemany(
        f"INSERT INTO rollout_stages (rollout_id, stage, {', '.join(_STAGE_FIELDS)})"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (rollout_id, stage) DO UPDATE SET "
        + ", ".join(f"{f} = excluded.{f}" for f in _STAGE_FIELDS),
        [(state.rollout_id, i, *(getattr(c, f) for f in _STAGE_FIELDS))
         for i, c in enumerate(state.counters)])


def _of_product(select: str, product: str | None, order_by: str) -> tuple[str, tuple[str, ...]]:
    """``select`` restricted to ``product`` when given, ordered: ``(sql, params)``."""
    if product is None:
        return f"{select} ORDER BY {order_by}", ()
    return f"{select} WHERE product = ? ORDER BY {order_by}", (product,)


def _insert_audit(conn: Connection, entries: Sequence[AuditEntry]) -> None:
    conn.executemany(
        "INSERT INTO audit (at, actor, action, target, outcome, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(e.at, e.actor, e.action, e.target, e.outcome, e.detail) for e in entries])


def _row_to_release(row: Sequence[Any], swarms: list[SwarmInfo]) -> Release:
    product, version, counter, target, _, update_type, component, payloads_json = row
    try:
        payloads = tuple(PayloadSummary(str(p["kind"]), str(p["encoding"]), int(p["size"]),
                                        str(p["sha256"]), p.get("base_sha256"))
                         for p in json.loads(payloads_json))
        return Release(str(product), str(version), int(counter), str(target), tuple(swarms),
                       str(update_type), None if component is None else str(component),
                       payloads)
    except (RequestError, ValueError, TypeError, KeyError) as exc:
        raise StorageError(f"corrupt release row {product!r} {version!r}: {exc}") from exc


def _row_to_swarm(row: Sequence[Any]) -> SwarmInfo:
    try:
        return SwarmInfo(str(row[0]), str(row[1]), str(row[2]), str(row[3]))
    except RequestError as exc:
        raise StorageError(f"corrupt swarm row {row!r}: {exc}") from exc


def _insert_swarms(conn: Connection, swarms: list[SwarmInfo]) -> None:
    conn.executemany(
        "INSERT INTO swarms (info_hash, announce_hash, product, version, payload_kind) "
        "VALUES (?, ?, ?, ?, ?)",
        [(s.info_hash, s.announce_hash, s.product, s.version, s.payload_kind)
         for s in swarms],
    )



def split_statements(script: str) -> list[str]:
    """The statements of a migration script (``;`` ends each; none holds one)."""
    return [statement for statement in script.split(";") if statement.strip()]


def migrate(conn: Connection, steps: Sequence[tuple[int, str]], found: object,
            describe: str, split: Callable[[str], Iterable[str]] = split_statements
            ) -> None:
    """Bring a database whose ``schema_version`` is ``found`` (0: a new, empty one) to
    :data:`~tracker.store.SCHEMA_VERSION`, inside the caller's transaction: run each
    ``(version, script)`` of ``steps`` (in order; the script takes the database to
    that version) above ``found``, then record the version. ``split`` cuts a script
    into statements.

    Raises:
        StorageError: ``found`` is not a version this code knows (a newer schema).
    """
    if not (isinstance(found, int) and 0 <= found <= SCHEMA_VERSION):
        raise StorageError(f"{describe}: tracker schema version {found!r}, this swarmota "
                           f"supports {SCHEMA_VERSION}")
    if steps[-1][0] != SCHEMA_VERSION:
        raise RuntimeError("the migrations do not reach SCHEMA_VERSION")
    for version, script in steps:
        if found < version:
            for statement in split(script):
                conn.execute(statement)
    if found == 0:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif found < SCHEMA_VERSION:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
