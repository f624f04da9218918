"""Revoking a device's identity at the tracker: the real tracker (hypercorn and the lean
BitTorrent endpoint, one app, a real SQLite file) with ``device_ca`` set, identities
from a real fleet CA, the admin API over loopback and the real CLI.

Threats covered: a stolen device key (its fleet certificate and private key) used after
the operator revoked the device, on every device route and both listeners; an older
certificate of the device, still valid, kept by the thief; a certificate the tracker
never saw; a revocation asked without the admin role, or naming another device's
certificate; a revocation lost by a restart, or not seen by another tracker process on
the same database. A re-provisioned device (new key, new certificate) is accepted.
Every refusal stores nothing and moves
``swarmota_tracker_device_auth_refused_total{reason="revoked"}``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from swarmota.infra.devca import issue_device_cert
from swarmota.infra.deviceauth import RequestSigner, certificate_sha256
from swarmota.tracker.admin import hash_token, new_token
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.sqlite_store import (
    _SCHEMA,
    _SCHEMA_DEVICE_COUNTERS,
    _SCHEMA_ROLLOUTS,
    _SCHEMA_SWARMS,
    SqliteStore,
)
from swarmota.tracker.store import SCHEMA_VERSION, TokenRecord
from tests.test_device_auth_tracker import (
    TIMEOUT_S,
    Device,
    Fleet,
    Tracker,
    checkin_body,
    failure,
    register,
    start_tracker,
    stored,
)
from tests.test_tracker_announce import ANNOUNCE_HASH, announce_query, bdecode, q
from tests.tracker_cli import run_cli

# --- identities and tokens ------------------------------------------------------------------


@dataclass
class Identity:
    """A fleet identity with its certificate file (what an operator holds)."""

    device: Device
    cert: Path
    fingerprint: str
    """SHA-256 of the certificate's DER, computed here from the file when issued."""


class Issuer:
    """Issues identities from a fleet CA, each into a new directory (so a new key)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._issued = 0

    def issue(self, device_id: str, *, key_of: Identity | None = None) -> Identity:
        """A new identity; ``key_of``: re-issue a certificate for that identity's key
        (what 'swarmota tls device-cert' does when DIR/key.pem exists)."""
        self._issued += 1
        out = (key_of.cert.parent if key_of is not None
               else self.fleet.root / f"revocation-{self._issued}")
        files = issue_device_cert(self.fleet.root / "ca", out, device_id)
        pem = files.cert.read_bytes()
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        signer = RequestSigner(pem, files.key.read_bytes())
        return Identity(Device(signer), files.cert, hashlib.sha256(der).hexdigest())


def fingerprint_of(device: Device) -> str:
    """The fingerprint of the certificate a device sends."""
    headers = dict(device.signer.headers("GET", b"/", b"", 0))
    return certificate_sha256(base64.b64decode(headers["swarmota-device-cert"]))


def add_token(db: Path, role: str, name: str | None = None) -> str:
    token = new_token()
    with SqliteStore(db) as store:
        store.add_token(TokenRecord(hash_token(token), name or f"{role}-1", role, 0.0, None))
    return token


# --- the tracker ----------------------------------------------------------------------------


@dataclass
class Revoking:
    tracker: Tracker
    issuer: Issuer
    tokens: dict[str, str]

    @property
    def db(self) -> Path:
        return self.tracker.db

    async def revoke(self, device_id: str, body: Any = None,
                     role: str | None = "admin") -> httpx.Response:
        headers = {} if role is None else {"authorization": f"Bearer {self.tokens[role]}"}
        return await self.tracker.client.post(
            f"{self.tracker.urls.api}/v1/admin/devices/{device_id}/revoke", json=body,
            headers=headers)

    async def admin_get(self, path: str, role: str = "admin") -> Any:
        response = await self.tracker.client.get(
            f"{self.tracker.urls.api}/v1/admin/{path}",
            headers={"authorization": f"Bearer {self.tokens[role]}"})
        assert response.status_code == 200, response.text
        return response.json()

    async def scrape(self, device: Device, *, lean: bool) -> Any:
        target = "/scrape?" + q(info_hash=ANNOUNCE_HASH).decode()
        return await self.tracker.get(target, device.sign("GET", target), lean=lean)


@pytest.fixture
async def revoking(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Revoking]:
    fleet = Fleet(tmp_path, "fleet")
    db = tmp_path / "tracker.db"
    register(db)
    tokens = {role: add_token(db, role) for role in ("viewer", "operator", "admin")}
    urls = await start_tracker(nursery, db, fleet.ca_pem)
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        yield Revoking(Tracker(urls, db, client), Issuer(fleet), tokens)


def counter_of(db: Path, device_id: str) -> int | None:
    with SqliteStore(db) as store:
        return store.device_counter(device_id)


async def assert_refused_everywhere(r: Revoking, device: Device, device_id: str) -> None:
    """Check-in, report, announce and scrape on both listeners: refused as revoked,
    nothing stored, the device's stored counter unmoved."""
    before, counter = await stored(r.db), counter_of(r.db, device_id)
    refused = (await r.tracker.refused()).get("revoked", 0)
    for response in (await r.tracker.checkin(device, device_id=device_id),
                     await r.tracker.report(device, 40, device_id=device_id)):
        assert response.status_code == 401, response.text
        assert "is revoked" in response.json()["error"]
    for lean in (False, True):
        assert "is revoked" in failure(await r.tracker.announce(
            device, lean=lean, device_id=device_id, port=7000, left=0))
        assert "is revoked" in failure(await r.scrape(device, lean=lean))
    assert await stored(r.db) == before
    assert counter_of(r.db, device_id) == counter
    assert (await r.tracker.refused())["revoked"] == refused + 6


# --- the threats ------------------------------------------------------------------------------


async def test_stolen_device_key_is_refused_after_revocation_everywhere(
        revoking: Revoking, caplog: pytest.LogCaptureFixture) -> None:
    stolen = revoking.issuer.issue("dev-1")
    dev = stolen.device
    assert (await revoking.tracker.checkin(dev)).json()["release"] is not None
    assert len((await revoking.tracker.announce(dev, device_id="dev-1"))[b"peers"]) == 0
    assert (await revoking.tracker.report(dev)).status_code == 200

    response = await revoking.revoke("dev-1", {"reason": "key stolen from the field"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["revoked"] == [stolen.fingerprint] == [fingerprint_of(dev)]
    assert answer["already_revoked"] == [] and answer["device_id"] == "dev-1"

    caplog.clear()
    await assert_refused_everywhere(revoking, dev, "dev-1")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "device request refused (revoked)" in r.getMessage()]
    assert len(warnings) == 6 and "'dev-1'" in warnings[0]
    # the peer never entered the swarm: another device's scrape counts nobody new
    other = revoking.issuer.issue("dev-2").device
    files = (await revoking.scrape(other, lean=False))[b"files"]
    assert files[ANNOUNCE_HASH][b"incomplete"] == 1  # dev-1's announce before revocation


async def test_device_reprovisioned_with_a_new_certificate_is_accepted(
        revoking: Revoking) -> None:
    stolen = revoking.issuer.issue("dev-1")
    assert (await revoking.tracker.checkin(stolen.device)).status_code == 200
    assert (await revoking.revoke("dev-1")).status_code == 200
    # re-provisioned: the old key.pem deleted, a new key and certificate issued
    fresh = revoking.issuer.issue("dev-1")
    fresh.device.counter = stolen.device.counter  # the device's counters go on
    assert fresh.fingerprint != stolen.fingerprint
    assert (await revoking.tracker.checkin(fresh.device)).json()["release"] is not None
    assert (await revoking.tracker.report(fresh.device)).json() == {"ok": True}
    answer = await revoking.tracker.announce(fresh.device, lean=True, device_id="dev-1")
    assert b"peers" in answer
    await assert_refused_everywhere(revoking, stolen.device, "dev-1")
    # the new certificate is in the device's record now: revoking again takes it too
    again = (await revoking.revoke("dev-1")).json()
    assert again["revoked"] == sorted([stolen.fingerprint, fresh.fingerprint])
    assert again["already_revoked"] == [stolen.fingerprint]


async def test_thief_pushing_the_counter_up_cannot_lock_out_the_reprovisioned_device(
        revoking: Revoking) -> None:
    """With the stolen key a thief signs requests with huge counters before the
    revocation; the device's new certificate counts from the device's clock, far below.
    Revoking resets the device's counters (stored and in memory), so the new
    certificate is accepted on check-ins, reports and announces."""
    stolen = revoking.issuer.issue("dev-1")
    stolen.device.counter = 2**62
    assert (await revoking.tracker.checkin(stolen.device)).status_code == 200
    assert b"peers" in await revoking.tracker.announce(stolen.device, device_id="dev-1",
                                                       lean=True)
    assert counter_of(revoking.db, "dev-1") == 2**62 + 1
    assert (await revoking.revoke("dev-1")).status_code == 200
    assert counter_of(revoking.db, "dev-1") == 0
    fresh = revoking.issuer.issue("dev-1")
    fresh.device.counter = 1_700_000_000_000_000  # microseconds of the device's clock
    assert (await revoking.tracker.checkin(fresh.device)).status_code == 200
    assert (await revoking.tracker.report(fresh.device)).json() == {"ok": True}
    for lean in (True, False):
        assert b"peers" in await revoking.tracker.announce(fresh.device, device_id="dev-1",
                                                           lean=lean)
    # the thief's old requests stay refused, as revoked, whatever their counter
    await assert_refused_everywhere(revoking, stolen.device, "dev-1")


async def test_certificate_only_ever_used_to_announce_is_revoked_with_the_device(
        revoking: Revoking) -> None:
    """A second certificate of the device that never signed a check-in or report, only
    announces (e.g. a copy taken off the device and used to find peers): revoking the
    device by its id alone takes it too."""
    main = revoking.issuer.issue("dev-1")
    assert (await revoking.tracker.checkin(main.device)).status_code == 200
    side = revoking.issuer.issue("dev-1")
    side.device.counter = main.device.counter
    for lean in (True, False):
        assert b"peers" in await revoking.tracker.announce(side.device, device_id="dev-1",
                                                           lean=lean)
    answer = (await revoking.revoke("dev-1")).json()
    assert answer["revoked"] == sorted([main.fingerprint, side.fingerprint])
    for lean in (True, False):
        assert "is revoked" in failure(await revoking.tracker.announce(
            side.device, device_id="dev-1", lean=lean, port=7000))


async def test_older_certificate_still_valid_is_revoked_with_the_device(
        revoking: Revoking) -> None:
    """The device's certificate was re-issued (e.g. renewed) and it used both; the
    thief holds the older one, still valid. Revoking the device takes both."""
    old = revoking.issuer.issue("dev-1")
    assert (await revoking.tracker.checkin(old.device)).status_code == 200
    renewed = revoking.issuer.issue("dev-1")
    renewed.device.counter = old.device.counter
    assert (await revoking.tracker.checkin(renewed.device)).status_code == 200
    old.device.counter = renewed.device.counter
    answer = (await revoking.revoke("dev-1")).json()
    assert answer["revoked"] == sorted([old.fingerprint, renewed.fingerprint])
    await assert_refused_everywhere(revoking, old.device, "dev-1")
    await assert_refused_everywhere(revoking, renewed.device, "dev-1")


async def test_certificate_never_seen_can_be_revoked_from_its_file(
        revoking: Revoking) -> None:
    unused = revoking.issuer.issue("dev-9")  # issued, then stolen before first use
    response = await revoking.revoke("dev-9")
    assert response.status_code == 404 and "unknown device dev-9" in response.json()["error"]
    response = await revoking.revoke("dev-9", {"certificates": [unused.cert.read_text()]})
    assert response.status_code == 200, response.text
    assert response.json()["revoked"] == [unused.fingerprint]
    await assert_refused_everywhere(revoking, unused.device, "dev-9")
    revoked = (await revoking.admin_get("revocations", role="viewer"))["revoked"]
    assert [(e["cert_sha256"], e["device_id"], e["actor"]) for e in revoked] == [
        (unused.fingerprint, "dev-9", "admin-1")]


async def test_revocation_needs_the_admin_role_and_is_audited(revoking: Revoking) -> None:
    dev = revoking.issuer.issue("dev-1")
    assert (await revoking.tracker.checkin(dev.device)).status_code == 200
    assert (await revoking.revoke("dev-1", role=None)).status_code == 401
    for role in ("viewer", "operator"):
        response = await revoking.revoke("dev-1", role=role)
        assert response.status_code == 403 and "this needs admin" in response.json()["error"]
    # nothing revoked: the device carries on
    assert (await revoking.tracker.checkin(dev.device)).status_code == 200
    assert (await revoking.admin_get("revocations", role="viewer"))["revoked"] == []

    assert (await revoking.revoke("dev-1", {"reason": "lost in transit"})).status_code == 200
    audit = (await revoking.admin_get("audit"))["audit"]
    refused = [e for e in audit if e["outcome"] == "refused"]
    assert [e["actor"] for e in refused] == ["anonymous", "viewer-1", "operator-1"]
    assert all(e["action"] == "POST /v1/admin/devices/dev-1/revoke" for e in refused)
    done = [e for e in audit if e["action"] == "device.revoke"]
    assert len(done) == 1 and done[0]["actor"] == "admin-1" and done[0]["outcome"] == "ok"
    assert done[0]["target"] == "dev-1" and dev.fingerprint in done[0]["detail"]
    assert "lost in transit" in done[0]["detail"]


async def test_revoking_a_certificate_of_another_device_is_refused(
        revoking: Revoking) -> None:
    """An admin (or a typo) names dev-1 but hands dev-2's certificate: refused, nothing
    revoked, so dev-2 is not shut out under dev-1's name."""
    one, two = revoking.issuer.issue("dev-1"), revoking.issuer.issue("dev-2")
    assert (await revoking.tracker.checkin(one.device)).status_code == 200
    response = await revoking.revoke("dev-1", {"certificates": [two.cert.read_text()]})
    assert response.status_code == 400
    assert "is for device 'dev-2', not 'dev-1'" in response.json()["error"]
    for bad in ({"certificates": ["not a certificate"]}, {"certificates": "x"},
                {"reason": 7}, {"other": 1}, [1]):
        assert (await revoking.revoke("dev-1", bad)).status_code == 400, bad
    assert (await revoking.admin_get("revocations"))["revoked"] == []
    assert (await revoking.tracker.checkin(two.device)).status_code == 200
    assert (await revoking.tracker.checkin(one.device)).status_code == 200
    audit = (await revoking.admin_get("audit"))["audit"]
    refused = [e for e in audit if e["action"] == "device.revoke"]
    assert len(refused) == 6 and {e["outcome"] for e in refused} == {"refused"}


async def test_revocation_survives_a_tracker_restart(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, "fleet")
    db = tmp_path / "tracker.db"
    register(db)
    token = add_token(db, "admin")
    stolen = Issuer(fleet).issue("dev-1")
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        async with trio.open_nursery() as nursery:
            urls = await start_tracker(nursery, db, fleet.ca_pem)
            tracker = Tracker(urls, db, client)
            assert (await tracker.checkin(stolen.device)).status_code == 200
            response = await client.post(f"{urls.api}/v1/admin/devices/dev-1/revoke",
                                         headers={"authorization": f"Bearer {token}"})
            assert response.status_code == 200
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            urls = await start_tracker(nursery, db, fleet.ca_pem)
            tracker = Tracker(urls, db, client)
            assert "is revoked" in (await tracker.checkin(stolen.device)).json()["error"]
            assert "is revoked" in failure(
                await tracker.announce(stolen.device, lean=True, device_id="dev-1"))
            assert (await tracker.refused())["revoked"] == 2
            nursery.cancel_scope.cancel()


# --- several tracker processes on one database -----------------------------------------------


class Monotonic:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def asgi(app: TrackerApp, method: str, target: str, body: bytes = b"",
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request through the app's ASGI interface, as hypercorn would pass it."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    path, _, query = target.partition("?")
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "client": ("127.0.0.2", 50000),
             "headers": [(k.lower().encode(), v.encode())
                         for k, v in (headers or {}).items()]}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_another_tracker_process_on_the_same_database_refuses_within_the_refresh_bound(
        tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, "fleet")
    db = tmp_path / "shared.db"
    register(db)
    token = add_token(db, "admin")
    stolen = Issuer(fleet).issue("dev-1").device
    config = TrackerConfig(db_path=db, device_ca=fleet.ca_pem, poll_jitter_fraction=0,
                           revocation_refresh_s=5.0)
    clock_one, clock_two = Monotonic(), Monotonic()
    with SqliteStore(db) as store_one, SqliteStore(db) as store_two:
        one = TrackerApp(Director(store_one, config, rng=random.Random(1), monotonic=clock_one))
        two = TrackerApp(Director(store_two, config, rng=random.Random(2), monotonic=clock_two))

        async def checkin(app: TrackerApp) -> tuple[int, bytes]:
            body = checkin_body("dev-1")
            return await asgi(app, "POST", "/v1/checkin", body,
                              stolen.sign("POST", "/v1/checkin", body))

        async def announce(app: TrackerApp) -> Any:
            target = "/announce?" + announce_query(device_id="dev-1").decode()
            status, body = await asgi(app, "GET", target,
                                      headers=stolen.sign("GET", target))
            assert status == 200
            return bdecode(body)

        assert (await checkin(one))[0] == 200
        assert b"peers" in await announce(two)  # two has read the (empty) revoked set
        status, answer = await asgi(one, "POST", "/v1/admin/devices/dev-1/revoke",
                                    headers={"authorization": f"Bearer {token}"})
        assert status == 200, answer
        # the process that revoked refuses at once
        assert (await checkin(one))[0] == 401
        assert "is revoked" in failure(await announce(one))
        # the other one within revocation_refresh_s of its last read: the bound
        clock_two.now += 4.9
        assert b"peers" in await announce(two)
        clock_two.now += 0.1
        assert "is revoked" in failure(await announce(two))
        status, answer = await checkin(two)
        assert status == 401 and b"is revoked" in answer
        assert two.statistics().device_auth_refused == 2


# --- storage and the command line ------------------------------------------------------------


def test_revocations_work_on_a_database_migrated_from_version_4(tmp_path: Path) -> None:
    db = tmp_path / "v4.db"
    raw = sqlite3.connect(db)
    for script in (_SCHEMA, _SCHEMA_SWARMS, _SCHEMA_ROLLOUTS, _SCHEMA_DEVICE_COUNTERS):
        for statement in script.split(";"):
            if statement.strip():
                raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (4)")
    raw.execute("INSERT INTO device_counters VALUES ('dev-1', 7, 1.0)")
    raw.commit()
    raw.close()
    with SqliteStore(db, create=False) as store:
        assert store.device_certificates("dev-1") == []  # signed before schema 5
        assert store.advance_counter("dev-1", 8, 2.0, "ab" * 32) is None
        assert store.advance_counter("dev-1", 8, 2.0, "cd" * 32) == 8  # replay: not seen
        assert store.device_certificates("dev-1") == ["ab" * 32]
        assert store.revoked_fingerprints() == {}
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    raw.close()
    assert SCHEMA_VERSION == 7


async def test_operator_revokes_a_stolen_key_from_the_command_line(
        revoking: Revoking, capsys: pytest.CaptureFixture[str]) -> None:
    stolen, other = revoking.issuer.issue("dev-1"), revoking.issuer.issue("dev-2")
    spare = revoking.issuer.issue("dev-1")  # a second certificate, never used
    assert (await revoking.tracker.checkin(stolen.device)).status_code == 200
    url = revoking.tracker.urls.api

    async def cli(*argv: str, role: str = "admin") -> tuple[int, str, str]:
        rc = await trio.to_thread.run_sync(functools.partial(
            run_cli, "device", *argv, "--url", url, "--token", revoking.tokens[role]))
        out, err = capsys.readouterr()
        return rc, out, err

    rc, _, err = await cli("revoke", "dev-1", role="operator")
    assert rc == 1 and "HTTP 403" in err
    rc, _, err = await cli("revoke", "dev-1", "--cert", str(other.cert))
    assert rc == 2 and "certificate of dev-2, not of dev-1" in err
    rc, _, err = await cli("revoke", "dev-1", "--cert", str(revoking.db.parent / "nope.pem"))
    assert rc == 2 and "cannot read certificate" in err
    rc, _, err = await cli("revoke", "dev-7")
    assert rc == 1 and "HTTP 404" in err and "unknown device dev-7" in err

    rc, out, err = await cli("revoke", "dev-1", "--cert", str(spare.cert),
                             "--reason", "stolen", "--json")
    assert rc == 0, err
    assert json.loads(out)["revoked"] == sorted([stolen.fingerprint, spare.fingerprint])
    assert "re-provision dev-1 with a new key" in err
    rc, out, _ = await cli("revocations", "--json", role="viewer")
    assert rc == 0
    assert {(e["cert_sha256"], e["reason"]) for e in json.loads(out)["revoked"]} == {
        (stolen.fingerprint, "stolen"), (spare.fingerprint, "stolen")}
    rc, out, _ = await cli("revocations", role="viewer")
    assert re.search(f"{stolen.fingerprint} +dev-1 +\\S+ \\S+ +admin-1 +stolen", out), out
    await assert_refused_everywhere(revoking, stolen.device, "dev-1")
    spare.device.counter = stolen.device.counter
    await assert_refused_everywhere(revoking, spare.device, "dev-1")
    assert (await revoking.tracker.checkin(other.device)).status_code == 200


def test_revoke_help_says_to_reprovision_with_a_new_key(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("device", "revoke", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "swarmota tls device-cert" in text and "keeps an existing DIR/key.pem" in text
    assert "delete (or move away) the old DIR/key.pem first" in text
    assert "--cert PEM" in text and "--reason TEXT" in text


async def test_a_certificate_reissued_for_the_stolen_key_is_a_new_certificate(
        revoking: Revoking) -> None:
    """Why the help insists on a new key: revocation names certificates, and a
    certificate re-issued for the old key.pem is a new one the thief can use too."""
    stolen = revoking.issuer.issue("dev-1")
    assert (await revoking.tracker.checkin(stolen.device)).status_code == 200
    assert (await revoking.revoke("dev-1")).status_code == 200
    reissued = revoking.issuer.issue("dev-1", key_of=stolen)  # key.pem kept
    assert reissued.fingerprint != stolen.fingerprint
    reissued.device.counter = stolen.device.counter
    assert (await revoking.tracker.checkin(reissued.device)).status_code == 200
