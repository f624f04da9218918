"""swarmota's trust core: release manifests, chunking and their verification.

Pure: no network, no disk. Takes bytes and values, returns verified objects or raises
an error from ``manifest.errors``. The TUF metadata chain (root, targets, snapshot,
timestamp) is verified by python-tuf; a release manifest is a TUF target file whose
length and hashes the targets role signs, and this package checks everything inside it.
"""

from swarmota.manifest.chunking import (
    MAX_CHUNK_SIZE_BYTES,
    MIN_CHOSEN_CHUNK_SIZE_BYTES,
    MIN_CHUNK_SIZE_BYTES,
    choose_chunk_size,
    chunk_hashes,
    sha256_hex,
    verify_bytes,
)
from swarmota.manifest.counters import (
    COUNTER_RESETS_FIELD,
    DEFAULT_MAX_COUNTER_JUMP,
    CounterReset,
    apply_counter_reset,
    encode_counter_resets,
    parse_counter_resets,
)
from swarmota.manifest.errors import (
    CounterJumpError,
    IntegrityError,
    ManifestError,
    ManifestFormatError,
    NotApplicableError,
    RollbackError,
)
from swarmota.manifest.release import (
    CHUNK_DIGEST_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_RELEASE_COUNTER,
    UPDATE_TYPES,
    ChunkList,
    ImageInfo,
    Payload,
    ReleaseManifest,
    check_applicable,
    compact_pin,
    compact_target_name,
    encode_chunk_list,
    parse_compact_pin,
    parse_release_manifest,
    release_target_name,
    validate_component,
    validate_product,
    validate_version,
)

__all__ = [
    "CHUNK_DIGEST_BYTES",
    "COUNTER_RESETS_FIELD",
    "DEFAULT_MAX_COUNTER_JUMP",
    "MAX_CHUNK_SIZE_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_RELEASE_COUNTER",
    "MIN_CHOSEN_CHUNK_SIZE_BYTES",
    "MIN_CHUNK_SIZE_BYTES",
    "ChunkList",
    "CounterJumpError",
    "CounterReset",
    "ImageInfo",
    "IntegrityError",
    "ManifestError",
    "ManifestFormatError",
    "NotApplicableError",
    "Payload",
    "ReleaseManifest",
    "RollbackError",
    "apply_counter_reset",
    "check_applicable",
    "compact_pin",
    "compact_target_name",
    "encode_chunk_list",
    "parse_compact_pin",
    "chunk_hashes",
    "encode_counter_resets",
    "choose_chunk_size",
    "parse_counter_resets",
    "parse_release_manifest",
    "release_target_name",
    "sha256_hex",
    "validate_component",
    "validate_product",
    "validate_version",
    "UPDATE_TYPES",
    "verify_bytes",
]
