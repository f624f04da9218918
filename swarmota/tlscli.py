"""``swarmota tls``: a development CA, server certificates, spare keys and SPKI pins."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from swarmota.infra.devca import (
    CA_CERT_FILE,
    DevCaError,
    create_ca,
    generate_key_file,
    issue_device_cert,
    issue_device_cert_from_csr,
    issue_server_cert,
)
from swarmota.infra.tlspin import PinError, pin_of_pem

__all__ = ["add_parser"]

_PINS_EXPLAINED = """\
What pins are for: a device trusts a server's certificate if a CA it trusts signed it.
Any such CA can be tricked or compelled into signing one for an attacker. A pin is the
SHA-256 of the server's public key (SubjectPublicKeyInfo), written sha256/BASE64 (as in
HPKP and curl --pinnedpubkey). A device provisioned with pins ('swarmota peer init
--tls-pin PIN ...') refuses any server whose key is not pinned, right after the TLS
handshake and before it sends a byte, even with a valid certificate. Pin the keys of
the origin and the tracker AND a spare (backup) key kept offline: when a server key
must change, the server moves to the spare key and devices keep working. The pin of a
key does not change when its certificate is renewed.
"""


def add_parser(subparsers: Any) -> None:
    tls = subparsers.add_parser(
        "tls", help="development CA, server certificates and key pins",
        description="Create a development CA and server certificates for HTTPS origins "
                    "and trackers, spare keys, and print SPKI pins for devices.",
        epilog=_PINS_EXPLAINED, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = tls.add_subparsers(dest="tls_command", metavar="COMMAND", required=True)

    ca = sub.add_parser(
        "ca", help="create a development CA",
        description=f"Create DIR/{CA_CERT_FILE} and DIR/ca-key.pem (mode 0600; keep it "
                    "away from servers). A CA has one of two jobs; make one CA for each: "
                    "a server CA signs the HTTPS certificates of origin and tracker "
                    "('tls cert --ca DIR'; devices trust it with 'peer init "
                    f"--tls-ca-file DIR/{CA_CERT_FILE}'); a fleet CA signs device and "
                    "seeder identities ('tls device-cert --ca DIR'; the tracker checks "
                    f"them with 'tracker serve --device-ca DIR/{CA_CERT_FILE}', private "
                    f"swarms with 'seeder publish --swarm-ca DIR/{CA_CERT_FILE}'). Refuses "
                    "to overwrite an existing CA key.")
    ca.add_argument("dir", type=Path)
    ca.add_argument("--common-name", default="swarmota development CA")
    ca.add_argument("--days", type=int, default=3650, help="validity (default %(default)s)")
    ca.set_defaults(func=_ca)

    cert = sub.add_parser(
        "cert", help="issue a server certificate",
        description="Issue DIR/cert.pem and DIR/key.pem (0600) for the given names, signed "
                    "by the CA; serve them with 'seeder serve --tls-cert DIR/cert.pem "
                    "--tls-key DIR/key.pem'. An existing DIR/key.pem is kept (renewal "
                    "keeps the pin). Prints the pins to provision devices with.",
        epilog=_PINS_EXPLAINED, formatter_class=argparse.RawDescriptionHelpFormatter)
    cert.add_argument("dir", type=Path)
    cert.add_argument("--ca", type=Path, required=True, metavar="CA_DIR",
                      help="directory made by 'swarmota tls ca'")
    cert.add_argument("--name", action="append", required=True, dest="names",
                      help="DNS name or IP address the server is reached by (repeatable)")
    cert.add_argument("--key", type=Path, default=None, metavar="KEY_FILE",
                      help="use this private key (e.g. a spare key made by 'swarmota tls "
                           "key', to rotate to it)")
    cert.add_argument("--backup", action="store_true",
                      help="also create a spare key DIR/backup-key.pem (if missing) and "
                           "print its pin; move it offline")
    cert.add_argument("--days", type=int, default=397, help="validity (default %(default)s)")
    cert.set_defaults(func=_cert)

    device = sub.add_parser(
        "device-cert", help="issue a fleet identity for a device or a seeder",
        description="Issue DIR/cert.pem and DIR/key.pem (0600) with CN=DEVICE_ID and "
                    "OU=ROLE, signed by the fleet CA. Devices get it at provisioning "
                    "('peer init --identity-cert DIR/cert.pem --identity-key "
                    "DIR/key.pem'), seeders with 'seeder serve --identity DIR'. The "
                    "tracker accepts requests signed with it ('tracker serve --device-ca "
                    "CA_DIR/ca.pem'), and private swarms (torrents made with 'seeder "
                    "publish --swarm-ca CA_DIR/ca.pem') admit only peers holding one.")
    device.add_argument("dir", type=Path)
    device.add_argument("--ca", type=Path, required=True, metavar="CA_DIR",
                        help="the fleet CA directory made by 'swarmota tls ca'")
    device.add_argument("--device-id", default=None,
                        help="the device id (CN); with --csr, optional (checked against "
                             "the request's)")
    device.add_argument("--csr", type=Path, default=None, metavar="PEM",
                        help="issue DIR/cert.pem for the key of this signing request "
                             "('swarmota peer identity csr': a renewal with a new key that "
                             "never leaves the device); no key.pem is written")
    device.add_argument("--role", choices=("device", "seed"), default="device",
                        help="'seed' for the operator's seeders (always handed peers)")
    device.add_argument("--days", type=int, default=3650,
                        help="validity (default %(default)s)")
    device.set_defaults(func=_device_cert)

    key = sub.add_parser(
        "key", help="create a spare (backup) private key and print its pin",
        description="Write a new ECDSA P-256 private key to FILE (0600, never overwritten) "
                    "and print its pin. Pin it on devices now; issue a certificate for it "
                    "with 'swarmota tls cert --key FILE' when the server key must change.")
    key.add_argument("file", type=Path)
    key.set_defaults(func=_key)

    pin = sub.add_parser(
        "pin", help="print the SPKI pin of a certificate or key",
        description="Print sha256/BASE64 of the public key in FILE: a PEM certificate (the "
                    "first of a chain), public key or unencrypted private key.",
        epilog=_PINS_EXPLAINED, formatter_class=argparse.RawDescriptionHelpFormatter)
    pin.add_argument("file", type=Path)
    pin.set_defaults(func=_pin)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _ca(args: argparse.Namespace) -> int:
    try:
        path = create_ca(args.dir, common_name=args.common_name, valid_days=args.days)
    except (DevCaError, OSError) as exc:
        return _fail(str(exc))
    print(f"CA certificate {path}\n"
          f"  as a server CA (HTTPS of origin and tracker): devices trust it with "
          f"'peer init --tls-ca-file {path}'\n"
          f"  as a fleet CA (device and seeder identities): 'tls device-cert --ca "
          f"{args.dir}', 'tracker serve --device-ca {path}', 'seeder publish --swarm-ca "
          f"{path}'")
    return 0


def _cert(args: argparse.Namespace) -> int:
    try:
        files = issue_server_cert(args.ca, args.dir, args.names, key_file=args.key,
                                  backup=args.backup, valid_days=args.days)
    except (DevCaError, OSError) as exc:
        return _fail(str(exc))
    print(f"certificate {files.cert}\nkey         {files.key}\npin         {files.pin}")
    if files.backup_key is not None:
        print(f"backup key  {files.backup_key}\nbackup pin  {files.backup_pin}")
    return 0


def _device_cert(args: argparse.Namespace) -> int:
    try:
        if args.csr is not None:
            cert = issue_device_cert_from_csr(args.ca, args.csr.read_bytes(), args.dir,
                                              device_id=args.device_id, valid_days=args.days)
            print(f"certificate {cert} (for the key of {args.csr})")
            return 0
        if args.device_id is None:
            return _fail("--device-id is required (unless --csr)")
        files = issue_device_cert(args.ca, args.dir, args.device_id, role=args.role,
                                  valid_days=args.days)
    except (DevCaError, OSError) as exc:
        return _fail(str(exc))
    print(f"certificate {files.cert}\nkey         {files.key}\n"
          f"identity    {args.device_id} ({args.role})")
    return 0


def _key(args: argparse.Namespace) -> int:
    try:
        pin = generate_key_file(args.file)
    except (DevCaError, OSError) as exc:
        return _fail(str(exc))
    print(pin)
    return 0


def _pin(args: argparse.Namespace) -> int:
    try:
        print(pin_of_pem(args.file.read_bytes()))
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
    except PinError as exc:
        return _fail(f"{args.file}: {exc}")
    return 0
