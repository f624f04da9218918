"""The tracker's store on PostgreSQL: :class:`PgStore`, for many tracker processes.

The only tracker module that imports ``psycopg`` (psycopg 3); every ``psycopg.Error``
becomes a :class:`~tracker.errors.StorageError`, but a serialization failure or a
deadlock, which are a :class:`~tracker.errors.StaleStateError` (the decision is taken
again). The statements are :mod:`tracker.sql_store`'s (sent with PostgreSQL's own
``$n`` placeholders through raw cursors), but a check-in's reads and writes, which are
one statement here (:meth:`PgStore.check_in`: psycopg's cost is per statement).

Transactions are READ COMMITTED. What keeps concurrent decisions of many processes
from losing updates: a rollout is saved with a compare-and-set on its ``revision``
(a decision that read an older one is rolled back whole and taken again; the retry
locks the ``rollouts`` table against other saves, SHARE ROW EXCLUSIVE, so that it
cannot be stale again: progress under contention, optimism otherwise); request
counters are one conditional upsert; a read-modify-write of one row locks it
(``SELECT ... FOR UPDATE``); a report resent to two processes at once is stored once
(a unique index). Each statement waits at most :data:`LOCK_TIMEOUT_S` for a row lock
and runs at most :data:`STATEMENT_TIMEOUT_S`.

A lost connection (the server restarted, the network failed) fails the calls made
meanwhile and is opened again by the next call outside a transaction, so the tracker
recovers by itself once the database is back.

Schema: the same tables and columns as SQLite's (version
:data:`~tracker.store.SCHEMA_VERSION`), created by :data:`_MIGRATIONS`, this engine's
one source of truth (a new database runs it whole; a later version appends a step).
Text columns compare byte-wise (``COLLATE "C"``), as in SQLite, so listings page the
same way on both. Several processes starting at once migrate one at a time (an
advisory lock).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from swarmota.tracker.errors import StaleStateError, StorageError
from swarmota.tracker.protocol import Release, newer_releases
from swarmota.tracker.rollout import Admission, RolloutState
from swarmota.tracker.sql_store import (
    ADVANCE_COUNTER,
    DEVICE_INSERT,
    DEVICE_UPSERT,
    DEVICE_VALUES,
    ROLLOUT_ADMISSION_SELECT,
    Connection,
    Cursor,
    Dialect,
    SqlStore,
    device_row,
    migrate,
    rollouts_with_admissions,
    split_statements,
)
from swarmota.tracker.store import CheckinRead, redact_url
from swarmota.tracker.wire import CheckIn

__all__ = ["LOCK_TIMEOUT_S", "STATEMENT_TIMEOUT_S", "PgStore"]

LOCK_TIMEOUT_S = 5
"""How long a statement waits for a row lock another transaction holds (SQLite's
busy timeout is the same)."""
STATEMENT_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 5
_MIGRATION_LOCK = 0x5357_4F54  # pg_advisory_xact_lock key: "SWOT"

_T = 'TEXT COLLATE "C"'
_SCHEMA_6 = f"""
CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
CREATE TABLE releases (
    product {_T} NOT NULL,
    version {_T} NOT NULL,
    counter BIGINT NOT NULL,
    target {_T} NOT NULL,
    added_at DOUBLE PRECISION NOT NULL,
    update_type {_T} NOT NULL DEFAULT 'image',
    component {_T},
    payloads_json {_T} NOT NULL DEFAULT '[]',
    UNIQUE (product, version)
);
CREATE UNIQUE INDEX releases_by_counter ON releases (product, coalesce(component, ''), counter);
CREATE TABLE devices (
    device_id {_T} PRIMARY KEY,
    product {_T} NOT NULL,
    hardware_id {_T} NOT NULL,
    version {_T} NOT NULL,
    release_counter BIGINT NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    network_id {_T},
    region {_T},
    labels_json {_T} NOT NULL DEFAULT '[]',
    components_json {_T}
);
CREATE INDEX devices_by_product ON devices (product, version);
CREATE TABLE reports (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id {_T} NOT NULL,
    product {_T} NOT NULL,
    from_version {_T} NOT NULL,
    to_version {_T} NOT NULL,
    status INTEGER NOT NULL,
    message {_T} NOT NULL,
    bytes_origin BIGINT NOT NULL,
    bytes_peers BIGINT NOT NULL,
    timings_json {_T} NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    report_id {_T},
    log_tail {_T} NOT NULL DEFAULT ''
);
CREATE INDEX reports_by_device ON reports (device_id, id);
CREATE UNIQUE INDEX reports_by_report_id ON reports (device_id, report_id)
    WHERE report_id IS NOT NULL;
CREATE INDEX reports_by_time ON reports (received_at);
CREATE TABLE swarms (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    info_hash {_T} NOT NULL,
    announce_hash BYTEA NOT NULL,
    product {_T} NOT NULL,
    version {_T} NOT NULL,
    payload_kind {_T} NOT NULL,
    PRIMARY KEY (info_hash, product, version)
);
CREATE INDEX swarms_by_announce ON swarms (announce_hash);
CREATE INDEX swarms_by_release ON swarms (product, version);
CREATE TABLE rollouts (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    rollout_id {_T} PRIMARY KEY,
    product {_T} NOT NULL,
    version {_T} NOT NULL,
    counter BIGINT NOT NULL,
    plan_json {_T} NOT NULL,
    phase {_T} NOT NULL,
    stage INTEGER NOT NULL,
    stage_started_at DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    halt_reason {_T} NOT NULL,
    revision BIGINT NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 1,
    failures_json {_T} NOT NULL DEFAULT '[]',
    UNIQUE (product, version, generation)
);
CREATE TABLE rollout_stages (
    rollout_id {_T} NOT NULL,
    stage INTEGER NOT NULL,
    admitted BIGINT NOT NULL,
    downloading BIGINT NOT NULL,
    succeeded BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    rolled_back BIGINT NOT NULL,
    bytes_origin BIGINT NOT NULL,
    bytes_peers BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, stage)
);
CREATE TABLE rollout_devices (
    rollout_id {_T} NOT NULL,
    device_id {_T} NOT NULL,
    stage INTEGER NOT NULL,
    status {_T} NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    code INTEGER,
    message {_T} NOT NULL DEFAULT '',
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id);
CREATE TABLE admin_tokens (
    token_hash {_T} PRIMARY KEY,
    name {_T} NOT NULL,
    role {_T} NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION
);
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    actor {_T} NOT NULL,
    action {_T} NOT NULL,
    target {_T} NOT NULL,
    outcome {_T} NOT NULL,
    detail {_T} NOT NULL
);
CREATE INDEX audit_by_time ON audit (at);
CREATE TABLE device_counters (
    device_id {_T} PRIMARY KEY,
    counter BIGINT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    cert_sha256 {_T}
);
CREATE TABLE device_certificates (
    device_id {_T} NOT NULL,
    cert_sha256 {_T} NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, cert_sha256)
);
CREATE TABLE revoked_certificates (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    cert_sha256 {_T} PRIMARY KEY,
    device_id {_T} NOT NULL,
    revoked_at DOUBLE PRECISION NOT NULL,
    actor {_T} NOT NULL,
    reason {_T} NOT NULL
);
CREATE TABLE device_tags (
    device_id {_T} NOT NULL,
    tag {_T} NOT NULL,
    added_at DOUBLE PRECISION NOT NULL,
    actor {_T} NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_by_tag ON device_tags (tag)
"""
_SCHEMA_7 = f"""
CREATE TABLE secrets (
    name {_T} PRIMARY KEY,
    value BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
)
"""
_MIGRATIONS: tuple[tuple[int, str], ...] = ((6, _SCHEMA_6), (7, _SCHEMA_7))
"""The one source of truth of the PostgreSQL schema: ``(version, script)`` in order;
the script takes a database to that version (the first, from nothing to 6: this engine
started at schema 6). A new database runs them all."""

_DIALECT = Dialect(
    rowid="seq",
    label_match=("EXISTS (SELECT 1 FROM jsonb_array_elements_text(d.labels_json::jsonb) "
                 "AS l(v) WHERE l.v = ?)"),
    for_update=" FOR UPDATE",
    id_contains="strpos(d.device_id, ?) > 0")


_CATALOGUE_PRODUCTS = 256
"""Products whose releases one store keeps in memory (:meth:`PgStore.check_in`)."""


_DEVICE_SLOTS = ("device", "product", "hardware", "version", "counter", "now", "network",
                 "region", "labels", "components")
"""The names of :func:`~tracker.sql_store.device_row`'s values, in order."""


@functools.lru_cache(maxsize=4)
def _checkin_sql(signed: bool, certified: bool) -> tuple[str, tuple[str, ...]]:
    """A check-in in one statement (:meth:`PgStore.check_in`): the request counter's
    compare-and-set (``signed``), the certificate (``certified``) and the device's row,
    written only if the counter was accepted; and what the decision reads, in one row
    per stage of each newer release's rollout (at least one row): whether the counter
    was accepted, the stored one, the device's tags, the product's release count, then
    :data:`~tracker.sql_store.ROLLOUT_ADMISSION_SELECT`'s columns (``NULL`` when
    none). Returns the statement, each value given once (``$1``, ``$2``...), and the
    names of its values in order."""
    accepted = f"{ADVANCE_COUNTER} RETURNING 1" if signed else "SELECT 1"
    slots = ["device", "request", "now", "cert"] if signed else []
    cert = ""
    if certified:
        cert = ("cert AS (INSERT INTO device_certificates (device_id, cert_sha256, "
                "first_seen) SELECT ?, ?, ? FROM accepted ON CONFLICT DO NOTHING), ")
        slots += ["device", "cert", "now"]
    slots += [*_DEVICE_SLOTS, "device", "device", "product", "device", "product", "versions"]
    sql = (f"WITH accepted AS ({accepted}), {cert}"
           f"device AS ({DEVICE_INSERT} SELECT {DEVICE_VALUES} FROM accepted{DEVICE_UPSERT}) "
           "SELECT h.accepted, h.floor, h.tags, h.releases, x.* FROM (SELECT "
           "(SELECT count(*) FROM accepted) AS accepted, "
           "(SELECT counter FROM device_counters WHERE device_id = ?) AS floor, "
           "(SELECT array_agg(tag ORDER BY tag) FROM device_tags WHERE device_id = ?) "
           "AS tags, (SELECT count(*) FROM releases WHERE product = ?) AS releases) h "
           f"LEFT JOIN ({ROLLOUT_ADMISSION_SELECT} WHERE r.rollout_id IN (SELECT DISTINCT "
           "ON (version) rollout_id FROM rollouts WHERE product = ? AND "
           "version = ANY(?::text[]) ORDER BY version, generation DESC)) x ON true")
    parts = sql.split("?")
    if len(parts) != len(slots) + 1:
        raise RuntimeError("the check-in statement's values and names differ")
    names = tuple(dict.fromkeys(slots))
    return (parts[0] + "".join(f"${names.index(slot) + 1}{part}"
                               for slot, part in zip(slots, parts[1:], strict=True)), names)


@functools.lru_cache(maxsize=1024)
def _pg(sql: str) -> str:
    """A statement with ``?`` placeholders in PostgreSQL's own (``$1``, ``$2``...),
    which psycopg's raw cursors pass as they are (no query parsing per statement)."""
    parts = sql.split("?")
    return parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))


class _Connection:
    """A ``psycopg.Connection`` (autocommit: transactions are explicit) as
    :class:`~tracker.sql_store.Connection`.

    Inside a transaction it is in pipeline mode (:meth:`enter_pipeline`): statements
    are sent without waiting for their results, and the first result read (a fetch,
    a row count) waits for all of them at once, so a decision's writes and the reads
    queued after them cost one network round trip, not one each."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn
        self._pipelined: contextlib.AbstractContextManager[psycopg.Pipeline] | None = None
        self.pipeline: psycopg.Pipeline | None = None
        self.pending = False
        """Statements sent in pipeline mode whose results were not waited for yet."""
        self.last: _Pipelined | None = None  # the last statement sent in pipeline mode

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cursor = self.raw.execute(_pg(sql), params)
        if self.pipeline is None:
            return cursor
        self.pending = True
        self.last = _Pipelined(cursor, self)
        return self.last

    def sync(self) -> None:
        """Wait for the results of the statements sent in pipeline mode (raising the
        first error); nothing to do when none is pending."""
        if self.pipeline is not None and self.pending:
            self.pipeline.sync()
        self.pending = False

    def enter_pipeline(self) -> None:
        self._pipelined = self.raw.pipeline()
        self.pipeline = self._pipelined.__enter__()
        self.pending = False

    def exit_pipeline(self, *, failed: bool) -> None:
        """Leave pipeline mode: wait for every queued result (raising the first error),
        or, ``failed``, drop them (errors swallowed: the transaction is rolled back)."""
        pipelined, self._pipelined, self.pipeline = self._pipelined, None, None
        self.pending = False
        if pipelined is None:
            return
        if not failed:
            pipelined.__exit__(None, None, None)
            return
        with contextlib.suppress(psycopg.Error):
            pipelined.__exit__(psycopg.Error, psycopg.Error(), None)

    def clear_error(self) -> None:
        """After an error: end the aborted part of the pipeline, so that the next
        statement (a rollback to a savepoint) runs."""
        if self.pipeline is not None:
            with contextlib.suppress(psycopg.Error):
                self.pipeline.sync()
            self.pending = False

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with self.raw.cursor() as cursor:
                cursor.executemany(_pg(sql), rows)
            if self.pipeline is not None:
                self.pending, self.last = True, None


class _Pipelined:
    """A cursor of a statement sent in pipeline mode: reading its rows or its row count
    waits for it (and for every statement sent before it)."""

    def __init__(self, cursor: psycopg.Cursor[Any], conn: _Connection) -> None:
        self._cursor = cursor
        self._conn = conn

    @property
    def rowcount(self) -> int:
        if self._cursor.rowcount < 0:
            self._conn.sync()
        return self._cursor.rowcount

    def fetchone(self) -> Any:
        row = self._cursor.fetchone()
        self._waited()
        return row

    def fetchall(self) -> list[Any]:
        rows = self._cursor.fetchall()
        self._waited()
        return rows

    def _waited(self) -> None:
        """Results come in order: once the last statement sent has its rows, every
        statement before it is done too."""
        if self._conn.last is self:
            self._conn.pending = False


class PgStore(SqlStore):
    """:class:`~tracker.store.Store` on a PostgreSQL database, through one connection.

    ``PgStore(url)`` connects (``postgresql://user:password@host:port/dbname?...``,
    any libpq connection URL), creates the tables in a new database and checks the
    schema version of an existing one. The database itself must exist (``createdb``).
    ``clock`` (epoch seconds) only dates releases added without ``now``. Thread-safe
    (one internal lock, held for a whole :meth:`atomic` block). A context manager that
    closes the store on exit.

    Raises:
        StorageError: the server cannot be reached, refuses the login, the database is
            another application's, or from a newer schema.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(_DIALECT, redact_url(url), clock)
        self.url = url
        self._conn: _Connection | None = None
        self._exclusive_next = False
        self._catalogue: OrderedDict[str, list[Release]] = OrderedDict()
        conn = self._open_connection()
        try:
            self._setup(conn)
        except psycopg.Error as exc:
            self._close_connection()
            raise StorageError(f"cannot open tracker database {self.describe}: {exc}"
                               ) from exc
        except BaseException:
            self._close_connection()
            raise

    def __enter__(self) -> PgStore:
        return self

    def database_bytes(self) -> int:
        """The size of the database on disk (``pg_database_size``), in bytes."""
        with self._connection("read the database size") as conn:
            return int(conn.execute("SELECT pg_database_size(current_database())"
                                    ).fetchone()[0])

    def check_in(self, checkin: CheckIn, now: float, *, counter: int | None = None,
                 cert_sha256: str | None = None) -> CheckinRead:
        """One statement (:func:`_checkin_sql`), psycopg's cost being per statement;
        the newer releases come from the product's releases kept in memory (releases
        are never changed nor removed), checked against the count the statement reads:
        a release registered since (by any process) is read with a second one."""
        with self._transaction("record check-in") as conn:
            known = self._catalogue.get(checkin.product, [])
            newer = newer_releases(checkin, known)
            device_id = checkin.device_id
            values: dict[str, Any] = dict(zip(_DEVICE_SLOTS, device_row(checkin, now),
                                              strict=True))
            values.update(request=counter, cert=cert_sha256,
                          versions=[r.version for r in newer])
            sql, names = _checkin_sql(counter is not None, cert_sha256 is not None)
            rows = conn.execute(sql, [values[name] for name in names]).fetchall()
            accepted, floor, tags, count = rows[0][:4]
            if not accepted:
                if floor is None:  # stored by a transaction this statement predates
                    floor = self.device_counter(device_id)
                return CheckinRead(int(floor))
            found: dict[str, tuple[RolloutState | None, Admission | None]] = {
                state.version: (state, admission) for state, admission in
                rollouts_with_admissions([row[4:] for row in rows if row[4] is not None])}
            if count != len(known):
                known = self.releases(checkin.product)
                self._remember_releases(checkin.product, known)
                newer = newer_releases(checkin, known)
                for release in newer:
                    if release.version not in found:
                        found[release.version] = self.rollout_with_admission(
                            release.product, release.version, device_id)
        return CheckinRead(None, tuple((r, *found.get(r.version, (None, None)))
                                       for r in newer), tuple(tags or ()))

    def _remember_releases(self, product: str, releases: list[Release]) -> None:
        catalogue = self._catalogue
        catalogue[product] = releases
        catalogue.move_to_end(product)
        while len(catalogue) > _CATALOGUE_PRODUCTS:
            catalogue.popitem(last=False)

    def _open_connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.raw.closed and not conn.raw.broken:
            return conn
        if conn is not None:
            self._close_connection()
        try:
            raw = psycopg.connect(self.url, autocommit=True, cursor_factory=psycopg.RawCursor,
                                  connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to tracker database {self.describe}: "
                               f"{exc}") from exc
        try:
            raw.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
            raw.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT_S}s'")
        except psycopg.Error as exc:
            raw.close()
            raise StorageError(f"cannot set up the connection to {self.describe}: {exc}"
                               ) from exc
        self._conn = _Connection(raw)
        return self._conn

    def _setup(self, conn: _Connection) -> None:
        """Create or check the schema, one process at a time."""
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
                others = conn.execute(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema = current_schema()").fetchone()[0]
                if others:
                    raise StorageError(f"{self.describe} is a PostgreSQL database but "
                                       "not a tracker's (no schema_version table)")
                version: object = 0
            else:
                version = conn.execute("SELECT max(version) FROM schema_version"
                                       ).fetchone()[0]
            migrate(conn, _MIGRATIONS, version, self.describe, split_statements)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _begin(self, conn: Connection) -> None:
        if isinstance(conn, _Connection):
            conn.enter_pipeline()
        conn.execute("BEGIN")

    def _decision_starts(self, conn: Connection) -> None:
        if self._exclusive_next:
            # The last decision met contention: this one holds off every other
            # process's rollout saves (reads go on) until its transaction ends, so
            # that it cannot be stale again.
            self._exclusive_next = False
            conn.execute("LOCK TABLE rollouts IN SHARE ROW EXCLUSIVE MODE")

    def _contended(self) -> None:
        self._exclusive_next = True

    def _commit(self, conn: Connection) -> None:
        conn.execute("COMMIT")
        if isinstance(conn, _Connection):
            conn.exit_pipeline(failed=False)

    def _decision_ends(self, conn: Connection) -> None:
        if isinstance(conn, _Connection):
            conn.sync()

    def _failed(self, conn: Connection) -> None:
        if isinstance(conn, _Connection):
            conn.clear_error()

    def _rollback(self, conn: Connection) -> None:
        if isinstance(conn, _Connection):
            conn.exit_pipeline(failed=True)
        raw = self._conn.raw if self._conn is not None else None
        if raw is None or raw.closed or raw.broken:
            return
        try:
            raw.execute("ROLLBACK")
        except psycopg.Error:
            self._close_connection()  # opened again by the next call

    def _translate(self, exc: Exception, what: str) -> Exception | None:
        if isinstance(exc, (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)):
            self._contended()
            return StaleStateError(f"{what}: {exc}")
        if isinstance(exc, psycopg.Error):
            return StorageError(f"{what} in {self.describe}: {exc}")
        return None

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.raw.close()
        except psycopg.Error as exc:
            raise StorageError(f"closing {self.describe}: {exc}") from exc

