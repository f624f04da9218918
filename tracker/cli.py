"""``swarmota tracker ...``: run the tracker, and operate a fleet through its admin API.

On the tracker's host (the database file)::

    swarmota tracker serve --db PATH|URL (--device-ca FILE | --allow-unauthenticated-devices)
        [--redis URL] [--listen HOST:PORT] [--tls-cert F --tls-key F]
        [--announce-listen HOST:PORT] [--poll-after-s N] [--trusted-proxy CIDR ...]
        [--repository-root ROOT.json --origin-url URL [--origin-ca-file F]]
    swarmota tracker admin token create --db PATH|URL --role ROLE --name NAME [--expires-in-s N]
    swarmota tracker backup --db PATH FILE [--overwrite]
    swarmota tracker restore --db PATH FILE [--force]

Anywhere, through the admin API (each takes ``--url``, ``--ca-file``, ``--token``,
``--client-config`` (:mod:`tracker.client_cli`: environment variables and a client config
file stand in for them) and ``--json``, which prints the API's JSON instead of tables)::

    swarmota tracker release add MANIFEST_FILE|MANIFEST_URL [--no-rollout | --everyone |
        plan options]
    swarmota tracker release list [--product P]
    swarmota tracker release show PRODUCT VERSION
    swarmota tracker rollout create PRODUCT VERSION [--everyone | plan options]
    swarmota tracker rollout list [--product P] [--history]
    swarmota tracker rollout show|devices|watch ROLLOUT_ID | PRODUCT VERSION
    swarmota tracker rollout pause|resume|advance|abort|force|revoke ROLLOUT_ID | PRODUCT VERSION
    swarmota tracker devices [filters] [--limit N] [--after ID | --all]
    swarmota tracker device show|tag|revoke DEVICE_ID ... | device revocations
    swarmota tracker reports [filters]
    swarmota tracker fleet | audit [--since TIME] | whoami

Plan options: :func:`tracker.client_cli.add_plan_options`. Output: human tables (times
in the local time zone, bytes readable, untrusted text escaped: :mod:`tracker.render`).

Every leaf command sets ``func(args) -> int``. Exit codes: 0 success; 1 the tracker
refused (HTTP 400, 401, 403, 404, 409, ...) or cannot be reached, or a runtime failure
of serve, backup, restore and token create (storage, address in use); 2 bad input
(arguments, an unreadable or invalid manifest, plan file or client config file, no
token, an unreadable fleet CA or ``--cert`` file; argparse uses 2 too). ``rollout
watch`` ends with 0 completed, 3 halted, 4 aborted, 5 revoked, 6 ``--max-s`` ran out
(:mod:`tracker.watch`), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

import trio

from swarmota.infra.deviceauth import DeviceAuthError, read_certificates
from swarmota.infra.http_serve import ListenConfig, listen_arg
from swarmota.infra.sdnotify import service_ready, service_stopping
from swarmota.manifest import MAX_MANIFEST_BYTES, ManifestFormatError, parse_release_manifest
from swarmota.tracker.admin import ROLES, TOKEN_NAME_RE, hash_token, new_token
from swarmota.tracker.admin_client import AdminClient
from swarmota.tracker.backup import BackupInfo, backup_database, restore_database
from swarmota.tracker.client_cli import (
    add_client_options,
    add_plan_options,
    device_arg,
    open_client,
    plan_from_args,
    register_releases,
    time_arg,
)
from swarmota.tracker.config import DEFAULT_POLL_AFTER_S, TrackerConfig
from swarmota.tracker.errors import (
    AdminApiError,
    ConfigError,
    RequestError,
    StorageError,
)
from swarmota.tracker.identity import load_fleet_trust
from swarmota.tracker.proxies import TrustedProxies
from swarmota.tracker.render import (
    escape,
    render_audit,
    render_device,
    render_devices,
    render_fleet,
    render_registration,
    render_release,
    render_releases,
    render_reports,
    render_revocations,
    render_rollout,
    render_rollout_devices,
    render_rollouts,
)
from swarmota.tracker.rollout import ACTIONS, DEVICE_STATUSES, PHASES
from swarmota.tracker.server import serve_tracker_endpoints
from swarmota.tracker.store import (
    MAX_PAGE,
    AuditEntry,
    TokenRecord,
    is_postgresql_url,
    open_store,
    redact_url,
    sqlite_path,
)
from swarmota.tracker.watch import END_PHASES, EXIT_TIMEOUT, WatchConfig, watch
from swarmota.tracker.wire import MAX_POLL_AFTER_S, MIN_POLL_AFTER_S, STATUS_NAMES

__all__ = ["DEFAULT_LISTEN", "add_parser"]

DEFAULT_LISTEN = "127.0.0.1:8470"

log = logging.getLogger(__name__)
_MAX_CERT_FILE_BYTES = 64 * 1024
_MAX_PAGES: Final = 10_000
"""Pages ``--all`` follows at most (ten million devices at the largest page)."""
_EXIT_REFUSED, _EXIT_BAD_INPUT, _EXIT_INTERRUPTED = 1, 2, 130

Json = Mapping[str, Any]
Renderer = Callable[[Json], list[str]]


class _Refused(Exception):
    """The request cannot be made as asked (exit 1), e.g. an action on a rollout that is
    no longer its release's current one."""


# --- the command tree ------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Add the ``tracker`` command tree to the ``swarmota`` subparsers."""
    tracker = subparsers.add_parser(
        "tracker",
        help="run the tracker; releases, rollouts, devices and reports through its API",
        description="The tracker tells devices which release to install and stores "
                    "their reports. It is not trusted for integrity: devices verify "
                    "every release against signed metadata. 'serve', 'backup', "
                    "'restore' and 'admin token create' work on its database; every "
                    "other command goes through the admin API (--url, --token, "
                    "--ca-file, or SWARMOTA_TRACKER_URL, SWARMOTA_TRACKER_TOKEN, "
                    "SWARMOTA_TRACKER_CA_FILE, or ~/.config/swarmota/client.toml). "
                    "Walkthrough: docs/OPERATIONS-CLI.md.",
    )
    sub = tracker.add_subparsers(dest="tracker_command", metavar="COMMAND", required=True)
    _add_serve_parser(sub)
    _add_release_parser(sub)
    _add_rollout_parser(sub)
    _add_device_parsers(sub)

    reports = _api_parser(sub, "reports", "update reports devices sent, newest first",
                          "Reports of update attempts: status, bytes from the origin and "
                          "from peers, message (escaped), whether a log tail came with it "
                          "('tracker device show ID' prints the tails).")
    reports.add_argument("--device", metavar="ID", type=device_arg, default=None)
    reports.add_argument("--product", metavar="P", default=None)
    reports.add_argument("--status", metavar="CODE|NAME", type=_status_arg, default=None,
                         help="e.g. 40 or post-check-failed: "
                              + ", ".join(f"{k} {v}" for k, v in STATUS_NAMES.items()))
    reports.add_argument("--before", metavar="ID", type=int, default=None,
                         help="only reports older than this report id (the next page)")
    _limit_arg(reports)
    reports.set_defaults(func=_api(_reports))

    fleet = _api_parser(sub, "fleet", "devices per version, reports per status, bytes",
                        "The fleet at a glance: devices per product and version, reports "
                        "per status, bytes from the origin and from peers, every "
                        "rollout's phase.")
    fleet.set_defaults(func=_api(lambda args, client: (client.get("fleet"), render_fleet)))

    audit = _api_parser(sub, "audit", "the audit log (admin role)",
                        "Every admin action, accepted or refused, token creation and every "
                        "rollout decision, oldest first.")
    audit.add_argument("--since", metavar="TIME", type=time_arg, default=None,
                       help="from this time on: ISO 8601, local time unless it names a zone")
    _limit_arg(audit, hi=10_000)
    audit.set_defaults(func=_api(_audit))

    whoami = _api_parser(sub, "whoami", "the token's name and role, and the tracker used",
                         "Check the connection settings: which tracker, which token.")
    whoami.set_defaults(func=_api(_whoami))

    backup = sub.add_parser(
        "backup", help="consistent copy of the live database",
        description="Copy the database to FILE while the tracker runs (SQLite online "
                    "backup: one consistent snapshot), checked and written atomically. "
                    "See docs/SECURITY.md, 'Backups'.")
    _add_db(backup, "the live database; the tracker may keep running; PostgreSQL: "
                    "use pg_dump", sqlite_only=True)
    backup.add_argument("out", metavar="FILE", type=Path)
    backup.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    backup.set_defaults(func=cmd_backup)
    restore = sub.add_parser(
        "restore", help="put a backup in place of the database",
        description="Check FILE and put it in place of --db. Refused while a tracker has "
                    "the database open (stop it first) and, without --force, when the "
                    "database already holds data.")
    _add_db(restore, "created, or replaced", sqlite_only=True)
    restore.add_argument("backup", metavar="FILE", type=Path)
    restore.add_argument("--force", action="store_true",
                         help="replace a database that holds data")
    restore.set_defaults(func=cmd_restore)

    admin = sub.add_parser(
        "admin", help="admin tokens (on the tracker's host)",
        description="Create admin API tokens directly in the database (the bootstrap: "
                    "the API needs a token to do anything). Roles: viewer (read), "
                    "operator (register releases, create and steer rollouts, tag "
                    "devices), admin (revoke releases and devices, read the audit log).")
    admin_sub = admin.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    token = admin_sub.add_parser("token", help="manage admin tokens")
    token_sub = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = token_sub.add_parser(
        "create", help="create a token and print it once",
        description="Create a bearer token with a role. Only its SHA-256 is stored: the "
                    "token is printed once and cannot be shown again. Put it in "
                    "SWARMOTA_TRACKER_TOKEN or in the client config file (chmod 600).")
    _add_db(create, "created if it does not exist")
    create.add_argument("--role", choices=ROLES, required=True)
    create.add_argument("--name", required=True, type=_token_name_arg,
                        help="who holds it (shown in the audit log)")
    create.add_argument("--expires-in-s", type=float, default=None, metavar="S",
                        help="expire after S seconds (default: never)")
    create.set_defaults(func=cmd_token_create)


def _add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve the device API, the admin API and the BitTorrent tracker",
        description="Serve POST /v1/checkin, POST /v1/report and GET /v1/health, the "
                    "admin API (/v1/admin/...) and the BitTorrent tracker (GET /announce, "
                    "GET /scrape) for the swarms of registered releases, until "
                    "interrupted (Ctrl-C). Say how devices authenticate: --device-ca "
                    "(production: every device request must be signed by a fleet "
                    "identity, replays refused) or --allow-unauthenticated-devices (lab "
                    "mode); one of the two is required. Give --repository-root and "
                    "--origin-url so that operators can register releases through the "
                    "API ('tracker release add'): each is verified against the "
                    "repository's signed metadata, as devices verify it.",
    )
    _add_db(serve, "created if it does not exist")
    serve.add_argument("--listen", metavar="HOST:PORT", type=listen_arg,
                       default=DEFAULT_LISTEN,
                       help=f"address to listen on (default {DEFAULT_LISTEN}; IPv6 as "
                            "[::1]:PORT; port 0 picks a free port)")
    serve.add_argument("--tls-cert", metavar="FILE", type=Path, default=None,
                       help="PEM certificate (chain): serve HTTPS (needs --tls-key); "
                            "bearer tokens of the admin API should only travel over it")
    serve.add_argument("--tls-key", metavar="FILE", type=Path, default=None,
                       help="PEM private key of --tls-cert")
    serve.add_argument("--announce-listen", metavar="HOST:PORT", type=listen_arg,
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
                       dest="trusted_proxies",
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
    trust = serve.add_argument_group(
        "release verification (needed to register releases through the admin API)")
    trust.add_argument("--repository-root", metavar="ROOT.json", type=Path, default=None,
                       help="the repository's root metadata, as devices are provisioned "
                            "with (REPO/origin/metadata/root.json); the tracker follows "
                            "the signed root chain from it")
    trust.add_argument("--origin-url", metavar="URL", default=None,
                       help="base URL of the origin serving the repository (its metadata/ "
                            "and targets/)")
    trust.add_argument("--origin-ca-file", metavar="PEM", type=Path, default=None,
                       help="CA certificate(s) of an https origin (default: the system's)")
    serve.set_defaults(func=cmd_serve)


def _add_release_parser(sub: Any) -> None:
    release = sub.add_parser(
        "release", help="register releases and list them (admin API)",
        description="Register releases the tracker may offer (verified against the "
                    "repository's signed metadata), and list them.")
    release_sub = release.add_subparsers(dest="release_command", metavar="COMMAND",
                                         required=True)
    add = _api_parser(
        release_sub, "add", "register a signed release and start its rollout",
        "Register a release with the tracker: MANIFEST is its release manifest file "
        "(what 'swarmota seeder publish' writes under REPO/origin/targets/releases/) or "
        "the URL of that file on the origin. The tracker checks it against the "
        "repository's signed metadata and refuses anything unsigned or altered. Devices "
        "of that product with a lower counter are offered it when its rollout admits "
        "them. By default a staged rollout starts: the canaries (--canary, "
        "--canary-label), then 1%%, 10%%, 50%%, 100%% of the fleet, each after a soak "
        "time and enough successes, halting by itself on failures. Registering the "
        "same release again changes nothing (and keeps its rollout).")
    add.add_argument("manifest", metavar="MANIFEST",
                     help="release manifest file, or its http(s) URL under the origin's "
                          "targets/")
    add_plan_options(add, registering=True)
    add.set_defaults(func=_api(_release_add))

    listing = _api_parser(release_sub, "list", "list registered releases",
                          "Registered releases: counter, kind, full payload size, when "
                          "added, their latest rollout and its phase.")
    listing.add_argument("--product", metavar="P", default=None)
    listing.set_defaults(func=_api(lambda args, client: (
        client.get("releases", _params(product=args.product)), render_releases)))

    show = _api_parser(release_sub, "show", "one release: payloads and every rollout",
                       "A release's payloads (full and deltas), swarms, and every rollout "
                       "it had (generations).")
    show.add_argument("product", metavar="PRODUCT")
    show.add_argument("version", metavar="VERSION")
    show.set_defaults(func=_api(lambda args, client: (
        client.get(f"releases/{_seg(args.product)}/{_seg(args.version)}"), render_release)))


def _add_rollout_parser(sub: Any) -> None:
    rollout = sub.add_parser(
        "rollout", help="create, follow and steer rollouts (admin API)",
        description="A rollout offers a registered release to the fleet in stages and "
                    "halts by itself on failures. A rollout is named by its id, or by its "
                    "release (PRODUCT VERSION: the release's latest rollout).")
    rollout_sub = rollout.add_subparsers(dest="rollout_command", metavar="COMMAND",
                                         required=True)
    create = _api_parser(
        rollout_sub, "create", "start a rollout of a registered release",
        "Start a rollout: the release's first, or a new generation after a halted or "
        "aborted one (history is kept). The plan comes from --plan-file and the flags "
        "(which win); unset fields take the defaults.")
    create.add_argument("product", metavar="PRODUCT")
    create.add_argument("version", metavar="VERSION")
    add_plan_options(create, registering=False)
    create.set_defaults(func=_api(_rollout_create))

    listing = _api_parser(rollout_sub, "list", "list rollouts",
                          "Rollouts: the latest of each release, or every generation "
                          "with --history.")
    listing.add_argument("--product", metavar="P", default=None)
    listing.add_argument("--history", action="store_true",
                         help="every generation, not only the latest of each release")
    listing.set_defaults(func=_api(lambda args, client: (client.get("rollouts", _params(
        product=args.product, history=1 if args.history else None)), render_rollouts)))

    show = _api_parser(rollout_sub, "show", "phase, stages, counts, bytes, halt reason",
                       "One rollout: phase and stage, the plan, per stage the devices "
                       "offered, downloading, succeeded, failed, rolled back and in "
                       "flight, bytes from the origin and from peers, the halt reason "
                       "and the failing devices.")
    _rollout_ref(show)
    show.set_defaults(func=_api(lambda args, client: (_find_rollout(client, args),
                                                      render_rollout)))

    devices = _api_parser(rollout_sub, "devices", "each admitted device's state",
                          "The devices a rollout admitted: stage, state (offered, "
                          "downloading, installed, failed, rolled back), their latest "
                          "status code and message.")
    _rollout_ref(devices)
    devices.add_argument("--status", choices=DEVICE_STATUSES, default=None)
    _page_args(devices)
    devices.set_defaults(func=_api(_rollout_devices))

    ends = ", ".join(f"{code} {phase}" for phase, code in END_PHASES.items())
    watching = _api_parser(
        rollout_sub, "watch", "a live view of a rollout until it ends",
        "Show the rollout (as 'rollout show') again every --interval-s seconds, redrawn "
        "in place on a terminal (printed when it changes otherwise, e.g. into a log), "
        "until it is completed, halted, aborted or revoked (or reaches an --until-phase, "
        f"or --max-s passes). Exit code: {ends}; {EXIT_TIMEOUT} when --max-s ran out; 1 "
        "when the tracker refused; 130 on Ctrl-C. With --json: the rollout's JSON, one "
        "line each time it changed.")
    _rollout_ref(watching)
    watching.add_argument("--interval-s", metavar="S", type=_interval_arg, default=2.0,
                          help="seconds between reads (default 2)")
    watching.add_argument("--max-s", metavar="S", type=_interval_arg, default=None,
                          help=f"give up after S seconds (exit code {EXIT_TIMEOUT})")
    watching.add_argument("--until-phase", metavar="PHASE", action="append", default=[],
                          choices=PHASES,
                          help="also stop (exit 0) at this phase, e.g. active (repeatable)")
    watching.set_defaults(func=cmd_rollout_watch)

    for action in ACTIONS:
        what = {"pause": "stop admitting devices (those in flight may finish)",
                "resume": "admit devices again (also an override of a halt)",
                "advance": "move to the next stage now (override soak and successes)",
                "abort": "stop for good; the release may get a new rollout later",
                "force": "emergency: every device now, no cap, no halt",
                "revoke": "withdraw the release (admin role; terminal)"}[action]
        parser = _api_parser(rollout_sub, action, what,
                             f"{action.capitalize()} a rollout: {what}. Audited. Refused "
                             "(HTTP 409) when its phase does not allow it.")
        _rollout_ref(parser)
        parser.set_defaults(func=_api(functools.partial(_rollout_action, action)))


def _add_device_parsers(sub: Any) -> None:
    devices = _api_parser(
        sub, "devices", "list devices: what they run, when last seen, their rollout",
        "Devices with product, hardware, version running (following their reports, not "
        "only check-ins), last seen, tags, labels, network and state in their latest "
        "rollout; filtered, a page at a time.")
    devices.add_argument("--product", metavar="P", default=None)
    devices.add_argument("--version", metavar="V", default=None,
                         help="devices running this version")
    devices.add_argument("--group", metavar="LABEL_OR_TAG", default=None,
                         help="devices declaring this label or carrying this tag")
    devices.add_argument("--rollout", metavar="ROLLOUT_ID", default=None,
                         help="devices admitted to this rollout")
    devices.add_argument("--status", choices=DEVICE_STATUSES, default=None,
                         help="with --rollout: devices in this state")
    devices.add_argument("--stale-s", metavar="S", type=int, default=None,
                         help="devices not heard of for S seconds")
    _page_args(devices)
    devices.set_defaults(func=_api(_devices))

    device = sub.add_parser(
        "device", help="one device: show, tag, revoke its identity (admin API)",
        description="Inspect a device (its rollouts, reports and log tails), tag it "
                    "(canary groups: a rollout's --canary-label matches tags too), or "
                    "revoke its fleet certificates.")
    device_sub = device.add_subparsers(dest="device_command", metavar="COMMAND",
                                       required=True)
    show = _api_parser(device_sub, "show", "what it runs, its rollouts, reports, log tails",
                       "One device: what it runs, its state in every rollout, its latest "
                       "reports with the log tail of each failed attempt (escaped: "
                       "devices are not trusted), its certificates.")
    show.add_argument("device_id", metavar="DEVICE_ID", type=device_arg)
    show.add_argument("--reports", metavar="N", type=int, default=10,
                      help="latest reports shown (default 10)")
    show.set_defaults(func=_api(lambda args, client: (client.get(
        f"devices/{_seg(args.device_id)}", {"limit": args.reports}), render_device)))

    tag = _api_parser(device_sub, "tag", "add and remove operator tags",
                      "Add and remove tags (e.g. a canary group: 'rollout create ... "
                      "--canary-label canary-eu' then takes every device tagged "
                      "canary-eu). Audited.")
    tag.add_argument("device_id", metavar="DEVICE_ID", type=device_arg)
    tag.add_argument("--add", metavar="TAG", action="append", default=[])
    tag.add_argument("--remove", metavar="TAG", action="append", default=[])
    tag.set_defaults(func=_api(_device_tag))

    revoke = _api_parser(
        device_sub, "revoke", "revoke every certificate of a device (admin role)",
        """Revoke DEVICE_ID's fleet certificates: every certificate the tracker
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
--cert file or one naming another device.""",
        raw=True)
    revoke.add_argument("device_id", metavar="DEVICE_ID", type=device_arg)
    revoke.add_argument("--cert", metavar="PEM", type=Path, action="append", default=[],
                        help="a certificate file of this device to revoke too (repeat "
                             "for several)")
    revoke.add_argument("--reason", metavar="TEXT", default="",
                        help="why (stored with the revocation and in the audit log)")
    revoke.set_defaults(func=_api(_device_revoke))

    listing = _api_parser(device_sub, "revocations", "list revoked certificates",
                          "Every revoked certificate: fingerprint (SHA-256 of the DER), "
                          "device, when, by whom and why.")
    listing.set_defaults(func=_api(lambda args, client: (client.get("revocations"),
                                                         render_revocations)))


def _api_parser(sub: Any, name: str, help: str, description: str, *,
                raw: bool = False) -> argparse.ArgumentParser:
    """A command that calls the admin API: connection options and ``--json``."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter if raw
        else argparse.HelpFormatter)
    parser.add_argument("--json", action="store_true",
                        help="print the admin API's JSON answer instead of tables")
    add_client_options(parser)
    return parser


def _rollout_ref(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rollout", metavar="ROLLOUT_ID|PRODUCT",
                        help="a rollout id, or the product of a release")
    parser.add_argument("version", metavar="VERSION", nargs="?", default=None,
                        help="with PRODUCT: the release (its latest rollout)")


def _page_args(parser: argparse.ArgumentParser) -> None:
    _limit_arg(parser, hi=MAX_PAGE)
    pages = parser.add_mutually_exclusive_group()
    pages.add_argument("--after", metavar="DEVICE_ID", default=None,
                       help="the page after this device (the 'more:' line says it)")
    pages.add_argument("--all", action="store_true", help="every page")


def _limit_arg(parser: argparse.ArgumentParser, hi: int = MAX_PAGE) -> None:
    def limit(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not within 1..{hi}")
        return int(text)

    parser.add_argument("--limit", metavar="N", type=limit, default=None,
                        help=f"at most N per page (1..{hi})")


# --- admin API commands ----------------------------------------------------------------


Command = Callable[[argparse.Namespace, AdminClient], tuple[Any, Renderer]]


def _api(run: Command) -> Callable[[argparse.Namespace], int]:
    """An admin API command: open the client, ``run``, print its answer (a table, or
    JSON with ``--json``), and turn errors into messages and exit codes."""

    def command(args: argparse.Namespace) -> int:
        try:
            with open_client(args) as client:
                answer, render = run(args, client)
        except (ConfigError, RequestError) as exc:
            return _fail(str(exc), _EXIT_BAD_INPUT)
        except (AdminApiError, _Refused) as exc:
            return _fail(str(exc), _EXIT_REFUSED)
        _print_answer(args, answer, render)
        return 0

    return command


def _print_answer(args: argparse.Namespace, answer: Any, render: Renderer) -> None:
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print("\n".join(render(answer)))


def _fail(message: str, code: int) -> int:
    print(f"error: {escape(message)}", file=sys.stderr)
    return code


def _release_add(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    source: str = args.manifest
    manifest: bytes | str = source
    if not source.startswith(("http://", "https://")):
        manifest = _read_manifest(Path(source))
    (answer,) = register_releases(client, [manifest], plan_from_args(args))
    return answer, render_registration


def _read_manifest(path: Path) -> bytes:
    """A release manifest file's bytes, checked to be one (the tracker checks its
    signature).

    Raises:
        RequestError: unreadable or not a release manifest.
    """
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise RequestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    try:
        parse_release_manifest(data)
    except ManifestFormatError as exc:
        raise RequestError(f"{path} is not a valid release manifest: {exc}") from None
    return data


def _rollout_create(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    plan = plan_from_args(args)
    assert plan is not None  # no --no-rollout here
    return client.post("rollouts", {"product": args.product, "version": args.version,
                                    "plan": plan.to_json()}), render_rollout


def _find_rollout(client: AdminClient, args: argparse.Namespace) -> Any:
    """The rollout ``ROLLOUT_ID`` or ``PRODUCT VERSION`` names."""
    if args.version is None:
        return client.get(f"rollouts/{_seg(args.rollout)}")
    return client.get(f"rollouts/{_seg(args.rollout)}/{_seg(args.version)}")


def _release_of(client: AdminClient, args: argparse.Namespace) -> tuple[str, str]:
    """``(product, version)`` of the rollout named; a rollout id must be its release's
    current rollout (actions and device states are about that one).

    Raises:
        _Refused: an older generation.
    """
    if args.version is not None:
        return args.rollout, args.version
    named = client.get(f"rollouts/{_seg(args.rollout)}")
    product, version = named["product"], named["version"]
    current = client.get(f"rollouts/{_seg(product)}/{_seg(version)}")
    if current["rollout_id"] != named["rollout_id"]:
        raise _Refused(f"rollout {named['rollout_id']} is generation {named['generation']} "
                       f"of {product} {version}, no longer its current rollout "
                       f"({current['rollout_id']}, generation {current['generation']}); "
                       f"name that one (or '{product} {version}')")
    return product, version


def _rollout_action(action: str, args: argparse.Namespace,
                    client: AdminClient) -> tuple[Any, Renderer]:
    product, version = _release_of(client, args)
    return client.post(f"rollouts/{_seg(product)}/{_seg(version)}/{action}"), render_rollout


def _rollout_devices(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    product, version = _release_of(client, args)
    answer = _pages(client, f"rollouts/{_seg(product)}/{_seg(version)}/devices", args,
                    status=args.status)
    return answer, render_rollout_devices


def _devices(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    return _pages(client, "devices", args, product=args.product, version=args.version,
                  group=args.group, rollout=args.rollout, status=args.status,
                  stale_s=args.stale_s), render_devices


def _pages(client: AdminClient, path: str, args: argparse.Namespace,
           **filters: str | int | None) -> Any:
    """One page (``--after``), or with ``--all`` every page joined into one answer."""
    params = _params(**filters, limit=args.limit, after=args.after)
    answer = dict(client.get(path, params))
    for _ in range(_MAX_PAGES):
        if not args.all or answer.get("next") is None:
            return answer
        more = client.get(path, {**params, "after": answer["next"]})
        answer = {**more, "devices": [*answer["devices"], *more["devices"]]}
    raise _Refused(f"more than {_MAX_PAGES} pages: narrow the filters")


def _reports(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    return client.get("reports", _params(device=args.device, product=args.product,
                                         status=args.status, before=args.before,
                                         limit=args.limit)), render_reports


def _audit(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    since = None if args.since is None else int(args.since)
    return client.get("audit", _params(since=since, limit=args.limit)), render_audit


def _whoami(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    answer = client.get("whoami")
    return answer, lambda a: [f"{escape(a['name'])} (role {escape(a['role'])}) on "
                              f"{client.base_url}"]


def _device_tag(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    if not args.add and not args.remove:
        raise RequestError("give tags to --add or --remove")
    answer = client.post(f"devices/{_seg(args.device_id)}/tags",
                         {"add": args.add, "remove": args.remove})
    return answer, lambda a: [f"{escape(a['device_id'])}: tags "
                              f"{', '.join(escape(t) for t in a['tags']) or '(none)'}"]


def _device_revoke(args: argparse.Namespace, client: AdminClient) -> tuple[Any, Renderer]:
    pems = [_certificate_of(path, args.device_id) for path in args.cert]
    answer = client.post(f"devices/{_seg(args.device_id)}/revoke",
                         {"reason": args.reason, "certificates": pems})
    print(f"revoked: re-provision {args.device_id} with a new key and certificate (see "
          "'swarmota tracker device revoke --help')", file=sys.stderr)

    def render(a: Json) -> list[str]:
        lines = [f"revoked {len(a['revoked'])} certificate(s) of {escape(a['device_id'])}:"]
        lines += [f"  sha256 {f}" + (" (already revoked)" if f in a["already_revoked"]
                                     else "") for f in a["revoked"]]
        return lines

    return answer, render


def _certificate_of(path: Path, device_id: str) -> str:
    """A ``--cert`` file's PEM text, checked to be a certificate of ``device_id``.

    Raises:
        RequestError: unreadable, not a certificate, or another device's.
    """
    try:
        with path.open("rb") as fh:
            pem = fh.read(_MAX_CERT_FILE_BYTES + 1)
    except OSError as exc:
        raise RequestError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    try:
        if len(pem) > _MAX_CERT_FILE_BYTES:
            raise DeviceAuthError(f"larger than {_MAX_CERT_FILE_BYTES} bytes")
        names = {c.device_id for c in read_certificates(pem)}
    except DeviceAuthError as exc:
        raise RequestError(f"{path}: {exc}") from None
    if names != {device_id}:
        raise RequestError(f"{path} is a certificate of {', '.join(sorted(names))}, not "
                           f"of {device_id}")
    return pem.decode("ascii", errors="replace")


def cmd_rollout_watch(args: argparse.Namespace) -> int:
    """Follow a rollout until it ends (:mod:`swarmota.tracker.watch`); its exit code."""
    config = WatchConfig(interval_s=args.interval_s, max_s=args.max_s,
                         until_phases=frozenset(args.until_phase),
                         redraw=sys.stdout.isatty() and not args.json,
                         width=shutil.get_terminal_size().columns, as_json=args.json)
    try:
        with open_client(args) as client:
            first = _find_rollout(client, args)  # a typo fails now, not in the loop
            path = f"rollouts/{_seg(first['rollout_id'])}"
            code = watch(lambda: client.get(path), render_rollout, sys.stdout, config)
    except (ConfigError, RequestError) as exc:
        return _fail(str(exc), _EXIT_BAD_INPUT)
    except AdminApiError as exc:
        return _fail(str(exc), _EXIT_REFUSED)
    except KeyboardInterrupt:
        return _EXIT_INTERRUPTED
    if code == EXIT_TIMEOUT:
        print(f"rollout still running after --max-s {args.max_s:g}", file=sys.stderr)
    return code


def _params(**values: str | int | None) -> dict[str, str | int]:
    """The query parameters that are set."""
    return {k: v for k, v in values.items() if v is not None}


def _seg(text: str) -> str:
    """``text`` as one path segment."""
    return quote(text, safe="")


# --- commands on the database ----------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the tracker until Ctrl-C; 0 after a clean stop, 1 if it cannot start."""
    host, port = args.listen
    try:
        certfile, keyfile = check_serve_args(args)
    except ConfigError as exc:
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
                           trusted_proxies=tuple(args.trusted_proxies),
                           repository_root=args.repository_root,
                           origin_url=args.origin_url, origin_ca_file=args.origin_ca_file)

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
                if config.origin_url is None:
                    print("releases cannot be registered through the admin API (no "
                          "--repository-root and --origin-url)", flush=True)
                notifier = await service_ready(nursery, f"serving on {urls.api}")
                async for signum in signals:
                    print(f"tracker stopping ({signal.Signals(signum).name})",
                          file=sys.stderr, flush=True)
                    await service_stopping(notifier, "stopping")
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


def check_serve_args(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """What ``serve`` checks before it starts (``config check`` runs it too): how devices
    authenticate, the TLS files, the fleet CA, the proxies, the release verification
    options. Returns the TLS certificate and key files.

    Raises:
        ConfigError: what is wrong.
    """
    if args.device_ca is None and not args.allow_unauthenticated_devices:
        raise ConfigError("say how devices authenticate: --device-ca FILE (the fleet CA: "
                          "devices must sign their requests) or "
                          "--allow-unauthenticated-devices (lab mode: anyone may check in, "
                          "report and announce)")
    try:
        certfile, keyfile = _tls_files(args.tls_cert, args.tls_key)
        if args.device_ca is not None:
            load_fleet_trust(args.device_ca)  # a bad file fails now, with exit code 2
        TrustedProxies(args.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_repository_args(args)
    return certfile, keyfile


def _check_repository_args(args: argparse.Namespace) -> None:
    """Raises ConfigError: half of the release verification options, an unreadable
    root file or a URL that is not http(s)."""
    if (args.repository_root is None) != (args.origin_url is None):
        raise ConfigError("--repository-root and --origin-url go together: the tracker "
                          "verifies releases against the signed metadata the origin serves")
    if args.origin_ca_file is not None and args.origin_url is None:
        raise ConfigError("--origin-ca-file needs --origin-url")
    if args.repository_root is None:
        return
    try:
        with args.repository_root.open("rb") as fh:
            kind = json.loads(fh.read(16 * 1024 * 1024))["signed"]["_type"]
    except OSError as exc:
        raise ConfigError(f"cannot read --repository-root {args.repository_root}: "
                          f"{exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError):
        kind = None
    if kind != "root":
        raise ConfigError(f"--repository-root {args.repository_root} is not TUF root "
                          "metadata (REPO/origin/metadata/root.json)")
    parts = urlsplit(args.origin_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--origin-url {args.origin_url!r} is not an http(s) URL")


def cmd_backup(args: argparse.Namespace) -> int:
    """Back the database up (swarmota.tracker.backup)."""
    return _backup_step(f"backed up {args.db} to",
                        lambda: backup_database(args.db, args.out, overwrite=args.overwrite))


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore a backup into the database (swarmota.tracker.backup)."""
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


def _interval_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not within (0, 604800] seconds")
    return value


def _status_arg(text: str) -> int:
    """A report status: its code or its name."""
    by_name = {name: code for code, name in STATUS_NAMES.items()}
    if text in by_name:
        return by_name[text]
    if text.isdigit() and int(text) in STATUS_NAMES:
        return int(text)
    raise argparse.ArgumentTypeError(
        f"unknown status {text!r}: one of "
        + ", ".join(f"{k} ({v})" for k, v in STATUS_NAMES.items()))


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
