"""Write a verified payload into a slot: the zstandard adapter of the device agent.

The payload is decompressed in a stream into the slot backend's writer (a temporary
file beside the slot for :class:`peer.slots.FileSlots`), the output is size-capped at
the signed image size (a payload that expands further is refused) and hashed on the
way; the write is committed (fsync, rename) only if the SHA-256 matches the manifest,
and discarded otherwise. Nothing unverified is ever promoted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import zstandard

from swarmota.manifest import ImageInfo, Payload, sha256_hex
from swarmota.peer.delta import apply_delta
from swarmota.peer.errors import InstallFailed, VerifyFailed
from swarmota.peer.slots import SlotBackend, SlotWriter

__all__ = ["hash_file", "install_delta", "install_image"]

_BLOCK = 1 << 20


def install_image(payload_path: Path, image: ImageInfo, slots: SlotBackend,
                  slot: str) -> None:
    """Decompress ``payload_path`` (zstd) into ``slot`` if it yields ``image``.

    Blocking; run it in a worker thread.

    Raises:
        VerifyFailed: the output is longer, shorter or different from the signed image.
        InstallFailed: decompression or a write failed (e.g. disk full).
    """
    digest = hashlib.sha256()
    written = 0
    writer: SlotWriter | None = None
    try:
        writer = slots.begin_write(slot, image.size)
        with open(payload_path, "rb") as src:
            reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
            while block := reader.read(_BLOCK):
                written += len(block)
                if written > image.size:
                    raise VerifyFailed(f"payload expands beyond the signed image size "
                                       f"{image.size}")
                digest.update(block)
                writer.write(block)
        if written != image.size or digest.hexdigest() != image.sha256:
            raise VerifyFailed(f"image mismatch: got {written} bytes sha256 "
                               f"{digest.hexdigest()}, signed {image.size} bytes "
                               f"{image.sha256}")
        writer.commit()
    except zstandard.ZstdError as exc:
        raise InstallFailed(f"cannot decompress payload: {exc}") from exc
    except OSError as exc:
        raise InstallFailed(f"cannot write slot {slot}: {exc}") from exc
    finally:
        if writer is not None:
            writer.discard()


def install_delta(delta_path: Path, delta: Payload, slots: SlotBackend, base_slot: str,
                  image: ImageInfo, slot: str) -> None:
    """Apply a verified delta payload to the image in ``base_slot``, into ``slot``.

    Blocking; run it in a worker thread. Holds the base, the delta and the result in
    memory (images of up to a few hundred MB).

    Raises:
        VerifyFailed: the base slot is not the delta's signed base, or the result is not
            the signed image.
        InstallFailed: the base cannot be read, the delta does not apply, or a write
            failed.
    """
    if delta.base is None:
        raise RuntimeError("install_delta needs a delta payload")
    try:
        base = slots.read(base_slot, delta.base.size)
        patch = delta_path.read_bytes()
    except OSError as exc:
        raise InstallFailed(f"cannot read delta inputs: {exc}") from exc
    if len(base) != delta.base.size or sha256_hex(base) != delta.base.sha256:
        raise VerifyFailed(f"active slot is not the base of delta {delta.sha256[:12]}")
    result = apply_delta(delta.encoding, base, patch, target_size=image.size)
    del base, patch
    if len(result) != image.size or sha256_hex(result) != image.sha256:
        raise VerifyFailed(f"delta {delta.sha256[:12]} produced an image that is not the "
                           f"signed one")
    writer: SlotWriter | None = None
    try:
        writer = slots.begin_write(slot, image.size)
        view = memoryview(result)
        for offset in range(0, len(view), _BLOCK):
            writer.write(bytes(view[offset:offset + _BLOCK]))
        writer.commit()
    except OSError as exc:
        raise InstallFailed(f"cannot write slot {slot}: {exc}") from exc
    finally:
        if writer is not None:
            writer.discard()


def hash_file(path: Path) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file, streamed."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            size += len(block)
            digest.update(block)
    return size, digest.hexdigest()
