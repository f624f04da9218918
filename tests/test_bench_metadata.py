"""The metadata benchmark on a small history: it publishes, serves and measures for real."""

from __future__ import annotations

import json
from pathlib import Path

from bench.metadata import main


def test_a_device_downloads_only_its_products_release_list_as_history_grows(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--releases", "15", "--products", "3", "--checkpoints", "3", "9",
                 "--out", str(out)]) == 0
    result = json.loads((out / "metadata.json").read_text())
    points = result["checkpoints"]
    assert [p["releases"] for p in points] == [3, 9, 15]
    for p in points:
        # from its provisioned root: timestamp, snapshot, top-level targets (the
        # products' delegations) and its product's release list
        assert p["first_contact_metadata_bytes"] == p["timestamp_bytes"] \
            + p["snapshot_bytes"] + p["targets_bytes"] + p["product_list_bytes"], p
        assert 0 < p["manifest_bytes"] < 1024
    for p in points[1:]:
        # a device that took the previous update: top-level targets did not change (no
        # new product), the other products' lists are never fetched
        assert p["metadata_bytes"] == p["timestamp_bytes"] + p["snapshot_bytes"] \
            + p["product_list_bytes"], p
    assert points[1]["targets_bytes"] == points[2]["targets_bytes"]
    assert points[0]["product_list_bytes"] < points[1]["product_list_bytes"] \
        < points[2]["product_list_bytes"]
    assert result["target"] == {"bytes": 16384, "measured": points[-1]["metadata_bytes"],
                                "met": points[-1]["metadata_bytes"] <= 16384}
    assert "| 15 |" in (out / "metadata.md").read_text()
