"""The device state directory: configuration, trusted root, slots, boot control.

    STATE/device.json        peer.config.DeviceConfig
    STATE/trust/root.json    trusted TUF root (python-tuf keeps its cache beside it)
    STATE/slots/a.img, b.img file-backed A/B slots (or partitions: peer.blockslots)
    STATE/bootctl.json       peer.bootctl record (and bootctl.json.redundant, its twin)
    STATE/downloads/         payloads being assembled, per payload SHA-256
    STATE/last_result.json   outcome of the last update attempt
    STATE/outbox.json        reports not yet delivered to the tracker (oldest first)
    STATE/progress.json      live progress of a running update (download or seeding)
    STATE/journal.json       the update state machine's journal (peer.machine)
    STATE/policy.toml        install policy (optional; peer.install_policy)
    STATE/tls-ca.pem         CA bundle of the servers (optional; device.json names it
                             relatively, so the directory may move)
    STATE/offers.json        when the release now offered was first offered (install delay)
    STATE/attempts.json      when attempts of one release failed in a row (retry budget)
    STATE/floors.json        anti-rollback floors of the components (peer.floors)
    STATE/trust_state.json   counter reset epochs applied (peer.trust)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata
from tuf.api.metadata import Root as RootRole

from swarmota.infra.fsio import atomic_write_bytes, atomic_write_json, fsync_dir
from swarmota.peer.blockslots import BlockSlots, booted_slot
from swarmota.peer.bootctl import (
    BootControl,
    SlotRecord,
    initial_bootctl,
    read_bootctl,
    remove_bootctl,
    write_bootctl,
)
from swarmota.peer.bootloader import FACTORY, Bootloader, GrubEnv, UBootEnv
from swarmota.peer.config import DeviceConfig, load_config, save_config
from swarmota.peer.crashpoints import fsio_hook
from swarmota.peer.errors import ConfigError, PeerError
from swarmota.peer.floors import write_floors
from swarmota.peer.install import hash_file
from swarmota.peer.keystore import open_keystore
from swarmota.peer.machine import Journal, JournalError, decode_journal, encode_journal
from swarmota.peer.slots import FileSlots, SlotBackend
from swarmota.peer.trust import TrustState

__all__ = ["MAX_OUTBOX_REPORTS", "DeviceState", "JournalError", "init_device"]

MAX_OUTBOX_REPORTS = 32

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceState:
    """Paths of one device's state directory."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "device.json"

    @property
    def trust_dir(self) -> Path:
        return self.root / "trust"

    @property
    def bootctl_path(self) -> Path:
        return self.root / "bootctl.json"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def result_path(self) -> Path:
        return self.root / "last_result.json"

    def slot_path(self, slot: str) -> Path:
        return self.root / "slots" / f"{slot}.img"

    def config(self) -> DeviceConfig:
        return load_config(self.config_path)

    def slots(self, config: DeviceConfig | None = None) -> SlotBackend:
        """The device's slot backend: file-backed (``STATE/slots/``) or partitions."""
        config = config or self.config()
        if config.slot_backend == "block":
            return BlockSlots(config.slot_devices)
        return FileSlots(self.root / "slots")

    def bootloader(self, config: DeviceConfig | None = None) -> Bootloader | None:
        """The device's bootloader adapter; ``None`` when the agent simulates it (file
        boot control). The booted slot comes from the kernel command line or the mount
        table (``peer.blockslots.booted_slot``)."""
        config = config or self.config()
        devices = config.slot_devices

        def booted() -> str:
            slot = BlockSlots(devices).booted() if devices else _cmdline_slot()
            if slot is None:
                raise ConfigError("cannot tell the booted slot: neither swarmota.slot= nor "
                                  "root= on the kernel command line names one, and no "
                                  "slot is mounted on /")
            return slot

        if config.bootloader == "grub" and config.grub_env_path:
            return GrubEnv(Path(config.grub_env_path), booted=booted)
        if config.bootloader == "uboot" and config.uboot_env_config:
            default = config.uboot_default_env
            return UBootEnv(Path(config.uboot_env_config), booted=booted,
                            default_env=Path(default) if default else None)
        return None

    @property
    def policy_path(self) -> Path:
        return self.root / "policy.toml"

    def first_offered(self, version: str, now_s: float) -> float:
        """When ``version`` was first offered (``now_s`` if it is new: recorded)."""
        path = self.root / "offers.json"
        try:
            seen = json.loads(path.read_bytes())
            if isinstance(seen, dict) and seen.get("version") == version:
                return float(seen["first_offered_at_s"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        atomic_write_json(path, {"version": version, "first_offered_at_s": now_s})
        return now_s

    @property
    def trust_state_path(self) -> Path:
        return self.root / "trust_state.json"

    @property
    def attempts_path(self) -> Path:
        return self.root / "attempts.json"

    def failed_attempts(self, version: str, *, now_s: float, window_s: float) -> list[float]:
        """When attempts to install ``version`` failed in a row (seconds since the epoch),
        those of the last ``window_s`` seconds only: older failures are forgiven, so a
        spent retry budget recovers with time. (A record of an older format, without
        times, counts as forgiven.)"""
        try:
            raw = json.loads(self.attempts_path.read_bytes())
            if isinstance(raw, dict) and raw.get("version") == version:
                return [float(t) for t in raw.get("failed_at_s", [])
                        if now_s - window_s < float(t) <= now_s + window_s]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        return []

    def count_attempt(self, version: str, *, ok: bool, now_s: float) -> None:
        """Record an attempt's outcome at ``now_s`` (a success clears the record)."""
        failed: list[float] = []
        if not ok:
            try:
                raw = json.loads(self.attempts_path.read_bytes())
                if isinstance(raw, dict) and raw.get("version") == version:
                    failed = [float(t) for t in raw.get("failed_at_s", [])][-63:]
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                pass
            failed.append(now_s)
        atomic_write_json(self.attempts_path, {"version": version, "failures": len(failed),
                                               "failed_at_s": failed})

    @property
    def journal_path(self) -> Path:
        return self.root / "journal.json"

    def journal(self) -> Journal:
        """The update journal; idle when there is none.

        Raises:
            JournalError: the file exists but does not parse.
        """
        try:
            data = self.journal_path.read_bytes()
        except FileNotFoundError:
            return Journal()
        return decode_journal(data)

    def save_journal(self, journal: Journal) -> None:
        """Persist ``journal`` atomically (crash points ``journal.*``)."""
        atomic_write_bytes(self.journal_path, encode_journal(journal),
                           hook=fsio_hook("journal"))

    def bootctl(self) -> BootControl:
        return read_bootctl(self.bootctl_path)

    def last_result(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.result_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def save_result(self, result: dict[str, Any]) -> None:
        """Record a pass's outcome. The last failure (status and message, when, which
        release) is kept in it as ``last_failure`` across the passes that follow, until
        an update succeeds: a pass with nothing to do must not hide why the last attempt
        failed."""
        out = dict(result)
        if out.get("status", 0) != 0:
            out["last_failure"] = {k: out.get(k) for k in ("status", "message", "to_version",
                                                           "finished_at")}
        elif not out.get("updated"):
            previous = (self.last_result() or {}).get("last_failure")
            if isinstance(previous, dict):
                out["last_failure"] = previous
        atomic_write_json(self.result_path, out)

    @property
    def progress_path(self) -> Path:
        return self.root / "progress.json"

    def progress(self) -> dict[str, Any] | None:
        """The running update's last progress record, if any: one whose agent is gone
        (killed mid-pass: its ``pid`` no longer runs) is stale and not returned."""
        try:
            value = json.loads(self.progress_path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(value, dict) or not _alive(value.get("pid")):
            return None
        return value

    def save_progress(self, progress: dict[str, Any] | None) -> None:
        """Replace the progress record (``None`` removes it). Not fsynced: it is a view,
        and one that cannot be written (a full disk) is skipped, never an error."""
        tmp = self.progress_path.with_name(".progress.json.tmp")
        try:
            if progress is None:
                self.progress_path.unlink(missing_ok=True)
                return
            tmp.write_text(json.dumps({**progress, "pid": os.getpid()}, sort_keys=True))
            os.replace(tmp, self.progress_path)
        except OSError as exc:
            log.debug("progress not written: %s", exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    @property
    def outbox_path(self) -> Path:
        return self.root / "outbox.json"

    def outbox(self) -> list[dict[str, Any]]:
        """Reports waiting for delivery, oldest first."""
        try:
            value = json.loads(self.outbox_path.read_bytes())
        except (FileNotFoundError, ValueError):
            return []
        return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []

    def save_outbox(self, reports: list[dict[str, Any]]) -> None:
        """Persist undelivered reports, keeping the newest ``MAX_OUTBOX_REPORTS``."""
        atomic_write_json(self.outbox_path, reports[-MAX_OUTBOX_REPORTS:],
                          hook=fsio_hook("outbox"))


def _cmdline_slot(path: Path = Path("/proc/cmdline")) -> str | None:
    try:
        cmdline = path.read_text()
    except OSError:
        return None
    return booted_slot({"a": "", "b": ""}, cmdline=cmdline, mountinfo="", resolve=False)


def _alive(pid: object) -> bool:
    """Whether process ``pid`` exists (an int; anything else: no)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    return True


def init_device(state_dir: Path, config: DeviceConfig, *, root_json: bytes, image: Path,
                version: str, release_counter: int, force: bool = False) -> DeviceState:
    """Create a device state directory with ``image`` committed in slot A.

    File slots: ``image`` is copied into ``STATE/slots/a.img``. Block slots: partition
    A must already hold ``image`` (flashed at the factory; checked, never written). A
    real bootloader's environment is set to the factory state (slot a, committed).
    With ``keystore: tpm`` the TPM's keys, floors and trust anchor are made afresh
    (:meth:`peer.keystore.TpmKeyStore.provision`: the signing requests for the fleet
    CA are in ``STATE/identity/request.pem``).

    Raises:
        ConfigError: the directory is already a device (without ``force``), the root
            metadata is not valid TUF root metadata, or the image cannot be read; the
            TPM already holds keys of a device (without ``force``).
        TpmError: the TPM refused or failed (``OwnerAuthError``: the owner password).
    """
    state = DeviceState(state_dir)
    if state.config_path.exists() and not force:
        raise ConfigError(f"{state_dir} is already a device state directory (use --force)")
    try:
        root = Metadata[RootRole].from_bytes(root_json)
        root.verify_delegate(RootRole.type, root)
    except (RepositoryError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"trusted root is not valid, self-signed TUF root metadata: {exc}") \
            from None
    if not image.is_file():
        raise ConfigError(f"slot A image {image} does not exist")
    if force and state_dir.exists():
        for sub in ("trust", "slots", "downloads", "components"):
            shutil.rmtree(state_dir / sub, ignore_errors=True)
        for stale in ("offers.json", "attempts.json", "trust_state.json"):
            (state_dir / stale).unlink(missing_ok=True)
    (state_dir / "slots").mkdir(parents=True, exist_ok=True)
    state.trust_dir.mkdir(parents=True, exist_ok=True)
    state.downloads_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(state.trust_dir / "root.json", root_json)
    TrustState().save(state.trust_state_path)
    if config.slot_backend == "block":
        size, sha = hash_file(image)
        slots = state.slots(config)
        try:
            held = slots.hash("a", size)
        except OSError as exc:
            raise ConfigError(f"cannot read slot a: {exc}") from None
        if held != (size, sha):
            raise ConfigError(f"slot a ({slots.image_path('a')}) does not hold {image}: "
                              "flash the factory image there first")
    else:
        slot_a = state.slot_path("a")
        tmp = slot_a.with_name(".a.img.init")
        shutil.copyfile(image, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(slot_a)
        fsync_dir(slot_a.parent)
        size, sha = hash_file(slot_a)
    loader = state.bootloader(config)
    if loader is not None:
        try:
            loader.write(FACTORY, what="init")
        except PeerError as exc:
            raise ConfigError(f"cannot initialise the {loader.name} environment: {exc}") \
                from None
    save_config(state.config_path, config)
    remove_bootctl(state.bootctl_path)
    state.journal_path.unlink(missing_ok=True)
    write_bootctl(state.bootctl_path, initial_bootctl(SlotRecord(version, release_counter,
                                                                 sha, size)))
    write_floors(state.root, {})  # one floor per update kind and component, none yet
    keystore = open_keystore(config, state.root)
    if keystore is not None:  # keys, floors and trust anchor made afresh in the TPM
        keystore.provision(root_json=root_json, image_floor=release_counter, force=force)
    return state
