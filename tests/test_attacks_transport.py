"""Transport faults (RELIABILITY.md, "Transport": resets, 5xx, Range ignored, slow
retrieval), each against the real published origin tree behind
:class:`tests.faulty_origin.FaultyOrigin` on 127.0.0.1.

Every test checks the invariants that apply: a typed status and a message naming the
fault (1); the active slot untouched or v2 verified and committed (2); trusted metadata
only forward (3); nothing unverified kept (4); the next clean run succeeds (5); the
tracker hears about it (6). Bounds are generous timeouts and request counts, never
measured durations. The TLS rows are in tests/test_transport_attacks.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import trio

from swarmota.peer.agent import update_once
from swarmota.peer.config import save_config
from swarmota.peer.errors import StatusCode
from swarmota.peer.state import DeviceState
from swarmota.peer.swarm import SwarmConfig
from swarmota.seeder.seeding import PayloadSeeder, SeedingConfig
from tests.faulty_origin import Fault, FaultyOrigin, serve_faulty
from tests.release_env import (
    ReleaseEnv,
    assert_nothing_unverified_kept,
    assert_untouched,
    expect_clean_run,
    expect_refused,
    off_base_device,
    offer_app,
    trusted_versions,
)

# http_timeout_s 1 s: a stall is noticed after 1 s, a trickle after 1 s below the floor
FAST: dict[str, Any] = {"http_timeout_s": 1.0, "http_min_rate_bytes_per_s": 4096}


async def faulty(env: ReleaseEnv, nursery: trio.Nursery, *faults: Fault,
                 name: str = "dev-1", attempts: int = 3, **config: Any,
                 ) -> tuple[FaultyOrigin, DeviceState]:
    origin, url = await serve_faulty(nursery, env.origin)
    for fault in faults:
        origin.add(fault)
    dev = env.device(name, mode="direct", origin_url=url, chunk_attempts=attempts,
                     **{**FAST, **config})
    return origin, dev


async def expect_updated(env: ReleaseEnv, dev: DeviceState) -> None:
    """The pass succeeds despite the fault: v2 verified and committed, reported."""
    before = trusted_versions(dev)
    with trio.fail_after(60):
        result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "b" and dev.slot_path("b").read_bytes() == env.v2
    assert dev.slot_path("a").read_bytes() == env.v1
    after = trusted_versions(dev)
    assert all(after[role] > before.get(role, 0) for role in ("timestamp", "snapshot", "targets"))
    assert not list(dev.downloads_dir.iterdir()), "the work area is reclaimed"
    assert [r.status for r in env.reports()] == [0]


async def test_connection_reset_mid_chunk_is_retried_and_the_download_resumes(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    payload = env.m2.full_payload
    reset = Fault("reset", payload.path, times=3, after_bytes=payload.chunk_size // 2 + 1)
    _origin, dev = await faulty(env, nursery, reset, attempts=4)
    await expect_updated(env, dev)
    assert reset.hits == 3


async def test_connection_reset_after_each_chunk_and_a_half_still_completes_by_resuming(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """Every answer drops after a chunk and a half: the whole chunk that arrived is kept,
    the retry asks only for the rest, so every request makes progress and the pass
    completes (a try that brought a chunk does not count against ``chunk_attempts``)."""
    payload = env.m2.full_payload
    assert payload.chunk_count >= 4
    reset = Fault("reset", payload.path, after_bytes=payload.chunk_size * 3 // 2)
    _origin, dev = await faulty(env, nursery, reset, attempts=2, download_concurrency=1)
    await expect_updated(env, dev)
    assert reset.hits <= payload.chunk_count, "one request per chunk at most"


async def test_connection_reset_before_any_whole_chunk_fails_clearly_then_resumes(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    payload = env.m2.full_payload
    reset = Fault("reset", payload.path, after_bytes=payload.chunk_size // 2)
    origin, dev = await faulty(env, nursery, reset, attempts=2, download_concurrency=1)
    with trio.fail_after(60):
        await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED,
                             "not fetched after 2 attempts: GET", payloads=[payload])
    assert reset.hits == 2, "two tries without progress, then a clear error"
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_sporadic_5xx_on_payload_requests_are_retried_with_backoff(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    errors = Fault("status", env.m2.full_payload.path, times=4, status=503)
    _origin, dev = await faulty(env, nursery, errors, attempts=6, download_concurrency=1)
    await expect_updated(env, dev)
    assert errors.hits == 4


async def test_5xx_on_metadata_fails_the_pass_clearly_and_the_next_run_succeeds(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """python-tuf does not retry a metadata request: the pass fails with the HTTP status
    (the daemon polls again later), nothing moves."""
    _origin, dev = await faulty(env, nursery, Fault("status", "snapshot.json", times=1))
    await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, "HTTP 503")
    await expect_clean_run(env, dev)


async def test_origin_ignoring_range_still_yields_a_verified_update(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """A 200 with the whole file instead of a 206: the agent skips to the offset it
    asked for, reads no more than it needs, and verifies every chunk as usual."""
    payload = env.m2.full_payload
    ignore = Fault("ignore_range", payload.path)
    _origin, dev = await faulty(env, nursery, ignore)
    await expect_updated(env, dev)
    assert ignore.hits >= 1


async def test_origin_trickling_the_payload_is_cut_off_as_slow_retrieval(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """16 bytes every 0.1 s (160 B/s) is below the floor (4 KiB/s after 1 s): each request
    is cut, the retries too, and the pass ends with a clear error long before the
    trickle could finish."""
    trickle = Fault("trickle", env.m2.full_payload.path, step_bytes=16, interval_s=0.1)
    origin, dev = await faulty(env, nursery, trickle, attempts=2, download_concurrency=1)
    with trio.fail_after(60):
        await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, "slow retrieval",
                             payloads=[env.m2.full_payload])
    assert trickle.hits == 2
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_origin_trickling_metadata_is_cut_off_as_slow_retrieval(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    trickle = Fault("trickle", "timestamp.json", step_bytes=8, interval_s=0.1)
    origin, dev = await faulty(env, nursery, trickle)
    with trio.fail_after(60):
        await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, "slow retrieval")
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_origin_stalling_mid_body_times_out_and_retries_then_fails_clearly(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    payload = env.m2.full_payload
    stall = Fault("stall", payload.path, after_bytes=1000)
    origin, dev = await faulty(env, nursery, stall, attempts=2, download_concurrency=1)
    with trio.fail_after(60):
        await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, "not fetched after 2 attempts",
                             payloads=[payload])
    assert stall.hits == 2
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_origin_stalling_metadata_times_out(env: ReleaseEnv,
                                                  nursery: trio.Nursery) -> None:
    stall = Fault("stall", "timestamp.json", after_bytes=10)
    origin, dev = await faulty(env, nursery, stall)
    with trio.fail_after(60):
        await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED, "metadata download failed")
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_a_stalled_origin_is_resumed_where_it_left_off_once_it_recovers(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """Stalls on the first two requests only: the retries (with backoff) finish the job
    in the same pass."""
    payload = env.m2.full_payload
    stall = Fault("stall", payload.path, times=2, after_bytes=payload.chunk_size + 10)
    _origin, dev = await faulty(env, nursery, stall, attempts=3, download_concurrency=1)
    await expect_updated(env, dev)
    assert stall.hits == 2
    assert_nothing_unverified_kept(dev)


async def test_redirect_of_a_payload_request_elsewhere_is_refused_and_reported(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """The TLS rows (foreign CA, unpinned key, TLS below 1.2, redirects at the HTTP
    client) are in tests/test_transport_attacks.py; this is the device end to end: a
    payload request answered with a redirect elsewhere fails the pass, nothing fetched
    from there."""
    payload = env.m2.full_payload
    elsewhere = f"http://127.0.0.2:9/{payload.path}"
    origin, dev = await faulty(env, nursery, Fault("redirect", payload.path, location=elsewhere),
                               attempts=1)
    await expect_refused(env, dev, StatusCode.DOWNLOAD_FAILED,
                         "HTTP 302 redirect", payloads=[payload])
    origin.faults.clear()
    await expect_clean_run(env, dev)


async def test_origin_stalling_every_payload_request_the_device_switches_to_peers(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """Swarm mode, the origin serves metadata and the torrent but stalls every payload
    request; a seeder has the payload: the device takes it from the peer instead."""
    payload = env.m2.full_payload
    seeder = PayloadSeeder(env.repo.origin_dir, SeedingConfig(
        swarm=SwarmConfig(listen_host="127.0.0.2"),
        announce_urls=(f"{env.tracker_url}/announce",)))
    await nursery.start(seeder.run)
    origin, url = await serve_faulty(nursery, env.origin)
    origin.add(Fault("stall", payload.path, exact=True))
    dev = off_base_device(env, "dev-1", origin_url=url, **FAST)
    with trio.fail_after(120):
        result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    bc = dev.bootctl()
    assert bc.committed == bc.primary == "b" and dev.slot_path("b").read_bytes() == env.v2
    assert result.download_mode == "swarm" and result.bytes_peers >= payload.size
    assert not list(dev.downloads_dir.iterdir())
    assert [r.status for r in env.reports("dev-1")] == [0]


async def test_tracker_trickling_its_check_in_answer_is_cut_off_as_slow_retrieval(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """4 bytes every 0.1 s: the check-in fails with a clear error soon after the 1 s
    grace, nothing is downloaded, the slot stays (a failed check-in is no attempt,
    nothing to report), and the next check-in with a healthy tracker updates."""
    tracker, url = await serve_faulty(nursery, offer_app({
        "product": "acme-router", "version": "2.0.0", "release_counter": 2,
        "target": "releases/acme-router/2.0.0.json"}))
    trickle = tracker.add(Fault("trickle", "/v1/checkin", step_bytes=4, interval_s=0.1))
    dev = env.device("dev-1", mode="direct", tracker_url=url, **FAST)
    with trio.fail_after(60):
        result = await update_once(dev)
    assert result.status == StatusCode.DOWNLOAD_FAILED and not result.attempted
    assert "check-in failed" in result.message and "slow retrieval" in result.message
    assert trickle.hits == 1
    assert_untouched(dev, env.v1)
    config = dev.config()
    save_config(dev.config_path, replace(config, tracker_url=env.tracker_url))
    await expect_clean_run(env, dev)
