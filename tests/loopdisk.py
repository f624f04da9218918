"""A disk image with a real GPT partition table (sfdisk), its partitions attached as
loop devices (root only). The kernels these tests run on may not scan partitions of
loop devices, so each partition gets a loop device of its own (offset and size from
the partition table, as ``losetup --offset --sizelimit``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["LoopDisk", "loop_disk", "need_loop_devices"]


def need_loop_devices() -> None:
    """Skip unless root with losetup and sfdisk."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    for tool in ("losetup", "sfdisk"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian util-linux / fdisk)")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no /dev/loop-control: loop devices unavailable")


@dataclass(frozen=True)
class LoopDisk:
    image: Path
    partitions: dict[str, Path]  # partition name -> its loop device
    offsets: dict[str, tuple[int, int]]  # name -> (offset, size) in the image


@contextmanager
def loop_disk(image: Path, parts: list[tuple[str, int]], *,
              size_bytes: int | None = None) -> Iterator[LoopDisk]:
    """Create ``image`` with a GPT holding ``parts`` (name, size in MiB), attach each
    partition; detach on exit."""
    need_loop_devices()
    total = size_bytes or (sum(s for _, s in parts) + 2) * (1 << 20)
    with open(image, "wb") as fh:
        fh.truncate(total)
    table = "label: gpt\n" + "".join(f"size={size}MiB, type=L, name={name}\n"
                                     for name, size in parts)
    subprocess.run(["sfdisk", "-q", str(image)], input=table.encode(), check=True,
                   capture_output=True)
    listing = json.loads(subprocess.run(["sfdisk", "--json", str(image)], check=True,
                                        capture_output=True).stdout)
    offsets = {p["name"]: (p["start"] * 512, p["size"] * 512)
               for p in listing["partitiontable"]["partitions"]}
    attached: dict[str, Path] = {}
    try:
        for name, (offset, size) in offsets.items():
            dev = subprocess.run(["losetup", "--find", "--show", "--offset", str(offset),
                                  "--sizelimit", str(size), str(image)], check=True,
                                 capture_output=True, text=True).stdout.strip()
            attached[name] = Path(dev)
        yield LoopDisk(image, attached, offsets)
    finally:
        for dev in attached.values():
            subprocess.run(["losetup", "-d", str(dev)], check=False, capture_output=True)
