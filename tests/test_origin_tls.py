"""The origin over HTTPS: a self-signed certificate for 127.0.0.1, TLS 1.2 at least.

Threats covered: a downgrade to TLS 1.1 or older (weak ciphers, no AEAD) must not be
possible; a device that trusts only the origin's certificate reaches the files.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from swarmota.infra.http_serve import ListenConfig
from swarmota.seeder import OriginApp, serve_origin

BODY = b'{"signed": "timestamp"}\n'


def make_self_signed_cert(directory: Path, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` for ``ip`` (IP SAN) into ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class TlsOrigin:
    app: OriginApp
    url: str
    cert: Path
    key: Path


@pytest.fixture
async def tls_origin(tmp_path: Path) -> AsyncIterator[TlsOrigin]:
    root = tmp_path / "origin"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "timestamp.json").write_bytes(BODY)
    cert, key = make_self_signed_cert(tmp_path)
    app = OriginApp(root)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_origin, app,
                                  ListenConfig(certfile=str(cert), keyfile=str(key)))
        yield TlsOrigin(app=app, url=url, cert=cert, key=key)
        nursery.cancel_scope.cancel()


async def test_https_url_and_a_client_trusting_the_cert_gets_the_file(
    tls_origin: TlsOrigin,
) -> None:
    assert tls_origin.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(tls_origin.cert))
    async with httpx.AsyncClient(verify=context, timeout=10) as client:
        response = await client.get(f"{tls_origin.url}/metadata/timestamp.json")
    assert response.status_code == 200
    assert response.content == BODY
    assert response.headers["cache-control"] == "no-cache"
    assert "etag" in response.headers


async def test_a_client_that_does_not_trust_the_cert_is_refused(
    tls_origin: TlsOrigin,
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{tls_origin.url}/metadata/timestamp.json")


def _handshake(url: str, context: ssl.SSLContext) -> str:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    with (socket.create_connection((host, int(port)), timeout=10) as raw,
          context.wrap_socket(raw, server_hostname=host) as tls):
        version = tls.version()
        assert version is not None
        return version


def _tls11_client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(cert))
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


def _local_tls11_works(cert: Path, key: Path) -> bool:
    """Whether this Python/OpenSSL can speak TLS 1.1 at all (in memory, both ends)."""
    try:
        client = _tls11_client_context(cert)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(str(cert), str(key))
        server.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        server.maximum_version = ssl.TLSVersion.TLSv1_1
        server.set_ciphers("ALL:@SECLEVEL=0")
    except (ssl.SSLError, ValueError):
        return False
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return False
            peer_in.write(out.read())
        if all(done.values()):
            return c.version() == "TLSv1.1"
    return False


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_1_1_is_refused_and_1_2_accepted(tls_origin: TlsOrigin) -> None:
    modern = ssl.create_default_context(cafile=str(tls_origin.cert))
    assert await trio.to_thread.run_sync(_handshake, tls_origin.url, modern) in (
        "TLSv1.2", "TLSv1.3")
    only_12 = ssl.create_default_context(cafile=str(tls_origin.cert))
    only_12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await trio.to_thread.run_sync(_handshake, tls_origin.url, only_12) == "TLSv1.2"

    # Control: this machine's OpenSSL must be able to do TLS 1.1 at all, or the refusal
    # below would prove nothing.
    if not _local_tls11_works(tls_origin.cert, tls_origin.key):
        pytest.skip("this Python/OpenSSL cannot negotiate TLS 1.1 even with itself")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await trio.to_thread.run_sync(_handshake, tls_origin.url,
                                      _tls11_client_context(tls_origin.cert))
