#!/usr/bin/env python3
"""Bootstrap and run swarmota with nothing but python3 (3.11+).

    python3 dev.py demo [ARGS...]   # create .venv, install, run `swarmota demo`
    python3 dev.py test [ARGS...]   # create .venv, install, run ruff, mypy and pytest
    python3 dev.py swarmota ARGS... # run any swarmota subcommand in the venv

The virtual environment lives in `.venv/` beside this file. It is (re)installed
whenever pyproject.toml changes (a stamp file records the hash it was built from).
Set SWARMOTA_VENV to use another location.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SWARMOTA_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


SUBPACKAGES = ("infra", "manifest", "seeder", "peer", "tracker")
"""Folders of the repository installed below ``swarmota`` (pyproject.toml maps them)."""


def _run(cmd: list[str | Path], cwd: Path = ROOT) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=cwd)


def _typecheck_tree() -> Path:
    """The installed layout, made of symbolic links, for mypy (which cannot follow the
    editable install's import hook): .typecheck/swarmota/peer -> peer/, and so on."""
    tree = ROOT / ".typecheck"
    package = tree / "swarmota"
    package.mkdir(parents=True, exist_ok=True)
    links = {package / f.name: f for f in (ROOT / "swarmota").iterdir()
             if f.name != "__pycache__"}
    links.update({package / name: ROOT / name for name in SUBPACKAGES})
    links.update({tree / name: ROOT / name for name in ("bench", "tests")})
    for link in package.iterdir():
        if link not in links:
            link.unlink()
    for link, target in links.items():
        if not link.is_symlink() or link.resolve() != target.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(target)
    return tree


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - runs under any system python3
        sys.exit(f"swarmota needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    stamp = VENV / ".swarmota-install-stamp"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    rc = _run([PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "-e", ".[dev]"])
    if rc != 0:
        sys.exit(f"pip install failed with exit code {rc}")
    stamp.write_text(want + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    what, rest = argv[0], argv[1:]
    if what not in {"demo", "test", "swarmota"}:
        print(f"unknown command {what!r}\n{__doc__}", file=sys.stderr)
        return 2
    ensure_venv()
    if what == "demo":
        return _run([BIN / "swarmota", "demo", *rest])
    if what == "swarmota":
        return _run([BIN / "swarmota", *rest])
    for step in (
        [BIN / "ruff", "check", "."],
        [BIN / "mypy", "--config-file", ROOT / "pyproject.toml", "-p", "swarmota", "-p", "bench"],
        [PY, "-m", "pytest", *rest],
    ):
        rc = _run(step, cwd=_typecheck_tree() if step[0] == BIN / "mypy" else ROOT)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
