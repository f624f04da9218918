"""The distribution as an operator installs it: one top-level package, its data files,
its command (the wheel is built offline from a copy of this checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SKIP_DIRS = {".git", ".venv", ".typecheck", "build", "tests", "bench", "docs",
              "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    source = tmp_path_factory.mktemp("source") / "swarmota"
    shutil.copytree(ROOT, source, ignore=lambda _d, names: [
        n for n in names if n in _SKIP_DIRS or n.endswith(".egg-info")])
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                           "--no-build-isolation", "--no-index", "--wheel-dir", str(out),
                           str(source)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No module named" in done.stderr + done.stdout:
        pytest.skip(f"cannot build a wheel offline here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("swarmota-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_one_top_level_package(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"swarmota"}
    for package in ("infra", "manifest", "seeder", "peer", "tracker"):
        assert f"swarmota/{package}/__init__.py" in names


def test_the_wheel_carries_its_data_files_and_its_command(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for wanted in ("swarmota/tracker/console_assets/console.js",
                   "swarmota/peer/dbus/org.swarmota.Agent1.conf",
                   "swarmota/systemd/swarmota-tracker.service",
                   "swarmota/systemd/swarmota-timestamp.timer",
                   "swarmota/__main__.py", "swarmota/py.typed"):
        assert wanted in names, wanted
    assert any(n.startswith("swarmota/peer/bootscripts/") for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "swarmota = swarmota.cli:main" in wheel.read(entry_points).decode()
