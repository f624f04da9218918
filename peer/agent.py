"""The update orchestrator: one pass of check-in, fetch, verify, install, switch, check.

    check in -> TUF refresh + release manifest -> applicability / anti-rollback
    -> chunks from the origin (each verified) -> payload verified -> write the inactive
    slot: from the delta whose base is the active slot (base and result verified), or
    from the full payload (also the fallback when anything about the delta fails)
    -> boot control: new slot primary, pending, 1 try
    -> "reboot" (the bootloader consumes the try) -> health check
    -> commit (mark good) or fall back -> report to the tracker

A pending switch left by a crash or power loss is finished first (the try counter decides
whether the new slot gets its health check or the committed slot boots again). Every
failure maps to a status code (``peer.errors``); the active slot is never written.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from manifest import (
    ManifestError,
    Payload,
    ReleaseManifest,
    check_applicable,
    parse_release_manifest,
)
from peer.bootctl import (
    BootControl,
    SlotRecord,
    boot,
    fall_back,
    mark_good,
    other_slot,
    switch_to,
    write_bootctl,
)
from peer.download import PayloadWorkdir, download_payload
from peer.errors import (
    ConfigError,
    DownloadFailed,
    InstallFailed,
    PeerError,
    PostCheckFailed,
    StatusCode,
    VerifyFailed,
)
from peer.health import run_health_check
from peer.http import HttpClient
from peer.install import install_delta, install_image
from peer.state import DeviceState
from peer.tracker_client import Offer, checkin, send_report
from peer.trust import fetch_release_manifest

__all__ = ["UpdateResult", "update_once"]

log = logging.getLogger(__name__)


@dataclass
class UpdateResult:
    """What one update pass did. ``attempted`` is False when nothing was offered."""

    status: StatusCode
    message: str
    attempted: bool = False
    updated: bool = False
    from_version: str | None = None
    to_version: str | None = None
    bytes_origin: int = 0
    bytes_peers: int = 0
    bytes_metadata: int = 0
    chunks_reused: int = 0
    payload_kind: str | None = None
    delta_fallback: str | None = None
    reported: bool = False
    poll_after_s: int = 3600
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = int(self.status)
        return out


@contextmanager
def _device_lock(state: DeviceState) -> Iterator[None]:
    fd = os.open(state.root / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another agent is updating {state.root}") from None
        yield
    finally:
        os.close(fd)


async def update_once(state: DeviceState, *,
                      clock: Callable[[], float] = time.monotonic) -> UpdateResult:
    """Run one update pass on the device in ``state``; never raises ``PeerError``
    except ``ConfigError`` (the device itself is not usable)."""
    with _device_lock(state):
        config = state.config()
        bc = state.bootctl()
        async with HttpClient(timeout_s=config.http_timeout_s) as http:
            run = _Run(state, http, clock)
            if bc.pending:
                result = await run.finish_pending(bc)
            else:
                result = await run.update(bc)
            await run.report(result)
        state.save_result({**result.to_json(), "finished_at": time.time()})
        return result


class _Run:
    """State of one pass; owned by ``update_once``."""

    def __init__(self, state: DeviceState, http: HttpClient,
                 clock: Callable[[], float]) -> None:
        self.state = state
        self.config = state.config()
        self.http = http
        self.clock = clock
        self.timings: dict[str, float] = {}

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.timings[name] = round(self.clock() - start, 6)

    async def update(self, bc: BootControl) -> UpdateResult:
        active = bc.slot(bc.committed)
        if active.version is None:
            raise ConfigError(f"committed slot {bc.committed} has no version in boot control")
        result = UpdateResult(StatusCode.OK, "up to date", from_version=active.version,
                              timings_s=self.timings)
        start = self.clock()
        try:
            with self._timed("checkin"):
                offer, result.poll_after_s = await checkin(
                    self.http, self.config, version=active.version,
                    release_counter=bc.min_release_counter)
        except DownloadFailed as exc:
            result.status, result.message = exc.status, f"check-in failed: {exc}"
            return result
        if offer is None:
            return result
        result.attempted = True
        result.to_version = offer.version
        try:
            release = await self._fetch_release(offer, bc, result)
            target = other_slot(bc.committed)
            work = await self._install(release, bc, target, result)
            record = SlotRecord(release.version, release.release_counter,
                                release.image.sha256, release.image.size)
            bc = write_bootctl(self.state.bootctl_path, switch_to(bc, target, record))
            await trio.to_thread.run_sync(work.remove)
            await self._reboot_and_check(bc)
            result.updated = True
            result.message = f"updated {active.version} -> {release.version}"
        except PeerError as exc:
            if isinstance(exc, ConfigError):
                raise
            result.status, result.message = exc.status, str(exc)
            log.warning("update to %s failed (%d): %s", offer.version, exc.status, exc)
        finally:
            self.timings["total"] = round(self.clock() - start, 6)
        return result

    async def _download(self, payload: Payload, result: UpdateResult) -> PayloadWorkdir:
        work = PayloadWorkdir(self.state.downloads_dir, payload)
        url = f"{self.config.origin_url.rstrip('/')}/{payload.path}"
        with self._timed(f"download_{payload.kind}"):
            stats = await download_payload(
                self.http, url, work, concurrency=self.config.download_concurrency,
                attempts=self.config.chunk_attempts, backoff_s=self.config.retry_backoff_s)
        result.bytes_origin += stats.bytes_origin
        result.chunks_reused += stats.chunks_reused
        return work

    async def _install(self, release: ReleaseManifest, bc: BootControl, target: str,
                       result: UpdateResult) -> PayloadWorkdir:
        """Write the release image into slot ``target``: from the delta whose base is the
        active slot when there is one, else (or if anything about the delta fails) from
        the full payload. Returns the work area to clean up after the switch."""
        base = bc.slot(bc.committed)
        delta = release.delta_for(base.sha256) if base.sha256 else None
        if delta is not None:
            try:
                work = await self._download(delta, result)
                with self._timed("install_delta"):
                    await trio.to_thread.run_sync(
                        install_delta, work.part, delta, self.state.slot_path(bc.committed),
                        release.image, self.state.slot_path(target))
                result.payload_kind = "delta"
                return work
            except (DownloadFailed, VerifyFailed, InstallFailed) as exc:
                log.warning("delta %s unusable, falling back to the full payload: %s",
                            delta.sha256[:12], exc)
                result.delta_fallback = str(exc)
        work = await self._download(release.full_payload, result)
        with self._timed("install"):
            await trio.to_thread.run_sync(install_image, work.part, release.image,
                                          self.state.slot_path(target))
        result.payload_kind = "full"
        return work

    async def _fetch_release(self, offer: Offer, bc: BootControl,
                             result: UpdateResult) -> ReleaseManifest:
        with self._timed("metadata"):
            data, metadata_bytes = await trio.to_thread.run_sync(
                lambda: fetch_release_manifest(
                    self.state.trust_dir, self.config.origin_url, offer.target,
                    timeout_s=self.config.http_timeout_s,
                    scratch_dir=self.state.downloads_dir))
        result.bytes_metadata += metadata_bytes
        try:
            release = parse_release_manifest(data)
            if (release.product, release.version) != (offer.product, offer.version):
                raise VerifyFailed(f"target {offer.target} holds release {release.product} "
                                   f"{release.version}")
            check_applicable(release, product=self.config.product,
                             hardware_id=self.config.hardware_id,
                             installed_counter=bc.min_release_counter)
        except ManifestError as exc:
            raise VerifyFailed(f"release {offer.version} refused: {exc}") from exc
        return release

    async def _reboot_and_check(self, bc: BootControl) -> BootControl:
        """Boot the pending slot (consuming a try), health-check it, commit or fall back."""
        path = self.state.bootctl_path
        bc, booted = boot(bc)
        bc = write_bootctl(path, bc)
        if not bc.pending:
            raise PostCheckFailed("the new slot used up its boot tries; fell back to "
                                  f"slot {booted}")
        try:
            with self._timed("health"):
                await run_health_check(self.config.health_command, slot=booted,
                                       image=self.state.slot_path(booted),
                                       record=bc.slot(booted),
                                       timeout_s=self.config.health_timeout_s)
        except PostCheckFailed:
            write_bootctl(path, fall_back(bc))
            raise
        return write_bootctl(path, mark_good(bc))

    async def finish_pending(self, bc: BootControl) -> UpdateResult:
        """A switch was written but not committed (crash, power loss): finish it."""
        pending = bc.slot(bc.primary)
        result = UpdateResult(StatusCode.OK, "", attempted=True,
                              from_version=bc.slot(bc.committed).version,
                              to_version=pending.version, timings_s=self.timings)
        try:
            await self._reboot_and_check(bc)
            result.updated = True
            result.message = f"updated {result.from_version} -> {pending.version} " \
                             "(finished after restart)"
        except PeerError as exc:
            result.status, result.message = exc.status, str(exc)
        return result

    async def report(self, result: UpdateResult) -> None:
        """Deliver earlier undelivered reports and this one; keep what fails for later."""
        queue = self.state.outbox()
        if result.attempted:
            queue.append(self._report_body(result))
        delivered = 0
        for body in queue:
            try:
                await send_report(self.http, self.config, body)
            except DownloadFailed as exc:
                if exc.http_status is not None and 400 <= exc.http_status < 500:
                    log.error("tracker rejected a report, dropping it: %s", exc)
                    delivered += 1
                    continue
                log.warning("report not delivered, kept for the next run: %s", exc)
                break
            delivered += 1
        if delivered or queue:
            self.state.save_outbox(queue[delivered:])
        result.reported = result.attempted and delivered == len(queue)

    @staticmethod
    def _report_body(result: UpdateResult) -> dict[str, Any]:
        if result.from_version is None or result.to_version is None:
            raise RuntimeError("an attempted update always knows both versions")
        return {"from_version": result.from_version, "to_version": result.to_version,
                "status": int(result.status), "message": result.message[:4096],
                "bytes_origin": result.bytes_origin, "bytes_peers": result.bytes_peers,
                "timings_s": dict(result.timings_s)}
