"""Faults while applying, switching and booting (../shared/RELIABILITY.md, "Apply, A/B and
boot"), each through the real agent, origin and tracker on loopback.

Threats: a torn slot image (partial write; data blocks lost after the switch); a torn
boot-control record; disk full (found by the free-space check, or while writing); a
read error on the base slot during a delta; a byte flipped in the inactive slot after
writing; a reboot loop (the new slot never reaches its health check); a retry after a
failed install; a resume across two releases.
Every test checks the invariants: a typed status; the active slot byte-identical or the
new one verified and committed; nothing partial promoted, temporary space reclaimed;
the next clean run succeeds; the tracker hears about it.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from swarmota.peer.agent import update_once
from swarmota.peer.bootctl import redundant_path
from swarmota.peer.config import save_config
from swarmota.peer.errors import StatusCode
from swarmota.peer.slots import FileSlots, SlotWriter
from swarmota.peer.state import DeviceState
from swarmota.tracker.sqlite_store import SqliteStore
from tests.release_env import ReleaseEnv, killed_at
from tests.test_update_delta import publish_v3_with_deltas

ROOT = Path(__file__).resolve().parents[1]



def assert_on(dev: DeviceState, image: bytes, *, slot: str) -> None:
    bc = dev.bootctl()
    assert bc.primary == bc.committed == slot and not bc.pending
    assert dev.slot_path(slot).read_bytes() == image


def assert_no_leftovers(dev: DeviceState) -> None:
    names = sorted(p.name for p in dev.slot_path("a").parent.iterdir())
    assert set(names) <= {"a.img", "b.img"}, names
    assert not list(dev.downloads_dir.iterdir())


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


async def test_torn_partial_slot_write_is_reclaimed_and_rewritten(env: ReleaseEnv) -> None:
    dev = env.device("dev-1", mode="direct")
    await killed_at(dev, "slot_write.mid")
    partial = dev.slot_path("b").with_name(".b.img.installing")
    assert partial.exists() and not dev.slot_path("b").exists()
    partial.write_bytes(partial.read_bytes()[:1000] + b"\xff" * 5000)  # torn, garbled
    status = subprocess.run([sys.executable, "-m", "swarmota.cli", "peer", "status",
                             str(dev.root)], capture_output=True, text=True, cwd=ROOT,
                            check=True).stdout
    assert "update journal: applying (to 2.0.0); finished on the next start" in status
    assert_on(dev, env.v1, slot="a")
    result = await update_once(dev)
    assert result.status == StatusCode.OK and result.bytes_origin == 0, result
    assert_on(dev, env.v2, slot="b")
    assert_no_leftovers(dev)


async def test_slot_image_torn_after_the_switch_is_rolled_back(env: ReleaseEnv) -> None:
    """Power cut after boot control names the new slot, on storage that lost the slot's
    data blocks: the boot-time check finds the image does not match its record, the
    committed slot boots again (40), and the next run installs the release afresh."""
    dev = env.device("dev-1", mode="direct")
    await killed_at(dev, "bootctl.switch.after_read_back")
    assert dev.bootctl().pending
    truncate(dev.slot_path("b"), 0.5)
    result = await update_once(dev)
    assert result.status == StatusCode.POSTCHECK_FAILED, result.message
    assert "does not match its boot-control record" in result.message
    assert_on(dev, env.v1, slot="a")
    assert [r.status for r in env.reports()] == [40]
    again = await update_once(dev)
    assert again.status == StatusCode.OK, again.message
    assert_on(dev, env.v2, slot="b")
    assert_no_leftovers(dev)


@pytest.mark.parametrize("damage", [0.0, 0.5])
async def test_torn_boot_control_record_still_boots_a_verified_slot(
        env: ReleaseEnv, damage: float) -> None:
    """The newest boot-control copy is torn (emptied or cut in half) right after the
    switch was written: the other copy, one transition older, still names slot a; the
    journal says the pass was switching, so the agent starts it over and completes."""
    dev = env.device("dev-1", mode="direct")
    await killed_at(dev, "bootctl.switch.after_dir_fsync")
    newest = redundant_path(dev.bootctl_path)
    truncate(newest, damage)
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "a" and not bc.pending
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert_on(dev, env.v2, slot="b")
    assert_no_leftovers(dev)


@contextlib.contextmanager
def tiny_tmpfs(directory: Path, size: str) -> Iterator[None]:
    keep = {p.name: p.read_bytes() for p in directory.iterdir()}
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(directory)], capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.decode().strip()}")
    try:
        for name, data in keep.items():
            (directory / name).write_bytes(data)
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


async def test_disk_full_is_refused_before_anything_is_downloaded(env: ReleaseEnv) -> None:
    """The slots live on a file system with room for slot a only: the free-space check
    against the manifest's sizes fails the attempt with 30 before any download; the
    active slot is untouched. With room again, the next run installs."""
    dev = env.device("dev-1", mode="direct")
    slots = dev.slot_path("a").parent
    with tiny_tmpfs(slots, f"{len(env.v1) + 200 * 1024}"):
        result = await update_once(dev)
        assert result.status == StatusCode.INSTALL_FAILED, result.message
        assert "not enough free space" in result.message
        assert result.bytes_origin == 0
        assert_on(dev, env.v1, slot="a")
        assert sorted(p.name for p in slots.iterdir()) == ["a.img"]
        assert [r.status for r in env.reports()] == [30]
        subprocess.run(["mount", "-o", "remount,size=8m", str(slots)], check=True)
        again = await update_once(dev)
        assert again.status == StatusCode.OK, again.message
        assert_on(dev, env.v2, slot="b")
        assert_no_leftovers(dev)


class DiskFillsUp(FileSlots):
    """Slots whose file system fills up halfway through writing an image (another
    process took the space after the free-space check)."""

    def begin_write(self, slot: str, size: int) -> SlotWriter:
        inner = super().begin_write(slot, size)

        class Filling:
            written = 0

            def write(self, data: bytes) -> None:
                if self.written + len(data) > size // 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.written += len(data)
                inner.write(data)

            def commit(self) -> None:
                inner.commit()

            def discard(self) -> None:
                inner.discard()

        return Filling()


async def test_disk_full_while_writing_the_slot(env: ReleaseEnv) -> None:
    """30, the active slot untouched, the temporary file reclaimed; the retry installs
    from the payload already verified (nothing downloaded again)."""
    dev = env.device("dev-1", mode="direct")
    slots = dev.slot_path("a").parent
    result = await update_once(dev, slots=DiskFillsUp(slots))
    assert result.status == StatusCode.INSTALL_FAILED, result.message
    assert "No space left" in result.message
    assert_on(dev, env.v1, slot="a")
    assert sorted(p.name for p in slots.iterdir()) == ["a.img"]
    assert [r.status for r in env.reports()] == [30]
    again = await update_once(dev)
    assert again.status == StatusCode.OK, again.message
    assert again.bytes_origin == 0, "the verified payload was kept for the retry"
    assert_on(dev, env.v2, slot="b")
    assert_no_leftovers(dev)


class UnreadableBase(FileSlots):
    """Slots whose active image cannot be read (an I/O error), as a dying flash would."""

    def read(self, slot: str, size: int | None = None) -> bytes:
        raise OSError(errno.EIO, "Input/output error", str(self.image_path(slot)))


async def test_read_error_on_the_base_slot_falls_back_to_the_full_payload(
        env: ReleaseEnv) -> None:
    v3, _ = publish_v3_with_deltas(env)
    dev = env.device("dev-1", mode="direct")
    result = await update_once(dev, slots=UnreadableBase(dev.slot_path("a").parent))
    assert result.status == StatusCode.OK, result.message
    assert result.payload_kind == "full"
    assert result.delta_fallback and "Input/output error" in result.delta_fallback
    assert_on(dev, v3, slot="b")
    assert_no_leftovers(dev)


class FlipAfterWrite(FileSlots):
    """Slots that damage one byte of an image right after it is written (bit rot, a
    bad block)."""

    def begin_write(self, slot: str, size: int) -> SlotWriter:
        inner = super().begin_write(slot, size)
        path = self.image_path(slot)

        class Flipping:
            def write(self, data: bytes) -> None:
                inner.write(data)

            def commit(self) -> None:
                inner.commit()
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0x40
                path.write_bytes(bytes(data))

            def discard(self) -> None:
                inner.discard()

        return Flipping()


async def test_byte_flipped_in_the_inactive_slot_is_detected_before_the_switch(
        env: ReleaseEnv) -> None:
    dev = env.device("dev-1", mode="direct")
    result = await update_once(dev, slots=FlipAfterWrite(dev.slot_path("a").parent))
    assert result.status == StatusCode.VERIFY_FAILED, result.message
    assert "read back after writing is not the signed image" in result.message
    bc = dev.bootctl()
    assert_on(dev, env.v1, slot="a")
    assert bc.slot("b").version is None, "boot control never named the damaged slot"
    assert [r.status for r in env.reports()] == [20]
    again = await update_once(dev)  # healthy storage: really reinstalls
    assert again.status == StatusCode.OK, again.message
    assert_on(dev, env.v2, slot="b")


KILL_PARENT = [sys.executable, "-c", "import os, signal; os.kill(os.getppid(), signal.SIGKILL)"]


async def test_reboot_loop_falls_back_after_the_boot_budget_and_reports_40(
        env: ReleaseEnv) -> None:
    """The new slot takes the device down at every boot before the agent starts (a
    kernel panic, a hang): each boot spends a try; after the budget (3) the committed
    slot boots again and 40 is reported: the release's fault."""
    dev = env.device("dev-1", mode="direct")
    for tries_left in (2, 1, 0):  # the switch, then boots that never reach the agent
        await killed_at(dev, "bootctl.boot.after_rename")
        bc = dev.bootctl()
        assert bc.pending and bc.tries_remaining == tries_left
        assert dev.journal().boot_attempts == 0
    result = await update_once(dev)
    assert result.status == StatusCode.POSTCHECK_FAILED, result.message
    assert "did not come up in 3 boot attempts (0 reached the health check)" \
        in result.message
    assert_on(dev, env.v1, slot="a")
    assert [r.status for r in env.reports()] == [40]


async def test_power_lost_in_every_health_check_rolls_back_as_interrupted_not_failed(
        env: ReleaseEnv) -> None:
    """Issue 15: power lost in the health check at every boot (the check kills the
    agent) is no verdict on the release: each boot is retried; when the budget is spent
    the committed slot boots again and the device reports 41 (interrupted), which the
    rollout counts neither as a failure nor as a rollback, and offers the release again;
    the device's retry budget is not charged."""
    dev = env.device("dev-1", mode="direct", health_command=KILL_PARENT)
    for attempts in (1, 2, 3):
        await killed_at(dev, "never-reached")  # the health check kills it first
        assert dev.bootctl().pending and dev.journal().boot_attempts == attempts
    result = await update_once(dev, retry_budget=1)
    assert result.status == StatusCode.INTERRUPTED, result.message
    assert "all 3 boot attempts of slot b were interrupted" in result.message
    assert_on(dev, env.v1, slot="a")
    assert [r.status for r in env.reports()] == [41]
    store = SqliteStore(env.db)
    try:
        (rollout,) = [r for r in store.rollouts() if r.version == "2.0.0"]
        assert (rollout.totals.failed, rollout.totals.rolled_back) == (0, 0)
    finally:
        store.close()
    save_config(dev.config_path, replace(dev.config(), health_command=()))
    again = await update_once(dev, retry_budget=1)  # offered again, not out of budget
    assert again.status == StatusCode.OK, again.message
    assert_on(dev, env.v2, slot="b")


@pytest.mark.parametrize(("point", "message"), [
    ("health.after", "finished after restart"),  # passed, verdict not journaled: retried
    ("bootctl.commit.before_write", "health check passed before a restart"),
])
async def test_power_lost_after_the_health_check_passed_commits_on_restart(
        env: ReleaseEnv, point: str, message: str) -> None:
    """Issue 15: the check passed, power was lost before the commit: with its verdict
    journaled the restart commits without another attempt, else the attempt is retried;
    0 either way, never 40."""
    dev = env.device("dev-1", mode="direct")
    await killed_at(dev, point)
    assert dev.bootctl().pending
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert message in result.message
    assert_on(dev, env.v2, slot="b")
    assert [r.status for r in env.reports()] == [0]


async def test_a_committed_slot_never_falls_back_later(env: ReleaseEnv) -> None:
    """A slot that was committed never falls back, whatever happens at boot."""
    good = env.device("dev-2", mode="direct")
    assert (await update_once(good)).status == StatusCode.OK
    save_config(good.config_path, replace(good.config(), health_command=tuple(KILL_PARENT)))
    for _ in range(3):  # reboots: nothing pending, so nothing is checked or undone
        with trio.fail_after(60):
            proc = await trio.run_process(
                [sys.executable, "-m", "swarmota.cli", "peer", "update", str(good.root)],
                cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert_on(good, env.v2, slot="b")


async def test_retry_after_a_failed_install_really_reinstalls(
        env: ReleaseEnv, tmp_path: Path) -> None:
    """A first attempt is rolled back (health check fails); the inactive slot is then
    damaged; the retry must write it again, not trust what is there."""
    flag = tmp_path / "unhealthy"
    flag.touch()
    check = [sys.executable, "-c", f"import os, sys; sys.exit(os.path.exists({str(flag)!r}))"]
    dev = env.device("dev-1", mode="direct", health_command=check)
    first = await update_once(dev)
    assert first.status == StatusCode.POSTCHECK_FAILED, first.message
    assert_on(dev, env.v1, slot="a")
    data = bytearray(dev.slot_path("b").read_bytes())
    data[12345] ^= 0xFF
    dev.slot_path("b").write_bytes(bytes(data))
    flag.unlink()
    second = await update_once(dev)
    assert second.status == StatusCode.OK, second.message
    assert_on(dev, env.v2, slot="b")
    assert [r.status for r in env.reports()] == [40, 0]


async def test_resume_is_keyed_to_the_manifest_and_never_mixes_two_releases(
        env: ReleaseEnv) -> None:
    """Killed in the middle of downloading v2; meanwhile v3 is released. The restart
    installs v3 from v3's chunks only (nothing reused from v2's work area, which is
    reclaimed)."""
    dev = env.device("dev-1", mode="direct", image=b"\x00" * 4096, version="0.9.0")
    await killed_at(dev, "download.chunk_written:3")
    v2_work = dev.downloads_dir / env.m2.full_payload.sha256
    assert v2_work.is_dir()
    v3, m3 = publish_v3_with_deltas(env)
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert result.to_version == "3.0.0" and result.chunks_reused == 0
    assert result.bytes_origin == env.direct_bytes(m3.full_payload)
    assert_on(dev, v3, slot="b")
    assert_no_leftovers(dev)
