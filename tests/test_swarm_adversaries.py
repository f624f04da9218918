"""Lying and silent peers among devices that share a payload (issue 15, "Swarm";
docs/ATTACK_MATRIX.md: a liar costs at most the bytes it sent and their re-fetch; a
silent or stalled peer is dropped; honest peers keep trading while a liar is present).

Three devices update at once through the real agent in swarm mode, with no seeder:
the rate-limited origin is the only honest source, so what it sends beyond one payload
is what the adversary cost. The adversaries are :mod:`tests.fake_bt_peer` peers,
announced to the real tracker as seeds so that every device is handed them.

Root cause of the collapse these tests guard against (one liar: the origin sent 3x the
payload, no device-to-device transfer while the liar was there): libtorrent answers a
hash failure in a v2 torrent with one-block (16 KiB) pieces by asking peers for that
piece's block hashes, refuses every honest answer ("invalid hashes") and disconnects
the peer, then asks the next one, for as long as the torrent lives; with every peer cut
off, each device fetched the whole payload from the origin on its own (its fallback
split the work only among peers connected at that moment, and not at all once stalled).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

import swarmota.seeder.publish
from swarmota.demo import make_image, mutate_image
from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.errors import StatusCode
from swarmota.peer.state import DeviceState
from swarmota.seeder.origin import OriginConfig
from tests.fake_bt_peer import FakeBtPeer, Mode
from tests.release_env import ReleaseEnv, announce_fake, off_base_device, start_env

DEVICES = 3
ORIGIN = OriginConfig(rate_limit_bytes_per_s=1 << 20, rate_limit_burst_bytes=64 * 1024)


@pytest.fixture(scope="module")
def big_images() -> tuple[bytes, bytes]:
    v1 = make_image(4 << 20, seed=21)
    return v1, mutate_image(v1, seed=22)


async def fleet_update(env: ReleaseEnv, devices: Sequence[DeviceState]) -> list[UpdateResult]:
    """Update every device at once; each keeps seeding until all are done."""
    results: dict[str, UpdateResult] = {}
    all_done = trio.Event()

    def done(dev: DeviceState, result: UpdateResult) -> None:
        results.setdefault(dev.root.name, result)
        if len(results) == len(devices):
            all_done.set()

    async def one(dev: DeviceState) -> None:
        result = await update_once(dev, seed_time_s=120,
                                   on_seeding=lambda r, _s: done(dev, r))
        done(dev, result)

    with trio.fail_after(120):
        async with trio.open_nursery() as fleet:
            for dev in devices:
                fleet.start_soon(one, dev)
            await all_done.wait()
            fleet.cancel_scope.cancel()
    return [results[dev.root.name] for dev in devices]


async def with_adversary(env: ReleaseEnv, mode: Mode, **device: object
                         ) -> tuple[list[DeviceState], list[UpdateResult], FakeBtPeer, int]:
    """``DEVICES`` devices update v2 with one adversary in the swarm; returns them, their
    results, the adversary, and the payload bytes the origin sent."""
    devices, results, [fake], origin_bytes = await with_adversaries(env, mode, 1, **device)
    return devices, results, fake, origin_bytes


async def with_adversaries(env: ReleaseEnv, mode: Mode, count: int, *, devices: int = DEVICES,
                           **device: object
                           ) -> tuple[list[DeviceState], list[UpdateResult], list[FakeBtPeer],
                                      int]:
    """``devices`` devices update v2 with ``count`` adversaries in the swarm, each on its
    own address from 127.0.0.4 on; returns the devices, their results, the adversaries
    (stopped), and the payload bytes the origin sent."""
    payload = env.m2.full_payload
    assert payload.info_hash is not None
    assert count <= 6, "adversaries stay below the devices' addresses (127.0.0.11 on)"
    with contextlib.ExitStack() as stack:
        fakes = [stack.enter_context(FakeBtPeer(bytes.fromhex(payload.info_hash)[:20],
                                                payload.chunk_count, mode=mode,
                                                host=f"127.0.0.{4 + i}"))
                 for i in range(count)]
        for fake in fakes:
            await announce_fake(env, payload, fake)
        fleet = [off_base_device(env, f"dev-{i}", **device) for i in range(devices)]
        before = env.origin.statistics().bytes_payloads
        results = await fleet_update(env, fleet)
        return fleet, results, fakes, env.origin.statistics().bytes_payloads - before


def assert_all_updated(env: ReleaseEnv, devices: Sequence[DeviceState],
                       results: Sequence[UpdateResult]) -> None:
    for dev, result in zip(devices, results, strict=True):
        assert result.status == StatusCode.OK and result.updated, result.message
        assert dev.slot_path(dev.bootctl().committed).read_bytes() == env.v2


def honest_banned(devices: Sequence[DeviceState], results: Sequence[UpdateResult]) -> list[str]:
    hosts = {dev.config().swarm_listen.rsplit(":", 1)[0] for dev in devices}
    return [peer for r in results for peer in r.banned_peers if peer.rsplit(":", 1)[0] in hosts]


@pytest.fixture
async def big_env(tmp_path: Path, nursery: trio.Nursery,
                  big_images: tuple[bytes, bytes]) -> ReleaseEnv:
    return await start_env(nursery, tmp_path, *big_images, origin_config=ORIGIN)


async def test_one_liar_among_three_devices_costs_only_its_bytes_and_their_refetch(
        big_env: ReleaseEnv, caplog: pytest.LogCaptureFixture) -> None:
    """Every device bans the liar; the origin sends the payload once, plus at most what
    the liar sent (re-fetched) and a little slack, not three times; the devices trade
    with each other while the liar is there; nobody honest is banned. A device restarts
    its torrent after the ban, so that no honest peer finishes a piece the liar began
    (and is blamed with it)."""
    env = big_env
    payload = env.m2.full_payload
    caplog.set_level(logging.WARNING, logger="swarmota.peer.swarm_fetch")
    devices, results, liar, origin_bytes = await with_adversary(env, Mode.LIAR)
    assert_all_updated(env, devices, results)
    garbage = liar.stats().piece_bytes_sent
    assert garbage > 0 and any(r.banned_peers for r in results), "the liar lied, was banned"
    assert honest_banned(devices, results) == []
    assert any("a peer was banned" in r.getMessage() for r in caplog.records), \
        "a device that banned the liar restarted its torrent (no pieces the liar began)"
    assert origin_bytes <= 1.15 * payload.size + garbage, (origin_bytes, payload.size, garbage)
    assert sum(r.bytes_peers for r in results) >= payload.size, "devices traded"


@pytest.mark.slow  # eight agents and four liars in one process: ~10 s
async def test_four_liars_among_eight_devices_ban_no_honest_device(
        big_env: ReleaseEnv) -> None:
    """Half the swarm lies (issue 15's target): every honest device ends on the right
    image, the liars are banned, and no device bans an honest one. Before devices
    restarted their torrent after a ban, an honest device that finished a piece a
    banned liar had begun was blamed for it and banned, in 5 fleet runs of 10."""
    env = big_env
    payload = env.m2.full_payload
    devices, results, liars, origin_bytes = await with_adversaries(
        env, Mode.LIAR, 4, devices=8)
    assert_all_updated(env, devices, results)
    garbage = sum(liar.stats().piece_bytes_sent for liar in liars)
    assert garbage > 0 and any(r.banned_peers for r in results), "the liars lied, were banned"
    assert honest_banned(devices, results) == []
    assert origin_bytes <= 1.3 * payload.size + garbage, (origin_bytes, payload.size, garbage)


async def test_a_silent_peer_is_dropped_by_every_device(big_env: ReleaseEnv) -> None:
    """A peer claims every piece, unchokes and never sends (it held the fleet for 21 s
    instead of 1 s): each device drops it once it held requests for
    ``swarm_silent_peer_s`` without a byte, and the origin fetches what only it
    claimed, shared among the devices."""
    env = big_env
    payload = env.m2.full_payload
    devices, results, silent, origin_bytes = await with_adversary(
        env, Mode.TEASE, swarm_silent_peer_s=1.0)
    assert_all_updated(env, devices, results)
    assert silent.stats().requests >= 1 and silent.stats().pieces_sent == 0
    address = f"{silent.host}:{silent.port}"
    assert all(address in r.dropped_peers for r in results), [r.dropped_peers for r in results]
    assert origin_bytes <= 1.15 * payload.size, (origin_bytes, payload.size)


async def test_a_liar_in_a_release_with_one_block_pieces_does_not_cut_the_devices_off(
        tmp_path: Path, nursery: trio.Nursery, big_images: tuple[bytes, bytes],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A release published with 16 KiB chunks (as before chunks were at least 32 KiB):
    after the liar's first bad piece each device restarts its torrent, which clears
    libtorrent's poisoned block-hash requests; the liar stays blocked, the devices go on
    trading, the origin sends far less than once per device (3.0x before)."""
    monkeypatch.setattr(swarmota.seeder.publish, "choose_chunk_size", lambda _size: 16 * 1024)
    env = await start_env(nursery, tmp_path, *big_images, origin_config=ORIGIN)
    payload = env.m2.full_payload
    assert payload.chunk_size == 16 * 1024
    caplog.set_level(logging.WARNING, logger="swarmota.peer.swarm_fetch")
    devices, results, liar, origin_bytes = await with_adversary(env, Mode.LIAR)
    assert_all_updated(env, devices, results)
    assert any("restarting the torrent" in r.message for r in caplog.records)
    assert honest_banned(devices, results) == []
    garbage = liar.stats().piece_bytes_sent
    assert origin_bytes <= 1.3 * payload.size + garbage, (origin_bytes, payload.size, garbage)
