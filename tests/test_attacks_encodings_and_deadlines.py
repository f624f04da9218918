"""Compressed bombs and slow headers (docs/ATTACK_MATRIX.md, "Fault classes learned from
outside testing": encodings, time), against every path a device reads from a server:
TUF metadata, the release manifest and payload ranges from the origin, check-in answers
from the tracker, and announces relayed for libtorrent.

The agent asks for no content encoding and refuses any: a limit counts the bytes that
arrive. Every request has one deadline over connect, TLS and headers (``http_timeout_s``)
and one over the whole answer that does not depend on where a range starts; a metadata
refresh has a bound of its own. Servers are the real origin behind
:class:`tests.faulty_origin.FaultyOrigin` (bombs) and :class:`tests.faulty_origin.SlowHead`
(a raw server trickling its answer's head). Bounds are generous timeouts, never measured
durations.
"""

from __future__ import annotations

import resource
from typing import Any

import pytest
import trio

from swarmota.peer.agent import update_once
from swarmota.peer.announce_relay import AnnounceRelay
from swarmota.peer.errors import DownloadFailed, StatusCode
from swarmota.peer.http import ENCODING_REFUSED, HttpClient
from swarmota.peer.trust import fetch_release_manifest
from tests.faulty_origin import ENCODINGS, Fault, SlowHead, serve_faulty
from tests.release_env import (
    ReleaseEnv,
    assert_untouched,
    expect_clean_run,
    expect_refused,
    offer_app,
)

FAST: dict[str, Any] = {"http_timeout_s": 1.0, "http_min_rate_bytes_per_s": 4096}
OFFER = {"product": "acme-router", "version": "2.0.0", "release_counter": 2,
         "target": "releases/acme-router/2.0.0.json"}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_compressed_bomb_in_metadata_is_refused_without_decoding_it(
        env: ReleaseEnv, nursery: trio.Nursery, encoding: str) -> None:
    """timestamp.json answered with 64 MiB of zeros compressed to 64 KiB or less: the
    device asked for no encoding, refuses the answer before reading its body, and its
    memory does not grow by anything like the bomb (it did: 600 MB for 8 KB)."""
    origin, url = await serve_faulty(nursery, env.origin)
    bomb = origin.add(Fault("bomb", "timestamp.json", encoding=encoding, times=1,
                            bomb_bytes=64 << 20))
    dev = env.device("dev-1", mode="direct", origin_url=url, **FAST)
    before = _peak_rss_bytes()
    await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, ENCODING_REFUSED)
    assert bomb.hits == 1
    assert _peak_rss_bytes() - before < 32 << 20, "the bomb was decoded"
    assert set(origin.accept_encodings) == {"identity"}, "the device asks for no encoding"
    await expect_clean_run(env, dev)


async def test_compressed_bomb_as_a_payload_range_is_refused_and_reported(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    payload = env.m2.full_payload
    origin, url = await serve_faulty(nursery, env.origin)
    origin.add(Fault("bomb", payload.path, encoding="deflate", bomb_bytes=64 << 20))
    dev = env.device("dev-1", mode="direct", origin_url=url, chunk_attempts=2, **FAST)
    await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, ENCODING_REFUSED,
                         payloads=[payload])
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_compressed_bomb_as_a_check_in_answer_is_refused(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """A tracker (or whoever answers for it) sends a zstd bomb as the check-in answer:
    the check-in fails naming the refusal, nothing is attempted or downloaded."""
    tracker, url = await serve_faulty(nursery, offer_app(OFFER))
    tracker.add(Fault("bomb", "/v1/checkin", encoding="zstd", bomb_bytes=1 << 30))
    dev = env.device("dev-1", mode="direct", tracker_url=url, **FAST)
    before = _peak_rss_bytes()
    with trio.fail_after(30):
        result = await update_once(dev)
    assert result.status == StatusCode.DOWNLOAD_FAILED and not result.attempted
    assert "check-in failed" in result.message and ENCODING_REFUSED in result.message
    assert _peak_rss_bytes() - before < 64 << 20
    assert_untouched(dev, env.v1)


async def test_compressed_bomb_as_a_relayed_announce_answer_becomes_a_failure_reason(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """The announce relay forwards libtorrent's announce; the tracker's answer is a gzip
    bomb: libtorrent gets a short bencoded failure reason, never the decoded bomb."""
    tracker, url = await serve_faulty(nursery, offer_app(OFFER))
    tracker.add(Fault("bomb", "/announce", encoding="gzip", bomb_bytes=64 << 20))
    async with HttpClient(timeout_s=5) as http:
        relay = AnnounceRelay(http, url)
        announce = await nursery.start(relay.serve)
        async with HttpClient(timeout_s=5) as libtorrent_side:
            status, body = await libtorrent_side.get_tracker(
                announce + "?info_hash=x&port=1", max_bytes=4096)
    assert status == 502 and body.startswith(b"d14:failure reason")
    assert ENCODING_REFUSED.encode() in body and len(body) < 1024
    assert relay.failed == 1 and relay.relayed == 0


async def test_metadata_answer_with_slow_headers_is_cut_after_the_timeout(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """The origin answers every request one head byte every 0.2 s (the head never
    ends): each metadata request gives up once ``http_timeout_s`` passed, not at 80x it
    (httpx's timeouts are per read; bytes kept coming)."""
    slow = SlowHead(interval_s=0.2)
    url = await nursery.start(slow.serve)
    dev = env.device("dev-1", mode="direct", origin_url=url, **FAST)
    with trio.fail_after(30):
        await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, "slow retrieval")
    assert slow.requests == 1 and slow.bytes_sent < 100


async def test_check_in_answer_with_slow_headers_is_cut_after_the_timeout(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    slow = SlowHead(interval_s=0.2)
    url = await nursery.start(slow.serve)
    dev = env.device("dev-1", mode="direct", tracker_url=url, **FAST)
    with trio.fail_after(8):  # was the timeout plus 64 KiB at the floor: 17 s
        result = await update_once(dev)
    assert result.status == StatusCode.DOWNLOAD_FAILED and not result.attempted
    assert "check-in failed" in result.message and "slow retrieval" in result.message
    assert_untouched(dev, env.v1)


@pytest.mark.parametrize("offset", [0, 1 << 40])
async def test_payload_range_with_slow_headers_is_cut_after_the_timeout_at_any_offset(
        nursery: trio.Nursery, offset: int) -> None:
    """A range far into a (large) payload gets the same deadline as the first one: the
    head must come within the timeout (the old deadline grew with the offset: days for
    a 1 GB payload, 34 years here)."""
    slow = SlowHead(interval_s=0.2)
    url = await nursery.start(slow.serve)
    async with HttpClient(timeout_s=1.0, min_rate_bytes_per_s=4096) as http:
        with trio.fail_after(8), pytest.raises(DownloadFailed, match="slow retrieval"):
            await http.get_range(url + "/payloads/x.zst", offset, 1 << 20)
        with trio.fail_after(8), pytest.raises(DownloadFailed, match="slow retrieval"):
            await http.get_tracker(url + "/announce?x=1", max_bytes=256 * 1024)
    assert slow.requests == 2


async def test_metadata_trickled_just_above_the_floor_is_bounded_per_refresh(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """Every metadata file trickles at about 320 B/s, above a 128 B/s floor, so no
    request is cut (they would take 15 s together); the refresh as a whole is, at its
    bound (``metadata_timeout_s``)."""
    origin, url = await serve_faulty(nursery, env.origin)
    origin.add(Fault("trickle", "metadata/", step_bytes=16, interval_s=0.05))
    dev = env.device("dev-1", mode="direct")
    with trio.fail_after(30), pytest.raises(DownloadFailed, match="bound of 2 s"):
        await trio.to_thread.run_sync(lambda: fetch_release_manifest(
            dev.trust_dir, url, OFFER["target"], timeout_s=1.0,  # type: ignore[arg-type]
            scratch_dir=dev.downloads_dir, min_rate_bytes_per_s=128, pass_timeout_s=2.0))
