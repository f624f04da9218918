"""swarmota's trust core: release manifests, chunking and their verification.

Pure: no network, no disk. Takes bytes and values, returns verified objects or raises
an error from ``manifest.errors``. The TUF metadata chain (root, targets, snapshot,
timestamp) is verified by python-tuf; a release manifest is a TUF target file whose
length and hashes the targets role signs, and this package checks everything inside it.
"""

from manifest.chunking import (
    MAX_CHUNK_SIZE_BYTES,
    MIN_CHOSEN_CHUNK_SIZE_BYTES,
    MIN_CHUNK_SIZE_BYTES,
    choose_chunk_size,
    chunk_hashes,
    sha256_hex,
    verify_bytes,
)
from manifest.errors import (
    IntegrityError,
    ManifestError,
    ManifestFormatError,
    NotApplicableError,
    RollbackError,
)
from manifest.release import (
    MAX_MANIFEST_BYTES,
    UPDATE_TYPES,
    ImageInfo,
    Payload,
    ReleaseManifest,
    check_applicable,
    parse_release_manifest,
    release_target_name,
    validate_component,
    validate_product,
    validate_version,
)

__all__ = [
    "MAX_CHUNK_SIZE_BYTES",
    "MAX_MANIFEST_BYTES",
    "MIN_CHOSEN_CHUNK_SIZE_BYTES",
    "MIN_CHUNK_SIZE_BYTES",
    "ImageInfo",
    "IntegrityError",
    "ManifestError",
    "ManifestFormatError",
    "NotApplicableError",
    "Payload",
    "ReleaseManifest",
    "RollbackError",
    "check_applicable",
    "chunk_hashes",
    "choose_chunk_size",
    "parse_release_manifest",
    "release_target_name",
    "sha256_hex",
    "validate_component",
    "validate_product",
    "validate_version",
    "UPDATE_TYPES",
    "verify_bytes",
]
