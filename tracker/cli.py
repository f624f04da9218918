"""``swarmota tracker ...``: run the tracker and manage its release catalogue.

    swarmota tracker serve --db PATH [--listen HOST:PORT] [--poll-after-s N]
    swarmota tracker release add --db PATH MANIFEST_FILE
    swarmota tracker release list --db PATH
    swarmota tracker reports --db PATH [--device ID]
    swarmota tracker devices --db PATH

Every leaf command sets ``func(args) -> int``. Exit codes: 0 success, 1 runtime failure
(storage, address in use, release conflict), 2 bad input (unreadable or invalid
manifest file; argparse uses 2 for bad arguments too).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from infra.http_serve import ListenConfig, parse_listen
from manifest import MAX_MANIFEST_BYTES, ManifestFormatError, parse_release_manifest
from tracker.catalogue import register_release
from tracker.config import DEFAULT_POLL_AFTER_S, TrackerConfig
from tracker.errors import ConflictError, RequestError, StorageError
from tracker.protocol import DEVICE_ID_RE, STATUS_NAMES, Release
from tracker.rollout import RolloutPlan
from tracker.server import serve_tracker
from tracker.store import SqliteStore

__all__ = ["DEFAULT_LISTEN", "add_parser"]

DEFAULT_LISTEN = "127.0.0.1:8470"
_MAX_POLL_AFTER_S = 7 * 24 * 3600


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
                    "of registered releases, until interrupted (Ctrl-C).",
    )
    _add_db(serve, "created if it does not exist")
    serve.add_argument("--listen", metavar="HOST:PORT", type=_listen_arg,
                       default=_listen_arg(DEFAULT_LISTEN),
                       help=f"address to listen on (default {DEFAULT_LISTEN}; IPv6 as "
                            "[::1]:PORT; port 0 picks a free port)")
    serve.add_argument("--poll-after-s", metavar="N", type=_poll_arg,
                       default=DEFAULT_POLL_AFTER_S,
                       help="seconds devices should wait between check-ins "
                            f"(default {DEFAULT_POLL_AFTER_S})")
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


# --- commands ---------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the tracker until Ctrl-C; 0 after a clean stop, 1 if it cannot start."""
    host, port = args.listen
    config = TrackerConfig(db_path=args.db, listen=ListenConfig(host=host, port=port),
                           poll_after_s=args.poll_after_s)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(functools.partial(serve_tracker, config))
            print(f"tracker listening on {url} (database {config.db_path}); "
                  "Ctrl-C to stop", flush=True)

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
    except (StorageError, OSError) as exc:
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
                               stages_percent=args.stages, soak_s=args.soak_s)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with SqliteStore(args.db) as store:
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
        names = rollout.plan.stage_names[0 if rollout.plan.canary_devices else 1:]
        print(f"rollout {rollout.rollout_id}: {rollout.phase} at stage {rollout.stage_name} "
              f"of {', '.join(names)}")
    return 0


def cmd_release_list(args: argparse.Namespace) -> int:
    """Print the release catalogue as a table."""
    def rows(store: SqliteStore) -> list[list[str]]:
        return [[release.product, release.version, str(release.release_counter),
                 release.target, _when(added_at),
                 " ".join(f"{s.payload_kind}:{s.info_hash}" for s in release.swarms) or "-"]
                for release, added_at in store.registered_releases()]

    return _print_table(args.db, ["PRODUCT", "VERSION", "COUNTER", "TARGET", "ADDED (UTC)",
                                  "INFO-HASHES (v2, SHA-256)"],
                        rows, "no releases registered")


def cmd_reports(args: argparse.Namespace) -> int:
    """Print stored reports as a table."""
    def rows(store: SqliteStore) -> list[list[str]]:
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
    def rows(store: SqliteStore) -> list[list[str]]:
        return [[d.device_id, d.product, d.hardware_id, d.version, str(d.release_counter),
                 _when(d.last_seen)] for d in store.devices()]

    return _print_table(args.db, ["DEVICE", "PRODUCT", "HARDWARE", "VERSION", "COUNTER",
                                  "LAST SEEN (UTC)"], rows, "no devices have checked in")


# --- helpers ----------------------------------------------------------------------------


def _add_db(parser: argparse.ArgumentParser, note: str) -> None:
    parser.add_argument("--db", metavar="PATH", type=Path, required=True,
                        help=f"tracker SQLite database file ({note})")


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
    if not 0 <= value <= _MAX_POLL_AFTER_S:
        raise argparse.ArgumentTypeError(f"{value} outside 0..{_MAX_POLL_AFTER_S}")
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
    """The first StorageError/OSError in a (nested) group, if that is all it holds."""
    matched, rest = group.split((StorageError, OSError))
    if matched is None or rest is not None:
        return None
    exc: BaseException = matched
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _print_table(db: Path, header: Sequence[str],
                 rows_of: Callable[[SqliteStore], list[list[str]]], empty: str) -> int:
    try:
        with SqliteStore(db, create=False) as store:
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
