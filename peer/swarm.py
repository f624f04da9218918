"""The swarm engine adapter: the only module that imports libtorrent.

Three parts, smallest first:

- :func:`make_torrent` builds a BitTorrent **v2-only** single-file torrent (SHA-256
  Merkle trees, no SHA-1 v1 pieces) for one payload file, with optional web seeds
  (BEP 19 ``url-list``) and trackers. Both live outside the info dict, so they never
  change the info-hash.
- :class:`SwarmConfig` and :func:`session_settings`: a frozen config and a pure mapping
  to libtorrent setting names. Everything that talks to the outside world on its own
  (DHT and its bootstrap routers, local service discovery multicast, UPnP, NAT-PMP, the
  IP-change notifier) is off unless asked for; uTP is off in both directions (TCP only:
  uTP is ~30x slower on loopback).
- :class:`SwarmSession`: a small trio-friendly wrapper around one ``lt.session``. Callers
  get our own objects (:class:`TorrentHandleRef`, :class:`SwarmStats`,
  :class:`SwarmEvent`, :class:`PieceView`), never libtorrent's. Waiting polls libtorrent
  from worker threads (``trio.to_thread.run_sync``) between short ``trio.sleep`` calls,
  so the event loop never blocks on libtorrent. Every peer is in libtorrent's global
  peer class (by default peers on local networks bypass rate limits and unchoke
  slots: a device's caps must hold on its own LAN); each session gets a fresh peer id
  unless told one (:func:`new_peer_id`: when the session started, and random digits);
  outgoing connections leave from the listen address.

Errors: bad arguments (piece size, URLs with a query string, undecodable torrent data,
a closed session) raise ``ValueError`` / ``RuntimeError``; a download that fails or
does not finish in time raises :class:`peer.errors.DownloadFailed`. libtorrent's own
exceptions (``RuntimeError`` from the bindings) are translated at this boundary.

Web seeds must be plain URLs (no query string, no fragment): libtorrent's
``ssrf_mitigation`` (kept on) silently refuses web seeds with a query string on local
addresses and the download stalls. Callers pass the URL of the file itself, whose last
segment must be the file name inside the torrent, or the URL of its directory ending in
``/``; both are stored as the directory URL, the only form libtorrent fetches correctly
for v2 torrents whose size is not a multiple of the piece size (see
:func:`_web_seed_base`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

import libtorrent as lt
import trio

from swarmota.peer.errors import DownloadFailed

__all__ = [
    "BLOCK_SIZE_BYTES",
    "MIN_PIECE_SIZE_BYTES",
    "PeerView",
    "PieceView",
    "SwarmConfig",
    "SwarmEvent",
    "SwarmSession",
    "SwarmStats",
    "TorrentFile",
    "TorrentHandleRef",
    "make_torrent",
    "new_peer_id",
    "one_block_pieces",
    "read_torrent",
    "seniority",
    "session_settings",
]

MIN_PIECE_SIZE_BYTES: Final = 16 * 1024
_MAX_PIECE_SIZE_BYTES: Final = 64 * 1024 * 1024
_POLL_INTERVAL_S: Final = 0.05
_MAX_QUEUED_DISK_BYTES: Final = 4 * 1024 * 1024
# Azureus style: client "SW", version 0.2.0.0; the 12 characters after it are the
# time it was made (the session's start, or the agent's set_peer_id when it adds a payload;
# centiseconds since the epoch modulo 2**36, 9 hex digits) and 3 random
# hex digits (see new_peer_id). Version 0.1.0.0 had 12 random hex digits.
_PEER_ID_PREFIX: Final = b"-SW0200-"
_SENIORITY_MODULO: Final = 1 << 36
_MAX_BUFFERED_EVENTS: Final = 10_000

_ALERT_MASK: Final = int(
    lt.alert.category_t.status_notification
    | lt.alert.category_t.error_notification
    | lt.alert.category_t.peer_notification
    | lt.alert.category_t.storage_notification
    | lt.alert.category_t.piece_progress_notification
    # not read, but they wake a download loop (SwarmSession.wait_news) when a tracker
    # answers or a peer connects
    | lt.alert.category_t.tracker_notification
    | lt.alert.category_t.connect_notification
)


# --------------------------------------------------------------------------- torrents


@dataclass(frozen=True)
class TorrentFile:
    """A v2-only single-file torrent.

    ``data`` is the bencoded ``.torrent``; ``info_hash`` the full SHA-256 v2 info-hash
    (64 hex characters); ``announce_hash`` its first 20 bytes, the form announced to
    trackers and used in v2 peer handshakes. ``swarm_ca`` is the PEM CA certificate of a
    private swarm (an SSL torrent: the certificate sits in the info dict, so the
    info-hash covers it, and only peers with a certificate from that CA can connect),
    or ``None`` for an open swarm.
    """

    data: bytes
    info_hash: str
    announce_hash: bytes
    name: str
    size_bytes: int
    piece_size_bytes: int
    swarm_ca: bytes | None = None


def _check_url(url: str, what: str, *, allow_query: bool = False) -> str:
    """Refuse non-http(s) URLs, fragments, and query strings unless ``allow_query``
    (announce URLs a device adds to its session may carry ``?device_id=...``: libtorrent
    appends its parameters with ``&``, and its SSRF mitigation accepts a query on a
    tracker whose path is ``/announce``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an http(s) URL: {url!r}")
    if allow_query and parts.path.endswith("/announce") and not parts.fragment \
            and "#" not in url:
        return url
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"{what} must not have a query string or fragment "
                         f"(libtorrent's SSRF mitigation stalls on them): {url!r}")
    return url


def _web_seed_base(url: str, name: str) -> str:
    """Turn a web seed file URL into the directory URL libtorrent needs.

    libtorrent gives v2 torrents a tail pad file whenever the size is not a multiple of
    the piece size; it then treats a one-file torrent as a multi-file one and requests
    ``<url>/<name>``, so a file URL works only for piece-aligned payloads. A directory
    URL (ending in ``/``) works for both: libtorrent appends the file name.
    """
    _check_url(url, "web seed")
    head, sep, last = url.rpartition("/")
    if not last:
        return url
    if unquote(last) != name:
        raise ValueError(f"web seed {url!r} must name the torrent's file {name!r} "
                         "(or be a directory URL ending in '/')")
    return head + sep


BLOCK_SIZE_BYTES: Final = 16 * 1024


def one_block_pieces(piece_size_bytes: int) -> bool:
    """Whether a torrent's pieces are single BitTorrent blocks (16 KiB). libtorrent 2.x
    (up to at least 2.1.1) mishandles such v2 torrents after a piece fails its hash
    check: it asks peers for that piece's block hashes, refuses every (honest) answer
    as "invalid hashes", disconnects the peer and asks the next one, for as long as
    the torrent is in the session (upstream: torrent.cpp, "TODO: only do this if the
    piece size > 1 blocks"). Publishing no longer makes such torrents; devices restart
    one after a hash failure (:meth:`SwarmSession.restart`)."""
    return piece_size_bytes <= BLOCK_SIZE_BYTES


def new_peer_id(started_at_s: float, *, lead: bool = True) -> bytes:
    """A peer id for a session started at ``started_at_s`` (epoch seconds): the client
    prefix, the start in centiseconds (modulo 2**36, about 22 years: 9 hex digits) and 3
    random hex digits. Peers order each other by it (:func:`seniority`) without talking;
    it names no device and changes with every session. ``lead=False`` (a device whose
    downloads are rate-limited: the others would wait for it) puts the largest start
    there, so that it comes after every peer that may lead."""
    centis = int(started_at_s * 100) % _SENIORITY_MODULO if lead else _SENIORITY_MODULO - 1
    return _PEER_ID_PREFIX + f"{centis:09x}".encode() + secrets.token_hex(2)[:3].encode()


def seniority(peer_id: bytes) -> tuple[int, bytes]:
    """A sort key: peers whose id was made earlier come first (:func:`new_peer_id`);
    peer ids of any other form (other clients, older agents) after all of ours, by id.
    Every peer computes the same order from the ids alone."""
    if len(peer_id) == 20 and peer_id.startswith(_PEER_ID_PREFIX):
        try:
            return int(peer_id[8:17], 16), peer_id
        except ValueError:
            pass
    return _SENIORITY_MODULO, peer_id


def _check_piece_size(piece_size_bytes: int) -> None:
    if (piece_size_bytes < MIN_PIECE_SIZE_BYTES or piece_size_bytes > _MAX_PIECE_SIZE_BYTES
            or piece_size_bytes & (piece_size_bytes - 1)):
        raise ValueError(
            f"piece_size_bytes must be a power of two between {MIN_PIECE_SIZE_BYTES} and "
            f"{_MAX_PIECE_SIZE_BYTES}, not {piece_size_bytes}")


def make_torrent(
    payload_path: Path,
    *,
    piece_size_bytes: int,
    web_seeds: Sequence[str] = (),
    trackers: Sequence[str] = (),
    name: str | None = None,
    swarm_ca: bytes | None = None,
) -> TorrentFile:
    """Hash ``payload_path`` into a v2-only single-file torrent.

    **Blocks** while it reads and hashes the whole file (SHA-256, ~1.5 GB/s): call it
    through ``trio.to_thread.run_sync``. The file inside the torrent is named ``name``
    (default: the payload's file name); ``web_seeds`` (BEP 19: URLs of a file with that
    name, or of its directory ending in ``/``; stored as directory URLs) and
    ``trackers`` (announce URLs, one tier each) go outside the info dict. No creation
    date is written, so the same inputs always give the same bytes. ``swarm_ca`` (a PEM
    CA certificate, the fleet CA) makes a private swarm: an SSL torrent whose peers
    must present certificates from that CA (:meth:`SwarmSession.add_payload`).

    Raises:
        ValueError: piece size not a power of two in [16 KiB, 64 MiB], an empty file,
            a bad file name, a URL that is not plain http(s) without a query string, or
            a web seed URL naming another file.
        OSError: the payload cannot be read.
    """
    _check_piece_size(piece_size_bytes)
    name = payload_path.name if name is None else name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"bad file name for a torrent: {name!r}")
    seed_urls = [_web_seed_base(url, name) for url in web_seeds]
    for url in trackers:
        _check_url(url, "tracker")
    info = payload_path.stat()
    if not payload_path.is_file():
        raise ValueError(f"{payload_path} is not a regular file")
    if info.st_size == 0:
        raise ValueError(f"{payload_path} is empty; a torrent needs at least one byte")

    with tempfile.TemporaryDirectory(prefix=".swarm-") as tmp:
        # libtorrent names the file after the path it hashes: give it that name.
        if name == payload_path.name:
            parent, source = payload_path.parent, payload_path
        else:
            parent = Path(tmp)
            source = parent / name
            os.symlink(payload_path.resolve(), source)
        try:
            files = lt.list_files(str(source))
            creator = lt.create_torrent(files, piece_size_bytes, lt.create_torrent.v2_only)
            if swarm_ca is not None:
                creator.set_root_cert(_swarm_ca_text(swarm_ca))
            lt.set_piece_hashes(creator, str(parent))
            for url in seed_urls:
                creator.add_url_seed(url)
            for tier, url in enumerate(trackers):
                creator.add_tracker(url, tier)
            entry = creator.generate()
        except RuntimeError as exc:  # libtorrent reports I/O errors this way
            raise OSError(f"cannot hash {payload_path}: {exc}") from exc
    entry.pop("creation date", None)
    entry.pop(b"creation date", None)
    data = bytes(lt.bencode(entry))
    info_hash = _v2_info_hash(lt.torrent_info(data))
    return TorrentFile(
        data=data,
        info_hash=info_hash,
        announce_hash=bytes.fromhex(info_hash)[:20],
        name=name,
        size_bytes=info.st_size,
        piece_size_bytes=piece_size_bytes,
        swarm_ca=swarm_ca,
    )


def _swarm_ca_text(pem: bytes) -> str:
    text = pem.decode("ascii", "replace")
    if "-----BEGIN CERTIFICATE-----" not in text or len(pem) > 16 * 1024:
        raise ValueError("swarm_ca must be one PEM CA certificate")
    return text


def read_torrent(data: bytes) -> TorrentFile:
    """Parse a v2 single-file torrent (e.g. fetched from the origin) into a
    :class:`TorrentFile`.

    Raises:
        ValueError: not a torrent, not v2, or not exactly one file (pad files aside).
    """
    ti = _parse_torrent(data)
    info_hash = _v2_info_hash(ti)
    files = ti.layout()
    real = [i for i in range(files.num_files()) if not files.file_flags(i) & files.flag_pad_file]
    if real != [0]:
        raise ValueError("not a single-file torrent")
    return TorrentFile(data=data, info_hash=info_hash,
                       announce_hash=bytes.fromhex(info_hash)[:20], name=str(ti.name()),
                       size_bytes=int(files.file_size(0)),
                       piece_size_bytes=int(ti.piece_length()),
                       swarm_ca=_swarm_ca_of(ti))


def _swarm_ca_of(ti: Any) -> bytes | None:
    cert = ti.ssl_cert()
    return cert.encode("ascii", "replace") if cert else None


def _v2_info_hash(ti: Any) -> str:
    hashes = ti.info_hashes()
    if not hashes.has_v2():
        raise ValueError("not a BitTorrent v2 torrent")
    return str(hashes.v2)


def _parse_torrent(data: bytes) -> Any:
    try:
        return lt.torrent_info(data)
    except RuntimeError as exc:
        raise ValueError(f"not a valid torrent: {exc}") from exc


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SwarmConfig:
    """Settings of one swarm session.

    ``listen_host``/``listen_port``: where to accept peers (port 0: any free port).
    Rate limits are in bytes per second, 0 meaning unlimited. The discovery and NAT
    features default to off: LSD multicasts info-hashes on the LAN, DHT contacts public
    bootstrap routers. ``upload_enabled=False`` never unchokes a peer (no upload at all,
    e.g. on a metered network). ``allow_multiple_connections_per_ip`` is for tests where
    several sessions share one loopback address. ``peer_id``: the 20-byte BitTorrent
    peer id (default: :func:`new_peer_id` at the session's start, fresh per session, so
    that a device is not recognisable across swarms).
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    enable_dht: bool = False
    enable_lsd: bool = False
    enable_upnp: bool = False
    enable_natpmp: bool = False
    download_rate_limit_bytes_per_s: int = 0
    upload_rate_limit_bytes_per_s: int = 0
    upload_enabled: bool = True
    allow_multiple_connections_per_ip: bool = False
    peer_id: bytes | None = None
    ssl_listen: bool = False
    """Also listen for TLS peers of private swarms (SSL torrents), on ``listen_port + 1``
    (any free port when ``listen_port`` is 0); libtorrent announces that port for them."""

    def __post_init__(self) -> None:
        if self.peer_id is not None and (len(self.peer_id) != 20
                                         or not self.peer_id.isascii()):
            raise ValueError("peer_id must be 20 ASCII bytes")
        if not self.listen_host or any(c in self.listen_host for c in " ,"):
            raise ValueError(f"bad listen_host: {self.listen_host!r}")
        if not 0 <= self.listen_port <= 65535:
            raise ValueError(f"listen_port out of range: {self.listen_port}")
        if self.download_rate_limit_bytes_per_s < 0 or self.upload_rate_limit_bytes_per_s < 0:
            raise ValueError("rate limits must be >= 0 (0 means unlimited)")

    @property
    def listen_interface(self) -> str:
        """``HOST:PORT`` as libtorrent expects it (IPv6 hosts in brackets), followed by
        ``,HOST:PORTs`` for the TLS listener with ``ssl_listen``."""
        host = self.listen_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        plain = f"{host}:{self.listen_port}"
        if not self.ssl_listen:
            return plain
        ssl_port = self.listen_port + 1 if 0 < self.listen_port < 65535 else 0
        return f"{plain},{host}:{ssl_port}s"


def session_settings(config: SwarmConfig) -> dict[str, Any]:
    """Map ``config`` to libtorrent ``settings_pack`` names (a pure function).

    A specific listen address is also the source of outgoing connections (otherwise the
    kernel picks one: on loopback, 127.0.0.1 for every session)."""
    unspecified = config.listen_host in ("0.0.0.0", "::", "[::]")
    settings: dict[str, Any] = {
        "listen_interfaces": config.listen_interface,
        "outgoing_interfaces": "" if unspecified else config.listen_host.strip("[]"),
        "enable_dht": config.enable_dht,
        "dht_bootstrap_nodes": "" if not config.enable_dht else lt.default_settings()[
            "dht_bootstrap_nodes"],
        "enable_lsd": config.enable_lsd,
        "enable_upnp": config.enable_upnp,
        "enable_natpmp": config.enable_natpmp,
        "enable_ip_notifier": False,
        "enable_outgoing_utp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_tcp": True,
        "enable_incoming_tcp": True,
        "download_rate_limit": config.download_rate_limit_bytes_per_s,
        "upload_rate_limit": config.upload_rate_limit_bytes_per_s,
        **_upload_switch(config.upload_enabled),
        "allow_multiple_connections_per_ip": config.allow_multiple_connections_per_ip,
        "ssrf_mitigation": True,
        # libtorrent 2.1 keeps verified pieces in memory until this many bytes are queued
        # (default 100 MiB): bound it for small devices; SwarmSession.flush writes sooner
        "max_queued_disk_bytes": _MAX_QUEUED_DISK_BYTES,
        # A peer that finishes announces "upload only"; leechers that have not yet seen
        # its last HAVE messages find it uninteresting and hang up, exactly when it holds
        # the pieces they miss (seen with 16 devices: the origin then sent them again).
        "close_redundant_connections": False,
        # closing a session waits for "stopped" announces; do not wait long for them
        "stop_tracker_timeout": 1,
        # every tracker a torrent names (a seeder's own and those of the torrent; tiers
        # or not) hears every announce: by default libtorrent announces to the first
        # tracker that works and keeps the others as fallbacks
        "announce_to_all_tiers": True,
        "announce_to_all_trackers": True,
        # Blame for a piece that fails its hash check: libtorrent penalises every peer
        # that sent a block of it (4 such pieces ban a peer), so an honest peer that
        # shared pieces with a liar could be banned with it (1 run in 5 of three devices
        # and a liar on a loaded machine). Each peer with any download rate takes whole
        # pieces (the window libtorrent aims at is min(rate x threshold, 8 MiB)), and
        # a peer holds at most 64 requests (1 MiB) at a time, so that a liar that
        # answers at once cannot spread its blocks over hundreds of pieces before its
        # first bad piece is hashed: no honest ban in 24 such runs. (With four liars
        # among eight devices an honest device was still banned in 5 runs of 10, for
        # finishing pieces a banned liar had begun: the download restarts the torrent
        # after a ban, peer/swarm_fetch.py, _SwarmRun._restart.)
        "whole_pieces_threshold": 1_000_000,
        "max_out_request_queue": 64,
        "report_web_seed_downloads": True,
        "alert_mask": _ALERT_MASK,
        # piece alerts come one per piece; room for a few seconds of them between polls
        "alert_queue_size": 20_000,
    }
    if config.peer_id is not None:
        # 20 bytes or more: the whole peer id, not a prefix of a random one
        settings["peer_fingerprint"] = config.peer_id.decode("ascii")
    return settings


def _upload_switch(enabled: bool) -> dict[str, int]:
    # No upload at all: nobody is unchoked, and no "allowed fast" pieces (BEP 6) that
    # choked peers may still request. (LAN peers too: SwarmSession puts
    # every peer in the global peer class.)
    return {"unchoke_slots_limit": 8 if enabled else 0,
            "allowed_fast_set_size": 5 if enabled else 0}


# --------------------------------------------------------------------------- session


@dataclass(frozen=True)
class TorrentHandleRef:
    """Our reference to a torrent added to a :class:`SwarmSession`."""

    info_hash: str
    name: str
    save_dir: Path

    @property
    def path(self) -> Path:
        """Where the payload file is (being) written."""
        return self.save_dir / self.name


@dataclass(frozen=True)
class SwarmStats:
    """Counters of one torrent since it was added.

    ``bytes_downloaded_total`` includes protocol overhead; ``bytes_downloaded_payload``
    is piece data from any source, web seeds included (exact, kept by libtorrent).

    The split by source is **approximate**: libtorrent keeps per-source counters only per
    live connection (``peer_info.total_download``, refreshed about once a second) and
    forgets them when the connection closes. ``bytes_from_peers`` sums the BitTorrent
    connections as sampled while :meth:`SwarmSession.wait_complete` runs and on every
    ``statistics()`` call (a lower bound); ``bytes_from_web_seeds`` is the rest of the
    payload bytes (an upper bound, exact when no BitTorrent peer sent anything).
    """

    state: str
    progress: float
    is_seeding: bool
    size_bytes: int
    bytes_done: int
    bytes_downloaded_total: int
    bytes_downloaded_payload: int
    bytes_uploaded_total: int
    bytes_uploaded_payload: int
    bytes_from_web_seeds: int
    bytes_from_peers: int
    bytes_failed: int
    bytes_redundant: int
    num_peers: int
    num_web_seeds: int
    download_rate_bytes_per_s: int
    upload_rate_bytes_per_s: int


@dataclass(frozen=True)
class SwarmEvent:
    """A libtorrent alert, copied. ``kind`` is the alert type (``"url_seed"``, ...)."""

    kind: str
    message: str
    info_hash: str | None = None
    piece: int | None = None
    url: str | None = None
    error: str | None = None
    peer: str | None = None


@dataclass(frozen=True)
class PeerView:
    """One connected BitTorrent peer of a torrent, as libtorrent sees it now."""

    endpoint: str  # host:port
    host: str
    bytes_received: int  # piece data received on this connection
    choking_us: bool
    requests_pending: int  # blocks we asked for and did not get yet
    snubbed: bool  # libtorrent gave up waiting for it (request timeout)
    seed: bool


@dataclass(frozen=True)
class PieceView:
    """Which pieces this session has, and how many connected peers have each."""

    have: tuple[bool, ...]
    availability: tuple[int, ...]
    num_peers: int
    checking: bool  # libtorrent is still hashing existing data; pieces added now are lost
    downloading_peer_ids: tuple[bytes, ...] = ()  # connected peers that are not seeds
    bytes_failed: int = 0  # piece data that failed its hash check, since added
    bytes_useful_from_peers: int = 0  # piece data from peers, minus failed and redundant
    tracker_replied: bool = False  # a tracker has answered an announce of this torrent
    known_peers: int = 0  # peers libtorrent knows of (connected or not)
    peers: tuple[PeerView, ...] = ()  # connected BitTorrent peers (not web seeds)
    error: str | None = None  # the torrent stopped on an error (e.g. its file: ENOSPC)


@dataclass
class _SourceLedger:
    """Per-connection payload byte counters, sampled; keeps closed connections' bytes."""

    closed_bytes: int = 0
    last: dict[tuple[str, str], int] = field(default_factory=dict)

    def sample(self, current: dict[tuple[str, str], int]) -> None:
        for key, value in current.items():
            previous = self.last.get(key, 0)
            if value < previous:  # a new connection to the same endpoint
                self.closed_bytes += previous
            self.last[key] = value

    def total(self) -> int:
        return self.closed_bytes + sum(self.last.values())


@dataclass(frozen=True)
class _Carried:
    """libtorrent's counters of the earlier incarnations of a restarted torrent."""

    payload_download: int = 0
    payload_upload: int = 0
    total_download: int = 0
    total_upload: int = 0
    failed: int = 0
    redundant: int = 0


@dataclass
class _Torrent:
    ref: TorrentHandleRef
    handle: Any
    size_bytes: int
    start: Callable[[], Any]  # adds the torrent to the session again: a new handle
    peers: _SourceLedger = field(default_factory=_SourceLedger)
    carried: _Carried = field(default_factory=_Carried)


_STATE_NAMES: Final = {
    int(lt.torrent_status.states.checking_files): "checking",
    int(lt.torrent_status.states.downloading_metadata): "downloading_metadata",
    int(lt.torrent_status.states.downloading): "downloading",
    int(lt.torrent_status.states.finished): "finished",
    int(lt.torrent_status.states.seeding): "seeding",
    int(lt.torrent_status.states.checking_resume_data): "checking_resume_data",
}

_CHECKING_STATES: Final = frozenset({int(lt.torrent_status.states.checking_files),
                                     int(lt.torrent_status.states.checking_resume_data)})


class SwarmSession:
    """One libtorrent session. Create, :meth:`add_payload`, wait, :meth:`close`.

    Methods other than :meth:`wait_complete` call libtorrent directly; those calls only
    exchange messages with libtorrent's network thread and return in well under a
    millisecond. Usable as a context manager (``with SwarmSession(cfg) as s:``).
    """

    def __init__(self, config: SwarmConfig) -> None:
        if config.peer_id is None:
            config = replace(config, peer_id=new_peer_id(time.time()))
        self._config = config
        self._session: Any = lt.session(cast(Any, session_settings(config)))
        # libtorrent puts peers on local networks (LAN, loopback) in a "local" peer class
        # that ignores rate limits and unchoke slots. A device's limits exist to protect
        # its owner's LAN: every peer goes into the global class instead.
        everyone = lt.ip_filter()
        global_class = 1 << int(self._session.global_peer_class_id)
        everyone.add_rule("0.0.0.0", "255.255.255.255", global_class)
        everyone.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", global_class)
        self._session.set_peer_class_filter(everyone)
        self._torrents: dict[str, _Torrent] = {}
        self._events: deque[SwarmEvent] = deque(maxlen=_MAX_BUFFERED_EVENTS)
        self._alert_lock = threading.Lock()
        self._blocked: set[str] = set()
        self._closed = False
        # libtorrent writes a byte to this pipe when it queues an alert into an empty
        # queue (a piece verified, a peer connected or banned, a tracker's answer): a
        # download loop waits for it (wait_news) instead of polling at a fixed tick. A
        # descriptor, not a Python callback: libtorrent's thread never needs the GIL.
        self._news_r, self._news_w = os.pipe()
        os.set_blocking(self._news_r, False)
        os.set_blocking(self._news_w, False)
        self._session.set_alert_fd(self._news_w)

    def __enter__(self) -> SwarmSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def config(self) -> SwarmConfig:
        return self._config

    @property
    def peer_id(self) -> bytes:
        """The 20-byte BitTorrent peer id of torrents added now (:meth:`set_peer_id`)."""
        assert self._config.peer_id is not None
        return self._config.peer_id

    def set_peer_id(self, peer_id: bytes) -> None:
        """Use ``peer_id`` (20 ASCII bytes) for torrents added from now on; those added
        before keep theirs (a restarted torrent takes the current one). A device sets
        it just before it adds the payload's torrent: the peer id is its seniority
        among the downloaders (:func:`seniority`), and a session can take a while to
        start on a busy device.

        Raises:
            ValueError: not 20 ASCII bytes.
        """
        self._check_open()
        config = replace(self._config, peer_id=peer_id)  # ValueError: checked there
        self._session.apply_settings({"peer_fingerprint": peer_id.decode("ascii")})
        self._config = config

    @property
    def listen_port(self) -> int:
        """The TCP port peers connect to (0 while not listening)."""
        self._check_open()
        return int(self._session.listen_port())

    def add_payload(
        self,
        torrent: bytes,
        save_dir: Path,
        *,
        web_seeds: Sequence[str] = (),
        trackers: Sequence[str] = (),
        seed_mode: bool = False,
        file_name: str | None = None,
        torrent_urls: bool = True,
        identity: tuple[bytes, bytes] | None = None,
    ) -> TorrentHandleRef:
        """Start downloading (or seeding) ``torrent`` into ``save_dir``.

        ``web_seeds`` (file URLs naming the torrent's file, or directory URLs ending in
        ``/``) are added to those in the torrent; ``trackers`` (announce URLs) likewise.
        ``seed_mode=True`` trusts that
        the complete file is already in ``save_dir`` (no re-check; pieces are verified
        lazily when first uploaded). ``file_name`` stores the payload under another name
        in ``save_dir``; ``torrent_urls=False`` ignores the web seeds and trackers written
        in the torrent (outside its info dict, so not covered by the info-hash: a device
        uses only its own tracker, and fetches from the origin itself). An existing file is
        hashed and its valid pieces kept. ``identity`` (certificate and key, PEM, from the
        fleet CA) is this peer's TLS identity in a private swarm (an SSL torrent); peers
        without a certificate from the torrent's CA get nothing.

        Raises:
            ValueError: ``torrent`` is not a v2 torrent, a web seed URL is not plain
                http(s) or names another file, the torrent is already in this session,
                or it is a private swarm and this session has no TLS listener or no
                ``identity`` was given.
        """
        self._check_open()
        ti = _parse_torrent(torrent)
        info_hash = _v2_info_hash(ti)
        if ti.ssl_cert() and (identity is None or not self._config.ssl_listen):
            raise ValueError("a private swarm (SSL torrent) needs a fleet identity and a "
                             "session with ssl_listen")
        seed_urls = [_web_seed_base(url, ti.name()) for url in web_seeds]
        for url in trackers:
            _check_url(url, "tracker", allow_query=True)
        if info_hash in self._torrents:
            raise ValueError(f"torrent {info_hash} already added")
        if file_name is not None and (not file_name or file_name in (".", "..") or any(
                c in file_name for c in "/\\\0")):
            raise ValueError(f"bad file name {file_name!r}")

        def start() -> Any:
            params = lt.add_torrent_params()
            params.ti = ti
            params.save_path = str(save_dir)
            if file_name is not None:
                params.renamed_files = {0: file_name}
            if seed_urls:
                params.url_seeds = seed_urls
            if trackers:
                params.trackers = list(trackers)
            flags = params.flags
            flags &= ~lt.torrent_flags.auto_managed
            # Added paused, so that nothing is contacted before the URLs are settled.
            flags |= lt.torrent_flags.paused
            if seed_mode:
                flags |= lt.torrent_flags.seed_mode
            params.flags = flags
            try:
                handle = self._session.add_torrent(params)
            except RuntimeError as exc:
                raise ValueError(f"libtorrent refused the torrent: {exc}") from exc
            if not torrent_urls:
                for url in handle.url_seeds():
                    if url not in seed_urls:
                        handle.remove_url_seed(url)
                handle.replace_trackers([lt.announce_entry(url) for url in trackers])
            if ti.ssl_cert() and identity is not None:
                # no DH parameters: TLS 1.3 and ECDHE need none (libtorrent then logs a
                # harmless "dh params" torrent error alert)
                handle.set_ssl_certificate_buffer(identity[0].decode("ascii"),
                                                  identity[1].decode("ascii"), "")
            handle.resume()
            return handle

        handle = start()
        ref = TorrentHandleRef(info_hash=info_hash, name=file_name or ti.name(),
                               save_dir=save_dir)
        self._torrents[info_hash] = _Torrent(ref=ref, handle=handle,
                                             size_bytes=int(ti.total_size()), start=start)
        return ref

    def restart(self, ref: TorrentHandleRef) -> None:
        """Remove the torrent and add it again as it was added: libtorrent hashes its
        file and keeps every valid piece (flush first: :meth:`flush_and_wait`), and
        starts with a clean slate: connections, piece picker, pending hash requests.
        Counters carry over. For a torrent after a ban (a liar's unfinished pieces
        would taint the honest peers that finish them) or with one-block pieces poisoned
        by a hash failure (see :func:`one_block_pieces`); blocked hosts stay blocked."""
        t = self._torrent(ref)
        status = t.handle.status()
        t.carried = _Carried(
            payload_download=t.carried.payload_download + int(status.total_payload_download),
            payload_upload=t.carried.payload_upload + int(status.total_payload_upload),
            total_download=t.carried.total_download + int(status.total_download),
            total_upload=t.carried.total_upload + int(status.total_upload),
            failed=t.carried.failed + int(status.total_failed_bytes),
            redundant=t.carried.redundant + int(status.total_redundant_bytes))
        t.peers.closed_bytes += sum(t.peers.last.values())
        t.peers.last.clear()
        self._session.remove_torrent(t.handle)
        t.handle = t.start()

    def add_piece(self, ref: TorrentHandleRef, index: int, data: bytes) -> None:
        """Hand libtorrent a piece fetched elsewhere (already verified by the caller).

        libtorrent checks it against the torrent's Merkle tree, writes it and offers it
        to peers; a piece that fails shows up as a ``hash_failed`` event."""
        t = self._torrent(ref)
        t.handle.add_piece(index, data, 0)

    def pieces(self, ref: TorrentHandleRef) -> PieceView:
        """The pieces we have and their availability among connected peers."""
        t = self._torrent(ref)
        c = t.carried
        status = t.handle.status(lt.status_flags_t.query_pieces)
        have = tuple(bool(b) for b in status.pieces)
        availability = tuple(int(a) for a in t.handle.piece_availability())
        if len(availability) != len(have):  # libtorrent returns [] with no peers
            availability = (0,) * len(have)
        checking = int(status.state) in _CHECKING_STATES
        infos = [p for p in t.handle.get_peer_info()
                 if p.connection_type == lt.peer_info.standard_bittorrent]
        leechers = tuple(sorted({p.pid.to_bytes() for p in infos
                                 if not p.flags & lt.peer_info.seed}))
        peers = tuple(PeerView(endpoint=f"{p.ip[0]}:{p.ip[1]}", host=str(p.ip[0]),
                               bytes_received=int(p.total_download),
                               choking_us=bool(p.flags & lt.peer_info.remote_choked),
                               requests_pending=int(p.download_queue_length),
                               snubbed=bool(p.flags & lt.peer_info.snubbed),
                               seed=bool(p.flags & lt.peer_info.seed)) for p in infos)
        return PieceView(have=have, availability=availability,
                         num_peers=int(status.num_peers), checking=checking,
                         downloading_peer_ids=leechers,
                         bytes_failed=c.failed + int(status.total_failed_bytes),
                         bytes_useful_from_peers=max(0, c.payload_download - c.failed
                                                     - c.redundant
                                                     + int(status.total_payload_download)
                                                     - int(status.total_failed_bytes)
                                                     - int(status.total_redundant_bytes)),
                         tracker_replied=bool(status.current_tracker),
                         known_peers=int(status.list_peers), peers=peers,
                         error=str(status.errc.message()) if status.errc.value() else None)

    def flush(self, ref: TorrentHandleRef) -> None:
        """Ask libtorrent to write the pieces it holds in memory to the file (they are
        verified, but only in memory: a crash would lose them). Returns at once."""
        self._torrent(ref).handle.flush_cache()

    async def flush_and_wait(self, ref: TorrentHandleRef, *, timeout_s: float) -> bool:
        """:meth:`flush`, then wait until libtorrent confirms it (``cache_flushed``);
        False if it did not within ``timeout_s``. Other events are kept for
        :meth:`pop_events`."""
        t = self._torrent(ref)
        await trio.to_thread.run_sync(t.handle.flush_cache)
        with trio.move_on_after(timeout_s):
            while True:
                events = await trio.to_thread.run_sync(self._pop_alerts)
                self._events.extend(events)
                if any(e.kind == "cache_flushed" and e.info_hash == ref.info_hash
                       for e in events):
                    return True
                await trio.sleep(_POLL_INTERVAL_S)
        return False

    def block_hosts(self, hosts: Sequence[str]) -> None:
        """Refuse every connection with ``hosts`` (IP addresses) from now on, in every
        torrent of this session: connections open now are closed (libtorrent applies
        its IP filter to them at once) and none is made or accepted again. For peers
        that lie or stay silent; a session lives for one update pass."""
        self._check_open()
        new = set(hosts) - self._blocked
        if not new:
            return
        self._blocked |= new
        blocked = lt.ip_filter()
        for host in sorted(self._blocked):
            blocked.add_rule(host, host, 1)  # 1: blocked
        self._session.set_ip_filter(blocked)

    @property
    def blocked_hosts(self) -> frozenset[str]:
        return frozenset(self._blocked)

    def connect_peer(self, ref: TorrentHandleRef, host: str, port: int) -> None:
        """Ask libtorrent to connect to a peer at ``host:port`` for this torrent."""
        self._torrent(ref).handle.connect_peer((host, port))

    def remove(self, ref: TorrentHandleRef) -> None:
        """Stop the torrent; its files stay on disk."""
        t = self._torrent(ref)
        self._session.remove_torrent(t.handle)
        del self._torrents[ref.info_hash]

    async def wait_complete(self, ref: TorrentHandleRef, *, timeout_s: float) -> None:
        """Wait until every piece of ``ref`` is verified and written to its file.

        libtorrent 2.1 verifies blocks from its write buffer and reports "finished"
        before they reach the file; once complete, this asks for a flush and returns
        only when libtorrent confirms it (``cache_flushed_alert``), so reading
        :attr:`TorrentHandleRef.path` afterwards sees every byte. (Written, not
        fsynced: callers that need durability verify and fsync the file themselves.)

        Polls libtorrent in worker threads; alerts seen meanwhile are kept for
        :meth:`pop_events`.

        Raises:
            DownloadFailed: the torrent hit an error (disk, storage), or it is not
                complete after ``timeout_s`` (the message names the last web seed
                error, if any).
        """
        t = self._torrent(ref)
        last_url_error: str | None = None
        flush_requested = False
        with trio.move_on_after(timeout_s):
            while True:
                status, events, _, peers = await trio.to_thread.run_sync(self._sample, t)
                self._events.extend(events)
                t.peers.sample(peers)
                for event in events:
                    if event.info_hash != ref.info_hash:
                        continue
                    if event.kind == "url_seed":
                        last_url_error = event.message
                    elif event.kind == "cache_flushed" and flush_requested:
                        return
                if status.errc.value() != 0:
                    raise DownloadFailed(f"torrent {ref.name}: {status.errc.message()}")
                complete = status.is_seeding or (
                    status.is_finished and status.progress_ppm >= 1_000_000)
                if complete and not flush_requested:
                    await trio.to_thread.run_sync(t.handle.flush_cache)
                    flush_requested = True
                    continue
                await trio.sleep(_POLL_INTERVAL_S)
        state = "flushed" if flush_requested else "complete"
        detail = f"; last web seed error: {last_url_error}" if last_url_error else ""
        raise DownloadFailed(f"torrent {ref.name} not {state} after {timeout_s} s{detail}")

    def statistics(self, ref: TorrentHandleRef) -> SwarmStats:
        """Counters of ``ref`` now (see :class:`SwarmStats` for what they mean)."""
        t = self._torrent(ref)
        c = t.carried
        status, web, peers = self._read_torrent(t)
        t.peers.sample(peers)
        payload = c.payload_download + int(status.total_payload_download)
        from_peers = min(t.peers.total(), payload)
        return SwarmStats(
            state=_STATE_NAMES.get(int(status.state), str(status.state)),
            progress=status.progress_ppm / 1_000_000,
            is_seeding=bool(status.is_seeding),
            size_bytes=t.size_bytes,
            bytes_done=int(status.total_wanted_done),
            bytes_downloaded_total=c.total_download + int(status.total_download),
            bytes_downloaded_payload=payload,
            bytes_uploaded_total=c.total_upload + int(status.total_upload),
            bytes_uploaded_payload=c.payload_upload + int(status.total_payload_upload),
            bytes_from_web_seeds=payload - from_peers,
            bytes_from_peers=from_peers,
            bytes_failed=c.failed + int(status.total_failed_bytes),
            bytes_redundant=c.redundant + int(status.total_redundant_bytes),
            num_peers=len(peers),
            num_web_seeds=len(web),
            download_rate_bytes_per_s=int(status.download_payload_rate),
            upload_rate_bytes_per_s=int(status.upload_payload_rate),
        )

    def pop_events(self) -> list[SwarmEvent]:
        """Alerts since the last call, copied into :class:`SwarmEvent` (oldest first).

        At most the newest 10,000 are kept between calls; libtorrent drops alerts
        beyond its own queue size too.
        """
        self._check_open()
        self._events.extend(self._pop_alerts())
        events = list(self._events)
        self._events.clear()
        return events

    async def wait_news(self, timeout_s: float) -> None:
        """Return once libtorrent has queued an alert since the last :meth:`pop_events`
        (at once if it did already), or after ``timeout_s``. A loop that calls
        :meth:`pop_events` and then this one misses nothing: libtorrent signals each
        time its queue stops being empty."""
        self._check_open()
        with trio.move_on_after(timeout_s):
            await trio.lowlevel.wait_readable(self._news_r)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._news_r, 4096):
                pass

    def close(self) -> None:
        """Stop every torrent and the session. Idempotent; files stay on disk."""
        if self._closed:
            return
        self._closed = True
        for t in self._torrents.values():
            self._session.remove_torrent(t.handle)
        self._torrents.clear()
        self._session.pause()
        self._session = None  # libtorrent's threads end here: nothing writes the pipe
        with contextlib.suppress(RuntimeError):  # outside trio: nobody can be waiting
            trio.lowlevel.notify_closing(self._news_r)
        os.close(self._news_r)
        os.close(self._news_w)

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SwarmSession is closed")

    def _torrent(self, ref: TorrentHandleRef) -> _Torrent:
        self._check_open()
        try:
            return self._torrents[ref.info_hash]
        except KeyError:
            raise ValueError(f"torrent {ref.info_hash} is not in this session") from None

    def _sample(self, t: _Torrent) -> tuple[Any, list[SwarmEvent],
                                            dict[tuple[str, str], int],
                                            dict[tuple[str, str], int]]:
        # Runs in a worker thread: reads libtorrent, touches none of our state.
        events = self._pop_alerts()
        status, web, peers = self._read_torrent(t)
        return status, events, web, peers

    @staticmethod
    def _read_torrent(t: _Torrent) -> tuple[Any, dict[tuple[str, str], int],
                                            dict[tuple[str, str], int]]:
        status = t.handle.status()
        web: dict[tuple[str, str], int] = {}
        peers: dict[tuple[str, str], int] = {}
        for p in t.handle.get_peer_info():
            key = (str(p.ip[0]), str(p.ip[1]))
            if p.connection_type == lt.peer_info.standard_bittorrent:
                peers[key] = int(p.total_download)
            else:  # web_seed (BEP 19) or http_seed (BEP 17)
                web[key] = int(p.total_download)
        return status, web, peers

    def _pop_alerts(self) -> list[SwarmEvent]:
        # Alerts are only valid until the next pop_alerts(): copy under one lock.
        with self._alert_lock:
            session = self._session
            if session is None:
                return []
            return [_copy_alert(a) for a in session.pop_alerts()]


def _copy_alert(alert: Any) -> SwarmEvent:
    kind = str(alert.what())
    if kind.endswith("_alert"):
        kind = kind[: -len("_alert")]
    info_hash: str | None = None
    handle = getattr(alert, "handle", None)
    if handle is not None:
        try:
            if handle.is_valid():
                hashes = handle.info_hashes()
                info_hash = str(hashes.v2) if hashes.has_v2() else None
        except RuntimeError:
            info_hash = None
    piece = getattr(alert, "piece_index", None)
    url = getattr(alert, "server_url", None) or getattr(alert, "url", None)
    error: str | None = None
    err = getattr(alert, "error", None)
    if err is not None and hasattr(err, "value") and err.value() != 0:
        error = str(err.message())
    peer: str | None = None
    endpoint = getattr(alert, "endpoint", None) if isinstance(alert, lt.peer_alert) else None
    if isinstance(endpoint, tuple) and len(endpoint) == 2:
        peer = f"{endpoint[0]}:{endpoint[1]}"
    return SwarmEvent(
        kind=kind,
        message=str(alert.message()),
        info_hash=info_hash,
        piece=int(piece) if isinstance(piece, int) else None,
        url=str(url) if url else None,
        error=error,
        peer=peer,
    )
