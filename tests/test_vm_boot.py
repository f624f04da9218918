"""Proof on a booting machine: a qemu VM boots a disk with GRUB (BIOS), two root slots
and a GRUB environment; the real agent runs inside it at every boot and updates it
through the block-slot and GRUB backends (tests/vmimage.py builds the disk and says how
the agent gets into the VM). The origin and tracker run here, on loopback (the VM's
user-mode network reaches them as 10.0.2.2).

- update: boot A installs the release into B and reboots; GRUB boots B (one try
  taken), its health check passes, B is committed and reported (0); the next boot stays
  on B;
- a release that panics at boot: GRUB tries B three times (its budget), then boots A
  again, and the agent reports the rollback (40) with the reason;
- power cut (the VM killed) in the middle of the slot write, then during the GRUB
  environment write: each next boot is A, the update resumes and completes on B.

Serial console logs are kept in ``tests/artifacts/vm/`` (and the test's tmp dir).
KVM when /dev/kvm works, else TCG (slower, bounded). Skips without root, qemu, GRUB
for BIOS, busybox or the Debian kernel package that ``.ci/run`` downloads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import ReleaseManifest
from swarmota.peer.bootloader import FACTORY, GrubEnv, script
from swarmota.peer.config import DeviceConfig, save_config
from swarmota.peer.state import init_device
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.publish import publish_release
from swarmota.seeder.repository import Repository
from swarmota.seeder.server import serve_origin
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore
from tests.release_env import HARDWARE_ID, PRODUCT
from tests.vmimage import GRUB_DIR, VM_TOOLS, build_disk, find_kernel, release_image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts" / "vm"


def _kvm_works() -> bool:
    """KVM when it works: /dev/kvm opens, and a guest gets through GRUB into protected
    mode with it (nested KVM on some hosts opens fine, then hangs there)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    if os.environ.get("SWARMOTA_VM_ACCEL") in ("kvm", "tcg"):
        return os.environ["SWARMOTA_VM_ACCEL"] == "kvm"
    kernel = find_kernel()
    if kernel is None or shutil.which("qemu-system-x86_64") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="swarmota-kvm-probe-"))
    try:
        (probe / "bf" / "grub").mkdir(parents=True)
        (probe / "data").mkdir()
        build_disk(probe / "d.img", kernel, grub_script="set swarmota_slot=a\n",
                   boot_files=probe / "bf", slot_a=b"", data_dir=probe / "data",
                   plan_env="")
        try:
            out = subprocess.run(
                ["qemu-system-x86_64", "-enable-kvm", "-m", "256", "-display", "none",
                 "-no-reboot", "-monitor", "none", "-serial", "stdio", "-drive",
                 f"file={probe / 'd.img'},format=raw,if=virtio"],
                capture_output=True, timeout=15).stdout
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
        return b"grub: booting slot" in out
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (block devices, 9p export of /)"
    missing = [t for t in VM_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (.ci/run installs them from Debian)"
    if not (GRUB_DIR / "boot.img").exists():
        return "GRUB for BIOS not installed (Debian grub-pc-bin)"
    if find_kernel() is None:
        return "no Debian kernel package in the VM cache (.ci/run runs apt-get download)"
    return None


SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))
KVM = SKIP is None and _kvm_works()
BOOT_TIMEOUT_S = 90 if KVM else 300


@dataclass
class Boot:
    console: str
    killed: bool

    @property
    def slot(self) -> str | None:
        m = re.search(r"swarmota-vm: booted slot ([ab])", self.console)
        return m.group(1) if m else None

    @property
    def result(self) -> dict[str, Any] | None:
        m = re.search(r"swarmota-vm: result (\{.*\})", self.console)
        return json.loads(m.group(1)) if m else None


@dataclass
class Machine:
    """A disk, booted again and again by qemu; ``mnt`` holds the mount points the VM
    uses inside the host's root (see tests/vmimage.py)."""

    name: str
    mnt: Path
    disk: Path
    boots: list[Boot] = field(default_factory=list)

    async def boot(self, *, hang_at: str | None = None) -> Boot:
        plan = ""
        if hang_at:
            plan = f'AGENT_ENV="SWARMOTA_CRASH_AT={hang_at} SWARMOTA_CRASH_ACTION=hang"\n'
        (self.mnt / "boot-plan.env").write_text(plan)
        console = self.mnt / f"console-{len(self.boots) + 1}.log"
        argv = ["qemu-system-x86_64", *(["-enable-kvm"] if KVM else []),
                "-m", "768", "-smp", "1", "-display", "none", "-no-reboot",
                "-monitor", "none", "-serial", f"file:{console}",
                "-drive", f"file={self.disk},format=raw,if=virtio,cache=writeback",
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                "readonly=on,multidevs=remap",
                "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
        proc = await trio.lowlevel.open_process(argv)
        killed = False
        try:
            with trio.fail_after(BOOT_TIMEOUT_S):
                while proc.poll() is None:
                    if hang_at and console.exists() and \
                            "SWARMOTA-CRASH-POINT" in console.read_text(errors="replace"):
                        proc.kill()  # the power cut
                        killed = True
                        break
                    await trio.sleep(0.05)
                await proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
            text = console.read_text(errors="replace") if console.exists() else ""
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / f"{self.name}-boot{len(self.boots) + 1}.log").write_text(text)
        boot = Boot(text, killed)
        self.boots.append(boot)
        return boot


@dataclass
class Lab:
    repo: Repository
    workdir: Path
    origin_port: int
    tracker_port: int
    db: Path
    v1: bytes

    def publish(self, version: str, counter: int, **kind: bool) -> ReleaseManifest:
        image = release_image(self.workdir / f"release-{version}.img", version, **kind)
        m = publish_release(self.repo, self.workdir / f"release-{version}.img",
                            product=PRODUCT, version=version, release_counter=counter,
                            compatibility=[HARDWARE_ID], zstd_level=3)
        assert m.image.size == len(image)
        store = SqliteStore(self.db)
        try:
            register_release(store, Release.from_manifest(m),
                             RolloutPlan.everyone(retry_rolled_back=True))
        finally:
            store.close()
        return m

    def reports(self) -> list[tuple[int, str]]:
        store = SqliteStore(self.db)
        try:
            return [(r.status, r.message) for r in store.reports()]
        finally:
            store.close()

    def machine(self, name: str) -> Machine:
        mnt = self.workdir / name
        for sub in ("slot", "boot", "data", "tmp"):
            (mnt / sub).mkdir(parents=True)
        kernel = find_kernel()
        assert kernel is not None
        config = DeviceConfig(
            device_id=name, product=PRODUCT, hardware_id=HARDWARE_ID,
            origin_url=f"http://10.0.2.2:{self.origin_port}",
            tracker_url=f"http://10.0.2.2:{self.tracker_port}", download_mode="direct",
            seed_time_s=0, http_timeout_s=20.0, health_timeout_s=30.0,
            health_command=("/bin/sh", f"{mnt}/slot/health"))
        staging = self.workdir / f"{name}-data"
        factory = self.workdir / "release-1.0.0.img"
        state = init_device(staging / "dev", config, root_json=self.repo.root_bytes(),
                            image=factory, version="1.0.0", release_counter=1)
        # the same state, seen from inside the VM: partitions and GRUB
        save_config(state.config_path, replace(
            config, slot_backend="block",
            slot_devices={"a": "PARTLABEL=rootfs-a", "b": "PARTLABEL=rootfs-b"},
            bootloader="grub", grub_env_path=f"{mnt}/boot/grub/grubenv",
            reboot_command=("/bin/sh", "-c", f"touch {mnt}/tmp/reboot")))
        shutil.rmtree(state.root / "slots")
        boot_files = self.workdir / f"{name}-bootfiles"
        (boot_files / "grub").mkdir(parents=True)
        GrubEnv(boot_files / "grub" / "grubenv").write(FACTORY, what="init")
        disk = build_disk(self.workdir / f"{name}.img", kernel,
                          grub_script=script("grub.cfg"), boot_files=boot_files,
                          slot_a=self.v1, data_dir=staging,
                          plan_env=f"VM_MNT={mnt}\nPYTHON={sys.executable}\n")
        return Machine(name, mnt, disk.image)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    repo = Repository.create(tmp_path / "repo")
    v1 = release_image(tmp_path / "release-1.0.0.img", "1.0.0")
    db = tmp_path / "tracker.sqlite"
    async with trio.open_nursery() as nursery:
        origin = await nursery.start(serve_origin, OriginApp(repo.origin_dir, OriginConfig()),
                                     ListenConfig())
        tracker = await nursery.start(serve_tracker, TrackerConfig(db_path=db))
        yield Lab(repo, tmp_path, _port(origin), _port(tracker), db, v1)
        nursery.cancel_scope.cancel()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


def _describe(machine: Machine) -> str:
    return "\n".join(f"--- boot {i + 1} (slot {b.slot}, killed {b.killed}) ---\n"
                     f"{b.console[-3000:]}" for i, b in enumerate(machine.boots))


async def test_vm_update_boots_slot_b_commits_it_and_stays_there(lab: Lab) -> None:
    lab.publish("2.0.0", 2)
    vm = lab.machine("vm-update")
    started = time.monotonic()
    first = await vm.boot()
    assert first.slot == "a" and first.result is not None, _describe(vm)
    assert first.result["reboot_pending"] and "swarmota-vm: rebooting" in first.console
    second = await vm.boot()
    assert second.slot == "b", _describe(vm)
    assert "slot b holds release 2.0.0" in second.console, _describe(vm)
    assert second.result is not None and second.result["status"] == 0, _describe(vm)
    assert second.result["updated"] is True, _describe(vm)
    third = await vm.boot()
    assert third.slot == "b" and third.result is not None, _describe(vm)
    assert third.result["status"] == 0 and not third.result["attempted"], _describe(vm)
    assert [s for s, _ in lab.reports()] == [0]
    print(f"3 boots in {time.monotonic() - started:.1f} s ({'KVM' if KVM else 'TCG'})")


async def test_vm_release_that_panics_falls_back_after_the_budget_and_reports_40(
        lab: Lab) -> None:
    lab.publish("2.0.0", 2, panics=True)
    vm = lab.machine("vm-panic")
    assert (await vm.boot()).slot == "a", _describe(vm)
    for _ in range(3):  # the budget: three boots of B, each panics
        boot = await vm.boot()
        assert boot.slot == "b" and "release panics" in boot.console, _describe(vm)
    back = await vm.boot()
    assert back.slot == "a", _describe(vm)
    assert back.result is not None and back.result["status"] == 40, _describe(vm)
    assert "did not come up in 3 boot attempts" in back.result["message"], _describe(vm)
    (report,) = lab.reports()
    assert report[0] == 40 and "did not come up in 3 boot attempts" in report[1]


async def test_vm_power_cut_during_slot_write_and_env_write_resumes(lab: Lab) -> None:
    lab.publish("2.0.0", 2)
    vm = lab.machine("vm-powercut")
    cut = await vm.boot(hang_at="slot_write.mid")
    assert cut.killed and cut.slot == "a", _describe(vm)
    cut = await vm.boot(hang_at="bootenv.switch.before_rename")
    assert cut.killed and cut.slot == "a", _describe(vm)
    assert "interrupted while applying" in cut.console, _describe(vm)
    resumed = await vm.boot()
    assert resumed.slot == "a", "the environment write never landed: A boots"
    assert "is not in the bootloader's environment" in resumed.console, _describe(vm)
    final = await vm.boot()
    assert final.slot == "b" and final.result is not None, _describe(vm)
    assert final.result["status"] == 0, _describe(vm)
    assert [s for s, _ in lab.reports()] == [0]
