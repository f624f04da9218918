"""Block-device slots (peer/blockslots.py) on loop devices over a disk image with a real
GPT: write the inactive partition, read it back from the device, never write the booted
or a mounted slot, resolve partition labels; and a whole update through the real agent
into a partition."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from swarmota.peer.agent import update_once
from swarmota.peer.blockslots import BlockSlots, booted_slot, resolve_device
from swarmota.peer.errors import ConfigError, StatusCode
from swarmota.peer.state import init_device
from tests.loopdisk import LoopDisk, loop_disk
from tests.release_env import ReleaseEnv

IMAGE = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: not a whole sector


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    with loop_disk(tmp_path / "disk.img", [("rootfs-a", 4), ("rootfs-b", 4)]) as d:
        yield d


def slots_of(disk: LoopDisk, tmp_path: Path, cmdline: str = "") -> BlockSlots:
    (tmp_path / "cmdline").write_text(cmdline)
    return BlockSlots({"a": str(disk.partitions["rootfs-a"]),
                       "b": str(disk.partitions["rootfs-b"])},
                      cmdline_path=tmp_path / "cmdline")


def test_inactive_partition_is_written_and_read_back_from_the_device(
        disk: LoopDisk, tmp_path: Path) -> None:
    slots = slots_of(disk, tmp_path, "root=/dev/vda3 swarmota.slot=a")
    writer = slots.begin_write("b", len(IMAGE))
    for i in range(0, len(IMAGE), 100_000):
        writer.write(IMAGE[i:i + 100_000])
    writer.commit()
    assert slots.hash("b", len(IMAGE)) == (len(IMAGE), hashlib.sha256(IMAGE).hexdigest())
    assert slots.read("b", len(IMAGE)) == IMAGE
    offset, _ = disk.offsets["rootfs-b"]
    with open(disk.image, "rb") as fh:  # on the disk itself, at the partition's offset
        fh.seek(offset)
        assert fh.read(len(IMAGE)) == IMAGE
    a_offset, _ = disk.offsets["rootfs-a"]
    with open(disk.image, "rb") as fh:
        fh.seek(a_offset)
        assert fh.read(4096) == b"\0" * 4096, "slot a untouched"


def test_the_booted_slot_is_never_written(disk: LoopDisk, tmp_path: Path) -> None:
    for cmdline in ("quiet swarmota.slot=b", f"root={disk.partitions['rootfs-b']} ro"):
        slots = slots_of(disk, tmp_path, cmdline)
        assert slots.booted() == "b"
        with pytest.raises(OSError, match="booted slot"):
            slots.begin_write("b", 10)
    with pytest.raises(ConfigError, match="unknown slot 'c'"):
        booted_slot({"a": "x", "b": "y"}, cmdline="swarmota.slot=c", mountinfo="")


def test_a_mounted_slot_is_never_written(disk: LoopDisk, tmp_path: Path) -> None:
    """The mount table names the partition (here: a line as /proc/self/mountinfo
    has it, for the loop device's numbers): refused, and it counts as booted if it is
    mounted on /."""
    dev = disk.partitions["rootfs-a"]
    rdev = dev.stat().st_rdev
    line = f"22 1 {os.major(rdev)}:{os.minor(rdev)} / / rw,relatime - ext4 {dev} rw\n"
    (tmp_path / "mountinfo").write_text(line)
    slots = BlockSlots({"a": str(dev), "b": str(disk.partitions["rootfs-b"])},
                       cmdline_path=tmp_path / "none", mountinfo_path=tmp_path / "mountinfo")
    assert slots.booted() == "a"
    with pytest.raises(OSError, match=r"booted slot|mounted"):
        slots.begin_write("a", 10)
    slots.begin_write("b", 10).discard()


def test_an_image_larger_than_the_partition_is_refused(disk: LoopDisk,
                                                        tmp_path: Path) -> None:
    slots = slots_of(disk, tmp_path)
    with pytest.raises(OSError, match="does not fit"):
        slots.begin_write("b", 5 << 20)


def test_partition_labels_resolve_through_sysfs(disk: LoopDisk, tmp_path: Path) -> None:
    """``PARTLABEL=`` is looked up in sysfs (uevent PARTNAME), so it works without udev
    (the VM test resolves real labels; here a sysfs tree names the loop devices)."""
    sysfs = tmp_path / "sys"
    for name, dev in disk.partitions.items():
        (sysfs / dev.name).mkdir(parents=True)
        (sysfs / dev.name / "uevent").write_text(f"MAJOR=7\nDEVNAME={dev.name}\n"
                                                 f"DEVTYPE=partition\nPARTNAME={name}\n")
    assert resolve_device("PARTLABEL=rootfs-b", sys_block=sysfs) == disk.partitions["rootfs-b"]
    with pytest.raises(ConfigError, match="no partition labelled"):
        resolve_device("PARTLABEL=rootfs-c", sys_block=sysfs)
    with pytest.raises(ConfigError, match="invalid partition label"):
        resolve_device("PARTLABEL=../../etc", sys_block=sysfs)


async def test_update_into_a_partition_through_the_agent(env: ReleaseEnv,
                                                         tmp_path: Path) -> None:
    """A device whose slots are partitions: slot a holds the factory image (checked by
    ``init``, never written), the update goes into partition b, is read back from the
    device, booted (simulated bootloader) and committed; slot a's bytes are unchanged."""
    with loop_disk(tmp_path / "disk.img", [("rootfs-a", 3), ("rootfs-b", 3)]) as d:
        a, b = d.partitions["rootfs-a"], d.partitions["rootfs-b"]
        factory = env.image_path("factory-1.0.0.img", env.v1)
        with open(a, "r+b") as fh:
            fh.write(env.v1)
        base = env.device("dev-blk", mode="direct")
        config = replace(base.config(), slot_backend="block",
                         slot_devices={"a": str(a), "b": str(b)})
        with pytest.raises(ConfigError, match="does not hold"):
            init_device(tmp_path / "wrong", config, root_json=env.repo.root_bytes(),
                        image=env.image_path("other.img", b"x" * 999), version="1.0.0",
                        release_counter=1)
        dev = init_device(base.root, config, root_json=env.repo.root_bytes(), image=factory,
                          version="1.0.0", release_counter=1, force=True)
        before = _prefix_hash(a, len(env.v1))
        result = await update_once(dev)
        assert result.status == StatusCode.OK, result.message
        bc = dev.bootctl()
        assert bc.committed == "b" and not bc.pending
        assert _prefix_hash(b, len(env.v2)) == hashlib.sha256(env.v2).hexdigest()
        assert _prefix_hash(a, len(env.v1)) == before
        assert not (dev.root / "slots" / "b.img").exists()
        status = subprocess.run([sys.executable, "-m", "swarmota.cli", "peer", "status",
                                 str(dev.root)],
                                capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout
        assert "slot b: 2.0.0" in status


def _prefix_hash(dev: Path, size: int) -> str:
    with open(dev, "rb") as fh:
        return hashlib.sha256(fh.read(size)).hexdigest()

