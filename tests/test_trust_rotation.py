"""Key rotation and revocation as devices see them: a device offline across several
rotations follows the root chain; metadata signed by a rotated-out key is refused (the
compromised online key attack); the online keys alone never make a device install
anything; the trust anchor moves only along the chain.

Real devices against the real origin and tracker on 127.0.0.1 (tests/release_env.py);
attackers' metadata is written with tests/tuf_forge.py.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import trio

from swarmota.demo import mutate_image
from swarmota.manifest import ReleaseManifest
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from swarmota.seeder.keys import load_private_key
from swarmota.seeder.publish import is_live, publish_release
from swarmota.seeder.repository import KeySetup, Repository, RoleKeys
from tests.release_env import (
    ReleaseEnv,
    expect_clean_run,
    expect_refused,
    publish,
    start_env,
    trusted_versions,
)
from tests.trust_env import sign, threshold_repo
from tests.tuf_forge import Forge


def root_sign(repo: Repository, *paths: Path) -> bool:
    live = False
    for path in paths:
        _, staged = repo.sign(load_private_key(path))
        live = staged.live
    return live


async def test_device_offline_across_four_rotations_follows_the_root_chain(
        env: ReleaseEnv) -> None:
    dev = env.device(mode="direct")  # provisioned with root version 1, then offline
    repo = env.repo
    root_key = repo.offline_root_key_path
    for role in ("timestamp", "snapshot"):
        staged, written = repo.rotate(role, generate=1)
        assert not staged.live and written[0].parent == repo.online_keys_dir
        assert root_sign(repo, root_key)
    staged, targets_keys = repo.rotate("targets", generate=3, threshold=2)
    assert all(p.parent == repo.offline_dir for p in targets_keys)
    assert not root_sign(repo, root_key), "the new targets keys must sign the targets too"
    assert root_sign(repo, *targets_keys[:2])
    staged, root_keys = repo.rotate("root", generate=2, threshold=2)
    assert not root_sign(repo, *root_keys), "the old root threshold must sign as well"
    assert root_sign(repo, root_key)
    assert repo.versions()["root"] == 5
    retired = sorted(p.name for p in (repo.path / "retired-keys").iterdir())
    assert retired == ["snapshot.pem", "targets.pem", "timestamp.pem"]

    await expect_clean_run(env, dev)
    assert trusted_versions(dev)["root"] == 5
    assert (dev.trust_dir / "root.json").read_bytes() == repo.root_bytes()


async def test_idle_device_follows_a_root_rotation_at_its_next_check_in(
        env: ReleaseEnv) -> None:
    """Nothing offered: the metadata refresh that runs beside every check-in still moves
    the trusted root, at once (not a day later, as when an idle device refreshed daily)."""
    dev = env.device(mode="direct")
    first = await update_once(dev)
    assert first.updated, first.message  # on v2: nothing more to offer
    env.repo.rotate("timestamp", generate=1)
    assert root_sign(env.repo, env.repo.offline_root_key_path)
    idle = await update_once(dev)
    assert idle.status == StatusCode.OK and not idle.attempted, idle.message
    assert trusted_versions(dev)["root"] == env.repo.versions()["root"] == 2
    assert idle.bytes_metadata > 0


async def test_metadata_signed_by_a_rotated_out_timestamp_key_is_refused(
        env: ReleaseEnv) -> None:
    """The online timestamp key leaked: the operator rotates it out. An attacker who
    controls the origin (or the network) and kept the old key offers metadata signed
    with it: the device follows the chain to the new root first and refuses it."""
    stolen = load_private_key(env.repo.online_keys_dir / "timestamp.pem")
    env.repo.rotate("timestamp", generate=1)
    assert root_sign(env.repo, env.repo.offline_root_key_path)
    forge = Forge(env.repo)
    legit = (env.repo.metadata_dir / "timestamp.json").read_bytes()
    forge.write_timestamp([stolen], version=forge.timestamp().signed.version + 100)
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")
    assert trusted_versions(dev)["root"] == 2, "the rotation itself was accepted"
    (env.repo.metadata_dir / "timestamp.json").write_bytes(legit)  # attacker cut off
    env.repo.refresh_timestamp()  # the operator's next timestamp, with the new key
    await expect_clean_run(env, dev)


async def test_release_signed_by_a_rotated_out_targets_key_is_refused(
        env: ReleaseEnv) -> None:
    """The online targets key of the single-key setup was stolen: the operator moves
    release signing to 2 of 3 offline keys. The thief still holds the old key and even
    the current online snapshot and timestamp keys: targets signed by the old key are
    refused; the release signers' own targets are accepted."""
    stolen = load_private_key(env.repo.online_keys_dir / "targets.pem")
    _, new_keys = env.repo.rotate("targets", generate=3, threshold=2)
    root_sign(env.repo, env.repo.offline_root_key_path, *new_keys[:2])
    assert not (env.repo.online_keys_dir / "targets.pem").exists()
    forge = Forge(env.repo)
    forge.write_chain(targets=[stolen])
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")
    forge.write_chain(targets=[load_private_key(p) for p in new_keys[1:]])
    await expect_clean_run(env, dev)


async def test_online_keys_alone_cannot_make_a_device_install_anything(
        tmp_path: Path, nursery: trio.Nursery, images: tuple[bytes, bytes]) -> None:
    """Release signing by 2 of 3 offline keys. Whoever takes the publishing host gets
    the snapshot and timestamp keys and write access to the origin, and may run the
    tracker: a release they publish stays staged, and targets they sign with the keys
    they hold are refused by every device."""
    env = await start_env(nursery, tmp_path, *images, keys=KeySetup(
        targets=RoleKeys(3, 2), targets_online=False))
    manifest = publish_unsigned(env, mutate_image(env.v2, seed=33))
    assert not is_live(env.repo, manifest)
    forge = Forge(env.repo)
    host_keys = [forge.keys["snapshot"], forge.keys["timestamp"]]
    forge.write_chain(targets=host_keys)  # the targets as the thief would sign them
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")
    forge.write_chain(targets=[load_private_key(env.repo.offline_dir / "targets-1.pem"),
                               load_private_key(env.repo.offline_dir / "targets-3.pem")])
    await expect_clean_run(env, dev)


def publish_unsigned(env: ReleaseEnv, data: bytes) -> ReleaseManifest:
    path = env.image_path("v3.img", data)
    return publish_release(env.repo, path, product="acme-router", version="3.0.0",
                           release_counter=3, compatibility=["acme-router-hw1"],
                           zstd_level=3)


async def test_trust_anchor_moves_only_along_the_root_chain(
        env: ReleaseEnv, tmp_path: Path) -> None:
    """The device's root.json changes only by a verified chain step: a root.json (or a
    1.root.json) replaced on the origin by another repository's root is never read as a
    new anchor, and the trusted root stays byte for byte the one the chain gave."""
    dev = env.device(mode="direct")
    anchor = (dev.trust_dir / "root.json").read_bytes()
    foreign = Repository.create(tmp_path / "foreign")
    for name in ("root.json", "1.root.json"):
        shutil.copy(foreign.metadata_dir / "1.root.json", env.repo.metadata_dir / name)
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert (dev.trust_dir / "root.json").read_bytes() == anchor
    env.repo.rotate("timestamp", generate=1)
    root_sign(env.repo, env.repo.offline_root_key_path)
    env.register(publish(env.repo, tmp_path, mutate_image(env.v2, seed=3), "3.0.0", 3))
    assert (await update_once(dev)).status == StatusCode.OK
    chain = (env.repo.metadata_dir / "2.root.json").read_bytes()
    assert (dev.trust_dir / "root.json").read_bytes() == chain
    assert hashlib.sha256(chain).digest() != hashlib.sha256(anchor).digest()


def test_rotated_root_needs_the_old_and_the_new_threshold(tmp_path: Path) -> None:
    repo = threshold_repo(tmp_path / "repo")
    staged, new_keys = repo.rotate("root", generate=3, threshold=2)
    request = staged.request
    assert request is not None
    needs = [(r.authority, r.threshold, len(r.keyids)) for r in request.requirements()]
    assert needs == [(1, 2, 3), (2, 2, 3)]
    for path in new_keys:
        repo.sign(load_private_key(path))
    assert repo.staged() is not None, "new keys alone do not make a root"
    assert sign(repo, "root-1").live is False
    assert sign(repo, "root-2").live is True
    assert repo.versions()["root"] == 2

