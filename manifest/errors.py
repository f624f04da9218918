"""Errors of the trust core.

    ManifestError                  anything the trust core refuses
     +-- ManifestFormatError       bytes that are not a well-formed release manifest
     +-- IntegrityError            data whose size or SHA-256 differs from the manifest
     +-- NotApplicableError        a valid release for another product or hardware
     +-- RollbackError             a release counter not newer than the installed one
     +-- CounterJumpError          a release counter too far above the installed one

Every error carries a human-readable message naming the fault. Callers map these to
device status codes (see ``peer.status``); nothing here performs I/O.
"""

from __future__ import annotations

__all__ = [
    "CounterJumpError",
    "IntegrityError",
    "ManifestError",
    "ManifestFormatError",
    "NotApplicableError",
    "RollbackError",
]


class ManifestError(Exception):
    """Base class: the trust core refused some input."""


class ManifestFormatError(ManifestError):
    """The bytes are not a well-formed release manifest (syntax, schema, limits)."""


class IntegrityError(ManifestError):
    """Data does not match the size or SHA-256 the signed manifest declares."""


class NotApplicableError(ManifestError):
    """A valid release, but for another product or hardware compatibility id."""


class RollbackError(ManifestError):
    """The release counter is not newer than the one already installed."""


class CounterJumpError(ManifestError):
    """The release counter is further above the installed one than the device accepts
    (a counter pushed that far would make every later release a rollback)."""
