"""Device identity on the tracker: the real tracker (hypercorn and the lean BitTorrent
endpoint, one app, a real SQLite file) with ``device_ca`` set, driven over loopback
with requests signed by identities from a real fleet CA (:mod:`infra.devca`,
:mod:`infra.deviceauth`).

Threats covered: forged, tampered and unsigned requests; identities from a foreign CA
or past their validity; a device reporting (or announcing) as another device; replayed
check-ins, reports and announces (same counter, lower counter, to another tracker
process on the same database, to a tracker that restarted); an outsider holding the
torrent learning the swarm's peers. Every refusal leaves the database and the rollout
counters as they were and moves ``swarmota_tracker_device_auth_refused_total``.
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from swarmota.infra.devca import create_ca, issue_device_cert
from swarmota.infra.deviceauth import RequestSigner
from swarmota.infra.http_serve import ListenConfig
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.catalogue import register_release
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.director import Director
from swarmota.tracker.errors import ConfigError
from swarmota.tracker.identity import CounterWindow, WarningBudget, load_fleet_trust
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan, StageCounters
from swarmota.tracker.server import TrackerUrls, serve_tracker_endpoints
from swarmota.tracker.sqlite_store import _SCHEMA, _SCHEMA_ROLLOUTS, _SCHEMA_SWARMS, SqliteStore
from swarmota.tracker.store import SCHEMA_VERSION
from swarmota.tracker.wire import encode_json
from tests.test_tracker_announce import (
    ANNOUNCE_HASH,
    announce_query,
    bdecode,
    build_manifest,
    call,
    q,
)
from tests.tracker_cli import run_cli

TIMEOUT_S = 10
PRODUCT, NEW = "acme-router", "2.0.0"


def checkin_body(device_id: str) -> bytes:
    return encode_json({"device_id": device_id, "product": PRODUCT,
                        "hardware_id": "acme-router-hw1", "version": "1.0.0",
                        "release_counter": 1})


def report_body(device_id: str, status: int = 0) -> bytes:
    return encode_json({"device_id": device_id, "product": PRODUCT, "from_version": "1.0.0",
                        "to_version": NEW, "status": status, "message": "done",
                        "bytes_origin": 4096, "bytes_peers": 0, "timings_s": {}})


# --- identities ---------------------------------------------------------------------------


class Fleet:
    """A fleet CA on disk and the identities it issues."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root / name
        self.ca_pem = create_ca(self.root / "ca", common_name=f"{name} CA")
        self._issued = 0

    def identity(self, device_id: str, *, role: str = "device", valid_days: int = 30,
                 now: datetime.datetime | None = None) -> Device:
        self._issued += 1
        files = issue_device_cert(self.root / "ca", self.root / f"id-{self._issued}",
                                  device_id, role=role, valid_days=valid_days, now=now)
        return Device(RequestSigner(files.cert.read_bytes(), files.key.read_bytes()))


@dataclass
class Device:
    """An identity that signs requests with a counter that only goes up."""

    signer: RequestSigner
    counter: int = field(default=0)

    def sign(self, method: str, target: str, body: bytes = b"",
             counter: int | None = None) -> dict[str, str]:
        if counter is None:
            self.counter += 1
            counter = self.counter
        return dict(self.signer.headers(method, target.encode("ascii"), body, counter))


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path, "fleet")


# --- the tracker ------------------------------------------------------------------------


async def start_tracker(nursery: trio.Nursery, db: Path,
                        device_ca: Path | None) -> TrackerUrls:
    config = TrackerConfig(db_path=db, listen=ListenConfig(host="127.0.0.1", port=0),
                           announce_listen=("127.0.0.1", 0), poll_after_s=60,
                           poll_jitter_fraction=0, device_ca=device_ca)
    urls: TrackerUrls = await nursery.start(functools.partial(serve_tracker_endpoints,
                                                              config))
    return urls


def register(db: Path, plan: RolloutPlan | None = None) -> None:
    with SqliteStore(db) as store:
        register_release(store, Release.from_manifest(build_manifest()),
                         plan if plan is not None else RolloutPlan.everyone())


@dataclass(frozen=True)
class Stored:
    """What the database holds that a request could change."""

    reports: list[tuple[str, int]]
    devices: list[str]
    counters: tuple[StageCounters, ...]


async def stored(db: Path) -> Stored:
    def read() -> Stored:
        with SqliteStore(db) as store:
            rollout = store.rollout_of(PRODUCT, NEW)
            return Stored([(r.device_id, r.status) for r in store.reports()],
                          [d.device_id for d in store.devices()],
                          () if rollout is None else rollout.counters)
    return await trio.to_thread.run_sync(read)


@dataclass
class Tracker:
    urls: TrackerUrls
    db: Path
    client: httpx.AsyncClient

    async def post(self, path: str, body: bytes, headers: dict[str, str],
                   target: str | None = None) -> httpx.Response:
        return await self.client.post(self.urls.api + (target or path), content=body,
                                      headers={**headers,
                                               "content-type": "application/json"})

    async def checkin(self, device: Device, device_id: str | None = None) -> httpx.Response:
        body = checkin_body(device_id or device.signer.device_id)
        return await self.post("/v1/checkin", body, device.sign("POST", "/v1/checkin", body))

    async def report(self, device: Device, status: int = 0,
                     device_id: str | None = None) -> httpx.Response:
        body = report_body(device_id or device.signer.device_id, status)
        return await self.post("/v1/report", body, device.sign("POST", "/v1/report", body))

    async def get(self, target: str, headers: dict[str, str] | None = None, *,
                  lean: bool = False) -> Any:
        base = self.urls.announce if lean else self.urls.api
        assert base is not None
        response = await self.client.get(base + target, headers=headers or {})
        assert response.status_code == 200
        return bdecode(response.content)

    async def announce(self, device: Device | None, *, lean: bool = False,
                       **params: bytes | str | int) -> Any:
        target = "/announce?" + announce_query(**params).decode("ascii")
        headers = None if device is None else device.sign("GET", target)
        return await self.get(target, headers, lean=lean)

    async def refused(self) -> dict[str, int]:
        """``swarmota_tracker_device_auth_refused_total`` by reason."""
        text = (await self.client.get(self.urls.api + "/metrics")).text
        return {m.group(1): int(m.group(2)) for m in re.finditer(
            r'^swarmota_tracker_device_auth_refused_total\{reason="(\w+)"\} (\d+)$', text,
            re.MULTILINE)}


@pytest.fixture
async def tracker(tmp_path: Path, fleet: Fleet, nursery: trio.Nursery
                  ) -> AsyncIterator[Tracker]:
    db = tmp_path / "tracker.db"
    register(db)
    urls = await start_tracker(nursery, db, fleet.ca_pem)
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        yield Tracker(urls, db, client)


def assert_401(response: httpx.Response, fragment: str) -> None:
    assert response.status_code == 401, response.text
    assert fragment in response.json()["error"]


def failure(answer: Any) -> str:
    assert b"peers" not in answer, answer
    reason: bytes = answer[b"failure reason"]
    return reason.decode()


# --- check-ins and reports --------------------------------------------------------------


async def test_signed_checkin_and_report_are_accepted_and_counted(
        tracker: Tracker, fleet: Fleet) -> None:
    dev = fleet.identity("dev-1")
    response = await tracker.checkin(dev)
    assert response.status_code == 200 and response.json()["release"]["version"] == NEW
    assert (await tracker.report(dev)).json() == {"ok": True}
    after = await stored(tracker.db)
    assert after.reports == [("dev-1", 0)] and after.devices == ["dev-1"]
    assert sum(c.succeeded for c in after.counters) == 1
    assert set((await tracker.refused()).values()) == {0}


async def test_unsigned_checkin_is_refused_with_401(tracker: Tracker,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    before = await stored(tracker.db)
    response = await tracker.post("/v1/checkin", checkin_body("dev-1"), {})
    assert_401(response, "request not signed")
    assert response.headers["www-authenticate"] == "swarmota-signature"
    response = await tracker.post("/v1/report", report_body("dev-1", 40), {})
    assert_401(response, "request not signed")
    assert await stored(tracker.db) == before
    assert (await tracker.refused())["unsigned"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "device request refused" in r.getMessage()]
    assert len(warnings) == 2 and "'dev-1'" in warnings[0].getMessage()


async def test_forged_report_with_a_bad_signature_is_rejected_and_not_stored(
        tracker: Tracker, fleet: Fleet) -> None:
    dev, attacker = fleet.identity("dev-1"), fleet.identity("mallory")
    assert (await tracker.checkin(dev)).status_code == 200
    before = await stored(tracker.db)
    body = report_body("dev-1", 40)  # a rollback would count against the rollout
    cert = dev.sign("POST", "/v1/report", body)["swarmota-device-cert"]
    forged = {**attacker.sign("POST", "/v1/report", body, counter=99),
              "swarmota-device-cert": cert}  # dev-1's certificate, mallory's signature
    assert_401(await tracker.post("/v1/report", body, forged),
               "signature of dev-1 does not verify")
    garbled = dev.sign("POST", "/v1/report", body)
    garbled["swarmota-signature"] = garbled["swarmota-signature"][:-6] + "AAAAA="
    response = await tracker.post("/v1/report", body, garbled)
    assert response.status_code == 401
    assert await stored(tracker.db) == before
    assert (await tracker.refused())["invalid"] == 2


async def test_report_signed_by_a_foreign_ca_is_rejected(tracker: Tracker, fleet: Fleet,
                                                         tmp_path: Path) -> None:
    assert (await tracker.checkin(fleet.identity("dev-1"))).status_code == 200
    before = await stored(tracker.db)
    impostor = Fleet(tmp_path, "foreign").identity("dev-1")
    assert_401(await tracker.report(impostor, 40), "not issued by the fleet CA")
    assert_401(await tracker.checkin(impostor), "not issued by the fleet CA")
    assert await stored(tracker.db) == before
    assert (await tracker.refused())["invalid"] == 2


async def test_replayed_report_is_rejected(tracker: Tracker, fleet: Fleet) -> None:
    dev = fleet.identity("dev-1")
    assert (await tracker.checkin(dev)).status_code == 200
    body = report_body("dev-1")
    headers = dev.sign("POST", "/v1/report", body, counter=10)
    assert (await tracker.post("/v1/report", body, headers)).status_code == 200
    before = await stored(tracker.db)
    # the very same request again
    assert_401(await tracker.post("/v1/report", body, headers),
               "replayed request: counter 10 is not above 10")
    # a genuine signature with a lower counter (e.g. a report recorded earlier)
    rollback = report_body("dev-1", 40)
    assert_401(await tracker.post("/v1/report", rollback,
                                  dev.sign("POST", "/v1/report", rollback, counter=7)),
               "counter 7 is not above 10")
    # check-ins share the device's counter
    checkin = checkin_body("dev-1")
    assert_401(await tracker.post("/v1/checkin", checkin,
                                  dev.sign("POST", "/v1/checkin", checkin, counter=9)),
               "counter 9 is not above 10")
    assert await stored(tracker.db) == before
    assert [(c.succeeded, c.rolled_back) for c in before.counters if c.admitted] == [(1, 0)]
    assert (await tracker.refused())["replayed"] == 3
    # the device itself carries on above its last counter
    dev.counter = 10
    assert (await tracker.report(dev, 40)).status_code == 200


async def test_report_for_another_device_id_than_the_certificate_is_rejected(
        tracker: Tracker, fleet: Fleet) -> None:
    victim, attacker = fleet.identity("dev-1"), fleet.identity("dev-2")
    assert (await tracker.checkin(victim)).status_code == 200
    before = await stored(tracker.db)
    assert_401(await tracker.report(attacker, 40, device_id="dev-1"),
               "request names device_id 'dev-1', but is signed by 'dev-2'")
    assert_401(await tracker.checkin(attacker, device_id="dev-1"), "signed by 'dev-2'")
    assert await stored(tracker.db) == before
    assert (await tracker.refused())["identity"] == 2


async def test_tampered_body_or_target_fails_the_signature(tracker: Tracker,
                                                           fleet: Fleet) -> None:
    dev = fleet.identity("dev-1")
    assert (await tracker.checkin(dev)).status_code == 200
    before = await stored(tracker.db)
    good = report_body("dev-1", 0)
    headers = dev.sign("POST", "/v1/report", good)
    assert_401(await tracker.post("/v1/report", report_body("dev-1", 40), headers),
               "does not verify")  # body changed in flight
    checkin = checkin_body("dev-1")
    headers = dev.sign("POST", "/v1/checkin", checkin)
    assert_401(await tracker.post("/v1/checkin", checkin, headers,
                                  target="/v1/checkin?x=1"), "does not verify")
    # an announce whose query was changed (left=1000 signed, left=0 sent)
    target = "/announce?" + announce_query(device_id="dev-1").decode()
    headers = dev.sign("GET", target)
    sent = "/announce?" + announce_query(device_id="dev-1", left=0).decode()
    for lean in (False, True):
        assert "does not verify" in failure(await tracker.get(sent, headers, lean=lean))
    assert await stored(tracker.db) == before
    assert (await tracker.refused())["invalid"] == 4


async def test_expired_device_certificate_is_rejected(tracker: Tracker, fleet: Fleet) -> None:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = fleet.identity("dev-1", valid_days=1, now=long_ago)
    before = await stored(tracker.db)
    assert_401(await tracker.checkin(expired), "outside its validity period")
    assert "outside its validity period" in failure(
        await tracker.announce(expired, left=0, device_id="dev-1"))
    assert await stored(tracker.db) == before
    assert (await tracker.refused())["invalid"] == 2


async def test_two_trackers_on_one_database_refuse_a_report_replayed_to_the_other(
        tmp_path: Path, fleet: Fleet, nursery: trio.Nursery) -> None:
    db = tmp_path / "shared.db"
    register(db)
    first = await start_tracker(nursery, db, fleet.ca_pem)
    second = await start_tracker(nursery, db, fleet.ca_pem)
    dev = fleet.identity("dev-1")
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        one, two = Tracker(first, db, client), Tracker(second, db, client)
        assert (await one.checkin(dev)).status_code == 200
        body = report_body("dev-1", 40)
        headers = dev.sign("POST", "/v1/report", body)
        assert (await one.post("/v1/report", body, headers)).status_code == 200
        before = await stored(db)
        assert_401(await two.post("/v1/report", body, headers), "replayed request")
        # and a check-in signed before that report, held back, then sent to the other
        held = checkin_body("dev-1")
        held_headers = dev.sign("POST", "/v1/checkin", held, counter=1)
        assert_401(await two.post("/v1/checkin", held, held_headers), "replayed request")
        assert await stored(db) == before
        assert before.reports == [("dev-1", 40)]
        assert (await two.refused())["replayed"] == 2
        assert (await one.refused())["replayed"] == 0


# --- announces and scrapes ----------------------------------------------------------------


@pytest.mark.parametrize("lean", [False, True], ids=["hypercorn", "lean"])
async def test_outsider_announce_learns_no_peers(tracker: Tracker, fleet: Fleet,
                                                 tmp_path: Path, lean: bool) -> None:
    """The rollout is open to every device and the swarm has a seed and a leecher; an
    outsider with the torrent (its info-hash) asks for peers, claiming to be a seed."""
    seeder, dev = fleet.identity("seeder-1", role="seed"), fleet.identity("dev-1")
    assert (await tracker.checkin(dev)).status_code == 200
    answer = await tracker.announce(seeder, lean=lean, left=0, port=6881)
    assert answer[b"incomplete"] == 0 and answer[b"peers"] == b""
    answer = await tracker.announce(dev, lean=lean, device_id="dev-1", port=6882)
    assert len(answer[b"peers"]) == 6  # the seeder
    refused_before = await tracker.refused()

    reason = failure(await tracker.announce(None, lean=lean, left=0, port=7000))
    assert "request not signed" in reason
    reason = failure(await tracker.announce(None, lean=lean, left=1000, port=7000,
                                            device_id="dev-1"))
    assert "request not signed" in reason
    foreign = Fleet(tmp_path, "foreign").identity("seeder-1", role="seed")
    reason = failure(await tracker.announce(foreign, lean=lean, left=0, port=7000))
    assert "not issued by the fleet CA" in reason
    scrape = await tracker.get("/scrape?" + q(info_hash=ANNOUNCE_HASH).decode(), lean=lean)
    assert b"files" not in scrape and "request not signed" in failure(scrape)

    refused = await tracker.refused()
    assert refused["unsigned"] == refused_before["unsigned"] + 3
    assert refused["invalid"] == refused_before["invalid"] + 1
    # nobody new in the swarm: a signed scrape still counts one seed and one leecher
    target = "/scrape?" + q(info_hash=ANNOUNCE_HASH).decode()
    files = await tracker.get(target, dev.sign("GET", target), lean=lean)
    assert files[b"files"][ANNOUNCE_HASH][b"complete"] == 1
    assert files[b"files"][ANNOUNCE_HASH][b"incomplete"] == 1


async def test_seed_identity_gets_peers_and_devices_only_when_admitted(
        tmp_path: Path, fleet: Fleet, nursery: trio.Nursery) -> None:
    db = tmp_path / "tracker.db"
    register(db, RolloutPlan(canary_devices=("dev-1",), soak_s=3600))
    urls = await start_tracker(nursery, db, fleet.ca_pem)
    seeder = fleet.identity("seeder-1", role="seed")
    canary, other = fleet.identity("dev-1"), fleet.identity("dev-2")
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        tracker = Tracker(urls, db, client)
        assert (await tracker.checkin(canary)).json()["release"] is not None
        assert (await tracker.checkin(other)).json()["release"] is None  # not admitted
        # the seeder gets peers whatever it declares (a device id too: ignored)
        await tracker.announce(canary, device_id="dev-1", port=6882)
        answer = await tracker.announce(seeder, left=0, port=6881, device_id="dev-2")
        assert len(answer[b"peers"]) == 6
        # the admitted canary gets the seeder; dev-2, signed but not admitted, nobody
        answer = await tracker.announce(canary, lean=True, device_id="dev-1", port=6882)
        assert len(answer[b"peers"]) == 6
        answer = await tracker.announce(other, lean=True, device_id="dev-2", port=6883)
        assert answer[b"peers"] == b""
        # a device identity must name itself
        before = await tracker.refused()
        assert "signed by 'dev-2'" in failure(
            await tracker.announce(other, device_id="dev-1", port=6883))
        assert "names no device_id" in failure(await tracker.announce(other, port=6883))
        assert "names no device_id" in failure(await tracker.announce(other, left=0))
        assert (await tracker.refused())["identity"] == before["identity"] + 3


async def test_replayed_announce_is_rejected_on_both_endpoints_and_after_a_restart(
        tmp_path: Path, fleet: Fleet) -> None:
    db = tmp_path / "tracker.db"
    register(db)
    dev = fleet.identity("dev-1")
    target = "/announce?" + announce_query(device_id="dev-1").decode()
    early = dev.sign("GET", target)  # captured before the device's check-in
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        async with trio.open_nursery() as nursery:
            tracker = Tracker(await start_tracker(nursery, db, fleet.ca_pem), db, client)
            assert (await tracker.checkin(dev)).status_code == 200
            headers = dev.sign("GET", target)
            assert b"peers" in await tracker.get(target, headers)
            for lean in (False, True):
                assert "replayed request" in failure(
                    await tracker.get(target, headers, lean=lean))
            assert "counter 1 is not above 3" in failure(await tracker.get(target, early))
            assert (await tracker.refused())["replayed"] == 3
            nursery.cancel_scope.cancel()
        # a restarted tracker remembers no announce, but the stored check-in counter (2)
        async with trio.open_nursery() as nursery:
            tracker = Tracker(await start_tracker(nursery, db, fleet.ca_pem), db, client)
            assert "counter 1 is not above 2" in failure(await tracker.get(target, early))
            assert b"peers" in await tracker.get(target, dev.sign("GET", target))
            nursery.cancel_scope.cancel()


async def test_a_header_sent_twice_is_not_a_signature(tracker: Tracker, fleet: Fleet) -> None:
    """Two certificate headers (one valid, one not) leave no doubt to exploit: refused."""
    dev = fleet.identity("dev-1")
    target = "/announce?" + announce_query(device_id="dev-1").decode()
    headers = list(dev.sign("GET", target).items())
    headers.append(("swarmota-device-cert", "AAAA"))
    assert tracker.urls.announce is not None
    for base in (tracker.urls.api, tracker.urls.announce):
        response = await tracker.client.get(base + target, headers=headers)
        assert "request not signed" in failure(bdecode(response.content))


async def test_outsider_announce_is_counted_as_refused_in_the_app_statistics(
        tmp_path: Path, fleet: Fleet) -> None:
    db = tmp_path / "tracker.db"
    register(db)
    with SqliteStore(db) as store:
        app = TrackerApp(Director(store, TrackerConfig(db_path=db, device_ca=fleet.ca_pem)))
        _, _, body = await call(app, "/announce", announce_query(left=0))
        assert "request not signed" in failure(bdecode(body))
        stats = app.statistics()
        assert (stats.device_auth_refused, stats.bittorrent_failures, stats.announces,
                stats.errors) == (1, 1, 0, 0)
        assert app.director.registry.statistics().announces == 0


# --- lab mode and the command line ----------------------------------------------------------


async def test_lab_mode_accepts_unsigned_requests(tmp_path: Path,
                                                  nursery: trio.Nursery) -> None:
    db = tmp_path / "lab.db"
    register(db)
    urls = await start_tracker(nursery, db, None)
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        tracker = Tracker(urls, db, client)
        assert (await tracker.post("/v1/checkin", checkin_body("dev-1"), {})).status_code == 200
        assert (await tracker.post("/v1/report", report_body("dev-1"), {})).status_code == 200
        answer = await tracker.announce(None, lean=True, left=0, port=6881)
        assert answer[b"peers"] == b""
        answer = await tracker.announce(None, device_id="dev-1", port=6882)
        assert len(answer[b"peers"]) == 6  # the anonymous seed
        assert set((await tracker.refused()).values()) == {0}
    assert (await stored(db)).reports == [("dev-1", 0)]


def test_serve_requires_device_ca_or_explicit_lab_mode(
        tmp_path: Path, fleet: Fleet, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    db = str(tmp_path / "t.db")
    assert run_cli("serve", "--db", db) == 2
    err = capsys.readouterr().err
    assert "--device-ca" in err and "--allow-unauthenticated-devices" in err
    with pytest.raises(SystemExit) as info:  # not both
        run_cli("serve", "--db", db, "--device-ca", str(fleet.ca_pem),
                "--allow-unauthenticated-devices")
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    # a fleet CA file that is missing, not PEM, or not a CA: refused before serving
    device_cert = issue_device_cert(fleet.root / "ca", tmp_path / "dev-1", "dev-1").cert
    (tmp_path / "garbage.pem").write_text("not a certificate")
    for bad, reason in ((tmp_path / "missing.pem", "cannot read"),
                        (tmp_path / "garbage.pem", "no fleet CA certificate"),
                        (device_cert, "not a CA certificate")):
        assert run_cli("serve", "--db", db, "--device-ca", str(bad)) == 2
        assert reason in capsys.readouterr().err
    assert not Path(db).exists()  # nothing started
    # lab mode says so at start (here it then fails to bind a taken port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="swarmota.tracker.cli"):
            assert run_cli("serve", "--db", db, "--listen", f"127.0.0.1:{port}",
                           "--allow-unauthenticated-devices") == 1
    assert "lab mode" in caplog.text
    assert "cannot run the tracker" in capsys.readouterr().err


def test_serve_help_explains_both_modes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("serve", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "--device-ca FILE" in text and "fleet CA" in text
    assert "--allow-unauthenticated-devices" in text and "lab mode" in text


# --- storage and the pure parts ----------------------------------------------------------------


def test_stored_counter_only_moves_up(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "t.db") as one, SqliteStore(tmp_path / "t.db") as two:
        assert one.device_counter("dev-1") is None
        assert one.advance_counter("dev-1", 5, 1.0) is None
        assert two.advance_counter("dev-1", 5, 2.0) == 5  # the other process: refused
        assert two.advance_counter("dev-1", 4, 2.0) == 5
        assert two.advance_counter("dev-1", 6, 2.0) is None
        assert one.device_counter("dev-1") == 6
        assert one.advance_counter("dev-2", 0, 3.0) is None  # 0 is a valid first counter


def test_a_version_3_database_gains_device_counters(tmp_path: Path) -> None:
    db = tmp_path / "v3.db"
    raw = sqlite3.connect(db)
    for script in (_SCHEMA, _SCHEMA_SWARMS, _SCHEMA_ROLLOUTS):
        for statement in script.split(";"):
            if statement.strip():
                raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (3)")
    raw.commit()
    raw.close()
    with SqliteStore(db, create=False) as store:
        assert store.advance_counter("dev-1", 3, 1.0) is None
        assert store.device_counter("dev-1") == 3
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    raw.close()
    assert SCHEMA_VERSION == 7


def test_counter_window_keeps_the_highest_counter_of_recent_devices() -> None:
    window = CounterWindow(2)
    window.raise_to("a", 5)
    window.raise_to("a", 3)
    assert window.get("a") == 5
    window.raise_to("b", 1)
    window.get("a")  # a used last: b goes first
    window.raise_to("c", 1)
    assert (window.get("a"), window.get("b"), window.get("c"), len(window)) == (5, None, 1, 2)
    with pytest.raises(ValueError):
        CounterWindow(0)


def test_a_bad_fleet_ca_file_is_a_config_error(tmp_path: Path, fleet: Fleet) -> None:
    assert load_fleet_trust(fleet.ca_pem) is not None
    with pytest.raises(ConfigError, match="cannot read the fleet CA file"):
        load_fleet_trust(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="no fleet CA certificate"):
        (tmp_path / "empty.pem").write_bytes(b"")
        load_fleet_trust(tmp_path / "empty.pem")


async def test_an_outsider_flooding_unsigned_announces_cannot_flood_the_log(
        tracker: Tracker, caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal is counted in /metrics, but the log keeps at most 20 lines a
    minute; the next line logged says how many were left out."""
    caplog.set_level(logging.WARNING, logger="swarmota.tracker.app")
    before = (await tracker.refused())["unsigned"]
    for _ in range(60):
        assert "request not signed" in failure(
            await tracker.announce(None, lean=True, left=0, port=7000))
    assert (await tracker.refused())["unsigned"] == before + 60
    lines = [r for r in caplog.records if "device request refused" in r.getMessage()]
    assert len(lines) <= 20


def test_warning_budget_counts_what_it_leaves_out() -> None:
    budget = WarningBudget(per_window=2, window_s=60.0)
    assert [budget.allow(t) for t in (0.0, 1.0, 2.0, 3.0)] == [
        (True, 0), (True, 0), (False, 0), (False, 0)]
    assert budget.allow(61.0) == (True, 2)  # a new minute: two were left out
    assert budget.allow(30.0) == (True, 0)  # a clock going backwards starts a window
