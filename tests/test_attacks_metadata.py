"""Attacks on metadata and manifests (RELIABILITY.md, "Metadata and manifests") that
tests/test_update_attacks.py and tests/test_manifest.py do not cover yet: thresholds,
a key listed twice, metadata rollback, same version with other content, fast-forward
and recovery by key rotation, root rotation, mix-and-match on the device, endless
data, wrong software, the device clock.

Each drives a real device against the real origin and tracker on 127.0.0.1 and checks
the invariants of ../shared/RELIABILITY.md through tests/release_env.py:
``expect_refused`` (typed status and message, slot a byte-identical and committed,
trusted metadata only forward, nothing unverified kept, the report stored) and
``expect_clean_run`` (once the repository is repaired, the next pass installs v2).
Metadata is forged with tests/tuf_forge.py.
"""

from __future__ import annotations

import datetime as real_datetime
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from tuf.api.metadata import Root
from tuf.ngclient._internal import trusted_metadata_set

from swarmota.demo import mutate_image
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from swarmota.seeder.errors import PublishError
from swarmota.seeder.keys import generate_key
from swarmota.seeder.publish import publish_release
from swarmota.seeder.repository import Repository
from tests.faulty_origin import Fault, serve_faulty
from tests.release_env import (
    HARDWARE_ID,
    PRODUCT,
    ReleaseEnv,
    expect_clean_run,
    expect_refused,
    publish,
    serve_offer,
    trusted_versions,
)
from tests.tuf_forge import Forge, metafile, same_key_twice


def threshold_two(forge: Forge, role: str = "targets") -> Any:
    """Root v2 (signed by the root key): ``role`` needs two keys, the current one and a
    new one that only the repository owner holds. Returns the new key."""
    second = generate_key()

    def change(root: Root) -> None:
        root.add_key(second.public_key, role)
        root.roles[role].threshold = 2

    forge.write_root(change, [forge.root_key])
    return second


# --- signatures and thresholds ------------------------------------------------------------


async def test_targets_signed_by_an_unknown_key_is_rejected(env: ReleaseEnv) -> None:
    forge = Forge(env.repo)
    forge.write_chain(targets=[generate_key()])
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")
    forge.write_chain()  # the owner re-signs with the real key
    await expect_clean_run(env, dev)


async def test_threshold_not_met_is_rejected(env: ReleaseEnv) -> None:
    forge = Forge(env.repo)
    second = threshold_two(forge)
    forge.write_chain()  # signed by one of the two keys only
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")
    assert trusted_versions(dev)["root"] == 2, "the valid new root is trusted"
    forge.write_chain(targets=[forge.keys["targets"], second])
    await expect_clean_run(env, dev)


async def test_one_signature_listed_twice_does_not_fake_a_threshold(env: ReleaseEnv) -> None:
    """An attacker with one of two targets keys copies its signature entry."""
    forge = Forge(env.repo)
    threshold_two(forge)

    def duplicate(doc: dict[str, Any]) -> None:
        doc["signatures"].append(dict(doc["signatures"][0]))

    forge.write_chain(raw_targets=duplicate)
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")


async def test_one_key_listed_twice_under_two_keyids_does_not_fake_a_threshold(
        env: ReleaseEnv) -> None:
    """A root (validly signed: an owner's mistake, or a tool's) lists the targets key a
    second time under another keyid and asks for two signatures: one key signing twice
    must not count as two. python-tuf counts keyids; the agent refuses such a root and
    keeps its trusted metadata as it was."""
    forge = Forge(env.repo)
    alias = "f" * 64

    def change(root: Root) -> None:
        same_key_twice(root, "targets", forge.keys["targets"].public_key, alias)
        root.roles["targets"].threshold = 2

    forge.write_root(change, [forge.root_key])

    def twice(doc: dict[str, Any]) -> None:
        doc["signatures"].append({**doc["signatures"][0], "keyid": alias})

    forge.write_chain(raw_targets=twice)
    dev = env.device(mode="direct")
    before = trusted_versions(dev)
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "same key")
    assert trusted_versions(dev) == before, "the faked threshold moved nothing"


# --- rollback, same version, freeze, fast-forward --------------------------------------------


async def test_older_timestamp_after_a_newer_one_is_rejected(env: ReleaseEnv,
                                                             nursery: trio.Nursery) -> None:
    old = (env.repo.metadata_dir / "timestamp.json").read_bytes()
    env.repo.refresh_timestamp()
    origin, url = await serve_faulty(nursery, env.origin)
    origin.add(Fault("status", env.m2.full_payload.path))  # the first pass stops there
    dev = env.device(mode="direct", origin_url=url, chunk_attempts=1)
    assert (await update_once(dev)).status == StatusCode.DOWNLOAD_FAILED
    seen = trusted_versions(dev)["timestamp"]
    origin.faults.clear()
    newer = (env.repo.metadata_dir / "timestamp.json").read_bytes()
    (env.repo.metadata_dir / "timestamp.json").write_bytes(old)  # replayed older metadata
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected",
                         payloads=[env.m2.full_payload])
    assert trusted_versions(dev)["timestamp"] == seen
    (env.repo.metadata_dir / "timestamp.json").write_bytes(newer)
    await expect_clean_run(env, dev)


async def test_same_version_with_different_content_is_refused(env: ReleaseEnv,
                                                              tmp_path: Path) -> None:
    """The repository never signs two contents for one release name; an origin serving
    another build of 2.0.0 (from another repository) fails the signed hash."""
    other = mutate_image(env.v2, seed=99)
    with pytest.raises(PublishError, match="already published with other content"):
        publish(env.repo, tmp_path / "again", other, "2.0.0", 2)
    foreign = Repository.create(tmp_path / "foreign")
    fake = publish(foreign, tmp_path / "foreign-work", other, "2.0.0", 2)
    saved = {}
    for form in ("*.2.0.0.json", "*.2.0.0.compact.json"):  # canonical, compact (read)
        (genuine,) = (env.repo.origin_dir / "targets" / "releases" / PRODUCT).glob(form)
        (forged,) = (foreign.origin_dir / "targets" / "releases" / PRODUCT).glob(form)
        saved[genuine] = genuine.read_bytes()
        genuine.write_bytes(forged.read_bytes())
    assert fake.version == env.m2.version and fake.image.sha256 != env.m2.image.sha256
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")
    for genuine, data in saved.items():
        genuine.write_bytes(data)
    await expect_clean_run(env, dev)


async def test_expired_snapshot_served_forever_is_reported_as_a_possible_freeze(
        env: ReleaseEnv) -> None:
    """Indefinite freeze: the timestamp is fresh but names an expired snapshot (the
    expired-timestamp case is in test_update_attacks.py). The device keeps its slot
    and tells the tracker, every pass, that it may be frozen."""
    forge = Forge(env.repo)
    snap = forge.snapshot()
    snap.signed.version += 1
    snap.signed.expires = real_datetime.datetime.now(real_datetime.UTC) - real_datetime.timedelta(
        seconds=60)
    data = forge.sign(snap, [forge.keys["snapshot"]])
    (env.repo.metadata_dir / f"{snap.signed.version}.snapshot.json").write_bytes(data)
    forge.write_timestamp(snapshot_meta=metafile(snap.signed.version, data))
    dev = env.device(mode="direct")
    for _ in range(2):
        await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "possible freeze attack")
    forge.write_chain()
    await expect_clean_run(env, dev)


async def test_fast_forward_attack_freezes_until_the_timestamp_key_is_rotated(
        env: ReleaseEnv, tmp_path: Path) -> None:
    """An attacker with the timestamp key signs version 10**9: the device accepts it (a
    valid signature) and then refuses the repository's real, lower versions as a
    rollback. The owner rotates the timestamp key (new root, signed offline): the device
    drops its trusted timestamp with the old key and recovers."""
    forge = Forge(env.repo)
    genuine = (env.repo.metadata_dir / "timestamp.json").read_bytes()
    forge.write_timestamp(version=10**9)  # the attacker's timestamp, served to the device
    dev = env.device(mode="direct")
    assert (await update_once(dev)).status == StatusCode.OK  # v2: nothing looked wrong
    assert trusted_versions(dev)["timestamp"] == 10**9
    (env.repo.metadata_dir / "timestamp.json").write_bytes(genuine)
    v3 = mutate_image(env.v2, seed=31)
    m3 = publish_release(env.repo, env.image_path("v3.img", v3), product=PRODUCT,
                         version="3.0.0", release_counter=3, compatibility=[HARDWARE_ID],
                         zstd_level=3)
    env.register(m3)
    frozen = await update_once(dev)
    assert frozen.status == StatusCode.VERIFY_FAILED, frozen.message
    assert "metadata rejected" in frozen.message and "version" in frozen.message.lower()
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "b" and dev.slot_path("b").read_bytes() == env.v2
    assert env.reports()[-1].status == int(StatusCode.VERIFY_FAILED)
    new_key = generate_key()
    forge.write_root(lambda root: forge.rotate(root, "timestamp", new_key), [forge.root_key])
    forge.write_timestamp([new_key], version=forge.timestamp().signed.version + 1)
    recovered = await update_once(dev)
    assert recovered.status == StatusCode.OK, recovered.message
    assert dev.slot_path("a").read_bytes() == v3 and dev.bootctl().committed == "a"
    assert trusted_versions(dev)["timestamp"] < 10**9
    assert env.reports()[-1].status == 0


# --- root rotation ---------------------------------------------------------------------------


async def test_new_root_signed_only_by_new_keys_is_rejected(env: ReleaseEnv) -> None:
    forge = Forge(env.repo)
    new_root_key = generate_key()
    forge.write_root(lambda root: forge.rotate(root, "root", new_root_key), [new_root_key])
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")
    assert trusted_versions(dev)["root"] == 1
    # the owner signs the rotation with the old key too: accepted
    forge.write_root(lambda root: forge.rotate(root, "root", new_root_key),
                     [forge.root_key, new_root_key], version=2)
    await expect_clean_run(env, dev)
    assert trusted_versions(dev)["root"] == 2


async def test_skipped_root_version_is_not_jumped_over(env: ReleaseEnv) -> None:
    """Root v3 rotates the timestamp key, v2 is missing: the device cannot walk from v1
    to v3, keeps v1, and refuses the timestamp signed with the new key."""
    forge = Forge(env.repo)
    new_key = generate_key()
    forge.write_root(lambda root: forge.rotate(root, "timestamp", new_key), [forge.root_key])
    forge.write_root(lambda root: None, [forge.root_key])
    two = env.repo.metadata_dir / "2.root.json"
    saved = two.read_bytes()
    two.unlink()
    forge.write_timestamp([new_key])
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")
    assert trusted_versions(dev)["root"] == 1
    two.write_bytes(saved)  # the owner publishes the missing version
    await expect_clean_run(env, dev)
    assert trusted_versions(dev)["root"] == 3


async def test_too_many_root_rotations_are_walked_at_most_256_per_pass(env: ReleaseEnv) -> None:
    """300 new root versions: one pass walks at most 256 (python-tuf's
    max_root_rotations, a bound on the work a repository can ask for); the device updates
    with the root it reached, and the next pass continues the walk."""
    forge = Forge(env.repo)
    root = forge.root()
    for version in range(2, 302):
        root.signed.version = version
        (env.repo.metadata_dir / f"{version}.root.json").write_bytes(
            forge.sign(root, [forge.root_key]))
    dev = env.device(mode="direct")
    with trio.fail_after(120):
        await expect_clean_run(env, dev)
    assert trusted_versions(dev)["root"] == 1 + 256
    v3 = mutate_image(env.v2, seed=51)
    env.register(publish_release(env.repo, env.image_path("v3.img", v3), product=PRODUCT,
                                 version="3.0.0", release_counter=3,
                                 compatibility=[HARDWARE_ID], zstd_level=3))
    with trio.fail_after(120):
        assert (await update_once(dev)).status == StatusCode.OK
    assert trusted_versions(dev)["root"] == 301


# --- mix-and-match, wrong software ---------------------------------------------------------


async def test_payload_of_release_a_under_the_manifest_of_release_b_is_rejected(
        env: ReleaseEnv) -> None:
    v1_payload = env.repo.origin_dir / env.m1.full_payload.path
    v2_payload = env.repo.origin_dir / env.m2.full_payload.path
    saved = v2_payload.read_bytes()
    shutil.copyfile(v1_payload, v2_payload)
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "failed verification")
    v2_payload.write_bytes(saved)
    await expect_clean_run(env, dev)


@pytest.mark.parametrize("other", ["product", "hardware"])
async def test_valid_release_for_other_software_is_refused(
        env: ReleaseEnv, nursery: trio.Nursery, other: str) -> None:
    """Signed by the genuine keys, offered by a compromised tracker: for another product
    or another hardware id, the device refuses it."""
    v3 = mutate_image(env.v2, seed=41)
    product = "acme-camera" if other == "product" else PRODUCT
    hardware = HARDWARE_ID if other == "product" else "acme-router-hw2"
    m3 = publish_release(env.repo, env.image_path("v3.img", v3), product=product,
                         version="3.0.0", release_counter=3, compatibility=[hardware],
                         zstd_level=3)
    evil = await serve_offer(nursery, {"product": m3.product, "version": m3.version,
                                       "release_counter": 3,
                                       "target": f"releases/{m3.product}/3.0.0.json"})
    dev = env.device(mode="direct", tracker_url=evil)
    result = await update_once(dev)
    assert result.status == StatusCode.VERIFY_FAILED, result.message
    assert ("product" if other == "product" else "hardware") in result.message
    bc = dev.bootctl()
    assert bc.committed == "a" and not dev.slot_path("b").exists()
    assert dev.slot_path("a").read_bytes() == env.v1
    assert not list(dev.downloads_dir.iterdir())


# --- endless data --------------------------------------------------------------------------


@pytest.mark.parametrize(("what", "path_part", "status", "words"), [
    ("metadata", "timestamp.json", StatusCode.VERIFY_FAILED, "longer than allowed"),
    ("manifest", ".2.0.0.compact.json", StatusCode.VERIFY_FAILED, "longer than allowed"),
    ("chunk list", ".chunks", StatusCode.DOWNLOAD_FAILED, "answer over"),
    ("chunk", ".zst", StatusCode.VERIFY_FAILED, "failed verification"),
])
async def test_endless_data_is_cut_at_the_limit_and_nothing_is_kept(
        env: ReleaseEnv, nursery: trio.Nursery, what: str, path_part: str,
        status: StatusCode, words: str) -> None:
    """The origin streams zeros forever (with the asked Content-Range for a chunk): the
    agent stops reading at the size it expects (python-tuf's limit for timestamp, the
    signed length for the manifest and the chunk list, the chunk size for a chunk) and
    keeps nothing."""
    origin, url = await serve_faulty(nursery, env.origin)
    origin.add(Fault("endless", path_part))
    dev = env.device(mode="direct", origin_url=url, chunk_attempts=2)
    with trio.fail_after(60):
        await expect_refused(env, dev, status, words, payloads=[env.m2.full_payload])
    assert origin.endless_bytes_sent < 64 << 20, "the agent hung up"
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_endless_payload_ignoring_range_is_cut_at_the_limit(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """A 200 without a length that never ends, whatever was asked: each request reads
    its offset plus length and hangs up; nothing unverified is kept."""
    origin, url = await serve_faulty(nursery, env.origin)
    origin.add(Fault("endless", ".zst", ranged=False))
    dev = env.device(mode="direct", origin_url=url, chunk_attempts=2)
    with trio.fail_after(60):
        await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "failed verification",
                             payloads=[env.m2.full_payload])
    assert origin.endless_bytes_sent < 256 << 20
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_endless_torrent_file_falls_back_to_the_origin_payload(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """Swarm mode: the torrent file (unsigned, from the origin) never ends: cut at its
    limit, the swarm is skipped, the payload comes by Range and is verified."""
    origin, url = await serve_faulty(nursery, env.origin)
    origin.add(Fault("endless", ".torrent"))
    dev = env.device(origin_url=url)
    with trio.fail_after(60):
        result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert result.download_mode == "direct" and "bytes" in (result.swarm_note or "")
    assert dev.slot_path("b").read_bytes() == env.v2
    assert origin.endless_bytes_sent < 64 << 20


# --- the device's clock ---------------------------------------------------------------------


class _ShiftedDatetime:
    """python-tuf's ``datetime`` module as seen from a device whose clock is off."""

    def __init__(self, shift: real_datetime.timedelta) -> None:
        self.timezone = real_datetime.timezone
        shift_by = shift

        class Shifted(real_datetime.datetime):
            @classmethod
            def now(cls, tz: real_datetime.tzinfo | None = None) -> Any:
                return real_datetime.datetime.now(tz) + shift_by

        self.datetime = Shifted


async def test_device_clock_far_in_the_future_sees_expired_metadata_and_reports_it(
        env: ReleaseEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose clock is ten years ahead finds every metadata file expired: it
    keeps its slot and reports a possible freeze, which the operator sees in the fleet
    (it cannot tell a frozen repository from its own clock)."""
    monkeypatch.setattr(trusted_metadata_set, "datetime",
                        _ShiftedDatetime(real_datetime.timedelta(days=3650)))
    dev = env.device(mode="direct")
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "possible freeze attack")
    monkeypatch.undo()  # the clock is set right (NTP)
    await expect_clean_run(env, dev)


async def test_device_clock_far_in_the_past_still_updates_and_never_downgrades(
        env: ReleaseEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten years behind, nothing looks expired: the device updates normally (TUF has
    no not-before). It is blind to freezes until its clock is right, but signatures,
    version numbers and the release-counter floor still hold."""
    monkeypatch.setattr(trusted_metadata_set, "datetime",
                        _ShiftedDatetime(real_datetime.timedelta(days=-3650)))
    dev = env.device(mode="direct")
    await expect_clean_run(env, dev)
    env.repo.refresh_timestamp(expires_in_s=-60)  # expired for real: still accepted
    assert (await update_once(dev)).status == StatusCode.OK


def test_expiry_reference_is_python_tuf_module_datetime() -> None:
    """The clock tests above shift ``trusted_metadata_set.datetime``: make sure that is
    still where python-tuf reads the time from."""
    assert trusted_metadata_set.datetime is real_datetime
    src = Path(trusted_metadata_set.__file__).read_text()
    assert "datetime.datetime.now(datetime.timezone.utc)" in src

