"""Devices whose keys, floors and trust anchor are in a TPM (issue 22), updating end to
end through the real agent, a real tracker and origin, against a real software TPM
(swtpm, driven with tpm2-tools; skipped without them).

Threats covered: a device enrolled from the signing requests of 'peer init --keystore
tpm' updates through the private swarm with check-ins, reports and relayed announces
signed by its TPM key, and no private key on its disk; a state directory edited to
lower the anti-rollback floors (boot control, floors.json) then offered the older
release; a root.json replaced on disk by an attacker's (with the attacker's origin
behind it); a power cut between appending the new floor to the floor log and extending the TPM's
index, or while the TPM extends it (the agent and the TPM both killed): the floor is
old or new and the next pass carries on; garbage extended into the floor index (the
device refuses every release and reports why); a TPM that does not answer ends the
pass with status 30 naming it, never 'peer run' (the daemon backs off, keeps the report
it cannot sign in the outbox, and updates once the TPM is back); an owner password set
so that root cannot undefine the floor index, taken from the device configuration's
root-only file for identity renewal (a missing, exposed or wrong one refused, a wrong
one never sent twice).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from swarmota.cli import main
from swarmota.infra.http_serve import ListenConfig
from swarmota.peer import crashpoints
from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.bootctl import write_bootctl
from swarmota.peer.config import save_config
from swarmota.peer.crashpoints import CrashPlan
from swarmota.peer.daemon import DaemonConfig, run_daemon
from swarmota.peer.errors import StatusCode
from swarmota.peer.keystore import open_keystore
from swarmota.peer.state import DeviceState
from swarmota.peer.tpm import OwnerAuthError, TpmError
from swarmota.peer.tpm_nv import FLOOR_LOG, FLOOR_LOG_INDEX, fold
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.repository import KeySetup, Repository
from swarmota.seeder.server import serve_origin
from swarmota.tracker.sqlite_store import SqliteStore
from tests.release_env import (
    REPO_ROOT,
    Fleet,
    ReleaseEnv,
    killed_at,
    open_fleet,
    publish,
    serve_offer,
)
from tests.swtpm import SoftTpm


def tpm_device(env: ReleaseEnv, tpm: SoftTpm, name: str = "dev-tpm", **extra: Any
               ) -> DeviceState:
    return env.device(name, keystore="tpm", tpm_device=tpm.device, **extra)


def tpm_floor(dev: DeviceState) -> int:
    """The image floor the device's TPM floor log holds (checked against the TPM)."""
    store = open_keystore(dev.config(), dev.root)
    assert store is not None
    return store.floors.read().image


def retarget(dev: DeviceState, **changes: str) -> None:
    save_config(dev.config_path, replace(dev.config(), **changes))  # type: ignore[arg-type]


def enrol(fleet: Fleet, dev: DeviceState, out: Path, capsys: pytest.CaptureFixture[str],
          request: str = "request.pem") -> str:
    """The fleet CA certifies the device's signing requests (``STATE/identity/request``,
    or another file there), the device installs them: ``same key`` or ``new key``."""
    assert main(["tls", "device-cert", str(out), "--ca", str(fleet.pki / "fleet-ca"),
                 "--csr", str(dev.root / "identity" / request)]) == 0
    capsys.readouterr()
    assert main(["peer", "identity", "renew", str(dev.root), "--cert",
                 str(out / "cert.pem")]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "identity renewed" in said, said
    return said.split("(")[1].split(")")[0]


def tracker_certificates(env: ReleaseEnv, device_id: str) -> list[str]:
    """The SHA-256 of each certificate the tracker saw the device sign requests with."""
    store = SqliteStore(env.db)
    try:
        return list(store.device_certificates(device_id))
    finally:
        store.close()


def cert_sha256(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@pytest.fixture
async def slow_fleet(tmp_path: Path, nursery: trio.Nursery,
                     images: tuple[bytes, bytes]) -> AsyncIterator[Fleet]:
    """The private fleet behind an origin limited to 256 KiB/s: the seeder, reached
    through the relay, serves the payload."""
    async with open_fleet(nursery, tmp_path, images, origin_config=OriginConfig(
            rate_limit_bytes_per_s=256 * 1024, rate_limit_burst_bytes=16 * 1024)) as fleet:
        yield fleet


async def test_tpm_device_enrolled_from_its_requests_updates_with_everything_signed_in_the_tpm(
        soft_tpm: SoftTpm, slow_fleet: Fleet, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    fleet = slow_fleet
    env = fleet.env
    dev = fleet.device("dev-tpm", ca=None, keystore="tpm", tpm_device=soft_tpm.device)
    # the operator signs the requests 'peer init' wrote; the device installs the result
    assert enrol(fleet, dev, tmp_path / "issued", capsys) == "same key"
    # a fleet member with its key in a file downloads at the same time: each fetches its
    # share of the payload from the origin and the other's from the peer, over TLS
    member = fleet.device("dev-file")
    results: dict[str, UpdateResult] = {}

    async def one(device: DeviceState) -> None:
        results[device.config().device_id] = await update_once(device)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for device in (dev, member):
                nursery.start_soon(one, device)
    result = results["dev-tpm"]
    assert result.status == StatusCode.OK, result.message
    assert results["dev-file"].status == StatusCode.OK, results["dev-file"].message
    assert result.download_mode == "swarm" and result.bytes_peers > 0, \
        "peers found by relayed announces, spoken to over TLS with the sealed swarm key"
    assert dev.slot_path(dev.bootctl().primary).read_bytes() == env.v2
    # every request the tracker accepted from the device was signed with the certificate
    # of the TPM's key: check-ins, the report, the relay's announces
    cert = x509.load_pem_x509_certificate((dev.root / "identity" / "cert.pem").read_bytes())
    assert cert.public_key() == soft_tpm.tpm().public_key(0x81000101)
    assert tracker_certificates(env, "dev-tpm") == [
        cert_sha256(dev.root / "identity" / "cert.pem")]
    assert sorted((r.device_id, r.status) for r in env.reports()) == [
        ("dev-file", 0), ("dev-tpm", 0)]
    for path in dev.root.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    assert tpm_floor(dev) == 2


async def test_edited_state_directory_cannot_lower_the_tpm_floor_or_replace_the_root(
        soft_tpm: SoftTpm, env: ReleaseEnv, nursery: trio.Nursery, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    dev = tpm_device(env, soft_tpm)
    assert (await update_once(dev)).status == StatusCode.OK  # v2, counter 2
    genuine_root = (dev.trust_dir / "root.json").read_bytes()
    # whoever writes the disk lowers every floor the state directory holds...
    write_bootctl(dev.bootctl_path, replace(dev.bootctl(), min_release_counter=0))
    (dev.root / "floors.json").unlink(missing_ok=True)
    # ... and a tracker offers the older, genuinely signed release
    evil = await serve_offer(nursery, {"product": "acme-router", "version": "1.0.0",
                                        "release_counter": 1,
                                        "target": "releases/acme-router/1.0.0.json"})
    retarget(dev, tracker_url=evil)
    result = await update_once(dev)
    assert result.status == StatusCode.VERIFY_FAILED
    assert "not newer than the installed counter 2" in result.message, result.message
    assert dev.slot_path("b").read_bytes() == env.v2 and dev.bootctl().primary == "b"

    # the attacker's own repository, its root put in place of the device's
    attacker = Repository.create(tmp_path / "attacker", keys=KeySetup())
    publish(attacker, tmp_path / "attacker-work", env.v1, "3.0.0", 3)
    attacker_origin = await nursery.start(serve_origin, OriginApp(
        attacker.origin_dir, OriginConfig()), ListenConfig())
    evil3 = await serve_offer(nursery, {"product": "acme-router", "version": "3.0.0",
                                         "release_counter": 3,
                                         "target": "releases/acme-router/3.0.0.json"})
    retarget(dev, tracker_url=evil3, origin_url=attacker_origin)
    (dev.trust_dir / "root.json").write_bytes(attacker.root_bytes())
    with caplog.at_level(logging.WARNING, logger="swarmota.peer.tpm_nv"):
        result = await update_once(dev)
    assert result.status == StatusCode.VERIFY_FAILED, result.message
    assert "not the root anchored in the TPM" in caplog.text
    assert (dev.trust_dir / "root.json").read_bytes() == genuine_root
    assert dev.slot_path("b").read_bytes() == env.v2 and dev.bootctl().primary == "b"


@pytest.mark.parametrize("point", ["floor_log.appended", "tpm.nv_extend.in_flight"])
async def test_power_cut_while_the_tpm_raises_the_floor_leaves_old_or_new_and_carries_on(
        soft_tpm: SoftTpm, env: ReleaseEnv, point: str) -> None:
    dev = tpm_device(env, soft_tpm, mode="direct")
    # the agent dies with the committed release's floor appended to the floor log but
    # not yet extended into the TPM, or while tpm2_nvextend runs; the TPM loses its
    # power with it
    await killed_at(dev, point)
    soft_tpm.power_cut()
    soft_tpm.start()
    assert tpm_floor(dev) == 2, "the appended entry is extended at the next load"
    log_lines = (dev.trust_dir / FLOOR_LOG).read_bytes().splitlines()
    assert soft_tpm.tpm().nv_read(FLOOR_LOG_INDEX, 32) == fold(log_lines)
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "b" and dev.slot_path("b").read_bytes() == env.v2
    assert tpm_floor(dev) == 2
    # a TPM that does not answer: the pass refuses to decide anything it holds, and
    # says so with a status
    soft_tpm.stop()
    result = await update_once(dev)
    assert result.status == StatusCode.INSTALL_FAILED and not result.attempted
    assert "the TPM failed: tpm2_" in result.message and "swtpm:path=" in result.message
    assert dev.bootctl().committed == "b"


async def test_garbage_extended_into_the_tpm_floor_index_refuses_the_update_and_reports_it(
        soft_tpm: SoftTpm, env: ReleaseEnv) -> None:
    """Code running as root on the device extends the floor index with something that
    is no line of the floor log: no floor can be trusted any more, so the device
    installs nothing (fails closed) and says why, to its operator and the tracker."""
    dev = tpm_device(env, soft_tpm, mode="direct")
    soft_tpm.tpm().run("tpm2_nvextend", f"0x{FLOOR_LOG_INDEX:08x}", "-C",
                       f"0x{FLOOR_LOG_INDEX:08x}", "-i", "-",
                       data=hashlib.sha256(b"garbage").digest())
    result = await update_once(dev)
    assert result.status == StatusCode.VERIFY_FAILED, result.message
    assert "does not match the TPM's floor index" in result.message
    assert dev.bootctl().committed == "a" and dev.slot_path("a").read_bytes() == env.v1
    assert [(r.status, "floor index" in r.message) for r in env.reports("dev-tpm")] == \
        [(20, True)]
    assert main(["peer", "status", str(dev.root)]) == 2


async def test_tpm_lost_during_peer_run_fails_passes_and_the_daemon_updates_once_it_is_back(
        soft_tpm: SoftTpm, fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The TPM (or its resource manager) goes away while 'peer run' runs: each pass ends
    with status 30 naming the TPM and backs off, 'peer status' shows it, a report the
    TPM cannot sign waits in the outbox; once the TPM is back on the same state the
    daemon carries on, updates and delivers the report."""
    env = fleet.env
    dev = fleet.device("dev-tpm", ca=None, keystore="tpm", tpm_device=soft_tpm.device,
                       mode="direct")
    enrol(fleet, dev, tmp_path / "issued", capsys)
    soft_tpm.power_cut()  # gone before the first pass
    seen: list[tuple[int, str, float, int]] = []
    status: list[tuple[int, str]] = []
    config = DaemonConfig(jitter_fraction=0, backoff_initial_s=0.05, backoff_max_s=0.2,
                          poll_interval_s=0.05, seed_time_s=0)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            def on_result(result: UpdateResult, delay_s: float) -> None:
                seen.append((int(result.status), result.message, delay_s,
                             len(dev.outbox())))
                if len(seen) == 1:  # the operator looks, then the TPM comes back...
                    status.append((main(["peer", "status", str(dev.root)]),
                                   capsys.readouterr().out))
                    soft_tpm.start()
                    # ... and loses its power again in the middle of the next pass: the
                    # new image switched to, its health check about to run
                    monkeypatch.setattr(crashpoints, "_plan", CrashPlan(
                        ("health.before", 1), None, kill=soft_tpm.power_cut))
                elif len(seen) == 2:
                    soft_tpm.start()
                elif len(seen) == 3:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(lambda: run_daemon(dev, config, on_result=on_result))
    (code1, message1, delay1, _), (code2, message2, _, queued2), \
        (code3, message3, _, queued3) = seen
    assert code1 == 30 and "the TPM failed: tpm2_" in message1, message1
    assert delay1 == 0.05, "a failed pass backs off"
    assert status[0][0] == 2 and "last result: status 30: the TPM failed" in status[0][1]
    assert code2 == 0 and message2 == "updated 1.0.0 -> 2.0.0", message2
    assert queued2 == 1, "the report the TPM could not sign waits in the outbox"
    assert (code3, message3, queued3) == (0, "up to date", 0), message3
    assert [(r.status, r.to_version) for r in env.reports("dev-tpm")] == [(0, "2.0.0")]
    assert dev.bootctl().committed == "b" and dev.slot_path("b").read_bytes() == env.v2
    assert tpm_floor(dev) == 2, "the floor the TPM missed is caught up"
    # 'peer update' with the TPM gone: its status code and the TPM's words, no traceback
    soft_tpm.stop()
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "swarmota.cli", "peer", "update", str(dev.root)],
            cwd=REPO_ROOT, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 30, proc.stderr[-2000:]
    assert b"status 30: the TPM failed: tpm2_" in proc.stdout
    assert b"Traceback" not in proc.stderr


async def test_owner_password_from_the_device_configuration_renews_the_identity(
        soft_tpm: SoftTpm, fleet: Fleet, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The device maker locks the TPM's owner hierarchy with a password (so that root
    on the device cannot undefine the floor index) and gives the agent a file only root
    reads: provisioning and a renewal to new keys use it; a missing, exposed or wrong
    one is a clear error, and a wrong one is not tried twice."""
    env = fleet.env
    secret = tmp_path / "owner-auth"
    secret.write_bytes(b"maker-secret\n")
    secret.chmod(0o400)
    soft_tpm.tpm().run("tpm2_changeauth", "-c", "o", "maker-secret")
    dev = fleet.device("dev-tpm", ca=None, keystore="tpm", tpm_device=soft_tpm.device,
                       mode="direct", tpm_owner_auth=str(secret))
    assert enrol(fleet, dev, tmp_path / "first", capsys) == "same key"
    first = cert_sha256(dev.root / "identity" / "cert.pem")
    # renewal to new keys in the TPM (owner operations: a primary key, persistent keys)
    assert main(["peer", "identity", "csr", str(dev.root), "--out",
                 str(dev.root / "identity" / "renewal.pem")]) == 0, capsys.readouterr().err
    assert enrol(fleet, dev, tmp_path / "renewed", capsys, "renewal.pem") == "new key"
    renewed = cert_sha256(dev.root / "identity" / "cert.pem")
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert tracker_certificates(env, "dev-tpm") == [renewed], \
        "the check-in and report are signed with the renewed key's certificate"
    assert renewed != first
    # root on the device, without the password, still cannot undefine the floor index
    with pytest.raises(TpmError, match="owner hierarchy has a password"):
        soft_tpm.tpm().nv_undefine(FLOOR_LOG_INDEX)

    def renewal() -> tuple[int, str]:
        code = main(["peer", "identity", "csr", str(dev.root), "--out",
                     str(tmp_path / "again.pem")])
        return code, capsys.readouterr().err

    secret.chmod(0o644)  # readable by anyone: refused before the TPM is asked
    code, err = renewal()
    assert code == 2 and "no access for group or others (mode 0644)" in err, err
    secret.unlink()
    code, err = renewal()
    assert code == 2 and "cannot read the TPM owner password" in err, err
    secret.write_bytes(b"guessed")
    secret.chmod(0o400)
    code, err = renewal()
    assert code == 2 and "refused the owner password" in err and "not tried again" in err
    # a wrong password is not tried twice: the next owner operation never reaches the
    # TPM (stopped here: reaching it would fail with "Could not load tcti")
    store = open_keystore(dev.config(), dev.root)
    assert store is not None
    with pytest.raises(OwnerAuthError, match="refused the owner password"):
        store.renewal_requests()
    soft_tpm.stop()
    with pytest.raises(OwnerAuthError, match="not tried again"):
        store.tpm.nv_define_extend(FLOOR_LOG_INDEX + 1)
