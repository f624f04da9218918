"""Errors of the seeder (repository keys, TUF metadata, signing, publishing).

    SeederError                    base of everything the seeder refuses or fails at
     +-- RepositoryError           the repository is missing, corrupt or not initialised:
     |    |                        unreadable or invalid repo.json, keys or metadata,
     |    |                        a signing key that does not match root, refusing to
     |    |                        create over an existing repository
     |    +-- SigningError         a key or signing request cannot be used: an unreadable
     |                             or foreign key, a key of no role the request needs, a
     |                             malformed or stale signing request, a PKCS#11 token
     |                             that fails, a threshold the local keys cannot meet
     +-- PublishError              bad publish input: a missing or empty image, an invalid
                                   product, version or hardware id, a version already
                                   published with other content, a release counter not
                                   higher than every earlier release of the product (or
                                   jumping too far above it), a change refused while
                                   another waits for signatures

Foreign exceptions (OSError, python-tuf, securesystemslib, cryptography, python-pkcs11,
zstandard, the trust core's ``ManifestFormatError``) are translated into these at the
module that calls the foreign library, with the original chained as ``__cause__``.
``RuntimeError`` and friends mean a programming bug.
"""

from __future__ import annotations

__all__ = ["PublishError", "RepositoryError", "SeederError", "SigningError"]


class SeederError(Exception):
    """Base class of the seeder's errors; the message names the fault."""


class RepositoryError(SeederError):
    """The repository (keys, settings or metadata) is missing, corrupt or inconsistent."""


class SigningError(RepositoryError):
    """A key, a PKCS#11 token or a signing request cannot be used as asked."""


class PublishError(SeederError):
    """The release cannot be published as asked (bad input or a conflicting release)."""
