"""``swarmota tracker ...``: run the tracker and manage its release catalogue.

    swarmota tracker serve --db PATH|URL (--device-ca FILE | --allow-unauthenticated-devices)
        [--redis URL] [--listen HOST:PORT] [--tls-cert F --tls-key F]
        [--announce-listen HOST:PORT] [--poll-after-s N]
    swarmota tracker release add --db PATH MANIFEST_FILE
    swarmota tracker release list --db PATH
    swarmota tracker reports --db PATH [--device ID]
    swarmota tracker devices --db PATH
    swarmota tracker backup --db PATH FILE [--overwrite]
    swarmota tracker restore --db PATH FILE [--force]
    swarmota tracker admin token create --db PATH --role ROLE --name NAME [--expires-in-s N]
    swarmota tracker admin [--url URL] [--token T] [--ca-file F] releases | fleet | audit
    swarmota tracker admin [--url URL] [--token T] rollout list
    swarmota tracker admin [--url URL] [--token T] rollout show PRODUCT VERSION
    swarmota tracker admin [--url URL] [--token T] rollout create PRODUCT VERSION [plan]
    swarmota tracker admin [--url URL] [--token T] rollout pause|resume|abort|force|revoke
        PRODUCT VERSION
    swarmota tracker device [--url URL] [--token T] [--ca-file F] revoke DEVICE_ID
        [--cert PEM ...] [--reason TEXT]
    swarmota tracker device [--url URL] [--token T] [--ca-file F] revocations

The admin API commands read the token from ``--token`` or ``$SWARMOTA_TRACKER_TOKEN``
and print the tracker's JSON answer.

Every leaf command sets ``func(args) -> int``. Exit codes: 0 success, 1 runtime failure
(storage, address in use, release conflict, an admin API error such as 401/403/409),
2 bad input (unreadable or invalid manifest file, invalid plan, an unreadable fleet CA
file, a ``--cert`` that is unreadable or of another device, ``serve`` without
``--device-ca`` or ``--allow-unauthenticated-devices``; argparse
uses 2 for bad arguments too).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from infra.deviceauth import DeviceAuthError, read_certificates
from infra.http_serve import ListenConfig, parse_listen
from manifest import MAX_MANIFEST_BYTES, ManifestFormatError, parse_release_manifest
from tracker.admin import ROLES, TOKEN_NAME_RE, hash_token, new_token
from tracker.admin_client import AdminClient
from tracker.backup import BackupInfo, backup_database, restore_database
from tracker.catalogue import register_release
from tracker.config import DEFAULT_POLL_AFTER_S, TrackerConfig
from tracker.errors import (
    AdminApiError,
    ConfigError,
    ConflictError,
    RequestError,
    StorageError,
)
from tracker.identity import load_fleet_trust
from tracker.protocol import Release
from tracker.proxies import TrustedProxies
from tracker.rollout import ACTIONS, RolloutPlan
from tracker.server import serve_tracker_endpoints
from tracker.store import (
    AuditEntry,
    Store,
    TokenRecord,
    is_postgresql_url,
    open_store,
    redact_url,
    sqlite_path,
)
from tracker.wire import DEVICE_ID_RE, MAX_POLL_AFTER_S, MIN_POLL_AFTER_S, STATUS_NAMES

__all__ = ["DEFAULT_LISTEN", "add_parser"]

DEFAULT_LISTEN = "127.0.0.1:8470"

log = logging.getLogger(__name__)
_MAX_CERT_FILE_BYTES = 64 * 1024


def add_parser(subparsers: Any) -> None:
    """Add the ``tracker`` command tree to the ``swarmota`` subparsers."""
    tracker = subparsers.add_parser(
        "tracker",
        help="run the tracker: device check-ins, offers, reports",
        description="The tracker tells devices which release to install and stores "
                    "their reports. It is not trusted for integrity: devices verify "
                    "every release against signed metadata.",
    )
    tracker_sub = tracker.add_subparsers(dest="tracker_command", metavar="COMMAND",
                                         required=True)

    serve = tracker_sub.add_parser(
        "serve",
        help="serve the device API over HTTP",
        description="Serve POST /v1/checkin, POST /v1/report and GET /v1/health, and "
                    "the BitTorrent tracker (GET /announce, GET /scrape) for the swarms "
                    "of registered releases, until interrupted (Ctrl-C). Say how devices "
                    "authenticate: --device-ca (production: every device request must be "
                    "signed by a fleet identity, replays refused) or "
                    "--allow-unauthenticated-devices (lab mode); one of the two is "
                    "required.",
    )
    _add_db(serve, "created if it does not exist")
    serve.add_argument("--listen", metavar="HOST:PORT", type=_listen_arg,
                       default=_listen_arg(DEFAULT_LISTEN),
                       help=f"address to listen on (default {DEFAULT_LISTEN}; IPv6 as "
                            "[::1]:PORT; port 0 picks a free port)")
    serve.add_argument("--tls-cert", metavar="FILE", type=Path, default=None,
                       help="PEM certificate (chain): serve HTTPS (needs --tls-key); "
                            "bearer tokens of the admin API should only travel over it")
    serve.add_argument("--tls-key", metavar="FILE", type=Path, default=None,
                       help="PEM private key of --tls-cert")
    serve.add_argument("--announce-listen", metavar="HOST:PORT", type=_listen_arg,
                       default=None,
                       help="also serve GET /announce and GET /scrape on this address "
                            "with the lean BitTorrent endpoint (several times the "
                            "announces/s of --listen; HTTPS too with --tls-cert); "
                            "publish its URL + /announce as --announce-url. Default: "
                            "off (--listen serves announces either way)")
    auth = serve.add_mutually_exclusive_group()
    auth.add_argument("--device-ca", metavar="FILE", type=Path, default=None,
                      help="PEM file with the fleet CA certificate(s) (several during a "
                           "CA rotation): every check-in, report, announce and scrape "
                           "must then be signed by a device or seeder identity that CA "
                           "issued (swarmota-device-cert and swarmota-signature "
                           "headers); unsigned, forged, expired, another device's or "
                           "replayed requests are refused (HTTP 401, or a BitTorrent "
                           "failure reason: outsiders learn no peers)")
    auth.add_argument("--allow-unauthenticated-devices", action="store_true",
                      help="lab mode: accept device requests without checking who sent "
                           "them (anyone may check in, report, and, claiming to be a "
                           "seed, learn a swarm's peers); for tests and demos only")
    serve.add_argument("--trusted-proxy", metavar="CIDR", action="append", default=[],
                       help="a reverse proxy in front of the tracker (repeat for several; "
                            "e.g. 127.0.0.1/32 for an nginx on this host): its Forwarded / "
                            "X-Forwarded-For headers give the peer address handed out in "
                            "swarms. Nobody else's such headers are believed")
    serve.add_argument("--poll-after-s", metavar="N", type=_poll_arg,
                       default=DEFAULT_POLL_AFTER_S,
                       help="seconds devices should wait between check-ins "
                            f"(default {DEFAULT_POLL_AFTER_S})")
    serve.add_argument("--redis", metavar="URL", default=None,
                       help="Redis (redis://HOST:PORT/DB, rediss://..., unix:///PATH) for "
                            "the swarms' peers and the announce replay windows, shared by "
                            "every tracker process (run several behind a load balancer "
                            "with --db postgresql://...); default: this process's memory")
    serve.set_defaults(func=cmd_serve)

    release = tracker_sub.add_parser(
        "release",
        help="manage the release catalogue",
        description="Register releases that the tracker may offer, and list them.",
    )
    release_sub = release.add_subparsers(dest="release_command", metavar="COMMAND",
                                         required=True)
    add = release_sub.add_parser(
        "add",
        help="register a release from its release manifest file",
        description="Read a release manifest (the JSON file 'swarmota seeder publish' "
                    "writes under origin/targets/releases/) and register its product, "
                    "version and release counter. Devices of that product with a lower "
                    "counter are offered the newest registered release at their next "
                    "check-in. The BitTorrent v2 info-hash of each payload (if the "
                    "manifest names one) is registered too: the tracker's /announce "
                    "serves those swarms. "
                    "Adding the same release again does nothing; a different "
                    "release with the same version or counter is refused. Works while "
                    "the server runs.",
    )
    _add_db(add, "created if it does not exist")
    add.add_argument("--rollout", choices=("staged", "all", "none"), default="staged",
                     help="start its rollout: 'staged' (default): the canary devices "
                          "(--canary), then 1%%, 10%%, 50%%, 100%% of the fleet "
                          "(--stages), each after a soak time (--soak-s) and enough "
                          "successes, halting by itself on failures; 'all': every "
                          "device at once (auto-halt still on); 'none': register only "
                          "(offered to nobody until a rollout is created)")
    add.add_argument("--canary", metavar="DEVICE_ID", action="append", type=_device_arg,
                     default=[], help="a canary device (repeat for several)")
    add.add_argument("--canary-label", metavar="LABEL", default=None,
                     help="devices declaring this label at check-in are canaries too")
    add.add_argument("--stages", metavar="P1,P2,...", type=_stages_arg,
                     default=RolloutPlan().stages_percent,
                     help="stage percentages, increasing, ending at 100 (default 1,10,50,100)")
    add.add_argument("--soak-s", metavar="S", type=float, default=RolloutPlan().soak_s,
                     help=f"seconds each stage runs at least (default {RolloutPlan().soak_s:g})")
    add.add_argument("manifest", metavar="MANIFEST_FILE", type=Path,
                     help="release manifest JSON file")
    add.set_defaults(func=cmd_release_add)

    listing = release_sub.add_parser(
        "list", help="list registered releases",
        description="List registered releases by product and release counter, with "
                    "the v2 info-hashes of their payloads' swarms (clients announce the "
                    "first 20 bytes).")
    _add_db(listing, "must exist")
    listing.set_defaults(func=cmd_release_list)

    reports = tracker_sub.add_parser(
        "reports", help="list update reports sent by devices",
        description="List the reports devices sent after update attempts, oldest first.")
    _add_db(reports, "must exist")
    reports.add_argument("--device", metavar="ID", type=_device_arg,
                         help="only reports of this device id")
    reports.set_defaults(func=cmd_reports)

    devices = tracker_sub.add_parser(
        "devices", help="list devices and what they ran at their last check-in",
        description="List every device that checked in, with its product, hardware, "
                    "version, release counter and last check-in time.")
    _add_db(devices, "must exist")
    devices.set_defaults(func=cmd_devices)

    backup = tracker_sub.add_parser(
        "backup", help="consistent copy of the live database",
        description="Copy the database to FILE while the tracker runs (SQLite online "
                    "backup: one consistent snapshot), checked and written atomically. "
                    "See docs/SECURITY.md, 'Backups'.")
    _add_db(backup, "the live database; the tracker may keep running; PostgreSQL: "
                    "use pg_dump", sqlite_only=True)
    backup.add_argument("out", metavar="FILE", type=Path)
    backup.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    backup.set_defaults(func=cmd_backup)
    restore = tracker_sub.add_parser(
        "restore", help="put a backup in place of the database",
        description="Check FILE and put it in place of --db. Refused while a tracker has "
                    "the database open (stop it first) and, without --force, when the "
                    "database already holds data.")
    _add_db(restore, "created, or replaced", sqlite_only=True)
    restore.add_argument("backup", metavar="FILE", type=Path)
    restore.add_argument("--force", action="store_true",
                         help="replace a database that holds data")
    restore.set_defaults(func=cmd_restore)

    _add_admin_parser(tracker_sub)
    _add_device_parser(tracker_sub)


def _add_admin_parser(tracker_sub: Any) -> None:
    admin = tracker_sub.add_parser(
        "admin", help="the control plane: tokens, rollouts, fleet status, audit",
        description="Create admin tokens (directly in the database), and call the "
                    "tracker's admin API: list releases, create and steer rollouts, show "
                    "fleet status and the audit log. Roles: viewer (read), operator "
                    "(create, pause, resume, abort, force), admin (revoke, audit).")
    _add_api_args(admin)
    admin_sub = admin.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)

    token = admin_sub.add_parser("token", help="manage admin tokens")
    token_sub = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = token_sub.add_parser(
        "create", help="create a token and print it once",
        description="Create a bearer token with a role. Only its SHA-256 is stored: the "
                    "token is printed once and cannot be shown again.")
    _add_db(create, "created if it does not exist")
    create.add_argument("--role", choices=ROLES, required=True)
    create.add_argument("--name", required=True, type=_token_name_arg,
                        help="who holds it (shown in the audit log)")
    create.add_argument("--expires-in-s", type=float, default=None, metavar="S",
                        help="expire after S seconds (default: never)")
    create.set_defaults(func=cmd_token_create)

    for name, what in (("releases", "registered releases and their rollout phase"),
                       ("fleet", "devices per version, reports per status, bytes saved"),
                       ("audit", "the audit log (admin role)")):
        leaf = admin_sub.add_parser(name, help=f"show {what}")
        leaf.set_defaults(func=functools.partial(_cmd_api, "GET", name, None))

    rollout = admin_sub.add_parser("rollout", help="create, show and steer rollouts")
    rollout_sub = rollout.add_subparsers(dest="rollout_command", metavar="COMMAND",
                                         required=True)
    listing = rollout_sub.add_parser("list", help="every rollout with per-stage counters")
    listing.set_defaults(func=functools.partial(_cmd_api, "GET", "rollouts", None))
    show = rollout_sub.add_parser("show", help="one rollout with per-stage counters")
    _add_release_args(show)
    show.set_defaults(func=lambda args: _cmd_api(
        "GET", f"rollouts/{args.product}/{args.version}", None, args))
    new = rollout_sub.add_parser(
        "create", help="start the rollout of a registered release",
        description="Start a rollout: canaries first (--canary), then percentage stages "
                    "(--stages), each advancing after --soak-s seconds with at least "
                    "--min-successes successes; halts by itself on failures. --everyone "
                    "offers it to every device at once.")
    _add_release_args(new)
    new.add_argument("--everyone", action="store_true",
                     help="one stage of 100%% (auto-halt stays on)")
    new.add_argument("--canary", metavar="DEVICE_ID", action="append", type=_device_arg,
                     default=[], help="a canary device (repeat for several)")
    new.add_argument("--canary-label", metavar="LABEL", default=None,
                     help="devices declaring this label at check-in are canaries too")
    new.add_argument("--stages", metavar="P1,P2,...", type=_stages_arg, default=None,
                     help="stage percentages ending at 100 (default 1,10,50,100)")
    new.add_argument("--soak-s", metavar="S", type=float, default=None)
    new.add_argument("--min-successes", metavar="N", type=int, default=None)
    new.add_argument("--max-in-flight", metavar="N", type=int, default=None,
                     help="devices at most offered or downloading at once (0: no cap)")
    new.set_defaults(func=cmd_rollout_create)
    for action in ACTIONS:
        leaf = rollout_sub.add_parser(action, help=f"{action} a rollout"
                                      + (" (admin role)" if action == "revoke" else ""))
        _add_release_args(leaf)
        leaf.set_defaults(func=functools.partial(_cmd_action, action))


def _add_device_parser(tracker_sub: Any) -> None:
    device = tracker_sub.add_parser(
        "device", help="revoke a device's identity (a stolen key) through the admin API",
        description="Revoke the fleet certificates of a device whose key was stolen or "
                    "leaked, and list revocations. The tracker then refuses every "
                    "request signed with them: check-ins, reports, announces and scrapes "
                    "(HTTP 401 or a BitTorrent failure reason, metric reason 'revoked').")
    _add_api_args(device)
    device_sub = device.add_subparsers(dest="device_command", metavar="COMMAND",
                                       required=True)
    revoke = device_sub.add_parser(
        "revoke", help="revoke every certificate of a device (admin role)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Revoke DEVICE_ID's fleet certificates: every certificate the tracker
saw the device sign a request with (check-in, report or announce), plus
each --cert file given (needed for a certificate never used with the
tracker, or for a device the tracker has not seen). The tracker
refuses them on every device request at once, and every other tracker
process on the same database within its revocation refresh interval
(5 s by default). Audited as device.revoke. A certificate is revoked, not
the device id: a new certificate for DEVICE_ID is accepted.

Re-provision the device with a NEW KEY. 'swarmota tls device-cert'
keeps an existing DIR/key.pem (re-issuing keeps the identity key), and a
certificate is no secret: a new certificate for the stolen key would let
the thief sign with it again. So delete (or move away) the old
DIR/key.pem first, so that a new key is generated, then install the new
pair on the device (its provisioning; --force on a provisioned one):

  swarmota tls device-cert DIR --ca CA_DIR --device-id DEVICE_ID
  swarmota peer init ... --identity-cert DIR/cert.pem --identity-key DIR/key.pem

Exit codes: 0 revoked; 1 the tracker refused (401/403 token, 404 no
certificate of DEVICE_ID known and no --cert, 400 a certificate of
another device) or cannot be reached; 2 bad arguments, an unreadable
--cert file or one naming another device.""")
    revoke.add_argument("device_id", metavar="DEVICE_ID", type=_device_arg)
    revoke.add_argument("--cert", metavar="PEM", type=Path, action="append", default=[],
                        help="a certificate file of this device to revoke too (repeat "
                             "for several)")
    revoke.add_argument("--reason", metavar="TEXT", default="",
                        help="why (stored with the revocation and in the audit log)")
    revoke.set_defaults(func=cmd_device_revoke)
    listing = device_sub.add_parser(
        "revocations", help="list revoked certificates (viewer role)",
        description="Every revoked certificate: fingerprint (SHA-256 of the DER), device, "
                    "when, by whom and why.")
    listing.set_defaults(func=functools.partial(_cmd_api, "GET", "revocations", None))


def _add_api_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=f"http://{DEFAULT_LISTEN}",
                        help=f"tracker base URL (default http://{DEFAULT_LISTEN})")
    parser.add_argument("--token", default=None,
                        help="bearer token (default: $SWARMOTA_TRACKER_TOKEN)")
    parser.add_argument("--ca-file", metavar="FILE", default=None,
                        help="PEM certificates to trust for an https tracker (default: "
                             "the system's)")


def _add_release_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("product")
    parser.add_argument("version")


# --- commands ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the tracker until Ctrl-C; 0 after a clean stop, 1 if it cannot start."""
    host, port = args.listen
    if args.device_ca is None and not args.allow_unauthenticated_devices:
        print("error: say how devices authenticate: --device-ca FILE (the fleet CA: "
              "devices must sign their requests) or --allow-unauthenticated-devices "
              "(lab mode: anyone may check in, report and announce)", file=sys.stderr)
        return 2
    try:
        certfile, keyfile = _tls_files(args.tls_cert, args.tls_key)
        if args.device_ca is not None:
            load_fleet_trust(args.device_ca)  # a bad file fails now, with exit code 2
        TrustedProxies(args.trusted_proxy)
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(args.db, Path) and not args.db.parent.is_dir():
        print(f"error: the database's directory {args.db.parent} does not exist (create "
              "it first: a typo in --db must not make a new tracker elsewhere)",
              file=sys.stderr)
        return 2
    if args.allow_unauthenticated_devices:
        log.warning("lab mode (--allow-unauthenticated-devices): device requests are not "
                    "authenticated; anyone who can reach the tracker may check in, report "
                    "and learn the swarms' peers")
    postgresql = is_postgresql_url(args.db)
    config = TrackerConfig(db_path=None if postgresql else Path(args.db),
                           db_url=str(args.db) if postgresql else None,
                           redis_url=args.redis,
                           listen=ListenConfig(host=host, port=port, certfile=certfile,
                                               keyfile=keyfile),
                           poll_after_s=args.poll_after_s,
                           announce_listen=args.announce_listen,
                           device_ca=args.device_ca,
                           trusted_proxies=tuple(args.trusted_proxy))

    async def main() -> None:
        # SIGINT and SIGTERM stop it cleanly, also when started in the background (a
        # shell's '&' leaves SIGINT ignored; a service manager sends SIGTERM)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(functools.partial(serve_tracker_endpoints,
                                                             config))
                database = redact_url(str(config.database))
                print(f"tracker listening on {urls.api} (database {database}); "
                      "Ctrl-C to stop", flush=True)
                if urls.announce is not None:
                    print(f"lean BitTorrent endpoint on {urls.announce}: announce URL "
                          f"{urls.announce}/announce", flush=True)
                async for signum in signals:
                    print(f"tracker stopping ({signal.Signals(signum).name})",
                          file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except KeyboardInterrupt:
        print("tracker stopped", file=sys.stderr)
        return 0
    except BaseExceptionGroup as group:
        _, rest = group.split(KeyboardInterrupt)
        if rest is None:
            print("tracker stopped", file=sys.stderr)
            return 0
        failure = _first_expected(rest)
        if failure is None:
            raise
        print(f"error: cannot run the tracker: {failure}", file=sys.stderr)
        return 1
    except (StorageError, ConfigError, OSError) as exc:
        print(f"error: cannot run the tracker: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_release_add(args: argparse.Namespace) -> int:
    """Register the release described by a manifest file."""
    path: Path = args.manifest
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        print(f"error: cannot read manifest {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        manifest = parse_release_manifest(data)
        release = Release.from_manifest(manifest)
    except (ManifestFormatError, RequestError) as exc:
        print(f"error: {path} is not a valid release manifest: {exc}", file=sys.stderr)
        return 2
    try:
        plan = None
        if args.rollout == "all":
            plan = RolloutPlan.everyone()
        elif args.rollout == "staged":
            plan = RolloutPlan(canary_devices=tuple(args.canary),
                               canary_label=args.canary_label,
                               stages_percent=args.stages, soak_s=args.soak_s)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with open_store(args.db) as store:
            added, rollout = register_release(store, release, plan)
    except (StorageError, ConflictError) as exc:  # ReleaseConflictError says what clashes
        print(f"error: {exc}", file=sys.stderr)
        return 1
    what = "added" if added else "already registered:"
    print(f"{what} {release.product} {release.version} (release counter "
          f"{release.release_counter}, target {release.target})")
    for swarm in release.swarms:
        print(f"  swarm {swarm.payload_kind}: info-hash {swarm.info_hash} "
              f"(announced as {swarm.announce_hash.hex()})")
    if rollout is None:
        print("no rollout: offered to nobody until one is created")
    elif rollout.plan == RolloutPlan.everyone():
        print("rollout: every device at once")
    else:
        names = rollout.plan.stage_names[0 if rollout.plan.has_canaries else 1:]
        print(f"rollout {rollout.rollout_id}: {rollout.phase} at stage {rollout.stage_name} "
              f"of {', '.join(names)}")
    return 0


def cmd_release_list(args: argparse.Namespace) -> int:
    """Print the release catalogue as a table."""
    def rows(store: Store) -> list[list[str]]:
        return [[release.product, release.version, str(release.release_counter),
                 release.target, _when(added_at),
                 " ".join(f"{s.payload_kind}:{s.info_hash}" for s in release.swarms) or "-"]
                for release, added_at in store.registered_releases()]

    return _print_table(args.db, ["PRODUCT", "VERSION", "COUNTER", "TARGET", "ADDED (UTC)",
                                  "INFO-HASHES (v2, SHA-256)"],
                        rows, "no releases registered")


def cmd_reports(args: argparse.Namespace) -> int:
    """Print stored reports as a table."""
    def rows(store: Store) -> list[list[str]]:
        out = []
        for stored in store.reports(args.device):
            r = stored
            out.append([
                str(stored.report_id), _when(stored.received_at), r.device_id, r.product,
                r.from_version, r.to_version,
                f"{r.status} {STATUS_NAMES.get(r.status, '?')}",
                str(r.bytes_origin), str(r.bytes_peers),
                " ".join(f"{k}={v:.3g}" for k, v in sorted(r.timings_s.items())),
                _printable(r.message, 60),
            ])
        return out

    empty = "no reports" + (f" from device {args.device}" if args.device else "")
    return _print_table(args.db, ["ID", "RECEIVED (UTC)", "DEVICE", "PRODUCT", "FROM", "TO",
                                  "STATUS", "BYTES_ORIGIN", "BYTES_PEERS", "TIMINGS_S",
                                  "MESSAGE"], rows, empty)


def cmd_devices(args: argparse.Namespace) -> int:
    """Print known devices as a table."""
    def rows(store: Store) -> list[list[str]]:
        return [[d.device_id, d.product, d.hardware_id, d.version, str(d.release_counter),
                 _when(d.last_seen)] for d in store.devices()]

    return _print_table(args.db, ["DEVICE", "PRODUCT", "HARDWARE", "VERSION", "COUNTER",
                                  "LAST SEEN (UTC)"], rows, "no devices have checked in")


def cmd_backup(args: argparse.Namespace) -> int:
    """Back the database up (tracker.backup)."""
    return _backup_step(f"backed up {args.db} to",
                        lambda: backup_database(args.db, args.out, overwrite=args.overwrite))


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore a backup into the database (tracker.backup)."""
    return _backup_step(f"restored {args.backup} into",
                        lambda: restore_database(args.backup, args.db, force=args.force))


def _backup_step(done: str, step: Callable[[], BackupInfo]) -> int:
    try:
        info = step()
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{done} {info.summary()}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    """Create a token in the database and print it once."""
    token = new_token()
    now = time.time()
    expires_at = None if args.expires_in_s is None else now + args.expires_in_s
    try:
        with open_store(args.db) as store:
            store.add_token(TokenRecord(hash_token(token), args.name, args.role, now,
                                        expires_at))
            store.add_audit([AuditEntry(now, "cli", "token.create", args.name, "ok",
                                        f"role {args.role}")])
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(token)
    print(f"(role {args.role} for {args.name}; only its hash is stored: keep it now)",
          file=sys.stderr)
    return 0


def cmd_rollout_create(args: argparse.Namespace) -> int:
    """POST a new rollout."""
    plan: dict[str, Any] | str
    if args.everyone:
        plan = "everyone"
    else:
        plan = {"canary_devices": list(args.canary), "canary_label": args.canary_label}
        for key, value in (("stages_percent", args.stages), ("soak_s", args.soak_s),
                           ("min_successes", args.min_successes),
                           ("max_in_flight", args.max_in_flight)):
            if value is not None:
                plan[key] = list(value) if key == "stages_percent" else value
        try:
            RolloutPlan.from_json(plan)
        except RequestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return _cmd_api("POST", "rollouts", {"product": args.product, "version": args.version,
                                         "plan": plan}, args)


def cmd_device_revoke(args: argparse.Namespace) -> int:
    """POST a device revocation with the certificate files given."""
    pems = []
    for path in args.cert:
        try:
            with path.open("rb") as fh:
                pem = fh.read(_MAX_CERT_FILE_BYTES + 1)
        except OSError as exc:
            print(f"error: cannot read certificate {path}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        try:
            if len(pem) > _MAX_CERT_FILE_BYTES:
                raise DeviceAuthError(f"larger than {_MAX_CERT_FILE_BYTES} bytes")
            names = {c.device_id for c in read_certificates(pem)}
        except DeviceAuthError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        if names != {args.device_id}:
            print(f"error: {path} is a certificate of {', '.join(sorted(names))}, not of "
                  f"{args.device_id}", file=sys.stderr)
            return 2
        pems.append(pem.decode("ascii", errors="replace"))
    body = {"reason": args.reason, "certificates": pems}
    rc = _cmd_api("POST", f"devices/{args.device_id}/revoke", body, args)
    if rc == 0:
        print(f"revoked: re-provision {args.device_id} with a new key and certificate "
              "(see 'swarmota tracker device revoke --help')", file=sys.stderr)
    return rc


def _cmd_action(action: str, args: argparse.Namespace) -> int:
    return _cmd_api("POST", f"rollouts/{args.product}/{args.version}/{action}", None, args)


def _cmd_api(method: str, path: str, body: Any, args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("SWARMOTA_TRACKER_TOKEN")
    if not token:
        print("error: no token: pass --token or set SWARMOTA_TRACKER_TOKEN",
              file=sys.stderr)
        return 2
    try:
        with AdminClient(args.url, token, ca_file=args.ca_file) as client:
            answer = client.get(path) if method == "GET" else client.post(path, body)
    except AdminApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2, sort_keys=True))
    return 0


# --- helpers ----------------------------------------------------------------------------


def _tls_files(cert: Path | None, key: Path | None) -> tuple[str | None, str | None]:
    """``(certfile, keyfile)`` for :class:`ListenConfig`, checked before serving.

    Raises:
        ValueError: only one of the two given, or not a readable PEM certificate and
            its private key.
    """
    if cert is None and key is None:
        return None, None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key go together: give both (HTTPS) or "
                         "neither (plain HTTP)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: not a readable PEM "
                         f"certificate and its private key ({exc})") from None
    return str(cert), str(key)


def _token_name_arg(text: str) -> str:
    if not TOKEN_NAME_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid name {text!r}: 1-64 chars of "
                                         "A-Z a-z 0-9 . _ @ -")
    return text


def _add_db(parser: argparse.ArgumentParser, note: str, *, sqlite_only: bool = False) -> None:
    if sqlite_only:
        parser.add_argument("--db", metavar="PATH", type=_sqlite_arg, required=True,
                            help=f"tracker SQLite database file ({note})")
        return
    parser.add_argument("--db", metavar="PATH|URL", type=_db_arg, required=True,
                        help=f"tracker database: an SQLite file or sqlite:///PATH ({note}), "
                             "or postgresql://USER@HOST/DBNAME (the database must exist; "
                             "its tables are created)")


def _db_arg(text: str) -> str | Path:
    if is_postgresql_url(text):
        return text
    return _sqlite_arg(text)


def _sqlite_arg(text: str) -> Path:
    try:
        return sqlite_path(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_arg(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _poll_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not MIN_POLL_AFTER_S <= value <= MAX_POLL_AFTER_S:
        raise argparse.ArgumentTypeError(f"{value} outside {MIN_POLL_AFTER_S}.."
                                         f"{MAX_POLL_AFTER_S} (a fleet told to come back "
                                         "at once would poll in a loop)")
    return value


def _stages_arg(text: str) -> tuple[float, ...]:
    try:
        stages = tuple(float(p) for p in text.split(","))
        RolloutPlan(stages_percent=stages)
    except (ValueError, RequestError) as exc:
        raise argparse.ArgumentTypeError(f"bad stages {text!r}: {exc}") from None
    return stages


def _device_arg(text: str) -> str:
    if not DEVICE_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid device id {text!r}")
    return text


def _first_expected(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first StorageError/ConfigError/OSError in a (nested) group, if that is all
    it holds."""
    matched, rest = group.split((StorageError, ConfigError, OSError))
    if matched is None or rest is not None:
        return None
    exc: BaseException = matched
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _print_table(db: str | Path, header: Sequence[str],
                 rows_of: Callable[[Store], list[list[str]]], empty: str) -> int:
    try:
        with open_store(db, create=False) as store:
            rows = rows_of(store)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not rows:
        print(empty)
        return 0
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in [list(header), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _when(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _printable(text: str, limit: int) -> str:
    """One line of at most ``limit`` chars, control characters escaped (untrusted text)."""
    cleaned = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
