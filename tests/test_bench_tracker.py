"""The tracker load benchmark, tiny: the in-process transports and the pinned run with
wrk against both endpoints; no errors, sane figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.servers import postgres_missing, redis_missing
from bench.tracker import main, render_markdown, run_bench, run_pinned
from bench.tracker_scale import render_scale, render_storm, run_scale, run_storm


async def test_bench_core_measures_check_ins_and_announces(tmp_path: Path) -> None:
    result = await run_bench(tmp_path, devices=20, requests=60, concurrency=8,
                             transports=["asgi", "http"])
    result = json.loads(json.dumps(result))  # JSON-ready
    for transport in ("asgi", "http"):
        for phase in ("checkin", "announce"):
            r = result["transports"][transport][phase]
            assert r["requests"] == 60 and r["errors"] == 0
            assert r["requests_per_s"] > 0
            assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]


def test_bench_refuses_bad_arguments() -> None:
    for argv in (["--devices", "0"], ["--concurrency", "0"], ["--transport", "udp"],
                 ["--runs", "0"], ["--mode", "other"]):
        with pytest.raises(SystemExit):
            main(argv)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed "
                    "(apt-get install wrk)")
def test_pinned_bench_measures_both_endpoints_and_check_ins(tmp_path: Path) -> None:
    """A tiny pinned run: the tracker in its own process, wrk against both endpoints."""
    result = run_pinned(tmp_path, devices=50, duration_s=1, runs=1, connections=4)
    result = json.loads(json.dumps(result))  # JSON-ready
    assert set(result["median"]) == {"announce-lean", "announce-hypercorn", "checkin",
                                     "checkin-lean"}
    for phase, m in result["median"].items():
        assert m["errors"] == 0, phase
        assert m["requests_per_s"] > 10 and m["requests_per_cpu_s"] > 10
        assert 0 < m["p50_ms"] <= m["p99_ms"]
    markdown = render_markdown(result)
    assert "| announce-lean |" in markdown and "| checkin |" in markdown


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed "
                    "(apt-get install wrk)")
def test_pinned_bench_measures_signed_requests_beside_unsigned_ones(tmp_path: Path) -> None:
    """A tiny signed run: a second tracker with --device-ca accepts every pre-signed
    request, and every announce authenticated by an announce key (a refusal, e.g. a
    replayed counter or a bad MAC, would count as an error)."""
    result = run_pinned(tmp_path, devices=20, duration_s=1, runs=1, connections=4,
                        signed=True)
    result = json.loads(json.dumps(result))  # JSON-ready
    assert set(result["median"]) == {
        "announce-lean", "announce-hypercorn", "checkin", "checkin-lean",
        "announce-lean-signed", "announce-hypercorn-signed", "checkin-signed",
        "checkin-lean-signed", "announce-lean-keyed"}
    for phase, m in result["median"].items():
        assert m["errors"] == 0, phase
        assert m["requests_per_s"] > 10, phase
    assert "announce-lean-signed" in render_markdown(result)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed "
                    "(apt-get install wrk)")
def test_pinned_bench_compares_with_a_baseline_checkout(tmp_path: Path) -> None:
    """Side by side with another checkout in the same rounds (here: this one, whose own
    process prepares its own database), and the ratios of the medians."""
    root = Path(__file__).resolve().parent.parent
    result = run_pinned(tmp_path, devices=20, duration_s=1, runs=1, connections=4,
                        baseline=root)
    assert {"announce-lean-baseline", "checkin-baseline"} <= set(result["median"])
    assert set(result["versus_baseline"]) == {"announce-lean", "announce-hypercorn",
                                              "checkin", "checkin-lean"}
    assert all(r["requests_per_cpu_s"] > 0 for r in result["versus_baseline"].values())
    assert "against the baseline checkout" in render_markdown(result)


@pytest.mark.skipif(shutil.which("wrk") is None or (shutil.which("nginx") is None
                    and not Path("/usr/sbin/nginx").exists()),
                    reason="wrk or nginx is not installed (apt-get install wrk nginx-light)")
def test_scale_bench_runs_sqlite_postgresql_and_processes_side_by_side(
        tmp_path: Path) -> None:
    """A tiny run of the scale bench: the same phases against SQLite, PostgreSQL and two
    processes on PostgreSQL and Redis behind nginx, in the same round; and a tiny storm
    whose devices are all stored."""
    for missing in (postgres_missing(), redis_missing()):
        if missing is not None:
            pytest.skip(missing)
    # 2 s a phase: under a heavily loaded machine a 1 s phase once completed no request
    result = run_scale(tmp_path / "scale", devices=20, duration_s=2, runs=1, connections=4,
                       db="postgresql", processes=2, signed=False)
    result = json.loads(json.dumps(result))  # JSON-ready
    assert {"checkin-lean-sqlite", "checkin-lean-pg", "checkin-lean-x2",
            "announce-lean-sqlite", "announce-lean-pg", "announce-lean-x2"} <= set(
        result["median"])
    for phase, m in result["median"].items():
        assert m["errors"] == 0 and m["requests_per_cpu_s"] > 0, phase
    assert result["versus_sqlite"]["checkin-lean-pg"]["requests_per_cpu_s"] > 0
    assert "| checkin-lean-x2 |" in render_scale(result)
    storm = run_storm(tmp_path / "storm", devices=300, connections=4, timeout_s=120,
                      progress=lambda _: None)
    assert storm["stored"] == 300 and storm["bytes_per_device"] > 0
    assert "devices stored" in render_storm(storm)
