"""Anti-rollback floors, one per update kind: the image's, and one per component.

A release is refused unless its release counter is above the floor of what it updates:

- **images** (``update_type`` ``image``): boot control's ``min_release_counter``
  (:mod:`peer.bootctl`), raised in the same atomic write that commits the new slot;
- **components** (``module``, ``app``, ``config``: a release manifest's
  ``component``): ``STATE/floors.json``, ``{"schema": 1, "components": {name:
  counter}}``, raised after the component's commit (and again on recovery if a crash
  came in between).

Each sequence is its own: a configuration release with counter 3 does not make image
release 2 uninstallable (one floor for everything did: whichever kind was published
with the higher counter locked the other out for ever).

**Migration.** A state directory from before (no ``floors.json``) kept one floor in
boot control, raised by component commits too. :func:`migrate` gives each committed
component its current version's counter as its floor and sets the image floor to the
committed slot's counter (the highest image ever committed: only newer ones are
installed), then writes ``floors.json``, which marks the directory as migrated. The
order makes it safe to repeat after a crash: both floors are derived from durable
records, and the marker comes last.

Blocking (small file reads and writes): call from a worker thread or at start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from swarmota.infra.fsio import atomic_write_json
from swarmota.peer.bootctl import BootControl, read_bootctl, write_bootctl
from swarmota.peer.components import ComponentStore
from swarmota.peer.crashpoints import fsio_hook
from swarmota.peer.errors import ConfigError, InstallFailed
from swarmota.tracker.wire import ComponentVersion

__all__ = ["FLOORS_FILE", "Floors", "migrate", "raise_component_floor", "read_floors",
           "running_components", "write_floors"]

FLOORS_FILE = "floors.json"
_SCHEMA = 1


@dataclass(frozen=True)
class Floors:
    """The floors of one device (values; :func:`read_floors` builds them)."""

    image: int
    components: Mapping[str, int] = field(default_factory=dict)

    def of(self, component: str | None) -> int:
        """The floor a release of ``component`` (``None``: an image) must be above."""
        if component is None:
            return self.image
        return self.components.get(component, 0)


def _path(state_root: Path) -> Path:
    return state_root / FLOORS_FILE


def _read_component_floors(state_root: Path) -> dict[str, int] | None:
    """The stored component floors; ``None`` when the directory is not migrated yet.

    Raises:
        ConfigError: the file exists and is damaged (written atomically: not by us).
    """
    path = _path(state_root)
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable anti-rollback floors: {exc}") from None
    components = raw.get("components") if isinstance(raw, dict) else None
    if (not isinstance(raw, dict) or raw.get("schema") != _SCHEMA
            or not isinstance(components, dict)
            or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                       and v >= 0 for k, v in components.items())):
        raise ConfigError(f"{path}: not a floors file of schema {_SCHEMA}")
    return dict(components)


def write_floors(state_root: Path, components: Mapping[str, int]) -> None:
    """Write the component floors (a new state directory: none). Raises ``OSError``."""
    body: dict[str, Any] = {"schema": _SCHEMA, "components": dict(sorted(components.items()))}
    atomic_write_json(_path(state_root), body, hook=fsio_hook("floors"))


def _committed_components(store: ComponentStore) -> dict[str, int]:
    """Counter of the committed version of every component (none pending)."""
    out = {}
    for name in store.names():
        record = store.record(name)
        if record.current is not None and not record.pending:
            out[name] = record.current.release_counter
    return out


def migrate(state_root: Path, bootctl_path: Path, store: ComponentStore) -> BootControl:
    """Give a state directory from before per-kind floors its floors (see the module
    docstring); nothing to do once ``floors.json`` exists. Returns boot control as it
    is afterwards.

    Raises:
        ConfigError: boot control or the floors file is unreadable.
        InstallFailed: boot control cannot be written.
    """
    bc = read_bootctl(bootctl_path)
    if _read_component_floors(state_root) is not None:
        return bc
    components = _committed_components(store)
    image = bc.slot(bc.committed).release_counter
    if bc.min_release_counter > image:
        bc = write_bootctl(bootctl_path, replace(bc, min_release_counter=image),
                           what="floor")
    try:
        write_floors(state_root, components)
    except OSError as exc:
        raise InstallFailed(f"cannot write {_path(state_root)}: {exc}") from exc
    return bc


def read_floors(state_root: Path, bc: BootControl, store: ComponentStore) -> Floors:
    """The device's floors now: the image's from ``bc``, the components' from
    ``floors.json`` (from the committed components if it does not exist yet).

    Raises:
        ConfigError: the floors file is damaged.
    """
    components = _read_component_floors(state_root)
    if components is None:
        components = _committed_components(store)
    return Floors(image=bc.min_release_counter, components=components)


def lower_component_floors(state_root: Path, floor: int) -> dict[str, int]:
    """Lower every component floor above ``floor`` to it (a root-signed counter reset);
    return the floors before. Raises ``OSError`` or ``ConfigError``."""
    before = _read_component_floors(state_root) or {}
    lowered = {name: min(counter, floor) for name, counter in before.items()}
    if lowered != before:
        write_floors(state_root, lowered)
    return before


def raise_component_floor(state_root: Path, name: str, counter: int) -> None:
    """Raise component ``name``'s floor to ``counter`` (never lowers it).

    Raises:
        InstallFailed: the floors file cannot be written.
        ConfigError: it is damaged.
    """
    components = _read_component_floors(state_root) or {}
    if components.get(name, 0) >= counter:
        return
    components[name] = counter
    try:
        write_floors(state_root, components)
    except OSError as exc:
        raise InstallFailed(f"cannot raise the anti-rollback floor of component {name}: "
                            f"{exc}") from exc


def running_components(store: ComponentStore) -> tuple[ComponentVersion, ...]:
    """What the device runs of each component (committed versions), for its check-in:
    the tracker offers each kind against its own counter."""
    out = []
    for name in store.names():
        record = store.record(name)
        if record.current is not None and not record.pending:
            out.append(ComponentVersion(name, record.current.version,
                                        record.current.release_counter))
    return tuple(out)
