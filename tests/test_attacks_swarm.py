"""Swarm and tracker attacks (RELIABILITY.md, "Swarm and tracker") not covered by
tests/test_swarm_update.py and tests/test_swarm_liars.py: peers that unchoke and never
send, a tracker whose BitTorrent side is down or hands out another swarm, a spoofed
tracker against the device's own rules, and no local discovery or DHT traffic.

Devices run the real agent in swarm mode (libtorrent, TCP only, on 127.0.0.x); the
tracker is the real one, behind :class:`TrackerProxy` where its announces misbehave;
misbehaving peers are :mod:`tests.fake_bt_peer`. Bounds are byte counts and generous
timeouts, never measured durations.
"""

from __future__ import annotations

import shutil
import struct
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import trio

from swarmota.infra.http_serve import ListenConfig, Receive, Scope, Send, serve_asgi
from swarmota.peer.agent import swarm_config_for, update_once
from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import StatusCode
from swarmota.peer.state import DeviceState
from swarmota.peer.swarm import SwarmConfig, session_settings
from swarmota.seeder.origin import OriginConfig
from swarmota.seeder.seeding import PayloadSeeder, SeedingConfig
from tests.fake_bt_peer import FakeBtPeer, Mode
from tests.release_env import (
    REPO_ROOT,
    ReleaseEnv,
    announce_fake,
    assert_untouched,
    killed_mid_download,
    off_base_device,
    read_body,
    serve_offer,
    start_env,
)

TEASE_HOSTS = ("127.0.0.4", "127.0.0.5")


def assert_updated_and_reported(env: ReleaseEnv, dev: DeviceState, status: StatusCode,
                                message: str) -> None:
    assert status == StatusCode.OK, message
    bc = dev.bootctl()
    assert bc.primary == bc.committed and not bc.pending
    assert dev.slot_path(bc.committed).read_bytes() == env.v2
    assert not list(dev.downloads_dir.iterdir()), "work area removed"
    mine = env.reports(dev.config().device_id)
    assert [(r.status, r.to_version) for r in mine] == [(0, "2.0.0")]


async def test_every_peer_unchokes_and_never_sends_the_origin_finishes_the_job(
        env: ReleaseEnv) -> None:
    """Two peers claim every piece, unchoke, take requests and never answer. The device
    waits one stall window (2 s) for them, then the origin sends the payload: no byte
    from peers, at most a few chunks more than the payload from the origin."""
    full = env.m2.full_payload
    assert full.info_hash is not None
    announce_hash = bytes.fromhex(full.info_hash)[:20]
    with FakeBtPeer(announce_hash, full.chunk_count, mode=Mode.TEASE,
                    host=TEASE_HOSTS[0]) as first, \
            FakeBtPeer(announce_hash, full.chunk_count, mode=Mode.TEASE,
                       host=TEASE_HOSTS[1]) as second:
        await announce_fake(env, full, first)
        await announce_fake(env, full, second)
        dev = off_base_device(env, "patient")
        with trio.fail_after(120):
            result = await update_once(dev)
        stats = [first.stats(), second.stats()]
    assert_updated_and_reported(env, dev, result.status, result.message)
    assert sum(s.requests for s in stats) >= 1, "the teasing peers were asked"
    assert sum(s.pieces_sent for s in stats) == 0
    assert result.bytes_peers == 0
    assert result.bytes_origin <= env.origin_bytes(full) + 4 * full.chunk_size



async def test_killed_mid_swarm_with_an_honest_seed_resumes_and_bans_nobody(
        tmp_path: Path, nursery: trio.Nursery, images: tuple[bytes, bytes]) -> None:
    """SIGKILL a device in the middle of a download from a (rate-limited) honest seeder
    and a slow origin; the next pass keeps the verified chunks, finishes from the same
    seeder, and bans nobody over data from before the restart."""
    env = await start_env(nursery, tmp_path, *images, origin_config=OriginConfig(
        rate_limit_bytes_per_s=64 * 1024, rate_limit_burst_bytes=16 * 1024))
    seeder = PayloadSeeder(env.repo.origin_dir, SeedingConfig(
        swarm=SwarmConfig(listen_host="127.0.0.2", upload_rate_limit_bytes_per_s=128 * 1024),
        announce_urls=(f"{env.tracker_url}/announce",)))
    await nursery.start(seeder.run)
    full = env.m2.full_payload
    dev = off_base_device(env, "killed")
    done_at_kill = await killed_mid_download(dev, full.chunk_count // 5)
    assert dev.bootctl().slot(dev.bootctl().primary).version == "0.9.0", "still on the old slot"
    with trio.fail_after(120):
        result = await update_once(dev, seed_time_s=0)
    assert_updated_and_reported(env, dev, result.status, result.message)
    assert result.chunks_reused >= done_at_kill and result.bytes_peers > 0
    assert result.banned_peers == [], "nobody banned over data from before the restart"


class TrackerProxy:
    """The real tracker for check-ins and reports; its BitTorrent side replaced:
    ``announce`` is ``None`` (503: down) or the raw bencoded answer to give."""

    def __init__(self, tracker_url: str) -> None:
        self.tracker_url = tracker_url
        self.announce: bytes | None = None
        self.announces = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["path"] == "/announce":
            self.announces += 1
            status, answer = (503, b"down") if self.announce is None else (200, self.announce)
            headers = [(b"content-type", b"text/plain")]
        else:
            async with httpx.AsyncClient() as client:
                forwarded = await client.request(
                    scope["method"], self.tracker_url + scope["path"], content=body,
                    headers={"content-type": "application/json"})
            status, answer = forwarded.status_code, forwarded.content
            headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


async def tracker_proxy(env: ReleaseEnv, nursery: trio.Nursery) -> tuple[TrackerProxy, str]:
    proxy = TrackerProxy(env.tracker_url)
    url: str = await nursery.start(serve_asgi, proxy, ListenConfig())
    return proxy, url


def compact_answer(host: str, port: int) -> bytes:
    peer = bytes(int(part) for part in host.split(".")) + struct.pack(">H", port)
    return b"d8:intervali60e5:peers6:" + peer + b"e"


async def test_tracker_announces_down_the_device_updates_from_the_origin(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    proxy, url = await tracker_proxy(env, nursery)
    dev = off_base_device(env, "dev-1", tracker_url=url)
    with trio.fail_after(120):
        result = await update_once(dev)
    assert_updated_and_reported(env, dev, result.status, result.message)
    assert proxy.announces >= 1 and result.bytes_peers == 0


async def test_tracker_handing_out_another_swarm_the_device_joins_only_its_signed_swarm(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """The tracker names a peer of v1's swarm (a liar) as a peer of v2's. The device
    connects with v2's signed info-hash only: the peer never completes a handshake with
    it, no piece of v1 is taken, and the origin finishes the job."""
    v1 = env.m1.full_payload
    assert v1.info_hash is not None
    with FakeBtPeer(bytes.fromhex(v1.info_hash)[:20], v1.chunk_count, mode=Mode.LIAR,
                    host=TEASE_HOSTS[0]) as other:
        proxy, url = await tracker_proxy(env, nursery)
        proxy.announce = compact_answer(other.host, other.port)
        dev = off_base_device(env, "dev-1", tracker_url=url)
        with trio.fail_after(120):
            result = await update_once(dev)
        stats = other.stats()
    assert_updated_and_reported(env, dev, result.status, result.message)
    assert stats.connections >= 1, "the device did dial the peer it was handed"
    assert stats.handshakes == 0 and stats.pieces_sent == 0, "it never joined v1's swarm"
    assert result.bytes_peers == 0 and result.banned_peers == []


async def test_garbage_from_the_tracker_announce_is_ignored_and_the_origin_used(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    proxy, url = await tracker_proxy(env, nursery)
    proxy.announce = b"d8:intervali-1e5:peers7:\xff\xff\xff\xff\xff\xff\xffe" + b"\x00" * 100
    dev = off_base_device(env, "dev-1", tracker_url=url)
    with trio.fail_after(120):
        result = await update_once(dev)
    assert_updated_and_reported(env, dev, result.status, result.message)


async def test_spoofed_tracker_offer_cannot_bypass_the_device_install_policy(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """A tracker that is not ours (spoofed, without TLS pins) offers a genuine, signed
    v2: the device still applies its own rules: outside its maintenance window it
    downloads nothing (the tracker's rollout is not a signed constraint; pins keep an
    impostor out: test_transport_attacks.py::test_device_with_wrong_pins_...)."""
    evil = await serve_offer(nursery, {"product": "acme-router", "version": "2.0.0",
                                       "release_counter": 2,
                                       "target": "releases/acme-router/2.0.0.json"})
    dev = env.device("dev-1", mode="direct", tracker_url=evil)
    dev.policy_path.write_text('[schedule]\nwindows = ["02:00-05:00"]\n')
    before = env.origin.statistics().bytes_payloads
    noon = datetime(2026, 12, 2, 12, 0, tzinfo=UTC).timestamp()
    result = await update_once(dev, wall_clock=lambda: noon)
    assert result.status == StatusCode.OK and not result.attempted
    assert result.deferred == "outside the maintenance windows"
    assert env.origin.statistics().bytes_payloads == before
    assert_untouched(dev, env.v1)


_LSD_PROBE = textwrap.dedent('''
    import socket, struct, sys, time
    from pathlib import Path
    import libtorrent as lt
    from swarmota.peer.swarm import SwarmConfig, SwarmSession, make_torrent

    GROUP, PORT = "239.192.152.143", 6771
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("", PORT))
    listener.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        struct.pack("4s4s", socket.inet_aton(GROUP), socket.inet_aton("127.0.0.1")))
    listener.settimeout(0.2)

    def heard(rounds, stop_at_first=False):
        got = []
        for _ in range(rounds):
            try:
                got.append(listener.recv(2048))
            except TimeoutError:
                pass
            if stop_at_first and any(b"BT-SEARCH" in m for m in got):
                break
        return got

    work = Path(sys.argv[1])
    (work / "payload").write_bytes(b"x" * 65536)
    torrent = make_torrent(work / "payload", piece_size_bytes=16384).data
    # the agent's session: as peer/agent.py builds it (defaults: nothing to turn LSD on)
    with SwarmSession(SwarmConfig(listen_host="127.0.0.1", listen_port=0)) as session:
        applied = session._session.get_settings()
        (work / "a").mkdir()
        (work / "a" / "payload").write_bytes(b"x" * 65536)
        session.add_payload(torrent, work / "a", seed_mode=True)
        quiet = heard(25)
    # control: the same torrent in a session with LSD on is heard within those rounds
    control = lt.session({"enable_lsd": True, "enable_dht": False,
                          "listen_interfaces": "127.0.0.1:0"})
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(lt.bdecode(torrent))
    params.save_path = str(work)
    control.add_torrent(params)
    loud = heard(150, stop_at_first=True)
    print(len(quiet), len([m for m in loud if b"BT-SEARCH" in m]),
          *(int(bool(applied[k])) for k in ("enable_lsd", "enable_dht", "enable_upnp",
                                             "enable_natpmp")))
''')


async def test_lsd_and_dht_stay_off_and_nothing_announces_info_hashes_on_the_lan(
        tmp_path: Path) -> None:
    """Inside a network namespace of its own (``unshare -rn``: no other traffic, a
    multicast route on lo), a listener joins libtorrent's local-discovery group
    239.192.152.143:6771. The agent's session, seeding a torrent, sends nothing there,
    and its live settings have LSD, DHT, UPnP and NAT-PMP off. A control session with
    LSD on is heard on the same listener: the silence means something. A namespace,
    not the host: the test cannot leak, and another process's LSD cannot disturb it."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip for a private network namespace")
    script = ("ip link set lo up && ip link set lo multicast on && "
              "ip route add 239.0.0.0/8 dev lo && exec \"$0\" -c \"$1\" \"$2\"")
    probe = await trio.run_process(
        ["unshare", "-rn", "sh", "-c", script, sys.executable, _LSD_PROBE, str(tmp_path)],
        cwd=REPO_ROOT, capture_stdout=True, capture_stderr=True, check=False)
    if probe.returncode != 0 and b"Operation not permitted" in probe.stderr:
        pytest.skip("user namespaces are not allowed here")
    assert probe.returncode == 0, probe.stderr.decode(errors="replace")[-2000:]
    quiet, control, *flags = (int(x) for x in probe.stdout.split())
    assert control >= 1, "the control session with LSD on was not heard: probe broken"
    assert quiet == 0, "the agent's session sent local service discovery announces"
    assert flags == [0, 0, 0, 0], "LSD, DHT, UPnP, NAT-PMP must be off in the live session"



def test_local_discovery_only_when_the_device_policy_allows_it_and_dht_never() -> None:
    """The agent's session settings: LSD off by default and on only with the device's
    swarm_local_discovery; DHT, UPnP and NAT-PMP off either way; a TLS listener only
    for a device with a fleet identity."""
    base = DeviceConfig(device_id="d-1", product="acme-router", hardware_id="hw-1",
                        origin_url="http://127.0.0.1:1", tracker_url="http://127.0.0.1:2",
                        swarm_listen="127.0.0.9:0")
    for allowed in (False, True):
        config = DeviceConfig(**{**base.__dict__, "swarm_local_discovery": allowed})
        for identity in (False, True):
            swarm = swarm_config_for(config, has_identity=identity)
            settings = session_settings(swarm)
            assert settings["enable_lsd"] is allowed
            assert settings["enable_dht"] is False and settings["dht_bootstrap_nodes"] == ""
            assert settings["enable_upnp"] is False and settings["enable_natpmp"] is False
            assert swarm.ssl_listen is identity
            assert settings["listen_interfaces"].endswith("s") is identity
