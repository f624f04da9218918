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


def _run(cmd: list[str | Path]) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT)


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
        [BIN / "mypy"],
        [PY, "-m", "pytest", *rest],
    ):
        rc = _run(step)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
