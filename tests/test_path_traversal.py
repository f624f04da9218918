"""Path traversal through any remote-controlled name is impossible by construction.

Every name a remote party controls and that becomes a filesystem path is checked twice:
by a strict pattern where it is parsed (release manifest, tracker answer, request path,
target name), and again where the path is built (``infra.fsio.safe_child`` and the
origin's containment check). Each test feeds one entry point hostile names (``..``,
absolute paths, ``a/../../b``, backslashes, NUL, unicode lookalikes of dots and slashes,
very long names) and asserts a typed refusal or a path inside the intended directory.

Where remote names meet the filesystem:

- device: component name -> ``STATE/components/<name>`` (manifest pattern, then
  ``ComponentStore.directory``); image hash -> ``components/<name>/v-<sha256>``;
  payload hash -> ``STATE/downloads/<sha256>`` (manifest pattern, then
  ``PayloadWorkdir``); product and version (tracker offer, manifest) -> the TUF target
  name ``releases/<product>/<version>.json`` (a URL path, downloaded to a fixed scratch
  file); the torrent's file name: never used (the device stores the payload under its
  own fixed name, and the torrent must carry the signed info-hash, which covers the name);
- origin: the request path -> a file under the served root;
- seeder: target names -> ``origin/targets/...``; a torrent's file name must equal the
  payload file it sits beside;
- tracker: device ids, products, versions and labels only go to SQLite, never to a path.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import urllib.parse
from dataclasses import replace
from pathlib import Path

import libtorrent as lt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmota.demo import make_image
from swarmota.infra.fsio import SAFE_NAME_RE, UnsafeNameError, safe_child
from swarmota.manifest import (
    ManifestFormatError,
    Payload,
    parse_release_manifest,
    release_target_name,
)
from swarmota.peer.components import ComponentStore, InstalledVersion
from swarmota.peer.download import PayloadWorkdir
from swarmota.peer.errors import DownloadFailed, VerifyFailed
from swarmota.peer.swarm import TorrentFile, make_torrent, read_torrent
from swarmota.peer.tracker_client import parse_checkin_answer
from swarmota.seeder.errors import PublishError
from swarmota.seeder.origin import OriginApp, split_request_path
from swarmota.seeder.repository import validate_target_name
from swarmota.seeder.seeding import _Found, _read_torrent
from tests.test_manifest import make_manifest

PATHS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])

HOSTILE_NAMES = [
    "..", ".", "", " ", "../x", "a/../../b", "../../../../etc/passwd", "/etc/passwd", "/",
    "a/b", "a\\..\\..\\b", "..\\x", "C:\\Windows", "a\x00b", "\x00", "..\x00", ".hidden",
    "\u2024\u2024", "\u2024\u2024/x", "\uff0e\uff0e", "\uff0e\uff0e\uff0fetc",
    "\u2025", "\u2215etc\u2215passwd", "\u202e..", "a\nb", "a\rb", "%2e%2e", "%2e%2e%2fx",
    "..%2f..%2fx", "~root", "x" * 129, "x" * 4096, "a/" * 40 + "b", "v-../../x",
]
pieces = st.sampled_from(["..", ".", "a", "b", "/", "\\", "\x00", "\u2024", "\uff0e", "\uff0f",
                          "\u2215", "%2e", "%2f", "-", "_"])
hostile_names = (st.sampled_from(HOSTILE_NAMES)
                 | st.lists(pieces, min_size=1, max_size=8).map("".join)
                 | st.text(max_size=300))


def assert_inside(path: Path, directory: Path) -> None:
    """``path`` is strictly inside ``directory``, lexically and after resolving."""
    absolute, root = os.path.abspath(path), os.path.abspath(directory)
    assert os.path.commonpath([absolute, root]) == root and absolute != root
    assert Path(path).resolve().is_relative_to(Path(directory).resolve())


# --- the shared check ------------------------------------------------------------------------

@PATHS
@given(name=hostile_names)
def test_safe_child_refuses_every_name_that_could_leave_its_directory(
        tmp_path: Path, name: str) -> None:
    try:
        path = safe_child(tmp_path, name)
    except UnsafeNameError:
        return
    assert SAFE_NAME_RE.fullmatch(name) and name not in (".", "..")
    assert path.parent == tmp_path
    assert_inside(path, tmp_path)


# --- device: component names and versions (from the signed manifest) ------------------------

def _component_manifest(component: object) -> bytes:
    doc = json.loads(replace(make_manifest(), update_type="module",
                             component="modem-fw").to_bytes())
    doc["component"] = component
    return json.dumps(doc).encode()


@PATHS
@given(name=hostile_names)
def test_component_name_with_dot_dot_cannot_leave_the_components_directory(
        tmp_path: Path, name: str) -> None:
    store = ComponentStore(tmp_path / "components")
    try:
        parsed = parse_release_manifest(_component_manifest(name)).component
    except ManifestFormatError:
        parsed = None
    else:
        assert parsed is not None
        assert_inside(store.directory(parsed), store.root)
    try:  # even past the parser (defence in depth), the store refuses it
        directory = store.directory(name)
    except VerifyFailed:
        assert parsed is None
        return
    assert_inside(directory, store.root)
    assert directory.parent == store.root


def test_component_named_dot_dot_is_refused_by_parser_and_store(tmp_path: Path) -> None:
    store = ComponentStore(tmp_path / "components")
    for name in ("..", "../etc", "\uff0e\uff0e", "a/../../b"):
        with pytest.raises(ManifestFormatError, match="component"):
            parse_release_manifest(_component_manifest(name))
        with pytest.raises(VerifyFailed, match="component name refused"):
            store.directory(name)
        with pytest.raises(VerifyFailed):
            store.begin_write(name, 10)
    assert not (tmp_path / "etc").exists() and list(tmp_path.iterdir()) == []


_versions = itertools.count()


@PATHS
@given(sha=hostile_names | st.just("ab" * 32))
def test_component_version_hash_cannot_name_a_file_outside_its_component(
        tmp_path: Path, sha: str) -> None:
    store = ComponentStore(tmp_path / f"components-{next(_versions)}")
    directory = store.directory("modem-fw")
    directory.mkdir(parents=True)
    (directory / "incoming").write_bytes(b"new firmware")
    try:
        store.switch("modem-fw", InstalledVersion("2.0.0", 2, sha, 12))
    except VerifyFailed:
        assert (directory / "incoming").exists()  # refused before anything moved
        return
    (installed,) = directory.glob("v-*")
    assert_inside(installed, directory)
    assert os.readlink(directory / "current") == installed.name


# --- device: payload work areas (payload hash from the signed manifest) ----------------------

@PATHS
@given(sha=hostile_names)
def test_payload_hash_cannot_lead_the_download_work_area_out_of_downloads(
        tmp_path: Path, sha: str) -> None:
    genuine = make_manifest()
    doc = json.loads(genuine.to_bytes())
    doc["payloads"][0]["sha256"] = sha
    with contextlib.suppress(ManifestFormatError):
        payload = parse_release_manifest(json.dumps(doc).encode()).payloads[0]
        assert payload.path == f"payloads/{payload.sha256}.zst"
        assert_inside(PayloadWorkdir(tmp_path, payload).path, tmp_path)
    hostile = Payload(kind="full", encoding="zstd", size=1, sha256=sha, chunk_size=16384,
                      chunks=("a" * 64,))
    try:
        work = PayloadWorkdir(tmp_path / "downloads", hostile)
    except VerifyFailed:
        return
    assert_inside(work.path, tmp_path / "downloads")
    assert_inside(work.part, tmp_path / "downloads")


# --- device: what the tracker names (product, version, target) --------------------------------

@PATHS
@given(product=hostile_names | st.just("acme"), version=hostile_names | st.just("2.0"),
       target=hostile_names | st.just("releases/acme/2.0.json"))
def test_tracker_offer_cannot_name_a_target_outside_the_releases_tree(
        product: str, version: str, target: str) -> None:
    answer = {"release": {"product": product, "version": version, "release_counter": 2,
                          "target": target}, "poll_after_s": 60}
    try:
        offer, _ = parse_checkin_answer(answer)
    except DownloadFailed:
        with contextlib.suppress(ManifestFormatError):
            assert release_target_name(product, version) != target
        return
    assert offer is not None
    prefix, product_part, file_part = offer.target.split("/")
    assert prefix == "releases" and file_part.endswith(".json")
    for part in (product_part, file_part):
        assert SAFE_NAME_RE.fullmatch(part)
    scratch = Path("/srv/trust")
    assert_inside(scratch / offer.target, scratch)


# --- origin: request paths -------------------------------------------------------------------

@pytest.fixture
def origin_tree(tmp_path: Path) -> tuple[OriginApp, Path, set[int]]:
    """An origin root with a few files, a secret beside it and a symlink leading out."""
    root = tmp_path / "origin"
    (root / "metadata").mkdir(parents=True)
    (root / "payloads").mkdir()
    (root / "metadata" / "timestamp.json").write_text("{}")
    (root / "payloads" / ("ab" * 32 + ".zst")).write_bytes(b"payload")
    (tmp_path / "secret").write_text("private key")
    os.symlink(tmp_path / "secret", root / "payloads" / "leak")
    os.symlink("../../secret", root / "metadata" / "leak2")
    inside = {p.stat().st_ino for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    return OriginApp(root), tmp_path / "secret", inside


request_segments = st.sampled_from(["..", ".", "", "metadata", "payloads", "timestamp.json",
                                    "ab" * 32 + ".zst", "leak", "leak2", "secret", "%2e%2e",
                                    "%2f", "..%2f", "\x00", "\\..", "\u2024\u2024",
                                    "\uff0e\uff0e", "..\\secret", "origin", "x" * 300])
request_paths = (st.lists(request_segments, max_size=8).map(lambda s: "/" + "/".join(s))
                 | hostile_names | st.sampled_from(HOSTILE_NAMES).map(lambda n: "/" + n))


@PATHS
@given(path=request_paths)
def test_origin_request_path_cannot_reach_a_file_outside_the_origin_tree(
        origin_tree: tuple[OriginApp, Path, set[int]], path: str) -> None:
    app, secret, inside = origin_tree
    for candidate in (path, urllib.parse.unquote(path)):  # as sent, and decoded once more
        segments = split_request_path(candidate)
        if segments is None:
            continue
        assert all(s not in (".", "..") and "/" not in s and "\x00" not in s
                   for s in segments)
        opened = app._open(segments)
        if opened is None:
            continue
        fd, info = opened
        os.close(fd)
        assert info.st_ino in inside and info.st_ino != secret.stat().st_ino


def test_origin_refuses_dot_dot_and_symlinks_leading_out(
        origin_tree: tuple[OriginApp, Path, set[int]]) -> None:
    app, _, _ = origin_tree
    for path in ("/../secret", "/metadata/../../secret", "/payloads/leak", "/metadata/leak2",
                 "/%2e%2e/secret", "/\u2024\u2024/secret"):
        segments = split_request_path(urllib.parse.unquote(path))
        assert segments is None or app._open(segments) is None
    opened = app._open(("metadata", "timestamp.json"))  # positive control
    assert opened is not None
    os.close(opened[0])


# --- seeder: target names ----------------------------------------------------------------------

@PATHS
@given(name=hostile_names | st.lists(hostile_names, min_size=1, max_size=4).map("/".join))
def test_target_name_of_a_release_cannot_leave_the_targets_directory(
        tmp_path: Path, name: str) -> None:
    try:
        validate_target_name(name)
    except PublishError:
        return
    assert all(SAFE_NAME_RE.fullmatch(part) for part in name.split("/"))
    assert_inside(tmp_path / "targets" / name, tmp_path / "targets")


@PATHS
@given(product=hostile_names | st.just("acme"), version=hostile_names | st.just("2.0"))
def test_release_product_and_version_cannot_leave_the_releases_directory(
        tmp_path: Path, product: str, version: str) -> None:
    try:
        name = release_target_name(product, version)
    except ManifestFormatError:
        return
    validate_target_name(name)
    assert_inside(tmp_path / "targets" / name, tmp_path / "targets" / "releases")


# --- torrents: the file name inside a torrent from the origin ----------------------------------

@pytest.fixture(scope="module")
def genuine_torrent(tmp_path_factory: pytest.TempPathFactory) -> tuple[TorrentFile, Path]:
    payloads = tmp_path_factory.mktemp("payloads")
    payload = payloads / ("cd" * 32 + ".zst")
    payload.write_bytes(make_image(40 * 1024, seed=9))
    return make_torrent(payload, piece_size_bytes=16 * 1024), payload


def _renamed_torrent(torrent: TorrentFile, name: str) -> bytes:
    doc = lt.bdecode(torrent.data)
    info = doc[b"info"]
    raw = name.encode("utf-8", "surrogatepass")
    (old,) = info[b"file tree"]
    info[b"file tree"] = {raw: info[b"file tree"][old]}
    info[b"name"] = raw
    return bytes(lt.bencode(doc))


@PATHS
@given(name=hostile_names)
def test_torrent_file_name_from_the_origin_never_becomes_a_path(
        genuine_torrent: tuple[TorrentFile, Path], tmp_path: Path, name: str) -> None:
    """Device: a torrent naming another file has another info-hash than the signed one,
    so it is refused (and the device stores the payload under its own name anyway).
    Seeder: a torrent is seeded only when it names the payload file beside it."""
    torrent, payload = genuine_torrent
    data = _renamed_torrent(torrent, name)
    try:
        parsed = read_torrent(data)
    except ValueError:
        parsed = None
    if parsed is not None and name != torrent.name:
        assert parsed.info_hash != torrent.info_hash
    torrent_path = tmp_path / f"{payload.name}.torrent"
    torrent_path.write_bytes(data)
    found = _Found(torrent_path=torrent_path, payload_name=payload.name, stamp=(0, 0, 0))
    found_beside = replace(found, torrent_path=payload.parent / torrent_path.name)
    torrent_path.rename(found_beside.torrent_path)
    try:
        result = _read_torrent(found_beside, 1 << 20)
    finally:
        found_beside.torrent_path.unlink()
    if result.data is not None:  # seeded: the name is exactly the payload's, in its dir
        assert parsed is not None and parsed.name == payload.name
        assert_inside(payload.parent / parsed.name, payload.parent)
