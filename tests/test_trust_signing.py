"""Threshold release signing: k-of-n keys per role, releases staged until the release
signers' threshold is met, signing requests that travel as files, and what the keys on
the publishing host can and cannot do (seeder side; tests/test_trust_rotation.py has the
devices)."""

from __future__ import annotations

import base64
import json
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Targets

from swarmota.manifest import parse_release_manifest
from swarmota.seeder.errors import PublishError, RepositoryError, SigningError
from swarmota.seeder.keys import generate_key, load_private_key
from swarmota.seeder.publish import highest_counter, is_live, publish_release, published_releases
from swarmota.seeder.repository import ExpiryConfig, KeySetup, Repository, RoleKeys
from swarmota.seeder.staging import read_request, write_request
from tests.trust_env import offline_key, sign, threshold_repo

PRODUCT = "acme-router"


def image(tmp_path: Path, name: str, seed: int) -> Path:
    path = tmp_path / "images" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(40_000))
    return path


def publish(repo: Repository, tmp_path: Path, version: str, counter: int):  # type: ignore[no-untyped-def]
    return publish_release(repo, image(tmp_path, f"{version}.img", counter), product=PRODUCT,
                           version=version, release_counter=counter,
                           compatibility=["hw1"], zstd_level=3)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return threshold_repo(tmp_path / "repo", key_type="ecdsa")


def test_init_makes_k_of_n_keys_per_role_with_root_and_targets_keys_offline(
        repo: Repository) -> None:
    root = Metadata[Root].from_bytes(repo.root_bytes()).signed
    assert (root.roles["root"].threshold, len(root.roles["root"].keyids)) == (2, 3)
    assert (root.roles["targets"].threshold, len(root.roles["targets"].keyids)) == (2, 3)
    assert {root.keys[k].scheme for k in root.roles["targets"].keyids} == {
        "ecdsa-sha2-nistp256"}
    assert sorted(p.name for p in repo.offline_dir.iterdir()) == [
        "root-1.pem", "root-2.pem", "root-3.pem",
        "targets-1.pem", "targets-2.pem", "targets-3.pem"]
    assert sorted(p.name for p in repo.online_keys_dir.iterdir()) == [
        "snapshot.pem", "timestamp.pem"]
    assert repo.local_roles()["targets"] == []
    # each key names its holder in root (shown by seeder status)
    assert root.keys[root.roles["targets"].keyids[0]].unrecognized_fields == {
        "x-swarmota-holder": "targets-1"}


def test_key_setup_refuses_a_threshold_above_the_number_of_keys() -> None:
    with pytest.raises(ValueError, match="threshold"):
        RoleKeys(count=2, threshold=3)
    with pytest.raises(ValueError, match="key type"):
        RoleKeys(key_type="rsa")


def test_release_waits_for_the_targets_threshold_then_goes_live(
        repo: Repository, tmp_path: Path) -> None:
    before = repo.versions()
    manifest = publish(repo, tmp_path, "1.0.0", 1)
    assert not is_live(repo, manifest)
    assert repo.versions() == before, "nothing changes for devices while staged"
    assert not repo.target_file_path(repo.targets(staged=True)[manifest.target_name]).exists()
    request = repo.staged()
    assert request is not None and not request.ready
    text = "\n".join(request.describe())
    assert f"{PRODUCT} 1.0.0, counter 1" in text and "2 more needed" in text

    _, staged = repo.sign(load_private_key(offline_key(repo, "targets-2")))
    assert not staged.live and repo.versions() == before
    status = "\n".join(repo.staged().describe())  # type: ignore[union-attr]
    assert "[signed ] " in status and "targets-2" in status and "1 more needed" in status

    staged = sign(repo, "targets-3")
    assert staged.live and is_live(repo, manifest)
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2,
                               f"releases-{PRODUCT}": 1}
    assert repo.staged() is None and not repo.staged_path.exists()
    for signed in ("2.targets.json", f"1.releases-{PRODUCT}.json"):
        targets = Metadata[Targets].from_bytes((repo.metadata_dir / signed).read_bytes())
        assert len(targets.signatures) == 2
    assert published_releases(repo, PRODUCT) == {"1.0.0": manifest}


def test_a_second_release_joins_the_unsigned_request(repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "1.0.0", 1)
    publish(repo, tmp_path, "1.1.0", 2)
    request = repo.staged()
    assert request is not None and len(request.target_files) == 2
    with pytest.raises(PublishError, match="not higher"):
        publish(repo, tmp_path, "1.2.0", 2)  # counters are checked against staged ones
    assert highest_counter(repo, PRODUCT) == 2
    sign(repo, "targets-1", "targets-2")
    assert set(published_releases(repo, PRODUCT)) == {"1.0.0", "1.1.0"}


def test_a_request_signed_by_another_holder_is_not_amended(
        repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "1.0.0", 1)
    sign(repo, "targets-1")
    with pytest.raises(PublishError, match="already signed by 1 key"):
        publish(repo, tmp_path, "1.1.0", 2)
    assert repo.discard() is not None
    publish(repo, tmp_path, "1.1.0", 2)  # after a discard a new request starts


def test_signing_request_travels_as_a_file_and_comes_back(
        repo: Repository, tmp_path: Path) -> None:
    manifest = publish(repo, tmp_path, "1.0.0", 1)
    carried = tmp_path / "usb" / "request.json"
    carried.parent.mkdir()
    write_request(carried, repo.staged())  # type: ignore[arg-type]
    # two release engineers, each on their own machine with only their key
    for name in ("targets-1", "targets-3"):
        elsewhere = tmp_path / name / "key.pem"
        elsewhere.parent.mkdir()
        shutil.copy(offline_key(repo, name), elsewhere)
        request = read_request(carried)
        # top-level targets (the product's delegation) and the product's release list
        assert request.sign(load_private_key(elsewhere)) == ["targets",
                                                            f"releases-{PRODUCT}"]
        write_request(carried, request)
    assert read_request(carried).ready
    added, staged = repo.import_request(read_request(carried))
    assert (added, staged.live) == (4, True)  # 2 signers x (targets, the product's list)
    assert is_live(repo, manifest)


def test_a_tampered_request_file_is_refused(repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "1.0.0", 1)
    doc = json.loads(repo.staged_path.read_bytes())
    name = next(iter(doc["target_files"]))
    manifest = json.loads(base64.b64decode(doc["target_files"][name]))
    manifest["release_counter"] = 9  # the reviewer would see 9, the devices get 1
    doc["target_files"][name] = base64.b64encode(json.dumps(manifest).encode()).decode()
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SigningError, match="does not match the targets metadata"):
        read_request(path)


def test_a_request_pinning_another_compact_manifest_is_refused(
        repo: Repository, tmp_path: Path) -> None:
    """Devices read the compact manifest a targets entry pins: a request whose pin is
    not the compact form of the manifest the signers review is refused, so that what
    they sign is what devices install."""
    publish(repo, tmp_path, "1.0.0", 1)
    doc = json.loads(repo.staged_path.read_bytes())
    name = next(iter(doc["target_files"]))
    listed = doc["delegated"][f"releases-{PRODUCT}"]["signed"]["targets"]
    pin = listed[name]["custom"]["compact"]
    assert pin["length"] < len(base64.b64decode(doc["target_files"][name]))
    pin["sha256"] = "0" * 64  # another compact manifest (e.g. another release's)
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SigningError, match="not its compact form"):
        read_request(path)


def test_a_products_release_list_naming_another_products_release_is_refused(
        repo: Repository, tmp_path: Path) -> None:
    """Each product's releases are listed in a role of their own: a request whose list
    names a release of another product (which devices of that product would never look
    up there, but a reviewer might take for this product's) is refused."""
    publish(repo, tmp_path, "1.0.0", 1)
    doc = json.loads(repo.staged_path.read_bytes())
    listed = doc["delegated"][f"releases-{PRODUCT}"]["signed"]["targets"]
    (entry,) = listed.values()
    listed["releases/other-product/1.0.0.json"] = entry
    path = tmp_path / "stray.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SigningError, match="not a release of its product"):
        read_request(path)


def test_import_of_another_request_is_refused(repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "1.0.0", 1)
    other = threshold_repo(tmp_path / "other")
    publish(other, tmp_path, "1.0.0", 1)
    with pytest.raises(SigningError, match="differs from the one staged"):
        repo.import_request(other.staged())  # type: ignore[arg-type]
    sign(other, "targets-1", "targets-2")
    publish(other, tmp_path, "1.1.0", 2)
    with pytest.raises(SigningError, match="differs from the one staged"):
        repo.import_request(other.staged())  # type: ignore[arg-type]


def test_forged_or_foreign_signatures_are_not_imported(
        repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "1.0.0", 1)
    request = repo.staged()
    assert request is not None and request.targets is not None
    outsider = generate_key()
    request.targets.sign(outsider, append=True)  # a key root does not list
    keyid = root_targets_keyid(repo)
    forged = request.targets.signatures[outsider.public_key.keyid]
    request.targets.signatures[keyid] = type(forged)(keyid, forged.signature)  # bad bytes
    added, staged = repo.import_request(request)
    assert (added, staged.live) == (0, False)


def root_targets_keyid(repo: Repository) -> str:
    root = Metadata[Root].from_bytes(repo.root_bytes()).signed
    return str(root.roles["targets"].keyids[0])


def test_a_key_the_request_does_not_need_is_refused(repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "1.0.0", 1)
    with pytest.raises(SigningError, match="not a key this request needs"):
        sign(repo, "root-1")  # a root key does not sign releases
    with pytest.raises(SigningError, match="not a key this request needs"):
        repo.sign(generate_key("ecdsa"))
    with pytest.raises(SigningError, match="nothing is waiting"):
        Repository.open(threshold_repo(tmp_path / "empty").path).sign(generate_key())


def test_online_keys_cannot_sign_a_release(repo: Repository, tmp_path: Path) -> None:
    """The publishing host holds snapshot and timestamp only: publishing stages, and no
    number of publishes, timestamp refreshes or reopenings makes the release live."""
    manifest = publish(repo, tmp_path, "1.0.0", 1)
    repo.refresh_timestamp()
    reopened = Repository.open(repo.path)
    for keyid in reopened.local_roles()["snapshot"] + reopened.local_roles()["timestamp"]:
        signer = reopened._local[keyid][1]  # what a thief of the host holds
        with pytest.raises(SigningError, match="not a key this request needs"):
            reopened.sign(signer)
    assert not is_live(reopened, manifest) and reopened.versions()["targets"] == 1


def test_single_key_setup_publishes_at_once(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    manifest = publish(repo, tmp_path, "1.0.0", 1)
    assert is_live(repo, manifest) and repo.staged() is None
    assert repo.local_roles()["targets"], "the single-key setup keeps targets on the host"


def test_a_go_live_cut_short_by_a_crash_is_finished_at_the_next_open(
        repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = publish(repo, tmp_path, "1.0.0", 1)
    sign(repo, "targets-1")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(Repository, "_write_snapshot_and_timestamp", crash)
    with pytest.raises(OSError, match="power cut"):
        sign(repo, "targets-2")
    monkeypatch.undo()
    assert repo.staged() is not None and not is_live(repo, manifest)
    reopened = Repository.open(repo.path)  # finishes the request whose thresholds are met
    assert is_live(reopened, manifest) and reopened.staged() is None
    assert parse_release_manifest(reopened.read_target(
        reopened.targets()[manifest.target_name])) == manifest


def test_publish_refuses_an_absurd_counter_jump_unless_told(
        tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    publish(repo, tmp_path, "1.0.0", 1)
    with pytest.raises(PublishError, match="allow-counter-jump"):
        publish(repo, tmp_path, "2.0.0", 2**53)
    publish_release(repo, image(tmp_path, "x.img", 3), product=PRODUCT, version="2.0.0",
                    release_counter=5_000_000, compatibility=["hw1"], zstd_level=3,
                    allow_counter_jump=True)


def test_keys_directory_holds_only_keys_of_its_roles(repo: Repository) -> None:
    stray = repo.online_keys_dir / "root-9.pem"
    shutil.copy(offline_key(repo, "root-1"), stray)
    with pytest.raises(RepositoryError, match="only targets, snapshot and timestamp"):
        Repository.open(repo.path)
    stray.unlink()
    (repo.online_keys_dir / "timestamp.pem").unlink()
    with pytest.raises(SigningError, match="holds 0 of the timestamp keys"):
        Repository.open(repo.path)


def test_key_setup_with_online_targets_threshold(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo", keys=KeySetup(
        targets=RoleKeys(2, 2), snapshot=RoleKeys(2, 2), timestamp=RoleKeys(3, 2)))
    manifest = publish(repo, tmp_path, "1.0.0", 1)
    assert is_live(repo, manifest), "two targets keys on the host meet the threshold"
    ts = json.loads((repo.metadata_dir / "timestamp.json").read_bytes())
    assert len(ts["signatures"]) == 3


def test_timestamp_cron_renews_snapshot_when_half_its_life_is_gone(tmp_path: Path) -> None:
    """With the targets keys offline, publishes are rare: the online host alone keeps
    snapshot fresh (targets are renewed by their signers: seeder renew)."""
    start = datetime(2030, 1, 1, tzinfo=UTC)
    repo = Repository.create(tmp_path / "repo", now=start, keys=KeySetup(
        targets=RoleKeys(1, 1), targets_online=False),
        expiry=ExpiryConfig(snapshot_s=1000, timestamp_s=100))
    repo.refresh_timestamp(now=start + timedelta(seconds=400))
    assert repo.versions()["snapshot"] == 1
    repo.refresh_timestamp(now=start + timedelta(seconds=600))
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 2, "timestamp": 3}
    assert repo.expirations()["snapshot"] == start + timedelta(seconds=1600)
