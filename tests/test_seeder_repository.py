"""The TUF repository: creation, signing, crash-safety, and acceptance by python-tuf.

Threats covered: a stolen origin cannot forge metadata (keys stay in the repository),
tampered or expired metadata and tampered target files are refused by a real TUF
client, a crash mid-publish never corrupts the committed state, concurrent publishers
do not lose releases.
"""

from __future__ import annotations

import json
import os
import random
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater

from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import parse_release_manifest, release_target_name
from swarmota.seeder import (
    ExpiryConfig,
    OriginApp,
    PublishError,
    Repository,
    RepositoryError,
    publish_release,
    serve_origin,
)
from swarmota.seeder.keys import generate_key, write_private_key
from swarmota.seeder.staging import SigningRequest

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def make_image(path: Path, size: int, seed: int = 1) -> Path:
    """Partly compressible bytes: random blocks interleaved with repeated text."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(4096)
        out += b"swarmota image filler " * 200
    path.write_bytes(bytes(out[:size]))
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.create(tmp_path / "repo", now=NOW)


# --- creation and opening -------------------------------------------------------------


def test_create_writes_the_documented_layout(repo: Repository) -> None:
    path = repo.path
    assert (path / "offline" / "root.pem").is_file()
    for role in ("targets", "snapshot", "timestamp"):
        assert (path / "keys" / f"{role}.pem").is_file()
    assert (path / "repo.json").is_file()
    meta = path / "origin" / "metadata"
    assert sorted(os.listdir(meta)) == ["1.root.json", "1.snapshot.json", "1.targets.json",
                                        "root.json", "timestamp.json"]
    assert (meta / "root.json").read_bytes() == (meta / "1.root.json").read_bytes()
    assert repo.root_bytes() == (meta / "root.json").read_bytes()
    assert (path / "origin" / "targets").is_dir() and (path / "origin" / "payloads").is_dir()
    assert repo.origin_dir == path / "origin" and repo.metadata_dir == meta
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}
    assert repo.targets() == {}


def test_root_uses_consistent_snapshots_and_one_ed25519_key_per_role(
    repo: Repository,
) -> None:
    root = Metadata.from_bytes(repo.root_bytes()).signed
    assert root.consistent_snapshot is True
    keyids = set()
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert root.roles[role].threshold == 1
        assert len(root.roles[role].keyids) == 1
        keyid = root.roles[role].keyids[0]
        assert root.keys[keyid].keytype == "ed25519"
        keyids.add(keyid)
    assert len(keyids) == 4  # no key shared between roles


def test_open_reads_back_what_create_wrote(repo: Repository) -> None:
    reopened = Repository.open(repo.path)
    assert reopened.root_bytes() == repo.root_bytes()
    assert reopened.versions() == repo.versions()
    assert reopened.expiry == ExpiryConfig()


def test_create_refuses_an_existing_non_empty_directory(repo: Repository) -> None:
    with pytest.raises(RepositoryError, match="not an empty directory"):
        Repository.create(repo.path)
    assert Repository.open(repo.path).versions()["targets"] == 1  # untouched


def test_create_refuses_a_file_and_accepts_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(RepositoryError):
        Repository.create(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    Repository.create(tmp_path / "empty")
    Repository.open(tmp_path / "empty")


def test_private_keys_are_readable_only_by_their_owner(repo: Repository) -> None:
    for key in [repo.path / "offline" / "root.pem",
                *(repo.path / "keys" / f"{r}.pem" for r in ("targets", "snapshot",
                                                            "timestamp"))]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    for directory in ("offline", "keys"):
        assert stat.S_IMODE((repo.path / directory).stat().st_mode) == 0o700


def test_publishing_does_not_need_the_offline_root_key(repo: Repository) -> None:
    (repo.path / "offline" / "root.pem").unlink()
    reopened = Repository.open(repo.path)
    reopened.add_target("releases/acme/1.json", b"hello")
    assert "releases/acme/1.json" in reopened.targets()


def test_open_of_an_uninitialised_directory_is_a_repository_error(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="not an initialised"):
        Repository.open(tmp_path)
    with pytest.raises(RepositoryError):
        Repository.open(tmp_path / "missing")


@pytest.mark.parametrize("content", [
    b"{not json",
    b"[]",
    b'{"format": "something-else", "format_version": 1, "expiry": {}}',
    b'{"format": "swarmota-seeder-repository", "format_version": 99, "expiry": {}}',
    b'{"format": "swarmota-seeder-repository", "format_version": 1, "expiry": {"root_s": 1}}',
    b'{"format": "swarmota-seeder-repository", "format_version": 1, "expiry": '
    b'{"root_s": 1, "targets_s": 1, "snapshot_s": 1, "timestamp_s": -5}}',
    b"\xff\xfe",
])
def test_corrupt_repo_json_is_a_repository_error(repo: Repository, content: bytes) -> None:
    (repo.path / "repo.json").write_bytes(content)
    with pytest.raises(RepositoryError, match=r"repo\.json"):
        Repository.open(repo.path)


def test_corrupt_online_key_is_a_repository_error(repo: Repository) -> None:
    (repo.path / "keys" / "snapshot.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nxx\n")
    with pytest.raises(RepositoryError, match=r"snapshot\.pem"):
        Repository.open(repo.path)


def test_online_key_not_trusted_by_root_is_refused(repo: Repository) -> None:
    write_private_key(repo.path / "keys" / "targets.pem", generate_key())
    with pytest.raises(RepositoryError, match="not a targets key"):
        Repository.open(repo.path)


def test_tampered_committed_metadata_is_detected(repo: Repository) -> None:
    path = repo.metadata_dir / "1.targets.json"
    doc = json.loads(path.read_bytes())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    path.write_bytes(json.dumps(doc).encode())
    with pytest.raises(RepositoryError, match=r"1\.targets\.json"):
        Repository.open(repo.path)


def test_timestamp_signed_by_an_unknown_key_is_detected(repo: Repository) -> None:
    md = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    md.sign(generate_key())
    (repo.metadata_dir / "timestamp.json").write_bytes(md.to_bytes())
    with pytest.raises(RepositoryError, match="signature"):
        repo.targets()


# --- publishing metadata ----------------------------------------------------------------


def test_a_release_signs_its_products_list_snapshot_and_timestamp(
    repo: Repository,
) -> None:
    """A product's first release delegates the product's list to the targets keys (new
    top-level targets); later ones re-sign that list alone, never the other products'."""
    repo.add_target("releases/acme/1.json", b"one", now=NOW)
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2,
                               "releases-acme": 1}
    repo.add_target("releases/acme/2.json", b"two", now=NOW)
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 3, "timestamp": 3,
                               "releases-acme": 2}
    repo.add_target("releases/other/1.json", b"other", now=NOW)
    repo.add_target("notes/readme.txt", b"not a release", now=NOW)
    assert repo.versions() == {"root": 1, "targets": 4, "snapshot": 5, "timestamp": 5,
                               "releases-acme": 2, "releases-other": 1}
    assert set(repo.targets()) == {"releases/acme/1.json", "releases/acme/2.json",
                                   "releases/other/1.json", "notes/readme.txt"}
    top = Metadata[Targets].from_bytes(
        (repo.metadata_dir / "4.targets.json").read_bytes()).signed
    assert set(top.targets) == {"notes/readme.txt"}
    assert top.delegations is not None and top.delegations.roles is not None
    acme = top.delegations.roles["releases-acme"]
    assert acme.paths == ["releases/acme/*"] and acme.terminating
    assert acme.keyids == repo.root().roles["targets"].keyids
    listed = Metadata[Targets].from_bytes(
        (repo.metadata_dir / "2.releases-acme.json").read_bytes()).signed
    assert set(listed.targets) == {"releases/acme/1.json", "releases/acme/2.json"}
    for version in (1, 2, 3):  # old versions stay for clients mid-update
        assert (repo.metadata_dir / f"{version}.snapshot.json").is_file()
    assert (repo.metadata_dir / "1.releases-acme.json").is_file()
    timestamp = Metadata[Timestamp].from_bytes(
        (repo.metadata_dir / "timestamp.json").read_bytes()).signed
    assert timestamp.expires == NOW + timedelta(days=1)


def test_target_files_are_hash_prefixed_and_verifiable(repo: Repository) -> None:
    repo.add_target("releases/acme/1.json", b"content")
    target = repo.targets()["releases/acme/1.json"]
    sha = target.hashes["sha256"]
    path = repo.origin_dir / "targets" / "releases" / "acme" / f"{sha}.1.json"
    assert repo.target_file_path(target) == path
    assert path.read_bytes() == b"content"
    assert repo.read_target(target) == b"content"
    path.write_bytes(b"tampered")
    with pytest.raises(RepositoryError, match="corrupt"):
        repo.read_target(target)


def test_published_target_cannot_be_replaced_with_other_content(repo: Repository) -> None:
    repo.add_target("releases/acme/1.json", b"original")
    repo.add_target("releases/acme/1.json", b"original")  # same bytes: nothing to do
    assert repo.versions()["targets"] == 2
    with pytest.raises(PublishError, match="already published"):
        repo.add_target("releases/acme/1.json", b"replacement")
    assert repo.read_target(repo.targets()["releases/acme/1.json"]) == b"original"


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd", "releases/../x", ".hidden",
                                  "releases//x", "releases/.x", "", "a\\b", "x/"])
def test_unsafe_target_names_are_refused(repo: Repository, name: str) -> None:
    with pytest.raises(PublishError, match="invalid target name"):
        repo.add_target(name, b"x")
    assert repo.versions()["targets"] == 1


def test_refresh_timestamp_signs_only_a_new_timestamp(repo: Repository) -> None:
    repo.add_target("releases/acme/1.json", b"one", now=NOW)
    later = NOW + timedelta(hours=5)
    repo.refresh_timestamp(now=later)
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 3,
                               "releases-acme": 1}
    ts = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    assert ts.signed.expires == later + timedelta(days=1)
    assert ts.signed.snapshot_meta.version == 2
    repo.refresh_timestamp(expires_in_s=60, now=later)
    ts = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    assert ts.signed.expires == later + timedelta(seconds=60)
    assert ts.signed.version == 4


def test_refresh_timestamp_can_make_expired_metadata_for_tests(repo: Repository) -> None:
    repo.refresh_timestamp(expires_in_s=-3600, now=NOW)
    ts = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    assert ts.signed.expires == NOW - timedelta(hours=1)


def test_expiry_settings_persist_and_apply(tmp_path: Path) -> None:
    expiry = ExpiryConfig(root_s=1000, targets_s=500, snapshot_s=200, timestamp_s=100)
    Repository.create(tmp_path / "r", expiry=expiry, now=NOW)
    repo = Repository.open(tmp_path / "r")
    assert repo.expiry == expiry
    repo.add_target("a.json", b"a", now=NOW)
    for role, seconds in (("2.targets", 500), ("2.snapshot", 200), ("timestamp", 100),
                          ("1.root", 1000)):
        signed = Metadata.from_bytes((repo.metadata_dir / f"{role}.json").read_bytes()).signed
        assert signed.expires == NOW + timedelta(seconds=seconds), role


def test_expiry_config_refuses_non_positive_periods() -> None:
    with pytest.raises(ValueError):
        ExpiryConfig(timestamp_s=0)


def test_crash_leftovers_are_skipped_never_overwritten(repo: Repository) -> None:
    # A publisher crashed after writing 2.targets.json and 2.snapshot.json but before
    # timestamp.json: the committed state is still version 1, and the orphans (which a
    # CDN may have cached) keep their bytes.
    orphan_targets = repo.metadata_dir / "2.targets.json"
    orphan_snapshot = repo.metadata_dir / "2.snapshot.json"
    orphan_targets.write_bytes(b"orphan")
    orphan_snapshot.write_bytes(b"orphan")
    assert repo.versions()["targets"] == 1
    repo.add_target("releases/acme/1.json", b"one")
    assert repo.versions() == {"root": 1, "targets": 3, "snapshot": 3, "timestamp": 2,
                               "releases-acme": 1}
    assert orphan_targets.read_bytes() == b"orphan"
    assert orphan_snapshot.read_bytes() == b"orphan"


def test_concurrent_publishers_do_not_lose_releases(repo: Repository) -> None:
    errors: list[BaseException] = []

    def publisher(index: int) -> None:
        try:
            mine = Repository.open(repo.path)  # its own lock file descriptor
            for n in range(5):
                mine.add_target(f"releases/p{index}/{n}.json", f"{index}-{n}".encode())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(repo.targets()) == 15
    versions = repo.versions()
    assert versions["timestamp"] == 16
    # one delegation per product, each product's list re-signed by each of its releases
    assert versions["targets"] == 4
    assert [versions[f"releases-p{i}"] for i in range(3)] == [5, 5, 5]


def test_opening_while_a_publisher_takes_its_request_live_does_not_replay_it(
        repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """Open reads staged.json before it takes the lock: a request it saw ready may be
    live (and gone) by the time it holds the lock, and must not be taken live twice."""
    import swarmota.seeder.repository as repository_module
    from swarmota.seeder.staging import read_request as real_read_request

    opener_read_staged = threading.Event()
    real_go_live = Repository._go_live

    def reading(path: Path) -> SigningRequest:
        request = real_read_request(path)
        if threading.current_thread().name == "opener":
            opener_read_staged.set()
        return request

    def pausing_go_live(self: Repository, request: SigningRequest, when: datetime) -> None:
        if threading.current_thread().name == "publisher":
            opener = threading.Thread(target=open_repo, name="opener")
            opener.start()
            assert opener_read_staged.wait(10), "the opener never read staged.json"
            started.append(opener)
        real_go_live(self, request, when)

    errors: list[BaseException] = []
    started: list[threading.Thread] = []

    def open_repo() -> None:
        try:
            Repository.open(repo.path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    monkeypatch.setattr(repository_module, "read_request", reading)
    monkeypatch.setattr(Repository, "_go_live", pausing_go_live)
    publisher = threading.Thread(
        target=lambda: repo.add_target("releases/a.json", b"a"), name="publisher")
    publisher.start()
    publisher.join(30)
    assert started, "the publisher never went live"
    started[0].join(30)
    assert errors == []
    assert repo.versions()["targets"] == 2
    assert repo.versions()["timestamp"] == 2  # went live once, not replayed
    assert not repo.staged_path.exists()


# --- acceptance by python-tuf's client over HTTP -----------------------------------------


class HttpxFetcher(FetcherInterface):
    """Minimal blocking httpx fetcher for python-tuf (the product one lives in peer/)."""

    def __init__(self) -> None:
        self._client = httpx.Client(timeout=10.0)

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self._client.send(self._client.build_request("GET", url), stream=True)
        if response.status_code != 200:
            response.close()
            raise tuf_exceptions.DownloadHTTPError(f"GET {url}: {response.status_code}",
                                                   response.status_code)
        return self._chunks(response)

    @staticmethod
    def _chunks(response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(65536)
        finally:
            response.close()

    def close(self) -> None:
        self._client.close()


def _updater(repo: Repository, base_url: str, workdir: Path, fetcher: HttpxFetcher) -> Updater:
    (workdir / "metadata").mkdir(parents=True, exist_ok=True)
    (workdir / "downloads").mkdir(parents=True, exist_ok=True)
    return Updater(
        metadata_dir=str(workdir / "metadata"),
        metadata_base_url=f"{base_url}/metadata/",
        target_dir=str(workdir / "downloads"),
        target_base_url=f"{base_url}/targets/",
        fetcher=fetcher,
        bootstrap=repo.root_bytes(),
    )


async def test_python_tuf_client_accepts_a_published_release_over_http(
    tmp_path: Path,
) -> None:
    repo = Repository.create(tmp_path / "repo")
    image = make_image(tmp_path / "image.img", 1024 * 1024 + 123)
    manifest = publish_release(repo, image, product="acme-router", version="2.0.0",
                               release_counter=2, compatibility=["acme-router-hw1"],
                               zstd_level=3)
    app = OriginApp(repo.origin_dir)
    name = release_target_name("acme-router", "2.0.0")

    def client_session() -> bytes:
        fetcher = HttpxFetcher()
        try:
            updater = _updater(repo, base_url, tmp_path / "device", fetcher)
            updater.refresh()
            info = updater.get_targetinfo(name)
            assert info is not None
            assert updater.get_targetinfo("releases/acme-router/9.9.9.json") is None
            path = updater.download_target(info)
            with open(path, "rb") as fh:
                return fh.read()
        finally:
            fetcher.close()

    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(serve_origin, app, ListenConfig("127.0.0.1", 0))
        data = await trio.to_thread.run_sync(client_session)

        # The manifest it names is the one published, and the payload it names is there.
        assert parse_release_manifest(data) == manifest
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{base_url}/{manifest.full_payload.path}")
        assert response.status_code == 200
        manifest.full_payload.verify(response.content)

        # A later refresh of the timestamp (cron) is picked up by the same device.
        repo.refresh_timestamp()
        await trio.to_thread.run_sync(client_session)
        nursery.cancel_scope.cancel()
    stats = app.statistics()
    assert stats.bytes_metadata > 0 and stats.bytes_targets == 2 * len(data)
    assert stats.bytes_payloads == manifest.full_payload.size


async def test_python_tuf_client_refuses_expired_timestamp_and_tampered_manifest(
    tmp_path: Path,
) -> None:
    repo = Repository.create(tmp_path / "repo")
    repo.add_target("releases/acme/1.json", b'{"fake": "manifest"}\n')
    target = repo.targets()["releases/acme/1.json"]
    app = OriginApp(repo.origin_dir)

    def refresh_and_download(workdir: Path) -> None:
        fetcher = HttpxFetcher()
        try:
            updater = _updater(repo, base_url, workdir, fetcher)
            updater.refresh()
            info = updater.get_targetinfo("releases/acme/1.json")
            assert info is not None
            updater.download_target(info)
        finally:
            fetcher.close()

    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(serve_origin, app, ListenConfig("127.0.0.1", 0))

        # A compromised origin swaps the manifest: the signed hash no longer matches.
        path = repo.target_file_path(target)
        original = path.read_bytes()
        path.write_bytes(original.replace(b"fake", b"evil"))
        with pytest.raises(tuf_exceptions.LengthOrHashMismatchError):
            await trio.to_thread.run_sync(refresh_and_download, tmp_path / "d1")
        path.write_bytes(original)
        await trio.to_thread.run_sync(refresh_and_download, tmp_path / "d2")

        # A freeze attack (stale metadata replayed forever) ends when timestamp expires.
        repo.refresh_timestamp(expires_in_s=-60)
        with pytest.raises(tuf_exceptions.ExpiredMetadataError):
            await trio.to_thread.run_sync(refresh_and_download, tmp_path / "d3")
        nursery.cancel_scope.cancel()


def test_expirations_report_each_role(repo: Repository) -> None:
    assert repo.expirations() == {
        "root": NOW + timedelta(days=365),
        "targets": NOW + timedelta(days=90),
        "snapshot": NOW + timedelta(days=30),
        "timestamp": NOW + timedelta(days=1),
    }
