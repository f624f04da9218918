"""Test helpers for the trust lifecycle: repositories with k-of-n keys, signing, and a
SoftHSM2 token per test (skipped cleanly without the softhsm2 package)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarmota.seeder.hsm import TokenConfig
from swarmota.seeder.keys import load_private_key
from swarmota.seeder.repository import KeySetup, Repository, RoleKeys, Staged

SOFTHSM_LIBRARIES = (Path("/usr/lib/softhsm/libsofthsm2.so"),
                     Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"))
SO_PIN = "87654321"
USER_PIN = "1234"


def threshold_repo(path: Path, *, root: tuple[int, int] = (3, 2),
                   targets: tuple[int, int] = (3, 2), key_type: str = "ed25519"
                   ) -> Repository:
    """A repository whose root and targets keys are k-of-n and offline
    (``offline/root-N.pem``, ``offline/targets-N.pem``)."""
    return Repository.create(path, keys=KeySetup(
        root=RoleKeys(root[0], root[1], key_type),
        targets=RoleKeys(targets[0], targets[1], key_type),
        targets_online=False))


def offline_key(repo: Repository, name: str) -> Path:
    return repo.offline_dir / f"{name}.pem"


def sign(repo: Repository, *names: str) -> Staged:
    """Sign the staged request with the offline keys ``names`` (e.g. ``root-1``)."""
    staged = Staged(None, False)
    for name in names:
        _, staged = repo.sign(load_private_key(offline_key(repo, name)))
    return staged


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 installation private to one test: its config, token directory and
    PKCS#11 module."""

    conf: Path
    library: Path

    def init_token(self, label: str, pin: str = USER_PIN) -> TokenConfig:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--so-pin", SO_PIN, "--pin", pin], check=True,
                       capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)})
        return TokenConfig(self.library, label, pin)


def softhsm_library() -> Path | None:
    if shutil.which("softhsm2-util") is None:
        return None
    return next((p for p in SOFTHSM_LIBRARIES if p.exists()), None)


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    """A SoftHSM2 token store in ``tmp_path`` (SOFTHSM2_CONF set for this test only)."""
    library = softhsm_library()
    if library is None:
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2; .ci/run installs it)")
    tokens = tmp_path / "softhsm-tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    yield SoftHsm(conf, library)
