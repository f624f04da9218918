"""Dependencies point one way (docs/ARCHITECTURE.md): checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "manifest": set(),
    "infra": set(),
    "tracker": {"manifest", "infra"},
    "peer": {"manifest", "infra"},
    "seeder": {"manifest", "infra", "peer"},
    "swarmota": {"manifest", "infra", "tracker", "peer", "seeder"},
}
THIRD_PARTY_OWNERS = {
    "httpx": {"peer/http.py", "tracker/admin_client.py"},
    "httpcore": {"peer/http.py"},
    "hypercorn": {"infra/http_serve.py"},
    "libtorrent": {"peer/swarm.py"},
    "sqlite3": {"tracker/store.py", "tracker/backup.py"},
    "zstandard": {"peer/install.py", "peer/delta.py", "seeder/publish.py", "seeder/delta.py"},
    "bsdiff4": {"peer/delta.py", "seeder/delta.py"},
    "backports": {"seeder/delta.py"},
    "hdiffpatch": {"seeder/covers.py"},
    "pkcs11": {"seeder/hsm.py"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_packages_only_import_what_the_architecture_allows() -> None:
    problems = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            ours = imports_of(path) & set(ALLOWED)
            bad = ours - allowed - {package}
            if bad:
                problems.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not problems, problems


def test_nobody_imports_bench() -> None:
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            assert "bench" not in imports_of(path), path


def test_third_party_libraries_stay_in_their_adapter_modules() -> None:
    problems = []
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for lib in imports_of(path) & set(THIRD_PARTY_OWNERS):
                if rel not in THIRD_PARTY_OWNERS[lib]:
                    problems.append(f"{rel} imports {lib}")
    assert not problems, problems


def test_manifest_core_is_pure() -> None:
    forbidden = {"os", "socket", "httpx", "trio", "sqlite3", "subprocess", "shutil"}
    for path in (ROOT / "manifest").rglob("*.py"):
        assert not imports_of(path) & forbidden, path
