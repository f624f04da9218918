"""A small bootable disk for the qemu test (tests/test_vm_boot.py).

    GPT disk (sfdisk): 1 bios-grub (GRUB's core.img)  2 boot (ext4: grub/, vmlinuz,
    initrd.img, grubenv)  3 rootfs-a  4 rootfs-b (release images)  5 data (ext4: the
    agent's state directory)

GRUB for BIOS: ``grub-mkimage`` builds core.img; boot.img goes into the protective MBR
and both get the sector numbers ``grub-bios-setup`` would write (Debian ships that tool
only in grub-pc, whose configuration would install GRUB on the host's own disk). The
grub.cfg sources the agent's shipped slot-selection script and boots the Debian kernel
with ``swarmota.slot=a|b``. The initramfs is busybox (busybox-static) plus the kernel
modules for virtio disks and network, 9p and ext4, and an ``/init`` that mounts the
booted slot read-only, reports what it holds on the serial console, panics if the
release says so, then runs the real agent: the host's root file system comes in
read-only over virtio-9p, and ``chroot`` into it runs the worktree's Python with the
agent; the data partition (state directory) and the boot partition (GRUB environment)
are mounted inside it at host paths that exist as empty directories, the VM's disk
devices are its /dev. The network is qemu's user mode: the host's loopback is 10.0.2.2.

Release images are small ext2 file systems (``mke2fs -d``) holding ``/release`` (the
version), ``/health`` (the health check the device config runs) and optionally
``/panic`` (the kernel panics at boot: a release that never comes up).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VM_TOOLS", "Disk", "build_disk", "find_kernel", "release_image"]

VM_TOOLS = ("qemu-system-x86_64", "grub-mkimage", "grub-editenv", "busybox", "sfdisk",
            "mke2fs", "dpkg-deb")
KERNEL_CACHE = Path(os.environ.get("SWARMOTA_VM_CACHE", "/var/cache/swarmota-vm"))
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "9p", "9pnet_virtio", "ext4")
PARTS = [  # name, size MiB, GPT type
    ("bios", 1, "21686148-6449-6E6F-744E-656564454649"),
    ("boot", 40, "L"),
    ("rootfs-a", 2, "L"),
    ("rootfs-b", 2, "L"),
    ("data", 48, "L"),
]


def find_kernel() -> Path | None:
    """The extracted Debian kernel package in the cache (``.ci/run`` downloads it with
    ``apt-get download``): its root, or ``None``."""
    root = KERNEL_CACHE / "kernel"
    if not list((root / "boot").glob("vmlinuz-*")) if root.exists() else True:
        debs = sorted(KERNEL_CACHE.glob("linux-image-*.deb"))
        if not debs:
            return None
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return root if list((root / "boot").glob("vmlinuz-*")) else None


def _cpio(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive: (name, mode, data, rdev)."""
    out = io.BytesIO()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev),
            len(name) + 1, 0))
        out.write(header.encode() + name.encode() + b"\0")
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


def _modules(kernel: Path) -> list[Path]:
    """The modules of MODULES and their dependencies, in load order."""
    moddir = next((kernel / "lib" / "modules").iterdir())
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p
               for p in moddir.rglob("*.ko")}
    order: list[Path] = []

    def add(name: str) -> None:
        path = by_name.get(name.replace("-", "_"))
        if path is None or path in order:
            return  # built in, or already there
        for field in path.read_bytes().split(b"\0"):
            if field.startswith(b"depends="):
                for dep in filter(None, field.removeprefix(b"depends=").decode().split(",")):
                    add(dep)
        order.append(path)

    for name in (*MODULES, "crc32c_generic"):
        add(name)
    return order


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m 2>/dev/null; done
say() { echo "swarmota-vm: $*" > /dev/console; }
part() {
  for u in /sys/class/block/*/uevent; do
    if grep -q "^PARTNAME=$1\$" "$u"; then echo /dev/$(sed -n 's/^DEVNAME=//p' "$u"); fi
  done
}
off() { sync; echo o > /proc/sysrq-trigger; sleep 10; }
slot=$(sed -n 's/.*swarmota\.slot=\([ab]\).*/\1/p' /proc/cmdline)
say "booted slot $slot"
H=/host
mkdir -p $H
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot $H || off
. /plan.env
M=$VM_MNT
. $H$M/boot-plan.env 2>/dev/null
mount -o ro "$(part rootfs-$slot)" $H$M/slot || { say "slot $slot does not mount"; off; }
say "slot $slot holds release $(cat $H$M/slot/release)"
if [ -e $H$M/slot/panic ]; then say "release panics"; echo c > /proc/sysrq-trigger; fi
mount "$(part boot)" $H$M/boot || off
mount "$(part data)" $H$M/data || off
for d in proc sys dev; do mount --bind /$d $H/$d || say "cannot bind /$d"; done
say "in the chroot: $(chroot $H /bin/cat /proc/cmdline)"
mount -t tmpfs tmp $H$M/tmp
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
say "agent starts"
chroot $H /usr/bin/env -i PATH=/usr/bin:/bin HOME=$M/tmp TMPDIR=$M/tmp \
  PYTHONDONTWRITEBYTECODE=1 $AGENT_ENV $PYTHON -m swarmota.cli peer update \
  $M/data/dev --json > $H$M/tmp/out.json 2> /dev/console
rc=$?
say "agent exit $rc"
say "result $(tr -d '\n' < $H$M/tmp/out.json)"
if [ -e $H$M/tmp/reboot ]; then say "rebooting"; sync; echo b > /proc/sysrq-trigger; fi
off
"""


def build_initramfs(kernel: Path, plan_env: str, out: Path) -> None:
    busybox = shutil.which("busybox")
    assert busybox is not None
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o40755, b"", 0) for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules",
                                       "host")]
    entries.append(("dev/console", 0o20600, b"", os.makedev(5, 1)))
    entries.append(("bin/busybox", 0o100755, Path(busybox).read_bytes(), 0))
    order = []
    for path in _modules(kernel):
        entries.append((f"lib/modules/{path.name}", 0o100644, path.read_bytes(), 0))
        order.append(path.name)
    entries.append(("modules.order", 0o100644, "\n".join(order).encode() + b"\n", 0))
    entries.append(("init", 0o100755, INIT.encode(), 0))
    entries.append(("plan.env", 0o100644, plan_env.encode(), 0))
    out.write_bytes(gzip.compress(_cpio(entries), compresslevel=1))


def release_image(out: Path, version: str, *, healthy: bool = True,
                  panics: bool = False) -> bytes:
    """An ext2 image of a release (see the module docstring); returns its bytes."""
    src = out.with_suffix(".d")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / "release").write_text(version + "\n")
    (src / "health").write_text("#!/bin/sh\necho health check of " + version +
                                (": ok\nexit 0\n" if healthy else ": FAILED\nexit 1\n"))
    if panics:
        (src / "panic").write_text("1\n")
    out.unlink(missing_ok=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-N", "32",
                    "-U", "clear", "-E", "root_owner=0:0,hash_seed=00000000-0000-0000-"
                    "0000-000000000000", "-d", str(src), str(out), "512"],
                   check=True, capture_output=True,
                   env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})
    return out.read_bytes()


@dataclass(frozen=True)
class Disk:
    image: Path
    offsets: dict[str, tuple[int, int]]  # partition -> (offset, size) bytes


GRUB_CFG = """serial --unit=0 --speed=115200
terminal_output serial
set timeout=0
set swarmota_env=($root)/grub/grubenv
source ($root)/grub/swarmota.cfg
echo "grub: booting slot ${swarmota_slot}"
linux ($root)/vmlinuz console=ttyS0 panic=1 no_timer_check quiet loglevel=3 swarmota.slot=${swarmota_slot} root=PARTLABEL=rootfs-${swarmota_slot}
initrd ($root)/initrd.img
boot
"""  # noqa: E501 (one kernel command line)


def build_disk(out: Path, kernel: Path, *, grub_script: str, boot_files: Path,
               slot_a: bytes, data_dir: Path, plan_env: str) -> Disk:
    """The disk (see the module docstring). ``boot_files``: extra files for the boot
    partition (the grubenv); ``data_dir``: the data partition's content; ``plan_env``:
    shell assignments for /init (VM_MNT: the host directory holding the mount points
    slot/ boot/ data/ tmp/ and boot-plan.env, read at every boot; PYTHON)."""
    size = (sum(s for _, s, _ in PARTS) + 2) << 20
    with open(out, "wb") as fh:
        fh.truncate(size)
    table = "label: gpt\n" + "".join(f"size={s}MiB, type={t}, name={n}\n"
                                     for n, s, t in PARTS)
    subprocess.run(["sfdisk", "-q", str(out)], input=table.encode(), check=True,
                   capture_output=True)
    listing = json.loads(subprocess.run(["sfdisk", "--json", str(out)], check=True,
                                        capture_output=True).stdout)
    offsets = {p["name"]: (p["start"] * 512, p["size"] * 512)
               for p in listing["partitiontable"]["partitions"]}
    boot = out.with_name("boot.d")
    shutil.rmtree(boot, ignore_errors=True)
    shutil.copytree(boot_files, boot)
    (boot / "grub").mkdir(exist_ok=True)
    (boot / "grub" / "grub.cfg").write_text(GRUB_CFG)
    (boot / "grub" / "swarmota.cfg").write_text(grub_script)
    shutil.copy(next((kernel / "boot").glob("vmlinuz-*")), boot / "vmlinuz")
    build_initramfs(kernel, plan_env, boot / "initrd.img")
    for name, src in (("boot", boot), ("data", data_dir)):
        offset, length = offsets[name]
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^metadata_csum",
                        "-E", f"offset={offset}", "-d", str(src), str(out),
                        f"{length // 1024}k"], check=True, capture_output=True)
    with open(out, "r+b") as fh:
        fh.seek(offsets["rootfs-a"][0])
        fh.write(slot_a)
    _install_grub(out, offsets)
    return Disk(out, offsets)


def _install_grub(disk: Path, offsets: dict[str, tuple[int, int]]) -> None:
    """What grub-bios-setup does: core.img into the BIOS boot partition, its blocklist
    pointing at itself; boot.img into the MBR pointing at core.img."""
    core = disk.with_name("core.img")
    boot_part = list(offsets).index("boot") + 1
    subprocess.run(["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-p",
                    f"(hd0,gpt{boot_part})/grub", "biosdisk", "part_gpt", "ext2", "normal",
                    "configfile", "loadenv", "test", "echo", "linux", "search", "gzio",
                    "boot", "serial", "terminal"], check=True, capture_output=True)
    data = bytearray(core.read_bytes())
    data += b"\0" * (-len(data) % 512)
    start = offsets["bios"][0] // 512
    sectors = len(data) // 512
    assert len(data) <= offsets["bios"][1], "core.img does not fit the BIOS boot partition"
    # diskboot.img (core.img's first sector) ends with a blocklist: start, length, segment
    struct.pack_into("<QHH", data, 0x200 - 12, start + 1, sectors - 1, 0x820)
    mbr = bytearray((GRUB_DIR / "boot.img").read_bytes())
    struct.pack_into("<Q", mbr, 0x5C, start)  # GRUB_BOOT_MACHINE_KERNEL_SECTOR
    with open(disk, "r+b") as fh:
        old = bytearray(fh.read(512))
        old[:0x1B8] = mbr[:0x1B8]  # keep the protective MBR's partition table
        fh.seek(0)
        fh.write(old)
        fh.seek(start * 512)
        fh.write(data)
