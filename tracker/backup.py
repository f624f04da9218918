"""Backups of the tracker's SQLite database: a consistent copy of a live database, and
its restore into a stopped (or new) tracker.

:func:`backup_database` copies the database with SQLite's online backup API in one step:
one read transaction, so the copy is a consistent snapshot even while the tracker writes
(in WAL mode readers never block writers; a tracker keeps serving). The copy is checked
(``PRAGMA integrity_check``, the schema version), made self-contained (rollback journal
mode, no ``-wal`` file), fsynced and renamed into place: a crash leaves no half backup.

:func:`restore_database` checks a backup the same way and puts it in place of a database
only if no process has that database open (a running tracker keeps in-memory state, such
as announce windows and revocation sets, that a swap under it would contradict: stop it
first), and only if the database is empty or absent, unless ``force``. The old database
is held under an exclusive lock while the backup is copied beside it and renamed over
it, so a tracker starting meanwhile waits and then opens the restored one.

Pure functions over ``sqlite3`` and files: nothing of the running tracker is used. What
a backup holds: releases, rollouts and their stages and admitted devices, devices,
reports, swarms, admin tokens (hashed), the audit log, device request counters and
certificates, revocations. Every failure is a :class:`BackupError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from swarmota.infra.fsio import fsync_dir
from swarmota.tracker.errors import StorageError
from swarmota.tracker.store import SCHEMA_VERSION

__all__ = ["BackupError", "BackupInfo", "backup_database", "inspect_backup",
           "restore_database"]



class BackupError(StorageError):
    """A backup or restore cannot be made as asked (the message says why)."""


@dataclass(frozen=True)
class BackupInfo:
    """What a backup (or a database) holds: schema version, rows of the main tables,
    size and SHA-256 of the file."""

    path: Path
    schema_version: int
    rows: dict[str, int]
    size_bytes: int
    sha256: str

    def summary(self) -> str:
        rows = ", ".join(f"{n} {t}" for t, n in self.rows.items() if n) or "no rows"
        return (f"{self.path}: schema {self.schema_version}, {rows}; {self.size_bytes} bytes, "
                f"sha256 {self.sha256[:16]}")


def backup_database(db: Path, out: Path, *, overwrite: bool = False) -> BackupInfo:
    """Copy the live database ``db`` to ``out`` (consistent, checked, atomic).

    Raises:
        BackupError: ``db`` is missing or not a tracker database, ``out`` exists (without
            ``overwrite``), or the copy fails or does not check.
    """
    db, out = Path(db), Path(out)
    if not db.is_file():
        raise BackupError(f"{db} does not exist")
    if out.exists() and not overwrite:
        raise BackupError(f"{out} exists; refusing to overwrite a backup")
    with _temp_beside(out) as tmp:
        try:
            with _connect(f"file:{db}?mode=ro", uri=True) as src, _connect(tmp) as dst:
                src.backup(dst)  # all pages in one step: one read transaction
                dst.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.Error as exc:
            raise BackupError(f"cannot back up {db}: {exc}") from exc
        info = inspect_backup(tmp)
        _fsync(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    return BackupInfo(out, info.schema_version, info.rows, info.size_bytes, info.sha256)


def inspect_backup(path: Path) -> BackupInfo:
    """Check a backup (or any tracker database file) and say what it holds.

    Raises:
        BackupError: unreadable, corrupt (``integrity_check``), not a tracker database,
            or of a schema newer than this tracker supports.
    """
    path = Path(path)
    try:
        with _connect(f"file:{path}?mode=ro", uri=True) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                raise BackupError(f"{path} is corrupt: {check[:3]}")
            if "schema_version" not in _tables(conn):
                raise BackupError(f"{path} is not a tracker database (no schema_version)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else None
            rows = _row_counts(conn)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read {path}: {exc}") from exc
    except UnicodeDecodeError:  # SQLite's message quotes damaged bytes that are not UTF-8
        raise BackupError(f"{path} is corrupt (damaged schema or pages)") from None
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise BackupError(f"{path} has schema version {version!r}; this tracker supports "
                          f"1..{SCHEMA_VERSION}")
    size, sha = _size_and_sha256(path)
    return BackupInfo(path, version, rows, size, sha)


def restore_database(backup: Path, db: Path, *, force: bool = False) -> BackupInfo:
    """Put the backup ``backup`` in place of the database ``db`` (see the module
    docstring); return what was restored.

    Raises:
        BackupError: the backup does not check; ``db`` is open in another process (a
            running tracker); ``db`` holds data and ``force`` is not set; the copy fails.
    """
    backup, db = Path(backup), Path(db)
    info = inspect_backup(backup)
    with _exclusive(db) as held:
        if held and not force:
            raise BackupError(f"{db} already holds data ({held}); restore over it only "
                              "with --force (back it up first)")
        with _temp_beside(db) as tmp:
            try:
                with _connect(f"file:{backup}?mode=ro", uri=True) as src, \
                        _connect(tmp) as dst:
                    src.backup(dst)
                    dst.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.Error as exc:
                raise BackupError(f"cannot copy {backup}: {exc}") from exc
            _fsync(tmp)
            os.replace(tmp, db)
            fsync_dir(db.parent)
    return BackupInfo(db, info.schema_version, info.rows, info.size_bytes, info.sha256)


# --- helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def _connect(target: str | Path, *, uri: bool = False) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(target, uri=uri, isolation_level=None, timeout=5.0)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def _exclusive(db: Path) -> Iterator[str]:
    """Hold ``db`` (if it exists) exclusively: no other connection may be open (a
    running tracker) and none may start a transaction until the block ends. Yields a
    description of the data it holds ("" when empty or absent)."""
    if not db.parent.is_dir():
        raise BackupError(f"directory {db.parent} does not exist")
    if not db.exists() or db.stat().st_size == 0:
        yield ""
        return
    try:
        conn = sqlite3.connect(db, isolation_level=None, timeout=0)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {db}: {exc}") from exc
    try:
        try:
            # leaving WAL mode needs every other connection closed: a running tracker
            # (any process with the database open) makes this fail at once
            conn.execute("PRAGMA journal_mode = DELETE").fetchone()
            conn.execute("BEGIN EXCLUSIVE")
            counts = _row_counts(conn)
        except sqlite3.OperationalError as exc:
            raise BackupError(f"{db} is in use (a running tracker?): stop it before "
                              f"restoring ({exc})") from exc
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{db} is not a database; move it away first ({exc})") from exc
        yield ", ".join(f"{n} {t}" for t, n in counts.items() if n)
    finally:
        conn.close()


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows of every table but ``schema_version`` and SQLite's own, by name."""
    out = {}
    for table in sorted(_tables(conn) - {"schema_version"}):
        if table.startswith("sqlite_"):
            continue
        quoted = '"' + table.replace('"', '""') + '"'
        out[table] = int(conn.execute(f"SELECT count(*) FROM {quoted}").fetchone()[0])
    return out


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A fresh temporary file name in ``path``'s directory, removed unless renamed."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise BackupError(f"cannot write in {path.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # sqlite creates it
    try:
        yield tmp
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _size_and_sha256(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BackupError(f"cannot write {path}: {exc.strerror or exc}") from exc
