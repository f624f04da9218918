"""Slot backends: where the A/B images live and how one is rewritten safely.

The agent talks to slots only through :class:`SlotBackend`: :class:`FileSlots` here,
``peer.blockslots.BlockSlots`` for partitions (``/dev/mmcblk0p2``). The contract every
backend keeps:

- :meth:`SlotBackend.begin_write` returns a :class:`SlotWriter`; nothing the writer
  does is visible in the slot until :meth:`SlotWriter.commit` returns, and after a crash
  at any instant the slot holds either its old or its new content (a block device
  would get this from the boot-control record, which names a slot only after it is
  written and verified; the file backend also from its rename);
- :meth:`SlotWriter.discard` and :meth:`SlotBackend.reclaim` remove what an aborted or
  crashed write left behind;
- reads raise ``OSError`` on failure; callers translate.

:class:`FileSlots` is the file-backed implementation (simulation, tests, devices whose
images are files): ``DIR/a.img``, ``DIR/b.img``; a write goes to ``DIR/.b.img.installing``
and is fsynced, renamed over the slot and the directory fsynced. Crash points:
``slot_write.mid`` (half the image written), ``slot_write.{before,after}_fsync``,
``slot_write.{before,after}_rename``, ``slot_write.after_dir_fsync``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Protocol

from swarmota.infra.fsio import fsync_dir
from swarmota.peer.crashpoints import crash_point

__all__ = ["FileSlots", "SlotBackend", "SlotWriter"]

_BLOCK = 1 << 20


class SlotWriter(Protocol):
    """One in-progress rewrite of a slot."""

    def write(self, data: bytes) -> None:
        """Append ``data``; raises ``OSError`` (e.g. ENOSPC)."""

    def commit(self) -> None:
        """Make everything written durable and the slot's content; raises ``OSError``."""

    def discard(self) -> None:
        """Abandon the write (idempotent; also after ``commit``, where it does nothing)."""


class SlotBackend(Protocol):
    """Storage of the A/B slot images. ``in_place``: a write goes straight into the
    slot (a partition), so until its commit and read-back the slot holds nothing
    usable (the agent marks its record empty first)."""

    in_place: bool

    def image_path(self, slot: str) -> Path:
        """The path the health check and a bootloader read the slot from."""

    def exists(self, slot: str) -> bool:
        """Whether the slot holds an image at all."""

    def read(self, slot: str, size: int | None = None) -> bytes:
        """The whole image (delta bases); ``size``: the image's size as boot control
        recorded it (a partition is larger than its image; a file is the image).
        Raises ``OSError``."""

    def hash(self, slot: str, size: int | None = None) -> tuple[int, str]:
        """``(size, sha256 hex)`` of the image, read from storage (``size`` as for
        :meth:`read`); raises ``OSError``."""

    def staging_dir(self) -> Path | None:
        """Where a write keeps its temporary copy (it needs free space there), or
        ``None`` for a backend that writes in place."""

    def begin_write(self, slot: str, size: int) -> SlotWriter:
        """Start rewriting ``slot`` with an image of ``size`` bytes; raises ``OSError``."""

    def reclaim(self) -> list[str]:
        """Remove leftovers of interrupted writes; returns what was removed."""


def hash_stream(fh: BinaryIO) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    while block := fh.read(_BLOCK):
        size += len(block)
        digest.update(block)
    return size, digest.hexdigest()


class _FileSlotWriter:
    def __init__(self, target: Path, size: int) -> None:
        self.target = target
        self.tmp = target.with_name(f".{target.name}.installing")
        self.size = size
        self.written = 0
        self.fh: BinaryIO | None = open(self.tmp, "wb")  # noqa: SIM115 (closed by commit/discard)

    def write(self, data: bytes) -> None:
        if self.fh is None:
            raise RuntimeError("write after commit or discard")
        half = self.size // 2
        if self.written <= half < self.written + len(data) and len(data) > 1:
            cut = half - self.written
            self.fh.write(data[:cut])
            self.fh.flush()
            crash_point("slot_write.mid")
            self.fh.write(data[cut:])
        else:
            self.fh.write(data)
        self.written += len(data)

    def commit(self) -> None:
        if self.fh is None:
            raise RuntimeError("commit after commit or discard")
        fh, self.fh = self.fh, None
        try:
            fh.flush()
            crash_point("slot_write.before_fsync")
            os.fsync(fh.fileno())
            crash_point("slot_write.after_fsync")
        finally:
            fh.close()
        crash_point("slot_write.before_rename")
        os.replace(self.tmp, self.target)
        crash_point("slot_write.after_rename")
        fsync_dir(self.target.parent)
        crash_point("slot_write.after_dir_fsync")

    def discard(self) -> None:
        if self.fh is not None:
            fh, self.fh = self.fh, None
            with contextlib.suppress(OSError):
                fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class FileSlots:
    """File-backed slots ``DIR/a.img`` and ``DIR/b.img`` (see the module docstring)."""

    in_place = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def image_path(self, slot: str) -> Path:
        return self.directory / f"{slot}.img"

    def exists(self, slot: str) -> bool:
        return self.image_path(slot).is_file()

    def read(self, slot: str, size: int | None = None) -> bytes:
        return self.image_path(slot).read_bytes()

    def hash(self, slot: str, size: int | None = None) -> tuple[int, str]:
        with open(self.image_path(slot), "rb") as fh:
            return hash_stream(fh)

    def staging_dir(self) -> Path | None:
        return self.directory

    def begin_write(self, slot: str, size: int) -> SlotWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        return _FileSlotWriter(self.image_path(slot), size)

    def reclaim(self) -> list[str]:
        removed = []
        for leftover in sorted(self.directory.glob(".*.installing")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed.append(leftover.name)
        return removed
