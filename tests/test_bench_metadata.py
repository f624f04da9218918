"""The metadata benchmark on a small history: it publishes, serves and measures for real."""

from __future__ import annotations

import json
from pathlib import Path

from bench.metadata import main


def test_metadata_bench_measures_what_one_update_downloads_as_history_grows(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--releases", "12", "--products", "3", "--checkpoints", "3", "6",
                 "--out", str(out)]) == 0
    result = json.loads((out / "metadata.json").read_text())
    points = result["checkpoints"]
    assert [p["releases"] for p in points] == [3, 6, 12]
    for p in points:
        # a device that followed every update downloads timestamp, snapshot and
        # targets (root did not change), then the compact manifest
        assert p["metadata_bytes"] == p["timestamp_bytes"] + p["snapshot_bytes"] \
            + p["targets_bytes"], p
        assert p["first_contact_metadata_bytes"] >= p["metadata_bytes"]
        assert 0 < p["manifest_bytes"] < 1024
    # today's targets metadata lists every release: it grows with history
    assert points[0]["targets_bytes"] < points[1]["targets_bytes"] < points[2]["targets_bytes"]
    assert result["target"] == {"bytes": 16384, "measured": points[-1]["metadata_bytes"],
                                "met": points[-1]["metadata_bytes"] <= 16384}
    assert "| 12 |" in (out / "metadata.md").read_text()
