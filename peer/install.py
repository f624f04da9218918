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
from manifest import ImageInfo
from peer.errors import InstallFailed, VerifyFailed

__all__ = ["hash_file", "install_image"]

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


def hash_file(path: Path) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file, streamed."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            size += len(block)
            digest.update(block)
    return size, digest.hexdigest()
