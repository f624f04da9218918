"""Attacks on metadata, manifests and payloads: each rejected, the device untouched.

Every test checks the invariants of ../shared/RELIABILITY.md that apply here: a typed
status naming the fault; the active slot byte-identical and still committed; no partial
file promoted; trusted metadata not moved backwards; the next clean run succeeds; the
tracker hears about it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio

from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from swarmota.seeder.repository import Repository
from tests.release_env import (
    ReleaseEnv,
    assert_untouched,
    expect_refused,
    flip_byte,
    publish,
    serve_offer,
)


async def test_flipped_byte_in_a_payload_chunk_is_rejected(env: ReleaseEnv) -> None:
    payload = env.repo.origin_dir / env.m2.full_payload.path
    flip_byte(payload, 100)
    dev = env.device()
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "chunk 0 failed verification")


@pytest.mark.parametrize("where", ["first", "last"])
async def test_flipped_byte_in_one_payload_chunk_keeps_every_other_chunk(
        env: ReleaseEnv, where: str) -> None:
    """The bad chunk fails the pass only once every other chunk is fetched, verified and
    on disk, whatever order the origin requests ran in (origin requests still to make
    when its attempts ran out used to be dropped): the next pass, after the origin is
    repaired, fetches the bad chunk alone."""
    p = env.m2.full_payload
    index = {"first": 0, "last": p.chunk_count - 1}[where]
    offset = p.chunk_span(index)[0] + 7
    flip_byte(env.repo.origin_dir / p.path, offset)
    dev = env.device()
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED,
                         f"chunk {index} failed verification")
    flip_byte(env.repo.origin_dir / p.path, offset)
    result = await update_once(dev)
    assert result.status == StatusCode.OK and result.chunks_reused == p.chunk_count - 1
    assert dev.slot_path("b").read_bytes() == env.v2


async def test_flipped_byte_in_a_chunk_list_is_rejected(env: ReleaseEnv) -> None:
    """The compact manifest pins the chunk list by size and SHA-256: an origin serving
    another one (which would make forged chunks pass) fails before any chunk is fetched."""
    chunk_list = env.m2.compact().full_payload.chunk_list
    assert chunk_list is not None
    flip_byte(env.repo.origin_dir / chunk_list.path, 5)
    dev = env.device()
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "SHA-256 mismatch")
    assert "chunk list of payload" in env.reports()[-1].message
    stats = env.origin.statistics()  # (the torrent, pinned by the info-hash, comes beside it)
    assert stats.bytes_payloads - stats.bytes_torrents == chunk_list.size, "no chunk fetched"
    flip_byte(env.repo.origin_dir / chunk_list.path, 5)
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message


async def test_truncated_payload_on_origin_fails_download(env: ReleaseEnv) -> None:
    payload = env.repo.origin_dir / env.m2.full_payload.path
    payload.write_bytes(payload.read_bytes()[:1000])
    dev = env.device()
    await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, "not fetched")


async def test_flipped_byte_in_release_manifest_is_rejected(env: ReleaseEnv) -> None:
    # both forms: the canonical manifest and the compact one the agent reads
    releases = env.repo.origin_dir / "targets" / "releases" / "acme-router"
    targets = list(releases.glob("*.2.0.0*.json"))
    assert len(targets) == 2
    for target in targets:
        flip_byte(target, 20)
    dev = env.device()
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")


async def test_flipped_byte_in_timestamp_signature_is_rejected(env: ReleaseEnv) -> None:
    path = env.repo.metadata_dir / "timestamp.json"
    doc = json.loads(path.read_bytes())
    sig = doc["signatures"][0]["sig"]
    doc["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    path.write_text(json.dumps(doc))
    dev = env.device()
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")


async def test_metadata_signed_by_a_foreign_key_is_rejected(env: ReleaseEnv,
                                                            tmp_path: Path) -> None:
    foreign = Repository.create(tmp_path / "foreign")
    publish(foreign, tmp_path / "foreign-work", env.v1, "1.0.0", 1)
    publish(foreign, tmp_path / "foreign-work", env.v2, "2.0.0", 2)
    shutil.rmtree(env.repo.origin_dir)
    shutil.copytree(foreign.origin_dir, env.repo.origin_dir)
    dev = env.device()  # provisioned with the genuine root
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "metadata rejected")


async def test_expired_timestamp_is_refused_as_possible_freeze(env: ReleaseEnv) -> None:
    env.repo.refresh_timestamp(expires_in_s=-60)
    dev = env.device()
    await expect_refused(env, dev, StatusCode.VERIFY_FAILED, "expired")
    env.repo.refresh_timestamp()  # the operator fixes the repository: the next run succeeds
    assert (await update_once(dev)).status == StatusCode.OK


async def test_older_release_offered_after_newer_is_refused(env: ReleaseEnv,
                                                            nursery: trio.Nursery) -> None:
    dev = env.device("dev-1")
    assert (await update_once(dev)).status == StatusCode.OK  # now on v2, counter 2
    evil = await serve_offer(nursery, {"product": "acme-router", "version": "1.0.0",
                                        "release_counter": 3,
                                        "target": "releases/acme-router/1.0.0.json"})
    config = dev.config()
    from swarmota.peer.config import save_config

    save_config(dev.config_path, type(config)(**{**config.__dict__, "tracker_url": evil}))
    result = await update_once(dev)
    assert result.status == StatusCode.VERIFY_FAILED
    assert "not newer than the installed counter 2" in result.message
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "b" and dev.slot_path("b").read_bytes() == env.v2
    assert dev.slot_path("a").read_bytes() == env.v1


async def test_unsigned_target_offered_by_tracker_is_refused(env: ReleaseEnv,
                                                             nursery: trio.Nursery) -> None:
    evil = await serve_offer(nursery, {"product": "acme-router", "version": "9.9.9",
                                        "release_counter": 99,
                                        "target": "releases/acme-router/9.9.9.json"})
    dev = env.device("dev-1", tracker_url=evil)
    result = await update_once(dev)
    assert result.status == StatusCode.VERIFY_FAILED
    assert "not listed in the signed targets" in result.message
    assert_untouched(dev, env.v1)


async def test_tracker_down_keeps_device_as_is(env: ReleaseEnv) -> None:
    dev = env.device("dev-1", tracker_url="http://127.0.0.1:9")
    result = await update_once(dev)
    assert result.status == StatusCode.DOWNLOAD_FAILED and "check-in failed" in result.message
    assert_untouched(dev, env.v1)
