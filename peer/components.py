"""Component updates (module firmware, apps, configuration): atomic replace with rollback.

Releases whose ``update_type`` is not ``image`` carry one file, the new content of a
named *component* (a modem firmware, a bootloader, an app bundle, a configuration),
installed into its own directory instead of an A/B slot:

    STATE/components/<name>/
        v-<sha256>          content, one file per installed version (immutable)
        current -> v-<sha>  symlink: what the component's consumers read
        record.json         current and previous version, and ``pending`` during a switch
        incoming            the next version while it is written (through the slot
                            backend interface: see :meth:`ComponentStore.staging`)

A switch: the verified content is renamed to ``v-<sha>`` and ``record.json`` says
pending (new, previous) (:meth:`ComponentStore.stage`); ``current`` is replaced
atomically (a temporary symlink renamed over it: :meth:`ComponentStore.activate`) within
each attempt (``peer.hooks``: hooks, services, health check); then ``record.json``
commits the new version, or ``current`` goes back to the previous one
(:meth:`ComponentStore.revert`, then :meth:`ComponentStore.roll_back` once the services
run on it). A crash in between leaves ``pending`` set; the agent then repeats the
attempt or rolls back, as its journal says (``peer.agent``). Crash points:
``component.*``.

Blocking; call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmota.infra.fsio import UnsafeNameError, atomic_write_json, fsync_dir, safe_child
from swarmota.peer.crashpoints import crash_point, fsio_hook
from swarmota.peer.errors import VerifyFailed
from swarmota.peer.slots import FileSlots, SlotBackend, SlotWriter, hash_stream

__all__ = ["ComponentRecord", "ComponentStore", "InstalledVersion"]

INCOMING = "incoming"
CURRENT = "current"


@dataclass(frozen=True)
class InstalledVersion:
    version: str
    release_counter: int
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "release_counter": self.release_counter,
                "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, raw: Any) -> InstalledVersion | None:
        if raw is None:
            return None
        return cls(str(raw["version"]), int(raw["release_counter"]), str(raw["sha256"]),
                   int(raw["size"]))


@dataclass(frozen=True)
class ComponentRecord:
    current: InstalledVersion | None
    previous: InstalledVersion | None
    pending: bool

    def to_json(self) -> dict[str, Any]:
        return {"current": self.current.to_json() if self.current else None,
                "previous": self.previous.to_json() if self.previous else None,
                "pending": self.pending}


class _Staging(FileSlots):
    """The component directory seen as slots: ``incoming`` (written) and ``current``
    (read, as a delta base)."""

    def image_path(self, slot: str) -> Path:
        return self.directory / slot

    def reclaim(self) -> list[str]:
        removed = super().reclaim()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / INCOMING).unlink()
            removed.append(INCOMING)
        return removed


class ComponentStore:
    """The components of one device (``STATE/components``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, name: str) -> Path:
        """``STATE/components/<name>``. ``name`` comes from a signed release manifest,
        whose parser already allows only safe names; checked again here, where it
        becomes a path.

        Raises:
            VerifyFailed: ``name`` is not one safe path segment.
        """
        try:
            return safe_child(self.root, name)
        except UnsafeNameError as exc:
            raise VerifyFailed(f"component name refused: {exc}") from None

    def staging(self, name: str) -> SlotBackend:
        """Slot-backend view of component ``name`` for ``peer.install``: write slot
        ``"incoming"``, read slot ``"current"``."""
        return _Staging(self.directory(name))

    def record(self, name: str) -> ComponentRecord:
        try:
            raw = json.loads((self.directory(name) / "record.json").read_bytes())
            return ComponentRecord(InstalledVersion.from_json(raw["current"]),
                                   InstalledVersion.from_json(raw["previous"]),
                                   bool(raw["pending"]))
        except FileNotFoundError:
            return ComponentRecord(None, None, False)

    def _save(self, name: str, record: ComponentRecord) -> None:
        atomic_write_json(self.directory(name) / "record.json", record.to_json(),
                          hook=fsio_hook("component.record"))

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def pending(self) -> list[str]:
        """Components left mid-switch by a crash."""
        return [n for n in self.names() if self.record(n).pending]

    def current_hash(self, name: str) -> tuple[int, str] | None:
        try:
            with open(self.directory(name) / CURRENT, "rb") as fh:
                return hash_stream(fh)
        except FileNotFoundError:
            return None

    @staticmethod
    def _version_file(directory: Path, sha256: str) -> Path:
        """``directory/v-<sha256>`` (the hash is hex by the manifest parser; checked
        again where it becomes a path). Raises ``VerifyFailed``."""
        try:
            return safe_child(directory, f"v-{sha256}")
        except UnsafeNameError as exc:
            raise VerifyFailed(f"component version file refused: {exc}") from None

    def _point(self, name: str, sha256: str | None) -> None:
        """Replace the ``current`` symlink atomically (``None``: remove it)."""
        directory = self.directory(name)
        link = directory / CURRENT
        if sha256 is None:
            link.unlink(missing_ok=True)
        else:
            tmp = directory / ".current.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(self._version_file(directory, sha256).name, tmp)
            crash_point("component.before_link_rename")
            os.replace(tmp, link)
        fsync_dir(directory)
        crash_point("component.after_link_rename")

    def switch(self, name: str, new: InstalledVersion) -> ComponentRecord:
        """:meth:`stage` then :meth:`activate`. Raises ``OSError``."""
        record = self.stage(name, new)
        self.activate(name)
        return record

    def stage(self, name: str, new: InstalledVersion) -> ComponentRecord:
        """Make the verified ``incoming`` file version ``new``, pending (``current``
        unchanged) until :meth:`commit` or :meth:`roll_back`. Raises ``OSError``."""
        directory = self.directory(name)
        os.replace(directory / INCOMING, self._version_file(directory, new.sha256))
        fsync_dir(directory)
        before = self.record(name)
        record = ComponentRecord(new, before.current, True)
        self._save(name, record)
        return record

    def activate(self, name: str) -> None:
        """Point ``current`` at the recorded current version (the pending one during a
        switch); idempotent. Raises ``OSError``."""
        record = self.record(name)
        self._point(name, record.current.sha256 if record.current else None)

    def revert(self, name: str) -> None:
        """During a switch, point ``current`` back at the previous version without
        touching the record (:meth:`roll_back` records it once the services run on it
        again). Raises ``OSError``."""
        record = self.record(name)
        if record.pending:
            self._point(name, record.previous.sha256 if record.previous else None)

    def commit(self, name: str) -> ComponentRecord:
        record = self.record(name)
        done = ComponentRecord(record.current, record.previous, False)
        self._save(name, done)
        self._prune(name, done)
        return done

    def roll_back(self, name: str) -> ComponentRecord:
        """Point ``current`` at the previous version again (none: no ``current``)."""
        record = self.record(name)
        back = ComponentRecord(record.previous, None, False)
        self._point(name, record.previous.sha256 if record.previous else None)
        self._save(name, back)
        self._prune(name, back)
        return back

    def _prune(self, name: str, record: ComponentRecord) -> None:
        """Remove version files (and payload hooks: ``peer.hooks``) of versions other
        than the current and previous ones."""
        shas = {v.sha256 for v in (record.current, record.previous) if v}
        directory = self.directory(name)
        for path in directory.glob("v-*"):
            if path.name.removeprefix("v-") not in shas:
                path.unlink(missing_ok=True)
        for path in [*directory.glob("hooks-*"), *directory.glob(".hooks-*.tmp")]:
            if path.name.removeprefix("hooks-") not in shas:
                shutil.rmtree(path, ignore_errors=True)

    def begin_write(self, name: str, size: int) -> SlotWriter:
        self.directory(name).mkdir(parents=True, exist_ok=True)
        return self.staging(name).begin_write(INCOMING, size)
