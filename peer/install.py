"""Write a verified payload into a slot: the zstandard adapter of the device agent.

The payload is decompressed in a stream into a temporary file beside the slot, the output
is size-capped at the signed image size (a payload that expands further is refused) and
hashed on the way, then fsynced and renamed over the slot image. Nothing is promoted
unless the SHA-256 matches the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import zstandard

from infra.fsio import fsync_dir
from manifest import ImageInfo, Payload, sha256_hex
from peer.delta import apply_delta
from peer.errors import InstallFailed, VerifyFailed

__all__ = ["hash_file", "install_delta", "install_image"]

_BLOCK = 1 << 20


def install_image(payload_path: Path, image: ImageInfo, slot_path: Path) -> None:
    """Decompress ``payload_path`` (zstd) into ``slot_path`` if it yields ``image``.

    Blocking; run it in a worker thread.

    Raises:
        VerifyFailed: the output is longer, shorter or different from the signed image.
        InstallFailed: decompression or a write failed (e.g. disk full).
    """
    tmp = slot_path.with_name(f".{slot_path.name}.installing")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(payload_path, "rb") as src, open(tmp, "wb") as dst:
            reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
            while block := reader.read(_BLOCK):
                written += len(block)
                if written > image.size:
                    raise VerifyFailed(f"payload expands beyond the signed image size "
                                       f"{image.size}")
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        if written != image.size or digest.hexdigest() != image.sha256:
            raise VerifyFailed(f"image mismatch: got {written} bytes sha256 "
                               f"{digest.hexdigest()}, signed {image.size} bytes "
                               f"{image.sha256}")
        os.replace(tmp, slot_path)
        fsync_dir(slot_path.parent)
    except zstandard.ZstdError as exc:
        raise InstallFailed(f"cannot decompress payload: {exc}") from exc
    except OSError as exc:
        raise InstallFailed(f"cannot write slot {slot_path}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def install_delta(delta_path: Path, delta: Payload, base_path: Path, image: ImageInfo,
                  slot_path: Path) -> None:
    """Apply a verified delta payload to the base slot image, into ``slot_path``.

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
        base = base_path.read_bytes()
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
    _write_slot(result, slot_path)


def _write_slot(data: bytes, slot_path: Path) -> None:
    tmp = slot_path.with_name(f".{slot_path.name}.installing")
    try:
        with open(tmp, "wb") as dst:
            dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, slot_path)
        fsync_dir(slot_path.parent)
    except OSError as exc:
        raise InstallFailed(f"cannot write slot {slot_path}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def hash_file(path: Path) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file, streamed."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            size += len(block)
            digest.update(block)
    return size, digest.hexdigest()
