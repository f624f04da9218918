"""The footprint benchmark's sampling on a tiny image: a real agent process, origin and
tracker on loopback, measured from /proc in a short window."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import pytest

from bench.footprint import (
    IMPORT_STEPS,
    Timing,
    foreign_packages,
    main,
    parse_proc,
    product_distributions,
    render_markdown,
    run_bench,
    sample_tree,
)
from swarmota.demo import make_image, mutate_image

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(),
                                reason="needs Linux /proc with smaps_rollup")

MIB = 1024


@pytest.mark.slow  # two agent processes and two publishes: ~8 s, more on a busy machine
async def test_footprint_of_an_idle_agent_and_a_delta_update_has_plausible_numbers(
        tmp_path: Path) -> None:
    base, target = tmp_path / "base.img", tmp_path / "target.img"
    v1 = make_image(256 * 1024, seed=31)
    base.write_bytes(v1)
    target.write_bytes(mutate_image(v1, seed=32))
    result = await run_bench(
        base, target, tmp_path, repeat=1, zstd_level=3, cells=[("delta", "direct")],
        timing=Timing(idle_s=1.5, idle_poll_s=0.5, sample_interval_s=0.05),
        import_steps=[IMPORT_STEPS[0], IMPORT_STEPS[1]], progress=lambda _: None)
    result = json.loads(json.dumps(result))  # JSON-ready

    idle = result["idle"]["median"]
    assert idle["rss_end_kib"] > 10 * MIB and idle["cpu_percent"] >= 0
    assert idle["hwm_kib"] >= idle["rss_end_kib"]
    assert idle["anon_median_kib"] > 0 and idle["file_median_kib"] > 0
    assert idle["passes"] >= 2 and idle["startup_cpu_s"] > 0  # checked in again while idle

    [cell] = result["updates"]
    assert (cell["payload"], cell["mode"]) == ("delta", "direct")
    update = cell["median"]
    assert update["hwm_kib"] >= update["rss_max_sampled_kib"] > 10 * MIB
    assert update["cpu_s"] > 0 and update["wall_s"] > 0
    assert cell["runs"][0]["payload_kind"] == "delta"

    python, agent_deps = result["imports"]
    assert python["rss_kib"] > 5 * MIB and agent_deps["added_kib"] > 0
    assert "trio" in agent_deps["new_packages"] and "httpx" in agent_deps["new_packages"]
    assert result["contributors"]["delta_apply_holds_kib"] >= 2 * (256 * 1024) // 1024

    markdown = render_markdown(result)
    assert "| delta | direct |" in markdown and "## Idle" in markdown


def test_sampling_reads_this_process_and_sees_allocations() -> None:
    before = sample_tree(os.getpid())
    assert before is not None and before.processes >= 1 and before.threads >= 1
    # Fresh private anonymous pages, not malloc: in a long-lived worker malloc may hand
    # back heap pages that are already resident (glibc raises its mmap threshold to
    # 32 MiB after large frees), and the sample would rightly see no growth.
    ballast = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        for offset in range(0, len(ballast), mmap.PAGESIZE):
            ballast[offset] = 1  # touch every page
        after = sample_tree(os.getpid())
        assert after is not None
        assert after.anon_kib - before.anon_kib >= 30 * MIB
        assert after.hwm_kib >= after.rss_kib >= after.anon_kib
    finally:
        ballast.close()


def test_proc_parsing_takes_cpu_from_the_stat_fields_after_the_command_name() -> None:
    status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t3\n"
    rollup = "Rss:                1000 kB\nAnonymous:           600 kB\n"
    ticks = os.sysconf("SC_CLK_TCK")
    # a command name with spaces and parentheses must not shift the fields
    stat = f"42 (a) b (c) S 1 2 3 4 5 6 7 8 9 10 {ticks} {2 * ticks} {3 * ticks} {ticks} 20"
    assert parse_proc(status, rollup, stat) == {
        "rss_kib": 1024, "hwm_kib": 2048, "threads": 3, "anon_kib": 600, "file_kib": 400,
        "cpu_s": 7.0}


def test_device_like_runs_block_only_packages_outside_the_product() -> None:
    product = product_distributions()
    assert {"trio", "libtorrent", "httpx", "tuf"} <= product
    assert "pytest" not in product
    blocked = foreign_packages()
    assert "pytest" in blocked
    assert not {"trio", "libtorrent", "httpx", "zstandard", "swarmota"} & set(blocked)


def test_without_the_images_the_bench_says_so_and_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
