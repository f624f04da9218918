"""Download a payload's chunks from the origin, verify each, assemble with resume.

Chunks land in ``WORK/payload.part`` at their offsets; each chunk is verified against
the signed manifest *before* it is written, and its index is then appended to
``WORK/verified.log``. ``WORK`` is named after the payload's SHA-256, so a resume never
mixes chunks of two releases. On resume, logged chunks are re-verified from disk (cheap)
and only the missing or damaged ones are fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from swarmota.infra.fsio import UnsafeNameError, atomic_write_bytes, safe_child
from swarmota.manifest import IntegrityError, Payload, sha256_hex
from swarmota.peer.crashpoints import crash_point
from swarmota.peer.errors import (
    DownloadFailed,
    PartialResponse,
    PeerError,
    ResourceFailed,
    VerifyFailed,
    resource_failure,
)
from swarmota.peer.http import HttpClient

__all__ = [
    "MAX_REQUEST_BYTES",
    "DownloadStats",
    "PayloadWorkdir",
    "download_payload",
    "plan_requests",
    "prepare",
    "verify_payload",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadStats:
    chunks_total: int
    chunks_reused: int
    chunks_fetched: int
    bytes_origin: int
    bytes_rejected: int
    transfer_s: float = 0.0  # until every chunk was fetched and verified (before the
    #                          final pass over the whole file)


class PayloadWorkdir:
    """The on-disk assembly area of one payload (owned by one download at a time):
    ``downloads_dir/<payload sha256>``.

    Raises:
        VerifyFailed: the payload hash is not a safe directory name.
    """

    def __init__(self, downloads_dir: Path, payload: Payload) -> None:
        self.payload = payload
        try:  # the hash is hex by the manifest parser; checked again where it is a path
            self.path = safe_child(downloads_dir, payload.sha256)
        except UnsafeNameError as exc:
            raise VerifyFailed(f"payload work area refused: {exc}") from None
        self.part = self.path / "payload.part"
        self.log = self.path / "verified.log"
        self.chunk_list = self.path / "chunks"  # a compact manifest's chunk list, kept

    def kept_chunk_list(self) -> Payload | None:
        """The payload with the chunk list an earlier pass kept here
        (:meth:`keep_chunk_list`), if it is still exactly the one the manifest names;
        else ``None``."""
        listed = self.payload.chunk_list
        if listed is None:
            return None
        try:
            with open(self.chunk_list, "rb") as fh:
                return self.payload.with_chunk_list(fh.read(listed.size + 1))
        except (OSError, IntegrityError):
            return None

    def keep_chunk_list(self, data: bytes) -> None:
        """Keep a verified chunk list for the next pass (best effort: it is refetched
        when missing)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.chunk_list, data)
        except OSError as exc:
            log.info("chunk list not kept: %s", exc)

    def prepare(self) -> set[int]:
        """Create the work area and return the chunks already on disk and valid."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.part, "ab") as fh:
            if fh.tell() != self.payload.size:
                fh.truncate(self.payload.size)
        done: set[int] = set()
        if not self.log.exists():
            return done
        logged = set()
        for line in self.log.read_text(errors="replace").splitlines():
            text = line.strip()
            if text.isascii() and text.isdigit() and len(text) <= 12:  # ours, not garbage
                logged.add(int(text))
        with open(self.part, "rb") as fh:
            for index in sorted(i for i in logged if i < self.payload.chunk_count):
                offset, length = self.payload.chunk_span(index)
                fh.seek(offset)
                if sha256_hex(fh.read(length)) == self.payload.chunks[index]:
                    done.add(index)
        return done

    def write_chunk(self, index: int, data: bytes) -> None:
        """Write a chunk that was already verified, then log it."""
        offset, _ = self.payload.chunk_span(index)
        fd = os.open(self.part, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        with open(self.log, "a") as fh:
            fh.write(f"{index}\n")
        crash_point("download.chunk_written")

    def verify_all(self) -> list[int]:
        """One pass over the assembled file (fsynced first): every chunk against the
        manifest, and the whole payload's SHA-256. Logs the good chunks (so that a
        resume keeps them) and returns the bad ones.

        Raises:
            IntegrityError: every chunk matches, yet the whole does not (a manifest whose
                chunk list and payload hash disagree).
        """
        payload = self.payload
        bad: list[int] = []
        good: list[str] = []
        whole = hashlib.sha256()
        with open(self.part, "rb") as fh:
            os.fsync(fh.fileno())
            for index in range(payload.chunk_count):
                offset, length = payload.chunk_span(index)
                fh.seek(offset)
                chunk = fh.read(length)
                whole.update(chunk)
                if hashlib.sha256(chunk).hexdigest() == payload.chunks[index]:
                    good.append(f"{index}\n")
                else:
                    bad.append(index)
        with open(self.log, "w") as fh:
            fh.writelines(good)
        if not bad:
            self._check_whole(self.part.stat().st_size, whole.hexdigest())
        return bad

    def _check_whole(self, size: int, digest: str) -> None:
        if size != self.payload.size or digest != self.payload.sha256:
            raise IntegrityError(f"assembled payload {self.payload.sha256[:12]} does not match "
                                 f"the manifest (size {size}, sha256 {digest})")

    def verify_whole(self) -> None:
        """Stream the assembled payload through SHA-256; fsync it first."""
        digest = hashlib.sha256()
        with open(self.part, "rb") as fh:
            os.fsync(fh.fileno())
            while block := fh.read(1 << 20):
                digest.update(block)
        self._check_whole(self.part.stat().st_size, digest.hexdigest())

    def remove(self) -> None:
        """Delete the work area (payload, verification log)."""
        shutil.rmtree(self.path, ignore_errors=True)


MAX_REQUEST_BYTES = 4 * 1024 * 1024


def plan_requests(missing: list[int], chunk_size: int, payload_size: int,
                  concurrency: int) -> list[list[int]]:
    """Group missing chunks into runs of adjacent chunks, one HTTP Range request each.

    Runs are sized so that every worker gets several (about ``payload / (4 x
    concurrency)``, at least one chunk, at most ``MAX_REQUEST_BYTES``): few requests for
    big payloads, enough parallelism for small ones.
    """
    target = min(MAX_REQUEST_BYTES, payload_size // max(1, 4 * concurrency))
    per_run = max(1, target // chunk_size)
    runs: list[list[int]] = []
    for index in missing:
        if runs and runs[-1][-1] == index - 1 and len(runs[-1]) < per_run:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


async def download_payload(
    http: HttpClient,
    url: str,
    work: PayloadWorkdir,
    *,
    concurrency: int,
    attempts: int,
    backoff_s: float,
    on_chunk: Callable[[int, int], None] | None = None,
    verify: bool = True,
) -> DownloadStats:
    """Fetch every missing chunk of ``work.payload`` from ``url`` and verify the whole.

    Adjacent missing chunks are fetched with one Range request (:func:`plan_requests`);
    every chunk in it is verified and written on its own, so one bad chunk costs only a
    retry of that chunk; when an answer is cut short (reset, stall, too slow), the whole
    chunks that arrived are kept and the retry asks only for the rest. A run gets
    ``attempts`` tries without progress (exponential backoff between them); a try that
    brought at least one chunk does not count.
    With ``verify`` False the final pass over the whole payload is left to the caller
    (:meth:`PayloadWorkdir.verify_whole`).

    Raises:
        DownloadFailed: a chunk could not be fetched in ``attempts`` tries.
        VerifyFailed: a chunk kept failing verification, or the assembled payload did.
        ResourceFailed: the work area cannot be written (a full disk, an I/O error).
    """
    payload = work.payload
    done = await prepare(work)
    missing = [i for i in range(payload.chunk_count) if i not in done]
    runs = plan_requests(missing, payload.chunk_size, payload.size, concurrency)
    received_before = http.bytes_received
    rejected = 0
    fetched = 0
    send, receive = trio.open_memory_channel[list[int]](len(runs))
    for run in runs:
        send.send_nowait(run)
    send.close()
    failure: list[PeerError] = []

    async def fetch_run(pending: list[int]) -> tuple[list[int], Exception | None, int]:
        """One request for the span covering ``pending``; returns the chunks still
        missing afterwards, the error that left them missing, and the chunk that error
        is about (a refused chunk, or else the first missing one)."""
        nonlocal rejected, fetched
        start, _ = payload.chunk_span(pending[0])
        end_offset, end_length = payload.chunk_span(pending[-1])
        cut: DownloadFailed | None = None
        try:
            data = await http.get_range(url, start, end_offset + end_length - start)
        except PartialResponse as exc:  # keep the whole chunks that did arrive
            data, cut = exc.received, exc
        except DownloadFailed as exc:
            return pending, exc, pending[0]
        left: list[int] = []
        error: Exception | None = None
        about = pending[0]
        for index in pending:
            offset, length = payload.chunk_span(index)
            if offset - start + length > len(data):
                left.append(index)
                if error is None:
                    error, about = cut, index
                continue
            chunk = data[offset - start:offset - start + length]
            try:
                await trio.to_thread.run_sync(_verify_and_write, work, index, chunk)
            except IntegrityError as exc:
                rejected += len(chunk)
                left.append(index)
                if not isinstance(error, IntegrityError):  # a refused chunk comes first
                    error, about = exc, index
                continue
            except (OSError, MemoryError) as exc:  # fatal: stop the download
                return pending, resource_failure(f"writing chunk {index} to {work.part}",
                                                 exc), index
            fetched += 1
            if on_chunk is not None:
                on_chunk(index, length)
        return left, error, about

    async def worker(cancel_scope: trio.CancelScope) -> None:
        async for run in receive:
            pending, last_error, about, failures = run, None, run[0], 0
            while pending and failures < attempts:
                if failures:
                    await trio.sleep(backoff_s * 2 ** (failures - 1))
                left, last_error, about = await fetch_run(pending)
                if isinstance(last_error, ResourceFailed):
                    failure.append(last_error)
                    cancel_scope.cancel()
                    return
                if len(left) == len(pending):  # no progress: the attempt counts
                    failures += 1
                if left:
                    log.warning("chunks %s attempt %d: %s", left[:4], failures, last_error)
                pending = left
            if pending:
                # Record the first failure and stop the other workers; raising here would
                # surface as an ExceptionGroup instead of the typed error. The message
                # names one chunk: the one its error is about.
                if isinstance(last_error, IntegrityError):
                    failure.append(VerifyFailed(f"chunk {about} failed verification "
                                                f"{attempts} times: {last_error}"))
                else:
                    failure.append(DownloadFailed(f"chunk {about} not fetched after {attempts} "
                                                  f"attempts: {last_error}"))
                cancel_scope.cancel()
                return

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, max(1, len(runs)))):
            nursery.start_soon(worker, nursery.cancel_scope)
    if failure:
        raise failure[0]
    transfer_s = trio.current_time() - started
    if verify:
        await verify_payload(work)
    return DownloadStats(chunks_total=payload.chunk_count, chunks_reused=len(done),
                         chunks_fetched=fetched,
                         bytes_origin=http.bytes_received - received_before,
                         bytes_rejected=rejected, transfer_s=transfer_s)


async def prepare(work: PayloadWorkdir) -> set[int]:
    """:meth:`PayloadWorkdir.prepare` in a worker thread.

    Raises:
        ResourceFailed: the work area cannot be created or read.
    """
    try:
        return await trio.to_thread.run_sync(work.prepare)
    except (OSError, MemoryError) as exc:
        raise resource_failure(f"preparing {work.path}", exc) from exc


async def verify_payload(work: PayloadWorkdir) -> None:
    """The whole assembled payload against the manifest (in a worker thread).

    Raises:
        VerifyFailed: it does not match; every chunk was verified when written, so this
            means damage on disk: the work area is removed (start over next time).
        ResourceFailed: it cannot be read (an I/O error).
    """
    try:
        await trio.to_thread.run_sync(work.verify_whole)
    except (OSError, MemoryError) as exc:
        raise resource_failure(f"verifying {work.part}", exc) from exc
    except IntegrityError as exc:
        await trio.to_thread.run_sync(work.remove)
        raise VerifyFailed(str(exc)) from exc


def _verify_and_write(work: PayloadWorkdir, index: int, data: bytes) -> None:
    work.payload.verify_chunk(index, data)
    work.write_chunk(index, data)
