"""The tracker load benchmark's core, tiny: both transports, no errors, sane figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.tracker import main, run_bench


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
    for argv in (["--devices", "0"], ["--concurrency", "0"], ["--transport", "udp"]):
        with pytest.raises(SystemExit):
            main(argv)
