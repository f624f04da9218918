"""Resource failures (docs/ATTACK_MATRIX.md, "Fault classes learned from outside
testing": resources): a disk that fills up while a payload downloads (direct or through
the swarm), a free-space check that must count the fallback from a delta to the full
payload, a progress file that cannot be written, and ``peer run`` living through it
all. Each ends as a status code with a report, the active slot intact, partial files
removed, the daemon alive, the next run clean.

The disk is a real tmpfs mounted over the device's download directory (root needed:
the tests skip otherwise, as tests/test_apply_faults.py), filled by another writer
once the download is under way; the origin is rate-limited so that the download lasts.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import pytest
import trio

from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.daemon import DaemonConfig, run_daemon
from swarmota.peer.errors import StatusCode
from swarmota.peer.state import DeviceState
from swarmota.seeder.origin import OriginConfig
from tests.release_env import ReleaseEnv, off_base_device, start_env
from tests.test_apply_faults import assert_no_leftovers, assert_on, tiny_tmpfs
from tests.test_update_delta import publish_v3_with_deltas

SLOW_ORIGIN = OriginConfig(rate_limit_bytes_per_s=96 * 1024, rate_limit_burst_bytes=16 * 1024)


@pytest.fixture
async def slow_env(tmp_path: Path, nursery: trio.Nursery,
                   images: tuple[bytes, bytes]) -> ReleaseEnv:
    return await start_env(nursery, tmp_path, *images, origin_config=SLOW_ORIGIN)


def chunks_done(dev: DeviceState) -> int:
    progress = dev.progress() or {}
    return int(progress.get("chunks_done", progress.get("chunks_done_this_run", 0)))


async def fill_once_downloading(dev: DeviceState, filler: Path) -> None:
    """Wait until the download has a few chunks, then take all the space left."""
    with trio.fail_after(60):
        while chunks_done(dev) < 2:
            await trio.sleep(0.02)
    block = bytes(64 * 1024)
    # unbuffered: closing the file must not flush a remainder into the full disk
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:
        while True:
            fh.write(block)


def assert_failed_for_lack_of_space(env: ReleaseEnv, dev: DeviceState,
                                    result: UpdateResult, image: bytes) -> None:
    assert result.status == StatusCode.INSTALL_FAILED and result.attempted, result.message
    assert "No space left on device" in result.message or "not enough free space" in \
        result.message, result.message
    assert_on(dev, image, slot="a")
    assert not dev.slot_path("b").exists()
    assert sorted(p.name for p in dev.downloads_dir.iterdir()) == ["filler"], \
        "partial files removed"
    assert result.reported and [r.status for r in env.reports()] == [30]


@pytest.mark.parametrize("mode", ["direct", "swarm"])
async def test_a_disk_filling_up_mid_download_ends_as_a_status_with_a_report(
        slow_env: ReleaseEnv, nursery: trio.Nursery, mode: str) -> None:
    """ENOSPC while chunks are written (by the agent, or by libtorrent in swarm mode):
    status 30 naming it, reported, the work area removed (it was an OSError traceback,
    exit 1, no report); once there is room, the next pass installs."""
    env = slow_env
    dev = off_base_device(env, f"full-{mode}", mode=mode)
    image = dev.slot_path("a").read_bytes()
    filler = dev.downloads_dir / "filler"
    with tiny_tmpfs(dev.downloads_dir, "8m"):
        nursery.start_soon(fill_once_downloading, dev, filler)
        with trio.fail_after(60):
            result = await update_once(dev)
        assert_failed_for_lack_of_space(env, dev, result, image)
        assert "device resources" in result.message, result.message
        filler.unlink()
        with trio.fail_after(60):
            again = await update_once(dev)
        assert again.status == StatusCode.OK, again.message
        assert_on(dev, env.v2, slot="b")
        assert_no_leftovers(dev)


async def test_peer_run_lives_through_a_full_disk_and_updates_once_there_is_room(
        slow_env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """The daemon's first pass ends in ENOSPC (status 30, reported); it backs off and
    carries on, and its next pass, with room again, installs."""
    env = slow_env
    dev = env.device("dev-1", mode="direct")
    filler = dev.downloads_dir / "filler"
    seen: list[UpdateResult] = []
    config = DaemonConfig(jitter_fraction=0, backoff_initial_s=0.1, poll_interval_s=60)
    with tiny_tmpfs(dev.downloads_dir, "8m"):
        nursery.start_soon(fill_once_downloading, dev, filler)
        with trio.fail_after(120):
            async with trio.open_nursery() as daemon:
                def on_result(result: UpdateResult, _delay_s: float) -> None:
                    seen.append(result)
                    if result.status == StatusCode.INSTALL_FAILED:
                        filler.unlink()
                    else:
                        daemon.cancel_scope.cancel()

                daemon.start_soon(lambda: run_daemon(dev, config, on_result=on_result))
    assert [r.status for r in seen] == [StatusCode.INSTALL_FAILED, StatusCode.OK], seen
    assert "No space left on device" in seen[0].message
    assert_on(dev, env.v2, slot="b")
    assert [r.status for r in env.reports()] == [30, 0]


async def test_free_space_check_counts_the_fallback_from_the_delta_to_the_full_payload(
        env: ReleaseEnv) -> None:
    """Room for the delta, not for the full payload it falls back to if anything about
    the delta fails: refused before any download (30), instead of ENOSPC halfway
    through the fallback."""
    v3, m3 = publish_v3_with_deltas(env)
    delta = m3.delta_for(env.m1.image.sha256)
    assert delta is not None and delta.size < m3.full_payload.size
    dev = env.device("dev-1", mode="direct")
    room = (delta.size + m3.full_payload.size) // 2
    with tiny_tmpfs(dev.downloads_dir, str(room)):
        result = await update_once(dev)
        assert result.status == StatusCode.INSTALL_FAILED, result.message
        assert "not enough free space" in result.message
        assert result.bytes_origin == 0
    assert_on(dev, env.v1, slot="a")
    again = await update_once(dev)
    assert again.status == StatusCode.OK and again.payload_kind == "delta", again.message
    assert dev.slot_path("b").read_bytes() == v3


async def test_a_progress_file_that_cannot_be_written_does_not_fail_the_update(
        env: ReleaseEnv) -> None:
    """``progress.json`` is a view: when it cannot be written (here its temporary file
    is a directory: EISDIR, as ENOSPC would be), the update goes on."""
    dev = env.device("dev-1", mode="direct")
    (dev.root / ".progress.json.tmp").mkdir()
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert_on(dev, env.v2, slot="b")
    with pytest.raises(IsADirectoryError) as exc:
        (dev.root / ".progress.json.tmp").write_text("x")
    assert exc.value.errno == errno.EISDIR
