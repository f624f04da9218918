"""Errors of the tracker.

    TrackerError                   base of everything the tracker raises on purpose
     +-- RequestError              bad input from a client or an operator: malformed,
     |    |                        oversized or out-of-range values; ``str(exc)`` is safe
     |    |                        to send back as the HTTP 400 body
     |    +-- UnknownSwarmError    an announce or scrape of an info-hash no registered
     |                             release has (a BitTorrent failure reason)
     +-- ConflictError             an operator action that does not apply to the current
     |                             state (e.g. resume a rollout that is not paused, create
     |                             a second rollout of a release): HTTP 409
     |    +-- StaleStateError      a rollout changed (another request or tracker process)
     |                             between reading and saving it: read it again
     +-- AuthError                 an admin request without a valid token (HTTP 401) or
     |                             with too small a role (``forbidden``: HTTP 403)
     +-- ConfigError               the tracker's configuration cannot be used (e.g. an
     |                             unreadable fleet CA file); raised before serving
     +-- UpstreamError             a server the tracker depends on (the repository's
     |                             origin, when verifying a release) could not be reached
     |                             or served nothing usable: HTTP 502
     +-- AdminApiError             the admin API answered an error (``status``: the HTTP
     |                             status, 0 if the tracker could not be reached); raised
     |                             by :mod:`tracker.admin_client` (wraps ``httpx`` errors)
     +-- StorageError              the SQLite database failed (wraps ``sqlite3.Error`` and
          |                        ``OSError``; the original is chained as ``__cause__``)
          +-- ReleaseConflictError a release with the same product and version, or the
                                   same product and release counter, but different
                                   content is already registered

Foreign exceptions are translated where the foreign library is called: ``sqlite3`` in
``tracker.store`` only, ``httpx`` in ``tracker.admin_client`` and
``tracker.release_trust`` only. Bad device input is :class:`tracker.wire.WireError`
(HTTP 400), the wire module's own. ``RuntimeError``
means a programming bug.
"""

from __future__ import annotations

__all__ = [
    "AdminApiError",
    "AuthError",
    "ConfigError",
    "ConflictError",
    "ReleaseConflictError",
    "RequestError",
    "StaleStateError",
    "StorageError",
    "TrackerError",
    "UnknownSwarmError",
    "UpstreamError",
]


class TrackerError(Exception):
    """Base class of the tracker's errors."""


class RequestError(TrackerError):
    """Input that the tracker refuses; the message names the fault and is client-safe."""


class UnknownSwarmError(RequestError):
    """No registered release has this swarm (info-hash)."""


class ConflictError(TrackerError):
    """An action that the current state does not allow; the message is client-safe."""


class StaleStateError(ConflictError):
    """The rollout was saved by someone else since it was read (optimistic locking)."""


class AuthError(TrackerError):
    """An admin request refused: no or bad token (401) or too small a role (403)."""

    def __init__(self, message: str, *, forbidden: bool = False) -> None:
        super().__init__(message)
        self.forbidden = forbidden


class ConfigError(TrackerError):
    """The tracker's configuration cannot be used; the message says which file and why."""


class UpstreamError(TrackerError):
    """A server the tracker needs answered nothing usable; the message says which."""


class AdminApiError(TrackerError):
    """An admin API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class StorageError(TrackerError):
    """The release catalogue / device database could not be read or written."""


class ReleaseConflictError(StorageError):
    """A different release already holds this product's version or release counter."""
