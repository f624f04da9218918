"""``swarmota seeder ...``: create a repository, publish releases, refresh timestamp, serve.

The key ceremony's commands (sign, rotate, ...) are in :mod:`seeder.trustcli`. A thin
shell over :mod:`seeder.repository`, :mod:`seeder.publish`,
:mod:`seeder.server` and :mod:`seeder.seeding` (``serve`` also seeds every published
payload over BitTorrent unless ``--no-seed``). Each leaf command sets
``func(args) -> int``; seeder errors are printed as ``error: <message>`` on stderr with
exit code 2.
"""

from __future__ import annotations

import argparse
import functools
import re
import signal
import ssl
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from swarmota.infra.http_serve import ListenConfig, listen_arg
from swarmota.infra.sdnotify import service_ready, service_stopping
from swarmota.manifest import DEFAULT_MAX_COUNTER_JUMP, UPDATE_TYPES
from swarmota.peer.announce_relay import AnnounceRelay
from swarmota.peer.config import check_pinned_urls
from swarmota.peer.errors import ConfigError
from swarmota.peer.http import HttpClient, TlsPolicy
from swarmota.peer.identity import load_identity_dir
from swarmota.peer.swarm import SwarmConfig
from swarmota.seeder import trustcli
from swarmota.seeder.errors import SeederError
from swarmota.seeder.keys import KEY_TYPES
from swarmota.seeder.origin import OriginApp, OriginConfig
from swarmota.seeder.publish import DEFAULT_ZSTD_LEVEL, DeltaSummary, is_live, publish_release
from swarmota.seeder.registration import add_register_options, prepare
from swarmota.seeder.repository import ROLES, ExpiryConfig, KeySetup, Repository, RoleKeys, Staged
from swarmota.seeder.seeding import DEFAULT_RESCAN_INTERVAL_S, PayloadSeeder, SeedingConfig
from swarmota.seeder.server import serve_origin
from swarmota.seeder.trustcli import non_negative_int, positive_int

__all__ = ["DEFAULT_LISTEN", "DEFAULT_SEED_PORT", "add_parser"]

DEFAULT_LISTEN = "127.0.0.1:8460"
DEFAULT_SEED_PORT = 6881  # BitTorrent's customary first port
_EXIT_ERROR = 2
_EXPIRY_WARNING_S = 7 * 24 * 3600


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``seeder`` command and its subcommands to ``subparsers``."""
    seeder = subparsers.add_parser(
        "seeder",
        help="signing repository, publishing and the origin server",
        description="Manage the signed update repository and serve its origin tree.",
    )
    sub = seeder.add_subparsers(dest="seeder_command", metavar="SUBCOMMAND", required=True)

    init = sub.add_parser(
        "init",
        help="create a new repository with fresh keys",
        description=(
            "Create a TUF repository: root keys (REPO/offline/: move them to their "
            "holders' offline machines), targets keys (REPO/keys/ in the single-key "
            "setup, else REPO/offline/), snapshot and timestamp keys (REPO/keys/, this "
            "host), and initial signed metadata."
        ),
    )
    init.add_argument("repo", metavar="REPO", type=Path,
                      help="directory to create (must not exist or be empty)")
    keys = init.add_argument_group(
        "keys (per role: how many, how many must sign)",
        "Default: one key per role, the targets key on this host (every publish goes "
        "live at once). For release signing by several engineers give --targets-keys N "
        "--targets-threshold K (or --targets-offline): the targets keys then go to "
        "REPO/offline/ for their holders, and a publish waits for K signatures.")
    for role in ("root", "targets", "snapshot", "timestamp"):
        keys.add_argument(f"--{role}-keys", type=positive_int, default=1, metavar="N",
                          help=f"number of {role} keys (default 1)")
        keys.add_argument(f"--{role}-threshold", type=positive_int, default=1,
                          metavar="K", help=f"{role} signatures needed (default 1)")
    keys.add_argument("--key-type", choices=KEY_TYPES, default="ed25519",
                      help="type of every generated key (default %(default)s)")
    keys.add_argument("--targets-offline", action="store_true",
                      help="put the targets key(s) in REPO/offline/ even when there is "
                           "only one (implied by --targets-keys above 1)")
    defaults = ExpiryConfig()
    for role in ("root", "targets", "snapshot", "timestamp"):
        init.add_argument(
            f"--{role}-expiry-s", type=positive_int, metavar="N",
            default=getattr(defaults, f"{role}_s"),
            help=f"{role} metadata lifetime in seconds (default %(default)s)",
        )
    init.set_defaults(func=_wrap(_cmd_init))

    publish = sub.add_parser(
        "publish",
        help="publish an image as a new release",
        description=(
            "Compress IMAGE into a content-addressed zstd payload, build a delta "
            "payload from each --from image, write the release manifest and stage new "
            "targets metadata. It goes live (snapshot, timestamp) at once if this host "
            "holds enough targets keys, else once the release signers have signed it "
            "('seeder status', 'seeder sign', 'seeder export'/'import'). With --register "
            "TRACKER_URL a live release is then registered with the tracker and its "
            "rollout started; a staged one is registered by the 'seeder sign' or "
            "'seeder import' that makes it live, given --register too. Exit code 1 when "
            "the release went live but the tracker did not register it."
        ),
    )
    publish.add_argument("repo", metavar="REPO", type=Path, help="repository directory")
    publish.add_argument("image", metavar="IMAGE", type=Path, help="the full image file")
    publish.add_argument("--product", required=True, help="product name, e.g. acme-router")
    publish.add_argument("--version", required=True, help="release version, e.g. 2.0.0")
    publish.add_argument("--counter", required=True, type=non_negative_int, metavar="N",
                         help="release counter (anti-rollback): higher than every "
                              "earlier release of the product")
    publish.add_argument("--hardware-id", required=True, action="append", metavar="ID",
                         dest="hardware_ids",
                         help="hardware compatibility id (repeat for several)")
    publish.add_argument("--zstd-level", type=int, default=DEFAULT_ZSTD_LEVEL, metavar="L",
                         help="zstd compression level 1..22 (default %(default)s)")
    publish.add_argument("--from", action="append", type=Path, default=[],
                         metavar="OLD_IMAGE", dest="bases",
                         help="an older image devices may have installed: also publish "
                              "the smallest delta from it (bsdiff-zstd or zstd-patch, "
                              "whichever is smaller); repeat for several. Needs about 17x "
                              "the image size in memory")
    publish.add_argument("--web-seed-url", metavar="URL", default=None,
                         help="public base URL of the origin (e.g. https://cdn.example/ota): "
                              "put in each payload's torrent as its BEP 19 web seed")
    publish.add_argument("--announce-url", action="append", default=[], metavar="URL",
                         dest="announce_urls",
                         help="tracker announce URL put in each payload's torrent "
                              "(repeatable)")
    publish.add_argument("--swarm-ca", type=Path, default=None, metavar="PEM",
                         help="fleet CA certificate ('swarmota tls ca'): make each payload's "
                              "swarm private (an SSL torrent; only peers with a certificate "
                              "from this CA, 'swarmota tls device-cert', can connect)")
    publish.add_argument("--critical", action="store_true",
                         help="an emergency release: devices install it even outside their "
                              "maintenance windows and without their install delay")
    publish.add_argument("--update-type", choices=UPDATE_TYPES, default="image",
                         help="image: a whole A/B slot image (default); module (e.g. modem "
                              "firmware, bootloader), app, config: IMAGE is the new content "
                              "of the component named by --component")
    publish.add_argument("--component", default=None, metavar="NAME",
                         help="component name, e.g. modem-fw (with --update-type other than "
                              "image)")
    publish.add_argument("--allow-counter-jump", action="store_true",
                         help="accept a counter more than "
                              f"{DEFAULT_MAX_COUNTER_JUMP} above the highest published "
                              "(devices refuse such a jump by default)")
    add_register_options(publish)
    publish.set_defaults(func=_wrap(_cmd_publish))

    timestamp = sub.add_parser(
        "timestamp",
        help="re-sign timestamp metadata (run from cron)",
        description=(
            "Sign a new timestamp version so devices keep accepting the repository. Run "
            "it well within the timestamp lifetime, e.g. hourly from cron."
        ),
    )
    timestamp.add_argument("repo", metavar="REPO", type=Path, help="repository directory")
    timestamp.add_argument("--expires-in-s", type=positive_int, metavar="N", default=None,
                           help="lifetime in seconds (default: the repository setting)")
    timestamp.set_defaults(func=_wrap(_cmd_timestamp))

    serve = sub.add_parser(
        "serve",
        help="serve the origin tree over HTTP and seed its payloads over BitTorrent",
        description=(
            "Serve a repository's origin/ directory (or an origin directory itself) "
            "with GET, HEAD and byte ranges, and seed every published payload over "
            "BitTorrent (TCP; DHT, local peer discovery, UPnP and NAT-PMP stay off): "
            "each payloads/*.torrent whose payload file exists, checked again every "
            f"{DEFAULT_RESCAN_INTERVAL_S:g} s for new releases. Stop with Ctrl-C."
        ),
    )
    serve.add_argument("directory", metavar="REPO_OR_ORIGIN_DIR", type=Path,
                       help="a repository (serves REPO/origin) or an origin directory")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                       type=listen_arg,
                       help="HTTP address to listen on (default %(default)s)")
    serve.add_argument("--tls-cert", type=Path, metavar="FILE", default=None,
                       help="PEM certificate chain: serve HTTPS (TLS 1.2 or newer); "
                            "needs --tls-key")
    serve.add_argument("--tls-key", type=Path, metavar="FILE", default=None,
                       help="PEM private key of --tls-cert")
    serve.add_argument("--rate-limit-bytes-per-s", type=_rate_arg, metavar="N",
                       default=None,
                       help="cap the bytes per second sent to all clients together, e.g. "
                            "2500000, 2.5M or 20Mi (k/M/G: powers of 1000, Ki/Mi/Gi: "
                            "powers of 1024; default: no limit)")
    seeding = serve.add_argument_group("BitTorrent seeding (on by default)")
    seeding.add_argument("--no-seed", action="store_false", dest="seed",
                         help="serve HTTP only: do not seed payloads over BitTorrent")
    seeding.add_argument("--seed-listen", default=None, metavar="HOST:PORT", type=listen_arg,
                         help="address to accept BitTorrent peers on, TCP (default: the "
                              f"--listen host, port {DEFAULT_SEED_PORT}; port 0 picks a "
                              "free port; a port in use makes libtorrent try the next ones)")
    seeding.add_argument("--seed-upload-limit-bytes-per-s", type=_rate_or_zero_arg,
                         metavar="N", default=0,
                         help="cap BitTorrent upload for all peers together, same units as "
                              "--rate-limit-bytes-per-s (default 0: no limit)")
    seeding.add_argument("--announce-url", action="append", default=[], metavar="URL",
                         dest="announce_urls",
                         help="tracker announce URL added to every torrent's own trackers "
                              "(repeatable), e.g. http://TRACKER/announce; every payload is "
                              "announced to every one of them (none is a mere fallback)")
    seeding.add_argument("--identity", type=Path, default=None, metavar="DIR",
                         help="the seeder's fleet identity (cert.pem + key.pem of 'swarmota "
                              "tls device-cert --role seed'): needed to seed private swarms; "
                              "announces then go, signed, through a loopback relay to the "
                              "one --announce-url only (not to trackers in the torrents)")
    seeding.add_argument("--tracker-ca-file", type=Path, default=None, metavar="PEM",
                         help="with --identity: CA certificate(s) the tracker's HTTPS "
                              "certificate must chain to (default: the system store)")
    seeding.add_argument("--tracker-pin", action="append", default=[], metavar="PIN",
                         dest="tracker_pins",
                         help="with --identity: SPKI pin of a key the tracker may use "
                              "(repeatable; at least two, one a spare)")
    serve.set_defaults(func=_wrap(_cmd_serve))

    trustcli.add_commands(sub, _wrap)


# --- commands ----------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    expiry = ExpiryConfig(root_s=args.root_expiry_s, targets_s=args.targets_expiry_s,
                          snapshot_s=args.snapshot_expiry_s,
                          timestamp_s=args.timestamp_expiry_s)
    try:
        setup = KeySetup(**{role: RoleKeys(count=getattr(args, f"{role}_keys"),
                                           threshold=getattr(args, f"{role}_threshold"),
                                           key_type=args.key_type)
                            for role in ROLES},
                         targets_online=args.targets_keys == 1 and not args.targets_offline)
    except ValueError as exc:
        raise SeederError(str(exc)) from None
    repo = Repository.create(args.repo, expiry=expiry, keys=setup)
    print(f"created repository {repo.path}")
    print("  offline keys (move each to its holder's OFFLINE machine or token now, and "
          "delete it here):")
    for path in sorted(repo.offline_dir.iterdir()):
        print(f"    {path}")
    print("    !! Root keys sign which keys devices trust; they are needed only to change "
          "keys.")
    local = repo.local_roles()
    print(f"  keys on this host: {repo.online_keys_dir}/ "
          f"({', '.join(f'{r} {len(k)}' for r, k in local.items() if k)})")
    if local["targets"]:
        print("    the targets key is on this host: whoever takes it can sign releases "
              "devices install; for k-of-n release signing see --targets-keys")
    else:
        print(f"    releases need {setup.targets.threshold} of {setup.targets.count} "
              "targets signatures ('seeder sign'); hand each offline/targets-*.pem to "
              "its holder")
    print(f"  provision devices: {repo.root_path}")
    print(f"  serve:             {repo.origin_dir}")
    print(f"  timestamp expires after {expiry.timestamp_s} s: run "
          f"'swarmota seeder timestamp {repo.path}' regularly (e.g. from cron)")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    registration = prepare(args)  # bad settings or plan: fail before publishing
    built: list[DeltaSummary] = []

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    manifest = publish_release(
        repo, args.image, product=args.product, version=args.version,
        release_counter=args.counter, compatibility=args.hardware_ids,
        zstd_level=args.zstd_level, bases=args.bases, progress=progress,
        on_delta=built.append, web_seed_url=args.web_seed_url,
        announce_urls=args.announce_urls, critical=args.critical,
        update_type=args.update_type, component=args.component,
        swarm_ca=_read_swarm_ca(args.swarm_ca), allow_counter_jump=args.allow_counter_jump,
    )
    payload = manifest.full_payload
    live = is_live(repo, manifest)
    target = repo.targets(staged=not live)[manifest.target_name]
    ratio = payload.size / manifest.image.size
    print(f"{'published' if live else 'staged'} {manifest.product} {manifest.version} "
          f"(counter {manifest.release_counter}, hardware {', '.join(manifest.compatibility)})")
    print(f"  image:    {manifest.image.size} bytes, sha256 {manifest.image.sha256}")
    print(f"  payload:  {payload.size} bytes ({ratio:.1%} of the image), "
          f"{repo.origin_dir / payload.path}")
    print(f"  chunks:   {payload.chunk_count} x "
          f"{payload.chunk_size} bytes")
    print(f"  torrent:  {repo.origin_dir / payload.torrent_path} (v2 info-hash "
          f"{payload.info_hash})")
    sizes = {summary.payload.sha256: summary for summary in built}
    for delta in manifest.payloads:
        if delta.base is None:
            continue
        line = (f"  delta:    {delta.encoding}, {delta.size} bytes "
                f"({delta.size / payload.size:.1%} of the full payload) from base "
                f"{delta.base.sha256[:12]}")
        summary = sizes.get(delta.sha256)
        if summary is not None:
            others = ", ".join(f"{engine} {size}" for engine, size
                               in summary.sizes_by_engine.items() if engine != delta.encoding)
            line += f" ({summary.base_path}); other candidates: {others or 'none'}"
        print(line)
    print(f"  target:   {manifest.target_name}")
    print(f"  manifest: {repo.target_file_path(target)}"
          + ("" if live else " (written when it goes live)"))
    if not live:
        trustcli.print_staged(repo, Staged(repo.staged(), live=False))
    if registration is None:
        return 0
    if not live:
        return registration.not_live("the release is not live yet (the tracker registers "
                                     "only signed releases)")
    return registration.send({manifest.target_name: repo.read_target(target)},
                             str(repo.target_file_path(target)))


def _cmd_timestamp(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    repo.refresh_timestamp(expires_in_s=args.expires_in_s)
    expirations = repo.expirations()
    print(f"timestamp version {repo.versions()['timestamp']} signed, valid until "
          f"{expirations['timestamp'].isoformat()}")
    soon = datetime.now(UTC) + timedelta(seconds=_EXPIRY_WARNING_S)
    for role in ("snapshot", "targets", "root"):
        if expirations[role] <= soon:
            how = ("re-sign root offline" if role == "root"
                   else "publish a release to re-sign it")
            print(f"warning: {role} metadata expires at {expirations[role].isoformat()}; "
                  f"devices will refuse the repository after that ({how})", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    directory = _origin_dir(args.directory)
    host, port = args.listen
    certfile, keyfile = _tls_files(args.tls_cert, args.tls_key)
    listen = ListenConfig(host=host, port=port, certfile=certfile, keyfile=keyfile)
    app = OriginApp(directory, OriginConfig(rate_limit_bytes_per_s=args.rate_limit_bytes_per_s))
    relay = _announce_relay(args) if args.seed else None
    seeder = PayloadSeeder(directory, _seeding_config(args, relay)) if args.seed else None

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                if relay is not None:
                    await nursery.start(relay.serve)
                url = await nursery.start(functools.partial(serve_origin, app, listen))
                print(f"serving {app.root} at {url}/ (Ctrl-C to stop)", flush=True)
                if args.rate_limit_bytes_per_s is not None:
                    print(f"  rate limit: {args.rate_limit_bytes_per_s} bytes/s for all "
                          "clients together", flush=True)
                if seeder is not None:
                    await nursery.start(seeder.run)
                    _print_seeding(seeder, args)
                notifier = await service_ready(nursery, f"serving {app.root} at {url}/")
                async for _ in signals:
                    await service_stopping(notifier, "stopping")
                    nursery.cancel_scope.cancel()
                    break
        if relay is not None:
            await relay.http.aclose()

    try:
        trio.run(run)
    except BaseExceptionGroup as group:
        # Failures inside the server's nursery (e.g. the address is in use) arrive grouped.
        os_errors, rest = group.split(OSError)
        if rest is not None or os_errors is None:
            raise
        raise SeederError(f"cannot serve on {host}:{port}: {_first_leaf(os_errors)}") from group
    finally:
        if seeder is not None:
            seeder.close()  # already closed by seeder.run unless serving never started
    stats = app.statistics()
    print(f"stopped after {stats.requests} requests, {stats.bytes_total} bytes sent",
          flush=True)
    if seeder is not None:
        seeding = seeder.statistics()
        print(f"seeded {seeding.torrents_seeded} payloads, {seeding.bytes_uploaded_payload} "
              "bytes uploaded over BitTorrent", flush=True)
    return 0


def _read_swarm_ca(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SeederError(f"cannot read --swarm-ca {path}: {exc.strerror or exc}") from None


def _origin_dir(directory: Path) -> Path:
    """The origin directory of a repository, or ``directory`` itself if it is one.

    Raises:
        SeederError: neither (no ``metadata/`` inside).
    """
    if (directory / "repo.json").is_file() and (directory / "origin").is_dir():
        return directory / "origin"
    if not (directory / "metadata").is_dir():
        raise SeederError(f"{directory} is neither a repository nor an origin "
                          "directory (no metadata/ inside)")
    return directory


def _announce_relay(args: argparse.Namespace) -> AnnounceRelay | None:
    """With ``--identity``: the loopback relay that signs the seeder's announces.

    Raises:
        SeederError: unusable identity, TLS options, or not exactly one announce URL.
    """
    if args.identity is None:
        if args.tracker_ca_file or args.tracker_pins:
            raise SeederError("--tracker-ca-file and --tracker-pin need --identity")
        return None
    if len(args.announce_urls) != 1 or not args.announce_urls[0].endswith("/announce"):
        raise SeederError("--identity needs exactly one --announce-url ending in /announce")
    try:
        check_pinned_urls(args.tracker_pins, {"--announce-url": args.announce_urls[0]},
                          "--tracker-pin")
        identity = load_identity_dir(args.identity)
        tls = TlsPolicy(pins=frozenset(args.tracker_pins),
                        ca_file=None if args.tracker_ca_file is None else str(args.tracker_ca_file))
        http = HttpClient(timeout_s=30.0, tls=tls, identity=identity)
        return AnnounceRelay(http, args.announce_urls[0].removesuffix("/announce"))
    except (ConfigError, ValueError, OSError) as exc:
        raise SeederError(str(exc)) from None


def _seeding_config(args: argparse.Namespace,
                    relay: AnnounceRelay | None = None) -> SeedingConfig:
    """The seeder's settings from ``serve``'s options (announcing through ``relay``).

    Raises:
        SeederError: a bad listen host or announce URL.
    """
    host, port = args.seed_listen or (args.listen[0], DEFAULT_SEED_PORT)
    try:
        swarm = SwarmConfig(listen_host=host, listen_port=port,
                            upload_rate_limit_bytes_per_s=args.seed_upload_limit_bytes_per_s,
                            ssl_listen=relay is not None)
        if relay is None:
            return SeedingConfig(swarm=swarm, announce_urls=tuple(args.announce_urls))
        assert relay.http.identity is not None
        identity = relay.http.identity
        return SeedingConfig(swarm=swarm, announce_urls=(relay.announce_url,),
                             identity=(identity.cert_pem, identity.key_pem),
                             torrent_trackers=False)
    except ValueError as exc:
        raise SeederError(str(exc)) from None


def _print_seeding(seeder: PayloadSeeder, args: argparse.Namespace) -> None:
    stats = seeder.statistics()
    print(f"seeding {stats.torrents_seeded} payloads over BitTorrent at "
          f"{_format_address(*seeder.listen_address)} (TCP)", flush=True)
    if args.seed_upload_limit_bytes_per_s:
        print(f"  upload limit: {args.seed_upload_limit_bytes_per_s} bytes/s for all "
              "peers together", flush=True)
    for url in args.announce_urls:
        print(f"  announcing to {url}", flush=True)
    if stats.torrents_skipped:
        print(f"  skipped {stats.torrents_skipped} unusable torrent files (see the "
              "warnings)", flush=True)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- helpers ----------------------------------------------------------------------------


def _wrap(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn seeder errors (and OS errors at the edges) into ``error: ...`` and exit 2."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (SeederError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return _EXIT_ERROR

    return run


def _first_leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _tls_files(cert: Path | None, key: Path | None) -> tuple[str | None, str | None]:
    """``(certfile, keyfile)`` for :class:`ListenConfig`, checked before serving.

    Raises:
        SeederError: only one of the two given, a file unreadable, or not a usable
            PEM certificate and matching private key.
    """
    if cert is None and key is None:
        return None, None
    if cert is None or key is None:
        raise SeederError("--tls-cert and --tls-key go together: give both (HTTPS) or "
                          "neither (plain HTTP)")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise SeederError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise SeederError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate "
                          f"and its private key ({exc.reason or exc})") from None
    return str(cert), str(key)


_RATE_SUFFIXES = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3,
                  "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)")


def _rate_arg(text: str) -> int:
    """``"2500000"``, ``"2.5M"``, ``"20Mi"`` -> bytes per second (positive)."""
    match = _RATE_RE.fullmatch(text.strip())
    if match is None or match.group(2) not in _RATE_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"expected bytes per second like 2500000, 2.5M or 20Mi, got {text!r}")
    value = int(float(match.group(1)) * _RATE_SUFFIXES[match.group(2)])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive rate, got {text!r}")
    return value


def _rate_or_zero_arg(text: str) -> int:
    """Like :func:`_rate_arg`, and ``"0"`` means no limit."""
    if text.strip() == "0":
        return 0
    return _rate_arg(text)
