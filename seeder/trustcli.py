"""``swarmota seeder status|sign|export|import|discard|rotate|counter-reset|withdraw|renew|
rebuild|key``.

The key ceremony's commands (docs/SECURITY.md, "Key ceremony"), a thin shell over
:class:`seeder.repository.Repository`, :mod:`seeder.staging` (signing requests),
:mod:`seeder.keys` (key files) and :mod:`seeder.hsm` (keys in PKCS#11 tokens). Every
command that names ``REPO_OR_REQUEST`` works on a repository, or on a signing request
file copied to the machine where a key is (``seeder export``), so that offline keys
never travel. Seeder errors print as ``error: <message>`` with exit code 2.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from securesystemslib.signer import Key, Signer

from swarmota.manifest import release_target_name
from swarmota.seeder.errors import SigningError
from swarmota.seeder.hsm import TokenConfig, generate_token_key, token_signer
from swarmota.seeder.keys import (
    KEY_TYPES,
    generate_key,
    key_type_of,
    load_private_key,
    load_public_key,
    write_private_key,
    write_public_key,
)
from swarmota.seeder.publish import highest_counter
from swarmota.seeder.registration import Registration, add_register_options, prepare, release_files
from swarmota.seeder.repository import ROLES, Repository, Staged, named_key
from swarmota.seeder.staging import holder_name, read_request, write_request

__all__ = ["PIN_ENV", "add_commands", "describe_staged", "non_negative_int", "positive_int",
           "print_staged"]

PIN_ENV = "SWARMOTA_TOKEN_PIN"

Wrap = Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 wrap: Wrap) -> None:
    """Add the key ceremony's subcommands to ``seeder``'s ``sub``."""
    status = sub.add_parser(
        "status", help="keys, thresholds, live versions and what waits for signatures",
        description="Show a repository's roles (keys, thresholds, holders, which keys "
                    "this host holds), the live metadata versions and expiries, counter "
                    "resets, and the signing request waiting for signatures with who "
                    "signed what; or review a signing request file before signing it.")
    status.add_argument("target", metavar="REPO_OR_REQUEST", type=Path)
    status.set_defaults(func=wrap(_cmd_status))

    sign = sub.add_parser(
        "sign", help="add a signature to the staged release or root change",
        description="Sign the signing request of REPO (it goes live once every threshold "
                    "is met) or a signing request FILE (bring it back with 'seeder "
                    "import'). The key is a PEM file (--key, repeatable) or a key in a "
                    "PKCS#11 token (--token-library, --token-label, --key-label; the PIN "
                    f"from --pin-file, ${PIN_ENV} or a prompt). Review the request first "
                    "('seeder status'). With --register TRACKER_URL (on a repository), "
                    "the releases it makes live are registered with the tracker.")
    sign.add_argument("target", metavar="REPO_OR_REQUEST", type=Path)
    sign.add_argument("--key", action="append", type=Path, default=[], metavar="PEM",
                      dest="keys", help="private key file (Ed25519 or ECDSA P-256)")
    _token_options(sign)
    add_register_options(sign)
    sign.set_defaults(func=wrap(_cmd_sign))

    export = sub.add_parser(
        "export", help="write the staged signing request to a file",
        description="Copy REPO's signing request to FILE, to be signed where the keys "
                    "are ('seeder sign FILE --key ...') and brought back ('seeder "
                    "import'). It holds no secret.")
    export.add_argument("repo", metavar="REPO", type=Path)
    export.add_argument("out", metavar="FILE", type=Path)
    export.set_defaults(func=wrap(_cmd_export))

    imp = sub.add_parser(
        "import", help="merge the signatures of a signed request file",
        description="Add the valid signatures of FILE (a copy of REPO's signing request, "
                    "signed elsewhere) to REPO's request; it goes live once every "
                    "threshold is met. Signatures of keys the request does not need, or "
                    "that do not verify, are ignored; another request is refused. With "
                    "--register TRACKER_URL the releases it makes live are registered "
                    "with the tracker.")
    imp.add_argument("repo", metavar="REPO", type=Path)
    imp.add_argument("request", metavar="FILE", type=Path)
    add_register_options(imp)
    imp.set_defaults(func=wrap(_cmd_import))

    discard = sub.add_parser(
        "discard", help="drop the signing request",
        description="Drop REPO's signing request (a release that should not go live, a "
                    "rotation given up). Its payloads stay as unreferenced files.")
    discard.add_argument("repo", metavar="REPO", type=Path)
    discard.set_defaults(func=wrap(_cmd_discard))

    rotate = sub.add_parser(
        "rotate", help="replace the keys of a role (stages a new root)",
        description="Stage a new root version in which every key of ROLE is replaced "
                    "by the given public keys (--key, from their holders: 'seeder key "
                    "generate') and --generate new keys (snapshot and timestamp keys are "
                    "written to REPO/keys/, root and targets keys to REPO/offline/ for "
                    "their holders). The new root must be signed by a threshold of the "
                    "current root keys and of the new ones; a targets rotation also needs "
                    "the new targets keys to sign the targets again. Devices follow the "
                    "chain of roots; metadata signed by a rotated-out key is refused.")
    rotate.add_argument("repo", metavar="REPO", type=Path)
    rotate.add_argument("--role", required=True, choices=ROLES)
    rotate.add_argument("--key", action="append", default=[], metavar="[NAME=]PEM",
                        dest="keys", help="a new key's public (or private) PEM file; NAME "
                                          "(default: the file name) says who holds it")
    rotate.add_argument("--generate", type=non_negative_int, default=0, metavar="N",
                        help="generate N new keys")
    rotate.add_argument("--key-type", choices=KEY_TYPES, default="ed25519",
                        help="type of generated keys (default %(default)s)")
    rotate.add_argument("--threshold", type=positive_int, default=None, metavar="K",
                        help="signatures the role needs (default: as now, at most the "
                             "number of keys)")
    rotate.set_defaults(func=wrap(_cmd_rotate))

    reset = sub.add_parser(
        "counter-reset", help="let devices accept lower release counters again",
        description="Stage a new root carrying a counter reset for PRODUCT: devices whose "
                    "anti-rollback floor is above --floor (default: the highest counter "
                    "of the product's releases that will be live) lower it to --floor, "
                    "once. Recovers from a release with an absurd counter (signed by a "
                    "stolen targets key, or a typo): withdraw that release or rotate the "
                    "targets keys in the same request, then reset. Root keys must sign.")
    reset.add_argument("repo", metavar="REPO", type=Path)
    reset.add_argument("--product", required=True)
    reset.add_argument("--floor", type=non_negative_int, default=None, metavar="N")
    reset.set_defaults(func=wrap(_cmd_counter_reset))

    withdraw = sub.add_parser(
        "withdraw", help="stage targets without a release",
        description="Stage new targets metadata without PRODUCT VERSION: devices can no "
                    "longer install it. The targets keys must sign.")
    withdraw.add_argument("repo", metavar="REPO", type=Path)
    withdraw.add_argument("--product", required=True)
    withdraw.add_argument("--version", required=True)
    withdraw.set_defaults(func=wrap(_cmd_withdraw))

    renew = sub.add_parser(
        "renew", help="re-sign root or targets before they expire",
        description="Stage the next version of root or targets, same content, fresh "
                    "expiry. Snapshot and timestamp are renewed online by 'seeder "
                    "timestamp'; root and targets by their holders, with this.")
    renew.add_argument("repo", metavar="REPO", type=Path)
    renew.add_argument("--role", required=True, choices=("root", "targets"))
    renew.set_defaults(func=wrap(_cmd_renew))

    rebuild = sub.add_parser(
        "rebuild", help="rebuild a lost publishing host from the origin tree",
        description="Rebuild a repository from a copy of its origin tree (the CDN or any "
                    "mirror: it is public) into the new directory REPO. The copy is "
                    "verified first (the root chain from version 1, the live metadata, "
                    "every target, payload and torrent). With --keys (a backup of the old "
                    "REPO/keys/) and --settings (of REPO/repo.json) the repository is as "
                    "it was; without --keys, new snapshot and timestamp keys are made and "
                    "a root rotation to them is staged for the root holders to sign. See "
                    "docs/SECURITY.md, 'Backups'.")
    rebuild.add_argument("repo", metavar="REPO", type=Path, help="directory to create")
    rebuild.add_argument("--origin", required=True, type=Path, metavar="DIR",
                         help="a copy of the origin tree")
    rebuild.add_argument("--trusted-root", type=Path, required=True, metavar="FILE",
                         help="a root metadata file you kept (e.g. the root.json devices "
                              "are provisioned with): the copy must hold it byte for byte")
    rebuild.add_argument("--keys", type=Path, default=None, metavar="DIR",
                         help="a backup of the old REPO/keys/")
    rebuild.add_argument("--settings", type=Path, default=None, metavar="FILE",
                         help="a backup of the old REPO/repo.json (default lifetimes "
                              "otherwise)")
    rebuild.add_argument("--key-type", choices=KEY_TYPES, default="ed25519",
                         help="type of new online keys (default %(default)s)")
    rebuild.set_defaults(func=wrap(_cmd_rebuild))

    key = sub.add_parser("key", help="make a key holder's key (file or PKCS#11 token)")
    key_sub = key.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    gen = key_sub.add_parser(
        "generate", help="generate a signing key and write its public key",
        description="Generate a key for a root or targets key holder, on the holder's "
                    "own machine: NAME.pem (private, 0600) and NAME.pub.pem (public: give "
                    "it to the repository owner for 'seeder rotate --key'). With "
                    "--token-library the ECDSA P-256 key is generated inside the PKCS#11 "
                    "token (never extractable) and only NAME.pub.pem is written.")
    gen.add_argument("name", metavar="NAME", type=Path,
                     help="path prefix of the files, e.g. keys/alice")
    gen.add_argument("--type", choices=KEY_TYPES, default="ed25519", dest="key_type",
                     help="key type for a file key (default %(default)s; tokens: ecdsa)")
    _token_options(gen)
    gen.set_defaults(func=wrap(_cmd_key_generate))


# --- commands ----------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    if _is_repository(args.target):
        repo = Repository.open(args.target)
        _print_repository(repo)
        request = repo.staged()
        if request is None:
            print("staged: nothing waits for signatures")
        else:
            print("staged:")
            print("\n".join("  " + line for line in request.describe()))
        return 0
    request = read_request(args.target)
    print("\n".join(request.describe()))
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    signers: list[Signer] = [load_private_key(path) for path in args.keys]
    if args.token_library is not None:
        signers.append(token_signer(_token(args), args.key_label))
    if not signers:
        raise SigningError("give a key to sign with: --key PEM, or a PKCS#11 token key "
                           "(--token-library, --token-label, --key-label)")
    if _is_repository(args.target):
        repo = Repository.open(args.target)
        registration = prepare(args)  # bad settings or plan: fail before signing
        staged = None
        for signer in signers:
            what, staged = repo.sign(signer)
            print(f"signed {' and '.join(what)} with key {_key_line(signer.public_key)}")
            if staged.live:
                break
        assert staged is not None
        print_staged(repo, staged)
        return _register_live(repo, staged, registration)
    if args.register is not None:
        raise SigningError("--register needs the repository: registration happens where "
                           "the release goes live ('seeder import REPO FILE --register "
                           "URL')")
    request = read_request(args.target)
    for signer in signers:
        what = request.sign(signer)
        print(f"signed {' and '.join(what)} with key {_key_line(signer.public_key)}")
    write_request(args.target, request)
    state = ("every threshold is met" if request.ready
             else "more signatures needed")
    print(f"{args.target}: {state}; bring it back with 'swarmota seeder import REPO "
          f"{args.target}'")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    request = repo.staged()
    if request is None:
        raise SigningError(f"nothing waits for signatures in {args.repo}")
    write_request(args.out, request)
    print(f"wrote the signing request to {args.out}: review it ('seeder status "
          f"{args.out}'), sign it where the keys are ('seeder sign {args.out} --key "
          f"...'), bring it back ('seeder import {args.repo} {args.out}')")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    request = read_request(args.request)
    registration = prepare(args)  # bad settings or plan: fail before going live
    added, staged = repo.import_request(request)
    print(f"{added} new signature(s) from {args.request}")
    print_staged(repo, staged)
    return _register_live(repo, staged, registration)


def _register_live(repo: Repository, staged: Staged,
                   registration: Registration | None) -> int:
    """Register the releases ``staged`` made live, if asked to (0, or 1 when the tracker
    did not register them)."""
    if registration is None:
        return 0
    if not staged.live or staged.request is None:
        return registration.not_live("nothing went live yet")
    return registration.send(release_files(staged.request.target_files),
                             str(repo.targets_dir / "releases"))


def _cmd_discard(args: argparse.Namespace) -> int:
    dropped = Repository.open(args.repo).discard()
    if dropped is None:
        print("nothing was staged")
    else:
        print("discarded: " + "; ".join(dropped.changes))
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    keys = []
    for spec in args.keys:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name.split(".")[0], spec
        keys.append(named_key(load_public_key(Path(path)), name))
    staged, written = repo.rotate(args.role, public_keys=keys, generate=args.generate,
                                  key_type=args.key_type, threshold=args.threshold)
    for path in written:
        where = ("this host signs with it once the rotation is live"
                 if args.role in ("snapshot", "timestamp")
                 else "MOVE IT to its holder's offline machine or token")
        print(f"new {args.role} key {path}: {where}")
    print_staged(repo, staged)
    return 0


def _cmd_counter_reset(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    floor = args.floor
    if floor is None:
        floor = highest_counter(repo, args.product)
        if floor is None:
            raise SigningError(f"no release of {args.product} is published: give --floor")
        print(f"floor: {floor}, the highest counter of {args.product}'s releases that "
              "will be live (withdraw the absurd release first if it is still listed)")
    print_staged(repo, repo.counter_reset(args.product, floor=floor))
    return 0


def _cmd_withdraw(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    name = release_target_name(args.product, args.version)
    print_staged(repo, repo.stage_targets(remove=[name], note=f"withdraw {name}"))
    return 0


def _cmd_renew(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    print_staged(repo, repo.renew(args.role))
    return 0


def _cmd_rebuild(args: argparse.Namespace) -> int:
    try:
        anchor = args.trusted_root.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read --trusted-root {args.trusted_root}: "
                           f"{exc.strerror or exc}") from None
    repo, staged = Repository.rebuild(args.repo, args.origin, trusted_root=anchor,
                                      keys_backup=args.keys, settings=args.settings,
                                      key_type=args.key_type)
    versions = repo.versions()
    print(f"rebuilt {repo.path} from {args.origin}: verified root version "
          f"{versions['root']}, targets {versions['targets']} "
          f"({len(repo.targets())} targets)")
    if staged is not None:
        print("new snapshot and timestamp keys are in keys/; root must sign them in:")
        print_staged(repo, staged)
        print("if the targets key was on the lost host too, add its rotation to the same "
              f"request first: 'swarmota seeder rotate {repo.path} --role targets ...'")
    return 0


def _cmd_key_generate(args: argparse.Namespace) -> int:
    public_path = args.name.with_name(args.name.name + ".pub.pem")
    if args.token_library is not None:
        key = generate_token_key(_token(args), args.key_label)
        write_public_key(public_path, key)
        print(f"generated ECDSA P-256 key {args.key_label!r} in token "
              f"{args.token_label!r} (not extractable)")
    else:
        private_path = args.name.with_name(args.name.name + ".pem")
        if private_path.exists():
            raise SigningError(f"{private_path} exists; keys are never overwritten")
        signer = generate_key(args.key_type)
        write_private_key(private_path, signer)
        key = signer.public_key
        write_public_key(public_path, key)
        print(f"private key: {private_path} (mode 0600: keep it on this machine)")
    print(f"public key:  {public_path} (give it to the repository owner)")
    print(f"keyid:       {key.keyid} ({key_type_of(key)})")
    return 0


# --- output ------------------------------------------------------------------------------


def print_staged(repo: Repository, staged: Staged) -> None:
    """Say whether a change is live, or what it waits for and how to sign it."""
    for line in describe_staged(repo, staged):
        print(line)


def describe_staged(repo: Repository, staged: Staged) -> list[str]:
    if staged.request is None:
        return ["nothing changed"]
    if staged.live:
        versions = repo.versions()
        return [f"LIVE: root version {versions['root']}, targets version "
                f"{versions['targets']}, snapshot {versions['snapshot']}, timestamp "
                f"{versions['timestamp']}"]
    lines = ["staged, waiting for signatures (nothing changes for devices until then):"]
    lines += ["  " + line for line in staged.request.describe()]
    lines.append(f"sign: 'swarmota seeder sign {repo.path} --key KEY.pem' where a key is, "
                 f"or 'swarmota seeder export {repo.path} request.json' to carry it there")
    return lines


def _print_repository(repo: Repository) -> None:
    root = repo.root()
    local = {k for keyids in repo.local_roles().values() for k in keyids}
    expirations = repo.expirations()
    versions = repo.versions()
    print(f"repository {repo.path}")
    for role in ROLES:
        spec = root.roles[role]
        print(f"  {role}: {spec.threshold} of {len(spec.keyids)} keys, version "
              f"{versions[role]}, expires {expirations[role].isoformat()}")
        for keyid in spec.keyids:
            key = root.keys[keyid]
            where = "on this host (keys/)" if keyid in local else "offline"
            print(f"    {keyid[:16]} {holder_name(key)} ({key_type_of(key)}, {where})")
    now = datetime.now(UTC)
    for role, when in expirations.items():
        if when <= now:
            print(f"  warning: {role} metadata EXPIRED at {when.isoformat()}")
    for product, reset in sorted(repo.counter_resets().items()):
        print(f"  counter reset of {product}: epoch {reset.epoch}, floor {reset.floor}")


def _key_line(key: Key) -> str:
    return f"{key.keyid[:16]} {holder_name(key) if holder_name(key) != '?' else ''}".strip()


# --- helpers ----------------------------------------------------------------------------


def _is_repository(path: Path) -> bool:
    if (path / "repo.json").is_file():
        return True
    if path.is_file():
        return False
    raise SigningError(f"{path} is neither a repository nor a signing request file")


def _token_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PKCS#11 token (HSM, smart card, SoftHSM2)")
    group.add_argument("--token-library", type=Path, default=None, metavar="SO",
                       help="the token's PKCS#11 module, e.g. "
                            "/usr/lib/softhsm/libsofthsm2.so")
    group.add_argument("--token-label", default=None, metavar="LABEL",
                       help="label of the token")
    group.add_argument("--key-label", default=None, metavar="LABEL",
                       help="label of the key in the token")
    group.add_argument("--pin-file", type=Path, default=None, metavar="FILE",
                       help=f"file holding the user PIN (default: ${PIN_ENV}, else a "
                            "prompt)")


def _token(args: argparse.Namespace) -> TokenConfig:
    if not args.token_label or not args.key_label:
        raise SigningError("a token key needs --token-library, --token-label and "
                           "--key-label")
    return TokenConfig(args.token_library, args.token_label, _pin(args))


def _pin(args: argparse.Namespace) -> str:
    pin_file: Path | None = args.pin_file
    if pin_file is not None:
        try:
            return pin_file.read_text().strip()
        except OSError as exc:
            raise SigningError(f"cannot read --pin-file {args.pin_file}: "
                               f"{exc.strerror or exc}") from None
    env = os.environ.get(PIN_ENV)
    if env:
        return env
    if sys.stdin.isatty():
        return getpass.getpass(f"PIN of token {args.token_label}: ")
    raise SigningError(f"the token's PIN: give --pin-file or set ${PIN_ENV}")


def positive_int(text: str) -> int:
    """An argparse type: an integer above 0."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value

