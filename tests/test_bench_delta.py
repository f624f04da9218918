"""The delta benchmark's core on small generated images (our engines only, no CLI tools)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.delta import main, render_markdown, run_bench
from swarmota.demo import make_image, mutate_image
from swarmota.seeder.delta import ENGINES


def test_bench_core_measures_our_engines_and_verifies_round_trips(tmp_path: Path) -> None:
    base = make_image(256 * 1024, seed=1)
    target = mutate_image(base, seed=2)
    images = []
    for version, data in (("1.0", base), ("1.1", target)):
        path = tmp_path / f"{version}.img"
        path.write_bytes(data)
        images.append((version, path))
    work = tmp_path / "work"
    work.mkdir()

    result = run_bench(images, work_dir=work, repeat=1, level=3, methods=ENGINES,
                       tools={"xdelta3": None, "zstd-cli": None}, progress=lambda _: None)

    result = json.loads(json.dumps(result))  # JSON-ready
    assert result["repeat"] == 1 and result["level"] == 3
    [pair] = result["pairs"]
    assert (pair["base"], pair["target"]) == ("1.0", "1.1")
    assert (pair["base_bytes"], pair["target_bytes"]) == (len(base), len(target))
    assert set(pair["methods"]) == set(ENGINES)
    for engine in ENGINES:
        r = pair["methods"][engine]
        assert r["round_trip"] is True
        assert r["deterministic"] is True
        assert 0 < r["bytes"] < len(target)
        assert r["gen_s"] >= 0 and r["apply_s"] >= 0
        assert r["peak_rss_kib"] is None or r["peak_rss_kib"] > 0
    summary = pair["summary"]
    assert summary["ours"] in ENGINES
    assert summary["ours_bytes"] == min(pair["methods"][e]["bytes"] for e in ENGINES)
    assert "ratio_vs_smallest_other" not in summary  # baselines disabled
    markdown = render_markdown(result)
    assert "## 1.0 -> 1.1" in markdown and summary["ours"] in markdown


def test_bench_skips_cleanly_without_data(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 0
    assert "skipped: no data" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
