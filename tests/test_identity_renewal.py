"""Device identity renewal without reflashing: a new certificate for the same key, or a
new key made on the device whose signing request the fleet CA signs; the tracker keeps
accepting the device's signed requests; a crash in the middle of a renewal is finished
at the next start; certificates for another device or for no key of the device are
refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from swarmota.cli import main
from swarmota.demo import mutate_image
from swarmota.infra.devca import create_ca, issue_device_cert, issue_device_cert_from_csr
from swarmota.peer.agent import update_once
from swarmota.peer.errors import ConfigError, StatusCode
from swarmota.peer.identity import install_identity, load_identity, renew_identity, renewal_csr
from swarmota.peer.state import DeviceState
from tests.release_env import ReleaseEnv, publish, start_env


@pytest.fixture
async def fleet_env(tmp_path: Path, nursery: trio.Nursery,
                    images: tuple[bytes, bytes]) -> ReleaseEnv:
    fleet_ca = create_ca(tmp_path / "fleet-ca")
    return await start_env(nursery, tmp_path, *images, fleet_ca=fleet_ca)


def provisioned(env: ReleaseEnv, name: str, days: int = 2) -> DeviceState:
    dev = env.device(name, mode="direct")
    files = issue_device_cert(env.workdir / "fleet-ca", env.workdir / "issued" / name, name,
                              valid_days=days)
    install_identity(dev.root, files.cert, files.key, name)
    return dev


async def test_certificate_renewed_for_the_same_key_and_for_a_new_key(
        fleet_env: ReleaseEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = fleet_env
    dev = provisioned(env, "dev-1")
    assert (await update_once(dev)).status == StatusCode.OK
    old = load_identity(dev.root)
    assert old is not None

    # same key: the CA re-issues for the key it already certified (tls device-cert keeps
    # an existing key.pem); the device swaps the certificate only
    issued = env.workdir / "issued" / "dev-1"
    issue_device_cert(env.workdir / "fleet-ca", issued, "dev-1", valid_days=400)
    assert main(["peer", "identity", "renew", str(dev.root), "--cert",
                 str(issued / "cert.pem")]) == 0
    assert "same key" in capsys.readouterr().out
    same = load_identity(dev.root)
    assert same is not None and same.key_pem == old.key_pem
    assert same.signer.not_after > old.signer.not_after
    env.register(publish(env.repo, tmp_path, mutate_image(env.v2, seed=3), "3.0.0", 3))
    assert (await update_once(dev)).status == StatusCode.OK

    # new key: made on the device, only the signing request travels
    csr = tmp_path / "dev-1.csr"
    assert main(["peer", "identity", "csr", str(dev.root), "--out", str(csr)]) == 0
    assert main(["peer", "identity", "show", str(dev.root)]) == 0
    assert "renewal to a new key is pending" in capsys.readouterr().out
    at_ca = tmp_path / "at-ca"
    assert main(["tls", "device-cert", str(at_ca), "--ca", str(env.workdir / "fleet-ca"),
                 "--csr", str(csr), "--device-id", "dev-1"]) == 0
    assert not (at_ca / "key.pem").exists(), "the CA never sees the device key"
    assert main(["peer", "identity", "renew", str(dev.root), "--cert",
                 str(at_ca / "cert.pem")]) == 0
    assert "new key" in capsys.readouterr().out
    renewed = load_identity(dev.root)
    assert renewed is not None and renewed.key_pem != old.key_pem
    assert not (dev.root / "identity" / "key.next.pem").exists()
    env.register(publish(env.repo, tmp_path, mutate_image(env.v2, seed=4), "4.0.0", 4))
    result = await update_once(dev)
    assert result.status == StatusCode.OK and result.to_version == "4.0.0"


async def test_a_renewal_cut_short_by_a_crash_is_finished_at_the_next_load(
        fleet_env: ReleaseEnv, tmp_path: Path) -> None:
    dev = provisioned(fleet_env, "dev-2")
    csr = renewal_csr(dev.root)
    assert renewal_csr(dev.root) is not None  # asking again: the same pending key
    cert = issue_device_cert_from_csr(fleet_env.workdir / "fleet-ca", csr, tmp_path / "ca")
    next_key = (dev.root / "identity" / "key.next.pem").read_bytes()
    # the power went out after the certificate was written, before the key was moved in
    shutil.copy(cert, dev.root / "identity" / "cert.pem")
    identity = load_identity(dev.root)
    assert identity is not None and identity.key_pem == next_key
    assert (await update_once(dev)).status == StatusCode.OK


async def test_certificates_for_another_device_or_key_are_refused(
        fleet_env: ReleaseEnv, tmp_path: Path) -> None:
    dev = provisioned(fleet_env, "dev-3")
    other = issue_device_cert(fleet_env.workdir / "fleet-ca", tmp_path / "o", "dev-4")
    with pytest.raises(ConfigError, match="neither the device's key"):
        renew_identity(dev.root, other.cert)
    shutil.copy(other.key, dev.root / "identity" / "key.next.pem")
    with pytest.raises(ConfigError, match="is for device 'dev-4'"):
        renew_identity(dev.root, other.cert)
    plain = fleet_env.device("no-identity", mode="direct")
    with pytest.raises(ConfigError, match="no device identity"):
        renew_identity(plain.root, other.cert)
