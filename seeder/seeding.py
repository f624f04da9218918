"""Seeding every published payload over BitTorrent: the seeder is the first peer.

:class:`PayloadSeeder` owns one :class:`peer.swarm.SwarmSession` and keeps it in step
with the origin tree. Each *seedable* payload is a torrent file
``payloads/<payload file>.torrent`` whose payload file ``payloads/<payload file>``
exists (what :func:`seeder.publish.publish_release` writes); it is added in seed mode
(libtorrent trusts the file and verifies each piece lazily, when first uploaded), with
``SeedingConfig.announce_urls`` added to the torrent's own trackers. The torrent's file
name equals the payload's, so the payloads directory is the save directory.

:meth:`PayloadSeeder.rescan` picks up releases published since the last scan and drops
torrents whose payload or torrent file disappeared (or re-adds a torrent whose file was
replaced). :meth:`PayloadSeeder.run` scans once, reports ``started``, then rescans every
``rescan_interval_s`` until cancelled, reading files in worker threads.

Errors: a torrent file that cannot be read, is larger than ``max_torrent_bytes``, is no
v2 single-file torrent, names another file than its payload or another size, or
duplicates a torrent already seeded is logged (``WARNING``, once per version of the
file) and skipped; it never stops the seeder. Only setting up fails loudly:
:class:`seeder.errors.SeederError` when the session cannot listen, ``ValueError`` for a
bad :class:`SeedingConfig`.

Threads: every session call happens on the thread that calls the seeder's methods (the
trio thread under :meth:`run`); only file reads and the final ``close`` of libtorrent
(which waits up to about a second for "stopped" announces) run in worker threads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import trio

from swarmota.peer.swarm import SwarmConfig, SwarmSession, TorrentHandleRef, read_torrent
from swarmota.seeder.errors import SeederError

__all__ = [
    "DEFAULT_RESCAN_INTERVAL_S",
    "MAX_TORRENT_BYTES",
    "PayloadSeeder",
    "RescanResult",
    "SeedingConfig",
    "SeedingStats",
]

DEFAULT_RESCAN_INTERVAL_S: Final = 10.0
# A v2 torrent holds 32 bytes per piece (its piece layer): 64 MiB covers a 32 GiB payload
# in 16 KiB pieces.
MAX_TORRENT_BYTES: Final = 64 * 1024 * 1024
_TORRENT_SUFFIX: Final = ".torrent"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedingConfig:
    """Settings of a :class:`PayloadSeeder`.

    ``swarm``: the libtorrent session (listen address, upload limit; DHT, LSD, UPnP and
    NAT-PMP stay off unless turned on there). ``announce_urls``: tracker announce URLs
    added to every torrent's own (plain http(s), no query string or fragment, as
    :mod:`peer.swarm` requires). ``rescan_interval_s``: how often :meth:`PayloadSeeder.run`
    looks for new or removed payloads. ``max_torrent_bytes``: larger torrent files are
    skipped. ``identity``: the seeder's fleet certificate and key (PEM, role ``seed``),
    its TLS identity in private swarms (SSL torrents; the session then needs
    ``swarm.ssl_listen``). ``torrent_trackers=False`` ignores the trackers written in
    the torrents and announces only to ``announce_urls`` (e.g. the loopback relay of
    :mod:`peer.announce_relay`, which signs the seeder's announces).

    Raises:
        ValueError: an announce URL is not plain http(s), or a number is not positive.
    """

    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    announce_urls: tuple[str, ...] = ()
    rescan_interval_s: float = DEFAULT_RESCAN_INTERVAL_S
    max_torrent_bytes: int = MAX_TORRENT_BYTES
    identity: tuple[bytes, bytes] | None = None
    torrent_trackers: bool = True

    def __post_init__(self) -> None:
        if not self.rescan_interval_s > 0:
            raise ValueError(f"rescan_interval_s must be > 0, not {self.rescan_interval_s}")
        if self.max_torrent_bytes <= 0:
            raise ValueError(f"max_torrent_bytes must be > 0, not {self.max_torrent_bytes}")
        for url in self.announce_urls:
            _check_announce_url(url)


def _check_announce_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"announce URL must be an http(s) URL: {url!r}")
    if "?" in url or "#" in url:
        raise ValueError(f"announce URL must not have a query string or fragment: {url!r}")


@dataclass(frozen=True)
class SeedingStats:
    """Counters of a :class:`PayloadSeeder`.

    ``torrents_seeded`` and ``torrents_skipped`` are the current numbers (skipped:
    torrent files found unusable and not changed since); ``torrents_added`` and
    ``torrents_removed`` count since the start. The byte counters (BitTorrent egress
    since the start, torrents removed since included) are libtorrent's:
    ``bytes_uploaded_payload`` is piece data, ``bytes_uploaded_total`` adds protocol
    overhead. ``peer_connections`` sums the current connections of every torrent (one
    peer downloading two payloads counts twice). After :meth:`PayloadSeeder.close`, the
    numbers at closing time.
    """

    torrents_seeded: int
    torrents_skipped: int
    torrents_added: int
    torrents_removed: int
    rescans: int
    bytes_uploaded_payload: int
    bytes_uploaded_total: int
    peer_connections: int
    upload_rate_bytes_per_s: int


@dataclass(frozen=True)
class RescanResult:
    """What one rescan changed: payload file names added and removed, and torrent file
    names newly skipped (each also logged)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


# A torrent file's identity on disk: a replaced file (atomic rename) gets a new inode.
_Stamp = tuple[int, int, int]


@dataclass(frozen=True)
class _Found:
    """A torrent file whose payload file exists."""

    torrent_path: Path
    payload_name: str
    stamp: _Stamp

    @property
    def torrent_name(self) -> str:
        return self.torrent_path.name


@dataclass(frozen=True)
class _Seeded:
    found: _Found
    ref: TorrentHandleRef


@dataclass(frozen=True)
class _Read:
    """A torrent file's bytes, checked against its payload file, or why not usable."""

    found: _Found
    data: bytes | None
    error: str | None = None


class PayloadSeeder:
    """Seeds every published payload of one origin tree; see the module docstring.

    Create it, then either call :meth:`rescan` yourself or start :meth:`run` in a
    nursery (``await nursery.start(seeder.run)``); :meth:`run` closes the seeder when it
    ends. Otherwise call :meth:`close` (blocks up to ~1-2 s) or :meth:`aclose`. Also a
    context manager. Not thread-safe: one owner calls its methods.
    """

    def __init__(self, origin_dir: Path, config: SeedingConfig | None = None) -> None:
        """Open a session listening on ``config.swarm``'s address; seeds nothing yet.

        Raises:
            SeederError: libtorrent cannot listen there (e.g. an address this host does
                not have). A port in use makes libtorrent try the next ones; see
                :attr:`listen_address` for the port it got.
        """
        self._config = config or SeedingConfig()
        self._payloads_dir = Path(origin_dir) / "payloads"
        self._session = SwarmSession(self._config.swarm)
        self._seeded: dict[str, _Seeded] = {}  # by torrent file name
        self._skipped: dict[str, _Stamp] = {}  # by torrent file name
        self._added = self._removed = self._rescans = 0
        self._uploaded_payload_gone = self._uploaded_total_gone = 0
        self._final: SeedingStats | None = None
        self._scan_lock = trio.Lock()
        port = self._session.listen_port
        if port == 0:
            self._session.close()
            raise SeederError(
                f"cannot listen for BitTorrent peers on {self._config.swarm.listen_interface}"
                f" (use an IP address of this host)")
        self._listen = (self._config.swarm.listen_host, port)

    def __enter__(self) -> PayloadSeeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def payloads_dir(self) -> Path:
        return self._payloads_dir

    @property
    def listen_address(self) -> tuple[str, int]:
        """``(host, port)`` where peers connect (TCP); the port is the bound one."""
        return self._listen

    @property
    def seeded_payloads(self) -> tuple[str, ...]:
        """File names (in :attr:`payloads_dir`) of the payloads being seeded, sorted."""
        return tuple(sorted(s.found.payload_name for s in self._seeded.values()))

    # ------------------------------------------------------------------ scanning

    def rescan(self) -> RescanResult:
        """Bring the seeded set in line with the payloads directory now.

        **Blocks** on the directory listing and torrent file reads (small files; from
        trio, use :meth:`rescan_async`). Unusable torrent files are logged and skipped,
        never raised.

        Raises:
            RuntimeError: the seeder is closed, or :meth:`rescan_async` is under way.
        """
        self._check_open()
        if self._scan_lock.locked():
            raise RuntimeError("a rescan_async() is under way")
        found = _find_torrents(self._payloads_dir)
        if found is None:
            return self._finish_rescan(RescanResult())
        removed = self._drop_stale(found)
        limit = self._config.max_torrent_bytes
        reads = [_read_torrent(f, limit) for f in self._new_torrents(found)]
        return self._finish_rescan(self._add_all(reads, removed))

    async def rescan_async(self) -> RescanResult:
        """:meth:`rescan` with the directory listing and file reads in worker threads.

        Concurrent calls take turns. If the seeder is closed meanwhile, returns what
        was done so far.

        Raises:
            RuntimeError: the seeder is closed.
        """
        async with self._scan_lock:
            self._check_open()
            found = await trio.to_thread.run_sync(_find_torrents, self._payloads_dir)
            if self._final is not None:
                return RescanResult()
            if found is None:
                return self._finish_rescan(RescanResult())
            removed = self._drop_stale(found)
            todo = self._new_torrents(found)
            limit = self._config.max_torrent_bytes
            reads = await trio.to_thread.run_sync(
                lambda: [_read_torrent(f, limit) for f in todo])
            if self._final is not None:
                return RescanResult(removed=removed)
            return self._finish_rescan(self._add_all(reads, removed))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Seed until cancelled: scan, report started, rescan every interval.

        Always closes the seeder on the way out (shielded, in a worker thread, up to
        ~1-2 s while libtorrent sends "stopped" announces); :meth:`statistics` then
        keeps the final numbers.
        """
        try:
            await self.rescan_async()
            task_status.started()
            while True:
                await trio.sleep(self._config.rescan_interval_s)
                await self.rescan_async()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    def _finish_rescan(self, result: RescanResult) -> RescanResult:
        self._rescans += 1
        return result

    def _drop_stale(self, found: Mapping[str, _Found]) -> tuple[str, ...]:
        """Remove torrents whose files are gone or replaced; forget stale skips."""
        removed: list[str] = []
        for name, seeded in list(self._seeded.items()):
            current = found.get(name)
            if current is not None and current.stamp == seeded.found.stamp:
                continue
            self._remove(name, seeded)
            removed.append(seeded.found.payload_name)
            how = "gone" if current is None else "replaced"
            _log.info("no longer seeding %s: its torrent or payload file is %s",
                      seeded.found.payload_name, how)
        for name, stamp in list(self._skipped.items()):
            current = found.get(name)
            if current is None or current.stamp != stamp:
                del self._skipped[name]
        return tuple(removed)

    def _new_torrents(self, found: Mapping[str, _Found]) -> list[_Found]:
        return [f for name, f in sorted(found.items())
                if name not in self._seeded and name not in self._skipped]

    def _add_all(self, reads: Iterable[_Read], removed: tuple[str, ...]) -> RescanResult:
        added: list[str] = []
        skipped: list[str] = []
        for read in reads:
            error = read.error if read.data is None else self._add(read.found, read.data)
            if error is None:
                added.append(read.found.payload_name)
                continue
            self._skipped[read.found.torrent_name] = read.found.stamp
            skipped.append(read.found.torrent_name)
            _log.warning("not seeding %s: %s", read.found.torrent_path, error)
        return RescanResult(added=tuple(added), removed=removed, skipped=tuple(skipped))

    def _add(self, found: _Found, data: bytes) -> str | None:
        """Add one torrent in seed mode; return why not, or None once it seeds."""
        try:
            ref = self._session.add_payload(data, self._payloads_dir, seed_mode=True,
                                            trackers=self._config.announce_urls,
                                            torrent_urls=self._config.torrent_trackers,
                                            identity=self._config.identity)
        except ValueError as exc:
            return str(exc)
        self._seeded[found.torrent_name] = _Seeded(found=found, ref=ref)
        self._added += 1
        _log.info("seeding %s (v2 info-hash %s)", found.payload_name, ref.info_hash)
        return None

    def _remove(self, name: str, seeded: _Seeded) -> None:
        stats = self._session.statistics(seeded.ref)
        self._uploaded_payload_gone += stats.bytes_uploaded_payload
        self._uploaded_total_gone += stats.bytes_uploaded_total
        self._session.remove(seeded.ref)
        del self._seeded[name]
        self._removed += 1

    # ------------------------------------------------------------------ stats, close

    def statistics(self) -> SeedingStats:
        """The counters now (see :class:`SeedingStats`); after closing, the final ones."""
        if self._final is not None:
            return self._final
        payload, total = self._uploaded_payload_gone, self._uploaded_total_gone
        connections = rate = 0
        for seeded in self._seeded.values():
            stats = self._session.statistics(seeded.ref)
            payload += stats.bytes_uploaded_payload
            total += stats.bytes_uploaded_total
            connections += stats.num_peers
            rate += stats.upload_rate_bytes_per_s
        return SeedingStats(
            torrents_seeded=len(self._seeded), torrents_skipped=len(self._skipped),
            torrents_added=self._added, torrents_removed=self._removed,
            rescans=self._rescans, bytes_uploaded_payload=payload,
            bytes_uploaded_total=total, peer_connections=connections,
            upload_rate_bytes_per_s=rate,
        )

    def close(self) -> None:
        """Stop seeding and close the session. **Blocks** up to ~1-2 s (libtorrent's
        "stopped" announces). Idempotent; payload files stay as they are."""
        if self._final is not None:
            return
        self._final = self.statistics()
        self._seeded.clear()
        self._session.close()

    async def aclose(self) -> None:
        """:meth:`close` without blocking trio: the session closes in a worker thread."""
        if self._final is not None:
            return
        self._final = self.statistics()
        self._seeded.clear()
        await trio.to_thread.run_sync(self._session.close)

    def _check_open(self) -> None:
        if self._final is not None:
            raise RuntimeError("PayloadSeeder is closed")


# --------------------------------------------------------------------------- files


def _find_torrents(payloads_dir: Path) -> dict[str, _Found] | None:
    """Torrent files (by name) whose payload file exists, or None if the directory
    cannot be listed for another reason than not existing yet (logged; the caller keeps
    what it seeds rather than dropping everything on a transient error)."""
    try:
        entries = list(os.scandir(payloads_dir))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        _log.warning("cannot list %s: %s", payloads_dir, exc)
        return None
    names = {e.name for e in entries}
    found: dict[str, _Found] = {}
    for entry in entries:
        name = entry.name
        payload_name = name[: -len(_TORRENT_SUFFIX)]
        if (name.startswith(".") or not name.endswith(_TORRENT_SUFFIX) or not payload_name
                or payload_name not in names):
            continue  # dot-files are half-written temporaries
        try:
            info = entry.stat()
            if not entry.is_file() or not (payloads_dir / payload_name).is_file():
                continue
        except OSError:
            continue  # vanished while listing: the next scan sees the outcome
        found[name] = _Found(torrent_path=payloads_dir / name, payload_name=payload_name,
                             stamp=(info.st_ino, info.st_mtime_ns, info.st_size))
    return found


def _read_torrent(found: _Found, limit_bytes: int) -> _Read:
    """Read and check ``found``'s torrent file: at most ``limit_bytes``, a v2
    single-file torrent naming its payload file, whose size matches that file's."""
    try:
        with open(found.torrent_path, "rb") as fh:
            data = fh.read(limit_bytes + 1)
        if len(data) > limit_bytes:
            return _Read(found, None, f"larger than {limit_bytes} bytes, not a torrent of ours")
        torrent = read_torrent(data)
        payload_size = (found.torrent_path.parent / found.payload_name).stat().st_size
    except OSError as exc:
        return _Read(found, None, f"cannot read: {exc.strerror or exc}")
    except ValueError as exc:
        return _Read(found, None, str(exc))
    if torrent.name != found.payload_name:
        return _Read(found, None, f"the torrent is for a file named {torrent.name!r}, "
                                  f"not {found.payload_name!r}")
    if torrent.size_bytes != payload_size:
        return _Read(found, None, f"the torrent is for {torrent.size_bytes} bytes but "
                                  f"{found.payload_name} has {payload_size}")
    return _Read(found, data)
