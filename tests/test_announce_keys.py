"""Announce keys: a signed check-in's answer hands the device a short-lived key, and
its announces and scrapes carry an HMAC-SHA256 under it instead of an ECDSA signature
(:class:`infra.deviceauth.AnnounceKeys`). The real tracker (hypercorn and the lean
endpoint, a real SQLite file, a real fleet CA) over loopback, and the agent's own HTTP
client and announce path (:mod:`peer.tracker_client`, :class:`peer.http.HttpClient`).

Threats: a stolen announce key used to check in, report or outlive its expiry; a key
of one device or certificate used for another; a tampered announce; a replayed one; a
revoked device's key; a key from another tracker's secret. Every tracker process on
one database verifies every other's keys (one server secret in the store).
"""

from __future__ import annotations

import base64
import hmac
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from swarmota.infra.devca import issue_device_cert
from swarmota.infra.deviceauth import (
    AnnounceKey,
    AnnounceKeys,
    Authenticated,
    DeviceAuthError,
    _MacKey,
    hmac_sha256,
)
from swarmota.peer.config import DeviceConfig
from swarmota.peer.http import HttpClient
from swarmota.peer.identity import load_identity
from swarmota.peer.tracker_client import checkin
from swarmota.tracker.admin import hash_token, new_token
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.config import DEFAULT_ANNOUNCE_KEY_LIFETIME_S, TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import TokenRecord
from swarmota.tracker.wire import AnnounceKeyGrant, WireError, parse_announce_key
from tests.test_device_auth_tracker import (
    TIMEOUT_S,
    Device,
    Fleet,
    Tracker,
    checkin_body,
    failure,
    register,
    report_body,
    start_tracker,
)
from tests.test_device_revocation import asgi
from tests.test_tracker_announce import announce_query, bdecode

SECRET = bytes(range(32))
CERT = "ab" * 32


async def key_of(tracker: Tracker, device: Device) -> AnnounceKey:
    """Check ``device`` in (signed) and take the announce key of the answer."""
    response = await tracker.checkin(device)
    assert response.status_code == 200, response.text
    grant = parse_announce_key(response.json())
    assert grant is not None
    assert 3500 <= grant.lifetime_s <= 3600
    return AnnounceKey(device.signer.device_id, device.signer.cert_sha256, grant.expires,
                       grant.key)


def keyed(key: AnnounceKey, target: str, counter: int) -> dict[str, str]:
    return dict(key.headers("GET", target.encode("ascii"), b"", counter))


async def get(tracker: Tracker, target: str, headers: dict[str, str], *,
              lean: bool = False) -> tuple[int, Any]:
    base = tracker.urls.announce if lean else tracker.urls.api
    assert base is not None
    response = await tracker.client.get(base + target, headers=headers)
    return response.status_code, bdecode(response.content)


async def key_auths(tracker: Tracker) -> int:
    text = (await tracker.client.get(tracker.urls.api + "/metrics")).text
    found = re.search(r"^swarmota_tracker_announce_key_auth_total (\d+)$", text, re.M)
    assert found is not None
    return int(found.group(1))


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path, "fleet")


@pytest.fixture
async def tracker(tmp_path: Path, fleet: Fleet, nursery: trio.Nursery) -> Tracker:
    db = tmp_path / "tracker.db"
    register(db)
    urls = await start_tracker(nursery, db, fleet.ca_pem)
    client = httpx.AsyncClient(timeout=TIMEOUT_S)
    nursery.start_soon(_close_at_exit, client)
    return Tracker(urls, db, client)


async def _close_at_exit(client: httpx.AsyncClient) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


# --- the pure key scheme ----------------------------------------------------------------


def test_the_fast_hmac_is_rfc_2104_hmac_sha256() -> None:
    for key, message in ((SECRET, b""), (b"k", b"m" * 1000), (bytes(64), b"\xff" * 64)):
        assert hmac_sha256(key, message) == hmac.digest(key, message, "sha256")
        ready = _MacKey(key)  # the verifier's cached form, used many times
        assert ready.mac(message) == ready.mac(message) == hmac.digest(key, message, "sha256")
    for bad in (lambda: hmac_sha256(bytes(65), b""), lambda: _MacKey(bytes(65))):
        with pytest.raises(ValueError):
            bad()


def test_a_key_names_its_device_certificate_and_expiry() -> None:
    keys = AnnounceKeys(SECRET, 3600)
    device = Authenticated("dev-1", "device", 5, CERT, not_after=10_000.0)
    key = keys.issue(device, 1000.0)
    assert key is not None and key.expires == 4600
    header = key.headers("GET", b"/announce?x=1", b"", 7)[0][1].encode()
    assert keys.verify("GET", b"/announce?x=1", b"", header, 1001.0) == Authenticated(
        "dev-1", "device", 7, CERT, by_key=True)
    # never past the certificate's validity; none for a seed, a MAC or a dying cert
    assert keys.issue(device, 9000.0).expires == 10_000  # type: ignore[union-attr]
    assert keys.issue(Authenticated("s", "seed", 1, CERT, not_after=1e9), 0.0) is None
    assert keys.issue(Authenticated("dev-1", "device", 1, CERT, by_key=True), 0.0) is None
    assert keys.issue(device, 10_000.0) is None
    # derived keys are cached, boundedly: two devices through a cache of one
    small = AnnounceKeys(SECRET, 3600, cache_size=1)
    for device_id in ("dev-1", "dev-2", "dev-1"):
        one = small.issue(Authenticated(device_id, "device", 1, CERT, not_after=1e9), 0.0)
        assert one is not None
        mac = one.headers("GET", b"/scrape", b"", 3)[0][1].encode()
        assert small.verify("GET", b"/scrape", b"", mac, 1.0).device_id == device_id
    with pytest.raises(ValueError, match="32-64 bytes"):
        AnnounceKeys(b"short", 60)


def test_a_key_of_another_device_certificate_expiry_or_secret_does_not_verify() -> None:
    keys = AnnounceKeys(SECRET, 3600)
    key = keys.issue(Authenticated("dev-1", "device", 1, CERT, not_after=1e9), 1000.0)
    assert key is not None
    forged = [AnnounceKey("dev-2", CERT, key.expires, key.key),
              AnnounceKey("dev-1", "cd" * 32, key.expires, key.key),
              AnnounceKey("dev-1", CERT, key.expires + 3600, key.key)]
    other = AnnounceKeys(bytes(32), 3600).issue(
        Authenticated("dev-1", "device", 1, CERT, not_after=1e9), 1000.0)
    assert other is not None
    for bad in [*forged, other]:
        header = bad.headers("GET", b"/announce", b"", 2)[0][1].encode()
        with pytest.raises(DeviceAuthError, match="does not verify"):
            keys.verify("GET", b"/announce", b"", header, 1001.0)
    header = key.headers("GET", b"/announce", b"", 2)[0][1].encode()
    with pytest.raises(DeviceAuthError, match="expired"):
        keys.verify("GET", b"/announce", b"", header, float(key.expires))
    for junk in (b"v1;id=dev-1", header + b"x", header.replace(b"dev-1", b"dev 1")):
        with pytest.raises(DeviceAuthError, match="malformed"):
            keys.verify("GET", b"/announce", b"", junk, 1001.0)


def test_a_check_in_answers_key_is_strictly_parsed() -> None:
    good = {"key": base64.b64encode(SECRET).decode(), "expires": 5, "lifetime_s": 60}
    assert parse_announce_key({"release": None, "announce_key": good}) == AnnounceKeyGrant(
        SECRET, 5, 60)
    assert parse_announce_key({"release": None}) is None
    for bad in ({**good, "key": "c2hvcnQ="}, {**good, "key": 5}, {**good, "expires": -1},
                {**good, "lifetime_s": True}, {**good, "extra": 1}, "key"):
        with pytest.raises(WireError, match="announce_key"):
            parse_announce_key({"announce_key": bad})


# --- the real tracker -------------------------------------------------------------------


async def test_announces_authenticated_by_the_key_get_peers_on_both_endpoints(
        tracker: Tracker, fleet: Fleet) -> None:
    dev = fleet.identity("dev-1")
    key = await key_of(tracker, dev)
    target = "/announce?" + announce_query(device_id="dev-1").decode()
    for counter, lean in ((10, False), (11, True)):
        status, answer = await get(tracker, target, keyed(key, target, counter), lean=lean)
        assert status == 200 and b"peers" in answer, answer
    scrape = "/scrape?" + announce_query().decode().split("&")[0]
    status, answer = await get(tracker, scrape, keyed(key, scrape, 12), lean=True)
    assert status == 200 and b"files" in answer
    assert await key_auths(tracker) == 3


async def test_a_stolen_announce_key_cannot_check_in_or_report(
        tracker: Tracker, fleet: Fleet) -> None:
    dev = fleet.identity("dev-1")
    key = await key_of(tracker, dev)
    for path, body in (("/v1/checkin", checkin_body("dev-1")),
                       ("/v1/report", report_body("dev-1"))):
        headers = dict(key.headers("POST", path.encode(), body, 50))
        response = await tracker.post(path, body, headers)
        assert response.status_code == 401
        assert "announces and scrapes only" in response.json()["error"]
    assert (await tracker.refused())["key"] == 2


async def test_a_tampered_or_foreign_device_announce_does_not_verify(
        tracker: Tracker, fleet: Fleet) -> None:
    dev = fleet.identity("dev-1")
    key = await key_of(tracker, dev)
    target = "/announce?" + announce_query(device_id="dev-1").decode()
    headers = keyed(key, target, 10)
    other = "/announce?" + announce_query(device_id="dev-1", left=0).decode()
    status, answer = await get(tracker, other, headers)  # the MAC covers the query
    assert status == 401 and "does not verify" in failure(answer)
    stolen = AnnounceKey("dev-2", key.cert_sha256, key.expires, key.key)
    status, answer = await get(tracker, target.replace("dev-1", "dev-2"),
                               keyed(stolen, target.replace("dev-1", "dev-2"), 11))
    assert status == 401 and "does not verify" in failure(answer)


async def test_a_grant_says_the_keys_own_lifetime_however_the_clock_moves_meanwhile(
        tmp_path: Path, fleet: Fleet) -> None:
    """The key's expiry and the grant's lifetime come from one reading of the clock (the
    check-in's): with a clock that moves a whole second at every reading, a grant said
    3601 s for a 3600 s key when the gate read the clock again to issue it."""
    db = tmp_path / "tracker.db"
    register(db)
    readings = itertools.count()
    start = float(int(time.time()))

    def clock() -> float:
        return start + next(readings)

    dev = fleet.identity("dev-1")
    body = checkin_body("dev-1")
    with SqliteStore(db) as store:
        app = TrackerApp(Director(store, TrackerConfig(db_path=db, device_ca=fleet.ca_pem),
                                  clock=clock))
        status, answer = await asgi(app, "POST", "/v1/checkin", body,
                                    dev.sign("POST", "/v1/checkin", body))
    assert status == 200, answer
    grant = parse_announce_key(json.loads(answer))
    assert grant is not None and grant.lifetime_s == DEFAULT_ANNOUNCE_KEY_LIFETIME_S


async def test_a_replayed_key_authenticated_announce_is_refused(
        tracker: Tracker, fleet: Fleet) -> None:
    dev = fleet.identity("dev-1")
    key = await key_of(tracker, dev)
    target = "/announce?" + announce_query(device_id="dev-1").decode()
    headers = keyed(key, target, 10)
    assert (await get(tracker, target, headers))[0] == 200
    for lean in (False, True):
        status, answer = await get(tracker, target, headers, lean=lean)
        assert status == 200 and "replayed request" in failure(answer)
    # the key's counters are the device's: a signature with a lower counter is a replay
    status, answer = await get(tracker, target, dev.sign("GET", target, counter=9))
    assert "replayed request" in failure(answer)


async def test_a_revoked_devices_announce_key_stops_working_at_once(
        tracker: Tracker, fleet: Fleet) -> None:
    """Revoked through this process: at once; through another process on the database:
    within ``revocation_refresh_s``, as for signatures (the key names its certificate)."""
    dev = fleet.identity("dev-1")
    key = await key_of(tracker, dev)
    target = "/announce?" + announce_query(device_id="dev-1").decode()
    token = _admin_token(tracker.db)
    response = await tracker.client.post(
        tracker.urls.api + "/v1/admin/devices/dev-1/revoke", json={"reason": "stolen"},
        headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    status, answer = await get(tracker, target, keyed(key, target, 10), lean=True)
    assert status == 200 and "is revoked" in failure(answer)


def _admin_token(db: Path) -> str:
    token = new_token()
    with SqliteStore(db) as store:
        store.add_token(TokenRecord(hash_token(token), "ops", "admin", time.time(), None))
    return token


async def test_processes_on_one_database_verify_each_others_keys(
        tmp_path: Path, fleet: Fleet, nursery: trio.Nursery) -> None:
    db = tmp_path / "tracker.db"
    register(db)
    first = await start_tracker(nursery, db, fleet.ca_pem)
    second = await start_tracker(nursery, db, fleet.ca_pem)
    dev = fleet.identity("dev-1")
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        key = await key_of(Tracker(first, db, client), dev)
        target = "/announce?" + announce_query(device_id="dev-1").decode()
        status, answer = await get(Tracker(second, db, client), target,
                                   keyed(key, target, 10), lean=True)
        assert status == 200 and b"peers" in answer


# --- the agent --------------------------------------------------------------------------


async def test_the_agent_announces_with_its_key_and_signs_again_once_it_is_refused(
        tracker: Tracker, fleet: Fleet, tmp_path: Path) -> None:
    """After a check-in the agent's relayed announces carry the key's MAC; when the
    tracker refuses the key (here: past its expiry on the tracker's clock, while the
    device's clock says it is still good) the agent signs the announce again, gets
    its peers, and signs from then on."""
    state = tmp_path / "device"
    issue_device_cert(fleet.root / "ca", state / "identity", "dev-1")
    identity = load_identity(state)
    assert identity is not None
    config = DeviceConfig(device_id="dev-1", product="acme-router",
                          hardware_id="acme-router-hw1", tracker_url=tracker.urls.api,
                          origin_url="http://127.0.0.1:9")
    async with HttpClient(timeout_s=TIMEOUT_S, identity=identity) as http:
        await checkin(http, config, version="1.0.0", release_counter=1)
        url = tracker.urls.api + "/announce?" + announce_query(device_id="dev-1").decode()
        status, body = await http.get_tracker(url, max_bytes=65536)
        assert status == 200 and b"peers" in body
        assert await key_auths(tracker) == 1
        # a key the device's clock thinks good for an hour, expired on the tracker's
        http.use_announce_key(AnnounceKeyGrant(bytes(32), expires=1, lifetime_s=3600))
        for _ in range(2):
            status, body = await http.get_tracker(url, max_bytes=65536)
            assert status == 200 and b"peers" in body  # signed again, then from now on
        assert await key_auths(tracker) == 1
        assert (await tracker.refused())["key"] == 1
