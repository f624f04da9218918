"""The BitTorrent HTTP tracker: announce/scrape parsing, bencoded answers, the peer
registry, the routes, and the swarm catalogue in SQLite.

Threats covered: malformed or oversized queries (refused with a ``failure reason``),
a peer claiming another address (the ``ip`` parameter is ignored), announces for
swarms nobody registered (refused: the tracker serves our releases only), unbounded
memory (per-swarm and total peer limits, expiry), and hand-outs that return the
requester itself or leave leechers without seeds.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import libtorrent as lt
import pytest
import trio

from swarmota.manifest import (
    MIN_CHUNK_SIZE_BYTES,
    ImageInfo,
    Payload,
    ReleaseManifest,
    chunk_hashes,
    sha256_hex,
)
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.bittorrent import (
    DEFAULT_NUMWANT,
    MAX_NUMWANT,
    MAX_SCRAPE_HASHES,
    AnnounceRequest,
    HandedPeer,
    PeerAddress,
    ScrapeCounts,
    SwarmInfo,
    announce_answer,
    bencode,
    failure_answer,
    parse_announce,
    parse_scrape,
    peer_address,
    scrape_answer,
)
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.errors import ReleaseConflictError, RequestError
from swarmota.tracker.protocol import Release
from swarmota.tracker.registry import SwarmRegistry
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import serve_tracker
from swarmota.tracker.sqlite_store import _SCHEMA, SqliteStore
from swarmota.tracker.store import SCHEMA_VERSION
from tests.tracker_cli import run_cli

INFO_HASH = sha256_hex(b"torrent info dict")
ANNOUNCE_HASH = bytes.fromhex(INFO_HASH)[:20]
OTHER_HASH = bytes(range(20))
PEER_ID = b"-LT2010-abcdefghijkl"


def q(**params: bytes | str | int) -> bytes:
    """A query string; bytes values are percent-encoded byte for byte."""
    parts = []
    for name, value in params.items():
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(f"{name}={quote_from_bytes(raw, safe='')}")
    return "&".join(parts).encode("ascii")


def announce_query(**overrides: bytes | str | int) -> bytes:
    params: dict[str, bytes | str | int] = {
        "info_hash": ANNOUNCE_HASH, "peer_id": PEER_ID, "port": 6881, "uploaded": 0,
        "downloaded": 0, "left": 1000, "event": "started", "compact": 1,
    }
    params.update(overrides)
    return q(**{k: v for k, v in params.items() if v != "<drop>"})


def request(announce_hash: bytes = ANNOUNCE_HASH, *, port: int = 6881, left: int = 100,
            event: str = "", numwant: int = DEFAULT_NUMWANT,
            peer_id: bytes = PEER_ID) -> AnnounceRequest:
    return AnnounceRequest(announce_hash=announce_hash, peer_id=peer_id, port=port,
                           uploaded=0, downloaded=0, left=left, event=event, compact=True,
                           no_peer_id=False, numwant=numwant, key=None)


def bdecode(data: bytes) -> Any:
    decoded = lt.bdecode(data)
    assert decoded is not None, data
    return decoded


# --- parsing ----------------------------------------------------------------------------


def test_announce_query_parses_raw_twenty_byte_values() -> None:
    raw_hash = bytes([0, 0x25, 0x26, 0x3D, 0x2B, 0xFF]) + bytes(14)  # NUL % & = + 0xff
    query = announce_query(info_hash=raw_hash, numwant=30, key="k3y", no_peer_id=1,
                           ip="10.9.9.9", corrupt=0, supportcrypto=1)
    parsed = parse_announce(query)
    assert parsed == AnnounceRequest(
        announce_hash=raw_hash, peer_id=PEER_ID, port=6881, uploaded=0, downloaded=0,
        left=1000, event="started", compact=True, no_peer_id=True, numwant=30, key=b"k3y")
    assert not parsed.is_seed


def test_announce_defaults_and_a_literal_plus() -> None:
    peer_id = b"+" * 20
    parsed = parse_announce(b"info_hash=" + quote_from_bytes(ANNOUNCE_HASH).encode()
                            + b"&peer_id=" + peer_id + b"&port=1&left=0")
    assert parsed.peer_id == peer_id
    assert (parsed.event, parsed.compact, parsed.numwant, parsed.uploaded) == (
        "", True, DEFAULT_NUMWANT, 0)
    assert parsed.is_seed


def test_huge_numwant_is_clamped() -> None:
    assert parse_announce(announce_query(numwant=10**9)).numwant == MAX_NUMWANT
    assert parse_announce(announce_query(numwant=0)).numwant == 0


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"info_hash": "<drop>"}, "missing info_hash"),
    ({"peer_id": "<drop>"}, "missing peer_id"),
    ({"port": "<drop>"}, "missing port"),
    ({"left": "<drop>"}, "missing left"),
    ({"info_hash": bytes(19)}, r"info_hash must be 20 bytes \(or a 32-byte v2 info-hash\), "
                               "got 19"),
    ({"info_hash": bytes(33)}, "got 33"),
    ({"peer_id": b"short"}, "peer_id must be 20 bytes"),
    ({"port": 0}, "port must be within 1..65535"),
    ({"port": 65536}, "port must be at most 65535"),
    ({"port": "-1"}, "port must be a non-negative decimal integer"),
    ({"port": "http"}, "port must be a non-negative decimal integer"),
    ({"left": "1e3"}, "left must be a non-negative decimal integer"),
    ({"uploaded": str(2**64)}, "uploaded must be at most"),
    ({"numwant": "-5"}, "numwant must be a non-negative decimal integer"),
    ({"event": "paused"}, "event must be started, completed, stopped or empty"),
    ({"compact": "yes"}, "compact must be 0 or 1"),
    ({"key": "k" * 65}, "key must be at most 64 bytes"),
])
def test_bad_announces_are_refused_with_a_clear_reason(
        overrides: dict[str, bytes | str | int], reason: str) -> None:
    with pytest.raises(RequestError, match=reason):
        parse_announce(announce_query(**overrides))


def test_a_full_32_byte_v2_info_hash_is_taken_as_its_20_byte_announce_form() -> None:
    full = bytes(range(32))
    assert parse_announce(announce_query(info_hash=full)).announce_hash == full[:20]
    assert parse_scrape(b"info_hash=" + quote_from_bytes(full).encode()).announce_hashes \
        == (full[:20],)


@pytest.mark.parametrize("field", ["port", "compact", "event"])
def test_failure_reasons_quote_what_was_sent_without_python_reprs(field: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_announce(announce_query(**{field: b"ab\x01c\"'"}))
    reason = str(info.value)
    assert "b'" not in reason and "\\x" not in reason
    assert '"ab%01c%22\'"' in reason


def test_repeated_parameters_bad_escapes_and_huge_queries_are_refused() -> None:
    with pytest.raises(RequestError, match="port given more than once"):
        parse_announce(announce_query() + b"&port=1")
    with pytest.raises(RequestError, match="malformed percent-escape"):
        parse_announce(announce_query() + b"&x=%zz")
    with pytest.raises(RequestError, match="over the limit"):
        parse_announce(announce_query() + b"&pad=" + b"a" * 9000)


def test_peer_address_is_the_connection_not_the_claim() -> None:
    assert peer_address(("127.0.0.3", 50000), 6881) == PeerAddress("127.0.0.3", 6881)
    assert peer_address(("::ffff:10.0.0.7", 1), 6881) == PeerAddress("10.0.0.7", 6881)
    assert peer_address(("::1", 1), 7).is_ipv6
    with pytest.raises(RequestError):
        peer_address(None, 6881)
    with pytest.raises(RequestError):
        peer_address(("unix-socket", 0), 6881)


def test_scrape_query() -> None:
    query = q(info_hash=ANNOUNCE_HASH) + b"&" + q(info_hash=OTHER_HASH) + b"&" + q(
        info_hash=ANNOUNCE_HASH)
    assert parse_scrape(query).announce_hashes == (ANNOUNCE_HASH, OTHER_HASH)
    with pytest.raises(RequestError, match="missing info_hash"):
        parse_scrape(b"")
    with pytest.raises(RequestError, match="20 bytes"):
        parse_scrape(q(info_hash=b"x"))
    too_many = b"&".join(q(info_hash=bytes([i]) * 20)
                         for i in range(MAX_SCRAPE_HASHES + 1))
    with pytest.raises(RequestError, match="at most"):
        parse_scrape(too_many)


# --- bencoded answers -------------------------------------------------------------------


def test_bencode_vectors() -> None:
    assert bencode({"b": 1, "a": [b"xy", "z", -3], b"c": {}}) == b"d1:al2:xy1:zi-3ee1:bi1e1:cdee"
    with pytest.raises(TypeError):
        bencode(True)
    with pytest.raises(TypeError):
        bencode({"a": 1, b"a": 2})
    assert bdecode(failure_answer("unknown info_hash")) == {
        b"failure reason": b"unknown info_hash"}


def test_compact_answer_is_six_bytes_per_ipv4_peer_and_peers6_for_ipv6() -> None:
    peers = [HandedPeer(PeerAddress("127.0.0.2", 6881), b"a" * 20),
             HandedPeer(PeerAddress("10.1.2.3", 258), b"b" * 20),
             HandedPeer(PeerAddress("::1", 443), b"c" * 20)]
    answer = bdecode(announce_answer(peers, complete=1, incomplete=2, interval_s=300,
                                     min_interval_s=60, compact=True))
    assert answer == {
        b"interval": 300, b"min interval": 60, b"complete": 1, b"incomplete": 2,
        b"peers": bytes([127, 0, 0, 2, 0x1A, 0xE1, 10, 1, 2, 3, 1, 2]),
        b"peers6": bytes(15) + b"\x01" + bytes([1, 0xBB]),
    }


def test_non_compact_answer_lists_dicts() -> None:
    peers = [HandedPeer(PeerAddress("127.0.0.2", 6881), b"a" * 20)]
    answer = bdecode(announce_answer(peers, complete=1, incomplete=0, interval_s=300,
                                     min_interval_s=60, compact=False))
    assert answer[b"peers"] == [{b"ip": b"127.0.0.2", b"port": 6881, b"peer id": b"a" * 20}]
    answer = bdecode(announce_answer(peers, complete=1, incomplete=0, interval_s=300,
                                     min_interval_s=60, compact=False, no_peer_id=True))
    assert answer[b"peers"] == [{b"ip": b"127.0.0.2", b"port": 6881}]
    empty = bdecode(announce_answer([], complete=0, incomplete=0, interval_s=9,
                                    min_interval_s=1, compact=True))
    assert empty[b"peers"] == b"" and b"peers6" not in empty


def test_scrape_answer() -> None:
    answer = bdecode(scrape_answer({ANNOUNCE_HASH: ScrapeCounts(2, 5, 3)}))
    assert answer == {b"files": {ANNOUNCE_HASH: {b"complete": 2, b"downloaded": 5,
                                                 b"incomplete": 3}}}


# --- the registry -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> SwarmRegistry:
    return SwarmRegistry(interval_s=100, clock=clock, rng=random.Random(1))


def addresses(peers: tuple[HandedPeer, ...]) -> list[tuple[str, int]]:
    return [(p.address.ip, p.address.port) for p in peers]


def test_the_requester_never_gets_itself(registry: SwarmRegistry) -> None:
    first = registry.announce(request(event="started"), "127.0.0.2")
    assert first.peers == () and (first.complete, first.incomplete) == (0, 1)
    again = registry.announce(request(), "127.0.0.2")
    assert again.peers == () and again.incomplete == 1  # same (ip, port): same entry
    other = registry.announce(request(port=7000), "127.0.0.2")
    assert addresses(other.peers) == [("127.0.0.2", 6881)]
    assert registry.statistics().peers == 2


def test_leechers_get_seeds_first_and_seeds_get_leechers_only(
        registry: SwarmRegistry) -> None:
    for i in range(5):
        registry.announce(request(left=0), f"10.0.0.{i}")
    for i in range(5):
        registry.announce(request(left=50), f"10.0.1.{i}")
    answer = registry.announce(request(left=50), "10.0.2.1")
    got = addresses(answer.peers)
    assert [ip.startswith("10.0.0.") for ip, _ in got] == [True] * 5 + [False] * 5
    assert ("10.0.2.1", 6881) not in got
    assert (answer.complete, answer.incomplete) == (5, 6)

    seed = registry.announce(request(left=0), "10.0.0.0")
    assert sorted(ip for ip, _ in addresses(seed.peers)) == sorted(
        [f"10.0.1.{i}" for i in range(5)] + ["10.0.2.1"])

    few = registry.announce(request(left=50, numwant=2), "10.0.2.1")
    assert all(ip.startswith("10.0.0.") for ip, _ in addresses(few.peers))
    assert len(few.peers) == 2


def test_hand_out_order_is_random_within_a_group_and_seeded() -> None:
    def order(seed: int) -> list[tuple[str, int]]:
        reg = SwarmRegistry(interval_s=100, clock=FakeClock(), rng=random.Random(seed))
        for i in range(20):
            reg.announce(request(left=0), f"10.0.0.{i}")
        return addresses(reg.announce(request(), "10.0.9.9").peers)

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(order(4))


def test_stopped_removes_the_peer(registry: SwarmRegistry) -> None:
    registry.announce(request(left=0), "10.0.0.1")
    registry.announce(request(), "10.0.0.2")
    stopped = registry.announce(request(event="stopped"), "10.0.0.2")
    assert stopped.peers == () and (stopped.complete, stopped.incomplete) == (1, 0)
    assert addresses(registry.announce(request(left=0, port=9), "10.0.0.3").peers) == []
    registry.announce(request(left=0, event="stopped"), "10.0.0.1")
    registry.announce(request(left=0, event="stopped", port=9), "10.0.0.3")
    assert registry.statistics().peers == 0
    assert registry.statistics().swarms == 0
    # stopping an unknown peer is harmless
    registry.announce(request(event="stopped"), "10.0.0.8")


def test_entries_expire_after_two_intervals(registry: SwarmRegistry,
                                            clock: FakeClock) -> None:
    registry.announce(request(left=0), "10.0.0.1")
    clock.now += 150
    registry.announce(request(left=0, announce_hash=OTHER_HASH), "10.0.0.9")
    assert addresses(registry.announce(request(), "10.0.0.2").peers) == [("10.0.0.1", 6881)]
    clock.now += 51  # 201 s after the seed's last announce, 51 s after the leecher's
    answer = registry.announce(request(port=7), "10.0.0.3")
    assert addresses(answer.peers) == [("10.0.0.2", 6881)]
    assert registry.statistics().expired == 1
    clock.now += 1000
    assert registry.expire() == 3
    assert registry.statistics().peers == 0


def test_expired_peers_are_swept_from_idle_swarms(registry: SwarmRegistry,
                                                  clock: FakeClock) -> None:
    registry.announce(request(), "10.0.0.1")
    clock.now += 250
    registry.announce(request(announce_hash=OTHER_HASH), "10.0.0.2")  # sweeps the rest
    stats = registry.statistics()
    assert (stats.swarms, stats.peers, stats.expired) == (1, 1, 1)


def test_limits_bound_memory(clock: FakeClock) -> None:
    registry = SwarmRegistry(interval_s=100, max_peers_per_swarm=3, max_peers_total=5,
                             clock=clock, rng=random.Random(0))
    for i in range(4):
        result = registry.announce(request(left=0), f"10.0.0.{i}")
        assert result.stored is (i < 3)
    refused = registry.announce(request(), "10.0.0.3")
    assert len(refused.peers) == 3  # still answered
    for i in range(3):
        registry.announce(request(announce_hash=OTHER_HASH), f"10.0.1.{i}")
    stats = registry.statistics()
    assert (stats.peers, stats.refused) == (5, 3)
    # known peers keep announcing even at the limit
    assert registry.announce(request(left=0), "10.0.0.0").stored is True


def test_completed_counts_once_and_network_id_is_kept(registry: SwarmRegistry) -> None:
    registry.announce(request(event="started"), "10.0.0.1", network_id="lan-7")
    registry.announce(request(left=0, event="completed"), "10.0.0.1", network_id="lan-7")
    registry.announce(request(left=0, event="completed"), "10.0.0.1", network_id="lan-7")
    assert registry.scrape(ANNOUNCE_HASH) == ScrapeCounts(complete=1, downloaded=1,
                                                          incomplete=0)
    assert registry.network_of(ANNOUNCE_HASH, "10.0.0.1", 6881) == "lan-7"
    assert registry.network_of(ANNOUNCE_HASH, "10.0.0.2", 6881) is None
    assert registry.scrape(OTHER_HASH) == ScrapeCounts(0, 0, 0)
    stats = registry.statistics()
    assert (stats.seeds, stats.leechers, stats.downloads, stats.announces) == (1, 0, 1, 3)


# --- the catalogue of swarms ------------------------------------------------------------


def build_manifest(version: str = "2.0.0", counter: int = 2,
                   info_hash: str | None = INFO_HASH) -> ReleaseManifest:
    data = f"payload of {version}".encode() * 100
    return ReleaseManifest(
        product="acme-router", version=version, release_counter=counter,
        compatibility=("acme-router-hw1",), update_type="image",
        image=ImageInfo(size=len(data), sha256=sha256_hex(data)),
        payloads=(Payload(kind="full", encoding="zstd", size=len(data),
                          sha256=sha256_hex(data), chunk_size=MIN_CHUNK_SIZE_BYTES,
                          chunks=tuple(chunk_hashes(data, MIN_CHUNK_SIZE_BYTES)),
                          info_hash=info_hash),),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "tracker.db") as s:
        yield s


def test_release_from_manifest_knows_its_swarms() -> None:
    release = Release.from_manifest(build_manifest())
    assert release.swarms == (SwarmInfo(INFO_HASH, "acme-router", "2.0.0", "full"),)
    assert release.swarms[0].announce_hash == ANNOUNCE_HASH
    assert Release.from_manifest(build_manifest(info_hash=None)).swarms == ()
    with pytest.raises(RequestError, match="belongs to"):
        Release("acme-router", "1.0", 1, "releases/acme-router/1.0.json", release.swarms)
    with pytest.raises(RequestError, match="64 lowercase hex"):
        SwarmInfo(INFO_HASH.upper(), "acme-router", "2.0.0", "full")


def test_a_byte_identical_payload_serves_several_releases_but_a_20_byte_twin_is_refused(
        store: SqliteStore) -> None:
    """Republishing a known-good image under a higher counter (the standard recovery
    from a bad release) gives a payload byte for byte the same: both releases share its
    swarm. Two different info-hashes with the same announce form are still refused."""
    store.add_release(Release.from_manifest(build_manifest()), 1.0)
    again = Release.from_manifest(build_manifest("3.0.0", 3))
    assert store.add_release(again, 2.0) is True
    assert [(s.version, s.info_hash) for s in store.swarms_of(ANNOUNCE_HASH)] == [
        ("2.0.0", INFO_HASH), ("3.0.0", INFO_HASH)]
    # same first 20 bytes, different full hash: clients could not tell them apart
    twin = INFO_HASH[:40] + "0" * 24
    assert twin != INFO_HASH
    with pytest.raises(ReleaseConflictError):
        store.add_release(Release.from_manifest(build_manifest("4.0.0", 4, twin)), 3.0)
    assert [r.version for r in store.releases()] == ["2.0.0", "3.0.0"]  # nothing half-added


def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    raw = sqlite3.connect(db)
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (1)")
    raw.execute("INSERT INTO releases VALUES ('acme-router', '1.0.0', 1, "
                "'releases/acme-router/1.0.0.json', 5.0)")
    raw.commit()
    raw.close()
    with SqliteStore(db, create=False) as store:
        assert store.releases() == [Release.create("acme-router", "1.0.0", 1)]
        store.add_release(Release.from_manifest(build_manifest()), 6.0)
        assert store.swarms_of(ANNOUNCE_HASH) != []
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    raw.close()
    with SqliteStore(db) as store:  # opening again is a no-op
        assert len(store.swarms()) == 1


async def test_cli_release_show_gives_the_info_hashes_devices_announce(
        tmp_path: Path, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "tracker.db"
    with SqliteStore(db) as store:
        register_release(store, Release.from_manifest(build_manifest()), None)
    assert run_cli("admin", "token", "create", "--db", str(db), "--role", "viewer",
                   "--name", "v") == 0
    token = capsys.readouterr().out.strip()
    url = await nursery.start(serve_tracker, TrackerConfig(db_path=db))
    rc = await trio.to_thread.run_sync(run_cli, "release", "show", "acme-router", "2.0.0",
                                       "--url", url, "--token", token)
    out = capsys.readouterr().out
    assert rc == 0
    assert f"swarm {INFO_HASH} (announced as {ANNOUNCE_HASH.hex()})" in out


# --- the routes -------------------------------------------------------------------------


async def call(app: TrackerApp, path: str, query: bytes = b"", method: str = "GET",
               client: tuple[str, int] | None = ("127.0.0.2", 50000)
               ) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query,
             "headers": [], "client": client}
    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def app(store: SqliteStore) -> TrackerApp:
    register_release(store, Release.from_manifest(build_manifest()), RolloutPlan.everyone(),
                     now=1.0)
    config = TrackerConfig(db_path=store.path, announce_interval_s=120,
                           announce_min_interval_s=30)
    registry = SwarmRegistry(interval_s=120, clock=FakeClock(), rng=random.Random(0))
    return TrackerApp(Director(store, config, registry=registry))


async def test_announce_route_hands_out_peers_by_remote_address(app: TrackerApp) -> None:
    status, headers, body = await call(app, "/announce", announce_query(left=0, ip="1.2.3.4"))
    assert status == 200 and headers["content-type"] == "text/plain"
    assert bdecode(body) == {b"interval": 120, b"min interval": 30, b"complete": 1,
                             b"incomplete": 0, b"peers": b""}
    status, _, body = await call(app, "/announce", announce_query(port=7000),
                                 client=("::ffff:127.0.0.3", 1))
    assert bdecode(body)[b"peers"] == bytes([127, 0, 0, 2, 0x1A, 0xE1])
    assert app.statistics().announces == 2


async def test_unknown_info_hash_gets_a_failure_reason(app: TrackerApp) -> None:
    status, headers, body = await call(app, "/announce", announce_query(info_hash=OTHER_HASH))
    assert status == 200 and headers["content-type"] == "text/plain"
    reason = bdecode(body)[b"failure reason"]
    assert reason.startswith(b"unknown info_hash " + OTHER_HASH.hex().encode())
    status, _, body = await call(app, "/announce", announce_query(port="x"))
    assert status == 200 and b"port must be" in bdecode(body)[b"failure reason"]
    stats = app.statistics()
    assert (stats.announces, stats.bittorrent_failures, stats.errors) == (0, 2, 0)
    assert app.director.registry.statistics().announces == 0


async def test_scrape_route_counts_known_swarms_only(app: TrackerApp) -> None:
    await call(app, "/announce", announce_query(left=0), client=("127.0.0.2", 1))
    await call(app, "/announce", announce_query(), client=("127.0.0.3", 1))
    await call(app, "/announce", announce_query(left=0, event="completed"),
               client=("127.0.0.3", 1))
    await call(app, "/announce", announce_query(), client=("127.0.0.4", 1))
    query = q(info_hash=ANNOUNCE_HASH) + b"&" + q(info_hash=OTHER_HASH)
    status, headers, body = await call(app, "/scrape", query)
    assert status == 200 and headers["content-type"] == "text/plain"
    assert bdecode(body) == {b"files": {ANNOUNCE_HASH: {
        b"complete": 2, b"downloaded": 1, b"incomplete": 1}}}
    _, _, body = await call(app, "/scrape")
    assert b"failure reason" in bdecode(body)
    assert app.statistics().scrapes == 1


async def test_announce_needs_get_and_a_client_address(app: TrackerApp) -> None:
    status, headers, body = await call(app, "/announce", announce_query(), method="POST")
    assert status == 405 and headers["allow"] == "GET"
    assert bdecode(body) == {b"failure reason": b"/announce only accepts GET, not POST"}
    assert app.statistics().bittorrent_refused["announce:method"] == 1
    status, _, body = await call(app, "/announce", announce_query(), client=None)
    assert status == 200 and b"address" in bdecode(body)[b"failure reason"]


async def test_a_swarm_registered_while_running_is_served(store: SqliteStore) -> None:
    app = TrackerApp(Director(store, TrackerConfig(db_path=store.path)))
    _, _, body = await call(app, "/announce", announce_query())
    assert b"failure reason" in bdecode(body)
    await trio.to_thread.run_sync(lambda: register_release(
        store, Release.from_manifest(build_manifest()), RolloutPlan.everyone(), now=1.0))
    _, _, body = await call(app, "/announce", announce_query())
    assert bdecode(body)[b"interval"] == 300


def test_big_swarms_keep_lan_first_and_seeds_first_with_sampling(clock: FakeClock) -> None:
    """Groups larger than the hand-out are sampled, not scanned: the policy holds."""
    registry = SwarmRegistry(interval_s=100, clock=clock, rng=random.Random(5))
    for i in range(400):
        registry.announce(request(left=0, port=1000 + i), "10.0.0.1")  # seeds, anywhere
    for i in range(400):
        registry.announce(request(left=9, port=3000 + i), "10.0.0.1")  # leechers, anywhere
    for i in range(30):
        registry.announce(request(left=0, port=5000 + i), "10.0.0.2", region="eu")
    for i in range(5):
        registry.announce(request(left=9, port=6000 + i), "10.0.0.3", network_id="lan-1",
                          region="eu")
    seen: set[int] = set()
    for _ in range(40):
        answer = registry.announce(request(left=9, port=7000, numwant=60), "10.0.0.4",
                                   network_id="lan-1", region="eu")
        ports = [p.address.port for p in answer.peers]
        assert len(ports) == len(set(ports)) == 60 and 7000 not in ports
        assert sorted(ports[:5]) == list(range(6000, 6005))  # the LAN, even leechers
        assert sorted(ports[5:35]) == list(range(5000, 5030))  # then the region's seeds
        assert all(1000 <= p < 1400 for p in ports[35:])  # then other seeds
        seen.update(ports[35:])
    assert len(seen) > 300  # uniform over the 400 other seeds, not a fixed few
    assert (answer.complete, answer.incomplete) == (430, 406)


def test_a_crowded_lan_falls_back_to_an_exact_scan(clock: FakeClock) -> None:
    registry = SwarmRegistry(interval_s=100, clock=clock, rng=random.Random(6))
    for i in range(200):
        registry.announce(request(left=9, port=1000 + i), "10.0.0.1", network_id="lan-1")
    for i in range(5):
        registry.announce(request(left=9, port=2000 + i), "10.0.0.2")
    answer = registry.announce(request(left=0, port=9000, numwant=202), "10.0.0.3",
                               network_id="lan-1")
    ports = [p.address.port for p in answer.peers]
    assert len(ports) == len(set(ports)) == 202
    assert all(1000 <= p < 1200 for p in ports[:200])
    assert sorted(ports[200:]) != [] and all(2000 <= p < 2005 for p in ports[200:])


async def test_an_expired_rollout_cache_is_read_once_for_a_crowd(
        app: TrackerApp, store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Single flight: announces arriving together share one rollout read (no queue of
    SQLite reads in front of the hot path)."""
    reads = 0
    real = store.rollout_of

    def counting(product: str, version: str) -> Any:
        nonlocal reads
        reads += 1
        return real(product, version)

    monkeypatch.setattr(store, "rollout_of", counting)
    answers: list[bytes] = []

    async def leecher(i: int) -> None:
        answers.append((await call(app, "/announce", announce_query(port=1000 + i)))[2])

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(leecher, i)
    assert reads == 1 and len(answers) == 30
    assert all(b"failure" not in a for a in answers)
    assert app.director.registry.statistics().peers == 30


@pytest.mark.parametrize("ips", [[], ["10.0.0.1"], ["::1"], ["10.0.0.1", "::2", "10.0.0.3"]])
def test_the_hand_bencoded_compact_answer_is_what_bencode_gives(ips: list[str]) -> None:
    peers = [HandedPeer(PeerAddress(ip, 6881 + i), bytes(20)) for i, ip in enumerate(ips)]
    expected: dict[str, Any] = {"interval": 300, "min interval": 60, "complete": 12,
                                "incomplete": 3,
                                "peers": b"".join(p.address.compact for p in peers
                                                  if ":" not in p.address.ip)}
    v6 = b"".join(p.address.compact for p in peers if ":" in p.address.ip)
    if v6:
        expected["peers6"] = v6
    assert announce_answer(peers, complete=12, incomplete=3, interval_s=300,
                           min_interval_s=60, compact=True) == bencode(expected)
