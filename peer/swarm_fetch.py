"""Swarm download: chunks from LAN peers (libtorrent) and the origin at once, all verified.

The origin is the swarm's seed of last resort, but the agent talks to it itself instead
of handing libtorrent a BEP 19 web seed: libtorrent would fetch from the origin whatever
its picker wants on every device, and a fleet would pull the payload from the CDN once
per device. Here the agent fetches from the origin (HTTP Range, adjacent chunks in one
request) only chunks that **no connected peer has** and this device is not already
fetching. Devices downloading together split the payload without talking: its blocks
are dealt round robin over the sorted peer ids of the downloaders (:func:`owned_blocks`),
each fetches its own, and helps with the others' only once its share is done. The agent
verifies each chunk against the signed manifest and gives it to libtorrent
(:meth:`SwarmSession.add_piece`), which shares it with the LAN. Everything else comes
from peers; libtorrent checks every block against the torrent's Merkle tree (whose root,
the info-hash, is in the signed manifest) and bans peers that send bad data.

When peers cannot help, the origin finishes the job within bounds:

* peers delivered less than ``min_peer_rate_bytes_per_s`` of good data over the last
  ``stall_s`` seconds (none, silent, lying or slow peers): the origin may fetch any
  missing chunk, not only those nobody has, until peers deliver at that rate again;
* peers sent more than ``waste_budget_bytes`` of bad data (failed hash checks) or the
  swarm took longer than ``timeout_s``: the torrent is dropped and the rest comes
  from the origin with the direct downloader.

Peers that do not deliver are dropped: one that unchoked us and holds requests of ours
without sending a byte of them for ``silent_peer_s`` (silent, or stalled), or that
libtorrent snubbed (a request timed out), is blocked for the rest of the session
(:meth:`SwarmSession.block_hosts`): its connection is closed, the pieces it claimed
no longer count as available (so the origin fetches those nobody else has, split among
the downloaders as usual) and its requests go to other peers. A peer libtorrent banned
for bad data is blocked the same way, so that it stays out of every torrent of the
session.

Before the payload is used, every chunk of the assembled file is verified again against
the manifest's SHA-256 (a chunk that fails is fetched from the origin), and the whole
file, in one pass.

Progress survives a crash without fetching a verified piece twice: the next download
makes libtorrent hash the file it finds and keep every piece that matches the torrent's
Merkle tree (whose root is the signed info-hash), ~380 MB/s. libtorrent holds verified
pieces in memory until it writes them: the loop asks it to write new ones every 0.2 s,
and a clean stop waits until they are written, so a crash loses at most that much.
(libtorrent's own resume data is not used: it skips that check, goes stale when the
process dies, and in 2.1.1 it left out pieces added with ``add_piece``.)
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import trio

from swarmota.manifest import IntegrityError, Payload
from swarmota.peer.download import PayloadWorkdir, download_payload, prepare
from swarmota.peer.errors import DownloadFailed, ResourceFailed, VerifyFailed, resource_failure
from swarmota.peer.http import HttpClient
from swarmota.peer.swarm import (
    PieceView,
    SwarmEvent,
    SwarmSession,
    TorrentHandleRef,
    one_block_pieces,
    read_torrent,
    seniority,
)

__all__ = [
    "MAX_TORRENT_BYTES",
    "SwarmFetchStats",
    "SwarmOptions",
    "SwarmUnavailable",
    "announce_urls",
    "fetch_torrent",
    "first_run",
    "owned_blocks",
    "pick_origin_run",
    "senior_run_pieces",
    "swarm_download",
]

log = logging.getLogger(__name__)

MAX_TORRENT_BYTES = 4 * 1024 * 1024
PAYLOAD_FILE = "payload.part"
_TICK_S = 0.1  # the loop looks at least this often; sooner when libtorrent has news
_MIN_TICK_S = 0.02  # and at most this often (its CPU on a small device)
_QUICK_END_BYTES = 512 * 1024  # see _SwarmRun._pause
_WRITE_OUT_S = 10.0  # see _SwarmRun._write_out
_VERDICT_WAIT_S = 3.0  # see _SwarmRun._await_verdicts
_PROGRESS_EVERY_S = 0.5
_FLUSH_EVERY_S = 0.2
_ORIGIN_RUN_BYTES = 256 * 1024  # alone: large Range requests
_OWNER_BLOCK_BYTES = 64 * 1024  # with peers: blocks of this size are split among them
_ADDED_TTL_S = 2.0  # a piece handed to libtorrent counts as "ours" this long before `have`
_MAX_RESTARTS = 8  # see _SwarmRun._restart
_DOWNLOADER_MEMORY_S = 3.0  # see _SwarmRun._downloaders
_RESTART_AFTER_S = 1.0  # see _SwarmRun._restart


class SwarmUnavailable(DownloadFailed):
    """The swarm cannot be used for this payload (no torrent, or one that does not match
    the signed manifest); the caller downloads directly from the origin."""


@dataclass(frozen=True)
class SwarmOptions:
    """Knobs of one swarm download (from the device configuration)."""

    announce_urls: tuple[str, ...] = ()
    grace_s: float = 0.5
    stall_s: float = 10.0
    min_peer_rate_bytes_per_s: int = 32 * 1024
    timeout_s: float = 1800.0
    waste_budget_bytes: int = 16 * 1024 * 1024
    origin_parallel: int = 2
    help_after_s: float = 2.0
    silent_peer_s: float = 2.0
    direct_concurrency: int = 4
    attempts: int = 4
    backoff_s: float = 0.2
    spread_key: str = ""
    device_id: str | None = None
    """Added to each announce URL as ``device_id=...`` so that the tracker can admit the
    device to the swarm of a release rolled out in stages (and hand out its LAN peers
    first); ``None`` announces anonymously (only open rollouts then give peers)."""
    identity: tuple[bytes, bytes] | None = None
    """The device's fleet certificate and key (PEM): its TLS identity in a private swarm.
    Without one, a private swarm's payload comes from the origin."""


def announce_urls(urls: tuple[str, ...], device_id: str | None) -> tuple[str, ...]:
    """``urls`` with ``device_id=...`` added to each query (unchanged without an id)."""
    if device_id is None:
        return urls
    param = "device_id=" + quote(device_id, safe="")
    return tuple(f"{url}{'&' if '?' in url else '?'}{param}" for url in urls)


@dataclass
class SwarmFetchStats:
    """Where the bytes of one payload came from."""

    bytes_origin: int = 0
    bytes_peers: int = 0
    bytes_uploaded: int = 0
    chunks_reused: int = 0
    chunks_from_origin: int = 0
    chunks_rejected: int = 0
    pieces_failed_hash: int = 0
    banned_peers: list[str] = field(default_factory=list)
    dropped_peers: list[str] = field(default_factory=list)  # silent, stalled or snubbed
    fell_back: str | None = None
    seconds: float = 0.0
    transfer_s: float = 0.0  # until every piece was there, verified (before the final pass)


Progress = Callable[[dict[str, Any]], None]


def pick_origin_run(wanted: list[bool], cursor: int, max_pieces: int,
                    jitter: float = 0.5) -> list[int]:
    """The next adjacent pieces to fetch from the origin, or ``[]`` if none is wanted.

    Continues from ``cursor`` while it points at a wanted piece; otherwise jumps into the
    longest run of wanted pieces, at the fraction ``jitter`` (0 <= jitter < 1) of its
    length when it is longer than ``2 * max_pieces``, else at its start. Devices start
    at different cursors and draw different jitters, so they split the payload instead
    of fetching the same chunks; one that runs into pieces another device already has
    jumps to the largest gap left.
    """
    n = len(wanted)
    if n == 0 or max_pieces < 1:
        return []
    start = cursor % n
    if not wanted[start]:
        best_len = best_start = 0
        run_start, run_len = 0, 0
        for i, w in enumerate(wanted):
            if w:
                if run_len == 0:
                    run_start = i
                run_len += 1
                if run_len > best_len:
                    best_len, best_start = run_len, run_start
            else:
                run_len = 0
        if best_len == 0:
            return []
        start = best_start + int(jitter * best_len) if best_len > 2 * max_pieces else best_start
    run: list[int] = []
    i = start
    while i < n and wanted[i] and len(run) < max_pieces:
        run.append(i)
        i += 1
    return run


def senior_run_pieces(view: PieceView, *, others: bool, alone_for_s: float, grace_s: float,
                      stalled: bool, small: int, large: int) -> int:
    """How many adjacent pieces the senior downloader (or one alone so far) asks the
    origin for at once: ``small`` while a more senior downloader may still connect
    (it cannot see what this device has in flight), ``large`` (fewer requests, the link
    kept busy) once that is unlikely: ``grace_s`` passed since the torrent was ready,
    or the tracker answered, every peer it named is connected and ``others`` (other
    downloaders, none of them more senior) are there; or when peers stalled. A device
    alone so far keeps small runs for ``grace_s``: the others may not have announced
    yet."""
    if stalled or alone_for_s >= grace_s:
        return large
    if others and view.tracker_replied and view.known_peers <= view.num_peers:
        return large
    return small


def owned_blocks(num_blocks: int, me: bytes, others: Sequence[bytes]) -> list[bool]:
    """Which of ``num_blocks`` blocks ``me`` fetches from the origin, sharing with
    ``others`` (peer ids of the connected peers that are still downloading).

    Round robin over the sorted peer ids: with ``n`` downloaders, the one of rank ``k``
    owns blocks ``k, k + n, k + 2n, ...``. Peers that see the same set of downloaders
    agree on every owner without talking, and the shares differ by one block at most,
    so they finish together and each block is fetched from the origin once.
    """
    candidates = sorted({me, *others})
    rank, n = candidates.index(me), len(candidates)
    return [block % n == rank for block in range(num_blocks)]


def first_run(mask: Sequence[bool], max_pieces: int, start: int = 0) -> list[int]:
    """The first adjacent pieces set in ``mask`` at or after ``start`` (wrapping around
    to the beginning), at most ``max_pieces``."""
    n = len(mask)
    for step in range(n):
        first = (start + step) % n
        if mask[first]:
            end = first
            while end + 1 < n and mask[end + 1] and end + 1 - first < max_pieces:
                end += 1
            return list(range(first, end + 1))
    return []


async def swarm_download(
    session: SwarmSession,
    http: HttpClient,
    work: PayloadWorkdir,
    *,
    payload_url: str,
    options: SwarmOptions,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
    torrent: bytes | None = None,
) -> tuple[TorrentHandleRef | None, SwarmFetchStats]:
    """Download ``work.payload`` from peers and the origin into ``work.part``.

    ``torrent``: the payload's torrent as :func:`fetch_torrent` returned it (checked
    against the signed manifest), if the caller fetched it already; else it is fetched
    here.

    Returns the torrent (still in ``session``, seeding, for the caller to keep or
    remove; ``None`` if the origin had to finish the job) and the byte counts.

    Raises:
        SwarmUnavailable: the payload has no info-hash, its torrent cannot be fetched or
            does not match the signed manifest (nothing was downloaded).
        DownloadFailed, VerifyFailed: as :func:`peer.download.download_payload`, when the
            origin cannot finish the job.
        ResourceFailed: the work area cannot be written or read (libtorrent's storage
            error included: a full disk, an I/O error).
    """
    payload = work.payload
    stats = SwarmFetchStats()
    started = clock()
    received_before = http.bytes_received
    if torrent is None:
        torrent = await fetch_torrent(http, payload, payload_url + ".torrent")
    if work.part.exists():  # an earlier attempt: fix its size, count its verified chunks
        stats.chunks_reused = len(await prepare(work))
    else:  # libtorrent creates the file: no zeros for it to hash first
        try:
            work.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise resource_failure(f"creating {work.path}", exc) from exc
    try:
        ref = session.add_payload(
            torrent, work.path,
            trackers=announce_urls(options.announce_urls, options.device_id),
            file_name=PAYLOAD_FILE, torrent_urls=False, identity=options.identity)
    except ValueError as exc:  # e.g. a private swarm and no fleet identity
        raise SwarmUnavailable(f"cannot join the swarm of payload {payload.sha256[:12]}: "
                               f"{exc}") from exc
    run = _SwarmRun(session, http, work, ref, payload_url, options, stats, clock, progress,
                    started)
    try:
        complete = await run.run()
    finally:
        torrent_stats = session.statistics(ref)
        stats.bytes_peers = torrent_stats.bytes_downloaded_payload
        stats.bytes_uploaded = torrent_stats.bytes_uploaded_payload
    kept: TorrentHandleRef | None = ref
    if not complete:
        session.remove(ref)
        kept = None
        await _finish_direct(http, payload_url, work, options, stats)
        stats.transfer_s = clock() - started
    else:
        try:
            bad = await trio.to_thread.run_sync(work.verify_all)
        except IntegrityError as exc:
            raise VerifyFailed(str(exc)) from exc
        except (OSError, MemoryError) as exc:
            raise resource_failure(f"verifying {work.part}", exc) from exc
        if bad:
            log.warning("%d chunks failed verification after the swarm; fetching them "
                        "from the origin", len(bad))
            stats.chunks_rejected += len(bad)
            session.remove(ref)
            kept = None
            stats.fell_back = f"{len(bad)} chunks did not match the manifest"
            await _finish_direct(http, payload_url, work, options, stats)
    stats.bytes_origin = http.bytes_received - received_before
    stats.seconds = clock() - started
    return kept, stats


async def fetch_torrent(http: HttpClient, payload: Payload, url: str) -> bytes:
    """The torrent of ``payload`` from ``url``, checked against the signed manifest
    (info-hash, size, piece size), before anything of it is used.

    Raises:
        SwarmUnavailable: ``payload`` has no info-hash, or its torrent cannot be fetched
            or does not match.
    """
    if payload.info_hash is None:
        raise SwarmUnavailable(f"payload {payload.sha256[:12]} has no torrent")
    try:
        data = await http.get_bytes(url, max_bytes=MAX_TORRENT_BYTES)
        torrent = read_torrent(data)
    except (DownloadFailed, ValueError) as exc:
        raise SwarmUnavailable(f"torrent of payload {payload.sha256[:12]}: {exc}") from exc
    problems = []
    if torrent.info_hash != payload.info_hash:
        problems.append(f"info-hash {torrent.info_hash[:16]} is not the signed "
                        f"{payload.info_hash[:16]}")
    if torrent.size_bytes != payload.size:
        problems.append(f"size {torrent.size_bytes} is not {payload.size}")
    if torrent.piece_size_bytes != payload.chunk_size:
        problems.append(f"piece size {torrent.piece_size_bytes} is not the chunk size "
                        f"{payload.chunk_size}")
    if problems:
        raise SwarmUnavailable(f"torrent {url} refused: {'; '.join(problems)}")
    return data


async def _finish_direct(http: HttpClient, url: str, work: PayloadWorkdir,
                         options: SwarmOptions, stats: SwarmFetchStats) -> None:
    direct = await download_payload(
        http, url, work, concurrency=options.direct_concurrency,
        attempts=options.attempts, backoff_s=options.backoff_s)
    stats.chunks_from_origin += direct.chunks_fetched


class _SwarmRun:
    """The polling loop of one swarm download; owned by :func:`swarm_download`."""

    def __init__(self, session: SwarmSession, http: HttpClient, work: PayloadWorkdir,
                 ref: TorrentHandleRef, payload_url: str, options: SwarmOptions,
                 stats: SwarmFetchStats, clock: Callable[[], float],
                 progress: Progress | None, started: float) -> None:
        self.started_download = started
        self.session = session
        self.http = http
        self.work = work
        self.payload = work.payload
        self.ref = ref
        self.url = payload_url
        self.options = options
        self.stats = stats
        self.clock = clock
        self.progress = progress
        self.requesting: set[int] = set()  # asked of the origin, answer not yet in
        self.added: dict[int, float] = {}  # handed to libtorrent (when), not yet in `have`
        self.view: PieceView | None = None
        self.stalled = False
        self.rejected_bytes = 0
        self.origin_failures: dict[int, int] = {}
        self.given_up: set[int] = set()  # pieces whose origin attempts are used up
        self.failure: DownloadFailed | VerifyFailed | ResourceFailed | None = None
        self.http_before = http.bytes_received
        key = hashlib.sha256(options.spread_key.encode()).digest()
        self.rng = random.Random(key)
        self.cursor = int.from_bytes(key[:8], "big") % max(1, self.payload.chunk_count)
        self.max_run_alone = max(1, min(_ORIGIN_RUN_BYTES // self.payload.chunk_size, 16))
        self.block_pieces = max(1, _OWNER_BLOCK_BYTES // self.payload.chunk_size)
        self.owned: tuple[tuple[bytes, ...], list[bool]] | None = None
        self.share_done_at: float | None = None
        self.swarm_present = 0  # pieces here or at a connected peer, when last counted
        self.swarm_grew_at: float | None = None  # when that count last grew
        self.ready_at: float | None = None  # libtorrent done checking, origin workers on
        # per connected peer: piece bytes received, and since when no more came while
        # it unchoked us and held requests of ours
        self.peer_progress: dict[str, tuple[int, float]] = {}
        self.downloaders_seen: dict[bytes, float] = {}  # peer id: when last connected
        self.one_block = one_block_pieces(self.payload.chunk_size)
        # a ban, or a hash failure in a one-block torrent: the torrent is to restart
        self.poisoned_at: float | None = None
        self.banned_since_poisoned = False
        self.restarts = 0
        self.view_updated = trio.Event()  # set when the loop has a new view (workers wait)
        self.paused_at = float("-inf")

    async def run(self) -> bool:
        """True when libtorrent has every piece; False when the origin must finish.
        Verified pieces are written to the file on the way out, whatever the outcome."""
        try:
            complete = await self._loop()
        finally:
            if not isinstance(self.failure, ResourceFailed):  # else nothing gets written
                with trio.CancelScope(shield=True):
                    await self._write_out()
        if complete:
            await self.session.wait_complete(self.ref, timeout_s=60)
        self._handle_events(self.session.pop_events())  # bans seen while finishing
        await self._await_verdicts()
        return complete

    async def _await_verdicts(self) -> None:
        """Pieces failed their hash check and nobody is banned yet: libtorrent may still
        be deciding who sent the bad data (its hash checks run on its disk thread, late
        on a loaded device). Wait a little for that verdict, so that the pass reports the
        culprit; bounded, and only after an attack."""
        if not self.stats.pieces_failed_hash or self.stats.banned_peers:
            return
        with trio.move_on_after(_VERDICT_WAIT_S):
            while not self.stats.banned_peers:
                await trio.sleep(_TICK_S)
                self._handle_events(self.session.pop_events())

    async def _loop(self) -> bool:
        start = self.clock()
        peer_bytes: deque[tuple[float, int]] = deque()  # (time, useful bytes from peers)
        last_progress = last_flush = 0.0
        flushed = 0
        ready = workers = False
        async with trio.open_nursery() as nursery:
            while not self._failed_and_settled():
                now = self.clock()
                view = await trio.to_thread.run_sync(self.session.pieces, self.ref)
                self._handle_events(self.session.pop_events())
                if view.error is not None:  # libtorrent cannot use the file: ENOSPC, EIO
                    self.failure = ResourceFailed(f"swarm download of {self.payload.sha256[:12]}"
                                                  f" into {self.work.part}: {view.error} "
                                                  "(device resources)")
                    break
                if view.checking or len(view.have) != self.payload.chunk_count:
                    await self._pause()
                    continue
                if self._restart_due(now):
                    await self._restart()
                    continue
                self.view = view
                self.view_updated.set()
                self.view_updated = trio.Event()
                self._drop_silent_peers(view, now)
                self._count_swarm(view, now)
                have = sum(view.have)
                if not ready:  # pieces kept from an earlier run (libtorrent checked the file)
                    ready = True
                    self.stats.chunks_reused = max(self.stats.chunks_reused, have)
                if have == len(view.have):
                    self.stats.transfer_s = now - self.started_download
                    nursery.cancel_scope.cancel()
                    return True
                if have > flushed and now - last_flush >= _FLUSH_EVERY_S:
                    # new verified pieces are only in memory: a crash would lose them
                    last_flush, flushed = now, have
                    self.session.flush(self.ref)
                if self.progress is not None and now - last_progress >= _PROGRESS_EVERY_S:
                    last_progress = now
                    self._report_progress(view.num_peers, have)
                reason = self._give_up_reason(now - start)
                if reason is not None:
                    log.warning("swarm download of %s stopped: %s; the origin finishes it",
                                self.payload.sha256[:12], reason)
                    self.stats.fell_back = reason
                    nursery.cancel_scope.cancel()
                    return False
                self.stalled = self._peers_too_slow(peer_bytes, now, view, start)
                if not workers:
                    workers = True
                    self.ready_at = now
                    for _ in range(self.options.origin_parallel):
                        nursery.start_soon(self._origin_worker)
                await self._pause()
            nursery.cancel_scope.cancel()
        assert self.failure is not None
        raise self.failure

    async def _pause(self) -> None:
        """Until libtorrent has news (a piece verified, a peer connected, the tracker's
        answer) or ``_TICK_S`` passed, and at least ``_MIN_TICK_S`` since the last
        pause ended, while the download starts (no piece here yet) and in its last
        ``_QUICK_END_BYTES``: the first origin request goes out when the
        tracker answers, and the download ends when its last piece is verified, not at
        the next tick. In between, a look every ``_TICK_S`` is enough (the origin
        workers fetch back to back), and its CPU is a fifth (a 21 MB download on 16
        devices: 0.3 s of CPU per device more when every piece woke the loop)."""
        await self.session.wait_news(_TICK_S)
        view = self.view
        missing = 0 if view is None else view.have.count(False)
        quick = (view is None or missing == len(view.have)
                 or missing * self.payload.chunk_size <= _QUICK_END_BYTES)
        rest = self.paused_at + (_MIN_TICK_S if quick else _TICK_S) - trio.current_time()
        if rest > 0:
            await trio.sleep(rest)
        self.paused_at = trio.current_time()

    def _failed_and_settled(self) -> bool:
        """A piece failed for good, and nothing useful is still under way: no origin
        request in flight, and (after bad data for one piece: the origin itself works)
        no other missing piece left to fetch. Keeping on until then means the next pass
        resumes with every chunk this one could get, not with whatever happened to be
        fetched when the failure came."""
        if self.failure is None or self.requesting:
            return False
        if isinstance(self.failure, DownloadFailed) or self.view is None:
            return True  # the origin is failing: no new requests (_next_origin_run)
        return all(have or i in self.given_up or i in self.added
                   for i, have in enumerate(self.view.have))

    def _restart_due(self, now: float) -> bool:
        """libtorrent banned a peer, or a piece failed its hash check in a torrent with
        one-block pieces and the culprit was banned (or a second passed): time to
        restart the torrent."""
        if self.poisoned_at is None or self.restarts >= _MAX_RESTARTS:
            return False
        return self.banned_since_poisoned or now - self.poisoned_at >= _RESTART_AFTER_S

    async def _restart(self) -> None:
        """Restart the torrent after libtorrent banned a peer, or after a hash failure in
        a torrent with one-block pieces. The verified pieces are written out first and
        kept (libtorrent hashes the file again); the liar stays blocked (its ban blocked
        its address for the session). At most ``_MAX_RESTARTS`` times per download.

        After a ban: the liar's blocks stay in pieces it had not finished, and whoever
        finishes such a piece shares the blame for its failure; libtorrent blamed and
        banned honest devices that way (four liars among eight devices: an honest device
        banned in 5 runs of 10). A new torrent starts without partial pieces and with a
        clean record for every peer (0 honest bans in 10 such runs).

        One-block pieces: libtorrent would otherwise cut off every honest peer, one after
        the other, for as long as the torrent lives (:func:`peer.swarm.one_block_pieces`),
        and each device would fetch the whole payload from the origin on its own."""
        self.restarts += 1
        self.poisoned_at = None
        self.banned_since_poisoned = False
        reason = ("one-block pieces: libtorrent would cut off the honest peers"
                  if self.one_block else
                  "a peer was banned: its unfinished pieces would taint honest peers")
        log.warning("restarting the torrent of %s after a hash failure (%s); restart %d of "
                    "at most %d", self.payload.sha256[:12], reason, self.restarts,
                    _MAX_RESTARTS)
        await self._write_out()
        self.session.restart(self.ref)
        self.peer_progress.clear()

    def _drop_silent_peers(self, view: PieceView, now: float) -> None:
        """Block peers that unchoked us and hold our requests without sending anything
        for ``silent_peer_s``, or that libtorrent snubbed."""
        silent = []
        for peer in view.peers:
            seen = self.peer_progress.get(peer.endpoint)
            if (seen is None or peer.bytes_received > seen[0] or peer.choking_us
                    or not peer.requests_pending):
                self.peer_progress[peer.endpoint] = (peer.bytes_received, now)
                if not peer.snubbed:
                    continue
            elif now - seen[1] < self.options.silent_peer_s and not peer.snubbed:
                continue
            silent.append(peer)
        if not silent:
            return
        self.session.block_hosts([peer.host for peer in silent])
        for peer in silent:
            self.peer_progress.pop(peer.endpoint, None)
            if peer.endpoint not in self.stats.dropped_peers:
                self.stats.dropped_peers.append(peer.endpoint)
            why = "snubbed" if peer.snubbed else (
                f"unchoked us, held {peer.requests_pending} requests and sent nothing "
                f"for {self.options.silent_peer_s:g} s")
            log.warning("dropped peer %s (%s)", peer.endpoint, why)

    def _peers_too_slow(self, samples: deque[tuple[float, int]], now: float,
                        view: PieceView, start: float) -> bool:
        """Did peers deliver less than the minimum rate over the last ``stall_s``, while
        they held pieces this device misses? (Never before ``stall_s`` has passed; peers
        that hold nothing it needs are not slow: the downloader fetching from the origin
        for the others gets nothing from them.) Only good data from peers counts: the
        origin's chunks and bad or redundant blocks do not."""
        samples.append((now, view.bytes_useful_from_peers))
        window = self.options.stall_s
        while len(samples) > 1 and samples[1][0] <= now - window:
            samples.popleft()
        if now - start < window:
            return False
        if not any(a and not h for h, a in zip(view.have, view.availability, strict=True)):
            return False
        gained = samples[-1][1] - samples[0][1]
        return gained < self.options.min_peer_rate_bytes_per_s * window

    def _next_origin_run(self) -> list[int]:
        """Claim the next pieces to fetch from the origin, or ``[]`` for now.

        Only pieces no connected peer has and nobody here is fetching already, and only
        by one downloader: the **senior** one, whose peer id is the oldest (made when
        its torrent was added)
        (:func:`peer.swarm.seniority`: every peer reads it from the others' peer ids, so
        they agree without talking, and a device that joins later never takes the job
        over). The others trade what it fetched. One origin stream is enough: devices
        downloading together share the link to the origin, and several of them fetching
        at once only ever fetched the same chunks twice (a device cannot see what
        another is fetching, only what it has). The senior fetches runs from its cursor
        (small ones while peers may still be connecting).

        The others fetch from the origin only when the swarm has gained no piece for
        ``help_after_s`` (the senior is slow, gone or silent), or when peers that hold
        pieces this device misses deliver too little (stalled): then the missing pieces
        are split among the downloaders (:func:`owned_blocks`); each fetches its own
        blocks and helps with the others' only once its share is done and
        ``help_after_s`` has passed. A senior that is gone is forgotten after
        ``_DOWNLOADER_MEMORY_S``, and the next one takes over.
        """
        view = self.view
        if view is None or isinstance(self.failure, DownloadFailed):
            return []
        now = self.clock()
        self.added = {i: t for i, t in self.added.items()
                      if not view.have[i] and now - t < _ADDED_TTL_S}
        wanted = [not have and i not in self.requesting and i not in self.added
                  and i not in self.given_up and (self.stalled or view.availability[i] == 0)
                  for i, have in enumerate(view.have)]
        downloaders = self._downloaders(view, now)
        rank = seniority(self.session.peer_id)
        followed = any(seniority(d) < rank for d in downloaders)
        if followed and not self.stalled and not self._swarm_idle(now):
            return []  # the senior downloader fetches from the origin
        if not downloaders or not (followed or self.stalled):
            # The senior downloader, or alone so far. For ``grace_s``, peers may still be
            # on their way: wait for the tracker's answer and for the peers it named to
            # connect (a seed among them makes the origin unnecessary, a senior one takes
            # the job), then small runs (a senior that connects now takes over from here,
            # and cannot see what this device has in flight). A stalled swarm waits no
            # more.
            alone_for = now - (self.ready_at or now)
            if not self.stalled and alone_for < self.options.grace_s and (
                    not view.tracker_replied or view.known_peers > view.num_peers):
                return []
            max_run = senior_run_pieces(
                view, others=bool(downloaders), alone_for_s=alone_for,
                grace_s=self.options.grace_s, stalled=self.stalled,
                small=self.block_pieces, large=self.max_run_alone)
            pick = wanted
        else:
            # Helping (or stalled): owners walk their blocks from their own (random)
            # cursor: while the set of downloaders changes (peers connecting), a block
            # that moves to a new owner is rarely the one its old owner is fetching.
            owned = self._owned_pieces(downloaders)
            mine = [w and o for w, o in zip(wanted, owned, strict=True)]
            run = first_run(mine, self.block_pieces, self.cursor)
            if run:
                self.share_done_at = None
            else:
                if self.share_done_at is None:
                    self.share_done_at = now
                if now - self.share_done_at >= self.options.help_after_s:
                    run = self._help_run(wanted)
            return self._claim(run)
        return self._claim(
            pick_origin_run(pick, self.cursor, max_run, self.rng.random()) if pick else [])

    def _count_swarm(self, view: PieceView, now: float) -> None:
        """Note how many pieces are here or at a connected peer, and when that changed
        (grew, or shrank: a peer that claimed pieces left or was dropped, and the
        senior downloader needs the time to fetch them)."""
        present = sum(1 for h, a in zip(view.have, view.availability, strict=True)
                      if h or a)
        if present != self.swarm_present or self.swarm_grew_at is None:
            self.swarm_present, self.swarm_grew_at = present, now

    def _swarm_idle(self, now: float) -> bool:
        """True when the pieces in the swarm (here or at a connected peer) have not
        changed for ``help_after_s`` (pieces are missing: this is asked while
        downloading)."""
        return (self.swarm_grew_at is not None
                and now - self.swarm_grew_at >= self.options.help_after_s)

    def _downloaders(self, view: PieceView, now: float) -> tuple[bytes, ...]:
        """The other downloaders to split the origin's work with: those connected now,
        and those connected within ``_DOWNLOADER_MEMORY_S`` (connections churn: a
        restart, a disconnect; a device that forgot its peers at once would fetch the
        whole rest alone, and so would each of them). A departed one's share is taken
        over after ``help_after_s``, as a slow one's."""
        for peer_id in view.downloading_peer_ids:
            self.downloaders_seen[peer_id] = now
        for peer_id, seen in list(self.downloaders_seen.items()):
            if now - seen >= _DOWNLOADER_MEMORY_S:
                del self.downloaders_seen[peer_id]
        return tuple(sorted(self.downloaders_seen))

    def _help_run(self, wanted: list[bool]) -> list[int]:
        """A block still missing, at random (so that helpers spread), from its first
        missing piece."""
        starts = [i for i, w in enumerate(wanted)
                  if w and (i % self.block_pieces == 0 or not wanted[i - 1])]
        if not starts:
            return []
        return first_run(wanted, self.block_pieces, self.rng.choice(starts))

    def _claim(self, run: list[int]) -> list[int]:
        if run:
            self.requesting.update(run)
            self.cursor = run[-1] + 1
        return run

    def _owned_pieces(self, others: tuple[bytes, ...]) -> list[bool]:
        if self.owned is None or self.owned[0] != others:
            n = self.payload.chunk_count
            blocks = owned_blocks(-(-n // self.block_pieces), self.session.peer_id, others)
            self.owned = (others, [blocks[i // self.block_pieces] for i in range(n)])
        return self.owned[1]

    async def _origin_worker(self) -> None:
        """One of ``origin_parallel`` loops: fetch a run, verify, hand it over, repeat."""
        while True:
            run = self._next_origin_run()
            if not run:
                with trio.move_on_after(_TICK_S):
                    await self.view_updated.wait()
                continue
            try:
                await self._fetch_from_origin(run)
            finally:
                self.requesting.difference_update(run)

    def _give_up_reason(self, elapsed: float) -> str | None:
        if elapsed >= self.options.timeout_s:
            return f"no complete payload after {self.options.timeout_s:.0f} s"
        # Redundant blocks (end-game duplicates) are LAN traffic, not harm: only bad data
        # from peers and refused origin chunks count against the budget.
        assert self.view is not None
        wasted = self.view.bytes_failed + self.rejected_bytes
        if wasted > self.options.waste_budget_bytes:
            return (f"{wasted} bytes of bad data, over the budget of "
                    f"{self.options.waste_budget_bytes}")
        return None

    async def _fetch_from_origin(self, run: list[int]) -> None:
        """Fetch adjacent pieces ``run`` in one request; each piece is verified and
        handed to libtorrent as soon as its bytes are in, so that peers have the first
        ones while the rest is on its way (and a cut answer keeps those)."""
        start, _ = self.payload.chunk_span(run[0])
        end, end_len = self.payload.chunk_span(run[-1])
        taken = 0  # pieces of ``run`` handled so far

        def take(data: bytes | bytearray) -> None:
            nonlocal taken
            while taken < len(run):
                offset, length = self.payload.chunk_span(run[taken])
                if offset - start + length > len(data):
                    return
                self._take_origin_piece(run[taken],
                                        bytes(data[offset - start:offset - start + length]))
                taken += 1

        try:
            take(await self.http.get_range(self.url, start, end + end_len - start,
                                           on_data=take))
        except DownloadFailed as exc:
            first = run[min(taken, len(run) - 1)]  # the first piece that did not come
            log.warning("origin chunks %d-%d: %s", first, run[-1], exc)
            if self._count_failure(first):
                self._fail(DownloadFailed(f"chunk {first} not fetched after "
                                          f"{self.options.attempts} attempts: {exc}"))
            await trio.sleep(self._backoff(first))

    def _take_origin_piece(self, index: int, chunk: bytes) -> None:
        """Verify a piece from the origin and hand it to libtorrent (or count it bad)."""
        try:
            self.payload.verify_chunk(index, chunk)
        except IntegrityError as exc:
            log.warning("origin chunk %d refused: %s", index, exc)
            self.rejected_bytes += len(chunk)
            self.stats.chunks_rejected += 1
            if self._count_failure(index):
                self._fail(VerifyFailed(f"chunk {index} failed verification "
                                        f"{self.options.attempts} times: {exc}"))
            return
        self.session.add_piece(self.ref, index, chunk)
        self.added[index] = self.clock()
        self.stats.chunks_from_origin += 1

    def _count_failure(self, index: int) -> bool:
        """Count a failed origin attempt at ``index``; True when attempts are used up
        (the piece is then not asked of the origin again in this pass)."""
        self.origin_failures[index] = self.origin_failures.get(index, 0) + 1
        if self.origin_failures[index] < self.options.attempts:
            return False
        self.given_up.add(index)
        return True

    def _fail(self, failure: DownloadFailed | VerifyFailed) -> None:
        """Record the pass's failure; a transport failure outranks bad data (it stops
        all new origin requests), otherwise the first one is kept."""
        if self.failure is None or (isinstance(failure, DownloadFailed)
                                    and not isinstance(self.failure, DownloadFailed)):
            self.failure = failure

    def _backoff(self, index: int) -> float:
        return float(self.options.backoff_s * 2 ** (self.origin_failures.get(index, 1) - 1))

    def _handle_events(self, events: list[SwarmEvent]) -> None:
        for event in events:
            if event.info_hash not in (None, self.ref.info_hash):
                continue
            if event.kind == "hash_failed":
                self.stats.pieces_failed_hash += 1
                if self.one_block and self.poisoned_at is None:
                    self.poisoned_at = self.clock()
            elif (event.kind == "peer_ban" and event.peer
                  and event.peer not in self.stats.banned_peers):
                self.stats.banned_peers.append(event.peer)
                self.session.block_hosts([event.peer.rsplit(":", 1)[0].strip("[]")])
                if not self.one_block and self.poisoned_at is None:
                    self.poisoned_at = self.clock()
                self.banned_since_poisoned = self.poisoned_at is not None
                log.warning("banned peer %s (sent data that failed verification)", event.peer)

    async def _write_out(self) -> None:
        """Wait (at most ~10 s each) until the pieces handed to libtorrent are verified
        and every verified piece is written to the file. Generous: a piece verified but
        not written is fetched again by the next pass, and a loaded device can take
        seconds here (2 s lost pieces in about one full test run of four)."""
        with trio.move_on_after(_WRITE_OUT_S):
            while self.added:
                view = await trio.to_thread.run_sync(self.session.pieces, self.ref)
                self.added = {i: t for i, t in self.added.items() if not view.have[i]}
                if self.added:
                    await trio.sleep(_TICK_S / 2)
        await self.session.flush_and_wait(self.ref, timeout_s=_WRITE_OUT_S)

    def _report_progress(self, num_peers: int, have: int) -> None:
        assert self.progress is not None
        s = self.session.statistics(self.ref)
        self.progress({
            "phase": "downloading", "mode": "swarm",
            "payload": self.payload.sha256[:12], "kind": self.payload.kind,
            "size": self.payload.size, "chunks_total": self.payload.chunk_count,
            "chunks_done": have, "bytes_peers": s.bytes_downloaded_payload,
            "bytes_origin": self.http.bytes_received - self.http_before, "peers": num_peers,
            "download_rate_bytes_per_s": s.download_rate_bytes_per_s,
            "upload_rate_bytes_per_s": s.upload_rate_bytes_per_s,
            "banned_peers": list(self.stats.banned_peers),
            "dropped_peers": list(self.stats.dropped_peers),
        })
