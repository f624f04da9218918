"""Signing requests: the next state of a repository, waiting for its signatures.

Everything that changes what devices trust or install goes through a signing request
first: a release (new targets metadata and the release manifests it names), a withdrawn
release, a key rotation, a counter reset, a renewal (new root metadata, and new targets
metadata when the targets keys change). The request is one JSON file,
``REPO/staged.json`` while it waits, that can be copied to the machines where the keys
are (``swarmota seeder export``), signed there (``seeder sign FILE --key ...``) and
brought back (``seeder import``); it goes live only once every threshold is met.

What a request must collect (:meth:`SigningRequest.requirements`):

- a new root version: a threshold of the **current** root keys *and* a threshold of the
  **new** root keys (TUF: each root is signed by its predecessor's keys and its own),
- new targets metadata: a threshold of the targets keys of the root that will be live
  (the new one when the request also changes root);
- new metadata of a product's delegated targets role (``releases-<product>``, which
  lists the product's release manifests: :func:`delegated_role`): the same, a threshold
  of the targets keys (top-level targets delegates each product to them).

Snapshot and timestamp are signed at go-live by the online keys
(:mod:`seeder.repository`): they never sign anything a device installs.

A request carries the root it builds on (``base_root``) so that a signer can review and
sign it anywhere, without the repository: :meth:`SigningRequest.describe` lists the
releases (parsed from the manifests inside, checked against the targets' hashes) and
the key changes. Signatures are checked as they are added and merged; the request's
content cannot change under a signature (amending it drops every signature).

Pure apart from :func:`read_request` / :func:`write_request`. Errors:
:class:`seeder.errors.SigningError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError

from swarmota.infra.fsio import atomic_write_bytes
from swarmota.manifest import (
    COUNTER_RESETS_FIELD,
    ManifestFormatError,
    parse_compact_pin,
    parse_counter_resets,
    parse_release_manifest,
)
from swarmota.seeder.errors import SigningError

__all__ = [
    "DELEGATED_ROLE_PREFIX",
    "HOLDER_FIELD",
    "MAX_REQUEST_BYTES",
    "REQUEST_FORMAT",
    "Requirement",
    "SigningRequest",
    "delegated_role",
    "delegation_paths",
    "holder_name",
    "read_request",
    "write_request",
]

REQUEST_FORMAT = "swarmota-signing-request"
_REQUEST_FORMAT_VERSION = 1
_DELEGATED_FORMAT_VERSION = 2  # a request with delegated roles ("delegated")
DELEGATED_ROLE_PREFIX = "releases-"
_RELEASE_NAME_RE = re.compile(r"releases/([a-z0-9][a-z0-9._-]{0,63})/[^/]+")
MAX_REQUEST_BYTES = 256 * 1024 * 1024
HOLDER_FIELD = "x-swarmota-holder"
"""Custom field of a key in root metadata: who holds it (shown by ``seeder status``)."""

_S = TypeVar("_S", Root, Targets)


def delegated_role(target_name: str) -> str | None:
    """The delegated targets role that lists ``target_name``: ``releases-<product>`` for
    a release manifest ``releases/<product>/<file>``; ``None`` for any other target
    (listed by top-level targets). One role per product, so that a device downloads the
    metadata of its own product only, and a release re-signs its product's list."""
    match = _RELEASE_NAME_RE.fullmatch(target_name)
    return None if match is None else DELEGATED_ROLE_PREFIX + match.group(1)


def delegation_paths(role: str) -> list[str]:
    """The target path patterns top-level targets delegates to ``role``."""
    return [f"releases/{role.removeprefix(DELEGATED_ROLE_PREFIX)}/*"]


def holder_name(key: Key | None) -> str:
    """The holder's name recorded with ``key`` in root, or ``"?"``."""
    if key is None:
        return "?"
    name = key.unrecognized_fields.get(HOLDER_FIELD)
    return name if isinstance(name, str) and name else "?"


@dataclass(frozen=True)
class Requirement:
    """One threshold a request must meet: ``threshold`` of ``keyids`` (the ``role`` keys
    of root version ``authority``) must sign ``metadata`` (``root`` or ``targets``)."""

    metadata: str
    role: str
    authority: int
    threshold: int
    keyids: tuple[str, ...]
    signed: tuple[str, ...]

    @property
    def met(self) -> bool:
        return len(self.signed) >= self.threshold

    @property
    def missing(self) -> int:
        return max(0, self.threshold - len(self.signed))


@dataclass
class SigningRequest:
    """The next state of a repository and the signatures it has so far.

    ``base_root``: the root live when the request was made; ``root``: a new root
    version (or ``None``); ``targets``: new top-level targets metadata (or ``None``);
    ``delegated``: new metadata of delegated targets roles, by role name
    (:func:`delegated_role`); ``target_files``: the new target files (release
    manifests) by target name; ``changes``: what the request does, one line each.
    """

    base_root: Metadata[Root]
    root: Metadata[Root] | None = None
    targets: Metadata[Targets] | None = None
    target_files: dict[str, bytes] = field(default_factory=dict)
    delegated: dict[str, Metadata[Targets]] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        self.check()

    # --- what it needs ----------------------------------------------------------------

    @property
    def next_root(self) -> Root:
        """The root that will be live once the request is: the new one, or the base."""
        return (self.root or self.base_root).signed

    def requirements(self) -> list[Requirement]:
        """Every threshold the request must meet, with the keys that signed so far."""
        out: list[Requirement] = []
        if self.root is not None:
            for authority in (self.base_root.signed, self.root.signed):
                req = _requirement("root", "root", authority, self.root)
                if not any(r.keyids == req.keyids and r.threshold == req.threshold
                           for r in out):
                    out.append(req)
        if self.targets is not None:
            out.append(_requirement("targets", "targets", self.next_root, self.targets))
        for name, md in sorted(self.delegated.items()):
            out.append(_requirement(name, "targets", self.next_root, md))
        return out

    def metadata(self) -> Iterator[tuple[str, Metadata[Any]]]:
        """Every metadata of the request that needs signatures, by name (``root``,
        ``targets``, delegated role names)."""
        if self.root is not None:
            yield "root", self.root
        if self.targets is not None:
            yield "targets", self.targets
        yield from sorted(self.delegated.items())

    def target_entry(self, name: str) -> TargetFile | None:
        """The entry the request signs for target ``name``: in its product's delegated
        role when the request changes that role, else in top-level targets."""
        role = delegated_role(name)
        if role is not None and role in self.delegated:
            return self.delegated[role].signed.targets.get(name)
        return None if self.targets is None else self.targets.signed.targets.get(name)

    @property
    def ready(self) -> bool:
        """True once every threshold is met: the request may go live."""
        return all(r.met for r in self.requirements())

    def key(self, keyid: str) -> Key | None:
        """The key ``keyid`` as the new or the base root lists it."""
        for root in (self.next_root, self.base_root.signed):
            if keyid in root.keys:
                return root.keys[keyid]
        return None

    # --- signing ----------------------------------------------------------------------

    def sign(self, signer: Signer) -> list[str]:
        """Add ``signer``'s signature to every metadata of the request that needs its
        key; return what it signed (``["root"]``, ``["targets"]``, or both).

        Raises:
            SigningError: the key is not one the request needs, the signer fails, or its
                signature does not verify with the key root lists (a wrong key in a
                token, say).
        """
        keyid = signer.public_key.keyid
        signed: list[str] = []
        for name, md in self.metadata():
            if not any(keyid in r.keyids for r in self.requirements() if r.metadata == name):
                continue
            key = self.key(keyid)
            if key is None or key.keyval != signer.public_key.keyval:
                raise SigningError(f"key {keyid[:16]} does not match the key root lists "
                                   "under that keyid")
            try:
                signature = md.sign(signer, append=True)
            except SigningError:
                raise
            except Exception as exc:  # a Signer may raise anything (PKCS#11, OS errors)
                raise SigningError(f"key {keyid[:16]} could not sign {name}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            try:
                key.verify_signature(signature, md.signed_bytes)
            except UnverifiedSignatureError as exc:
                del md.signatures[keyid]
                raise SigningError(f"the signature of key {keyid[:16]} over {name} does "
                                   "not verify: the signer used another key") from exc
            signed.append(name)
        if not signed:
            raise SigningError(f"key {keyid[:16]} ({signer.public_key.keytype}) is not a "
                               "key this request needs; it needs: " + self._needed_keys())
        return signed

    def merge(self, other: SigningRequest) -> int:
        """Add the valid signatures of ``other`` (the same request, signed elsewhere);
        return how many were new.

        Raises:
            SigningError: ``other`` is another request (other content or base).
        """
        if not self.same_content(other):
            raise SigningError("the signing request differs from the one staged (another "
                               "release or change, or the repository moved on); sign the "
                               "staged request ('seeder export' writes it)")
        added = 0
        others = dict(other.metadata())
        for name, mine in self.metadata():
            theirs = others.get(name)
            if theirs is None:
                continue
            wanted = {k for r in self.requirements() if r.metadata == name for k in r.keyids}
            for keyid, signature in theirs.signatures.items():
                key = self.key(keyid)
                if keyid not in wanted or keyid in mine.signatures or key is None:
                    continue
                try:
                    key.verify_signature(signature, mine.signed_bytes)
                except UnverifiedSignatureError:
                    continue
                mine.signatures[keyid] = signature
                added += 1
        return added

    def same_content(self, other: SigningRequest) -> bool:
        """True if ``other`` asks for the same new state on the same base."""
        def signed(md: Metadata[Any] | None) -> bytes | None:
            return None if md is None else md.signed_bytes
        return (signed(self.base_root) == signed(other.base_root)
                and signed(self.root) == signed(other.root)
                and signed(self.targets) == signed(other.targets)
                and {n: signed(md) for n, md in self.delegated.items()}
                == {n: signed(md) for n, md in other.delegated.items()}
                and self.target_files == other.target_files)

    def signature_holders(self, name: str) -> set[str]:
        """Keyids with a signature on ``name`` (``root``, ``targets`` or a delegated
        role)."""
        md = dict(self.metadata()).get(name)
        return set() if md is None else set(md.signatures)

    # --- checks and display -----------------------------------------------------------

    def check(self) -> None:
        """Check the request is well formed: root version follows the base, every
        target file matches the length and hashes targets signs for it.

        Raises:
            SigningError: naming the fault.
        """
        if self.root is None and self.targets is None and not self.delegated:
            raise SigningError("a signing request must change root or targets")
        base = self.base_root.signed
        if self.root is not None and self.root.signed.version != base.version + 1:
            raise SigningError(f"the new root is version {self.root.signed.version}, not "
                               f"{base.version + 1} (the base root is version {base.version})")
        if self.root is not None:
            try:
                parse_counter_resets(self.root.signed.unrecognized_fields.get(
                    COUNTER_RESETS_FIELD))
            except ManifestFormatError as exc:
                raise SigningError(f"the new root's counter resets: {exc}") from exc
        for role, md in self.delegated.items():
            if not role.startswith(DELEGATED_ROLE_PREFIX) or md.signed.delegations:
                raise SigningError(f"delegated role {role}: not a product's release list")
            stray = [n for n in md.signed.targets if delegated_role(n) != role]
            if stray:
                raise SigningError(f"delegated role {role} lists {stray[0]}, which is not "
                                   "a release of its product")
        for name, data in self.target_files.items():
            target = self.target_entry(name)
            if target is None:
                raise SigningError(f"target file {name} is not in the targets metadata")
            try:
                target.verify_length_and_hashes(data)
            except LengthOrHashMismatchError as exc:
                raise SigningError(f"target file {name} does not match the targets "
                                   f"metadata: {exc}") from exc
            _check_compact_pin(name, data, target.custom)

    def describe(self) -> list[str]:
        """What the request does and who signed it, for humans (``seeder status``)."""
        base_sha = hashlib.sha256(self.base_root.signed_bytes).hexdigest()
        lines = [f"signing request made {self.created.isoformat(timespec='seconds')}, on "
                 f"root version {self.base_root.signed.version} (sha256 {base_sha[:16]})"]
        lines += [f"  change: {change}" for change in self.changes]
        for name, data in sorted(self.target_files.items()):
            lines.append(f"  target {name}: {_release_line(data)}")
        if self.targets is not None:
            t = self.targets.signed
            roles = len(t.delegations.roles or {}) if t.delegations else 0
            lines.append(f"  targets version {t.version}: {len(t.targets)} targets, {roles} "
                         f"delegated roles, expires {t.expires.isoformat()}")
        for name, md in sorted(self.delegated.items()):
            d = md.signed
            lines.append(f"  {name} version {d.version}: {len(d.targets)} targets, expires "
                         f"{d.expires.isoformat()}")
        if self.root is not None:
            lines += ["  " + line for line in _root_changes(self.base_root.signed,
                                                           self.root.signed)]
        for req in self.requirements():
            state = "met" if req.met else f"{req.missing} more needed"
            lines.append(f"  {req.metadata}: {req.threshold} of the {req.role} keys of "
                         f"root version {req.authority}: {len(req.signed)} signed, {state}")
            for keyid in req.keyids:
                who = holder_name(self.key(keyid))
                mark = "signed " if keyid in req.signed else "missing"
                lines.append(f"    [{mark}] {keyid[:16]} {who}")
        lines.append("  READY: every threshold is met" if self.ready
                     else "  waiting for signatures")
        return lines

    def _needed_keys(self) -> str:
        parts = []
        for req in self.requirements():
            missing = [f"{k[:16]} ({holder_name(self.key(k))})"
                       for k in req.keyids if k not in req.signed]
            parts.append(f"{req.metadata}: {req.missing} of {', '.join(missing) or 'none'}")
        return "; ".join(parts)

    # --- encoding ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": REQUEST_FORMAT,
            "format_version": (_DELEGATED_FORMAT_VERSION if self.delegated
                               else _REQUEST_FORMAT_VERSION),
            "created": self.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "changes": list(self.changes),
            "base_root": self.base_root.to_dict(),
            "root": None if self.root is None else self.root.to_dict(),
            "targets": None if self.targets is None else self.targets.to_dict(),
            "target_files": {name: base64.b64encode(data).decode("ascii")
                             for name, data in sorted(self.target_files.items())},
        }
        if self.delegated:  # absent otherwise: older seeders read such requests
            doc["delegated"] = {name: md.to_dict()
                                for name, md in sorted(self.delegated.items())}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "signing request") -> SigningRequest:
        """Parse and check a request.

        Raises:
            SigningError: not a signing request, malformed, or inconsistent.
        """
        if len(data) > MAX_REQUEST_BYTES:
            raise SigningError(f"{where} is larger than {MAX_REQUEST_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise SigningError(f"{where} is not JSON: {exc}") from exc
        keys = {"format", "format_version", "created", "changes", "base_root", "root",
                "targets", "target_files"}
        if not isinstance(doc, dict) or doc.get("format") != REQUEST_FORMAT:
            raise SigningError(f"{where} is not a swarmota signing request")
        version = doc.get("format_version")
        if version == _DELEGATED_FORMAT_VERSION:
            keys.add("delegated")
        if version not in (_REQUEST_FORMAT_VERSION, _DELEGATED_FORMAT_VERSION) \
                or set(doc) != keys:
            raise SigningError(f"{where}: unsupported format version or fields")
        delegated_raw = doc.get("delegated", {})
        if not isinstance(delegated_raw, dict) or (version == _DELEGATED_FORMAT_VERSION
                                                   and not delegated_raw):
            raise SigningError(f"{where}: delegated must map role names to metadata")
        changes, files = doc["changes"], doc["target_files"]
        if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
            raise SigningError(f"{where}: changes must be a list of strings")
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise SigningError(f"{where}: target_files must map names to base64")
        try:
            created = datetime.strptime(doc["created"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=UTC)
            target_files = {name: base64.b64decode(v, validate=True)
                            for name, v in files.items()}
        except (TypeError, ValueError, binascii.Error) as exc:
            raise SigningError(f"{where}: {exc}") from exc
        return cls(base_root=_metadata(doc["base_root"], Root, where),
                   root=None if doc["root"] is None else _metadata(doc["root"], Root, where),
                   targets=(None if doc["targets"] is None
                            else _metadata(doc["targets"], Targets, where)),
                   target_files=target_files, changes=changes, created=created,
                   delegated={str(name): _metadata(md, Targets, f"{where}: {name}")
                              for name, md in delegated_raw.items()})


def read_request(path: Path) -> SigningRequest:
    """Read a signing request file.

    Raises:
        SigningError: unreadable, or not a valid request.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        raise SigningError(f"cannot read signing request {path}: "
                           f"{exc.strerror or exc}") from exc
    return SigningRequest.from_bytes(data, str(path))


def write_request(path: Path, request: SigningRequest) -> None:
    """Write a signing request file atomically (mode 0644: it holds no secret).

    Raises:
        SigningError: the file cannot be written.
    """
    try:
        atomic_write_bytes(path, request.to_bytes(), mode=0o644)
    except OSError as exc:
        raise SigningError(f"cannot write signing request {path}: {exc}") from exc


# --- helpers ----------------------------------------------------------------------------

def _requirement(metadata: str, role: str, authority: Root,
                 md: Metadata[Any]) -> Requirement:
    result = authority.get_verification_result(role, md.signed_bytes, md.signatures)
    keyids = tuple(authority.roles[role].keyids)
    return Requirement(metadata=metadata, role=role, authority=authority.version,
                       threshold=result.threshold, keyids=keyids,
                       signed=tuple(k for k in keyids if k in result.signed))


def _metadata(raw: Any, signed_type: type[_S], where: str) -> Metadata[_S]:
    if not isinstance(raw, dict):
        raise SigningError(f"{where}: metadata must be an object")
    try:
        md: Metadata[Any] = Metadata.from_dict(json.loads(json.dumps(raw)))
    except (DeserializationError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SigningError(f"{where}: invalid TUF metadata: {exc}") from exc
    if not isinstance(md.signed, signed_type):
        raise SigningError(f"{where}: {md.signed.type} metadata where "
                           f"{signed_type.type} was expected")
    return md


def _check_compact_pin(name: str, data: bytes, custom: Any) -> None:
    """A targets entry that pins a compact manifest must pin exactly the compact form of
    the manifest it names (:meth:`manifest.ReleaseManifest.compact`), so that a signer
    who reviews the manifest signs its compact form too.

    Raises:
        SigningError: it pins anything else.
    """
    pin = parse_compact_pin(custom)
    if pin is None:
        return
    try:
        compact = parse_release_manifest(data).compact().to_bytes()
    except ManifestFormatError as exc:
        raise SigningError(f"target {name} pins a compact manifest but is not a release "
                           f"manifest: {exc}") from exc
    if pin != (len(compact), hashlib.sha256(compact).hexdigest()):
        raise SigningError(f"target {name} pins a compact manifest that is not its "
                           "compact form")


def _release_line(data: bytes) -> str:
    try:
        m = parse_release_manifest(data)
    except ManifestFormatError as exc:
        return f"not a release manifest ({exc})"
    kind = m.update_type if m.component is None else f"{m.update_type} {m.component}"
    extra = ", CRITICAL" if m.critical else ""
    return (f"{m.product} {m.version}, counter {m.release_counter}, {kind}, hardware "
            f"{', '.join(m.compatibility)}, image sha256 {m.image.sha256[:16]} "
            f"({m.image.size} bytes), {len(m.payloads)} payloads{extra}")


def _root_changes(old: Root, new: Root) -> list[str]:
    lines = [f"root version {new.version}, expires {new.expires.isoformat()}"]
    for role in ("root", "targets", "snapshot", "timestamp"):
        before, after = old.roles[role], new.roles[role]
        added = [k for k in after.keyids if k not in before.keyids]
        removed = [k for k in before.keyids if k not in after.keyids]
        if not added and not removed and before.threshold == after.threshold:
            continue
        lines.append(f"{role} keys: threshold {before.threshold} of {len(before.keyids)} "
                     f"-> {after.threshold} of {len(after.keyids)}")
        lines += [f"  + {k[:16]} {holder_name(new.keys[k])} ({new.keys[k].scheme})"
                  for k in added]
        lines += [f"  - {k[:16]} {holder_name(old.keys[k])}" for k in removed]
    resets_before = _resets(old)
    for product, reset in _resets(new).items():
        if resets_before.get(product) != reset:
            lines.append(f"counter reset for {product}: epoch {reset.epoch}, devices above "
                         f"counter {reset.floor} go back to it")
    return lines


def _resets(root: Root) -> Mapping[str, Any]:
    try:
        return parse_counter_resets(root.unrecognized_fields.get(COUNTER_RESETS_FIELD))
    except ManifestFormatError:
        return {}
