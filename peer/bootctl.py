"""Boot control: which slot boots, how many tries a pending slot has, which is good.

Modelled on RAUC / U-Boot boot-count: ``primary`` is the slot the bootloader tries
first, ``committed`` the last slot marked good. An update is *pending* while they
differ; only then is the try counter armed, so a committed slot never falls back later.

The transitions are pure functions on a frozen record; :func:`write_bootctl` persists a
record atomically (temp, fsync, rename, fsync dir), with a SHA-256 over its content, and
reads it back before returning. Like U-Boot's redundant environment there are two
copies, ``bootctl.json`` and ``bootctl.json.redundant``: each write replaces the copy
holding the older generation (or a damaged one), and :func:`read_bootctl` takes the
valid copy with the highest generation. A copy torn by the storage (a power cut on a
file system that loses data blocks but keeps the rename) therefore costs at most the
last transition, never the device: the other copy still names a verified slot.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from swarmota.infra.fsio import atomic_write_bytes
from swarmota.peer.crashpoints import crash_point, fsio_hook
from swarmota.peer.errors import ConfigError, InstallFailed

__all__ = [
    "SLOTS",
    "BootControl",
    "SlotRecord",
    "boot",
    "fall_back",
    "initial_bootctl",
    "mark_good",
    "other_slot",
    "read_bootctl",
    "redundant_path",
    "remove_bootctl",
    "switch_to",
    "write_bootctl",
]

SLOTS = ("a", "b")


def other_slot(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class SlotRecord:
    """What a slot holds (as far as the agent wrote and verified it)."""

    version: str | None
    release_counter: int
    sha256: str | None
    size: int


@dataclass(frozen=True)
class BootControl:
    primary: str
    committed: str
    tries_remaining: int
    slot_a: SlotRecord
    slot_b: SlotRecord
    min_release_counter: int
    generation: int

    @property
    def pending(self) -> bool:
        return self.primary != self.committed

    def slot(self, name: str) -> SlotRecord:
        return self.slot_a if name == "a" else self.slot_b

    def with_slot(self, name: str, record: SlotRecord) -> BootControl:
        return replace(self, slot_a=record) if name == "a" else replace(self, slot_b=record)

    def to_json(self) -> dict[str, Any]:
        def slot(r: SlotRecord) -> dict[str, Any]:
            return {"version": r.version, "release_counter": r.release_counter,
                    "sha256": r.sha256, "size": r.size}

        return {"primary": self.primary, "committed": self.committed,
                "tries_remaining": self.tries_remaining, "slot_a": slot(self.slot_a),
                "slot_b": slot(self.slot_b), "min_release_counter": self.min_release_counter,
                "generation": self.generation}


def initial_bootctl(active: SlotRecord) -> BootControl:
    """Slot A holds the factory image and is committed; slot B is empty."""
    return BootControl(primary="a", committed="a", tries_remaining=0, slot_a=active,
                       slot_b=SlotRecord(None, 0, None, 0),
                       min_release_counter=active.release_counter, generation=0)


def switch_to(bc: BootControl, slot: str, record: SlotRecord, *, tries: int = 1) -> BootControl:
    """Make ``slot`` (just written and verified) primary, pending, with ``tries`` boots."""
    if slot == bc.committed:
        raise RuntimeError("cannot switch to the committed slot")
    return replace(bc.with_slot(slot, record), primary=slot, tries_remaining=tries)


def mark_good(bc: BootControl) -> BootControl:
    """The booted primary passed its health check: commit it, disarm the counter."""
    counter = max(bc.min_release_counter, bc.slot(bc.primary).release_counter)
    return replace(bc, committed=bc.primary, tries_remaining=0, min_release_counter=counter)


def fall_back(bc: BootControl) -> BootControl:
    """Abandon the pending slot: boot the committed one again."""
    return replace(bc, primary=bc.committed, tries_remaining=0)


def boot(bc: BootControl) -> tuple[BootControl, str]:
    """What a bootloader does at power-on: returns the new record and the slot it boots.

    A pending slot with tries left consumes one try and boots; with none left, the
    committed slot boots and the pending one is abandoned.
    """
    if not bc.pending:
        return bc, bc.primary
    if bc.tries_remaining > 0:
        return replace(bc, tries_remaining=bc.tries_remaining - 1), bc.primary
    fallen = fall_back(bc)
    return fallen, fallen.primary


# --- persistence ---------------------------------------------------------------------


def _encode(bc: BootControl) -> bytes:
    body = json.dumps(bc.to_json(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({"record": bc.to_json(), "sha256": digest}, sort_keys=True,
                      indent=1).encode() + b"\n"


def _decode(data: bytes, path: Path) -> BootControl:
    try:
        outer = json.loads(data)
        rec = outer["record"]
        body = json.dumps(rec, sort_keys=True, separators=(",", ":"))
        if hashlib.sha256(body.encode()).hexdigest() != outer["sha256"]:
            raise ConfigError(f"{path}: boot-control checksum mismatch (torn or corrupt)")

        def slot(raw: dict[str, Any]) -> SlotRecord:
            return SlotRecord(raw["version"], int(raw["release_counter"]), raw["sha256"],
                              int(raw["size"]))

        bc = BootControl(primary=rec["primary"], committed=rec["committed"],
                         tries_remaining=int(rec["tries_remaining"]),
                         slot_a=slot(rec["slot_a"]), slot_b=slot(rec["slot_b"]),
                         min_release_counter=int(rec["min_release_counter"]),
                         generation=int(rec["generation"]))
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: invalid boot-control record: {exc}") from None
    if bc.primary not in SLOTS or bc.committed not in SLOTS:
        raise ConfigError(f"{path}: invalid slot names")
    return bc


def redundant_path(path: Path) -> Path:
    """The second copy of the boot-control record at ``path``."""
    return path.with_name(f"{path.name}.redundant")


def _read_copies(path: Path) -> tuple[list[tuple[Path, BootControl]], list[str]]:
    valid: list[tuple[Path, BootControl]] = []
    problems: list[str] = []
    for copy in (path, redundant_path(path)):
        try:
            valid.append((copy, _decode(copy.read_bytes(), copy)))
        except FileNotFoundError:
            problems.append(f"{copy} not found")
        except ConfigError as exc:
            problems.append(str(exc))
        except OSError as exc:
            problems.append(f"{copy}: {exc}")
    return valid, problems


def read_bootctl(path: Path) -> BootControl:
    """The newest valid copy of the record.

    Raises:
        ConfigError: neither copy exists or is valid (the messages name both).
    """
    valid, problems = _read_copies(path)
    if valid:
        return max(valid, key=lambda item: item[1].generation)[1]
    if not path.exists() and not redundant_path(path).exists():
        raise ConfigError(f"{path} not found: run 'swarmota peer init' first")
    raise ConfigError("no valid boot-control record: " + "; ".join(problems))


def remove_bootctl(path: Path) -> None:
    """Delete both copies (re-provisioning)."""
    for copy in (path, redundant_path(path)):
        copy.unlink(missing_ok=True)


def _older_copy(path: Path) -> Path:
    """Where the next write goes: a missing or damaged copy, else the older one."""
    valid, _ = _read_copies(path)
    held = {copy: bc.generation for copy, bc in valid}
    for copy in (path, redundant_path(path)):
        if copy not in held:
            return copy
    return min(held, key=lambda copy: (held[copy], copy != path))


def write_bootctl(path: Path, bc: BootControl, *, what: str = "write") -> BootControl:
    """Persist ``bc`` with the next generation, read it back, return what was stored.

    ``what`` names the write in crash points: ``bootctl.<what>.before_write``, the
    atomic write's steps ``bootctl.<what>.before_fsync`` .. ``.after_dir_fsync``, and
    ``bootctl.<what>.after_read_back``.
    """
    stored = replace(bc, generation=bc.generation + 1)
    target = _older_copy(path)
    try:
        crash_point(f"bootctl.{what}.before_write")
        atomic_write_bytes(target, _encode(stored), hook=fsio_hook(f"bootctl.{what}"))
        back = _decode(target.read_bytes(), target)
        crash_point(f"bootctl.{what}.after_read_back")
    except (OSError, ConfigError) as exc:
        raise InstallFailed(f"cannot write boot control {target}: {exc}") from exc
    if back != stored:
        raise InstallFailed(f"boot control {target} read back differs from what was written")
    return stored
