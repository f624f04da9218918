"""Errors of the device agent, each mapped to the status code it reports.

    PeerError                      base; ``status`` is the code reported to the tracker
     +-- ConfigError               bad or missing device state / configuration (not reported)
     +-- DownloadFailed     (10)   transport: tracker/origin unreachable, HTTP errors, retries spent
     |    +-- PinMismatch   (10)   a server's TLS key is not one of the pinned keys (nothing sent)
     |    +-- PartialResponse (10) an answer cut short (reset, stall, too slow); carries the
     |                             bytes that did arrive, so that whole chunks in them are kept
     +-- VerifyFailed       (20)   trust: metadata, manifest, chunk, payload or image rejected
     +-- InstallFailed      (30)   writing or decompressing into the inactive slot failed
     +-- ResourceFailed     (30)   the device ran out of a resource or its storage failed
     |                             (ENOSPC, EIO, ENOMEM...) anywhere in a pass: reported,
     |                             partial files removed, the daemon carries on
     +-- PostCheckFailed    (40)   the new slot failed its health check (or never came up
     |                             in its boot attempts); rolled back
     +-- BootInterrupted    (41)   the new slot's boot attempts were all spent by
                                   interruptions (power cuts in its health check), not
                                   by a failed check; rolled back, not a release failure

Foreign exceptions (httpx, python-tuf, zstandard, OSError) are translated into these at
the module that calls the foreign library; an ``OSError`` or ``MemoryError`` that no
module expected becomes :class:`ResourceFailed` where the pass handles its failures
(:func:`resource_failure`).
"""

from __future__ import annotations

from swarmota.tracker.wire import StatusCode

__all__ = [
    "ConfigError",
    "DownloadFailed",
    "InstallFailed",
    "PartialResponse",
    "PeerError",
    "PinMismatch",
    "BootInterrupted",
    "PostCheckFailed",
    "ResourceFailed",
    "StatusCode",
    "VerifyFailed",
    "resource_failure",
]


class PeerError(Exception):
    """Base class of the agent's errors."""

    status: StatusCode = StatusCode.INSTALL_FAILED


class ConfigError(PeerError):
    """The device state directory or its configuration is missing or invalid."""


class DownloadFailed(PeerError):
    status = StatusCode.DOWNLOAD_FAILED

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class PinMismatch(DownloadFailed):
    """The server's certificate carries a public key outside the device's ``tls_pins``:
    the connection was closed right after the TLS handshake, before any HTTP byte."""


class PartialResponse(DownloadFailed):
    """A ranged answer ended early (connection reset, stall, slow retrieval); ``received``
    holds the bytes that arrived from the start of the asked range (unverified)."""

    def __init__(self, message: str, *, received: bytes) -> None:
        super().__init__(message)
        self.received = received


class VerifyFailed(PeerError):
    status = StatusCode.VERIFY_FAILED


class InstallFailed(PeerError):
    status = StatusCode.INSTALL_FAILED


class PostCheckFailed(PeerError):
    status = StatusCode.POSTCHECK_FAILED


class BootInterrupted(PeerError):
    status = StatusCode.INTERRUPTED


class ResourceFailed(PeerError):
    """The device ran out of a resource, or its storage failed, while updating: a full
    disk (ENOSPC), an I/O error (EIO), no memory. Not a verdict on the release."""

    status = StatusCode.INSTALL_FAILED


def resource_failure(what: str, exc: OSError | MemoryError) -> ResourceFailed:
    """``exc`` as a :class:`ResourceFailed` saying what failed (``what``)."""
    detail = "out of memory" if isinstance(exc, MemoryError) else str(exc) or type(exc).__name__
    return ResourceFailed(f"{what}: {detail} (device resources)")
