"""GRUB and U-Boot boot control (peer/bootloader.py) through the real tools:
grub-editenv (Debian grub-common), fw_printenv/fw_setenv (Debian libubootenv-tool) on a
redundant environment in a partition of a real GPT disk (loop devices). Power loss
during an environment write: killed before the rename (GRUB), and every torn write of a
U-Boot copy at each sector, plus SIGKILLs of fw_setenv mid-write: the environment
always reads back as the old or the new state, never anything else."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmota.peer.bootloader import (
    FACTORY,
    GrubEnv,
    LoaderState,
    UBootEnv,
    decode_env,
    encode_env,
    script,
)
from swarmota.peer.errors import ConfigError
from tests.loopdisk import LoopDisk, loop_disk

ROOT = Path(__file__).resolve().parents[1]
PENDING_B = LoaderState("b", "a", 3)
COMMITTED_B = LoaderState("b", "b", 0)


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (.ci/run installs it from Debian)")


def test_environment_encoding_round_trips_and_refuses_nonsense() -> None:
    for state in (FACTORY, PENDING_B, COMMITTED_B, LoaderState("a", "b", 1)):
        assert decode_env(encode_env(state), "env") == state
    assert encode_env(PENDING_B) == {"SWARMOTA_ORDER": "b a", "SWARMOTA_A_GOOD": "1",
                                     "SWARMOTA_A_TRIES": "0", "SWARMOTA_B_GOOD": "0",
                                     "SWARMOTA_B_TRIES": "3"}
    assert decode_env({}, "env") == FACTORY  # blank: the factory state
    assert decode_env({**encode_env(PENDING_B), "SWARMOTA_B_TRIES": "x"}, "e").fell_back
    for bad in ({"SWARMOTA_ORDER": "b"}, {"SWARMOTA_ORDER": "a b", "SWARMOTA_A_GOOD": "0"}):
        with pytest.raises(ConfigError):
            decode_env(bad, "env")


def test_grub_environment_through_grub_editenv(tmp_path: Path) -> None:
    need("grub-editenv")
    env = GrubEnv(tmp_path / "grubenv")
    assert env.read() == FACTORY  # no block yet
    env.write(PENDING_B, what="switch")
    assert env.read() == PENDING_B
    listing = subprocess.run(["grub-editenv", str(tmp_path / "grubenv"), "list"],
                             capture_output=True, text=True, check=True).stdout
    assert "SWARMOTA_ORDER=b a" in listing and "SWARMOTA_B_TRIES=3" in listing
    block = (tmp_path / "grubenv").read_bytes()
    assert len(block) == 1024 and block[:512].count(b"SWARMOTA_") == 5, \
        "the variables sit in the first sector: GRUB's in-place save_env cannot tear them"
    env.write(COMMITTED_B, what="commit")
    assert env.read() == COMMITTED_B
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grubenv"]


@pytest.mark.parametrize("point", ["bootenv.switch.before_write",
                                   "bootenv.switch.before_rename"])
def test_grub_environment_write_killed_leaves_the_old_environment(
        tmp_path: Path, point: str) -> None:
    need("grub-editenv")
    path = tmp_path / "grubenv"
    GrubEnv(path).write(FACTORY, what="init")
    code = ("from pathlib import Path\nfrom swarmota.peer.bootloader import GrubEnv, LoaderState\n"
            f"GrubEnv(Path({str(path)!r})).write(LoaderState('b', 'a', 3), what='switch')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWARMOTA_CRASH")}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "SWARMOTA_CRASH_AT": point},
                          cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert GrubEnv(path).read() == FACTORY
    GrubEnv(path).write(PENDING_B, what="switch")  # the leftover copy is no obstacle
    assert GrubEnv(path).read() == PENDING_B


def test_grub_script_is_valid_grub_script() -> None:
    need("grub-script-check")
    proc = subprocess.run(["grub-script-check"], input=script("grub.cfg"), text=True,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert "save_env" in script("grub.cfg") and "setexpr" in script("boot.cmd")
    with pytest.raises(ConfigError):
        script("../etc/passwd")


ENV_SIZE = 0x4000


@pytest.fixture
def uboot_disk(tmp_path: Path) -> Iterator[tuple[LoopDisk, UBootEnv]]:
    """A redundant U-Boot environment: two copies in one partition of a GPT disk."""
    need("fw_printenv", "fw_setenv")
    with loop_disk(tmp_path / "disk.img", [("uboot-env", 1), ("rootfs-a", 1)]) as disk:
        dev = disk.partitions["uboot-env"]
        config = tmp_path / "fw_env.config"
        config.write_text(f"{dev} 0x0 {ENV_SIZE:#x}\n{dev} {ENV_SIZE:#x} {ENV_SIZE:#x}\n")
        default = tmp_path / "default.env"
        default.write_text("bootdelay=0\n")
        yield disk, UBootEnv(config, default_env=default)


def test_uboot_environment_through_fw_setenv(uboot_disk: tuple[LoopDisk, UBootEnv]) -> None:
    _, env = uboot_disk
    assert env.read() == FACTORY  # both copies blank: the default environment
    env.write(PENDING_B, what="switch")
    assert env.read() == PENDING_B
    env.write(COMMITTED_B, what="commit")
    assert env.read() == COMMITTED_B


def _copies(disk: LoopDisk) -> tuple[bytes, bytes]:
    data = disk.partitions["uboot-env"].read_bytes()
    return data[:ENV_SIZE], data[ENV_SIZE:2 * ENV_SIZE]


def _put(disk: LoopDisk, first: bytes, second: bytes) -> None:
    with open(disk.partitions["uboot-env"], "r+b") as fh:
        fh.write(first + second)
        fh.flush()
        os.fsync(fh.fileno())


def test_uboot_torn_write_at_any_sector_leaves_a_valid_environment(
        uboot_disk: tuple[LoopDisk, UBootEnv]) -> None:
    """Power lost while fw_setenv writes a copy: the copy holds the new bytes up to
    some sector and the old ones after it. libubootenv writes the older copy and checks
    each copy's CRC: every tear reads as the old state or the new one."""
    disk, env = uboot_disk
    env.write(PENDING_B, what="switch")
    env.write(COMMITTED_B, what="commit")  # both copies hold a valid, distinct state
    old = _copies(disk)
    env.write(LoaderState("a", "b", 2), what="switch")
    new = _copies(disk)
    changed = [i for i in (0, 1) if old[i] != new[i]]
    assert len(changed) == 1, "exactly one copy is written per change"
    seen = set()
    for cut in range(0, ENV_SIZE + 1, 512):
        torn = list(old)
        torn[changed[0]] = new[changed[0]][:cut] + old[changed[0]][cut:]
        _put(disk, *torn)
        got = env.read()
        assert got in (COMMITTED_B, LoaderState("a", "b", 2)), (cut, got)
        seen.add(got)
    assert len(seen) == 2


def test_uboot_fw_setenv_killed_mid_write_leaves_a_valid_environment(
        uboot_disk: tuple[LoopDisk, UBootEnv], tmp_path: Path) -> None:
    """fw_setenv SIGKILLed at random instants while it rewrites the environment with a
    large value (20 kills, bounded): the environment always reads as one of the states
    written, and the agent's next write works."""
    _, env = uboot_disk
    env.write(PENDING_B, what="switch")
    rng = random.Random(7)
    script_file = tmp_path / "big.txt"
    script_file.write_text("filler=" + "x" * 12000 + "\n")
    args = ["-c", str(env.config), "-f", str(env.default_env)]
    for _ in range(20):
        proc = subprocess.Popen(["fw_setenv", *args, "--script", str(script_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, 0.004))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert env.read() == PENDING_B
    env.write(COMMITTED_B, what="commit")
    assert env.read() == COMMITTED_B
