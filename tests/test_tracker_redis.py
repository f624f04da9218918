"""The shared state of many tracker processes in a real Redis (a throwaway server;
skipped, with the reason, where Redis is not installed): peers announced to one process
are handed out by another, LAN first, with expiry and bounds; an announce accepted by
one process is a replay to every other."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from bench.servers import RedisServer, redis_missing, run_redis
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.bittorrent import AnnounceRequest
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.redis_state import RedisState
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.sqlite_store import SqliteStore
from tests.test_tracker_announce import INFO_HASH, announce_query, bdecode
from tests.tracker_asgi import START, call, checkin_body, release

HASH = bytes.fromhex("ab" * 20)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def request(i: int, *, left: int = 1000, event: str = "", numwant: int = 50,
            port: int | None = None) -> AnnounceRequest:
    return AnnounceRequest(HASH, f"-XX0001-{i:012d}".encode(), port or 6000 + i, 0, 0,
                           left, event, True, False, numwant, None, f"dev-{i}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def processes(redis_url: str, clock: Clock) -> AsyncIterator[list[RedisState]]:
    """Two tracker processes' views of one Redis."""
    states = [RedisState(redis_url, interval_s=300, max_peers_per_swarm=50, clock=clock)
              for _ in range(2)]
    yield states
    for state in states:
        state.close()


async def test_peers_announced_to_one_process_are_handed_out_by_another(
        processes: list[RedisState]) -> None:
    one, two = processes
    for i in range(5):
        result = await one.announce(request(i, left=0 if i < 2 else 10), "10.0.0.1",
                                    "net-a" if i % 2 else None, None)
        assert result.stored
    handed = await two.announce(request(9), "10.0.0.9", None, None)
    assert {p.address.port for p in handed.peers} == {6000, 6001, 6002, 6003, 6004}
    assert (handed.complete, handed.incomplete) == (2, 4)  # the requester counts
    assert {p.peer_id for p in handed.peers} >= {request(0).peer_id}
    again = await one.announce(request(9), "10.0.0.9", None, None)
    assert 6009 not in {p.address.port for p in again.peers}  # never itself


async def test_hand_out_is_lan_first_and_seeds_first(processes: list[RedisState]) -> None:
    one, two = processes
    for i in range(20):
        await one.announce(request(i, left=0 if i % 4 == 0 else 10), f"10.0.1.{i}",
                           "home" if i < 8 else "elsewhere", "eu" if i < 12 else "us")
    handed = await two.announce(request(99, numwant=6), "10.0.9.9", "home", "eu")
    ports = [p.address.port - 6000 for p in handed.peers]
    assert len(ports) == 6
    assert set(ports[:2]) == {0, 4}                    # the LAN's seeds first
    assert set(ports) <= set(range(8))                 # then the LAN's leechers
    seed = await two.announce(request(98, left=0, numwant=50), "10.0.9.8", None, None)
    assert all((p.address.port - 6000) % 4 != 0 for p in seed.peers)  # leechers only


async def test_stopped_expiry_completed_and_the_bound(processes: list[RedisState],
                                                      clock: Clock) -> None:
    one, two = processes
    await one.announce(request(1), "10.0.0.1", None, None)
    await one.announce(request(2, event="completed", left=0), "10.0.0.2", None, None)
    await two.announce(request(2, event="completed", left=0), "10.0.0.2", None, None)
    counts = await two.scrape(HASH)
    assert (counts.complete, counts.downloaded, counts.incomplete) == (1, 1, 1)
    await two.announce(request(1, event="stopped"), "10.0.0.1", None, None)
    assert (await one.scrape(HASH)).incomplete == 0
    clock.now += 601  # two intervals and a second: peer 2 expired
    fresh = await one.announce(request(3), "10.0.0.3", None, None)
    assert fresh.peers == () and (fresh.complete, fresh.incomplete) == (0, 1)
    for i in range(10, 70):  # 50 per swarm at most: the rest answered, not stored
        result = await one.announce(request(i), "10.0.2.1", None, None)
    assert not result.stored and one.statistics().refused == 11


async def test_an_announce_accepted_by_one_process_is_a_replay_to_all(
        processes: list[RedisState]) -> None:
    one, two = processes
    reads: list[str] = []

    async def stored_floor() -> int | None:
        reads.append("db")
        return 10  # the device's last check-in counter

    assert await one.accept_counter("dev-1:cert", 10, stored_floor) == 10  # not above it
    assert await one.accept_counter("dev-1:cert", 11, stored_floor) is None
    assert await two.accept_counter("dev-1:cert", 11, stored_floor) == 11  # replayed
    assert await two.accept_counter("dev-1:cert", 12, stored_floor) is None
    assert reads == ["db", "db"]  # the database is read only while Redis has no floor
    await two.raise_counter("dev-1:cert", 20)  # a check-in signed with 20
    assert await one.accept_counter("dev-1:cert", 19, stored_floor) == 20
    assert await one.accept_counter("dev-1:other-cert", 19, stored_floor) is None


async def test_with_redis_down_announces_fail_and_check_ins_go_on(tmp_path: Path) -> None:
    """Redis holds the peers: while it is down, announces get a failure reason (500),
    devices download from the origin meanwhile; check-ins and reports, which live in
    the database, are still answered."""
    if redis_missing() is not None:
        pytest.skip(f"Redis tests skipped: {redis_missing()}")
    with run_redis() as server, SqliteStore(tmp_path / "t.db", clock=Clock()) as store:
        register_release(store, release(info_hash=INFO_HASH), RolloutPlan.everyone(),
                         now=START)
        shared = RedisState(server.url, interval_s=300, max_peers_per_swarm=100)
        shared.ping()
        app = TrackerApp(Director(store, TrackerConfig(db_path=store.path),
                                  clock=Clock(), shared=shared))
        status, body = await call(app, "GET", "/announce",
                                  query=announce_query(left=0, port=7000))
        assert status == 200 and bdecode(body)[b"complete"] == 1
        server_process_stop(server)
        status, body = await call(app, "GET", "/announce",
                                  query=announce_query(port=7001))
        assert status == 500 and b"tracker storage failure" in body
        status, answer = await call(app, "POST", "/v1/checkin", checkin_body("d1"))
        assert status == 200 and answer["release"]["version"] == "2.0.0"
        shared.close()


def server_process_stop(server: RedisServer) -> None:
    """Stop the Redis server (as a crash would: nothing saved)."""
    client = redis.Redis(unix_socket_path=str(server.socket))
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # it went away while answering
    finally:
        client.close()
