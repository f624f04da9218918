"""What a TPM's NV space holds for the agent: anti-rollback floors and the trust anchor.

With ``keystore: tpm`` (:mod:`peer.keystore`) the device's floors and its trusted root
are held where editing, deleting or restoring the state directory cannot reach them.

**NV indices** (owner hierarchy, read and written with each index's own empty
authorization; defining and deleting them needs the owner's)::

    0x01005700  trust anchor        extend-only (SHA-256), 32 bytes
    0x01005701  image floor         24 bytes: b"SWF1", 0 (u32), reset epoch (u64), floor (u64)
    0x01005702  component floors    24 bytes each: SHA-256(name)[:16], floor (u64)
      .. +7     (at most 8 components; a slot is taken by a component's first floor)

**Floors.** The floor in force for each kind is the higher of the state directory's
(:mod:`peer.floors`: boot control, ``floors.json``) and the TPM's: a state directory
edited, deleted or restored from an old copy cannot lower a floor. The agent writes a
floor to the state directory first and then to the TPM (:meth:`NvFloors.raise_to`,
also at the start of every pass: a power cut in between is caught up). Every write is
one TPM command, carried out whole or not at all: after a power cut the TPM holds the
old floor or the new one. A component's slot is found by its name's digest, stored in
the index itself (the state directory could otherwise point a component at another's
lower floor); a ninth component cannot be installed (:meth:`NvFloors.check_room`).

Why ordinary indices and not NV counters (``TPM_NT_COUNTER``): a counter only ever
goes up by one, whereas a release counter may jump by up to
``max_release_counter_jump`` (a million increments would take the TPM hours, and wear
its NV), and a counter can never go down, whereas a root-signed counter reset
(:mod:`manifest.counters`) must lower a floor once. So the floor is a value, and the
epoch of the last reset applied is kept beside the image floor in the same index:
applying a reset lowers the component floors, then writes the image floor and the
epoch together, so the reset applies once even if ``trust_state.json`` is deleted
(which would otherwise re-open the releases between the reset's floor and the
installed one).

**Trust anchor.** An extend-only index: provisioning extends it with SHA-256 of the
root the device was given, and the agent with each root python-tuf accepted after it,
in version order (value = SHA-256(value || SHA-256(root bytes))). Nothing can set it to
another value, only extend it. Copies of the anchored roots are kept in
``STATE/trust/anchor/<version>.root.json``; :meth:`TrustAnchor.sync` (before and after
every metadata refresh) checks that they fold to the TPM's value, that ``root.json`` is
the newest of them, catches up a root python-tuf accepted just before a power cut
(verified along the chain: signed by its predecessor's threshold and its own), and puts
the anchored root back over anything else (a replaced ``root.json`` is refused).

Blocking (TPM commands): call from a worker thread in async code.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError

from infra.fsio import atomic_write_bytes
from peer.errors import InstallFailed, VerifyFailed
from peer.floors import Floors
from peer.tpm import Tpm, TpmError

__all__ = ["ANCHOR_INDEX", "COMPONENT_INDICES", "FLOOR_INDEX", "MAX_COMPONENT_FLOORS",
           "NvFloors", "NvState", "TrustAnchor", "anchor_value", "name_digest"]

log = logging.getLogger(__name__)

ANCHOR_INDEX = 0x01005700
FLOOR_INDEX = 0x01005701
MAX_COMPONENT_FLOORS = 8
COMPONENT_INDICES = tuple(range(FLOOR_INDEX + 1, FLOOR_INDEX + 1 + MAX_COMPONENT_FLOORS))
_RECORD = 24
_MAGIC = b"SWF1"
_MAX_ROOT_BYTES = 512 * 1024


def name_digest(component: str) -> bytes:
    """The 16 bytes that name a component in its NV index."""
    return hashlib.sha256(component.encode("utf-8")).digest()[:16]


@dataclass(frozen=True)
class NvState:
    """The floors the TPM holds: the image's, the last counter reset epoch applied, and
    each component's by the digest of its name (with the index holding it)."""

    image: int
    epoch: int
    components: Mapping[bytes, tuple[int, int]] = field(default_factory=dict)

    def component(self, name: str) -> int:
        """The TPM's floor of component ``name`` (0 when it has none)."""
        held = self.components.get(name_digest(name))
        return 0 if held is None else held[1]


class NvFloors:
    """The anti-rollback floors in the TPM (see the module docstring)."""

    def __init__(self, tpm: Tpm) -> None:
        self.tpm = tpm

    def provision(self, image_floor: int) -> None:
        """Start over: delete every floor index, define the image floor's with
        ``image_floor`` and epoch 0 (``peer init``)."""
        for index in (FLOOR_INDEX, *COMPONENT_INDICES):
            self.tpm.nv_undefine(index)
        self.tpm.nv_define(FLOOR_INDEX, _RECORD)
        self._write_header(image_floor, 0)

    def read(self) -> NvState:
        """The floors the TPM holds now.

        Raises:
            TpmError: the TPM cannot be read, or the image floor's index is missing or
                not ours (the device was not provisioned with this TPM).
        """
        defined = self.tpm.nv_indices()
        if FLOOR_INDEX not in defined:
            raise TpmError(f"the TPM holds no anti-rollback floors (NV index "
                           f"0x{FLOOR_INDEX:08x}): provision the device with 'peer init "
                           "--keystore tpm'")
        header = self.tpm.nv_read(FLOOR_INDEX, _RECORD)
        if header[:4] != _MAGIC:
            raise TpmError(f"NV index 0x{FLOOR_INDEX:08x} does not hold swarmota floors")
        epoch, image = struct.unpack(">QQ", header[8:])
        components = {}
        for index in COMPONENT_INDICES:
            if index in defined:
                record = self.tpm.nv_read(index, _RECORD)
                components[record[:16]] = (index, struct.unpack(">Q", record[16:])[0])
        return NvState(image, epoch, components)

    def merged(self, floors: Floors, state: NvState | None = None) -> Floors:
        """``floors`` (the state directory's), each raised to the TPM's where that is
        higher: the floors in force."""
        held = self.read() if state is None else state
        components = {name: max(counter, held.component(name))
                      for name, counter in floors.components.items()}
        return Floors(image=max(floors.image, held.image), components=components)

    def of(self, floors: Floors, component: str | None) -> int:
        """The floor in force for a release of ``component`` (``None``: an image)."""
        held = self.read()
        if component is None:
            return max(floors.image, held.image)
        return max(floors.of(component), held.component(component))

    def check_room(self, component: str | None) -> None:
        """Refuse (InstallFailed) a component the TPM has no floor index left for."""
        if component is None:
            return
        held = self.read()
        if name_digest(component) not in held.components and \
                len(held.components) >= MAX_COMPONENT_FLOORS:
            raise InstallFailed(f"the TPM holds floors of {MAX_COMPONENT_FLOORS} components "
                                f"already: no NV index left for component {component}")

    def raise_to(self, floors: Floors) -> None:
        """Raise each floor the TPM holds to ``floors`` (the state directory's) where
        that is higher: after every floor the agent writes, and at the start of every
        pass (a power cut between the two writes is caught up). Never lowers one.

        Raises:
            TpmError: the TPM cannot be written.
            InstallFailed: a new component and no NV index left for it.
        """
        held = self.read()
        if floors.image > held.image:
            self._write_header(floors.image, held.epoch)
        for name, counter in sorted(floors.components.items()):
            digest = name_digest(name)
            index, current = held.components.get(digest, (None, 0))
            if counter <= current:
                continue
            if index is None:
                free = [i for i in COMPONENT_INDICES
                        if i not in {i for i, _ in held.components.values()}]
                if not free:
                    raise InstallFailed(f"no NV index left for the floor of component "
                                        f"{name} (at most {MAX_COMPONENT_FLOORS})")
                index = free[0]
                self.tpm.nv_define(index, _RECORD)
                held = NvState(held.image, held.epoch,
                               {**held.components, digest: (index, 0)})
            self.tpm.nv_write(index, digest + struct.pack(">Q", counter))

    def apply_reset(self, floor: int, epoch: int) -> None:
        """A root-signed counter reset of ``epoch``: every floor above ``floor`` goes
        down to it, the components' first, then the image's with the epoch in one
        write (a power cut before that applies the reset again: same result)."""
        held = self.read()
        if epoch <= held.epoch:
            return
        for digest, (index, counter) in sorted(held.components.items()):
            if counter > floor:
                self.tpm.nv_write(index, digest + struct.pack(">Q", floor))
        self._write_header(min(held.image, floor), epoch)

    def _write_header(self, image: int, epoch: int) -> None:
        self.tpm.nv_write(FLOOR_INDEX, _MAGIC + bytes(4) + struct.pack(">QQ", epoch, image))


def anchor_value(roots: list[bytes]) -> bytes:
    """The anchor index's value after extending it with each root in turn."""
    value = bytes(32)
    for root in roots:
        value = hashlib.sha256(value + hashlib.sha256(root).digest()).digest()
    return value


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
        self.tpm.nv_define(ANCHOR_INDEX, 32, extend=True)
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
        if anchor_value([data for _, data in chain]) != value:
            # a power cut between extending the index and keeping the copy
            if current is not None and anchor_value(
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
