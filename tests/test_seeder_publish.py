"""Publishing: image -> zstd payload -> release manifest -> signed target.

Threats and mistakes covered: a release that does not reproduce the image, chunk hashes
that do not match the payload, rewriting a published version (devices could see two
different releases under one name), publishing a counter that devices would refuse as a
rollback, names that the trust core would refuse, and unbounded memory on big images.
"""

from __future__ import annotations

import os
import random
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import zstandard

from swarmota.manifest import (
    ReleaseManifest,
    choose_chunk_size,
    parse_release_manifest,
    release_target_name,
    sha256_hex,
)
from swarmota.seeder import (
    PublishError,
    Repository,
    RepositoryError,
    build_full_payload,
    publish_release,
    published_releases,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
MiB = 1024 * 1024


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


def publish(repo: Repository, image: Path, version: str = "1.0.0", counter: int = 1,
            **overrides: Any) -> ReleaseManifest:
    kwargs: dict[str, Any] = {"product": "acme-router", "version": version,
                              "release_counter": counter,
                              "compatibility": ["acme-router-hw1"], "zstd_level": 3}
    kwargs.update(overrides)
    return publish_release(repo, image, **kwargs)


def test_payload_decompresses_to_the_image(repo: Repository, tmp_path: Path) -> None:
    image = make_image(tmp_path / "image.img", 3 * MiB + 17)
    manifest = publish_release(repo, image, product="acme-router", version="1.0.0",
                               release_counter=1, compatibility=["acme-router-hw1"],
                               zstd_level=3, now=NOW)
    payload = manifest.full_payload
    stored = (repo.origin_dir / payload.path).read_bytes()
    assert payload.path == f"payloads/{sha256_hex(stored)}.zst"
    assert len(stored) == payload.size < manifest.image.size  # it did compress
    assert zstandard.frame_content_size(stored) == manifest.image.size
    restored = zstandard.ZstdDecompressor().decompress(stored)
    assert restored == image.read_bytes()
    assert manifest.image.size == len(restored)
    assert manifest.image.sha256 == sha256_hex(restored)
    assert (payload.kind, payload.encoding, manifest.update_type) == ("full", "zstd",
                                                                          "image")
    assert oct((repo.origin_dir / payload.path).stat().st_mode & 0o777) == "0o644"


def test_default_level_is_19_and_round_trips(repo: Repository, tmp_path: Path) -> None:
    image = make_image(tmp_path / "image.img", 1 * MiB)
    manifest = publish_release(repo, image, product="acme-router", version="1.0.0",
                               release_counter=1, compatibility=["hw1"])
    stored = (repo.origin_dir / manifest.full_payload.path).read_bytes()
    assert zstandard.ZstdDecompressor().decompress(stored) == image.read_bytes()


def test_chunk_hashes_match_the_payload(repo: Repository, tmp_path: Path) -> None:
    image = make_image(tmp_path / "image.img", 2 * MiB)
    manifest = publish(repo, image)
    payload = manifest.full_payload
    stored = (repo.origin_dir / payload.path).read_bytes()
    assert payload.chunk_size == choose_chunk_size(len(stored))
    assert payload.chunk_count == -(-len(stored) // payload.chunk_size)
    for index in range(payload.chunk_count):
        offset, length = payload.chunk_span(index)
        payload.verify_chunk(index, stored[offset:offset + length])
    payload.verify(stored)


def test_manifest_is_the_signed_target_and_round_trips(repo: Repository,
                                                       tmp_path: Path) -> None:
    image = make_image(tmp_path / "image.img", 1 * MiB)
    manifest = publish(repo, image, compatibility=["hw-a", "hw-b"])
    name = release_target_name("acme-router", "1.0.0")
    target = repo.targets()[name]
    data = repo.read_target(target)
    assert data == manifest.to_bytes()
    assert parse_release_manifest(data) == manifest
    assert parse_release_manifest(data).compatibility == ("hw-a", "hw-b")
    assert published_releases(repo, "acme-router") == {"1.0.0": manifest}
    assert repo.versions()["targets"] == 2


def test_identical_payloads_are_stored_once(repo: Repository, tmp_path: Path) -> None:
    image = make_image(tmp_path / "image.img", 1 * MiB)
    first = publish(repo, image, version="1.0.0", counter=1)
    second = publish(repo, image, version="1.0.1", counter=2)
    assert first.full_payload == second.full_payload
    name = Path(first.full_payload.path).name
    chunk_list = Path(first.compact().full_payload.chunk_list.path).name  # type: ignore[union-attr]
    assert sorted(os.listdir(repo.origin_dir / "payloads")) == sorted(
        [name, f"{name}.torrent", chunk_list])


def test_missing_image_is_refused(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="does not exist"):
        publish(repo, tmp_path / "nope.img")


def test_empty_image_is_refused(repo: Repository, tmp_path: Path) -> None:
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(PublishError, match="empty"):
        publish(repo, tmp_path / "empty.img")
    with pytest.raises(PublishError, match="not a regular file"):
        publish(repo, tmp_path)
    assert repo.targets() == {}


def test_republishing_a_version_with_another_image_is_refused(
    repo: Repository, tmp_path: Path
) -> None:
    publish(repo, make_image(tmp_path / "a.img", MiB, seed=1), version="1.0.0", counter=1)
    with pytest.raises(PublishError, match="already published with other content"):
        publish(repo, make_image(tmp_path / "b.img", MiB, seed=2), version="1.0.0",
                counter=1)
    with pytest.raises(PublishError, match="already published"):
        publish(repo, tmp_path / "a.img", version="1.0.0", counter=7)
    with pytest.raises(PublishError, match="hardware ids"):
        publish(repo, tmp_path / "a.img", version="1.0.0", counter=1,
                compatibility=["other-hw"])
    assert repo.versions()["targets"] == 2


def test_republishing_the_same_release_changes_nothing(repo: Repository,
                                                       tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.img", MiB)
    first = publish(repo, image)
    versions = repo.versions()
    again = publish(repo, image)
    assert again == first
    assert repo.versions() == versions


@pytest.mark.parametrize("counter", [1, 2])
def test_counter_not_higher_than_published_is_refused(repo: Repository, tmp_path: Path,
                                                      counter: int) -> None:
    image = make_image(tmp_path / "a.img", MiB)
    publish(repo, image, version="2.0.0", counter=2)
    with pytest.raises(PublishError, match="not higher than 2"):
        publish(repo, image, version="2.0.1", counter=counter)
    publish(repo, image, version="2.0.1", counter=3)
    # Counters are per product.
    publish(repo, image, version="1.0.0", counter=1, product="other-product")


@pytest.mark.parametrize("field, value", [
    ("product", "Acme Router"),
    ("product", "../etc"),
    ("product", ""),
    ("version", "1.0/../../x"),
    ("version", ".hidden"),
    ("compatibility", ["bad id with spaces"]),
    ("compatibility", []),
    ("compatibility", "acme-router-hw1"),
    ("release_counter", -1),
    ("zstd_level", 0),
    ("zstd_level", 23),
])
def test_invalid_release_fields_are_refused_before_any_work(
    repo: Repository, tmp_path: Path, field: str, value: Any
) -> None:
    image = make_image(tmp_path / "a.img", 64 * 1024)
    with pytest.raises(PublishError):
        publish(repo, image, **{field: value})
    assert repo.targets() == {}
    assert os.listdir(repo.origin_dir / "payloads") == []


def test_corrupt_published_manifest_is_a_repository_error(repo: Repository,
                                                          tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.img", MiB)
    publish(repo, image)
    repo.target_file_path(repo.targets()["releases/acme-router/1.0.0.json"]).write_bytes(b"{}")
    with pytest.raises(RepositoryError, match="corrupt"):
        publish(repo, image, version="2.0.0", counter=2)


def test_failed_publish_leaves_no_temporary_files(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(PublishError):
        build_full_payload(tmp_path / "missing.img", repo.origin_dir, zstd_level=3)
    assert os.listdir(repo.origin_dir / "payloads") == []


def test_big_image_is_streamed_with_bounded_memory(repo: Repository, tmp_path: Path) -> None:
    size = 48 * MiB
    image = tmp_path / "big.img"
    with open(image, "wb") as fh:
        block = random.Random(7).randbytes(MiB)
        for i in range(size // MiB):
            fh.write(block if i % 2 else bytes(MiB))
    tracemalloc.start()
    try:
        image_info, payload = build_full_payload(image, repo.origin_dir, zstd_level=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image_info.size == size
    assert peak < 8 * MiB, f"peak Python allocations {peak} bytes"
    assert payload.chunk_size == choose_chunk_size(payload.size)


# --- delta payloads -----------------------------------------------------------------------


def _v1_v2(tmp_path: Path) -> tuple[Path, Path]:
    from swarmota.demo import make_image as demo_image
    from swarmota.demo import mutate_image

    v1 = demo_image(512 * 1024, seed=21)
    v2 = mutate_image(v1, seed=22)
    (tmp_path / "v1.img").write_bytes(v1)
    (tmp_path / "v2.img").write_bytes(v2)
    return tmp_path / "v1.img", tmp_path / "v2.img"


def test_delta_payload_rebuilds_the_image_from_its_base(repo: Repository,
                                                         tmp_path: Path) -> None:
    from swarmota.peer.delta import apply_delta

    v1, v2 = _v1_v2(tmp_path)
    manifest = publish(repo, v2, bases=[v1])
    assert [p.kind for p in manifest.payloads] == ["full", "delta"]
    delta = manifest.delta_for(sha256_hex(v1.read_bytes()))
    assert delta is not None and delta.base is not None
    assert delta.base.size == v1.stat().st_size
    assert delta.encoding in ("bsdiff-zstd", "zstd-patch")
    stored = (repo.origin_dir / delta.path).read_bytes()
    assert delta.path == f"payloads/{sha256_hex(stored)}." + (
        "bsdz" if delta.encoding == "bsdiff-zstd" else "zpatch")
    assert len(stored) < manifest.full_payload.size
    assert delta.chunk_size == choose_chunk_size(len(stored))
    for index in range(delta.chunk_count):
        offset, length = delta.chunk_span(index)
        delta.verify_chunk(index, stored[offset:offset + length])
    delta.verify(stored)
    rebuilt = apply_delta(delta.encoding, v1.read_bytes(), stored,
                          target_size=manifest.image.size)
    assert rebuilt == v2.read_bytes()
    assert sha256_hex(rebuilt) == manifest.image.sha256
    assert oct((repo.origin_dir / delta.path).stat().st_mode & 0o777) == "0o644"
    # The signed target is this manifest, delta included.
    target = repo.targets()[release_target_name("acme-router", "1.0.0")]
    assert parse_release_manifest(repo.read_target(target)) == manifest


def test_republishing_with_the_same_bases_changes_nothing(repo: Repository,
                                                          tmp_path: Path) -> None:
    v1, v2 = _v1_v2(tmp_path)
    first = publish(repo, v2, bases=[v1])
    versions = repo.versions()
    assert publish(repo, v2, bases=[v1]) == first
    assert repo.versions() == versions
    with pytest.raises(PublishError, match="already published with other content"):
        publish(repo, v2)


def test_delta_summaries_and_progress_are_reported(repo: Repository,
                                                   tmp_path: Path) -> None:
    from swarmota.seeder.publish import DeltaSummary

    v1, v2 = _v1_v2(tmp_path)
    summaries: list[DeltaSummary] = []
    messages: list[str] = []
    manifest = publish(repo, v2, bases=[v1], on_delta=summaries.append,
                       progress=messages.append)
    [summary] = summaries
    assert summary.base_path == v1
    assert summary.payload == manifest.payloads[1]
    assert summary.sizes_by_engine[summary.payload.encoding] == summary.payload.size
    assert len(summary.sizes_by_engine) == 2
    assert any("started" in m for m in messages)
    # One bar for the whole publish: image, two engines for the one base, signing.
    assert messages[0].startswith("[--------------------] 0/4 compressing")
    assert messages[-1].startswith("[####################] 4/4 signed releases/")
    assert [m.split()[1] for m in messages if "bytes in" in m] == ["2/4", "3/4"]


def test_bad_delta_bases_are_refused_before_any_work(repo: Repository,
                                                     tmp_path: Path) -> None:
    v1, v2 = _v1_v2(tmp_path)
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "v1-copy.img").write_bytes(v1.read_bytes())
    (tmp_path / "v2-copy.img").write_bytes(v2.read_bytes())
    cases = [
        ([tmp_path / "missing.img"], "does not exist"),
        ([tmp_path / "empty.img"], "empty"),
        ([tmp_path / "v2-copy.img"], "identical to the image"),
        ([v1, v1], "given twice|same image"),
        ([v1, tmp_path / "v1-copy.img"], "same image"),
        ([tmp_path], "not a regular file"),
    ]
    for bases, message in cases:
        with pytest.raises(PublishError, match=message):
            publish(repo, v2, bases=bases)
    assert repo.targets() == {}
    assert os.listdir(repo.origin_dir / "payloads") == []


def test_publishing_again_as_another_update_type_or_critical_is_refused(tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo")
    image = tmp_path / "fw.bin"
    image.write_bytes(b"firmware" * 1000)
    kw = {"product": "acme-router", "version": "3.0.0", "release_counter": 3,
          "compatibility": ["hw1"], "zstd_level": 3}
    first = publish_release(repo, image, update_type="module", component="modem-fw", **kw)
    again = publish_release(repo, image, update_type="module", component="modem-fw", **kw)
    assert again == first
    for other in ({"update_type": "app", "component": "modem-fw"},
                  {"update_type": "module", "component": "modem-fw", "critical": True},
                  {}):
        with pytest.raises(PublishError, match="update type, component, critical"):
            publish_release(repo, image, **other, **kw)  # type: ignore[arg-type]
