"""Transport attacks (RELIABILITY.md, "Transport", TLS rows), on real hypercorn servers
on 127.0.0.1 with certificates from infra/devca.py.

An attacker on the path (same Wi-Fi, a rogue DNS answer, a CA that issued a certificate
it should not have) must not get a single HTTP byte from the agent, nor bend it to plain
http or another host; a downgrade of the TLS version is refused by the servers.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from tuf.api import exceptions as tuf_exceptions

from swarmota.infra.devca import ServerFiles, create_ca, generate_key_file, issue_server_cert
from swarmota.infra.http_serve import ListenConfig, Receive, Scope, Send, serve_asgi
from swarmota.peer.agent import update_once
from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import ConfigError, DownloadFailed, PinMismatch, StatusCode
from swarmota.peer.http import HttpClient, TlsPolicy, TufFetcher, _install_pinning
from swarmota.seeder import OriginApp, serve_origin
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.server import serve_tracker
from tests.release_env import HARDWARE_ID, PRODUCT, ReleaseEnv, assert_untouched, start_env
from tests.test_origin_tls import _handshake, _local_tls11_works, _tls11_client_context

BODY = b'{"signed": "timestamp"}\n'
PATH = "/metadata/timestamp.json"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the fleet's (development) CA certificate
    origin: ServerFiles  # origin certificate from the fleet CA
    tracker: ServerFiles  # tracker certificate from the fleet CA, its own key
    backup_pin: str  # a spare key, pinned but not yet used
    rotated: ServerFiles  # the origin moved to the spare key
    foreign: ServerFiles  # origin certificate from another CA, with the origin's key

    @property
    def pins(self) -> frozenset[str]:
        return frozenset({self.origin.pin, self.tracker.pin, self.backup_pin})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = create_ca(d / "ca")
    origin = issue_server_cert(d / "ca", d / "origin", ["127.0.0.1", "localhost"])
    tracker = issue_server_cert(d / "ca", d / "tracker", ["127.0.0.1"])
    backup_pin = generate_key_file(d / "spare-key.pem")
    rotated = issue_server_cert(d / "ca", d / "rotated", ["127.0.0.1"],
                                key_file=d / "spare-key.pem")
    create_ca(d / "foreign-ca")
    foreign = issue_server_cert(d / "foreign-ca", d / "foreign", ["127.0.0.1"],
                                key_file=origin.key)
    return Pki(ca, origin, tracker, backup_pin, rotated, foreign)


def _listen(files: ServerFiles) -> ListenConfig:
    return ListenConfig(certfile=str(files.cert), keyfile=str(files.key))


def _origin_app(tmp_path: Path) -> OriginApp:
    root = tmp_path / "origin"
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "timestamp.json").write_bytes(BODY)
    return OriginApp(root)


async def _serve(nursery: trio.Nursery, app: OriginApp, files: ServerFiles) -> str:
    url: str = await nursery.start(serve_origin, app, _listen(files))
    return url


def _policy(pki: Pki, pins: frozenset[str] | None = None) -> TlsPolicy:
    return TlsPolicy(pins=pki.pins if pins is None else pins, ca_file=str(pki.ca))


def _tuf_get(url: str, tls: TlsPolicy) -> bytes:
    fetcher = TufFetcher(timeout_s=10, tls=tls)
    try:
        return fetcher.download_bytes(url, 1 << 16)
    finally:
        fetcher.close()


async def test_certificate_from_a_foreign_ca_is_refused(
        pki: Pki, tmp_path: Path, nursery: trio.Nursery) -> None:
    # Same key as the real origin, so the pin would match: the chain check must refuse.
    app = _origin_app(tmp_path)
    url = await _serve(nursery, app, pki.foreign)
    with trio.fail_after(20):
        async with HttpClient(timeout_s=10, tls=_policy(pki)) as http:
            with pytest.raises(DownloadFailed, match="CERTIFICATE_VERIFY_FAILED") as info:
                await http.get_bytes(url + PATH, max_bytes=1024)
        assert not isinstance(info.value, PinMismatch)
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            await trio.to_thread.run_sync(_tuf_get, url + PATH, _policy(pki))
    assert app.statistics().requests == 0


async def test_valid_certificate_with_an_unpinned_key_is_refused_before_any_request(
        pki: Pki, tmp_path: Path, nursery: trio.Nursery) -> None:
    app = _origin_app(tmp_path)
    url = await _serve(nursery, app, pki.origin)
    pins = pki.pins - {pki.origin.pin}
    with trio.fail_after(20):
        # Control: the certificate is valid for the CA bundle, without pins it is used.
        async with HttpClient(timeout_s=10, tls=TlsPolicy(ca_file=str(pki.ca))) as http:
            assert await http.get_bytes(url + PATH, max_bytes=1024) == BODY
        assert app.statistics().requests == 1
        async with HttpClient(timeout_s=10, tls=_policy(pki, pins)) as http:
            with pytest.raises(PinMismatch) as info:
                await http.get_bytes(url + PATH, max_bytes=1024)
            assert "127.0.0.1" in str(info.value) and pki.origin.pin in str(info.value)
            assert info.value.status == StatusCode.DOWNLOAD_FAILED
            with pytest.raises(PinMismatch):
                await http.get_range(url + PATH, 0, 4)
            with pytest.raises(PinMismatch):
                await http.post_json(url + "/v1/checkin", {"device_id": "x"})
        with pytest.raises(tuf_exceptions.DownloadError) as tuf_info:
            await trio.to_thread.run_sync(_tuf_get, url + PATH, _policy(pki, pins))
        assert isinstance(tuf_info.value.__cause__, PinMismatch)  # see peer/trust.py
    assert app.statistics().requests == 1, "a request reached the server past the pin"


async def test_backup_pin_accepts_a_rotated_server_key(
        pki: Pki, tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy from the environment would bypass the pinned connection pool: a pinned
    # agent ignores it (here it points to a closed port, so using it would fail).
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    app = _origin_app(tmp_path)
    old_url = await _serve(nursery, app, pki.origin)
    new_url = await _serve(nursery, app, pki.rotated)
    assert pki.rotated.pin == pki.backup_pin != pki.origin.pin
    with trio.fail_after(20):
        async with HttpClient(timeout_s=10, tls=_policy(pki)) as http:
            assert await http.get_bytes(old_url + PATH, max_bytes=1024) == BODY
            assert await http.get_bytes(new_url + PATH, max_bytes=1024) == BODY
        assert await trio.to_thread.run_sync(_tuf_get, new_url + PATH, _policy(pki)) == BODY
        # Without the backup pin the rotated server is refused.
        without_backup = _policy(pki, pki.pins - {pki.backup_pin})
        async with HttpClient(timeout_s=10, tls=without_backup) as http:
            with pytest.raises(PinMismatch):
                await http.get_bytes(new_url + PATH, max_bytes=1024)
    assert app.statistics().requests == 3


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def _client_hello(version: int, ciphers: tuple[int, ...]) -> bytes:
    """A minimal ClientHello record offering exactly ``version`` (no supported_versions
    extension), written by hand: no client TLS library decides what is offered."""
    def u16(n: int) -> bytes:
        return n.to_bytes(2, "big")

    def ext(kind: int, data: bytes) -> bytes:
        return u16(kind) + u16(len(data)) + data

    suites = b"".join(u16(c) for c in ciphers)
    groups, sigs = u16(23), bytes.fromhex("040308040401")  # P-256; ECDSA/PSS/PKCS1 SHA-256
    extensions = (ext(10, u16(len(groups)) + groups) + ext(11, b"\x01\x00")
                  + ext(13, u16(len(sigs)) + sigs))
    body = (u16(version) + bytes(32) + b"\x00" + u16(len(suites)) + suites + b"\x01\x00"
            + u16(len(extensions)) + extensions)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + u16(len(handshake)) + handshake


# TLS 1.1: ECDHE-ECDSA with AES-CBC; TLS 1.2 also with AES-GCM (hypercorn's ciphers).
_TLS11_HELLO = _client_hello(0x0302, (0xC009, 0xC00A, 0xC02B, 0xC02C))
_TLS12_HELLO = _client_hello(0x0302 + 1, (0xC02B, 0xC02C, 0xC009))


def _first_server_record(url: str, hello: bytes) -> bytes:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(hello)
        data = b""
        while len(data) < 11:
            block = sock.recv(4096)
            if not block:
                break
            data += block
        return data


def _is_refused(record: bytes) -> bool:
    """A fatal protocol_version alert, or (hypercorn on trio does not flush the alert)
    the connection closed before any handshake record."""
    return record == b"" or (record[:1] == b"\x15" and record[5:7] == b"\x02\x46")


def _is_server_hello(record: bytes, version: int) -> bool:
    return record[:1] == b"\x16" and record[5:6] == b"\x02" and record[9:11] == version.to_bytes(
        2, "big")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_below_1_2_is_refused(pki: Pki, tmp_path: Path,
                                        nursery: trio.Nursery) -> None:
    url = await _serve(nursery, _origin_app(tmp_path), pki.origin)
    with trio.fail_after(20):
        # A hand-written TLS 1.1 ClientHello is refused, the same hello for TLS 1.2
        # gets a ServerHello (control: the hello is well-formed).
        refused = await trio.to_thread.run_sync(_first_server_record, url, _TLS11_HELLO)
        assert _is_refused(refused), refused.hex()
        accepted = await trio.to_thread.run_sync(_first_server_record, url, _TLS12_HELLO)
        assert _is_server_hello(accepted, 0x0303), accepted.hex()
        only_12 = ssl.create_default_context(cafile=str(pki.ca))
        only_12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert await trio.to_thread.run_sync(_handshake, url, only_12) == "TLSv1.2"
        if _local_tls11_works(pki.origin.cert, pki.origin.key):  # with the ssl module too
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await trio.to_thread.run_sync(_handshake, url,
                                              _tls11_client_context(pki.ca))


async def test_tracker_refuses_tls_1_2(pki: Pki, tmp_path: Path,
                                       nursery: trio.Nursery) -> None:
    # Even when its ListenConfig asks for 1.2 (the default), the tracker wants 1.3.
    url = await nursery.start(serve_tracker, TrackerConfig(
        db_path=tmp_path / "t.sqlite", listen=_listen(pki.tracker)))
    assert url.startswith("https://127.0.0.1:")
    only_12 = ssl.create_default_context(cafile=str(pki.ca))
    only_12.maximum_version = ssl.TLSVersion.TLSv1_2
    modern = ssl.create_default_context(cafile=str(pki.ca))
    origin_url = await _serve(nursery, _origin_app(tmp_path), pki.origin)
    with trio.fail_after(20):
        # Control: this client can do TLS 1.2 (with the origin).
        assert await trio.to_thread.run_sync(_handshake, origin_url, only_12) == "TLSv1.2"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await trio.to_thread.run_sync(_handshake, url, only_12)
        refused = await trio.to_thread.run_sync(_first_server_record, url, _TLS12_HELLO)
        assert _is_refused(refused), refused.hex()
        assert await trio.to_thread.run_sync(_handshake, url, modern) == "TLSv1.3"


def test_listen_config_refuses_unknown_tls_versions() -> None:
    assert ListenConfig(tls_min_version="1.3").tls_min_version == "1.3"
    for bad in ("1.1", "1.0", "TLSv1.2", ""):
        with pytest.raises(ValueError, match="tls_min_version"):
            ListenConfig(tls_min_version=bad)


class _Redirector:
    """An HTTPS app that redirects ``/to-http`` to plain http and ``/to-host`` to
    another loopback address, and counts requests to ``/target``."""

    def __init__(self) -> None:
        self.port = 0
        self.targets = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/target":
            self.targets += 1
            status, headers = 200, []
        else:
            where = {"/to-http": f"http://127.0.0.1:{self.port}/target",
                     "/to-host": f"https://127.0.0.2:{self.port}/target"}[path]
            status, headers = 302, [(b"location", where.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_redirect_to_plain_http_or_another_host_is_refused(
        pki: Pki, tmp_path: Path, nursery: trio.Nursery) -> None:
    app = _Redirector()
    url: str = await nursery.start(functools.partial(serve_asgi, app, _listen(pki.origin)))
    app.port = int(url.rsplit(":", 1)[1])
    expected = {"/to-http": "redirect to plain http refused",
                "/to-host": r"redirect to another host \(127.0.0.2\) refused"}
    with trio.fail_after(20):
        async with HttpClient(timeout_s=10, tls=_policy(pki)) as http:
            assert await http.get_bytes(url + "/target", max_bytes=16) == b"ok"
            for path, message in expected.items():
                with pytest.raises(DownloadFailed, match=message):
                    await http.get_bytes(url + path, max_bytes=1024)
                with pytest.raises(DownloadFailed, match=message):
                    await http.get_range(url + path, 0, 2)
                with pytest.raises(DownloadFailed, match=message):
                    await http.post_json(url + path, {})
                with pytest.raises(Exception, match=message):
                    await trio.to_thread.run_sync(_tuf_get, url + path, _policy(pki))
    assert app.targets == 1, "a redirect was followed"


def test_pins_require_https_and_a_backup_pin(pki: Pki) -> None:
    def config(**kw: object) -> DeviceConfig:
        base: dict[str, object] = {
            "device_id": "d1", "product": PRODUCT, "hardware_id": HARDWARE_ID,
            "origin_url": "https://127.0.0.1:1", "tracker_url": "https://127.0.0.1:2"}
        return DeviceConfig(**{**base, **kw})  # type: ignore[arg-type]

    two = (pki.origin.pin, pki.backup_pin)
    assert config(tls_pins=two).tls_pins == two
    assert config().tls_pins == ()  # no pins: plain http allowed (development)
    assert config(origin_url="http://127.0.0.1:1").origin_url.startswith("http:")
    with pytest.raises(ConfigError, match="at least two distinct pins"):
        config(tls_pins=(pki.origin.pin,))
    with pytest.raises(ConfigError, match="at least two distinct pins"):
        config(tls_pins=(pki.origin.pin, pki.origin.pin))
    with pytest.raises(ConfigError, match="origin_url must be https"):
        config(tls_pins=two, origin_url="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="tracker_url must be https"):
        config(tls_pins=two, tracker_url="http://127.0.0.1:2")
    with pytest.raises(ConfigError, match=r"tls_pins: .*sha256/"):
        config(tls_pins=(pki.origin.pin, "sha1/AAAA"))
    with pytest.raises(ConfigError, match="tls_pins must be a tuple"):
        config(tls_pins=pki.origin.pin)
    with pytest.raises(ConfigError, match="tls_ca_file"):
        HttpClient(timeout_s=1, tls=TlsPolicy(ca_file=str(pki.ca.parent / "missing.pem")))


def test_pinning_reaches_into_httpx_as_expected() -> None:
    """The private attributes _install_pinning relies on; fails loudly if httpx or
    httpcore change them, instead of silently not pinning."""
    pins = frozenset({"sha256/" + "A" * 43 + "="})
    for transport in (httpx.HTTPTransport(), httpx.AsyncHTTPTransport()):
        _install_pinning(transport, pins)
        backend = transport._pool._network_backend  # type: ignore[union-attr]
        assert type(backend).__name__ in ("_PinnedBackend", "_AsyncPinnedBackend")
    with pytest.raises(RuntimeError, match="TLS pinning cannot be installed"):
        _install_pinning(httpx.HTTPTransport(proxy="http://127.0.0.1:9"), pins)


def _files(directory: Path) -> dict[str, bytes]:
    """Trusted metadata files (python-tuf's root_history/ copies the same root)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@dataclass
class TlsEnv:
    env: ReleaseEnv
    pki: Pki


@pytest.fixture
async def tls_env(pki: Pki, tmp_path: Path, nursery: trio.Nursery,
                  images: tuple[bytes, bytes]) -> AsyncIterator[TlsEnv]:
    env = await start_env(nursery, tmp_path, *images, origin_listen=_listen(pki.origin),
                          tracker_listen=_listen(pki.tracker))
    assert env.origin_url.startswith("https://") and env.tracker_url.startswith("https://")
    yield TlsEnv(env, pki)


async def test_device_updates_over_https_with_pinned_origin_and_tracker(
        tls_env: TlsEnv) -> None:
    env, pki = tls_env.env, tls_env.pki
    dev = env.device("dev-tls", mode="direct", tls_pins=tuple(sorted(pki.pins)),
                     tls_ca_file=str(pki.ca))
    with trio.fail_after(60):
        result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert result.updated and result.reported
    bc = dev.bootctl()
    assert bc.committed == "b" and dev.slot_path("b").read_bytes() == env.v2
    assert [(r.device_id, r.status) for r in env.reports()] == [("dev-tls", 0)]


@pytest.mark.parametrize("unpinned", ["both", "origin"])
async def test_device_with_wrong_pins_fails_closed_and_keeps_its_slot(
        tls_env: TlsEnv, unpinned: str) -> None:
    """``both``: neither server's key is pinned: nothing is sent anywhere. ``origin``:
    the tracker is pinned but the origin is not: the device downloads nothing and
    reports the pin mismatch to the tracker."""
    env, pki = tls_env.env, tls_env.pki
    pins = (pki.backup_pin, "sha256/" + "A" * 43 + "=")
    if unpinned == "origin":
        pins = (*pins, pki.tracker.pin)
    dev = env.device("dev-pin", mode="direct", tls_pins=pins, tls_ca_file=str(pki.ca))
    trust_before = _files(dev.trust_dir)
    with trio.fail_after(60):
        result = await update_once(dev)
    assert result.status == StatusCode.DOWNLOAD_FAILED == 10
    seen = pki.tracker.pin if unpinned == "both" else pki.origin.pin
    assert "matches none of the" in result.message and seen in result.message
    assert not result.updated and result.bytes_origin == 0
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "a" and not bc.pending
    assert dev.slot_path("a").read_bytes() == env.v1
    assert _files(dev.trust_dir) == trust_before, "trusted metadata moved"
    assert not list(dev.downloads_dir.iterdir())
    assert env.origin.statistics().requests == 0
    reports = env.reports()
    if unpinned == "both":
        assert reports == []
    else:
        assert [(r.device_id, r.status) for r in reports] == [("dev-pin", 10)]
        assert result.reported


async def test_device_trusting_another_ca_fails_closed_and_keeps_its_slot(
        tls_env: TlsEnv, tmp_path: Path) -> None:
    """To a device provisioned with another CA, the real servers look like an impostor
    with a certificate from a foreign CA: the check-in fails on the handshake, nothing
    is asked of the origin, nothing moves, and there is nobody trusted to report to."""
    env = tls_env.env
    other_ca = create_ca(tmp_path / "other-ca")
    dev = env.device("dev-ca", mode="direct", tls_ca_file=str(other_ca))
    trust_before = _files(dev.trust_dir)
    with trio.fail_after(60):
        result = await update_once(dev)
    assert result.status == StatusCode.DOWNLOAD_FAILED and not result.attempted
    assert "check-in failed" in result.message
    assert "certificate verify failed" in result.message, result.message
    assert_untouched(dev, env.v1)
    assert _files(dev.trust_dir) == trust_before, "trusted metadata moved"
    assert env.origin.statistics().requests == 0
    assert env.reports() == []
