"""The TPM key store (issue 22), against a real software TPM per test (swtpm, driven with
tpm2-tools; skipped without them).

Threats covered: a stolen disk image or a copied state directory (no private key on
disk; the copy signs nothing on another TPM); the swarm TLS key used to impersonate the
device at the tracker (its certificate's role is refused); a device booted into another
state (with measured boot its keys neither sign nor unseal); floors lowered by editing,
deleting or swapping their records (the TPM's win; a component cannot borrow another's
NV index); a power cut while the TPM writes a floor (old or new, never a torn value);
a replaced, rolled back or edited trust anchor record (refused); a damaged floor log
(put back from its copy) and a forged one handed to 'peer trust repair' (refused: only
a log that folds to the TPM's index passes); root logging a skipped, older counter
reset (bounded: the floors of a device that saw it in time).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from swarmota.cli import main
from swarmota.infra.devca import create_ca, issue_device_cert_from_csr
from swarmota.infra.deviceauth import (
    CERT_HEADER,
    SIGNATURE_HEADER,
    DeviceAuthError,
    FleetTrust,
    RequestSigner,
    find_header,
)
from swarmota.manifest.counters import CounterReset
from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import ConfigError, VerifyFailed
from swarmota.peer.floors import Floors
from swarmota.peer.keystore import TPM_HANDLES, TpmKeyStore, open_keystore
from swarmota.peer.state import DeviceState
from swarmota.peer.tpm import PcrSelection, TpmError
from swarmota.peer.tpm_nv import (
    ANCHOR_INDEX,
    FLOOR_LOG,
    FLOOR_LOG_INDEX,
    FloorEntry,
    FloorLogError,
    NvFloors,
    TrustAnchor,
    fold,
)
from swarmota.seeder.keys import load_private_key
from swarmota.seeder.repository import KeySetup, Repository
from tests.swtpm import SoftTpm, pcr_extend

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """A repository whose root the devices are provisioned with (and rotate)."""
    return Repository.create(tmp_path_factory.mktemp("repo") / "repo", keys=KeySetup())


@pytest.fixture(scope="module")
def fleet_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("fleet") / "ca"
    create_ca(ca)
    return ca


def config_for(tpm: SoftTpm, **extra: object) -> DeviceConfig:
    return DeviceConfig(device_id="dev-tpm", product="acme-router", hardware_id="hw1",
                        origin_url="http://127.0.0.1:1", tracker_url="http://127.0.0.1:2",
                        keystore="tpm", tpm_device=tpm.device, **extra)  # type: ignore[arg-type]


def provisioned(tpm: SoftTpm, state: Path, repo: Repository, **extra: object) -> TpmKeyStore:
    (state / "trust").mkdir(parents=True, exist_ok=True)
    store = open_keystore(config_for(tpm, **extra), state)
    assert store is not None
    store.provision(root_json=repo.root_bytes(), image_floor=1, force=False)
    return store


def enrolled(store: TpmKeyStore, fleet_ca: Path, out: Path) -> None:
    cert = issue_device_cert_from_csr(fleet_ca, store.request_path.read_bytes(), out)
    assert store.install(cert.read_bytes()) == "same key"


def verify(trust: FleetTrust, signer: RequestSigner) -> str:
    headers = [(k.encode(), v.encode()) for k, v in signer.headers("POST", b"/v1/checkin",
                                                                 b"{}", 7)]
    return trust.verify("POST", b"/v1/checkin", b"{}", find_header(headers, CERT_HEADER),
                        find_header(headers, SIGNATURE_HEADER), NOW).device_id


# --- identity -----------------------------------------------------------------------------


def test_identity_key_is_made_in_the_tpm_and_the_fleet_ca_certifies_it(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository, fleet_ca: Path) -> None:
    store = provisioned(soft_tpm, tmp_path / "state", repo)
    assert store.identity() is None, "no certificate yet: requests go unsigned"
    requests = store.request_path.read_bytes()
    csrs = [x509.load_pem_x509_csr(b"-----BEGIN" + part)
            for part in requests.split(b"-----BEGIN")[1:]]
    assert [c.is_signature_valid for c in csrs] == [True, True]
    assert [c.subject.rfc4514_string() for c in csrs] == ["OU=device,CN=dev-tpm",
                                                          "OU=swarm,CN=dev-tpm"]
    assert csrs[0].public_key() == soft_tpm.tpm().public_key(TPM_HANDLES["a"][0])
    enrolled(store, fleet_ca, tmp_path / "certs")
    identity = store.identity()
    assert identity is not None and identity.key_pem == b""
    trust = FleetTrust((fleet_ca / "ca.pem").read_bytes())
    assert verify(trust, identity.signer) == "dev-tpm"
    tls = identity.tls_identity()
    assert tls is not None and b"PRIVATE KEY" in tls[1]
    assert x509.load_pem_x509_certificate(tls[0]).subject.rfc4514_string() == \
        "OU=swarm,CN=dev-tpm"
    # nothing on disk is a private key: the identity key is in the TPM, the swarm key
    # sealed by it
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_copied_state_directory_signs_nothing_on_another_tpm(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository, fleet_ca: Path) -> None:
    store = provisioned(soft_tpm, tmp_path / "state", repo)
    enrolled(store, fleet_ca, tmp_path / "certs")
    shutil.copytree(tmp_path / "state", tmp_path / "stolen")
    other = SoftTpm(tmp_path / "other-swtpm")
    other.start()
    try:
        thief = open_keystore(config_for(other), tmp_path / "stolen")
        assert thief is not None
        with pytest.raises(TpmError):
            thief.identity()
        with pytest.raises(TpmError):
            thief.swarm_key()
    finally:
        other.stop()


def test_swarm_key_cannot_sign_tracker_requests(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository, fleet_ca: Path) -> None:
    """The swarm TLS key is in the agent's memory during a pass; its certificate (OU=swarm)
    is refused by the tracker, so it cannot stand in for the TPM's identity key."""
    store = provisioned(soft_tpm, tmp_path / "state", repo)
    enrolled(store, fleet_ca, tmp_path / "certs")
    identity = store.identity()
    assert identity is not None
    tls = identity.tls_identity()
    assert tls is not None
    trust = FleetTrust((fleet_ca / "ca.pem").read_bytes())
    with pytest.raises(DeviceAuthError, match="role must be one of device, seed"):
        verify(trust, RequestSigner(*tls))


def test_measured_boot_keys_work_only_in_the_boot_state_they_were_made_in(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository, fleet_ca: Path) -> None:
    store = provisioned(soft_tpm, tmp_path / "state", repo, tpm_pcrs="sha256:7")
    enrolled(store, fleet_ca, tmp_path / "certs")
    identity = store.identity()
    assert identity is not None
    trust = FleetTrust((fleet_ca / "ca.pem").read_bytes())
    for _ in range(4):  # more than a TPM's session slots: each policy session is flushed
        assert verify(trust, identity.signer) == "dev-tpm"
    pcr_extend(soft_tpm, 7, b"a boot without Secure Boot")
    with pytest.raises(DeviceAuthError, match="boot state is not the one"):
        identity.signer.headers("POST", b"/v1/checkin", b"{}", 8)
    with pytest.raises(TpmError, match="policy check failed"):
        identity.tls_identity()


def test_renewal_to_new_tpm_keys_switches_once_both_certificates_are_in(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository, fleet_ca: Path) -> None:
    store = provisioned(soft_tpm, tmp_path / "state", repo)
    enrolled(store, fleet_ca, tmp_path / "certs")
    old = store.identity()
    assert old is not None
    requests = store.renewal_requests()
    keys = [x509.load_pem_x509_csr(b"-----BEGIN" + part).public_key()
            for part in requests.split(b"-----BEGIN")[1:]]
    again = store.renewal_requests()  # asked twice: requests for the same new keys
    assert keys == [x509.load_pem_x509_csr(b"-----BEGIN" + part).public_key()
                    for part in again.split(b"-----BEGIN")[1:]]
    assert keys[0] != soft_tpm.tpm().public_key(TPM_HANDLES["a"][0])
    assert store.renewal_pending()
    issued = issue_device_cert_from_csr(fleet_ca, requests, tmp_path / "renewed")
    only_identity = x509.load_pem_x509_certificates(issued.read_bytes())[0]
    with pytest.raises(ConfigError, match="need both certificates"):
        store.install(only_identity.public_bytes(Encoding.PEM))
    assert store.identity() is not None and store.identity().cert_pem == old.cert_pem  # type: ignore[union-attr]
    assert store.install(issued.read_bytes()) == "new key"
    assert not store.renewal_pending()
    new = store.identity()
    assert new is not None and new.cert_pem != old.cert_pem
    trust = FleetTrust((fleet_ca / "ca.pem").read_bytes())
    assert verify(trust, new.signer) == "dev-tpm"
    assert not set(TPM_HANDLES["a"]) & soft_tpm.tpm().persistent_handles(), \
        "the old keys are gone"
    with pytest.raises(ConfigError, match="no key of the TPM"):
        store.install(old.cert_pem)


def test_renewal_cut_after_the_certificate_is_finished_at_the_next_load(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository, fleet_ca: Path) -> None:
    store = provisioned(soft_tpm, tmp_path / "state", repo)
    enrolled(store, fleet_ca, tmp_path / "certs")
    issued = issue_device_cert_from_csr(fleet_ca, store.renewal_requests(),
                                        tmp_path / "renewed")
    identity_cert = x509.load_pem_x509_certificates(issued.read_bytes())[0]
    # power cut: the new certificate written, the switch of key sets not yet
    (store.directory / "cert.pem").write_bytes(
        identity_cert.public_bytes(Encoding.PEM))
    identity = store.identity()
    assert identity is not None and not store.renewal_pending()
    assert verify(FleetTrust((fleet_ca / "ca.pem").read_bytes()), identity.signer) == "dev-tpm"


def test_provisioning_over_an_enrolled_tpm_needs_force(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository) -> None:
    provisioned(soft_tpm, tmp_path / "state", repo)
    again = open_keystore(config_for(soft_tpm), tmp_path / "state2")
    assert again is not None
    with pytest.raises(ConfigError, match="already holds swarmota keys"):
        again.provision(root_json=repo.root_bytes(), image_floor=1, force=False)


def test_bad_keystore_settings_are_refused(soft_tpm: SoftTpm) -> None:
    config = config_for(soft_tpm)
    for bad, words in (({"keystore": "hsm"}, "keystore must be one of"),
                       ({"tpm_device": None}, "needs tpm_device"),
                       ({"tpm_device": "tcp://x"}, "TPM device must be"),
                       ({"tpm_pcrs": "sha256:99"}, "PCR selection"),
                       ({"keystore": "file"}, "go with keystore 'tpm'")):
        with pytest.raises(ConfigError, match=words):
            replace(config, **bad)
    assert PcrSelection("sha256:0,2,7").auth == "pcr:sha256:0,2,7"


# --- floors ----------------------------------------------------------------------------
# The floors are a log in the state directory whose fold the TPM holds in an extend-only
# index: it can be extended, never written, set back or reset (short of the owner
# hierarchy undefining it).

PRODUCT = "acme-router"


@pytest.fixture(scope="module")
def reset_root(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A root carrying counter resets: acme-router's (epoch 1, floor 2) and another
    product's (epoch 1, floor 0)."""
    repo = Repository.create(tmp_path_factory.mktemp("resets") / "repo", keys=KeySetup())
    for product, floor in (("other-product", 0), (PRODUCT, 2)):
        repo.counter_reset(product, floor=floor)
        repo.sign(load_private_key(repo.offline_root_key_path))
    return repo.root_bytes()


def floors_on(tpm: SoftTpm, state: Path, root: bytes) -> NvFloors:
    """Floors provisioned at 1, with ``root`` anchored."""
    trust = state / "trust"
    trust.mkdir(parents=True, exist_ok=True)
    (trust / "root.json").write_bytes(root)
    anchor = TrustAnchor(tpm.tpm(), trust)
    anchor.provision(root)
    nv = NvFloors(tpm.tpm(), trust / FLOOR_LOG, anchor, PRODUCT)
    nv.provision(1)
    return nv


def extend_as_root(tpm: SoftTpm, data: bytes) -> None:
    """What code running as root on the device can do to the floor index."""
    tpm.tpm().run("tpm2_nvextend", f"0x{FLOOR_LOG_INDEX:08x}", "-C",
                  f"0x{FLOOR_LOG_INDEX:08x}", "-i", "-", data=data)


def append_as_root(tpm: SoftTpm, nv: NvFloors, entry: FloorEntry) -> None:
    """Code running as root appends ``entry`` to the floor log and extends the index
    with it (the log still folds)."""
    with open(nv.log_path, "ab") as fh:
        fh.write(entry.encode() + b"\n")
    extend_as_root(tpm, hashlib.sha256(entry.encode()).digest())


def test_tpm_floors_win_over_a_state_directory_edited_or_deleted(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository) -> None:
    nv = floors_on(soft_tpm, tmp_path, repo.root_bytes())
    many = {f"c{i}": i + 1 for i in range(12)}  # any number of components
    nv.raise_to(Floors(image=5, components={"modem-fw": 9, "app": 3, **many}))
    # the state directory's records lowered, deleted, or from an old backup
    for disk in (Floors(image=0), Floors(image=2, components={"modem-fw": 1}),
                 Floors(image=5, components={"app": 0})):
        merged = nv.merged(disk)
        assert merged.image == 5
        assert dict(merged.components) == {"modem-fw": 9, "app": 3, **many}
        assert nv.of(disk, "modem-fw") == 9 and nv.of(disk, None) == 5
    nv.raise_to(Floors(image=2, components={"modem-fw": 1}))
    assert nv.read().image == 5 and nv.read().component("modem-fw") == 9, "never lowered"
    lines = (tmp_path / "trust" / FLOOR_LOG).read_bytes().splitlines()
    assert soft_tpm.tpm().nv_read(FLOOR_LOG_INDEX, 32) == fold(lines)
    assert FloorEntry.decode(lines[0]) == FloorEntry("raise", 1)


def test_root_on_the_device_cannot_rewrite_the_floor_index_nor_undefine_it_with_an_owner_password(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository) -> None:
    nv = floors_on(soft_tpm, tmp_path, repo.root_bytes())
    nv.raise_to(Floors(image=9))
    tpm = soft_tpm.tpm()
    before = tpm.nv_read(FLOOR_LOG_INDEX, 32)
    # the value of a lower floor's log, written over the index: an extend-only index
    # cannot be written
    lower = fold([FloorEntry("raise", 1).encode()])
    with pytest.raises(TpmError, match="tpm2_nvwrite failed"):
        tpm.run("tpm2_nvwrite", f"0x{FLOOR_LOG_INDEX:08x}", "-C", f"0x{FLOOR_LOG_INDEX:08x}",
                "-i", "-", data=lower)
    assert tpm.nv_read(FLOOR_LOG_INDEX, 32) == before
    # the device maker sets an owner password after provisioning: undefining the index
    # (to define it afresh, empty) is refused
    tpm.run("tpm2_changeauth", "-c", "o", "maker-secret")
    with pytest.raises(TpmError, match="tpm2_nvundefine: the TPM's owner hierarchy has a "
                                       "password"):
        tpm.nv_undefine(FLOOR_LOG_INDEX)
    assert nv.read().image == 9
    # without it (here: with it), undefining leaves a device that refuses to decide
    tpm.run("tpm2_nvundefine", f"0x{FLOOR_LOG_INDEX:08x}", "-C", "o", "-P", "maker-secret")
    with pytest.raises(TpmError, match="holds no anti-rollback floors"):
        nv.of(Floors(image=9), None)


def test_counter_reset_lowers_tpm_floors_once_per_epoch(
        soft_tpm: SoftTpm, tmp_path: Path, reset_root: bytes) -> None:
    nv = floors_on(soft_tpm, tmp_path, reset_root)
    nv.raise_to(Floors(image=2**53, components={"modem-fw": 2**53, "app": 2}))
    nv.apply_reset(CounterReset(epoch=1, floor=2), reset_root)
    held = nv.read()
    assert (held.image, held.epoch, held.component("modem-fw"), held.component("app")) == \
        (2, 1, 2, 2)
    nv.raise_to(Floors(image=7, components={"modem-fw": 7}))
    nv.apply_reset(CounterReset(epoch=1, floor=2), reset_root)  # applied already: a
    held = nv.read()                                # deleted trust_state.json changes nothing
    assert (held.image, held.component("modem-fw"), held.ignored_resets) == (7, 7, 0)


def test_forged_reset_extended_into_the_floor_index_is_not_a_reset(
        soft_tpm: SoftTpm, tmp_path: Path, reset_root: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    """Root on the device appends reset entries to the log and extends the index with
    them (the log still folds): none is a root-signed reset of this device, none lowers
    a floor."""
    nv = floors_on(soft_tpm, tmp_path, reset_root)
    nv.apply_reset(CounterReset(epoch=1, floor=2), reset_root)
    nv.raise_to(Floors(image=9, components={"modem-fw": 9}))
    genuine = hashlib.sha256(reset_root).hexdigest()
    forged = [
        # a root the anchor never held (the attacker's), carrying a reset to 0
        FloorEntry("reset", 0, product=PRODUCT, epoch=2,
                   root=hashlib.sha256(b"an attacker's root").hexdigest()),
        # the anchored root, but a floor and an epoch it does not carry
        FloorEntry("reset", 0, product=PRODUCT, epoch=2, root=genuine),
        # the anchored root's reset of another product
        FloorEntry("reset", 0, product="other-product", epoch=1, root=genuine),
        # the genuine reset, replayed after the floors rose again
        FloorEntry("reset", 2, product=PRODUCT, epoch=1, root=genuine),
    ]
    for entry in forged:
        append_as_root(soft_tpm, nv, entry)
    with caplog.at_level(logging.WARNING, logger="swarmota.peer.tpm_nv"):
        held = nv.read()
    assert (held.image, held.component("modem-fw"), held.epoch) == (9, 9, 1)
    assert held.ignored_resets == len(forged)
    assert "not root-signed resets" in caplog.text
    # with the anchored copies gone, not even the genuine reset can be vouched for:
    # the floors can only be higher
    shutil.rmtree(tmp_path / "trust" / "anchor")
    assert nv.read().image == 9


@pytest.fixture(scope="module")
def two_resets(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, bytes]:
    """Roots 1, 2 and 3 of a chain: root 2 carries acme-router's reset epoch 1 to floor
    3, root 3 its reset epoch 2 to floor 6 (releases 4-6 were published in between)."""
    repo = Repository.create(tmp_path_factory.mktemp("two-resets") / "repo", keys=KeySetup())
    roots = [repo.root_bytes()]
    for floor in (3, 6):
        repo.counter_reset(PRODUCT, floor=floor)
        repo.sign(load_private_key(repo.offline_root_key_path))
        roots.append(repo.root_bytes())
    return roots[0], roots[1], roots[2]


def test_skipped_older_reset_logged_by_root_lowers_no_floor_below_a_device_that_saw_it(
        soft_tpm: SoftTpm, tmp_path: Path, two_resets: tuple[bytes, bytes, bytes]) -> None:
    """The edge left by keeping the trust anchor and the floor log in two indices: a
    device offline across roots 2 and 3 walks the chain in one refresh and applies
    only root 3's reset (floor 6). Code running as root on it can log root 2's older
    reset (floor 3) before root 3's applies: the TPM cannot tell that it was logged
    after root 3 was anchored, since root 2 was anchored too. What that buys is bounded
    and proven here: the floors end exactly where those of a device that refreshed
    while root 2 was current end (root 2's reset, then root 3's), never below the floor
    a root-signed reset names; and once root 3's reset is applied the older one can no
    longer be logged. (No ordering of the two indices can close it: whoever can extend
    the index can also log 'root 2 was seen' before the agent logs root 3, which is the
    history of a device that was online then.)"""
    v1, v2, v3 = two_resets
    digest = {2: hashlib.sha256(v2).hexdigest(), 3: hashlib.sha256(v3).hexdigest()}
    older = FloorEntry("reset", 3, product=PRODUCT, epoch=1, root=digest[2])

    def device(name: str, *, online_at_root_2: bool, attacked: bool) -> NvFloors:
        nv = floors_on(soft_tpm, tmp_path / name, v1)  # the same TPM, provisioned afresh
        trust = tmp_path / name / "trust"
        nv.raise_to(Floors(image=2**53, components={"modem-fw": 2**53}))  # the bad release
        (trust / "root_history").mkdir()
        (trust / "root_history" / "2.root.json").write_bytes(v2)
        if online_at_root_2:
            (trust / "root.json").write_bytes(v2)
            nv.anchor.sync()
            nv.apply_reset(CounterReset(epoch=1, floor=3), v2)
        (trust / "root.json").write_bytes(v3)
        nv.anchor.sync()  # roots 2 and 3 anchored in one refresh
        if attacked:
            append_as_root(soft_tpm, nv, older)
        nv.apply_reset(CounterReset(epoch=2, floor=6), v3)
        return nv

    skipped = device("skipped", online_at_root_2=False, attacked=False).read()
    assert (skipped.image, skipped.component("modem-fw"), skipped.epoch) == (6, 6, 2)
    online = device("online", online_at_root_2=True, attacked=False).read()
    assert (online.image, online.component("modem-fw"), online.epoch) == (3, 3, 2)
    attacked_nv = device("attacked", online_at_root_2=False, attacked=True)
    attacked = attacked_nv.read()
    assert (attacked.image, attacked.component("modem-fw"), attacked.epoch) == (3, 3, 2)
    assert attacked == online, "exactly the floors of a device that saw root 2 in time"
    assert min(attacked.image, attacked.component("modem-fw")) >= 3, \
        "never below the floor a root-signed reset of this product names"
    # once root 3's reset is applied, the older one logged again lowers nothing
    attacked_nv.raise_to(Floors(image=5, components={"modem-fw": 5}))
    append_as_root(soft_tpm, attacked_nv, older)
    after = attacked_nv.read()
    assert (after.image, after.component("modem-fw"), after.ignored_resets) == (5, 5, 1)


def test_garbage_extended_into_the_floor_index_refuses_every_release(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository) -> None:
    """Extending the index with anything but a line of the log makes the log
    unverifiable: a denial of service, never a rollback."""
    nv = floors_on(soft_tpm, tmp_path, repo.root_bytes())
    nv.raise_to(Floors(image=9))
    extend_as_root(soft_tpm, hashlib.sha256(b"garbage").digest())
    for call in (nv.read, lambda: nv.of(Floors(image=0), None),
                 lambda: nv.raise_to(Floors(image=10))):
        with pytest.raises(FloorLogError, match="does not match the TPM's floor index"):
            call()
    # a line that is no floor entry, appended and extended consistently: refused too
    other = floors_on(soft_tpm, tmp_path / "other", repo.root_bytes())
    with open(tmp_path / "other" / "trust" / FLOOR_LOG, "ab") as fh:
        fh.write(b'{"op":"raise","component":null,"floor":-5}\n')
    extend_as_root(soft_tpm, hashlib.sha256(b'{"op":"raise","component":null,'
                                            b'"floor":-5}').digest())
    with pytest.raises(FloorLogError, match="line 2: not a floor entry"):
        other.read()


def test_edited_truncated_deleted_or_restored_floor_log_is_put_back_from_its_copy_or_refused(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository) -> None:
    """The log edited, cut, restored from an old backup, reordered or deleted: put back
    from its copy when the copy folds to the TPM's index (never lower), refused when
    the copy is damaged too; a copy damaged alone is rewritten from the log."""
    nv = floors_on(soft_tpm, tmp_path, repo.root_bytes())
    path = tmp_path / "trust" / FLOOR_LOG
    nv.raise_to(Floors(image=5))
    old_copy = path.read_bytes()
    nv.raise_to(Floors(image=9, components={"modem-fw": 9}))
    good = path.read_bytes()
    assert nv.copy_path.read_bytes() == good
    lines = good.splitlines(keepends=True)
    for bad in (good.replace(b'"floor":9', b'"floor":1'),  # edited lower
                b"".join(lines[:-2]),                   # the last two entries cut off
                old_copy,                               # restored from an old backup
                b"".join([lines[0], lines[2], lines[1]]),  # reordered
                None):                                  # deleted
        for damaged in (path, nv.copy_path):  # one of the two: put back from the other
            write_or_delete(damaged, bad)
            held = nv.read()
            assert (held.image, held.component("modem-fw")) == (9, 9)
            assert path.read_bytes() == nv.copy_path.read_bytes() == good
        for damaged in (path, nv.copy_path):  # both
            write_or_delete(damaged, bad)
        with pytest.raises(FloorLogError, match="does not match the TPM's floor index"):
            nv.read()
        path.write_bytes(good)  # the genuine log back: the copy is rewritten from it
        assert nv.read().image == 9 and nv.copy_path.read_bytes() == good


def write_or_delete(path: Path, data: bytes | None) -> None:
    if data is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(data)


def test_trust_repair_rebuilds_the_floor_log_only_from_a_copy_that_folds_to_the_tpm(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Both the log and the agent's copy lost: 'peer trust repair --from' rebuilds it
    from a copy an operator kept, and only from one the TPM's index holds the fold
    of. A forged log with lower floors (well formed, every line a floor entry), an old
    backup or the genuine log with its last entry edited are refused: whoever can
    write the disk cannot use a repair to lower a floor."""
    state = tmp_path / "state"
    assert main(init_args(tmp_path, soft_tpm, repo, state)) == 0
    store = open_keystore(DeviceState(state).config(), state)
    assert store is not None
    nv = store.floors
    nv.raise_to(Floors(image=5))
    stale = tmp_path / "stale.log"
    shutil.copyfile(nv.log_path, stale)
    nv.raise_to(Floors(image=9, components={"modem-fw": 7}))
    backup = tmp_path / "backup.log"
    shutil.copyfile(nv.log_path, backup)
    assert main(["peer", "trust", "repair", str(state)]) == 0
    assert "nothing to repair" in capsys.readouterr().out
    nv.log_path.unlink()
    nv.copy_path.unlink()
    forged = tmp_path / "forged.log"
    forged.write_bytes(b"".join(FloorEntry("raise", floor).encode() + b"\n"
                                for floor in (1, 2)))
    edited = tmp_path / "edited.log"
    edited.write_bytes(backup.read_bytes().replace(b'"floor":7', b'"floor":1'))
    assert main(["peer", "trust", "repair", str(state), "--from", str(forged), "--from",
                 str(stale), "--from", str(edited)]) == 2
    err = capsys.readouterr().err
    assert "no copy of the floor log folds to the TPM's floor index" in err, err
    assert str(forged) in err and "peer init --force" in err
    with pytest.raises(FloorLogError):
        nv.read()
    assert main(["peer", "status", str(state)]) == 2
    capsys.readouterr()
    assert main(["peer", "trust", "repair", str(state), "--from", str(forged), "--from",
                 str(backup)]) == 0
    out = capsys.readouterr().out
    assert f"rebuilt from {backup}" in out and "release counter 9; modem-fw: 7" in out
    assert nv.log_path.read_bytes() == nv.copy_path.read_bytes() == backup.read_bytes()
    assert nv.read().image == 9


def test_power_cut_between_appending_an_entry_and_extending_the_index_recovers(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository) -> None:
    nv = floors_on(soft_tpm, tmp_path, repo.root_bytes())
    path = tmp_path / "trust" / FLOOR_LOG
    # the entry appended and fsynced, the power cut before the TPM extended it
    with open(path, "ab") as fh:
        fh.write(FloorEntry("raise", 4).encode() + b"\n")
    assert nv.read().image == 4, "the index is extended with it at the next load"
    assert soft_tpm.tpm().nv_read(FLOOR_LOG_INDEX, 32) == fold(path.read_bytes().splitlines())
    # the power cut in the middle of writing the line: never extended, cut off
    with open(path, "ab") as fh:
        fh.write(FloorEntry("raise", 6).encode()[:11])
    assert nv.read().image == 4 and path.read_bytes().endswith(b"\n")
    # but two entries the index has not seen are not a power cut: refused (in the
    # log and its copy: either alone is put back from the other)
    for log_file in (path, nv.copy_path):
        with open(log_file, "ab") as fh:
            fh.write(FloorEntry("raise", 7).encode() + b"\n" + FloorEntry("raise", 8).encode()
                     + b"\n")
    with pytest.raises(FloorLogError):
        nv.read()


def test_power_cut_while_the_tpm_extends_a_floor_leaves_old_or_new(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository) -> None:
    nv = floors_on(soft_tpm, tmp_path, repo.root_bytes())
    written: list[int] = []
    stop = threading.Event()

    def bump() -> None:
        for floor in range(2, 10_000):
            if stop.is_set():
                return
            try:
                nv.raise_to(Floors(image=floor))
            except TpmError:
                return
            written.append(floor)

    thread = threading.Thread(target=bump)
    thread.start()
    while len(written) < 5:  # bounded by the writer (swtpm answers in milliseconds)
        thread.join(0.01)
        assert thread.is_alive(), "the writer stopped before the power cut"
    soft_tpm.power_cut()
    stop.set()
    thread.join(30)
    soft_tpm.start()
    held = nv.read()  # the log's last entry extended or not: recovered either way
    assert held.image in (written[-1], written[-1] + 1), (held.image, written[-3:])
    nv.raise_to(Floors(image=held.image + 1))  # and carries on
    assert nv.read().image == held.image + 1


# --- trust anchor ------------------------------------------------------------------------


def anchored(tpm: SoftTpm, trust: Path, repo: Repository) -> TrustAnchor:
    trust.mkdir(parents=True)
    (trust / "root.json").write_bytes(repo.root_bytes())
    anchor = TrustAnchor(tpm.tpm(), trust)
    anchor.provision(repo.root_bytes())
    return anchor


def test_replaced_root_json_is_refused_and_the_anchored_root_put_back(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository) -> None:
    genuine = repo.root_bytes()
    anchor = anchored(soft_tpm, tmp_path / "trust", repo)
    anchor.sync()
    attacker = Repository.create(tmp_path / "attacker", keys=KeySetup())
    for replacement in (attacker.root_bytes(), b"{torn", b""):
        (tmp_path / "trust" / "root.json").write_bytes(replacement)
        anchor.sync()
        assert (tmp_path / "trust" / "root.json").read_bytes() == genuine
    (tmp_path / "trust" / "root.json").unlink()
    anchor.sync()
    assert (tmp_path / "trust" / "root.json").read_bytes() == genuine


def test_anchor_moves_only_along_the_root_chain(
        soft_tpm: SoftTpm, tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo", keys=KeySetup())
    v1 = repo.root_bytes()
    anchor = anchored(soft_tpm, tmp_path / "trust", repo)
    repo.rotate("timestamp", generate=1)
    repo.sign(load_private_key(repo.offline_root_key_path))
    v2 = repo.root_bytes()
    assert v2 != v1
    # python-tuf accepted v2 (the agent syncs after every refresh)
    (tmp_path / "trust" / "root.json").write_bytes(v2)
    anchor.sync()
    assert sorted(p.name for p in (tmp_path / "trust" / "anchor").iterdir()) == \
        ["1.root.json", "2.root.json"]
    assert soft_tpm.tpm().nv_read(ANCHOR_INDEX, 32) == fold([v1, v2])
    # rolling the anchor back to the older root (whose keys may have leaked): refused
    (tmp_path / "trust" / "root.json").write_bytes(v1)
    anchor.sync()
    assert (tmp_path / "trust" / "root.json").read_bytes() == v2
    # and the copies of the anchored roots cannot be edited to make room for another
    (tmp_path / "trust" / "anchor" / "2.root.json").unlink()
    (tmp_path / "trust" / "root.json").write_bytes(v1)
    with pytest.raises(VerifyFailed, match="do not match the TPM's trust anchor"):
        anchor.sync()


def test_power_cut_between_extending_the_anchor_and_keeping_its_copy(
        soft_tpm: SoftTpm, tmp_path: Path) -> None:
    repo = Repository.create(tmp_path / "repo", keys=KeySetup())
    anchor = anchored(soft_tpm, tmp_path / "trust", repo)
    repo.rotate("timestamp", generate=1)
    repo.sign(load_private_key(repo.offline_root_key_path))
    v2 = repo.root_bytes()
    (tmp_path / "trust" / "root.json").write_bytes(v2)
    soft_tpm.tpm().nv_extend(ANCHOR_INDEX, hashlib.sha256(v2).digest())  # ... then the cut
    anchor.sync()
    assert (tmp_path / "trust" / "anchor" / "2.root.json").read_bytes() == v2
    assert FLOOR_LOG_INDEX not in soft_tpm.tpm().nv_indices()  # (floors are another index)


# --- the command line ---------------------------------------------------------------------


def init_args(tmp_path: Path, tpm: SoftTpm, repo: Repository, state: Path) -> list[str]:
    """'peer init' of a device with the TPM key store in ``state``."""
    (tmp_path / "root.json").write_bytes(repo.root_bytes())
    (tmp_path / "factory.img").write_bytes(b"\x01" * 4096)
    return ["peer", "init", str(state), "--root", str(tmp_path / "root.json"),
            "--origin", "http://127.0.0.1:1", "--tracker", "http://127.0.0.1:2",
            "--image", str(tmp_path / "factory.img"), "--version", "1.0.0",
            "--release-counter", "1", "--device-id", "dev-tpm", "--product", "acme-router",
            "--hardware-id", "hw1", "--keystore", "tpm", "--tpm-device", tpm.device]


def test_peer_init_with_the_tpm_key_store_writes_the_signing_requests(
        soft_tpm: SoftTpm, tmp_path: Path, repo: Repository,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*init_args(tmp_path, soft_tpm, repo, tmp_path / "bad"), "--identity-cert",
                 str(tmp_path / "root.json"), "--identity-key", str(tmp_path / "root.json")]) == 2
    assert "the identity key is made inside the TPM" in capsys.readouterr().err
    assert main([*init_args(tmp_path, soft_tpm, repo, tmp_path / "state"), "--identity-csr",
                 str(tmp_path / "req.pem")]) == 0
    assert "signing requests in" in capsys.readouterr().out
    requests = (tmp_path / "req.pem").read_bytes()
    assert requests == (tmp_path / "state" / "identity" / "request.pem").read_bytes()
    assert requests.count(b"BEGIN CERTIFICATE REQUEST") == 2
    config = (tmp_path / "state" / "device.json").read_text()
    assert '"keystore": "tpm"' in config and soft_tpm.device in config
    # a second device on the same TPM would take its keys: refused without --force
    assert main(init_args(tmp_path, soft_tpm, repo, tmp_path / "other")) == 2
    assert "already holds swarmota keys" in capsys.readouterr().err
    assert not (tmp_path / "other").exists(), "nothing half-made left behind"
