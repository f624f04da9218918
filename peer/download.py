"""Download a payload's chunks from the origin, verify each, assemble with resume.

Chunks land in ``WORK/payload.part`` at their offsets; each chunk is verified against
the signed manifest *before* it is written, and its index is then appended to
``WORK/verified.log``. ``WORK`` is named after the payload's SHA-256, so a resume never
mixes chunks of two releases. On resume, logged chunks are re-verified from disk (cheap)
and only the missing or damaged ones are fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from manifest import IntegrityError, Payload, sha256_hex
from peer.errors import DownloadFailed, PeerError, VerifyFailed
from peer.http import HttpClient

__all__ = ["DownloadStats", "PayloadWorkdir", "download_payload"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadStats:
    chunks_total: int
    chunks_reused: int
    chunks_fetched: int
    bytes_origin: int
    bytes_rejected: int


class PayloadWorkdir:
    """The on-disk assembly area of one payload (owned by one download at a time)."""

    def __init__(self, downloads_dir: Path, payload: Payload) -> None:
        self.payload = payload
        self.path = downloads_dir / payload.sha256
        self.part = self.path / "payload.part"
        self.log = self.path / "verified.log"

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
            if line.strip().isdigit():
                logged.add(int(line))
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

    def verify_whole(self) -> None:
        """Stream the assembled payload through SHA-256; fsync it first."""
        digest = hashlib.sha256()
        with open(self.part, "rb") as fh:
            os.fsync(fh.fileno())
            while block := fh.read(1 << 20):
                digest.update(block)
        size = self.part.stat().st_size
        if size != self.payload.size or digest.hexdigest() != self.payload.sha256:
            raise IntegrityError(f"assembled payload {self.payload.sha256[:12]} does not match "
                                 f"the manifest (size {size}, sha256 {digest.hexdigest()})")

    def remove(self) -> None:
        for f in (self.part, self.log):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        with contextlib.suppress(OSError):
            self.path.rmdir()


async def download_payload(
    http: HttpClient,
    url: str,
    work: PayloadWorkdir,
    *,
    concurrency: int,
    attempts: int,
    backoff_s: float,
    on_chunk: Callable[[int, int], None] | None = None,
) -> DownloadStats:
    """Fetch every missing chunk of ``work.payload`` from ``url`` and verify the whole.

    Raises:
        DownloadFailed: a chunk could not be fetched in ``attempts`` tries.
        VerifyFailed: a chunk kept failing verification, or the assembled payload did.
    """
    payload = work.payload
    done = await trio.to_thread.run_sync(work.prepare)
    missing = [i for i in range(payload.chunk_count) if i not in done]
    received_before = http.bytes_received
    rejected = 0
    fetched = 0
    send, receive = trio.open_memory_channel[int](len(missing))
    for index in missing:
        send.send_nowait(index)
    send.close()
    failure: list[PeerError] = []

    async def worker(cancel_scope: trio.CancelScope) -> None:
        nonlocal rejected, fetched
        async for index in receive:
            offset, length = payload.chunk_span(index)
            last_error: Exception | None = None
            for attempt in range(attempts):
                if attempt:
                    await trio.sleep(backoff_s * 2 ** (attempt - 1))
                try:
                    data = await http.get_range(url, offset, length)
                except DownloadFailed as exc:
                    last_error = exc
                    log.info("chunk %d attempt %d: %s", index, attempt + 1, exc)
                    continue
                try:
                    await trio.to_thread.run_sync(_verify_and_write, work, index, data)
                except IntegrityError as exc:
                    rejected += len(data)
                    last_error = exc
                    log.warning("chunk %d attempt %d rejected: %s", index, attempt + 1, exc)
                    continue
                fetched += 1
                if on_chunk is not None:
                    on_chunk(index, length)
                break
            else:
                # Record the first failure and stop the other workers; raising here would
                # surface as an ExceptionGroup instead of the typed error.
                if isinstance(last_error, IntegrityError):
                    failure.append(VerifyFailed(f"chunk {index} failed verification "
                                                f"{attempts} times: {last_error}"))
                else:
                    failure.append(DownloadFailed(f"chunk {index} not fetched after {attempts} "
                                                  f"attempts: {last_error}"))
                cancel_scope.cancel()
                return

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, max(1, len(missing)))):
            nursery.start_soon(worker, nursery.cancel_scope)
    if failure:
        raise failure[0]
    try:
        await trio.to_thread.run_sync(work.verify_whole)
    except IntegrityError as exc:
        # Every chunk was verified, so this means damage on disk: start over next time.
        await trio.to_thread.run_sync(work.remove)
        raise VerifyFailed(str(exc)) from exc
    return DownloadStats(chunks_total=payload.chunk_count, chunks_reused=len(done),
                         chunks_fetched=fetched,
                         bytes_origin=http.bytes_received - received_before,
                         bytes_rejected=rejected)


def _verify_and_write(work: PayloadWorkdir, index: int, data: bytes) -> None:
    work.payload.verify_chunk(index, data)
    work.write_chunk(index, data)
