"""``swarmota peer``: provision a device, run an update pass or the daemon, show status."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from infra.fsio import atomic_write_bytes, fsync_dir
from peer.agent import UpdateResult, update_once
from peer.components import ComponentStore
from peer.config import DOWNLOAD_MODES, DeviceConfig
from peer.daemon import DaemonConfig, run_daemon
from peer.errors import ConfigError, StatusCode, resource_failure
from peer.floors import read_floors
from peer.identity import install_identity
from peer.install_policy import load_policy
from peer.state import DeviceState, JournalError, init_device

__all__ = ["add_parser"]


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
    init.add_argument("--device-id", required=True)
    init.add_argument("--product", required=True)
    init.add_argument("--hardware-id", required=True)
    init.add_argument("--health-command", default="",
                      help="command run on the new slot after a switch; exit 0 = healthy "
                           "(env: SWARMOTA_SLOT, SWARMOTA_SLOT_IMAGE, SWARMOTA_VERSION)")
    init.add_argument("--health-timeout-s", type=float, default=60.0)
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
    init.add_argument("--battery-file", default=None, metavar="PATH",
                      help="file holding the battery percentage; no upload below "
                           "--min-battery-percent (or when unreadable)")
    init.add_argument("--min-battery-percent", type=int, default=30)
    init.add_argument("--tls-pin", action="append", default=[], metavar="PIN",
                      dest="tls_pins",
                      help="SPKI pin (sha256/BASE64, from 'swarmota tls pin') of a key the "
                           "origin or tracker may use; repeat for each server key and at "
                           "least one spare key. With pins, both URLs must be https:// and "
                           "a server with any other key is refused before anything is sent")
    init.add_argument("--tls-ca-file", default=None, metavar="PEM",
                      help="CA certificate(s) to trust instead of the system store, e.g. "
                           "the ca.pem of 'swarmota tls ca'")
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
    init.add_argument("--force", action="store_true", help="re-provision an existing directory")
    init.set_defaults(func=_init)

    update = sub.add_parser(
        "update", help="check in and install an offered update",
        description="One update pass: check in with the tracker; if a release is offered, "
                    "verify and install it into the inactive slot, switch, health-check, "
                    "commit or roll back, and report. Exit code: the status code "
                    "(0 ok, 10 download, 20 verify, 30 install, 40 post-check failed).")
    update.add_argument("state", type=Path)
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
    run.add_argument("state", type=Path)
    run.add_argument("--poll-interval-s", type=float, default=None,
                     help="seconds between passes (default: what the tracker asks for)")
    run.add_argument("--jitter-fraction", type=float, default=0.1,
                     help="random jitter, a fraction of the interval either way "
                          "(default %(default)s)")
    run.add_argument("--backoff-initial-s", type=float, default=30.0)
    run.add_argument("--backoff-max-s", type=float, default=3600.0)
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
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="show slots, versions and the last result")
    status.add_argument("state", type=Path)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)


def _init(args: argparse.Namespace) -> int:
    try:
        config = DeviceConfig(
            device_id=args.device_id, product=args.product, hardware_id=args.hardware_id,
            origin_url=args.origin, tracker_url=args.tracker,
            health_command=tuple(shlex.split(args.health_command)),
            health_timeout_s=args.health_timeout_s, download_concurrency=args.concurrency,
            download_mode=args.download_mode, swarm_listen=args.swarm_listen,
            download_rate_limit_bytes_per_s=args.download_limit,
            upload_rate_limit_bytes_per_s=args.upload_limit, seed_time_s=args.seed_time_s,
            network_metered=args.metered, battery_percent_path=args.battery_file,
            swarm_local_discovery=args.swarm_local_discovery,
            min_battery_percent_to_upload=args.min_battery_percent,
            tls_pins=tuple(args.tls_pins), tls_ca_file=_ca_file(args.tls_ca_file))
        if (args.identity_cert is None) != (args.identity_key is None):
            raise ConfigError("--identity-cert and --identity-key go together")
        root = args.root.read_bytes()
        policy = None
        if args.policy is not None:
            if not args.policy.is_file():
                raise ConfigError(f"policy {args.policy} does not exist")
            load_policy(args.policy)  # refuse a bad file before provisioning anything
            policy = args.policy.read_bytes()

        def provision(directory: Path) -> None:
            state = init_device(directory, config, root_json=root, image=args.image,
                                version=args.version, release_counter=args.release_counter,
                                force=args.force)
            if policy is not None:
                atomic_write_bytes(state.policy_path, policy)
            if args.identity_cert is not None:
                install_identity(state.root, args.identity_cert, args.identity_key,
                                 config.device_id)

        _provision_whole(args.state, provision,
                         check=None if args.identity_cert is None else lambda tmp:
                         install_identity(tmp, args.identity_cert, args.identity_key,
                                          config.device_id))
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"device {config.device_id} provisioned in {args.state} "
          f"(slot a: {args.version}, counter {args.release_counter})")
    return 0


def _provision_whole(target: Path, provision: Callable[[Path], None],
                     check: Callable[[Path], None] | None = None) -> None:
    """Run ``provision`` so that a failure leaves no half-made state directory.

    A new device (``target`` missing or an empty directory) is built in a temporary
    directory beside it and renamed into place once complete; on failure the temporary
    directory goes and ``target`` is as it was. Re-provisioning (``--force``) changes
    the device in place, keeping its identity's request counter: ``check`` (run on a
    scratch directory) validates first what can be refused (the identity files).

    Raises:
        ConfigError, OSError: as ``provision`` or ``check``.
    """
    fresh = not target.exists() or (target.is_dir() and not any(target.iterdir()))
    if not fresh:
        if check is not None:
            with tempfile.TemporaryDirectory(prefix=".swarmota-check-") as scratch:
                check(Path(scratch))
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


def _ca_file(path: str | None) -> str | None:
    """The absolute path of a readable CA bundle (the device config outlives the cwd)."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    resolved.read_bytes()  # OSError: reported by _init
    return str(resolved)


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

        def on_result(result: UpdateResult, delay_s: float) -> None:
            print(f"{_now()} status {int(result.status)}: {result.message} (next pass in "
                  f"{delay_s:.0f} s)", flush=True)

        errors: list[ConfigError] = []

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for signum in signals:
                            print(f"{_now()} {signal.Signals(signum).name}: stopping",
                                  flush=True)
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(stop_on_signal)
                try:
                    await run_daemon(state, config, on_result=on_result)
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
    try:
        floors = read_floors(state.root, bc, store)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"device": config.to_json(), "bootctl": bc.to_json(),
                          "last_result": last, "progress": progress, "journal": journal,
                          "components": components,
                          "floors": {"image": floors.image,
                                     "components": dict(floors.components)}},
                         indent=2, sort_keys=True))
        return 0
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
    print(f"  anti-rollback floor of images: release counter {floors.image}")
    for name, record in components.items():
        cur = record["current"]
        print(f"  component {name}: {cur['version'] if cur else '(none)'}"
              f"{'  (switch pending)' if record['pending'] else ''}, anti-rollback floor "
              f"{floors.of(name)}")
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
    return 0


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
