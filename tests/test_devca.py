"""infra/devca.py and infra/tlspin.py: the development CA, server certificates, pins."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from swarmota.infra.devca import (
    BACKUP_KEY_FILE,
    CA_CERT_FILE,
    CA_KEY_FILE,
    DevCaError,
    create_ca,
    generate_key_file,
    issue_server_cert,
)
from swarmota.infra.tlspin import PinError, check_pin, pin_of_certificate_der, pin_of_pem


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_files_modes_and_constraints(tmp_path: Path) -> None:
    ca_pem = create_ca(tmp_path / "ca")
    assert ca_pem == tmp_path / "ca" / CA_CERT_FILE
    assert _mode(tmp_path / "ca" / CA_KEY_FILE) == 0o600
    assert _mode(ca_pem) == 0o644
    cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == cert.subject
    with pytest.raises(DevCaError, match="refusing to overwrite"):
        create_ca(tmp_path / "ca")


def test_server_cert_sans_pin_and_modes(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca")
    files = issue_server_cert(tmp_path / "ca", tmp_path / "srv",
                              ["127.0.0.1", "origin.example", "::1"], backup=True)
    assert _mode(files.key) == 0o600
    assert files.backup_key is not None and _mode(files.backup_key) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["origin.example"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    # The pin of the certificate is the pin of its key, in every form, and matches a
    # computation from first principles.
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    assert files.pin == expected == check_pin(expected)
    assert pin_of_pem(files.cert.read_bytes()) == expected
    assert pin_of_pem(files.key.read_bytes()) == expected
    public_pem = cert.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pin_of_pem(public_pem) == expected
    assert pin_of_certificate_der(cert.public_bytes(serialization.Encoding.DER)) == expected
    assert files.backup_pin == pin_of_pem(files.backup_key.read_bytes()) != expected

    # The certificate verifies against the CA for its IP, with Python's strict defaults.
    context = ssl.create_default_context(cafile=str(tmp_path / "ca" / CA_CERT_FILE))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(files.cert), str(files.key))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_obj = context.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server_obj = server.wrap_bio(s_in, s_out, server_side=True)
    done = set()
    for _ in range(10):
        for name, obj, out, peer_in in (("c", client_obj, c_out, s_in),
                                        ("s", server_obj, s_out, c_in)):
            if name not in done:
                try:
                    obj.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
    assert done == {"c", "s"}


def test_renewal_keeps_the_key_and_a_given_key_is_used(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca")
    first = issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["127.0.0.1"])
    renewed = issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["127.0.0.1"])
    assert renewed.pin == first.pin
    spare_pin = generate_key_file(tmp_path / "spare.pem")
    assert _mode(tmp_path / "spare.pem") == 0o600
    rotated = issue_server_cert(tmp_path / "ca", tmp_path / "srv", ["127.0.0.1"],
                                key_file=tmp_path / "spare.pem")
    assert rotated.pin == spare_pin != first.pin
    with pytest.raises(DevCaError, match="refusing to overwrite"):
        generate_key_file(tmp_path / "spare.pem")


def test_bad_names_and_missing_ca_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DevCaError, match="swarmota tls ca"):
        issue_server_cert(tmp_path / "none", tmp_path / "srv", ["127.0.0.1"])
    create_ca(tmp_path / "ca")
    for bad in ("", "-bad.example", "a b", "x" * 64 + ".example"):
        with pytest.raises(DevCaError, match="neither an IP address nor a DNS name"):
            issue_server_cert(tmp_path / "ca", tmp_path / "srv", [bad])
    with pytest.raises(DevCaError, match="at least one"):
        issue_server_cert(tmp_path / "ca", tmp_path / "srv", [])
    assert not (tmp_path / "srv" / BACKUP_KEY_FILE).exists()


@pytest.mark.parametrize("pin", [
    "sha1/AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    "sha256/" + base64.b64encode(b"x" * 31).decode(),
    "sha256/" + base64.b64encode(b"x" * 32).decode().rstrip("="),
    "sha256/" + base64.urlsafe_b64encode(b"\xff" * 32).decode(),
    "sha256/ " + base64.b64encode(b"x" * 32).decode(),
])
def test_malformed_pins_are_refused(pin: str) -> None:
    with pytest.raises(PinError):
        check_pin(pin)


def test_pin_of_garbage_is_refused() -> None:
    with pytest.raises(PinError, match="no PEM"):
        pin_of_pem(b"hello")
    with pytest.raises(PinError, match="not a DER certificate"):
        pin_of_certificate_der(b"\x30\x03\x02\x01\x00")
