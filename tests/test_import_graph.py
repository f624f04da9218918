"""Dependencies point one way (docs/ARCHITECTURE.md): checked on the source.

The installed distribution has one top-level package, ``swarmota``, with the packages
below it (``swarmota.peer`` lives in the repository's ``peer/``); the rules name them
by their folder: ``swarmota.tracker.wire`` is ``tracker.wire`` here, ``swarmota.cli``
stays ``swarmota.cli``."""

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
ALLOWED_MODULES = {
    # the device<->tracker wire format, written once (pure): the agent imports it
    "peer": {"tracker.wire"},
    # the tracker's client side (connection settings and options, plan options, the
    # plan type, rendering, errors): `seeder publish --register` registers releases
    "seeder": {"tracker.client_cli", "tracker.client_settings", "tracker.errors",
               "tracker.render", "tracker.rollout"},
}
"""Single modules of another package a package may import besides ALLOWED."""
THIRD_PARTY_OWNERS = {
    "httpx": {"peer/http.py", "tracker/admin_client.py", "tracker/release_trust.py"},
    "httpcore": {"peer/http.py"},
    "hypercorn": {"infra/http_serve.py"},
    "libtorrent": {"peer/swarm.py"},
    "sqlite3": {"tracker/sqlite_store.py", "tracker/backup.py"},
    "psycopg": {"tracker/pg_store.py"},
    "redis": {"tracker/redis_state.py"},
    "zstandard": {"peer/install.py", "peer/delta.py", "seeder/publish.py", "seeder/delta.py"},
    "bsdiff4": {"peer/delta.py", "seeder/delta.py"},
    "backports": {"seeder/delta.py"},
    "hdiffpatch": {"seeder/covers.py"},
    "pkcs11": {"seeder/hsm.py"},
}


def _folder_name(module: str) -> str:
    """``swarmota.peer.agent`` -> ``peer.agent``: the name by the repository's folders."""
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "swarmota" and parts[1] in ALLOWED:
        return ".".join(parts[1:])
    return module


def imports_of(path: Path) -> set[str]:
    return {m.split(".")[0] for m in modules_of(path)}


def modules_of(path: Path) -> set[str]:
    """Full names of the modules ``path`` imports (``from a import b`` gives ``a.b``
    as well as ``a``, since ``b`` may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(_folder_name(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module = _folder_name(node.module)
            names.add(module)
            names.update(_folder_name(f"{node.module}.{alias.name}") for alias in node.names)
    return names


def test_packages_only_import_what_the_architecture_allows() -> None:
    problems = []
    for package, allowed in ALLOWED.items():
        extra = ALLOWED_MODULES.get(package, set())
        for path in sorted((ROOT / package).rglob("*.py")):
            modules = modules_of(path)
            ours = {m.split(".")[0] for m in modules if not _allowed_module(m, extra)}
            bad = ours & set(ALLOWED) - allowed - {package}
            if bad:
                problems.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not problems, problems


def _allowed_module(module: str, extra: set[str]) -> bool:
    """``module`` is one of ``extra``, or a name imported from one (``tracker.wire.X``),
    or the bare package of a ``from tracker import wire``."""
    return any(module == m or module.startswith(m + ".") or m.startswith(module + ".")
               for m in extra)


def test_the_wire_format_imports_nothing_of_the_tracker_and_does_no_io() -> None:
    path = ROOT / "tracker" / "wire.py"
    modules = modules_of(path)
    ours = {m for m in modules if m.split(".")[0] in ALLOWED}
    assert {m.split(".")[0] for m in ours} <= {"manifest", "infra"}, ours
    assert {m for m in ours if m.startswith("infra")} <= {"infra.ids", "infra.ids.DEVICE_ID_RE",
                                                          "infra.ids.DEVICE_ID_RULE"}
    forbidden = {"os", "socket", "httpx", "trio", "sqlite3", "subprocess", "shutil", "pathlib"}
    assert not {m.split(".")[0] for m in modules} & forbidden


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
