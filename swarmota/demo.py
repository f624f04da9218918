"""``swarmota demo``: a full publish and fleet update on loopback, in a temporary directory.

Creates a TUF repository, publishes v1 and v2 (with a delta from v1) of a generated
firmware-like image, starts the origin server (egress capped like a CDN-to-home link),
the tracker and a seeder on 127.0.0.x, provisions a fleet of devices on v1 and rolls v2
out canary-first in two stages: the canary devices update first while the others are
told to wait; once every canary has reported success the tracker opens the release to
everyone and the rest update together, sharing through the swarm. It prints a report
(per device, per rollout stage, bytes from the origin vs from peers, the origin
bandwidth saved). Then a bad release: v3, whose image fails the devices' health check,
goes to the same canaries, which install it, fail the check, roll back and report 40;
the rollout halts by itself at its canary stage, the tracker names the failing devices
in the halt reason, and nobody else is offered v3. Releases are registered the way an
operator does it: through the tracker's admin API, which verifies each against the
repository's signed metadata. The demo exits non-zero unless every device ends on
verified v2 bytes in its active slot and v3 was stopped at its canary. Needs nothing
outside this package. With ``--console`` the servers stay up after the report, until
Ctrl-C, and the operator console's address and an admin token are printed.

Security is on as in production: a development server CA issues the origin's and the
tracker's certificates (HTTPS, TLS 1.2+ and 1.3); devices pin both keys plus a spare
key. A fleet CA issues each device (and the seeder) an identity: every check-in, report
and announce is signed with it, and the payloads' swarms are private (SSL torrents of
the fleet CA), so only fleet members can join them.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from swarmota.infra.devca import ServerFiles, create_ca, issue_device_cert, issue_server_cert
from swarmota.infra.http_serve import ListenConfig
from swarmota.manifest import Payload
from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.announce_relay import AnnounceRelay
from swarmota.peer.config import DOWNLOAD_MODES, DeviceConfig
from swarmota.peer.errors import DownloadFailed
from swarmota.peer.http import HttpClient, TlsPolicy
from swarmota.peer.identity import install_identity, load_identity_dir
from swarmota.peer.state import DeviceState, init_device
from swarmota.peer.swarm import SwarmConfig
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.publish import publish_release
from swarmota.seeder.repository import Repository
from swarmota.seeder.seeding import PayloadSeeder, SeedingConfig
from swarmota.seeder.server import serve_origin
from swarmota.tracker.admin import hash_token, new_token
from swarmota.tracker.admin_client import AdminClient
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.registry import SwarmRegistry
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.server import TRACKER_TLS_MIN_VERSION, serve_tracker
from swarmota.tracker.sqlite_store import SqliteStore
from swarmota.tracker.store import TokenRecord

__all__ = ["DemoOutcome", "add_parser", "canary_plan", "make_image", "mutate_image",
           "run_demo", "update_fleet", "write_images"]

PRODUCT = "acme-router"
HARDWARE_ID = "acme-router-hw1"
SEEDER_HOST = "127.0.0.2"


def make_image(size_bytes: int, *, seed: int) -> bytes:
    """A firmware-like image: compressible text and tables mixed with random blobs."""
    rng = random.Random(seed)
    out = bytearray()
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(3, 10)))
             for _ in range(400)]
    while len(out) < size_bytes:
        kind = rng.random()
        if kind < 0.45:
            out += b" ".join(rng.choice(words) for _ in range(rng.randint(50, 400))) + b"\n"
        elif kind < 0.75:
            out += rng.randbytes(rng.randint(512, 8192))
        else:
            out += bytes([rng.randrange(256)]) * rng.randint(64, 4096)
    return bytes(out[:size_bytes])


def mutate_image(image: bytes, *, seed: int, fraction: float = 0.05) -> bytes:
    """A plausible next version: a few regions rewritten, a little appended."""
    rng = random.Random(seed)
    out = bytearray(image)
    for _ in range(max(1, int(len(out) * fraction) // 4096)):
        at = rng.randrange(max(1, len(out) - 4096))
        out[at:at + 4096] = rng.randbytes(4096)
    out += rng.randbytes(len(image) // 100)
    return bytes(out)


def write_images(directory: Path, size_bytes: int) -> Path:
    """Write ``v1.img`` (:func:`make_image`) and ``v2.img`` (its :func:`mutate_image`)
    into the new ``directory``; return it."""
    v1 = make_image(size_bytes, seed=1)
    directory.mkdir(parents=True)
    (directory / "v1.img").write_bytes(v1)
    (directory / "v2.img").write_bytes(mutate_image(v1, seed=2))
    return directory


@dataclass(frozen=True)
class _Pki:
    """The demo's certificates: a server CA (origin, tracker) and a fleet CA (devices)."""

    server_ca: Path
    origin: ServerFiles
    tracker: ServerFiles
    fleet_ca: Path
    fleet_ca_dir: Path

    @property
    def pins(self) -> tuple[str, ...]:
        assert self.tracker.backup_pin is not None
        return (self.origin.pin, self.tracker.pin, self.tracker.backup_pin)

    def identity(self, out_dir: Path, device_id: str, role: str = "device") -> ServerFiles:
        return issue_device_cert(self.fleet_ca_dir, out_dir, device_id, role=role)


def _make_pki(directory: Path) -> _Pki:
    server_ca_dir, fleet_ca_dir = directory / "server-ca", directory / "fleet-ca"
    server_ca = create_ca(server_ca_dir, common_name="swarmota demo server CA")
    origin = issue_server_cert(server_ca_dir, directory / "origin", ["127.0.0.1"])
    tracker = issue_server_cert(server_ca_dir, directory / "tracker", ["127.0.0.1"],
                                backup=True)
    fleet_ca = create_ca(fleet_ca_dir, common_name="swarmota demo fleet CA")
    return _Pki(server_ca, origin, tracker, fleet_ca, fleet_ca_dir)


async def _outsider_is_refused(directory: Path, tracker_url: str, tls: TlsPolicy) -> bool:
    """Whether the tracker refuses (401) a check-in signed with a certificate from a CA
    that is not the fleet's, for a device id of the fleet."""
    create_ca(directory / "ca", common_name="not the fleet CA")
    files = issue_device_cert(directory / "ca", directory / "identity", "device-01")
    identity = load_identity_dir(files.cert.parent)
    async with HttpClient(timeout_s=10.0, tls=tls, identity=identity) as http:
        try:
            await http.post_json(f"{tracker_url}/v1/checkin", {
                "device_id": "device-01", "product": PRODUCT, "hardware_id": HARDWARE_ID,
                "version": "1.0.0", "release_counter": 1})
        except DownloadFailed as exc:
            return exc.http_status == 401
    return False


@dataclass(frozen=True)
class DemoOutcome:
    """What the demo saw. Byte counts: ``origin_bytes_payloads`` is what the origin's
    HTTP server sent from ``payloads/`` (chunks, chunk lists and torrent files;
    ``origin_bytes_chunk_lists`` of them chunk lists), ``seeder_bytes`` what
    the seeder uploaded over BitTorrent; both are the CDN's egress. ``peer_bytes`` is
    what devices got from each other (piece data from peers minus the seeder's)."""

    ok: bool
    results: dict[str, UpdateResult]
    origin_bytes_payloads: int
    origin_bytes_total: int
    seeder_bytes: int
    peer_bytes: int
    payload_size: int
    reports_stored: int
    elapsed_s: float
    rollout_stages: list[tuple[str, int, int, int, int, int]] = field(default_factory=list)
    origin_bytes_chunk_lists: int = 0
    """Per stage: name, devices admitted, succeeded, failed (incl. rolled back), bytes
    from the origin and from peers as the devices reported them."""
    bad_release_phase: str = ""
    """The phase of the bad release's rollout at the end (``halted`` when it worked)."""
    halt_reason: str = ""

    @property
    def cdn_bytes(self) -> int:
        return self.origin_bytes_payloads + self.seeder_bytes


DEMO_SEED_TIME_S = 120.0  # a ceiling: the demo stops the fleet once every device is done


async def _wait_for_seeds(registry: SwarmRegistry, payloads: Sequence[Payload], *,
                          timeout_s: float = 10.0) -> None:
    """Until the tracker counts a seed in the swarm of each payload (or ``timeout_s``)."""
    hashes = [bytes.fromhex(p.info_hash)[:20] for p in payloads if p.info_hash]
    with trio.move_on_after(timeout_s):
        while any(registry.scrape(h).complete == 0 for h in hashes):
            await trio.sleep(0.05)


class _Fleet:
    """Devices updating in waves inside one nursery. A device that has installed keeps
    sharing its payload (its seed time is the ceiling) until the nursery is cancelled,
    so canaries help the waves after them, as deployed devices do."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.results: dict[str, UpdateResult] = {}
        self._changed = trio.Event()

    def _done(self, device_id: str, result: UpdateResult) -> None:
        self.results.setdefault(device_id, result)
        self._changed.set()
        self._changed = trio.Event()

    async def _one(self, state: DeviceState) -> None:
        device_id = state.config().device_id
        result = await update_once(state, on_seeding=lambda r, _s: self._done(device_id, r))
        self._done(device_id, result)

    async def wave(self, states: Sequence[DeviceState]) -> dict[str, UpdateResult]:
        """Start one update of each device; return their results once all have one."""
        ids = [state.config().device_id for state in states]
        for device_id in ids:
            self.results.pop(device_id, None)
        for state in states:
            self._nursery.start_soon(self._one, state)
        while not all(device_id in self.results for device_id in ids):
            await self._changed.wait()
        return {device_id: self.results[device_id] for device_id in ids}


async def update_fleet(states: Sequence[DeviceState]) -> dict[str, UpdateResult]:
    """Update every device at once (one ``update_once`` each) and return the results by
    device id. Devices that finished keep sharing their payload with those still
    downloading (their seed time is the ceiling); once every device has a result there
    is nobody left to share with, and the fleet stops."""
    async with trio.open_nursery() as nursery:
        results = await _Fleet(nursery).wave(states)
        nursery.cancel_scope.cancel()
    return results


def canary_plan(canaries: Sequence[str]) -> RolloutPlan:
    """The demo's two stages: the canary devices, then everyone. The canary stage
    advances once every canary has succeeded (no soak: a demo has no hours to spare);
    the default halt rules hold: any failing canary halts the rollout."""
    return RolloutPlan(canary_devices=tuple(canaries), stages_percent=(100.0,),
                       min_successes=len(canaries), min_success_rate=1.0, soak_s=0.0)


BROKEN_MARKER = b"SWARMOTA-DEMO-BROKEN-BUILD"
"""What the demo's bad release carries in its image; the devices' health check fails on
an image that holds it (as a real check fails when a service does not come up)."""


def health_command() -> tuple[str, ...]:
    """The demo devices' health check: exit 1 if the new slot's image is the broken
    build, 0 otherwise."""
    return (sys.executable, "-c",
            "import os, sys; data = open(os.environ['SWARMOTA_SLOT_IMAGE'], 'rb').read(); "
            f"sys.exit('health check failed: the service did not start' if {BROKEN_MARKER!r} "
            "in data else 0)")


def broken_image(image: bytes) -> bytes:
    """The next version of ``image`` with :data:`BROKEN_MARKER` in it."""
    out = bytearray(mutate_image(image, seed=3))
    out[len(out) // 2:len(out) // 2 + len(BROKEN_MARKER)] = BROKEN_MARKER
    return bytes(out)


async def run_demo(workdir: Path, *, devices: int = 4, image_size_bytes: int = 4 << 20,
                   zstd_level: int = 9, mode: str = "swarm",
                   cdn_rate_bytes_per_s: int | None = 4 << 20, canaries: int = 1,
                   out: Any = sys.stdout, console: bool = False) -> DemoOutcome:
    """Run the whole demo in ``workdir``; return what happened.

    ``mode`` is the devices' download mode (``swarm`` or ``direct``);
    ``cdn_rate_bytes_per_s`` caps the origin's HTTP egress and, separately, the seeder's
    BitTorrent upload (``None``: no caps), as a CDN-to-home link would; the first
    ``canaries`` devices (at least one) form the rollout's canary stage. With
    ``console``, the servers stay up after the report until SIGINT or SIGTERM, and the
    operator console's address and an admin token are printed (call it from the main
    thread: it waits for the signal).
    """

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    started = time.monotonic()
    images = write_images(workdir / "images", image_size_bytes)
    v2 = (images / "v2.img").read_bytes()

    say(f"[1/7] creating a TUF repository in {workdir / 'repo'}, a server CA and a fleet "
        "CA")
    repo = Repository.create(workdir / "repo")
    pki = _make_pki(workdir / "pki")
    fleet_ca_pem = pki.fleet_ca.read_bytes()
    say(f"[2/7] publishing v1, then v2 with a delta from v1 ({len(v2):,} byte images, "
        f"zstd level {zstd_level})")
    m1 = await trio.to_thread.run_sync(lambda: publish_release(
        repo, images / "v1.img", product=PRODUCT, version="1.0.0", release_counter=1,
        compatibility=[HARDWARE_ID], zstd_level=zstd_level, swarm_ca=fleet_ca_pem))
    m2 = await trio.to_thread.run_sync(lambda: publish_release(
        repo, images / "v2.img", product=PRODUCT, version="2.0.0", release_counter=2,
        compatibility=[HARDWARE_ID], zstd_level=zstd_level, bases=[images / "v1.img"],
        swarm_ca=fleet_ca_pem))
    full = m2.full_payload
    delta = m2.delta_for(m1.image.sha256)
    assert delta is not None
    payload_size = delta.size
    say(f"      v2 full payload: {full.size:,} bytes ({full.chunk_count} chunks of "
        f"{full.chunk_size // 1024} KiB)")
    say(f"      v2 delta from v1 ({delta.encoding}): {delta.size:,} bytes "
        f"({100 * delta.size / full.size:.1f}% of the full payload, "
        f"{delta.chunk_count} chunks)")

    device_ids = [f"device-{n + 1:02d}" for n in range(devices)]
    canary_ids = device_ids[:max(1, min(canaries, devices))]
    db = workdir / "tracker.sqlite"
    token = new_token()  # what 'tracker admin token create --db' does before serving
    console_token = new_token()
    store = SqliteStore(db)
    try:
        store.add_token(TokenRecord(hash_token(token), "demo-operator", "operator",
                                    time.time(), None))
        if console:
            store.add_token(TokenRecord(hash_token(console_token), "demo-admin", "admin",
                                        time.time(), None))
    finally:
        store.close()
    root_json = workdir / "root.json"  # the trust anchor, as devices are provisioned
    root_json.write_bytes(repo.root_bytes())

    origin = OriginApp(repo.origin_dir, OriginConfig(rate_limit_bytes_per_s=cdn_rate_bytes_per_s))
    tls = TlsPolicy(pins=frozenset(pki.pins), ca_file=str(pki.server_ca))
    seeder_identity = load_identity_dir(
        pki.identity(workdir / "seeder-identity", "seeder-1", role="seed").cert.parent)
    async with trio.open_nursery() as nursery, \
            HttpClient(timeout_s=30.0, tls=tls, identity=seeder_identity) as seeder_http:
        origin_url = await nursery.start(serve_origin, origin, ListenConfig(
            certfile=str(pki.origin.cert), keyfile=str(pki.origin.key)))
        tracker_config = TrackerConfig(
            db_path=db, device_ca=pki.fleet_ca, listen=ListenConfig(
                certfile=str(pki.tracker.cert), keyfile=str(pki.tracker.key),
                tls_min_version=TRACKER_TLS_MIN_VERSION),
            repository_root=root_json, origin_url=origin_url, origin_ca_file=pki.server_ca)
        registry = SwarmRegistry(interval_s=tracker_config.announce_interval_s)
        tracker_url = await nursery.start(
            partial(serve_tracker, tracker_config, registry=registry))
        admin = partial(_admin_call, tracker_url, token, str(pki.server_ca))
        # v1 is what the fleet runs: registered, offered to nobody; v2 canary first
        await admin("POST", "releases", {"manifest": m1.to_bytes().decode()})
        await admin("POST", "releases", {"manifest": m2.to_bytes().decode(),
                                         "rollout": canary_plan(canary_ids).to_json()})
        # the seeder announces, signed and pinned, through a loopback relay
        relay = AnnounceRelay(seeder_http, tracker_url)
        await nursery.start(relay.serve)
        seeder = PayloadSeeder(repo.origin_dir, SeedingConfig(
            swarm=SwarmConfig(listen_host=SEEDER_HOST, ssl_listen=True,
                              upload_rate_limit_bytes_per_s=cdn_rate_bytes_per_s or 0),
            announce_urls=(relay.announce_url,), torrent_trackers=False,
            identity=(seeder_identity.cert_pem, seeder_identity.key_pem)))
        await nursery.start(seeder.run)
        # A seeder is up long before a rollout; here it just started: let its first
        # announces reach the tracker, or the first devices would not hear of it.
        await _wait_for_seeds(registry, [p for p in m2.payloads if p.info_hash])
        rate = "unlimited" if cdn_rate_bytes_per_s is None else \
            f"{cdn_rate_bytes_per_s / (1 << 20):g} MiB/s each"
        say(f"[3/7] origin at {origin_url}, tracker at {tracker_url} (keys pinned on "
            f"devices), seeder at {seeder.listen_address[0]} (CDN egress {rate}); "
            "private swarms: only fleet certificates get in")

        states = []
        for n, device_id in enumerate(device_ids):
            config = DeviceConfig(device_id=device_id, product=PRODUCT, hardware_id=HARDWARE_ID,
                                  origin_url=origin_url, tracker_url=tracker_url,
                                  download_mode=mode, swarm_listen=f"127.0.0.{11 + n}:0",
                                  seed_time_s=DEMO_SEED_TIME_S, tls_pins=pki.pins,
                                  tls_ca_file=str(pki.server_ca),
                                  health_command=health_command())
            state = init_device(workdir / "devices" / device_id, config,
                                root_json=repo.root_bytes(), image=images / "v1.img",
                                version="1.0.0", release_counter=1)
            ident = pki.identity(workdir / "pki" / "devices" / device_id, device_id)
            install_identity(state.root, ident.cert, ident.key, device_id)
            states.append(state)
        canary_states, rest = states[:len(canary_ids)], states[len(canary_ids):]
        say(f"[4/7] {devices} devices provisioned on v1.0.0 ({mode} mode); rollout of 2.0.0: "
            f"canary ({', '.join(canary_ids)}), then 100%; the first failure halts it")

        async with trio.open_nursery() as fleet_nursery:
            fleet = _Fleet(fleet_nursery)
            waiting = await fleet.wave(rest)  # they check in first: not their turn yet
            offered_early = [d for d, r in waiting.items() if r.attempted]
            say(f"[5/7] stage canary: {len(rest)} other devices checked in and were told to "
                f"wait ({len(offered_early)} offered); updating the canaries")
            results = dict(await fleet.wave(canary_states))
            canaries_ok = all(r.status == 0 and r.updated for r in results.values())
            say(f"      canaries {'all updated' if canaries_ok else 'FAILED'}; "
                f"{len(rest)} devices check in again")
            results.update(await fleet.wave(rest))
            say(f"[6/7] stage 100%: {sum(r.updated for r in results.values())} of {devices} "
                "devices updated; report")
            fleet_nursery.cancel_scope.cancel()
        # the byte report is of the v2 rollout: read the counters before v3
        stats, seeding = origin.statistics(), seeder.statistics()

        bad, halt_reason = await _bad_release(
            say, repo, images, zstd_level, fleet_ca_pem, admin, canary_states, rest)
        outsider_refused = await _outsider_is_refused(workdir / "outsider", tracker_url, tls)
        say(f"      an outsider (a certificate from another CA) checks in: "
            f"{'refused' if outsider_refused else 'ACCEPTED'} by the tracker")
        want = hashlib.sha256(v2).hexdigest()
        ok = not offered_early and outsider_refused and bad.phase == "halted"
        say(f"  {'device':<11} {'status':>6} {'result':<9} {'payload':<7} {'mode':<6} "
            f"{'from origin':>12} {'from peers':>11} {'time s':>7}  slot")
        for state in states:
            device_id = state.config().device_id
            res = results[device_id]
            bc = state.bootctl()
            slot = state.slot_path(bc.primary).read_bytes()
            slot_ok = hashlib.sha256(slot).hexdigest() == want
            good = res.status == 0 and res.updated and slot_ok and not bc.pending
            ok &= good
            say(f"  {device_id:<11} {int(res.status):>6} {'updated' if good else 'FAILED':<9} "
                f"{res.payload_kind or '-':<7} {res.download_mode or '-':<6} "
                f"{res.bytes_origin:>12,} {res.bytes_peers:>11,} "
                f"{res.timings_s.get('total', 0.0):>7.2f}  "
                f"{bc.primary}={bc.slot(bc.primary).version}"
                + ("" if good else f"  ({res.message})"))
        store = SqliteStore(db)
        try:
            reports = store.reports()
            rollout = store.rollout_of(PRODUCT, "2.0.0")
        finally:
            store.close()
        stages: list[tuple[str, int, int, int, int, int]] = []
        if rollout is not None:
            say(f"  rollout of 2.0.0 {rollout.phase}, stage {rollout.stage_name}"
                + (f" ({rollout.halt_reason})" if rollout.halt_reason else ""))
            say(f"  {'stage':<8} {'admitted':>8} {'succeeded':>9} {'failed':>6} "
                f"{'from origin':>12} {'from peers':>11}")
            for name, c in zip(rollout.plan.stage_names, rollout.counters, strict=True):
                failed = c.failed + c.rolled_back
                stages.append((name, c.admitted, c.succeeded, failed, c.bytes_origin,
                               c.bytes_peers))
                say(f"  {name:<8} {c.admitted:>8} {c.succeeded:>9} {failed:>6} "
                    f"{c.bytes_origin:>12,} {c.bytes_peers:>11,}")
            # the others' second check-in must have opened the release to everyone
            opened = not rest or rollout.stage == len(rollout.plan.stage_names) - 1
            ok &= opened and rollout.phase in ("active", "completed")
        elapsed = time.monotonic() - started
        peer_bytes = max(0, sum(r.bytes_peers for r in results.values())
                         - seeding.bytes_uploaded_payload)
        cdn = stats.bytes_payloads + seeding.bytes_uploaded_payload
        needed = devices * payload_size
        say(f"  origin served {stats.bytes_total:,} bytes over HTTP ({stats.bytes_payloads:,} "
            f"from payloads/, {stats.bytes_metadata + stats.bytes_targets:,} metadata and "
            f"manifests); the seeder uploaded {seeding.bytes_uploaded_payload:,}; devices "
            f"shared {peer_bytes:,} among themselves")
        say(f"  CDN egress for payloads {cdn:,} bytes for {devices} devices x "
            f"{payload_size:,} byte delta = {needed:,} ({100 * (1 - cdn / needed):.0f}% "
            f"saved); full images from the CDN would have been {devices * full.size:,}")
        say(f"  tracker stored {len(reports)} reports; demo took {elapsed:.1f} s")
        ok &= len(reports) == devices + len(canary_ids)  # v2 for all, v3 for the canaries
        say("demo OK: every device runs verified v2.0.0; the bad v3.0.0 stopped at its "
            "canary" if ok else "demo FAILED")
        outcome = DemoOutcome(ok=ok, results=results,
                              origin_bytes_payloads=stats.bytes_payloads,
                              origin_bytes_chunk_lists=stats.bytes_chunk_lists,
                              origin_bytes_total=stats.bytes_total,
                              seeder_bytes=seeding.bytes_uploaded_payload,
                              peer_bytes=peer_bytes,
                              payload_size=payload_size, reports_stored=len(reports),
                              elapsed_s=elapsed, rollout_stages=stages,
                              bad_release_phase=bad.phase, halt_reason=halt_reason)
        if console:
            await _hold_console(say, tracker_url, console_token, pki)
        nursery.cancel_scope.cancel()
    return outcome


async def _hold_console(say: Any, tracker_url: str, token: str, pki: _Pki) -> None:
    """Print how to open the operator console, then wait for SIGINT or SIGTERM."""
    pins = ",".join(p.removeprefix("sha256/") for p in pki.pins)
    say(f"console: {tracker_url}/console/")
    say(f"  admin token (this run only): {token}")
    say(f"  the tracker's certificate is issued by the demo's own CA ({pki.server_ca}): "
        "accept the browser's warning, or trust its key only, e.g. "
        f"chromium --user-data-dir=$(mktemp -d) --ignore-certificate-errors-spki-list={pins}")
    say("  the servers stay up until Ctrl-C")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            say(f"  {signal.Signals(signum).name}: stopping the servers")
            break


async def _admin_call(tracker_url: str, token: str, ca_file: str, method: str, path: str,
                      body: Any = None) -> Any:
    """One admin API call, as an operator's client makes it (HTTPS, a bearer token)."""
    def call() -> Any:
        with AdminClient(tracker_url, token, ca_file=ca_file) as client:
            return client.get(path) if method == "GET" else client.post(path, body)
    return await trio.to_thread.run_sync(call)


@dataclass(frozen=True)
class _BadOutcome:
    phase: str
    offered_to_others: int
    canaries_rolled_back: bool


async def _bad_release(say: Any, repo: Repository, images: Path, zstd_level: int,
                       fleet_ca_pem: bytes, admin: Any, canary_states: Sequence[DeviceState],
                       rest: Sequence[DeviceState]) -> tuple[_BadOutcome, str]:
    """Publish v3, a build whose image fails the health check, roll it out canary first,
    and show that it stops at its canaries."""
    v3 = images / "v3.img"
    v3.write_bytes(broken_image((images / "v2.img").read_bytes()))
    m3 = await trio.to_thread.run_sync(lambda: publish_release(
        repo, v3, product=PRODUCT, version="3.0.0", release_counter=3,
        compatibility=[HARDWARE_ID], zstd_level=zstd_level, bases=[images / "v2.img"],
        swarm_ca=fleet_ca_pem))
    canary_ids = [s.config().device_id for s in canary_states]
    await admin("POST", "releases", {"manifest": m3.to_bytes().decode(),
                                     "rollout": canary_plan(canary_ids).to_json()})
    say(f"[7/7] a bad release: 3.0.0 (its image fails the devices' health check), "
        f"canary first ({', '.join(canary_ids)})")
    async with trio.open_nursery() as fleet_nursery:
        fleet = _Fleet(fleet_nursery)
        canaries = await fleet.wave(canary_states)
        others = await fleet.wave(rest)
        fleet_nursery.cancel_scope.cancel()
    rolled_back = all(r.status == 40 and not r.updated for r in canaries.values())
    offered = sum(1 for r in others.values() if r.attempted)
    rollout = await admin("GET", f"rollouts/{PRODUCT}/3.0.0")
    say(f"      canaries: {', '.join(f'{d} status {int(r.status)}' for d, r in canaries.items())}"
        f" (rolled back to 2.0.0); {len(rest)} other devices checked in: {offered} offered")
    say(f"      rollout of 3.0.0 {rollout['phase']} at stage {rollout['stage']}: "
        f"{rollout['halt_reason']}")
    phase = rollout["phase"] if rolled_back and not offered else "not stopped"
    return _BadOutcome(phase, offered, rolled_back), str(rollout["halt_reason"])


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="publish, serve and update a fleet on loopback",
        description="Full walk-through on loopback in a temporary directory: repository, "
                    "v1 and v2 releases, origin, tracker and seeder, a fleet of devices "
                    "(each on its own 127.0.0.x address) updated from v1 to v2 through the "
                    "swarm in a canary-first rollout (the canaries, then everyone), and a "
                    "report of where the bytes came from. Security on as in production: "
                    "HTTPS origin and tracker with keys pinned on the devices, a fleet CA "
                    "identity per device (every tracker request signed; an outsider is "
                    "shown refused) and private swarms. Releases are registered through "
                    "the tracker's admin API, verified against the signed metadata. Then "
                    "a bad v3 (its image fails the health check) is rolled out: it stops "
                    "at its canary, and the halt reason names the device. Exit code 0 only "
                    "if every device ends on verified v2 and v3 was stopped.")
    p.add_argument("--devices", type=int, default=4, help="fleet size, 1..64 (default 4)")
    p.add_argument("--image-mib", type=int, default=4, help="image size in MiB (default 4)")
    p.add_argument("--mode", choices=DOWNLOAD_MODES, default="swarm",
                   help="device download mode (default %(default)s)")
    p.add_argument("--cdn-rate-mib", type=float, default=4.0,
                   help="cap on the origin's HTTP egress and on the seeder's upload, MiB/s "
                        "each (default %(default)s; 0 = no cap)")
    p.add_argument("--canaries", type=int, default=1,
                   help="devices in the rollout's canary stage (default %(default)s)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep everything in this (new) directory instead of a temporary one")
    p.add_argument("--console", action="store_true",
                   help="after the report, keep the servers up (until Ctrl-C) and print the "
                        "operator console's address and an admin token, to look at the "
                        "fleet, the rollouts and the halted bad release in a browser")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if not 1 <= args.devices <= 64 or not 1 <= args.image_mib <= 1024:
        print("error: --devices must be 1..64 and --image-mib 1..1024", file=sys.stderr)
        return 2
    if args.cdn_rate_mib < 0:
        print("error: --cdn-rate-mib must be >= 0", file=sys.stderr)
        return 2
    if not 1 <= args.canaries <= args.devices:
        print("error: --canaries must be 1..--devices", file=sys.stderr)
        return 2
    rate = int(args.cdn_rate_mib * (1 << 20)) or None

    def run(workdir: Path) -> DemoOutcome:
        return trio.run(lambda: run_demo(workdir, devices=args.devices,
                                         image_size_bytes=args.image_mib << 20,
                                         mode=args.mode, cdn_rate_bytes_per_s=rate,
                                         canaries=args.canaries, console=args.console))

    if args.workdir is not None:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            print(f"error: {args.workdir} is not empty", file=sys.stderr)
            return 2
        args.workdir.mkdir(parents=True, exist_ok=True)
        return 0 if run(args.workdir).ok else 1
    tmp = Path(tempfile.mkdtemp(prefix="swarmota-demo-"))
    try:
        outcome = run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if outcome.ok else 1
