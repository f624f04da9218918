"""The libtorrent adapter: v2-only torrents, quiet session settings, web-seed download.

Threats and failure modes covered: a torrent whose info-hash could be changed by
whoever edits its web seeds or trackers (it cannot: both live outside the info dict),
sessions that announce themselves on the LAN or the internet (DHT, LSD, UPnP, NAT-PMP
off), web seed URLs that libtorrent's SSRF mitigation would silently stall on (refused
up front), and the end-to-end path: a session fetching a payload from the real origin
server as its only web seed and writing identical bytes.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import libtorrent as lt
import pytest
import trio

from swarmota.infra.http_serve import ListenConfig
from swarmota.peer.errors import DownloadFailed
from swarmota.peer.swarm import (
    SwarmConfig,
    SwarmSession,
    make_torrent,
    new_peer_id,
    seniority,
    session_settings,
)
from swarmota.seeder import OriginApp, serve_origin

PAYLOAD_NAME = "ab" * 32 + ".zst"


def write_payload(directory: Path, size: int, seed: int = 7) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PAYLOAD_NAME
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


# --------------------------------------------------------------------------- make_torrent


def test_make_torrent_is_v2_only_single_file(tmp_path: Path) -> None:
    payload = write_payload(tmp_path, 100_000)
    torrent = make_torrent(payload, piece_size_bytes=64 * 1024)

    ti = lt.torrent_info(torrent.data)
    hashes = ti.info_hashes()
    assert hashes.has_v2() and not hashes.has_v1()
    assert str(hashes.v2) == torrent.info_hash
    assert len(torrent.info_hash) == 64
    assert torrent.announce_hash == bytes.fromhex(torrent.info_hash)[:20]
    assert ti.piece_length() == 64 * 1024 == torrent.piece_size_bytes
    assert ti.name() == PAYLOAD_NAME == torrent.name
    assert torrent.size_bytes == 100_000
    info = lt.bdecode(torrent.data)[b"info"]
    assert info[b"meta version"] == 2
    assert b"pieces" not in info  # no SHA-1 v1 piece hashes
    assert list(info[b"file tree"]) == [PAYLOAD_NAME.encode()]
    assert info[b"file tree"][PAYLOAD_NAME.encode()][b""][b"length"] == 100_000


def test_make_torrent_is_deterministic_and_can_rename(tmp_path: Path) -> None:
    payload = write_payload(tmp_path, 40_000)
    first = make_torrent(payload, piece_size_bytes=16 * 1024)
    again = make_torrent(payload, piece_size_bytes=16 * 1024)
    assert first == again

    renamed = make_torrent(payload, piece_size_bytes=16 * 1024, name="image.zst")
    assert lt.torrent_info(renamed.data).name() == "image.zst"
    assert renamed.info_hash != first.info_hash  # the name is part of the info dict


def test_web_seeds_and_trackers_do_not_change_the_info_hash(tmp_path: Path) -> None:
    payload = write_payload(tmp_path, 70_000)
    bare = make_torrent(payload, piece_size_bytes=16 * 1024)
    dressed = make_torrent(
        payload,
        piece_size_bytes=16 * 1024,
        web_seeds=["http://127.0.0.1:8080/payloads/" + PAYLOAD_NAME,
                   "https://cdn.example/payloads/" + PAYLOAD_NAME],
        trackers=["http://127.0.0.1:9000/announce"],
    )
    assert dressed.data != bare.data
    assert dressed.info_hash == bare.info_hash
    assert dressed.announce_hash == bare.announce_hash

    meta = lt.bdecode(dressed.data)
    # stored as directory URLs: libtorrent appends the file name (see _web_seed_base)
    assert meta[b"url-list"] == [b"http://127.0.0.1:8080/payloads/",
                                 b"https://cdn.example/payloads/"]
    assert meta[b"announce"] == b"http://127.0.0.1:9000/announce"
    assert meta[b"info"] == lt.bdecode(bare.data)[b"info"]


@pytest.mark.parametrize("piece_size", [0, -16384, 8 * 1024, 16 * 1024 + 1, 48 * 1024,
                                        128 * 1024 * 1024])
def test_invalid_piece_size_is_refused(tmp_path: Path, piece_size: int) -> None:
    payload = write_payload(tmp_path, 1000)
    with pytest.raises(ValueError, match="power of two"):
        make_torrent(payload, piece_size_bytes=piece_size)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/payloads/x.zst?token=1",
    "http://127.0.0.1:8080/payloads/x.zst#frag",
    "ftp://127.0.0.1/payloads/x.zst",
    "payloads/x.zst",
    "http://127.0.0.1:8080/payloads/other-name.zst",
])
def test_web_seed_urls_must_be_plain_http(tmp_path: Path, url: str) -> None:
    payload = write_payload(tmp_path, 1000)
    url = url.replace("x.zst", PAYLOAD_NAME)
    with pytest.raises(ValueError):
        make_torrent(payload, piece_size_bytes=16 * 1024, web_seeds=[url])
    torrent = make_torrent(payload, piece_size_bytes=16 * 1024)
    with SwarmSession(SwarmConfig()) as session, pytest.raises(ValueError):
        session.add_payload(torrent.data, tmp_path / "dl", web_seeds=[url])


def test_empty_payload_and_bad_torrent_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.zst"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        make_torrent(empty, piece_size_bytes=16 * 1024)
    with SwarmSession(SwarmConfig()) as session, pytest.raises(ValueError):
        session.add_payload(b"d4:infod", tmp_path)


# --------------------------------------------------------------------------- settings


def test_session_settings_are_quiet_and_tcp_only() -> None:
    settings = session_settings(SwarmConfig(listen_host="127.0.0.2", listen_port=0))
    assert settings["listen_interfaces"] == "127.0.0.2:0"
    for name in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp",
                 "enable_outgoing_utp", "enable_incoming_utp",
                 "allow_multiple_connections_per_ip", "enable_ip_notifier"):
        assert settings[name] is False, name
    assert settings["dht_bootstrap_nodes"] == ""
    assert settings["enable_outgoing_tcp"] is True
    assert settings["enable_incoming_tcp"] is True
    assert settings["ssrf_mitigation"] is True
    assert settings["download_rate_limit"] == 0
    assert settings["upload_rate_limit"] == 0
    # outgoing connections leave from the listen address, not from whatever the kernel picks
    assert settings["outgoing_interfaces"] == "127.0.0.2"
    assert session_settings(SwarmConfig(listen_host="0.0.0.0"))["outgoing_interfaces"] == ""
    # every name is one libtorrent knows (outgoing_interfaces is missing from the
    # bindings' default_settings(), but a session takes it and reports it back)
    known = set(lt.session({"enable_dht": False}).get_settings())
    assert set(settings) <= known


def test_peer_id_is_fresh_per_session_unless_given() -> None:
    with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as a, \
            SwarmSession(SwarmConfig(listen_host="127.0.0.3")) as b:
        assert len(a.peer_id) == 20 and a.peer_id.startswith(b"-SW0200-")
        assert a.peer_id != b.peer_id
    given = b"-SW0200-abcdefabcdef"
    assert session_settings(SwarmConfig(peer_id=given))["peer_fingerprint"] == given.decode()
    with pytest.raises(ValueError, match="20 ASCII bytes"):
        SwarmConfig(peer_id=b"short")


def test_session_settings_map_limits_and_ipv6() -> None:
    settings = session_settings(SwarmConfig(
        listen_host="::1", listen_port=6881,
        download_rate_limit_bytes_per_s=1_000_000, upload_rate_limit_bytes_per_s=500,
        allow_multiple_connections_per_ip=True))
    assert settings["listen_interfaces"] == "[::1]:6881"
    assert settings["download_rate_limit"] == 1_000_000
    assert settings["upload_rate_limit"] == 500
    assert settings["allow_multiple_connections_per_ip"] is True


def test_swarm_config_validates() -> None:
    with pytest.raises(ValueError):
        SwarmConfig(listen_port=70000)
    with pytest.raises(ValueError):
        SwarmConfig(download_rate_limit_bytes_per_s=-1)
    with pytest.raises(ValueError):
        SwarmConfig(listen_host="127.0.0.1:1,0.0.0.0")


def test_a_real_session_applies_the_settings() -> None:
    with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as session:
        applied = session._session.get_settings()
        for name in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp",
                     "enable_outgoing_utp", "enable_incoming_utp"):
            assert applied[name] is False, name


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(("size", "seed_in_torrent"), [
    # odd tail, file URL in the torrent: the case libtorrent's tail pad file breaks
    (3 * 1024 * 1024 + 12_345, True),
    # piece-aligned, directory URL given to add_payload only
    (3 * 1024 * 1024, False),
])
async def test_session_downloads_payload_from_origin_web_seed(
        tmp_path: Path, size: int, seed_in_torrent: bool) -> None:
    root = tmp_path / "origin"
    payload = write_payload(root / "payloads", size)
    app = OriginApp(root)
    save_dir = tmp_path / "download"
    save_dir.mkdir()

    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(serve_origin, app, ListenConfig(host="127.0.0.1", port=0))
        file_url = f"{base_url}/payloads/{PAYLOAD_NAME}"
        in_torrent = [file_url] if seed_in_torrent else []
        torrent = await trio.to_thread.run_sync(
            lambda: make_torrent(payload, piece_size_bytes=64 * 1024, web_seeds=in_torrent))

        with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as session:
            extra = [] if seed_in_torrent else [f"{base_url}/payloads/"]
            ref = session.add_payload(torrent.data, save_dir, web_seeds=extra)
            assert ref.info_hash == torrent.info_hash
            assert ref.path == save_dir / PAYLOAD_NAME
            started = time.perf_counter()
            await session.wait_complete(ref, timeout_s=60)
            elapsed = time.perf_counter() - started
            stats = session.statistics(ref)
            events = session.pop_events()
        nursery.cancel_scope.cancel()

    assert (save_dir / PAYLOAD_NAME).read_bytes() == payload.read_bytes()
    assert app.statistics().bytes_payloads >= size
    assert stats.is_seeding
    assert stats.progress == 1.0
    assert stats.bytes_done == size
    assert stats.bytes_downloaded_payload >= size
    assert stats.bytes_from_web_seeds == stats.bytes_downloaded_payload
    assert stats.bytes_from_peers == 0
    assert stats.bytes_failed == 0
    kinds = {event.kind for event in events}
    assert "torrent_finished" in kinds
    assert all(e.info_hash in (None, torrent.info_hash) for e in events)
    assert not [e for e in events if e.kind in ("torrent_error", "file_error", "hash_failed")]
    assert elapsed < 30, f"web seed download took {elapsed:.1f} s"


async def test_wait_complete_times_out_with_download_failed(tmp_path: Path) -> None:
    payload = write_payload(tmp_path / "src", 50_000)
    # Nothing listens on this port: the web seed never answers.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    torrent = make_torrent(payload, piece_size_bytes=16 * 1024,
                           web_seeds=[f"http://127.0.0.1:{dead_port}/payloads/{PAYLOAD_NAME}"])
    with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as session:
        ref = session.add_payload(torrent.data, tmp_path / "dl")
        with pytest.raises(DownloadFailed, match="not complete"):
            await session.wait_complete(ref, timeout_s=0.5)
        assert session.statistics(ref).progress < 1.0


async def test_wait_news_sleeps_while_libtorrent_is_quiet_and_wakes_on_its_next_alert(
        tmp_path: Path) -> None:
    """The download loop waits on this instead of a fixed tick: it must not return
    before libtorrent has news (or the timeout), and must return as soon as it has."""
    payload = write_payload(tmp_path / "have", 80_000)
    torrent = make_torrent(payload, piece_size_bytes=16 * 1024)
    with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as session:
        with trio.fail_after(30):
            await session.wait_news(60)  # the listen socket's alert
        # Once the start-up alerts (one per listen socket, the external address, ...)
        # are read, nothing is going on: a wait lasts its whole timeout. A late start-up
        # alert, or the pipe's byte for an alert already read, may end one wait early;
        # a wait_news that never sleeps ends every one early.
        quiet = []
        for _ in range(10):
            session.pop_events()
            began = trio.current_time()
            await session.wait_news(0.3)
            quiet.append(trio.current_time() - began)
            if quiet[-1] >= 0.3:
                break
        assert quiet[-1] >= 0.3, quiet
        session.add_payload(torrent.data, payload.parent, seed_mode=True)
        with trio.fail_after(30):  # without the wake-up: 600 s
            await session.wait_news(600)
        assert any(e.kind == "add_torrent" for e in session.pop_events())
    with pytest.raises(RuntimeError, match="closed"):
        await session.wait_news(1)


async def test_a_peer_id_set_before_adding_a_torrent_is_the_one_its_peers_see(
        tmp_path: Path) -> None:
    """A device sets its peer id (its seniority) when it adds the payload's torrent, not
    when its session started: the other downloaders must see that one."""
    payload = write_payload(tmp_path / "have", 200_000)
    torrent = make_torrent(payload, piece_size_bytes=16 * 1024)
    with SwarmSession(SwarmConfig(listen_host="127.0.2.3")) as seed, \
            SwarmSession(SwarmConfig(listen_host="127.0.2.4",  # still downloading
                                     download_rate_limit_bytes_per_s=20_000)) as leech:
        first = leech.peer_id
        later = new_peer_id(time.time() + 60)
        leech.set_peer_id(later)
        assert leech.peer_id == later != first
        seeding = seed.add_payload(torrent.data, payload.parent, seed_mode=True)
        leech.add_payload(torrent.data, tmp_path / "dl")
        seed.connect_peer(seeding, "127.0.2.4", leech.listen_port)
        with trio.fail_after(30):
            while later not in seed.pieces(seeding).downloading_peer_ids:
                await trio.sleep(0.05)
        with pytest.raises(ValueError):
            leech.set_peer_id(b"short")


async def test_seed_mode_session_reports_complete_without_download(tmp_path: Path) -> None:
    payload = write_payload(tmp_path / "have", 80_000)
    torrent = make_torrent(payload, piece_size_bytes=16 * 1024)
    with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as session:
        ref = session.add_payload(torrent.data, payload.parent, seed_mode=True)
        await session.wait_complete(ref, timeout_s=10)
        stats = session.statistics(ref)
        assert stats.is_seeding and stats.bytes_downloaded_payload == 0
        assert session.listen_port > 0
    assert os.path.getsize(payload) == 80_000


async def test_libtorrent_downloads_a_published_payload_from_the_origin_web_seed(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """The torrent publish writes is the one the signed manifest names, and a real
    libtorrent session completes it with the origin as its only source."""
    from swarmota.demo import make_image
    from swarmota.seeder.publish import publish_release
    from swarmota.seeder.repository import Repository

    repo = Repository.create(tmp_path / "repo")
    image = tmp_path / "v1.img"
    image.write_bytes(make_image(1 << 20, seed=5))
    manifest = publish_release(repo, image, product="acme-router", version="1.0.0",
                               release_counter=1, compatibility=["hw1"], zstd_level=3)
    payload = manifest.full_payload
    torrent_data = (repo.origin_dir / payload.torrent_path).read_bytes()
    info = lt.torrent_info(lt.bdecode(torrent_data))
    assert info.info_hashes().v2.to_bytes().hex() == payload.info_hash
    assert info.piece_length() == payload.chunk_size

    url = await nursery.start(serve_origin, OriginApp(repo.origin_dir), ListenConfig())
    with SwarmSession(SwarmConfig(listen_host="127.0.0.2")) as session:
        ref = session.add_payload(torrent_data, tmp_path / "dl",
                                  web_seeds=[f"{url}/{payload.path}"])
        await session.wait_complete(ref, timeout_s=60)
        assert ref.path.read_bytes() == (repo.origin_dir / payload.path).read_bytes()


async def seed_and_leech(tmp_path: Path, seeder: SwarmConfig, leecher: SwarmConfig,
                         seconds: float) -> tuple[int, int]:
    """A 2 MiB payload seeded by one session, leeched by another over loopback for
    ``seconds``: (piece bytes the seeder uploaded, the leecher downloaded)."""
    payload = write_payload(tmp_path / "seed", 2 * 1024 * 1024)
    torrent = await trio.to_thread.run_sync(
        lambda: make_torrent(payload, piece_size_bytes=16 * 1024))
    with SwarmSession(seeder) as a, SwarmSession(leecher) as b:
        ra = a.add_payload(torrent.data, payload.parent, seed_mode=True)
        rb = b.add_payload(torrent.data, tmp_path / "leech")
        b.connect_peer(rb, seeder.listen_host, a.listen_port)
        # measure from the connection on (a loaded machine may take a while to get there)
        with trio.fail_after(20):
            while b.statistics(rb).num_peers == 0:
                await trio.sleep(0.05)
        await trio.sleep(seconds)
        return a.statistics(ra).bytes_uploaded_payload, b.statistics(rb).bytes_downloaded_payload


async def test_upload_rate_limit_holds_for_lan_peers(tmp_path: Path) -> None:
    """libtorrent exempts local-network peers from rate limits by default; a device's
    cap must hold on its own LAN (here: loopback), where its peers are."""
    limit = 64 * 1024
    uploaded, _ = await seed_and_leech(
        tmp_path, SwarmConfig(listen_host="127.0.0.2", upload_rate_limit_bytes_per_s=limit),
        SwarmConfig(listen_host="127.0.0.3"), seconds=2.0)
    # unlimited, the 2 MiB would be across in well under a second
    assert 0 < uploaded <= 4 * limit, uploaded


async def test_download_rate_limit_holds_for_lan_peers(tmp_path: Path) -> None:
    limit = 64 * 1024
    _, done = await seed_and_leech(
        tmp_path, SwarmConfig(listen_host="127.0.0.2"),
        SwarmConfig(listen_host="127.0.0.3", download_rate_limit_bytes_per_s=limit),
        seconds=2.0)
    assert 0 < done <= 4 * limit, done


async def test_upload_disabled_sends_no_piece_data_at_all(tmp_path: Path) -> None:
    """Not even BEP 6 "allowed fast" pieces, which choked peers may otherwise request."""
    uploaded, done = await seed_and_leech(
        tmp_path, SwarmConfig(listen_host="127.0.0.2", upload_enabled=False),
        SwarmConfig(listen_host="127.0.0.3"), seconds=2.0)
    assert uploaded == 0 and done == 0


def test_peers_agree_on_seniority_from_their_peer_ids_alone() -> None:
    """The senior downloader (earliest session start) fetches from the origin for the
    others; every peer derives the same order from the ids, without talking."""
    early, late = new_peer_id(1_000.00), new_peer_id(1_000.01)
    assert len(early) == len(late) == 20 and early.startswith(b"-SW0200-")
    assert seniority(early) < seniority(late)
    capped = new_peer_id(999.0, lead=False)  # its downloads are rate-limited
    foreign = b"-qB4650-abcdefabcdef"  # another client, or an older agent
    older = b"-SW0100-0123456789ab"
    order = sorted([foreign, capped, late, older, early], key=seniority)
    assert order[:3] == [early, late, capped]
    assert set(order[3:]) == {foreign, older}
    assert len({new_peer_id(5.0)[17:] for _ in range(64)}) > 1  # a random tail
    broken = b"-SW0200-xyzxyzxyzxyz"  # not hex: ranked like a foreign id
    assert seniority(broken) > seniority(capped)
