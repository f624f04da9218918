"""The repository's backup procedure (docs/SECURITY.md, "Backups"): the publishing host
is lost; a new one is rebuilt from a copy of the public origin tree and, if kept, the
backup of ``keys/`` and ``repo.json``; without the key backup, root rotates new online
keys in. Devices carry on either way; a copy that does not verify is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from swarmota.cli import main
from swarmota.demo import mutate_image
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from swarmota.seeder.errors import RepositoryError
from swarmota.seeder.keys import load_private_key
from swarmota.seeder.repository import Repository
from tests.release_env import ReleaseEnv, expect_clean_run, publish


def lose_the_host(env: ReleaseEnv, tmp_path: Path, *, keep_keys: bool) -> tuple[Path, Path]:
    """What the operator kept, then the host gone: the CDN's copy of the origin tree,
    ``keys/`` and ``repo.json`` in the backup (if ``keep_keys``), the root key offline."""
    mirror = tmp_path / "cdn-copy"
    shutil.copytree(env.repo.origin_dir, mirror)
    vault = tmp_path / "vault"
    vault.mkdir()
    shutil.copy(env.repo.offline_root_key_path, vault / "root.pem")
    shutil.copy(env.repo.metadata_dir / "1.root.json", vault / "root.json")  # provisioning
    if keep_keys:
        shutil.copytree(env.repo.online_keys_dir, vault / "keys")
        shutil.copy(env.repo.path / "repo.json", vault / "repo.json")
    shutil.rmtree(env.repo.path)
    return mirror, vault


async def test_host_rebuilt_from_the_origin_copy_and_the_key_backup(
        env: ReleaseEnv, tmp_path: Path) -> None:
    dev = env.device(mode="direct")
    await expect_clean_run(env, dev)  # on v2
    versions = env.repo.versions()
    mirror, vault = lose_the_host(env, tmp_path, keep_keys=True)
    assert main(["seeder", "rebuild", str(env.repo.path), "--origin", str(mirror),
                 "--trusted-root", str(vault / "root.json"), "--keys", str(vault / "keys"),
                 "--settings", str(vault / "repo.json")]) == 0
    repo = Repository.open(env.repo.path)
    assert repo.versions() == versions and repo.staged() is None
    env.register(publish(repo, tmp_path, mutate_image(env.v2, seed=5), "3.0.0", 3))
    result = await update_once(dev)
    assert result.status == StatusCode.OK and result.to_version == "3.0.0", result.message


async def test_host_rebuilt_without_its_keys_rotates_new_ones_in(
        env: ReleaseEnv, tmp_path: Path) -> None:
    dev = env.device(mode="direct")  # still on v1, root version 1
    mirror, vault = lose_the_host(env, tmp_path, keep_keys=False)
    repo, staged = Repository.rebuild(env.repo.path, mirror,
                                      trusted_root=(vault / "root.json").read_bytes())
    assert staged is not None and not staged.live
    # the targets key of the single-key setup was on the lost host too: same request
    _, (targets_key,) = repo.rotate("targets", generate=1)
    assert not repo.sign(load_private_key(vault / "root.pem"))[1].live
    assert repo.sign(load_private_key(targets_key))[1].live
    reopened = Repository.open(repo.path)
    assert reopened.versions()["root"] == 2
    env.register(publish(reopened, tmp_path, mutate_image(env.v2, seed=6), "3.0.0", 3))
    result = await update_once(dev)
    assert result.status == StatusCode.OK and result.to_version == "3.0.0", result.message
    assert json.loads((dev.trust_dir / "root.json").read_bytes())["signed"]["version"] == 2


@pytest.mark.parametrize("damage", ["payload", "targets", "root", "other-repository"])
async def test_an_origin_copy_that_does_not_verify_is_refused(
        env: ReleaseEnv, tmp_path: Path, damage: str) -> None:
    mirror = tmp_path / "cdn-copy"
    shutil.copytree(env.repo.origin_dir, mirror)
    anchor = (env.repo.metadata_dir / "1.root.json").read_bytes()
    if damage == "other-repository":  # a consistent repository, but not ours
        foreign = Repository.create(tmp_path / "foreign")
        shutil.rmtree(mirror)
        shutil.copytree(foreign.origin_dir, mirror)
    elif damage == "payload":
        path = mirror / env.m2.full_payload.path
        data = bytearray(path.read_bytes())
        data[10] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "targets":
        path = next(mirror.glob("targets/releases/*/*.2.0.0.json"))
        path.write_bytes(path.read_bytes().replace(b'"release_counter":2', b'"release_counter":9'))
    else:
        foreign = Repository.create(tmp_path / "foreign")
        shutil.copy(foreign.metadata_dir / "1.root.json", mirror / "metadata" / "1.root.json")
    with pytest.raises(RepositoryError):
        Repository.rebuild(tmp_path / "new", mirror, trusted_root=anchor)
    assert not (tmp_path / "new").exists()
