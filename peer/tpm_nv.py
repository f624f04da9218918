"""What a TPM's NV space holds for the agent: anti-rollback floors and the trust anchor.

With ``keystore: tpm`` (:mod:`peer.keystore`) the device's floors and its trusted root
are held where editing, deleting or restoring the state directory cannot lower or
replace them, and where code running on the device cannot rewrite them either.

**NV indices** (owner hierarchy, both extend-only SHA-256 indices, read and extended
with each index's own empty authorization; defining and deleting them needs the
owner's)::

    0x01005700  trust anchor   the roots anchored, in version order
    0x01005701  floor log      every floor raise and every counter reset applied

An extend-only index (``TPM_NT_EXTEND``) can only be extended (value = SHA-256(value ||
data)); nothing can write it, set it back or reset it short of undefining it, which
needs the owner hierarchy (docs/SECURITY.md says what the device maker must lock).

**The floor log.** ``STATE/trust/floors.log`` holds one entry a line (canonical JSON,
:class:`FloorEntry`), and the floor index is the fold of SHA-256 of each line in turn
(:func:`fold`). Entries: a floor *raise* (``component`` ``null`` for the image, else
the component's name, and the floor) and a *counter reset* applied (``product``,
``epoch``, ``floor`` and ``root``: SHA-256 of the root metadata that carried it). The
floors in force are computed from the log (:func:`floors_of`): per kind and component,
the highest raise, each reset lowering every floor above its own, in log order. A reset
counts only when it is this device's product's, newer than the last applied, and the
one the named root carries, that root being one the trust anchor holds: whoever can
extend the index (code running as root on the device) cannot forge a reset, having no
root-signed metadata, nor replay an old one (its epoch is not newer). Such an entry is
ignored (logged) and lowers nothing. (What it can still do: on a device that skipped a
reset, log that older reset before the newer one applies; the TPM does not attest which
anchored root was the newest when a reset was logged. The floors then end where those
of a device that saw the older root in time end, never below a root-signed floor:
docs/SECURITY.md says why no ordering of the two indices closes it.)

:meth:`NvFloors.read` checks, before anything is decided, that the log folds to the
index. A log edited, truncated, deleted or restored from an old copy, or an index
extended with anything else, does not: :class:`FloorLogError` (a
:class:`~peer.errors.VerifyFailed`), and every release is refused (a denial of service,
never a rollback) until the log is repaired or the device re-provisioned.

**The copy, and repairs.** Every entry goes to the log and to its copy
(``floors.log.copy``) before the index is extended. A log that does not fold while the
copy does is put back from the copy at the next load, and a damaged copy is rewritten
from the log; :meth:`NvFloors.repair` (``peer trust repair``) also tries copies an
operator kept. Only a log the index holds the fold of passes, so no repair can lower a
floor (forging one would take a SHA-256 preimage); an index extended with something no
copy holds leaves re-provisioning.

**Order of a write, and power loss.** An entry is appended to the log (written and
fsynced, then the same to the copy), then extended into the index (one TPM command,
carried out whole or not at all). After a power cut the log holds at most one complete
entry the index has not seen, or a torn line: a log whose every complete line but the
last folds to the index gets its last line extended, and a torn last line (no newline:
never extended) is cut off. Anything else is refused.

**Floors and the state directory.** The floor in force for each kind is the higher of
the state directory's (:mod:`swarmota.peer.floors`: boot control, ``floors.json``) and the log's.
The agent writes a floor to the state directory first and then to the log
(:meth:`NvFloors.raise_to`, also at the start of every pass: a power cut in between is
caught up). Why not NV counters (``TPM_NT_COUNTER``): a counter only goes up by one,
whereas a release counter may jump by up to ``max_release_counter_jump`` (a million
increments would take the TPM hours, and wear its NV), and a root-signed counter reset
(:mod:`manifest.counters`) must lower a floor, which a counter never does.

**Trust anchor.** Provisioning extends it with SHA-256 of the root the device was
given, and the agent with each root python-tuf accepted after it, in version order
(value = SHA-256(value || SHA-256(root bytes))). Copies of the anchored roots are kept
in ``STATE/trust/anchor/<version>.root.json``; :meth:`TrustAnchor.sync` (before and
after every metadata refresh) checks that they fold to the TPM's value, that
``root.json`` is the newest of them, catches up a root python-tuf accepted just before
a power cut (verified along the chain: signed by its predecessor's threshold and its
own), and puts the anchored root back over anything else (a replaced ``root.json`` is
refused).

Blocking (TPM commands): call from a worker thread in async code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from swarmota.infra.fsio import atomic_write_bytes, fsync_dir
from swarmota.manifest.counters import COUNTER_RESETS_FIELD, CounterReset, parse_counter_resets
from swarmota.manifest.errors import ManifestFormatError
from swarmota.peer.crashpoints import crash_point
from swarmota.peer.errors import VerifyFailed
from swarmota.peer.floors import Floors
from swarmota.peer.tpm import Tpm, TpmError

__all__ = ["ANCHOR_INDEX", "FLOOR_LOG", "FLOOR_LOG_INDEX", "FloorEntry", "FloorLogError",
           "NvFloors", "NvState", "TrustAnchor", "floors_of", "fold"]

log = logging.getLogger(__name__)

ANCHOR_INDEX = 0x01005700
FLOOR_LOG_INDEX = 0x01005701
FLOOR_LOG = "floors.log"
"""The floor log's file name, in ``STATE/trust/``."""
_MAX_LOG_BYTES = 8 * 1024 * 1024  # about 80,000 entries: one per floor raised
_MAX_ROOT_BYTES = 512 * 1024


class FloorLogError(VerifyFailed):
    """The floor log on disk does not fold to the TPM's floor index (edited, truncated,
    deleted, or the index extended with something else), or holds a line that is no
    floor entry: no floor can be trusted, every release is refused."""


@dataclass(frozen=True)
class FloorEntry:
    """One line of the floor log: a raise (``op="raise"``: ``component``, ``None`` for
    the image, and ``floor``) or a counter reset applied (``op="reset"``: ``product``,
    ``epoch``, ``floor``, ``root`` = hex SHA-256 of the root metadata carrying it)."""

    op: str
    floor: int
    component: str | None = None
    product: str = ""
    epoch: int = 0
    root: str = ""

    def encode(self) -> bytes:
        """The entry's line (canonical JSON, no newline)."""
        body: dict[str, Any] = ({"op": "raise", "component": self.component,
                                 "floor": self.floor} if self.op == "raise" else
                                {"op": "reset", "product": self.product,
                                 "epoch": self.epoch, "floor": self.floor,
                                 "root": self.root})
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, line: bytes) -> FloorEntry:
        """The entry of ``line``.

        Raises:
            ValueError: not a floor entry in its canonical form.
        """
        try:
            raw = json.loads(line)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        if raw.get("op") == "raise" and set(raw) == {"op", "component", "floor"}:
            entry = cls("raise", raw["floor"], component=raw["component"])
        elif raw.get("op") == "reset" and set(raw) == {"op", "product", "epoch", "floor",
                                                        "root"}:
            entry = cls("reset", raw["floor"], product=raw["product"], epoch=raw["epoch"],
                        root=raw["root"])
        else:
            raise ValueError("not a floor entry")
        if (type(entry.floor) is not int or type(entry.epoch) is not int
                or entry.floor < 0 or entry.epoch < 0
                or not isinstance(entry.component, str | None)
                or not isinstance(entry.product, str) or not isinstance(entry.root, str)
                or entry.encode() != line):
            raise ValueError("not a floor entry in canonical form")
        return entry


def fold(items: Sequence[bytes]) -> bytes:
    """An extend-only index's value after extending it with each item's SHA-256 in turn
    (the floor log's lines, the anchor's roots)."""
    value = bytes(32)
    for item in items:
        value = hashlib.sha256(value + hashlib.sha256(item).digest()).digest()
    return value


@dataclass(frozen=True)
class NvState:
    """The floors the log holds: the image's, each component's by name, the epoch of
    the last counter reset applied, and how many reset entries were ignored (not
    root-signed resets of this device's product, or not newer)."""

    image: int
    epoch: int
    components: Mapping[str, int] = field(default_factory=dict)
    ignored_resets: int = 0

    def component(self, name: str) -> int:
        """The log's floor of component ``name`` (0 when it has none)."""
        return self.components.get(name, 0)


def floors_of(entries: Sequence[FloorEntry], product: str,
              anchored: Mapping[str, bytes]) -> NvState:
    """The floors in force after ``entries`` (module docstring). ``anchored``: the
    roots the trust anchor holds, by hex SHA-256; a reset counts only if it is
    ``product``'s, newer than the last one applied, and the one its root carries."""
    image, epoch, ignored = 0, 0, 0
    components: dict[str, int] = {}
    for entry in entries:
        if entry.op == "raise":
            if entry.component is None:
                image = max(image, entry.floor)
            else:
                components[entry.component] = max(components.get(entry.component, 0),
                                                  entry.floor)
        elif (entry.product == product and entry.epoch > epoch
              and _carried_by(anchored.get(entry.root), product) ==
              CounterReset(epoch=entry.epoch, floor=entry.floor)):
            image = min(image, entry.floor)
            components = {name: min(floor, entry.floor) for name, floor in components.items()}
            epoch = entry.epoch
        else:
            ignored += 1
    return NvState(image, epoch, components, ignored)


def _carried_by(root: bytes | None, product: str) -> CounterReset | None:
    """The counter reset of ``product`` that root metadata ``root`` carries."""
    if root is None:
        return None
    try:
        signed = Metadata[Root].from_bytes(root).signed
        return parse_counter_resets(
            signed.unrecognized_fields.get(COUNTER_RESETS_FIELD)).get(product)
    except (DeserializationError, ManifestFormatError, ValueError):
        return None


class NvFloors:
    """The anti-rollback floors: the floor log and its TPM index (module docstring).

    ``log_path``: the log (``STATE/trust/floors.log``); ``anchor``: the trust anchor
    that vouches for the roots of counter resets; ``product``: the device's."""

    def __init__(self, tpm: Tpm, log_path: Path, anchor: TrustAnchor, product: str) -> None:
        self.tpm = tpm
        self.log_path = log_path
        self.anchor = anchor
        self.product = product

    @property
    def copy_path(self) -> Path:
        """The log's copy (``STATE/trust/floors.log.copy``), written in turn with it."""
        return self.log_path.with_name(self.log_path.name + ".copy")

    def provision(self, image_floor: int) -> None:
        """Start over: a new floor index and log, holding the image floor
        ``image_floor`` (``peer init``)."""
        self.tpm.nv_undefine(FLOOR_LOG_INDEX)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.log_path, self.copy_path):
            atomic_write_bytes(path, b"")
        self.tpm.nv_define_extend(FLOOR_LOG_INDEX)
        self._append(FloorEntry("raise", image_floor))

    def repair(self, candidates: Sequence[Path] = ()) -> Path:
        """Rebuild the log (and its copy) from the first of the log, its copy and
        ``candidates`` (copies an operator kept) that folds to the TPM's floor index;
        return the path it came from (``peer trust repair``). Only the log the index
        holds the fold of can pass: whoever writes the disk cannot make one with a
        lower floor (a SHA-256 preimage), so a repair never lowers a floor.

        Raises:
            TpmError: the TPM cannot be read, or holds no floor index.
            FloorLogError: none of them folds to the index (the index extended with
                something no copy holds: only re-provisioning helps).
        """
        try:
            return self._verified(self._index_value(), candidates)[1]
        except FloorLogError:
            tried = ", ".join(str(p) for p in (self.log_path, self.copy_path, *candidates))
            raise FloorLogError(
                f"no copy of the floor log folds to the TPM's floor index "
                f"0x{FLOOR_LOG_INDEX:08x} (tried {tried}): no floor can be trusted, every "
                "release is refused until the device is re-provisioned ('peer init "
                "--force')") from None

    def read(self) -> NvState:
        """The floors the log holds now, once it is checked against the TPM (and a
        power cut in the middle of an append finished).

        Raises:
            TpmError: the TPM cannot be read, or holds no floor index (the device was
                not provisioned with this TPM).
            FloorLogError: the log does not fold to the TPM's index, or holds a line
                that is no floor entry (module docstring).
        """
        return self._load()[1]

    def merged(self, floors: Floors, state: NvState | None = None) -> Floors:
        """``floors`` (the state directory's), each raised to the log's where that is
        higher: the floors in force (see :meth:`read` for the errors)."""
        held = self.read() if state is None else state
        components = {name: max(held.component(name), floors.of(name))
                      for name in {*floors.components, *held.components}}
        return Floors(image=max(floors.image, held.image), components=components)

    def of(self, floors: Floors, component: str | None) -> int:
        """The floor in force for a release of ``component`` (``None``: an image)."""
        held = self.read()
        if component is None:
            return max(floors.image, held.image)
        return max(floors.of(component), held.component(component))

    def raise_to(self, floors: Floors) -> None:
        """Raise each floor of the log to ``floors`` (the state directory's) where that
        is higher: after every floor the agent writes, and at the start of every pass
        (a power cut between the two writes is caught up). Never lowers one.

        Raises:
            TpmError: the TPM cannot be read or extended.
            FloorLogError: the log does not verify (:meth:`read`).
        """
        held = self.read()
        wanted = [FloorEntry("raise", floors.image)] if floors.image > held.image else []
        wanted += [FloorEntry("raise", counter, component=name)
                   for name, counter in sorted(floors.components.items())
                   if counter > held.component(name)]
        for entry in wanted:
            self._append(entry)

    def apply_reset(self, reset: CounterReset, root: bytes) -> None:
        """Log the root-signed counter reset ``reset`` of the device's product, carried
        by root metadata ``root`` (the trusted, anchored ``root.json``): every floor
        above its floor goes down to it, once per epoch. An entry for it already in the
        log (its root not anchored yet) is not written twice."""
        lines, held = self._load()
        if reset.epoch <= held.epoch:
            return
        entry = FloorEntry("reset", reset.floor, product=self.product, epoch=reset.epoch,
                           root=hashlib.sha256(root).hexdigest())
        if entry.encode() in lines:
            log.warning("counter reset epoch %d is logged but its root is not anchored: "
                        "not applied to the TPM's floors", reset.epoch)
            return
        self._append(entry)

    # --- the log and its index ----------------------------------------------------------

    def _load(self) -> tuple[list[bytes], NvState]:
        """The log's lines, checked against the index (module docstring), and the
        floors they hold. A log that does not fold while its copy does is put back
        from the copy (a damaged, deleted or edited log file)."""
        lines, _ = self._verified(self._index_value(), ())
        entries = []
        for number, line in enumerate(lines, 1):
            try:
                entries.append(FloorEntry.decode(line))
            except ValueError:
                raise FloorLogError(f"{self.log_path}, line {number}: not a floor entry "
                                    "(the TPM's index was extended with it): every "
                                    "release is refused until the device is "
                                    "re-provisioned") from None
        anchored = self.anchor.anchored_roots() if any(e.op == "reset" for e in entries) else {}
        held = floors_of(entries, self.product, anchored)
        if held.ignored_resets:
            log.warning("floor log: %d counter reset entries are not root-signed resets "
                        "of %s newer than the last one applied: ignored",
                        held.ignored_resets, self.product)
        return lines, held

    def _index_value(self) -> bytes:
        if FLOOR_LOG_INDEX not in self.tpm.nv_indices():
            raise TpmError(f"the TPM holds no anti-rollback floors (NV index "
                           f"0x{FLOOR_LOG_INDEX:08x}): provision the device with 'peer "
                           "init --keystore tpm'")
        return self.tpm.nv_read(FLOOR_LOG_INDEX, 32)

    def _verified(self, value: bytes, candidates: Sequence[Path]) -> tuple[list[bytes], Path]:
        """The lines of the first of the log, its copy and ``candidates`` that folds to
        the index's ``value`` (:func:`_checked`), made the log and its copy
        (:meth:`_settle`); and where they came from.

        Raises:
            FloorLogError: none does (the log's own fault is said).
        """
        faults = []
        for path in (self.log_path, self.copy_path, *candidates):
            try:
                checked = _checked(self._read_log(path), value, path)
            except FloorLogError as exc:
                faults.append(exc)
                continue
            return self._settle(checked, path), path
        raise faults[0]

    def _settle(self, checked: tuple[list[bytes], bytes | None], source: Path) -> list[bytes]:
        """Make the checked lines of ``source`` the log and its copy: the last line
        extended if it was not (a power cut before), a torn line cut off, the log or
        the copy rewritten where it differs (the other one damaged or missing)."""
        lines, pending = checked
        if pending is not None:
            log.warning("floor log: extending the TPM's index with the last entry (a "
                        "power cut before it was)")
            self.tpm.nv_extend(FLOOR_LOG_INDEX, hashlib.sha256(pending).digest())
        data = b"".join(line + b"\n" for line in lines)
        for path in (self.log_path, self.copy_path):
            try:
                same = self._read_log(path) == data
            except FloorLogError:
                same = False
            if not same:
                if path != source:
                    log.warning("floor log: %s rewritten from %s, which folds to the TPM's "
                                "floor index", path, source)
                atomic_write_bytes(path, data)
        return lines

    def _read_log(self, path: Path) -> bytes:
        try:
            with open(path, "rb") as fh:
                data = fh.read(_MAX_LOG_BYTES + 1)
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise FloorLogError(f"cannot read the floor log {path}: "
                                f"{exc.strerror or exc}") from None
        if len(data) > _MAX_LOG_BYTES:
            raise FloorLogError(f"the floor log {path} is larger than {_MAX_LOG_BYTES} bytes")
        return data

    def _append(self, entry: FloorEntry) -> None:
        """Append ``entry`` to the log (fsynced), then extend the index with it (crash
        points ``floor_log.appended`` between the two, ``tpm.nv_extend.in_flight``
        while the TPM extends)."""
        line = entry.encode()
        for path in (self.log_path, self.copy_path):
            with open(path, "ab") as fh:
                fh.write(line + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(self.log_path.parent)
        crash_point("floor_log.appended")
        self.tpm.nv_extend(FLOOR_LOG_INDEX, hashlib.sha256(line).digest())


def _checked(data: bytes, value: bytes, path: Path) -> tuple[list[bytes], bytes | None]:
    """The complete lines of the log ``data`` (read from ``path``) if they fold to the
    index's ``value``, or do but for a last line that is a floor entry the index has
    not seen yet (returned second, to extend); a torn last line is left out.

    Raises:
        FloorLogError: neither.
    """
    *lines, _torn = data.split(b"\n")
    if fold(lines) == value:
        return lines, None
    if lines and fold(lines[:-1]) == value and _decodes(lines[-1]):
        return lines, lines[-1]
    raise FloorLogError(
        f"the floor log {path} does not match the TPM's floor index 0x{FLOOR_LOG_INDEX:08x} "
        "(edited, truncated or deleted, or the index extended by something else): no floor "
        "can be trusted, every release is refused until the log is repaired ('peer trust "
        "repair', from a copy that folds to the index) or the device re-provisioned")


def _decodes(line: bytes) -> bool:
    try:
        FloorEntry.decode(line)
    except ValueError:
        return False
    return True


class TrustAnchor:
    """The trusted root, anchored in the TPM (see the module docstring)."""

    def __init__(self, tpm: Tpm, trust_dir: Path) -> None:
        self.tpm = tpm
        self.trust_dir = trust_dir
        self.anchor_dir = trust_dir / "anchor"

    def provision(self, root_json: bytes) -> None:
        """Anchor ``root_json`` (the root the device is provisioned with) afresh."""
        version = _root_version(root_json)
        for stale in self.anchor_dir.glob("*.root.json"):
            stale.unlink()
        self.tpm.nv_undefine(ANCHOR_INDEX)
        self.tpm.nv_define_extend(ANCHOR_INDEX)
        self._extend(version, root_json)

    def sync(self) -> None:
        """Check ``root.json`` against the anchor, catch up roots python-tuf accepted
        since, put the anchored root back over anything else (module docstring).

        Raises:
            VerifyFailed: the anchored copies do not fold to the TPM's value (damaged or
                edited), or none is left.
            TpmError: the TPM cannot be read or extended.
        """
        chain = self._anchored()
        value = self.tpm.nv_read(ANCHOR_INDEX, 32)
        current = _read_root(self.trust_dir / "root.json")
        if fold([data for _, data in chain]) != value:
            # a power cut between extending the index and keeping the copy
            if current is not None and fold(
                    [data for _, data in chain] + [current]) == value:
                self._keep(_root_version(current), current)
                chain.append((_root_version(current), current))
            else:
                raise VerifyFailed(
                    f"the anchored roots in {self.anchor_dir} do not match the TPM's trust "
                    "anchor (edited or damaged): re-provision the device's trust anchor")
        if not chain:
            raise VerifyFailed(f"no anchored root in {self.anchor_dir}: re-provision the "
                               "device's trust anchor")
        head_version, head = chain[-1]
        if current == head:
            return
        successors = self._successors(head, current)
        if successors is None:
            log.warning("trusted root.json is not the root anchored in the TPM (version %d) "
                        "nor its successor along the root chain: refused, the anchored root "
                        "is put back", head_version)
            atomic_write_bytes(self.trust_dir / "root.json", head)
            return
        for version, data in successors:
            log.info("trust anchor extended to root version %d", version)
            self._extend(version, data)

    def anchored_roots(self) -> dict[str, bytes]:
        """The anchored roots by hex SHA-256, if their copies fold to the TPM's value;
        else none (a counter reset then cannot be vouched for, and lowers nothing)."""
        chain = [data for _, data in self._anchored()]
        if fold(chain) != self.tpm.nv_read(ANCHOR_INDEX, 32):
            return {}
        return {hashlib.sha256(data).hexdigest(): data for data in chain}

    def _successors(self, head: bytes, current: bytes | None
                    ) -> list[tuple[int, bytes]] | None:
        """The roots from ``head`` (exclusive) to ``current``, each verified against its
        predecessor; ``None`` if ``current`` is not on that chain."""
        if current is None:
            return None
        try:
            prev = Metadata[Root].from_bytes(head)
            target = Metadata[Root].from_bytes(current).signed.version
        except DeserializationError:
            return None
        if target <= prev.signed.version:  # an older root (or another of the same version)
            return None
        out: list[tuple[int, bytes]] = []
        while prev.signed.version < target:
            version = prev.signed.version + 1
            data = current if version == target else _read_root(
                self.trust_dir / "root_history" / f"{version}.root.json")
            if data is None:
                return None
            try:
                new = Metadata[Root].from_bytes(data)
                payload = new.signed_bytes
                prev.signed.verify_delegate(Root.type, payload, new.signatures)
                new.signed.verify_delegate(Root.type, payload, new.signatures)
            except (DeserializationError, tuf_exceptions.RepositoryError, ValueError):
                return None
            if new.signed.version != version:
                return None
            out.append((version, data))
            prev = new
        return out

    def _anchored(self) -> list[tuple[int, bytes]]:
        """The anchored roots, by version (a file whose name and content disagree is
        left out: the fold then fails)."""
        out = []
        for path in self.anchor_dir.glob("*.root.json"):
            number = path.name.split(".")[0]
            data = _read_root(path)
            if number.isdigit() and data is not None and _root_version(data) == int(number):
                out.append((int(number), data))
        return sorted(out)

    def _extend(self, version: int, data: bytes) -> None:
        """Extend the index with ``data``, then keep its copy (module docstring)."""
        self.tpm.nv_extend(ANCHOR_INDEX, hashlib.sha256(data).digest())
        self._keep(version, data)

    def _keep(self, version: int, data: bytes) -> None:
        self.anchor_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.anchor_dir / f"{version}.root.json", data)


def _read_root(path: Path) -> bytes | None:
    """The bytes of a root metadata file that parses, else ``None``."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_ROOT_BYTES + 1)
        if len(data) > _MAX_ROOT_BYTES or not isinstance(
                Metadata[Root].from_bytes(data).signed, Root):
            return None
    except (OSError, DeserializationError):
        return None
    return data


def _root_version(data: bytes) -> int:
    try:
        return Metadata[Root].from_bytes(data).signed.version
    except DeserializationError as exc:
        raise VerifyFailed(f"not root metadata: {exc}") from exc
