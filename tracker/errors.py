"""Errors of the tracker.

    TrackerError                   base of everything the tracker raises on purpose
     +-- RequestError              bad input from a client or an operator: malformed,
     |                             oversized or out-of-range values; ``str(exc)`` is safe
     |                             to send back as the HTTP 400 body
     +-- StorageError              the SQLite database failed (wraps ``sqlite3.Error`` and
          |                        ``OSError``; the original is chained as ``__cause__``)
          +-- ReleaseConflictError a release with the same product and version, or the
                                   same product and release counter, but different
                                   content is already registered

Foreign exceptions are translated where the foreign library is called: ``sqlite3`` in
``tracker.store`` only. ``RuntimeError`` means a programming bug.
"""

from __future__ import annotations

__all__ = [
    "ReleaseConflictError",
    "RequestError",
    "StorageError",
    "TrackerError",
]


class TrackerError(Exception):
    """Base class of the tracker's errors."""


class RequestError(TrackerError):
    """Input that the tracker refuses; the message names the fault and is client-safe."""


class StorageError(TrackerError):
    """The release catalogue / device database could not be read or written."""


class ReleaseConflictError(StorageError):
    """A different release already holds this product's version or release counter."""
