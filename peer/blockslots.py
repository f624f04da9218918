"""Block-device slots: A/B images in partitions, written in place, never the booted one.

A slot is a partition named by path (``/dev/mmcblk0p2``) or by GPT partition label
(``PARTLABEL=rootfs-b``, resolved through sysfs, so it works without udev, e.g. in an
initramfs). The image occupies the start of the partition; its size comes from the
caller (boot control records it), since a partition is larger than its image.

A write (:meth:`BlockSlots.begin_write`) goes straight into the inactive partition:
there is no room for a temporary copy, so until boot control names the slot (which it
does only after :meth:`BlockSlots.hash` read it back and it matched the signed image)
a crash leaves a slot that simply is not bootable; the agent marks its record empty
before it writes (``in_place``). :meth:`~_BlockWriter.commit` fsyncs the device; the
read-back opens it with ``O_DIRECT`` (falling back to dropping the page cache with
``posix_fadvise``), so the hash is of what the device holds, not of what the kernel
still caches.

Never the booted slot: before opening a partition for writing, the backend refuses a
slot that the kernel command line names as booted (``swarmota.slot=a|b``, or
``root=`` naming its device) or that is mounted anywhere (``/proc/self/mountinfo``,
compared by device number). :func:`booted_slot` is the same detection, for the
bootloader adapters.

Crash points: ``slot_write.mid``, ``slot_write.before_fsync``, ``slot_write.after_fsync``
(as for file slots).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from swarmota.peer.crashpoints import crash_point
from swarmota.peer.errors import ConfigError

__all__ = ["BlockSlots", "booted_slot", "resolve_device"]

_BLOCK = 1 << 20
_LABEL_RE = re.compile(r"[A-Za-z0-9._:-]{1,36}")


def resolve_device(spec: str, *, sys_block: Path = Path("/sys/class/block"),
                   dev: Path = Path("/dev")) -> Path:
    """The device node of ``spec``: a path, or ``PARTLABEL=<label>`` (looked up in
    sysfs: the partition whose ``uevent`` says ``PARTNAME=<label>``).

    Raises:
        ConfigError: the label is malformed, unknown, or names several partitions.
    """
    if not spec.startswith("PARTLABEL="):
        return Path(spec)
    label = spec.removeprefix("PARTLABEL=")
    if not _LABEL_RE.fullmatch(label):
        raise ConfigError(f"invalid partition label {label!r}")
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(sys_block.iterdir()):
            try:
                uevent = (entry / "uevent").read_text()
            except OSError:
                continue
            fields = dict(line.partition("=")[::2] for line in uevent.splitlines())
            if fields.get("PARTNAME") == label and fields.get("DEVNAME"):
                found.append(dev / fields["DEVNAME"])
    if not found:
        raise ConfigError(f"no partition labelled {label!r}")
    if len(found) > 1:
        raise ConfigError(f"several partitions labelled {label!r}: "
                          f"{', '.join(map(str, found))}")
    return found[0]


def _rdev(path: Path) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _mounted_devices(mountinfo: str) -> dict[int, list[str]]:
    """Device number -> mount points, from ``/proc/self/mountinfo`` text."""
    out: dict[int, list[str]] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5 or ":" not in fields[2]:
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            out.setdefault(os.makedev(int(major), int(minor)), []).append(fields[4])
    return out


def booted_slot(devices: Mapping[str, str], *, cmdline: str, mountinfo: str,
                resolve: bool = True) -> str | None:
    """The slot the running system booted from: ``swarmota.slot=`` on the kernel
    command line, else the slot whose device ``root=`` names, else the slot mounted at
    ``/``; ``None`` when none of them says."""
    args = cmdline.split()
    for arg in args:
        if arg.startswith("swarmota.slot="):
            value = arg.removeprefix("swarmota.slot=")
            if value in devices:
                return value
            raise ConfigError(f"kernel command line names unknown slot {value!r}")
    for arg in args:
        if arg.startswith("root="):
            root = arg.removeprefix("root=")
            for slot, spec in devices.items():
                if root == spec:
                    return slot
                if resolve:
                    with contextlib.suppress(ConfigError):
                        dev = _rdev(resolve_device(spec))
                        if dev is not None and dev == _rdev(resolve_device(root)):
                            return slot
    if resolve:
        mounted = _mounted_devices(mountinfo)
        for slot, spec in devices.items():
            with contextlib.suppress(ConfigError):
                dev = _rdev(resolve_device(spec))
                if dev is not None and "/" in mounted.get(dev, []):
                    return slot
    return None


class _BlockWriter:
    def __init__(self, fd: int, path: Path, size: int) -> None:
        self.fd: int | None = fd
        self.path = path
        self.size = size
        self.written = 0

    def write(self, data: bytes) -> None:
        if self.fd is None:
            raise RuntimeError("write after commit or discard")
        if self.written + len(data) > self.size:
            raise OSError(f"image larger than announced ({self.size} bytes)")
        half = self.size // 2
        if self.written <= half < self.written + len(data) and len(data) > 1:
            cut = half - self.written
            _write_all(self.fd, data[:cut])
            crash_point("slot_write.mid")
            _write_all(self.fd, data[cut:])
        else:
            _write_all(self.fd, data)
        self.written += len(data)

    def commit(self) -> None:
        if self.fd is None:
            raise RuntimeError("commit after commit or discard")
        fd, self.fd = self.fd, None
        try:
            crash_point("slot_write.before_fsync")
            os.fsync(fd)
            crash_point("slot_write.after_fsync")
        finally:
            os.close(fd)

    def discard(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class BlockSlots:
    """Slots in partitions: ``devices`` maps ``"a"``/``"b"`` to a path or
    ``PARTLABEL=``. ``cmdline_path`` and ``mountinfo_path`` are where the booted slot is
    read from (tests point them elsewhere)."""

    in_place = True

    def __init__(self, devices: Mapping[str, str], *,
                 cmdline_path: Path = Path("/proc/cmdline"),
                 mountinfo_path: Path = Path("/proc/self/mountinfo")) -> None:
        if sorted(devices) != ["a", "b"]:
            raise ConfigError("block slots need a device for slot a and for slot b")
        self.devices = dict(devices)
        self.cmdline_path = cmdline_path
        self.mountinfo_path = mountinfo_path

    def device(self, slot: str) -> Path:
        return resolve_device(self.devices[slot])

    def image_path(self, slot: str) -> Path:
        return self.device(slot)

    def staging_dir(self) -> Path | None:
        return None  # written in place: needs no free space in a file system

    def booted(self) -> str | None:
        """The booted slot (see :func:`booted_slot`)."""
        return booted_slot(self.devices, cmdline=_read(self.cmdline_path),
                           mountinfo=_read(self.mountinfo_path))

    def exists(self, slot: str) -> bool:
        return _rdev(self.device(slot)) is not None

    def _capacity(self, fd: int) -> int:
        return os.lseek(fd, 0, os.SEEK_END)

    def read(self, slot: str, size: int | None = None) -> bytes:
        if size is None:
            raise RuntimeError("a partition holds an image of a size only boot control knows")
        with open(self.device(slot), "rb") as fh:
            data = fh.read(size)
        if len(data) != size:
            raise OSError(f"slot {slot}: partition shorter than the image ({len(data)} bytes)")
        return data

    def hash(self, slot: str, size: int | None = None) -> tuple[int, str]:
        """``(size, sha256)`` of the first ``size`` bytes, read from the device itself
        (``O_DIRECT``, else after dropping its cached pages)."""
        if size is None:
            raise RuntimeError("a partition holds an image of a size only boot control knows")
        path = self.device(slot)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            direct = True
        except OSError:
            fd = os.open(path, os.O_RDONLY)
            direct = False
        try:
            if not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            digest = hashlib.sha256()
            done = 0
            buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT wants
            try:
                while done < size:
                    n = os.preadv(fd, [buf], done)
                    if n <= 0:
                        break
                    take = min(n, size - done)
                    digest.update(memoryview(buf)[:take])
                    done += take
            finally:
                buf.close()
            return done, digest.hexdigest()
        finally:
            os.close(fd)

    def check_writable(self, slot: str) -> Path:
        """The device of ``slot`` if it may be written: not the booted slot, not
        mounted. Raises ``OSError`` (EBUSY) otherwise."""
        path = self.device(slot)
        if self.booted() == slot:
            raise OSError(16, f"slot {slot} ({path}) is the booted slot; never written")
        dev = _rdev(path)
        if dev is None:
            raise OSError(19, f"slot {slot}: {path} is not a block device")
        mounts = _mounted_devices(_read(self.mountinfo_path)).get(dev)
        if mounts:
            raise OSError(16, f"slot {slot} ({path}) is mounted on {', '.join(mounts)}")
        return path

    def begin_write(self, slot: str, size: int) -> _BlockWriter:
        path = self.check_writable(slot)
        fd = os.open(path, os.O_WRONLY | os.O_EXCL)  # O_EXCL: fails if mounted (EBUSY)
        try:
            capacity = self._capacity(fd)
            if size > capacity:
                raise OSError(28, f"slot {slot}: image of {size} bytes does not fit "
                                  f"{path} ({capacity} bytes)")
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return _BlockWriter(fd, path, size)

    def reclaim(self) -> list[str]:
        return []  # nothing temporary: an unfinished write is an unbootable slot


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
