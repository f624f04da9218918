"""Swarm download: chunks from LAN peers (libtorrent) and the origin at once, all verified.

The origin is the swarm's seed of last resort, but the agent talks to it itself instead
of handing libtorrent a BEP 19 web seed: libtorrent would fetch from the origin whatever
its picker wants on every device, and a fleet would pull the payload from the CDN once
per device. Here the agent fetches from the origin (HTTP Range, adjacent chunks in one
request) only chunks that **no connected peer has** and this device is not already
fetching, picked so that devices spread over the payload (:func:`pick_origin_run`),
verifies each against the signed manifest and gives it to libtorrent
(:meth:`SwarmSession.add_piece`), which shares it with the LAN. Everything else comes
from peers; libtorrent checks every block against the torrent's Merkle tree (whose root,
the info-hash, is in the signed manifest) and bans peers that send bad data.

When peers cannot help, the origin finishes the job within bounds:

* no piece arrived from peers for ``stall_s`` seconds: the origin may fetch any missing
  chunk, not only those nobody has;
* peers wasted more than ``waste_budget_bytes`` (failed hash checks, redundant blocks) or
  the swarm took longer than ``timeout_s``: the torrent is dropped and the rest comes
  from the origin with the direct downloader.

Before the payload is used, every chunk of the assembled file is verified again against
the manifest's SHA-256 (a chunk that fails is fetched from the origin), then the whole
file. Progress survives a crash: libtorrent's resume data is saved every few seconds in
``WORK/resume.dat``, and on restart the pieces it lists (or, without it, the valid
pieces found by hashing the file) are kept.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from infra.fsio import atomic_write_bytes
from manifest import IntegrityError, Payload
from peer.download import PayloadWorkdir, download_payload
from peer.errors import DownloadFailed, VerifyFailed
from peer.http import HttpClient
from peer.swarm import SwarmEvent, SwarmSession, TorrentHandleRef, read_torrent

__all__ = [
    "MAX_TORRENT_BYTES",
    "SwarmFetchStats",
    "SwarmOptions",
    "SwarmUnavailable",
    "pick_origin_run",
    "swarm_download",
]

log = logging.getLogger(__name__)

MAX_TORRENT_BYTES = 4 * 1024 * 1024
PAYLOAD_FILE = "payload.part"
_TICK_S = 0.1
_RESUME_EVERY_S = 2.0
_PROGRESS_EVERY_S = 0.5
_ORIGIN_RUN_BYTES = 256 * 1024  # small runs: other devices see our pieces soon


class SwarmUnavailable(DownloadFailed):
    """The swarm cannot be used for this payload (no torrent, or one that does not match
    the signed manifest); the caller downloads directly from the origin."""


@dataclass(frozen=True)
class SwarmOptions:
    """Knobs of one swarm download (from the device configuration)."""

    announce_urls: tuple[str, ...] = ()
    grace_s: float = 0.5
    stall_s: float = 10.0
    timeout_s: float = 1800.0
    waste_budget_bytes: int = 16 * 1024 * 1024
    origin_parallel: int = 2
    direct_concurrency: int = 4
    attempts: int = 4
    backoff_s: float = 0.2
    spread_key: str = ""


@dataclass
class SwarmFetchStats:
    """Where the bytes of one payload came from."""

    bytes_origin: int = 0
    bytes_peers: int = 0
    chunks_reused: int = 0
    chunks_from_origin: int = 0
    chunks_rejected: int = 0
    pieces_failed_hash: int = 0
    banned_peers: list[str] = field(default_factory=list)
    fell_back: str | None = None
    seconds: float = 0.0


Progress = Callable[[dict[str, Any]], None]


def pick_origin_run(wanted: list[bool], cursor: int, max_pieces: int) -> list[int]:
    """The next adjacent pieces to fetch from the origin, or ``[]`` if none is wanted.

    Continues from ``cursor`` while it points at a wanted piece; otherwise starts in the
    middle of the longest run of wanted pieces, so that devices which begin at different
    places (their ``cursor``) split the payload instead of fetching the same chunks.
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
        start = best_start + best_len // 2 if best_len > 2 * max_pieces else best_start
    run: list[int] = []
    i = start
    while i < n and wanted[i] and len(run) < max_pieces:
        run.append(i)
        i += 1
    return run


async def swarm_download(
    session: SwarmSession,
    http: HttpClient,
    work: PayloadWorkdir,
    *,
    payload_url: str,
    options: SwarmOptions,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[TorrentHandleRef | None, SwarmFetchStats]:
    """Download ``work.payload`` from peers and the origin into ``work.part``.

    Returns the torrent (still in ``session``, seeding, for the caller to keep or
    remove; ``None`` if the origin had to finish the job) and the byte counts.

    Raises:
        SwarmUnavailable: the payload has no info-hash, its torrent cannot be fetched or
            does not match the signed manifest (nothing was downloaded).
        DownloadFailed, VerifyFailed: as :func:`peer.download.download_payload`, when the
            origin cannot finish the job.
    """
    payload = work.payload
    stats = SwarmFetchStats()
    started = clock()
    received_before = http.bytes_received
    torrent = await _fetch_torrent(http, payload, payload_url + ".torrent")
    done = await trio.to_thread.run_sync(work.prepare)
    stats.chunks_reused = len(done)
    resume = work.path / "resume.dat"
    resume_data = resume.read_bytes() if resume.exists() else None
    ref = session.add_payload(torrent, work.path, trackers=options.announce_urls,
                              file_name=PAYLOAD_FILE, torrent_urls=False,
                              resume_data=resume_data)
    run = _SwarmRun(session, http, work, ref, payload_url, options, stats, clock, progress)
    try:
        complete = await run.run()
    finally:
        stats.bytes_peers = session.statistics(ref).bytes_downloaded_payload
    kept: TorrentHandleRef | None = ref
    if not complete:
        session.remove(ref)
        kept = None
        await _finish_direct(http, payload_url, work, options, stats)
    else:
        bad = await trio.to_thread.run_sync(_verify_chunks, work)
        if bad:
            log.warning("%d chunks failed verification after the swarm; fetching them "
                        "from the origin", len(bad))
            stats.chunks_rejected += len(bad)
            session.remove(ref)
            kept = None
            stats.fell_back = f"{len(bad)} chunks did not match the manifest"
            await _finish_direct(http, payload_url, work, options, stats)
        else:
            try:
                await trio.to_thread.run_sync(work.verify_whole)
            except IntegrityError as exc:
                raise VerifyFailed(str(exc)) from exc
    stats.bytes_origin = http.bytes_received - received_before
    stats.seconds = clock() - started
    return kept, stats


async def _fetch_torrent(http: HttpClient, payload: Payload, url: str) -> bytes:
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


def _verify_chunks(work: PayloadWorkdir) -> list[int]:
    """Check every chunk of the file against the manifest; log the good ones."""
    payload = work.payload
    bad: list[int] = []
    good: list[str] = []
    with open(work.part, "rb") as fh:
        for index in range(payload.chunk_count):
            offset, length = payload.chunk_span(index)
            fh.seek(offset)
            if hashlib.sha256(fh.read(length)).hexdigest() == payload.chunks[index]:
                good.append(f"{index}\n")
            else:
                bad.append(index)
    with open(work.log, "w") as fh:
        fh.writelines(good)
    return bad


class _SwarmRun:
    """The polling loop of one swarm download; owned by :func:`swarm_download`."""

    def __init__(self, session: SwarmSession, http: HttpClient, work: PayloadWorkdir,
                 ref: TorrentHandleRef, payload_url: str, options: SwarmOptions,
                 stats: SwarmFetchStats, clock: Callable[[], float],
                 progress: Progress | None) -> None:
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
        self.in_flight: set[int] = set()
        self.rejected_bytes = 0
        self.origin_failures: dict[int, int] = {}
        self.failure: DownloadFailed | VerifyFailed | None = None
        self.http_before = http.bytes_received
        key = hashlib.sha256(options.spread_key.encode()).digest()
        self.cursor = int.from_bytes(key[:8], "big") % max(1, self.payload.chunk_count)
        self.max_run = max(1, min(_ORIGIN_RUN_BYTES // self.payload.chunk_size, 16))

    async def run(self) -> bool:
        """True when libtorrent has every piece; False when the origin must finish.
        Resume data is saved on the way out, whatever the outcome."""
        try:
            complete = await self._loop()
        finally:
            with trio.CancelScope(shield=True):
                await self._save_resume()
        if complete:
            await self.session.wait_complete(self.ref, timeout_s=60)
        return complete

    async def _loop(self) -> bool:
        start = self.clock()
        last_gain = start
        last_have = -1
        last_resume = last_progress = 0.0
        ready = False
        async with trio.open_nursery() as nursery:
            while self.failure is None:
                now = self.clock()
                view = await trio.to_thread.run_sync(self.session.pieces, self.ref)
                self._handle_events(self.session.pop_events())
                if view.checking or len(view.have) != self.payload.chunk_count:
                    await trio.sleep(_TICK_S)
                    continue
                have = sum(view.have)
                if not ready:  # pieces kept from an earlier run (resume data or file check)
                    ready = True
                    self.stats.chunks_reused = max(self.stats.chunks_reused, have)
                if have == len(view.have):
                    nursery.cancel_scope.cancel()
                    return True
                if have > last_have:
                    last_have, last_gain = have, now
                if now - last_resume >= _RESUME_EVERY_S:
                    last_resume = now
                    self.session.request_resume_data(self.ref)
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
                if now - start >= self.options.grace_s:
                    self._start_origin_fetches(nursery, view.have, view.availability,
                                               stalled=now - last_gain >= self.options.stall_s)
                await trio.sleep(_TICK_S)
            nursery.cancel_scope.cancel()
        raise self.failure

    def _start_origin_fetches(self, nursery: trio.Nursery, have: tuple[bool, ...],
                              availability: tuple[int, ...], *, stalled: bool) -> None:
        """Fetch from the origin what no peer has (anything missing once stalled)."""
        wanted = [not h and i not in self.in_flight and (stalled or availability[i] == 0)
                  for i, h in enumerate(have)]
        while len(self.in_flight) < self.options.origin_parallel:
            run = pick_origin_run(wanted, self.cursor, self.max_run)
            if not run:
                return
            for i in run:
                wanted[i] = False
            self.in_flight.update(run)
            self.cursor = run[-1] + 1
            nursery.start_soon(self._fetch_from_origin, run)

    def _give_up_reason(self, elapsed: float) -> str | None:
        if elapsed >= self.options.timeout_s:
            return f"no complete payload after {self.options.timeout_s:.0f} s"
        s = self.session.statistics(self.ref)
        wasted = s.bytes_failed + s.bytes_redundant + self.rejected_bytes
        if wasted > self.options.waste_budget_bytes:
            return (f"{wasted} bytes wasted (bad or redundant data), over the budget of "
                    f"{self.options.waste_budget_bytes}")
        return None

    async def _fetch_from_origin(self, run: list[int]) -> None:
        start, _ = self.payload.chunk_span(run[0])
        end, end_len = self.payload.chunk_span(run[-1])
        try:
            data = await self.http.get_range(self.url, start, end + end_len - start)
        except DownloadFailed as exc:
            log.warning("origin chunks %d-%d: %s", run[0], run[-1], exc)
            if self._count_failure(run[0]):
                self.failure = DownloadFailed(f"chunk {run[0]} not fetched after "
                                              f"{self.options.attempts} attempts: {exc}")
            await trio.sleep(self._backoff(run[0]))
            self.in_flight.difference_update(run)
            return
        for index in run:
            offset, length = self.payload.chunk_span(index)
            chunk = data[offset - start:offset - start + length]
            try:
                self.payload.verify_chunk(index, chunk)
            except IntegrityError as exc:
                log.warning("origin chunk %d refused: %s", index, exc)
                self.rejected_bytes += len(chunk)
                self.stats.chunks_rejected += 1
                if self._count_failure(index):
                    self.failure = VerifyFailed(f"chunk {index} failed verification "
                                                f"{self.options.attempts} times: {exc}")
                continue
            self.session.add_piece(self.ref, index, chunk)
            self.stats.chunks_from_origin += 1
        # Keep the pieces marked until libtorrent has them (hashing takes a moment).
        await trio.sleep(_TICK_S * 3)
        self.in_flight.difference_update(run)

    def _count_failure(self, index: int) -> bool:
        """Count a failed origin attempt at ``index``; True when attempts are used up."""
        self.origin_failures[index] = self.origin_failures.get(index, 0) + 1
        return self.origin_failures[index] >= self.options.attempts

    def _backoff(self, index: int) -> float:
        return float(self.options.backoff_s * 2 ** (self.origin_failures.get(index, 1) - 1))

    def _handle_events(self, events: list[SwarmEvent]) -> None:
        for event in events:
            if event.info_hash not in (None, self.ref.info_hash):
                continue
            if event.kind == "hash_failed":
                self.stats.pieces_failed_hash += 1
            elif event.kind == "peer_ban" and event.peer:
                if event.peer not in self.stats.banned_peers:
                    self.stats.banned_peers.append(event.peer)
                    log.warning("banned peer %s (sent data that failed verification)",
                                event.peer)
            elif event.kind == "save_resume_data" and event.resume_data:
                atomic_write_bytes(self.work.path / "resume.dat", event.resume_data)

    async def _save_resume(self) -> None:
        self.session.request_resume_data(self.ref)
        with trio.move_on_after(2):
            while True:
                events = self.session.pop_events()
                self._handle_events(events)
                if any(e.kind == "save_resume_data" for e in events):
                    return
                await trio.sleep(_TICK_S)

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
        })
