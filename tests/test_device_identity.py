"""Device identity (issue 8): fleet certificates, signed requests, counters, the relay.

Threats covered: a request whose body, endpoint, query or counter is changed in transit
or replayed (the signature covers all of them; counters never repeat, not after a
crash, a restart or a clock set back); a certificate from another CA, of another role,
expired, or a key that does not match it; a device provisioned with somebody else's
certificate; libtorrent's announces leaving the device unpinned or unsigned (they go
through the loopback relay, which refuses anything but GET /announce and /scrape and
fails closed on a pin mismatch).
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from swarmota.infra.devca import create_ca, issue_device_cert, issue_server_cert
from swarmota.infra.deviceauth import (
    CERT_HEADER,
    SIGNATURE_HEADER,
    DeviceAuthError,
    FleetTrust,
    RequestSigner,
    find_header,
)
from swarmota.infra.http_serve import ListenConfig, Receive, Scope, Send, serve_asgi
from swarmota.peer.announce_relay import AnnounceRelay
from swarmota.peer.errors import ConfigError
from swarmota.peer.http import HttpClient, TlsPolicy
from swarmota.peer.identity import COUNTER_RESERVATION, install_identity, load_identity
from tests.release_env import read_body


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cas")
    create_ca(d / "fleet")
    create_ca(d / "other")
    return d


def signer_for(cas: Path, tmp: Path, device_id: str, *, ca: str = "fleet",
               role: str = "device", days: int = 30) -> RequestSigner:
    files = issue_device_cert(cas / ca, tmp / f"{ca}-{device_id}-{role}", device_id,
                              role=role, valid_days=days)
    return RequestSigner(files.cert.read_bytes(), files.key.read_bytes())


def verify(trust: FleetTrust, headers: list[tuple[str, str]], *, method: str = "POST",
           target: bytes = b"/v1/report", body: bytes = b"{}",
           at: datetime.datetime | None = None) -> object:
    raw = [(k.encode(), v.encode()) for k, v in headers]
    return trust.verify(method, target, body, find_header(raw, CERT_HEADER),
                        find_header(raw, SIGNATURE_HEADER), at or now())


# --------------------------------------------------------------------------- signatures


def test_signed_request_verifies_and_names_device_role_and_counter(
        cas: Path, tmp_path: Path) -> None:
    trust = FleetTrust((cas / "fleet" / "ca.pem").read_bytes())
    signer = signer_for(cas, tmp_path, "dev-1")
    who = verify(trust, signer.headers("POST", b"/v1/report", b"{}", 41))
    assert (who.device_id, who.role, who.counter, who.is_seed) == (  # type: ignore[attr-defined]
        "dev-1", "device", 41, False)
    seed = signer_for(cas, tmp_path, "seeder-1", role="seed")
    assert verify(trust, seed.headers("GET", b"/announce?x=1", b"", 1), method="GET",
                  target=b"/announce?x=1", body=b"").is_seed  # type: ignore[attr-defined]


@pytest.mark.parametrize("change", ["body", "target", "method", "counter", "device"])
def test_tampered_request_fails_the_signature(cas: Path, tmp_path: Path, change: str) -> None:
    trust = FleetTrust((cas / "fleet" / "ca.pem").read_bytes())
    signer = signer_for(cas, tmp_path, "dev-1")
    headers = signer.headers("POST", b"/v1/report", b'{"status":0}', 7)
    kwargs: dict[str, object] = {"body": b'{"status":0}'}
    if change == "body":
        kwargs["body"] = b'{"status":40}'
    elif change == "target":
        kwargs["target"] = b"/v1/checkin"
    elif change == "method":
        kwargs["method"] = "PUT"
    elif change == "counter":
        headers = [(k, v.replace("counter=7", "counter=8")) for k, v in headers]
    else:  # another device's certificate with this signature
        other = signer_for(cas, tmp_path, "dev-2").headers("POST", b"/v1/report", b"", 7)
        headers = [other[0], headers[1]]
    with pytest.raises(DeviceAuthError, match="does not verify"):
        verify(trust, headers, **kwargs)  # type: ignore[arg-type]


def test_certificate_from_a_foreign_ca_is_refused(cas: Path, tmp_path: Path) -> None:
    trust = FleetTrust((cas / "fleet" / "ca.pem").read_bytes())
    forged = signer_for(cas, tmp_path, "dev-1", ca="other")
    with pytest.raises(DeviceAuthError, match="not issued by the fleet CA"):
        verify(trust, forged.headers("POST", b"/v1/report", b"{}", 1))


def test_expired_or_not_yet_valid_certificate_is_refused(cas: Path, tmp_path: Path) -> None:
    trust = FleetTrust((cas / "fleet" / "ca.pem").read_bytes())
    signer = signer_for(cas, tmp_path, "dev-1", days=1)
    headers = signer.headers("POST", b"/v1/report", b"{}", 1)
    for when in (now() + datetime.timedelta(days=2), now() - datetime.timedelta(hours=1)):
        with pytest.raises(DeviceAuthError, match="validity"):
            verify(trust, headers, at=when)


def test_missing_malformed_or_doubled_headers_are_refused(cas: Path, tmp_path: Path) -> None:
    trust = FleetTrust((cas / "fleet" / "ca.pem").read_bytes())
    signer = signer_for(cas, tmp_path, "dev-1")
    cert, sig = signer.headers("POST", b"/v1/report", b"{}", 1)
    for headers, message in (
            ([], "not signed"),
            ([cert], "not signed"),
            ([cert, (SIGNATURE_HEADER, "v1;counter=01;sig=AAAA")], "malformed"),
            ([cert, (SIGNATURE_HEADER, "v2;counter=1;sig=AAAA")], "malformed"),
            ([(CERT_HEADER, "!!!"), sig], "base64"),
            ([(CERT_HEADER, "QUJD"), sig], "not a DER certificate"),
            ([(CERT_HEADER, "A" * 5000), sig], "too long"),
            ([cert, sig, sig], "not signed")):
        with pytest.raises(DeviceAuthError, match=message):
            verify(trust, headers)


def test_a_key_that_does_not_match_its_certificate_is_not_an_identity(
        cas: Path, tmp_path: Path) -> None:
    a = issue_device_cert(cas / "fleet", tmp_path / "a", "dev-a")
    b = issue_device_cert(cas / "fleet", tmp_path / "b", "dev-b")
    with pytest.raises(DeviceAuthError, match="does not belong"):
        RequestSigner(a.cert.read_bytes(), b.key.read_bytes())
    with pytest.raises(DeviceAuthError):
        FleetTrust(a.cert.read_bytes())  # a device certificate is no CA


# --------------------------------------------------------------------------- counters


def test_counters_never_repeat_across_restarts_crashes_and_a_clock_set_back(
        cas: Path, tmp_path: Path) -> None:
    files = issue_device_cert(cas / "fleet", tmp_path / "issued", "dev-1")
    install_identity(tmp_path / "state", files.cert, files.key, "dev-1")
    now = [1_700_000_000.0]
    seen: list[int] = []
    for _restart in range(3):
        ident = load_identity(tmp_path / "state")
        assert ident is not None
        ident.clock = lambda: now[0]
        for _ in range(5):
            seen.append(ident.next_counter())
        now[0] -= 86_400.0  # the clock goes back a day before the next start
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    reserved = int((tmp_path / "state" / "identity" / "counter").read_text())
    assert reserved > seen[-1]
    assert reserved - seen[0] <= 3 * COUNTER_RESERVATION  # one write per start, not per use


def test_wrong_or_foreign_identity_files_are_refused_at_provisioning(
        cas: Path, tmp_path: Path) -> None:
    mine = issue_device_cert(cas / "fleet", tmp_path / "mine", "dev-1")
    other = issue_device_cert(cas / "fleet", tmp_path / "other", "dev-2")
    with pytest.raises(ConfigError, match="not for this device"):
        install_identity(tmp_path / "s1", other.cert, other.key, "dev-1")
    with pytest.raises(ConfigError, match="does not belong"):
        install_identity(tmp_path / "s2", mine.cert, other.key, "dev-1")
    assert load_identity(tmp_path / "s1") is None
    (tmp_path / "s3" / "identity").mkdir(parents=True)
    (tmp_path / "s3" / "identity" / "cert.pem").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="identity"):
        load_identity(tmp_path / "s3")


# --------------------------------------------------------------------------- on the wire


class Recorder:
    """A test tracker that records what arrives and answers like a BitTorrent tracker."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        target = scope["raw_path"] + (b"?" + scope["query_string"]
                                      if scope["query_string"] else b"")
        self.requests.append((scope["method"], target, list(scope["headers"]), body))
        answer = b"d8:intervali60e5:peers0:e" if scope["path"] == "/announce" else b"{}"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def https_tracker(nursery: trio.Nursery, tmp_path: Path
                        ) -> AsyncIterator[tuple[str, Recorder, Path, str]]:
    ca = create_ca(tmp_path / "server-ca")
    server = issue_server_cert(tmp_path / "server-ca", tmp_path / "srv", ["127.0.0.1"])
    app = Recorder()
    url = await nursery.start(serve_asgi, app, ListenConfig(
        certfile=str(server.cert), keyfile=str(server.key)))
    yield url, app, ca, server.pin


async def test_agent_requests_are_signed_over_the_wire_and_verify(
        cas: Path, tmp_path: Path, https_tracker: tuple[str, Recorder, Path, str]) -> None:
    url, app, ca, pin = https_tracker
    files = issue_device_cert(cas / "fleet", tmp_path / "issued", "dev-1")
    install_identity(tmp_path / "state", files.cert, files.key, "dev-1")
    ident = load_identity(tmp_path / "state")
    tls = TlsPolicy(pins=frozenset({pin, "sha256/" + "A" * 43 + "="}), ca_file=str(ca))
    async with HttpClient(timeout_s=10, tls=tls, identity=ident) as http:
        await http.post_json(f"{url}/v1/report", {"device_id": "dev-1", "status": 0})
        relay = AnnounceRelay(http, url)
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            query = "info_hash=%AA%BB%01&port=6881&left=0&device_id=dev-1&key=%7e"
            async with httpx.AsyncClient() as libtorrent_like:
                answer = await libtorrent_like.get(f"{relay.announce_url}?{query}")
            nursery.cancel_scope.cancel()
    assert answer.status_code == 200 and answer.content == b"d8:intervali60e5:peers0:e"
    trust = FleetTrust((cas / "fleet" / "ca.pem").read_bytes())
    counters = []
    for method, target, headers, body in app.requests:
        who = trust.verify(method, target, body, find_header(headers, CERT_HEADER),
                           find_header(headers, SIGNATURE_HEADER), now())
        assert who.device_id == "dev-1"
        counters.append(who.counter)
    assert [r[1].split(b"?")[0] for r in app.requests] == [b"/v1/report", b"/announce"]
    assert app.requests[1][1].endswith(query.encode())  # the query arrives as libtorrent sent it
    assert counters[0] < counters[1]


async def test_relay_refuses_anything_but_announce_and_scrape(
        https_tracker: tuple[str, Recorder, Path, str]) -> None:
    url, app, ca, _pin = https_tracker
    async with HttpClient(timeout_s=10, tls=TlsPolicy(ca_file=str(ca))) as http:
        relay = AnnounceRelay(http, url)
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            base = relay.announce_url.removesuffix("/announce")
            async with httpx.AsyncClient() as client:
                post = await client.post(f"{base}/announce", content=b"x")
                other = await client.get(f"{base}/v1/admin/rollouts")
                huge = await client.get(f"{base}/announce?{'a' * 9000}")
            nursery.cancel_scope.cancel()
    for answer in (post, other, huge):
        assert answer.status_code == 400 and answer.content.startswith(b"d14:failure reason")
    assert app.requests == []


async def test_relay_fails_closed_on_a_tracker_key_that_is_not_pinned(
        https_tracker: tuple[str, Recorder, Path, str]) -> None:
    url, app, ca, _pin = https_tracker
    wrong = frozenset({"sha256/" + "B" * 43 + "=", "sha256/" + "C" * 43 + "="})
    async with HttpClient(timeout_s=10, tls=TlsPolicy(pins=wrong, ca_file=str(ca))) as http:
        relay = AnnounceRelay(http, url)
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"{relay.announce_url}?info_hash=%AA&port=1")
            nursery.cancel_scope.cancel()
    assert answer.status_code == 502
    assert b"failure reason" in answer.content and b"pin" in answer.content.lower()
    assert app.requests == [] and relay.failed == 1


def test_tls_device_cert_issues_a_fleet_identity_and_refuses_bad_ids(tmp_path: Path) -> None:
    def swarmota(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "swarmota.cli", *args],
                              capture_output=True, text=True, timeout=120)

    assert swarmota("tls", "ca", str(tmp_path / "fleet")).returncode == 0
    made = swarmota("tls", "device-cert", str(tmp_path / "dev"), "--ca",
                    str(tmp_path / "fleet"), "--device-id", "router-7")
    assert made.returncode == 0, made.stderr
    assert "router-7 (device)" in made.stdout
    bad = swarmota("tls", "device-cert", str(tmp_path / "bad"), "--ca",
                   str(tmp_path / "fleet"), "--device-id", "../etc")
    assert bad.returncode != 0 and "bad device id" in bad.stderr
    signer = RequestSigner((tmp_path / "dev" / "cert.pem").read_bytes(),
                           (tmp_path / "dev" / "key.pem").read_bytes())
    assert (signer.device_id, signer.role) == ("router-7", "device")
    assert (tmp_path / "dev" / "key.pem").stat().st_mode & 0o777 == 0o600
