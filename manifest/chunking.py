"""Fixed-size chunking of payloads and per-chunk verification (pure functions)."""

from __future__ import annotations

import hashlib

from swarmota.manifest.errors import IntegrityError

__all__ = [
    "MAX_CHUNK_SIZE_BYTES",
    "MIN_CHUNK_SIZE_BYTES",
    "MIN_CHOSEN_CHUNK_SIZE_BYTES",
    "TARGET_CHUNK_COUNT",
    "chunk_count",
    "chunk_hashes",
    "chunk_span",
    "choose_chunk_size",
    "sha256_hex",
    "verify_bytes",
]

MIN_CHUNK_SIZE_BYTES = 16 * 1024
# The smallest chunk size publishing chooses: two BitTorrent blocks (16 KiB each), since
# a chunk is one piece of the payload's v2 torrent. With one-block pieces, libtorrent
# (2.x, up to at least 2.1.1) answers a piece that fails its hash check by asking
# peers for that piece's block hashes, a request whose layer is then also the piece
# layer; it refuses every honest answer as "invalid hashes", disconnects the peer, and
# asks the next one, for as long as the torrent lives. One lying peer thereby cut every
# device off from every other (issue 15). Manifests with 16 KiB chunks stay valid.
MIN_CHOSEN_CHUNK_SIZE_BYTES = 32 * 1024
MAX_CHUNK_SIZE_BYTES = 16 * 1024 * 1024
# Payloads are cut so that they split into roughly this many chunks: small deltas still
# spread over many peers, large images keep the manifest small.
TARGET_CHUNK_COUNT = 512


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def choose_chunk_size(payload_size_bytes: int) -> int:
    """Return the chunk size for a payload: a power of two in [32 KiB, 16 MiB].

    The smallest power of two that keeps the chunk count at or below
    ``TARGET_CHUNK_COUNT``, clamped to the bounds (at least
    ``MIN_CHOSEN_CHUNK_SIZE_BYTES``: see there).
    """
    if payload_size_bytes < 0:
        raise ValueError("payload size must not be negative")
    size = MIN_CHOSEN_CHUNK_SIZE_BYTES
    while size < MAX_CHUNK_SIZE_BYTES and size * TARGET_CHUNK_COUNT < payload_size_bytes:
        size *= 2
    return size


def chunk_count(size_bytes: int, chunk_size_bytes: int) -> int:
    return (size_bytes + chunk_size_bytes - 1) // chunk_size_bytes


def chunk_span(index: int, size_bytes: int, chunk_size_bytes: int) -> tuple[int, int]:
    """Return ``(offset, length)`` of chunk ``index`` in a payload of ``size_bytes``."""
    count = chunk_count(size_bytes, chunk_size_bytes)
    if not 0 <= index < count:
        raise IndexError(f"chunk {index} out of range 0..{count - 1}")
    offset = index * chunk_size_bytes
    return offset, min(chunk_size_bytes, size_bytes - offset)


def chunk_hashes(data: bytes | memoryview, chunk_size_bytes: int) -> list[str]:
    """SHA-256 (hex) of every fixed-size chunk of ``data``."""
    view = memoryview(data)
    return [
        sha256_hex(view[off : off + chunk_size_bytes])
        for off in range(0, len(view), chunk_size_bytes)
    ]


def verify_bytes(what: str, data: bytes | bytearray | memoryview, size: int, sha256: str) -> None:
    """Raise ``IntegrityError`` unless ``data`` has exactly ``size`` bytes and ``sha256``."""
    if len(data) != size:
        raise IntegrityError(f"{what}: expected {size} bytes, got {len(data)}")
    actual = sha256_hex(data)
    if actual != sha256:
        raise IntegrityError(f"{what}: SHA-256 mismatch (expected {sha256}, got {actual})")
