"""Private swarms (RELIABILITY.md "Swarm and tracker"; issue 8): SSL torrents of the
fleet CA, on real libtorrent sessions on 127.0.0.x.

Threats covered: an outsider who holds the torrent file (it is public on the origin)
connects straight to a fleet peer to download the payload or to see who is in the
swarm: with a certificate from another CA, or with none, it gets no byte; swapping the
fleet CA in the torrent changes the info-hash, which the signed manifest pins; a device
without a fleet identity cannot join (and falls back to the origin elsewhere). A fleet
member with a certificate from the fleet CA downloads from the seeder over TLS.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarmota.infra.devca import create_ca, issue_device_cert
from swarmota.peer.swarm import (
    SwarmConfig,
    SwarmSession,
    TorrentFile,
    TorrentHandleRef,
    make_torrent,
    read_torrent,
)
from tests.fake_bt_peer import encode_handshake

PIECE = 64 * 1024
SIZE = 24 * PIECE + 123


def identity(ca_dir: Path, out: Path, name: str, role: str = "device") -> tuple[bytes, bytes]:
    files = issue_device_cert(ca_dir, out, name, role=role)
    return files.cert.read_bytes(), files.key.read_bytes()


def session(host: str) -> SwarmSession:
    return SwarmSession(SwarmConfig(listen_host=host, ssl_listen=True))


def ssl_port(s: SwarmSession) -> int:
    return int(s._session.ssl_listen_port())


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@dataclass(frozen=True)
class Fleet:
    tmp: Path
    torrent: TorrentFile
    seed_dir: Path
    fleet_ca_dir: Path
    other_ca_dir: Path
    payload: bytes

    def identity(self, name: str, *, role: str = "device",
                 foreign: bool = False) -> tuple[bytes, bytes]:
        ca = self.other_ca_dir if foreign else self.fleet_ca_dir
        return identity(ca, self.tmp / f"id-{name}-{foreign}", name, role)

    def start_seeder(self) -> tuple[SwarmSession, TorrentHandleRef]:
        seeder = session("127.0.0.2")
        ref = seeder.add_payload(self.torrent.data, self.seed_dir, seed_mode=True,
                                 identity=self.identity("seeder-1", role="seed"))
        return seeder, ref


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    fleet_ca = create_ca(tmp_path / "fleet-ca")
    create_ca(tmp_path / "other-ca")
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    payload = seed_dir / "payload.bin"
    payload.write_bytes(random.Random(5).randbytes(SIZE))
    torrent = make_torrent(payload, piece_size_bytes=PIECE, swarm_ca=fleet_ca.read_bytes())
    return Fleet(tmp_path, torrent, seed_dir, tmp_path / "fleet-ca", tmp_path / "other-ca",
                 payload.read_bytes())


def test_private_torrent_carries_the_fleet_ca_and_the_info_hash_covers_it(
        fleet: Fleet) -> None:
    parsed = read_torrent(fleet.torrent.data)
    assert parsed.swarm_ca is not None and b"BEGIN CERTIFICATE" in parsed.swarm_ca
    other_ca = (fleet.other_ca_dir / "ca.pem").read_bytes()
    source = fleet.seed_dir / "payload.bin"
    swapped = make_torrent(source, piece_size_bytes=PIECE, swarm_ca=other_ca)
    open_swarm = make_torrent(source, piece_size_bytes=PIECE)
    assert len({fleet.torrent.info_hash, swapped.info_hash, open_swarm.info_hash}) == 3
    assert open_swarm.swarm_ca is None


def test_fleet_member_downloads_from_the_seeder_over_tls(fleet: Fleet) -> None:
    seeder, _ = fleet.start_seeder()
    with seeder, session("127.0.0.3") as device:
        ref = device.add_payload(fleet.torrent.data, fleet.tmp / "dev",
                                 identity=fleet.identity("device-1"))
        device.connect_peer(ref, "127.0.0.2", ssl_port(seeder))
        assert wait_until(lambda: all(device.pieces(ref).have))
        device.flush(ref)
        assert wait_until(lambda: (fleet.tmp / "dev" / "payload.bin").read_bytes()
                          == fleet.payload)


def test_outsider_with_a_foreign_certificate_gets_no_byte(fleet: Fleet) -> None:
    seeder, seeded = fleet.start_seeder()
    with seeder, session("127.0.0.4") as outsider:
        # a certificate for the same device name, from another CA
        ref = outsider.add_payload(fleet.torrent.data, fleet.tmp / "out",
                                   identity=fleet.identity("device-1", foreign=True))
        for _ in range(3):  # the TLS port, and the plain port the seeder also has
            outsider.connect_peer(ref, "127.0.0.2", ssl_port(seeder))
            outsider.connect_peer(ref, "127.0.0.2", seeder.listen_port)
            time.sleep(1.0)
        assert outsider.statistics(ref).bytes_downloaded_payload == 0
        assert not any(outsider.pieces(ref).have)
        assert seeder.statistics(seeded).bytes_uploaded_payload == 0


def test_outsider_speaking_plain_bittorrent_gets_no_handshake(fleet: Fleet) -> None:
    """Without TLS at all, a BitTorrent handshake naming the swarm is answered on
    neither port: the outsider cannot even confirm that the seeder is in it."""
    seeder, _ = fleet.start_seeder()
    with seeder:
        for port in (seeder.listen_port, ssl_port(seeder)):
            with socket.create_connection(("127.0.0.2", port), timeout=5) as sock:
                sock.sendall(encode_handshake(fleet.torrent.announce_hash, b"-XX0001-" + b"x" * 12))
                sock.settimeout(5)
                answer = b""
                try:
                    while len(answer) < 68:
                        data = sock.recv(68 - len(answer))
                        if not data:
                            break
                        answer += data
                except (TimeoutError, ConnectionResetError):
                    pass
                assert fleet.torrent.announce_hash not in answer, port


def test_a_session_without_identity_or_tls_listener_cannot_join(fleet: Fleet) -> None:
    with SwarmSession(SwarmConfig(listen_host="127.0.0.5")) as plain, \
            session("127.0.0.6") as no_identity:
        with pytest.raises(ValueError, match="private swarm"):
            plain.add_payload(fleet.torrent.data, fleet.tmp / "a",
                              identity=fleet.identity("device-9"))
        with pytest.raises(ValueError, match="private swarm"):
            no_identity.add_payload(fleet.torrent.data, fleet.tmp / "b")


def test_ssl_listener_is_announced_on_its_own_port() -> None:
    config = SwarmConfig(listen_host="127.0.0.7", listen_port=7100, ssl_listen=True)
    assert config.listen_interface == "127.0.0.7:7100,127.0.0.7:7101s"
    assert SwarmConfig(listen_host="::1", ssl_listen=True).listen_interface == "[::1]:0,[::1]:0s"
