"""``swarmota peer``: provision a device, run an update pass or the daemon, show status."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from swarmota.infra.fsio import atomic_write_bytes, fsync_dir
from swarmota.infra.sdnotify import SystemdNotifier, service_ready, service_stopping
from swarmota.manifest import DEFAULT_MAX_COUNTER_JUMP
from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.bootloader import script
from swarmota.peer.components import ComponentStore
from swarmota.peer.config import BOOTLOADERS, DOWNLOAD_MODES, KEYSTORES, SLOT_BACKENDS, DeviceConfig
from swarmota.peer.control import AgentControl
from swarmota.peer.daemon import DaemonConfig, run_daemon
from swarmota.peer.dbus_service import DBusUnavailable, bus_address, policy_file, serve_dbus
from swarmota.peer.errors import ConfigError, StatusCode, VerifyFailed, resource_failure
from swarmota.peer.floors import Floors, read_floors
from swarmota.peer.identity import install_identity, load_identity, renew_identity, renewal_csr
from swarmota.peer.install_policy import load_policy
from swarmota.peer.keystore import TpmKeyStore, open_keystore
from swarmota.peer.state import DeviceState, JournalError, init_device
from swarmota.peer.tpm import TpmError
from swarmota.tracker.wire import MAX_LABELS

__all__ = ["TLS_CA_FILE", "Provisioning", "add_parser", "prepare_init"]

log = logging.getLogger(__name__)

TLS_CA_FILE = "tls-ca.pem"
"""The copy of ``--tls-ca-file`` in the state directory (device.json names it relatively)."""
_MAX_CA_FILE_BYTES = 1 << 20


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("peer", help="the device agent",
                              description="The device agent: provision, update (one pass), run "
                                          "(the daemon), status.")
    sub = p.add_subparsers(dest="peer_command", metavar="COMMAND", required=True)

    init = sub.add_parser(
        "init", help="create a device state directory",
        description="Create a device state directory: trusted TUF root, configuration and "
                    "a factory image committed in slot A.")
    init.add_argument("state", type=Path, help="device state directory to create")
    init.add_argument("--root", type=Path, required=True,
                      help="trusted TUF root.json (from 'seeder init', provisioned at the "
                           "factory; never fetched from the network)")
    init.add_argument("--origin", required=True, help="origin base URL, e.g. http://127.0.0.1:8460")
    init.add_argument("--tracker", required=True, help="tracker base URL, e.g. http://127.0.0.1:8470")
    init.add_argument("--image", type=Path, required=True, help="factory image for slot A")
    init.add_argument("--version", required=True, help="version of the factory image")
    init.add_argument("--release-counter", type=int, default=0,
                      help="release counter of the factory image (anti-rollback floor)")
    init.add_argument("--device-id", required=True,
                      help="the device's id at the tracker (and the CN of its certificate)")
    init.add_argument("--product", required=True,
                      help="the product whose releases the device installs")
    init.add_argument("--hardware-id", required=True,
                      help="the hardware id a release must list as compatible")
    init.add_argument("--health-command", default="",
                      help="command run on the new slot after a switch; exit 0 = healthy "
                           "(env: SWARMOTA_SLOT, SWARMOTA_SLOT_IMAGE, SWARMOTA_VERSION)")
    init.add_argument("--health-timeout-s", type=float, default=60.0,
                      help="the health command fails after this long (default %(default)s)")
    init.add_argument("--concurrency", type=int, default=4, help="parallel chunk downloads")
    init.add_argument("--download-mode", choices=DOWNLOAD_MODES, default="swarm",
                      help="swarm: chunks from LAN peers and the origin (BitTorrent through "
                           "the tracker); direct: HTTP(S) from the origin only "
                           "(default %(default)s)")
    init.add_argument("--swarm-listen", default="0.0.0.0:6881", metavar="HOST:PORT",
                      help="where the swarm accepts peers (port 0: any free port; "
                           "default %(default)s)")
    init.add_argument("--download-limit", type=int, default=0, metavar="BYTES_PER_S",
                      help="swarm download rate limit, 0 = unlimited")
    init.add_argument("--upload-limit", type=int, default=0, metavar="BYTES_PER_S",
                      help="upload rate limit to peers, 0 = unlimited")
    init.add_argument("--seed-time-s", type=float, default=300.0,
                      help="keep sharing an installed payload with peers this long after "
                           "an update (default %(default)s; 0 = not at all)")
    init.add_argument("--swarm-local-discovery", action="store_true",
                      help="announce the swarms the device is in on its LAN by multicast "
                           "(local service discovery): LAN peers meet without the tracker, "
                           "and anyone on the LAN learns what the device updates to. Off by "
                           "default; DHT is never used")
    init.add_argument("--metered", action="store_true",
                      help="the device's network is metered: never upload to peers")
    init.add_argument("--battery-file", type=Path, default=None, metavar="PATH",
                      help="file holding the battery percentage; no upload below "
                           "--min-battery-percent (or when unreadable)")
    init.add_argument("--min-battery-percent", type=int, default=30,
                      help="no upload to peers below this battery level (default "
                           "%(default)s)")
    init.add_argument("--tls-pin", action="append", default=[], metavar="PIN",
                      dest="tls_pins",
                      help="SPKI pin (sha256/BASE64, from 'swarmota tls pin') of a key the "
                           "origin or tracker may use; repeat for each server key and at "
                           "least one spare key. With pins, both URLs must be https:// and "
                           "a server with any other key is refused before anything is sent")
    init.add_argument("--tls-ca-file", type=Path, default=None, metavar="PEM",
                      help="CA certificate(s) to trust instead of the system store, e.g. "
                           "the ca.pem of 'swarmota tls ca'; copied to STATE/"
                           f"{TLS_CA_FILE}")
    init.add_argument("--policy", type=Path, default=None, metavar="FILE",
                      help="install policy (TOML: maintenance windows, install delay, "
                           "battery/charging, metered network, free-space reserve); "
                           "validated and copied to STATE/policy.toml")
    init.add_argument("--identity-cert", type=Path, default=None, metavar="PEM",
                      help="the device's certificate from the fleet CA ('swarmota tls "
                           "device-cert'; its CN must be --device-id). With it the device "
                           "signs every tracker request and joins private swarms; copied "
                           "to STATE/identity/")
    init.add_argument("--identity-key", type=Path, default=None, metavar="PEM",
                      help="the private key of --identity-cert (copied, mode 0600)")
    keys = init.add_argument_group(
        "key store",
        "Where the identity key, the anti-rollback floors and the trusted root's anchor "
        "live. 'file' (default): the state directory. 'tpm': a TPM 2.0 (tpm2-tools "
        "installed); the identity key is made inside it and never leaves it, and 'peer "
        "init' writes the signing requests for the fleet CA to STATE/identity/request.pem "
        "('swarmota tls device-cert DIR --ca FLEET --csr request.pem', then 'swarmota "
        "peer identity renew STATE --cert DIR/cert.pem'). See docs/SECURITY.md.")
    keys.add_argument("--keystore", choices=KEYSTORES, default="file",
                      help="where the identity key, the floors and the root's anchor live: "
                           "file (the state directory) or tpm (default: file)")
    keys.add_argument("--tpm-device", default=None, metavar="DEVICE",
                      help="the TPM: /dev/tpmrm0 (the kernel's resource manager), or a TCTI "
                           "such as swtpm:path=SOCKET (a software TPM)")
    keys.add_argument("--tpm-pcrs", default=None, metavar="BANK:PCRS",
                      help="measured boot: the TPM signs and unseals the device's keys only "
                           "while these PCRs hold their values of now, e.g. sha256:7 (the "
                           "Secure Boot state; pick PCRs an A/B update does not change)")
    keys.add_argument("--tpm-owner-auth", type=Path, default=None, metavar="FILE",
                      help="the file holding the TPM owner hierarchy's password, when the "
                           "device maker set one (owned by root, mode 0400): the agent "
                           "reads it for owner operations only (provisioning, identity "
                           "renewal) and never tries a refused password twice")
    keys.add_argument("--identity-csr", type=Path, default=None, metavar="FILE",
                      help="with --keystore tpm: also copy the signing requests here")
    fleet = init.add_argument_group(
        "fleet membership (sent at check-in)",
        "What the tracker learns about the device besides its id: rollouts may target "
        "labels (--canary-label), and peers are handed out network first, then region.")
    fleet.add_argument("--label", action="append", default=[], metavar="LABEL",
                       dest="labels",
                       help=f"a group the device declares (repeat; at most {MAX_LABELS}; "
                            "1-64 chars of A-Z a-z 0-9 . _ : -)")
    fleet.add_argument("--network-id", default=None, metavar="ID",
                       help="opaque id of the device's home network (e.g. a hash of its "
                            "gateway's address): peers on it come first")
    fleet.add_argument("--region", default=None, metavar="REGION",
                       help="coarse region of the device: peers in it come next")
    init.add_argument("--max-counter-jump", type=int, default=DEFAULT_MAX_COUNTER_JUMP,
                      metavar="N",
                      help="refuse a release whose counter is more than N above the "
                           "installed one (default %(default)s): one signed counter of 2^53 "
                           "would otherwise make every later release a rollback")
    boot = init.add_argument_group(
        "slots and boot control",
        "Default: file slots (STATE/slots/) and boot control simulated by the agent "
        "(tests, the demo). A real device: partitions and GRUB or U-Boot, whose boot "
        "script is 'swarmota peer bootloader-script grub.cfg|boot.cmd'.")
    boot.add_argument("--slot-backend", choices=SLOT_BACKENDS, default="file",
                      help="file: STATE/slots/{a,b}.img; block: partitions "
                           "(default %(default)s)")
    boot.add_argument("--slot-device", action="append", default=[], metavar="SLOT=DEVICE",
                      dest="slot_devices",
                      help="a slot's partition, by path or PARTLABEL=label (block slots; "
                           "give a= and b=); slot a must already hold --image")
    boot.add_argument("--bootloader", choices=BOOTLOADERS, default="file",
                      help="file: the agent plays the bootloader (tests, the demo); grub or "
                           "uboot: a real one (default %(default)s)")
    boot.add_argument("--grub-env", type=Path, default=None, metavar="PATH",
                      help="the GRUB environment block grub.cfg loads (created if missing)")
    boot.add_argument("--uboot-env-config", type=Path, default=None, metavar="PATH",
                      help="fw_env.config naming the U-Boot environment's copies")
    boot.add_argument("--uboot-default-env", type=Path, default=None, metavar="PATH",
                      help="libubootenv's default environment when no copy is valid")
    boot.add_argument("--boot-attempts", type=int, default=3,
                      help="boots a new slot gets before the bootloader falls back; a boot "
                           "interrupted in its health check is retried (default %(default)s)")
    boot.add_argument("--reboot-command", default="",
                      help="run after a switch with a real bootloader, e.g. 'systemctl "
                           "reboot' (default: the reboot is left to the device)")
    init.add_argument("--force", action="store_true",
                      help="re-provision an existing directory (without it, init refuses one)")
    init.set_defaults(func=_init)

    identity = sub.add_parser(
        "identity", help="show or renew the device's fleet identity",
        description="The device's fleet certificate: show it, or renew it without "
                    "reflashing. Same key: 'identity renew STATE --cert NEW.pem' with a "
                    "certificate the fleet CA issued for the current key. New key: "
                    "'identity csr STATE --out req.pem' (the key is made on the device and "
                    "stays there), 'swarmota tls device-cert DIR --ca FLEET --csr req.pem' "
                    "at the CA, then 'identity renew STATE --cert DIR/cert.pem'.")
    identity_sub = identity.add_subparsers(dest="identity_command", metavar="COMMAND",
                                           required=True)
    show = identity_sub.add_parser("show", help="the certificate's device id, role, validity")
    show.add_argument("state", type=Path)
    show.set_defaults(func=_identity_show)
    csr = identity_sub.add_parser("csr", help="make a new key and its signing request")
    csr.add_argument("state", type=Path)
    csr.add_argument("--out", type=Path, required=True, metavar="FILE",
                     help="where to write the certificate signing request (PEM)")
    csr.set_defaults(func=_identity_csr)
    renew = identity_sub.add_parser("renew", help="install a renewed certificate")
    renew.add_argument("state", type=Path)
    renew.add_argument("--cert", type=Path, required=True, metavar="PEM",
                       help="the new certificate (for the current key, or for the key of "
                            "'identity csr'); with a TPM key store, the file 'tls device-cert "
                            "--csr' wrote (the identity's and the swarm key's certificates)")
    renew.set_defaults(func=_identity_renew)

    trust = sub.add_parser(
        "trust", help="repair the TPM's floor log",
        description="With 'keystore: tpm' the anti-rollback floors are a log in "
                    "STATE/trust/floors.log whose fold an extend-only TPM index holds; the "
                    "agent keeps a copy (floors.log.copy) and puts a damaged log back from "
                    "it by itself. 'trust repair' checks the log and rebuilds it from the "
                    "first of the log, its copy and the --from files that folds to the "
                    "TPM's index: only the genuine log can, so a repair never lowers a "
                    "floor. When none does (the index extended with something no copy "
                    "holds), the device refuses every release until 'peer init --force'.")
    trust_sub = trust.add_subparsers(dest="trust_command", metavar="COMMAND", required=True)
    repair = trust_sub.add_parser("repair", help="rebuild the floor log from a copy that "
                                                 "folds to the TPM's floor index")
    repair.add_argument("state", type=Path)
    repair.add_argument("--from", type=Path, action="append", default=[], metavar="FILE",
                        dest="copies",
                        help="another copy of the floor log to try (e.g. from a backup "
                             "taken after the last floor raised; repeat)")
    repair.set_defaults(func=_trust_repair)

    script_cmd = sub.add_parser(
        "bootloader-script", help="print the shipped GRUB or U-Boot slot-selection script",
        description="Print the boot script that consumes the environment the agent writes: "
                    "grub.cfg (source it from your grub.cfg) or boot.cmd (U-Boot; compile "
                    "with mkimage).")
    script_cmd.add_argument("name", choices=("grub.cfg", "boot.cmd"))
    script_cmd.set_defaults(func=_bootloader_script)

    update = sub.add_parser(
        "update", help="check in and install an offered update",
        description="One update pass: check in with the tracker; if a release is offered, "
                    "verify and install it into the inactive slot, switch, health-check, "
                    "commit or roll back, and report. Exit code: the status code "
                    "(0 ok, 10 download, 20 verify, 30 install, 40 post-check failed, "
                    "41 boot attempts interrupted: rolled back, not a release failure).")
    update.add_argument("state", type=Path, help="the device's state directory ('peer init')")
    update.add_argument("--json", action="store_true", help="print the result as JSON")
    update.add_argument("--seed-time-s", type=float, default=None,
                        help="after a swarm-mode update, share the payload with peers this "
                             "long (default: the device's seed time from 'peer init'; "
                             "0 = exit at once)")
    update.epilog = ("In swarm mode the command keeps sharing the installed payload for the "
                     "seed time before it exits (the result is already saved and reported; "
                     "Ctrl-C ends the sharing); 'peer status' shows the progress.")
    update.set_defaults(func=_update)

    run = sub.add_parser(
        "run", help="run update passes forever (the device daemon)",
        description="The agent as a daemon: an update pass, then sleep the poll interval "
                    "(with jitter) or, after a failure, an exponential backoff; a release "
                    "whose attempts failed --retry-budget times is not attempted again "
                    "until another one is offered or --retry-window-s has passed. SIGTERM "
                    "or SIGINT: exit 0 at once when idle; a pass in progress stops at the "
                    "next safe point (never between the switch and the health check's "
                    "outcome) and is picked up from the journal on the next start.")
    run.add_argument("state", type=Path, help="the device's state directory ('peer init')")
    run.add_argument("--poll-interval-s", type=float, default=None,
                     help="seconds between passes (default: what the tracker asks for)")
    run.add_argument("--jitter-fraction", type=float, default=0.1,
                     help="random jitter, a fraction of the interval either way "
                          "(default %(default)s)")
    run.add_argument("--backoff-initial-s", type=float, default=30.0,
                     help="wait after a first failure, doubled after each next one "
                          "(default %(default)s)")
    run.add_argument("--backoff-max-s", type=float, default=3600.0,
                     help="the longest backoff (default %(default)s)")
    run.add_argument("--retry-budget", type=int, default=3,
                     help="failed attempts per release before it is left alone "
                          "(default %(default)s; failed downloads do not count)")
    run.add_argument("--retry-window-s", type=float, default=6 * 3600.0,
                     help="a failed attempt is forgiven this long after it: a spent budget "
                          "recovers with time (default %(default)s)")
    run.add_argument("--min-poll-after-s", type=float, default=30.0,
                     help="never poll sooner than this, whatever the tracker says "
                          "(default %(default)s)")
    run.add_argument("--seed-time-s", type=float, default=None,
                     help="seed time after each swarm-mode update (default: the device's)")
    run.add_argument("--dbus", default=None, metavar="BUS",
                     help="serve the local API (org.swarmota.Agent1, docs/DBUS.md) on "
                          "'system' (the default), 'session', a bus address "
                          "(unix:path=...), or 'none'. Without this option a system bus "
                          "that cannot be reached only costs a warning; with it, exit 2")
    run.epilog = ("Under systemd (Type=notify) it sends READY=1 once serving, a STATUS= "
                  "line after each pass and, with WatchdogSec=, WATCHDOG=1 every half "
                  "period.")
    run.set_defaults(func=_run)

    policy = sub.add_parser(
        "dbus-policy", help="print the D-Bus policy of the local API",
        description="Print the bus policy that lets root own org.swarmota.Agent1, root "
                    "and the group 'swarmota' call its methods, and anyone read its "
                    "properties. Install it as /etc/dbus-1/system.d/org.swarmota.Agent1.conf.")
    policy.set_defaults(func=_dbus_policy)

    status = sub.add_parser("status", help="show slots, versions and the last result")
    status.add_argument("state", type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)


@dataclass(frozen=True)
class Provisioning:
    """What ``peer init`` writes, checked: the configuration and the files' contents."""

    config: DeviceConfig
    root_json: bytes
    policy: bytes | None
    tls_ca: bytes | None
    identity: tuple[Path, Path] | None


def prepare_init(args: argparse.Namespace) -> Provisioning:
    """Everything ``peer init`` checks before it writes anything (``config check`` runs
    it too): the configuration, and the files it names are readable and usable.

    Raises:
        ConfigError: a setting or a file that cannot be used.
    """
    try:
        tls_ca = _read_ca_file(args.tls_ca_file)
        config = DeviceConfig(
            device_id=args.device_id, product=args.product, hardware_id=args.hardware_id,
            origin_url=args.origin, tracker_url=args.tracker,
            health_command=tuple(shlex.split(args.health_command)),
            health_timeout_s=args.health_timeout_s, download_concurrency=args.concurrency,
            download_mode=args.download_mode, swarm_listen=args.swarm_listen,
            download_rate_limit_bytes_per_s=args.download_limit,
            upload_rate_limit_bytes_per_s=args.upload_limit, seed_time_s=args.seed_time_s,
            network_metered=args.metered, battery_percent_path=_text(args.battery_file),
            swarm_local_discovery=args.swarm_local_discovery,
            min_battery_percent_to_upload=args.min_battery_percent,
            tls_pins=tuple(args.tls_pins),
            tls_ca_file=None if tls_ca is None else TLS_CA_FILE,
            labels=tuple(args.labels), network_id=args.network_id, region=args.region,
            max_release_counter_jump=args.max_counter_jump,
            slot_backend=args.slot_backend, slot_devices=_slot_devices(args.slot_devices),
            bootloader=args.bootloader, grub_env_path=_text(args.grub_env),
            uboot_env_config=_text(args.uboot_env_config),
            uboot_default_env=_text(args.uboot_default_env), boot_attempts=args.boot_attempts,
            reboot_command=tuple(shlex.split(args.reboot_command)),
            keystore=args.keystore, tpm_device=args.tpm_device, tpm_pcrs=args.tpm_pcrs,
            tpm_owner_auth=_text(args.tpm_owner_auth))
        if (args.identity_cert is None) != (args.identity_key is None):
            raise ConfigError("--identity-cert and --identity-key go together")
        if config.keystore == "tpm" and args.identity_cert is not None:
            raise ConfigError("with --keystore tpm the identity key is made inside the TPM: "
                              "its certificate comes from the signing request 'peer init' "
                              "writes (no --identity-cert/--identity-key)")
        if args.identity_csr is not None and config.keystore != "tpm":
            raise ConfigError("--identity-csr goes with --keystore tpm (else: 'peer "
                              "identity csr')")
        root = args.root.read_bytes()
        policy = None
        if args.policy is not None:
            if not args.policy.is_file():
                raise ConfigError(f"policy {args.policy} does not exist")
            load_policy(args.policy)  # refuse a bad file before provisioning anything
            policy = args.policy.read_bytes()
        if not args.image.is_file():
            raise ConfigError(f"slot A image {args.image} does not exist")
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    identity = None
    if args.identity_cert is not None:
        identity = (args.identity_cert, args.identity_key)
        with tempfile.TemporaryDirectory(prefix=".swarmota-check-") as scratch:
            install_identity(Path(scratch), *identity, config.device_id)
    return Provisioning(config, root, policy, tls_ca, identity)


def _init(args: argparse.Namespace) -> int:
    try:
        plan = prepare_init(args)
        config = plan.config

        def provision(directory: Path) -> None:
            state = init_device(directory, config, root_json=plan.root_json, image=args.image,
                                version=args.version, release_counter=args.release_counter,
                                force=args.force)
            if plan.policy is not None:
                atomic_write_bytes(state.policy_path, plan.policy)
            ca = state.root / TLS_CA_FILE
            if plan.tls_ca is not None:
                atomic_write_bytes(ca, plan.tls_ca)
            else:
                ca.unlink(missing_ok=True)
            if plan.identity is not None:
                install_identity(state.root, *plan.identity, config.device_id)

        _provision_whole(args.state, provision)
        request = args.state / "identity" / "request.pem"
        if args.identity_csr is not None:
            atomic_write_bytes(args.identity_csr, request.read_bytes())
    except (ConfigError, TpmError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"device {config.device_id} provisioned in {args.state} "
          f"(slot a: {args.version}, counter {args.release_counter})")
    if config.keystore == "tpm":
        print(f"identity key made in the TPM ({config.tpm_device}); signing requests in "
              f"{args.identity_csr or request}: have the fleet CA issue the certificates "
              f"('swarmota tls device-cert DIR --ca FLEET_CA --csr FILE'), then 'swarmota "
              f"peer identity renew {args.state} --cert DIR/cert.pem'")
    return 0


def _tpm_keystore(state: Path) -> TpmKeyStore | None:
    """The TPM key store of the device in ``state`` (``None``: keys in files).
    Raises ConfigError."""
    return open_keystore(DeviceState(state).config(), state)


def _identity_show(args: argparse.Namespace) -> int:
    try:
        keystore = _tpm_keystore(args.state)
        identity = load_identity(args.state) if keystore is None else keystore.identity()
    except (ConfigError, TpmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if identity is None and keystore is not None:
        print(f"{args.state}: identity key in the TPM ({keystore.tpm.tcti}), waiting for its "
              f"certificate: have the fleet CA issue it for {keystore.request_path}, then "
              "'peer identity renew --cert'")
        return 0
    if identity is None:
        print(f"{args.state}: no fleet identity (requests are not signed)")
        return 0
    signer = identity.signer
    print(f"device {signer.device_id} ({signer.role}), certificate valid "
          f"{signer.not_before.isoformat()} to {signer.not_after.isoformat()}")
    if keystore is not None:
        tls = "yes" if identity.tls_identity() is not None else "no (no swarm-cert.pem)"
        print(f"key in the TPM ({keystore.tpm.tcti}); TLS key for private swarms: {tls}")
    if (identity.directory / "key.next.pem").exists() or (
            keystore is not None and keystore.renewal_pending()):
        print("a renewal to a new key is pending ('peer identity renew --cert ...')")
    return 0


def _identity_csr(args: argparse.Namespace) -> int:
    try:
        keystore = _tpm_keystore(args.state)
        atomic_write_bytes(args.out, renewal_csr(args.state) if keystore is None
                           else keystore.renewal_requests())
    except (ConfigError, TpmError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: have the fleet CA issue a certificate for it ('swarmota tls "
          f"device-cert DIR --ca FLEET_CA --csr {args.out}'), then 'swarmota peer "
          f"identity renew {args.state} --cert DIR/cert.pem'")
    return 0


def _identity_renew(args: argparse.Namespace) -> int:
    try:
        keystore = _tpm_keystore(args.state)
        if keystore is None:
            kind = renew_identity(args.state, args.cert)
        else:
            kind = keystore.install(args.cert.read_bytes())
    except OSError as exc:
        print(f"error: cannot read {args.cert}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (ConfigError, TpmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"identity renewed ({kind}); the next requests carry the new certificate")
    return 0


def _trust_repair(args: argparse.Namespace) -> int:
    try:
        keystore = _tpm_keystore(args.state)
        if keystore is None:
            raise ConfigError(f"{args.state}: keystore 'file': the floors are files of the "
                              "state directory, there is no TPM floor log to repair")
        source = keystore.floors.repair(args.copies)
        held = keystore.floors.read()
    except (ConfigError, VerifyFailed, TpmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if source == keystore.floors.log_path:
        print(f"{source}: folds to the TPM's floor index, nothing to repair")
    else:
        print(f"floor log rebuilt from {source} (it folds to the TPM's floor index)")
    print(f"anti-rollback floor of images: release counter {held.image}"
          + "".join(f"; {name}: {floor}" for name, floor in sorted(held.components.items())))
    return 0


def _slot_devices(specs: list[str]) -> dict[str, str]:
    devices: dict[str, str] = {}
    for spec in specs:
        slot, sep, device = spec.partition("=")
        if not sep or slot not in ("a", "b") or not device or slot in devices:
            raise ConfigError(f"--slot-device wants a=DEVICE and b=DEVICE once each, got "
                              f"{spec!r}")
        devices[slot] = device
    return devices


def _bootloader_script(args: argparse.Namespace) -> int:
    sys.stdout.write(script(args.name))
    return 0


def _provision_whole(target: Path, provision: Callable[[Path], None]) -> None:
    """Run ``provision`` so that a failure leaves no half-made state directory.

    A new device (``target`` missing or an empty directory) is built in a temporary
    directory beside it and renamed into place once complete; on failure the temporary
    directory goes and ``target`` is as it was. Re-provisioning (``--force``) changes
    the device in place, keeping its identity's request counter (what can be refused
    was checked before: :func:`prepare_init`).

    Raises:
        ConfigError, OSError: as ``provision``.
    """
    fresh = not target.exists() or (target.is_dir() and not any(target.iterdir()))
    if not fresh:
        provision(target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.init-", dir=target.parent))
    try:
        provision(work)
        os.replace(work, target)  # onto a missing or an empty directory
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def _read_ca_file(path: Path | None) -> bytes | None:
    """The CA bundle at ``path``, checked to hold at least one PEM certificate (it is
    copied into the state directory: the device must not depend on a file outside)."""
    if path is None:
        return None
    with path.open("rb") as fh:
        data = fh.read(_MAX_CA_FILE_BYTES + 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if len(data) > _MAX_CA_FILE_BYTES:
            raise ValueError(f"larger than {_MAX_CA_FILE_BYTES} bytes")
        context.load_verify_locations(cadata=data.decode("ascii"))
        if not context.cert_store_stats()["x509"]:
            raise ValueError("no certificate in it")
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_ca_file {path}: not a PEM CA bundle: {exc}") from None
    return data


def _text(path: Path | None) -> str | None:
    """A path option as the device configuration stores it (absolute: the agent's working
    directory is not the one of 'peer init')."""
    return None if path is None else str(path.absolute())


def _update(args: argparse.Namespace) -> int:
    try:
        if args.seed_time_s is not None and args.seed_time_s < 0:
            raise ConfigError("--seed-time-s must be >= 0")

        def on_seeding(_: UpdateResult, seconds: float) -> None:
            print(f"updated; sharing the payload with peers for {seconds:.0f} s "
                  "(Ctrl-C to stop)", file=sys.stderr, flush=True)

        result = trio.run(partial(update_once, DeviceState(args.state),
                                  seed_time_s=args.seed_time_s, on_seeding=on_seeding))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TpmError as exc:  # update_once makes it a status; a last guard
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.status)
    except (OSError, MemoryError) as exc:  # update_once handles them; a last guard
        print(f"error: {resource_failure('peer update', exc)}", file=sys.stderr)
        return int(StatusCode.INSTALL_FAILED)
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        print(f"status {int(result.status)}: {result.message}")
        if result.deferred:
            print(f"  not attempted now (install policy): {result.deferred}")
        if result.attempted:
            print(f"  {result.download_mode or '-'} mode: bytes from origin "
                  f"{result.bytes_origin}, peers {result.bytes_peers}, metadata "
                  f"{result.bytes_metadata}, uploaded {result.bytes_uploaded}; chunks reused "
                  f"{result.chunks_reused}; reported: {'yes' if result.reported else 'no'}")
            if result.swarm_note:
                print(f"  swarm: {result.swarm_note}")
            if result.banned_peers:
                print(f"  banned peers: {', '.join(result.banned_peers)}")
            if result.dropped_peers:
                print(f"  dropped peers (silent): {', '.join(result.dropped_peers)}")
    return int(result.status)


def _run(args: argparse.Namespace) -> int:
    try:
        config = DaemonConfig(
            poll_interval_s=args.poll_interval_s, jitter_fraction=args.jitter_fraction,
            backoff_initial_s=args.backoff_initial_s, backoff_max_s=args.backoff_max_s,
            retry_budget=args.retry_budget, retry_window_s=args.retry_window_s,
            min_poll_after_s=args.min_poll_after_s, seed_time_s=args.seed_time_s)
        state = DeviceState(args.state)
        state.config()  # refuse an unusable state directory before starting
        bus = bus_address(args.dbus or "system")
        control = AgentControl(state)
        statuses: trio.MemorySendChannel[str]
        statuses, status_lines = trio.open_memory_channel[str](16)

        def on_result(result: UpdateResult, delay_s: float) -> None:
            line = f"status {int(result.status)}: {result.message}"
            print(f"{_now()} {line} (next pass in {delay_s:.0f} s)", flush=True)
            with contextlib.suppress(trio.WouldBlock):
                statuses.send_nowait(line)

        errors: list[ConfigError] = []

        async def main() -> None:
            notifier: SystemdNotifier | None = None
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for signum in signals:
                            print(f"{_now()} {signal.Signals(signum).name}: stopping",
                                  flush=True)
                            await service_stopping(notifier, "stopping")
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(stop_on_signal)
                if bus is not None:
                    try:
                        name = await nursery.start(serve_dbus, control, bus)
                        print(f"D-Bus: org.swarmota.Agent1 on the {args.dbus or 'system'} "
                              f"bus ({name})", flush=True)
                    except DBusUnavailable as exc:
                        if args.dbus is not None:  # asked for explicitly: exit 2
                            errors.append(exc)
                            nursery.cancel_scope.cancel()
                            return
                        log.warning("no local API: %s", exc)
                notifier = await service_ready(nursery, "running")
                if notifier is not None:
                    nursery.start_soon(_relay_status, notifier, status_lines)
                try:
                    await run_daemon(state, config, on_result=on_result, control=control)
                except ConfigError as exc:  # the device became unusable: say so, exit 2
                    errors.append(exc)
                    nursery.cancel_scope.cancel()

        trio.run(main)
        if errors:
            raise errors[0]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


async def _relay_status(notifier: SystemdNotifier,
                        lines: trio.MemoryReceiveChannel[str]) -> None:
    async for line in lines:
        await notifier.notify(f"STATUS={line.splitlines()[0][:200]}")


def _dbus_policy(args: argparse.Namespace) -> int:
    sys.stdout.write(policy_file())
    return 0


def _status(args: argparse.Namespace) -> int:
    state = DeviceState(args.state)
    try:
        config = state.config()
        bc = state.bootctl()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = state.last_result()
    progress = state.progress()
    try:
        journal: dict[str, Any] | None = state.journal().to_json()
    except JournalError as exc:
        journal = {"error": str(exc)}
    store = ComponentStore(state.root / "components")
    components = {name: store.record(name).to_json() for name in store.names()}
    # the floors in force: with a TPM, the higher of the disk's and the floor log's; a
    # TPM that fails or a log that does not verify is said (exit 2) after the rest
    floors_error: str | None = None
    try:
        floors: Floors | None = read_floors(state.root, bc, store)
        keystore = open_keystore(config, state.root)
        if keystore is not None and floors is not None:
            floors = keystore.floors.merged(floors)
    except (ConfigError, VerifyFailed, TpmError) as exc:
        floors, floors_error = None, str(exc)
        print(f"error: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps({"device": config.to_json(), "bootctl": bc.to_json(),
                          "last_result": last, "progress": progress, "journal": journal,
                          "components": components,
                          "floors": None if floors is None else {
                              "image": floors.image, "components": dict(floors.components)},
                          "floors_error": floors_error},
                         indent=2, sort_keys=True))
        return 0 if floors_error is None else 2
    print(f"device {config.device_id}  product {config.product}  hardware {config.hardware_id}")
    print(f"origin {config.origin_url}  tracker {config.tracker_url}")
    for slot in ("a", "b"):
        rec = bc.slot(slot)
        flags = [f for f, on in (("booted", slot == bc.primary),
                                 ("committed", slot == bc.committed)) if on]
        print(f"  slot {slot}: {rec.version or '(empty)':<16} counter {rec.release_counter:<6}"
              f" {' '.join(flags)}")
    if bc.pending:
        print(f"  update pending on slot {bc.primary}, tries left {bc.tries_remaining}")
    if floors is None:
        print(f"  anti-rollback floors: unknown ({floors_error})")
    else:
        print(f"  anti-rollback floor of images: release counter {floors.image}")
    for name, record in components.items():
        cur = record["current"]
        print(f"  component {name}: {cur['version'] if cur else '(none)'}"
              f"{'  (switch pending)' if record['pending'] else ''}, anti-rollback floor "
              f"{'unknown' if floors is None else floors.of(name)}")
    if journal and journal.get("phase", "idle") != "idle":
        print(f"update journal: {journal.get('phase', journal.get('error'))} "
              f"(to {journal.get('to_version')}); finished on the next start")
    if state.policy_path.exists():
        print(f"install policy: {state.policy_path}")
    if last:
        print(f"last result: status {last.get('status')}: {last.get('message')}"
              f"{_when(last.get('finished_at'))}")
        failure = last.get("last_failure")
        if isinstance(failure, dict) and failure.get("finished_at") != last.get("finished_at"):
            print(f"last failure: status {failure.get('status')}: {failure.get('message')}"
                  f"{_when(failure.get('finished_at'))}")
    else:
        print("last result: none")
    if progress:
        print(f"now: {_describe_progress(progress)}")
    return 0 if floors_error is None else 2


def _now() -> str:
    """The time now for daemon lines (UTC, ISO 8601, seconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(seconds: object) -> str:
    """`` (at <UTC time>)`` for seconds since the epoch; nothing for anything else."""
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        return f" (at {datetime.fromtimestamp(seconds, UTC):%Y-%m-%d %H:%M:%S} UTC)"
    return ""


def _describe_progress(p: dict[str, Any]) -> str:
    if p.get("phase") == "seeding":
        return (f"seeding {p.get('payload')}: {p.get('bytes_uploaded')} bytes uploaded to "
                f"{p.get('peers')} peers, {p.get('seconds_left')} s left")
    done = p.get("chunks_done", p.get("chunks_done_this_run"))
    return (f"downloading {p.get('kind')} payload {p.get('payload')} ({p.get('mode')} mode): "
            f"{done}/{p.get('chunks_total')} chunks, {p.get('bytes_peers')} bytes from "
            f"{p.get('peers')} peers, {p.get('bytes_origin')} from the origin")
