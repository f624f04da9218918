"""Tracker storage: the :class:`Store` interface, the records it stores, and
:func:`open_store`, which opens one by URL.

Two implementations share every statement (:mod:`tracker.sql_store`, one
:class:`~tracker.sql_store.SqlStore` with a small dialect per engine):

- :class:`~tracker.sqlite_store.SqliteStore` (``sqlite:///PATH``, or a bare path: the
  default, embedded; one file, WAL; several processes on one host may share it);
- :class:`~tracker.pg_store.PgStore` (``postgresql://...``): a PostgreSQL database
  that many tracker processes on many hosts share.

All methods are blocking. An async caller runs them in a worker thread
(``trio.to_thread.run_sync``) and should allow one such thread at a time
(``limiter=trio.CapacityLimiter(1)``), since a store has one connection; the stores
serialise calls with an internal lock anyway.

Time is passed in: ``now`` arguments (seconds since the epoch), or for
``add_release`` without ``now`` the ``clock`` given to the store.

**Transactions.** Each method is one transaction. :meth:`Store.atomic` groups several
into one: the tracker's director decides a check-in, a report or an admin action inside
one, so another process sharing the database never sees half of it. Rollouts are saved
with a compare-and-set on their ``revision``; a decision that read a rollout another
process saved since, or that the engine could not serialise (PostgreSQL: a
serialization failure or a deadlock), raises :class:`~tracker.errors.StaleStateError`
with nothing written, and is taken again on a fresh read
(:func:`tracker.director.retry_stale`). Request counters are one compare-and-set
statement. So no update is lost, whichever processes share the database.

**Schema.** Version :data:`SCHEMA_VERSION`. Each engine has one source of truth, a
list of migrations that a new database runs from version 0 and an older one runs from
where it stands, in one transaction (``_MIGRATIONS`` in each module); the tables and
columns are the same, described in docs/ARCHITECTURE.md ("Storage").

Errors: every engine error becomes a :class:`~tracker.errors.StorageError` (or
``StaleStateError``); request errors are :class:`~tracker.errors.RequestError` and its
subclasses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from swarmota.tracker.bittorrent import SwarmInfo
from swarmota.tracker.errors import ConfigError
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import Admission, RolloutState
from swarmota.tracker.wire import CheckIn, ComponentVersion, Report

__all__ = ["MAX_PAGE", "SCHEMA_VERSION", "AuditEntry", "CheckinRead", "DeviceFilter",
           "DeviceRecord",
           "RevokedCertificate", "RolloutDevice", "Store", "StoredReport", "TokenRecord",
           "is_postgresql_url", "open_store", "redact_url", "sqlite_path"]

MAX_PAGE = 1000
"""The most rows one listing call returns (devices, reports, admissions)."""

SCHEMA_VERSION = 7
"""The schema version both engines' databases are brought to."""

_POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite://"


@dataclass(frozen=True)
class StoredReport:
    """A report as stored: its row id and arrival time (epoch s), then what the device sent.

    The fields after ``received_at`` are those of :class:`~tracker.wire.Report`
    (``device_report_id`` is the wire's ``report_id``, the device's name for it).
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
    device_report_id: str | None = None
    log_tail: str = ""

    @classmethod
    def from_report(cls, report_id: int, received_at: float, report: Report) -> StoredReport:
        return cls(report_id, received_at, report.device_id, report.product,
                   report.from_version, report.to_version, report.status, report.message,
                   report.bytes_origin, report.bytes_peers, dict(report.timings_s),
                   report.report_id, report.log_tail)

    @property
    def report(self) -> Report:
        """What the device sent."""
        return Report(self.device_id, self.product, self.from_version, self.to_version,
                      self.status, self.message, self.bytes_origin, self.bytes_peers,
                      dict(self.timings_s), self.device_report_id, self.log_tail)


@dataclass(frozen=True)
class DeviceRecord:
    """What the tracker knows of a device: what it said at its latest check-in (or, for
    ``version`` and ``release_counter``, what its latest successful report installed,
    whichever is newer), when it was last heard of (``last_seen``, epoch s), and the
    ``tags`` operators gave it."""

    device_id: str
    product: str
    hardware_id: str
    version: str
    release_counter: int
    last_seen: float
    network_id: str | None = None
    region: str | None = None
    labels: tuple[str, ...] = ()
    components: tuple[ComponentVersion, ...] | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices a listing returns (every field optional, all must hold).

    ``group``: a label the device declares or a tag an operator gave it;
    ``rollout_id`` (and ``status``, one of :data:`tracker.rollout.DEVICE_STATUSES`):
    devices admitted to that rollout (in that status); ``seen_before`` /
    ``seen_after``: last heard of before / at or after (epoch s); ``after``: device ids
    after this one (the next page); ``search``: device ids containing this text.
    """

    product: str | None = None
    version: str | None = None
    group: str | None = None
    rollout_id: str | None = None
    status: str | None = None
    seen_before: float | None = None
    seen_after: float | None = None
    after: str | None = None
    search: str | None = None


@dataclass(frozen=True)
class RolloutDevice:
    """A device's admission to a rollout, with the rollout's release (its history)."""

    rollout_id: str
    product: str
    version: str
    generation: int
    admission: Admission


@dataclass(frozen=True)
class CheckinRead:
    """What a check-in's decision reads (:meth:`Store.check_in`).

    Attributes:
        replay_floor: the device's stored request counter when the check-in's was not
            above it (a replay: nothing was written, nothing else read); else ``None``.
        candidates: every registered release newer than what the device runs
            (:func:`~tracker.protocol.newer_releases`, in offer order), with its latest
            rollout (``None``: none) and the device's admission to it (``None``: none).
        tags: the device's operator tags when the engine read them along (``None``:
            not read; ask :meth:`Store.device`).
    """

    replay_floor: int | None
    candidates: tuple[tuple[Release, RolloutState | None, Admission | None], ...] = ()
    tags: tuple[str, ...] | None = None


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
    """Storage of the release catalogue, devices, reports, rollouts and the control
    plane (blocking). Every method is a transaction of its own unless called inside
    :meth:`atomic`."""

    def atomic(self, what: str) -> AbstractContextManager[None]:
        """One transaction around every call made inside (by this thread): committed
        when the block ends, rolled back (nothing written) when it raises. ``what``
        names it in errors. Nested blocks join the outer one."""
        ...

    def batch(self, what: str) -> AbstractContextManager[None]:
        """One transaction around several decisions (group commit: one commit, one
        flush to disk, for all): inside it, each :meth:`atomic` block and each write
        method called outside one is a savepoint, undone alone when it raises while the
        others are kept. Nothing of the batch is durable before the block ends; if the
        commit fails (StorageError), none of it was kept."""
        ...

    # --- releases -----------------------------------------------------------------------

    def add_release(self, release: Release, now: float | None = None) -> bool:
        """Register ``release`` and its swarms at ``now`` (default: the store's clock).

        Returns ``True`` if added, ``False`` if exactly this release was already there.
        Registering a known release again adds the swarms it did not have yet (and
        returns ``True`` if there were any). A payload may serve several releases (a
        byte-identical image republished under a higher counter): they share its swarm.

        Raises:
            ReleaseConflictError: another release holds its version, or its counter in
                the same sequence (the image's, or the same component's); or one of its
                info-hashes shares its 20-byte announce form with another info-hash.
            StorageError: the database failed.
        """
        ...

    def release(self, product: str, version: str) -> Release | None:
        """One registered release, if it is registered."""
        ...

    def releases(self, product: str | None = None) -> list[Release]:
        """Registered releases (of ``product`` if given), by product then counter."""
        ...

    def registered_releases(self, product: str | None = None) -> list[tuple[Release, float]]:
        """Like :meth:`releases`, with when each was registered (epoch s)."""
        ...

    def swarms_of(self, announce_hash: bytes) -> list[SwarmInfo]:
        """The registered swarms announced as ``announce_hash`` (20 bytes): one per
        release its payload serves (the same info-hash), none if unknown."""
        ...

    def swarms(self, product: str | None = None) -> list[SwarmInfo]:
        """Registered swarms (of ``product`` if given), by product, version, then order
        of registration."""
        ...

    # --- devices and reports --------------------------------------------------------------

    def record_checkin(self, checkin: CheckIn, now: float) -> None:
        """Remember what the device runs, with ``last_seen = now``."""
        ...

    def check_in(self, checkin: CheckIn, now: float, *, counter: int | None = None,
                 cert_sha256: str | None = None) -> CheckinRead:
        """A check-in's reads and writes, in one transaction (part of the caller's, in
        :meth:`atomic`): with ``counter`` (a signed request), :meth:`advance_counter`
        first (refused: :attr:`CheckinRead.replay_floor`, nothing written); then
        :meth:`record_checkin`, and the newer releases with their rollouts and the
        device's admissions (:meth:`rollout_with_admission`), as
        :class:`CheckinRead`. Sees every release registered before it (by any
        process). An engine may do it all in one statement."""
        ...

    def record_installed(self, device_id: str, release: Release, now: float) -> None:
        """A report says ``device_id`` installed ``release``: the inventory follows
        (its version and counter, or its component's), unless it is not known."""
        ...

    def devices(self, where: DeviceFilter | None = None, *,
                limit: int | None = None) -> list[DeviceRecord]:
        """Devices matching ``where`` (default: all), by device id, at most ``limit``."""
        ...

    def device(self, device_id: str) -> DeviceRecord | None:
        """What the tracker knows of ``device_id``, if it ever checked in."""
        ...

    def count_devices(self, product: str | None = None, *,
                      seen_before: float | None = None) -> dict[tuple[str, str], int]:
        """Devices per (product, version) (``seen_before``: only those last heard of
        before it, epoch s)."""
        ...

    def set_tags(self, device_id: str, add: Sequence[str], remove: Sequence[str],
                 actor: str, now: float, audit: Sequence[AuditEntry] = ()) -> tuple[str, ...]:
        """Add and remove operator tags of a known device; return its tags.

        Raises:
            RequestError: the device never checked in.
        """
        ...

    def add_report(self, report: Report, now: float) -> tuple[int, bool]:
        """Store ``report`` received at ``now``: ``(its id, True)``; a report whose
        ``report_id`` this device sent before is not stored again: ``(the first one's
        id, False)``."""
        ...

    def reports(self, device_id: str | None = None, *, product: str | None = None,
                status: int | None = None, before_id: int | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[StoredReport]:
        """Stored reports (filtered), oldest first (``newest_first``: the reverse),
        those with an id below ``before_id``, at most ``limit``."""
        ...

    def report_totals(self) -> tuple[dict[int, int], int, int]:
        """Reports per status, and the bytes from the origin and from peers they sum."""
        ...

    def report_counts(self, since: float) -> dict[tuple[str, int], int]:
        """Reports received at or after ``since`` (epoch s) per (product, status)."""
        ...

    def prune_reports(self, before: float) -> int:
        """Drop reports received before ``before`` (retention); return how many."""
        ...

    # --- server secrets (schema 7) ----------------------------------------------------

    def secret(self, name: str, make: Callable[[], bytes], now: float) -> bytes:
        """The server secret ``name`` (e.g. the announce keys' one). The first caller
        stores ``make()``'s bytes; every later one, in any process sharing the
        database, reads the same."""
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

    def device_counter(self, device_id: str) -> int | None:
        """The last counter accepted from ``device_id`` by :meth:`advance_counter`."""
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

    # --- rollouts -------------------------------------------------------------------------

    def create_rollout(self, state: RolloutState, audit: Sequence[AuditEntry] = ()) -> None:
        """Store a new rollout (and audit entries) in one transaction. Its
        ``generation`` must be the release's next: 1, or one more than its latest
        rollout's, which must have halted or been aborted.

        Raises:
            RequestError: its release is not registered.
            ConflictError: the release has a rollout that is not halted or aborted, or
                ``state.generation`` is not the next one.
            StorageError: the database failed.
        """
        ...

    def rollouts(self, product: str | None = None, *,
                 history: bool = False) -> list[RolloutState]:
        """The latest rollout of each release (of ``product`` if given), by product then
        release counter; ``history``: every generation, oldest first per release."""
        ...

    def rollout_of(self, product: str, version: str) -> RolloutState | None:
        """The latest rollout of one release, if it has one."""
        ...

    def rollout_with_admission(self, product: str, version: str, device_id: str
                               ) -> tuple[RolloutState | None, Admission | None]:
        """:meth:`rollout_of` and ``device_id``'s :meth:`admission` to it, in one read
        (the hot paths: check-ins, reports, the swarm gate)."""
        ...

    def rollout(self, rollout_id: str) -> RolloutState | None:
        """The rollout with this id, if any."""
        ...

    def admission(self, rollout_id: str, device_id: str) -> Admission | None:
        """A device's admission record in a rollout, if it was admitted."""
        ...

    def admissions(self, rollout_id: str, *, status: str | None = None,
                   after: str | None = None, limit: int | None = None) -> list[Admission]:
        """The devices admitted to a rollout (in ``status``), by device id, after
        ``after``, at most ``limit``."""
        ...

    def admissions_of(self, device_id: str) -> list[RolloutDevice]:
        """Every rollout ``device_id`` was admitted to, newest first."""
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

    def __enter__(self) -> Store:
        ...

    def __exit__(self, *exc_info: object) -> None:
        """:meth:`close`."""
        ...


def is_postgresql_url(db: str | Path) -> bool:
    """Whether ``db`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return isinstance(db, str) and db.startswith(_POSTGRESQL_SCHEMES)


def sqlite_path(db: str | Path) -> Path:
    """The file of an SQLite database named by a bare path or a ``sqlite:///PATH`` URL
    (``sqlite:////abs/path`` or ``sqlite:///relative/path``).

    Raises:
        ConfigError: a PostgreSQL URL, another scheme, or an empty path.
    """
    if isinstance(db, Path):
        return db
    if is_postgresql_url(db):
        raise ConfigError(f"{redact_url(db)} is a PostgreSQL URL, not an SQLite file")
    if db.startswith(_SQLITE_SCHEME):
        rest = db[len(_SQLITE_SCHEME):]
        if not rest.startswith("/") or len(rest) < 2:
            raise ConfigError(f"SQLite URL {db!r}: expected sqlite:///PATH")
        return Path(rest[1:])
    if "://" in db:
        raise ConfigError(f"database {redact_url(db)!r}: use a file path, sqlite:///PATH or "
                          "postgresql://...")
    if not db:
        raise ConfigError("empty database path")
    return Path(db)


def open_store(db: str | Path, *, create: bool = True,
               clock: Callable[[], float] = time.time) -> Store:
    """Open the store ``db`` names: a PostgreSQL URL (:class:`~tracker.pg_store.PgStore`)
    or an SQLite file (:class:`~tracker.sqlite_store.SqliteStore`; see
    :func:`sqlite_path`). ``create``: make the SQLite file (and its directory) if
    missing; a PostgreSQL database must exist (its tables are created). ``clock`` dates
    releases added without a time.

    Raises:
        ConfigError: ``db`` is neither.
        StorageError: the database cannot be opened, is another application's, or has a
            newer schema.
    """
    if is_postgresql_url(db):
        from swarmota.tracker.pg_store import PgStore  # psycopg only where PostgreSQL is used
        return PgStore(str(db), clock=clock)
    from swarmota.tracker.sqlite_store import SqliteStore
    return SqliteStore(sqlite_path(db), create=create, clock=clock)


def redact_url(url: str) -> str:
    """``url`` without the password of its user part, for messages."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"

