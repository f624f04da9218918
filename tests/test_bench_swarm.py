"""The swarm benchmark's core on a tiny fleet: real devices, origin and tracker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.swarm import main, render_markdown, run_bench


async def test_bench_core_compares_swarm_with_direct_on_one_payload(tmp_path: Path) -> None:
    result = await run_bench(tmp_path, fleet_sizes=[3], repeat=1, image_bytes=1 << 20,
                             origin_rate_bytes_per_s=1 << 20, progress=lambda _: None)
    result = json.loads(json.dumps(result))  # JSON-ready
    cells = {c["mode"]: c for c in result["cells"]}
    assert set(cells) == {"swarm", "direct"}
    assert all(c["all_ok"] and c["devices"] == 3 for c in cells.values())
    # direct: every device takes the whole payload from the origin
    assert cells["direct"]["origin_payload_egress_x_payload"] >= 3.0
    assert cells["direct"]["device_bytes_peers_median"] == 0
    # swarm: the devices share; the origin sends far less than 3 payloads
    assert cells["swarm"]["origin_payload_egress_x_payload"] < 2.0
    assert cells["swarm"]["device_bytes_peers_median"] > 0
    for c in cells.values():
        assert 0 < c["delivered_slowest_s"] <= c["installed_slowest_s"]
        assert c["completion_x_lower_bound"] == pytest.approx(
            c["delivered_slowest_s"] / result["lower_bound_s"], rel=0.01)
    [ratio] = result["ratios"]
    assert ratio["devices"] == 3 and ratio["origin_egress_direct_over_swarm"] > 1.5
    runs = result["runs"]
    assert len(runs) == 2 and all(len(r["completion_s"]) == 3 for r in runs)
    markdown = render_markdown(result)
    assert "| 3 | swarm |" in markdown and "| 3 | direct |" in markdown


def test_bench_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--repeat", "0"], ["--devices", "0"], ["--origin-mib-s", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err
