"""The device side of the TUF metadata chain (python-tuf ngclient), and what the device
keeps of its trust besides it.

:class:`MetadataPass` refreshes root -> timestamp -> snapshot -> targets from the
origin, then looks up a release manifest in the signed targets (following delegations)
and downloads it, verified against the signed length and hashes (its compact form when
the targets entry pins one: :mod:`manifest.release`); the agent starts the refresh while
it checks in, also when nothing is offered (so that an idle device follows key rotations
and counter resets). :func:`fetch_release_manifest` does both in one call. All block:
call them through ``trio.to_thread.run_sync``. python-tuf errors become ours: a
repository that fails verification (bad signature, expired, rolled back, too long) is
``VerifyFailed``; an unreachable origin is ``DownloadFailed``.

The trust anchor, ``STATE/trust/root.json``, is written by ``peer init`` and afterwards
only by python-tuf, with a root it verified along the chain (each version signed by a
threshold of its predecessor's root keys and of its own). Nothing else on the device
writes it: a device is never "re-anchored" by the network.

python-tuf renames new metadata into place without an fsync, so a power cut could leave
a trusted file empty or torn: :class:`_DurableUpdater` writes each one as every file
that matters here is written (temporary, fsync, rename, fsync of the directory); and a
file a cut tore anyway (an older agent, a filesystem that reorders) is not a verdict on
the repository: a torn ``timestamp``/``snapshot``/``targets`` is dropped and fetched
again, a torn ``root.json`` is taken back from python-tuf's verified root history
(:func:`_mend_torn_metadata`).

One check on top of python-tuf: a root that lists the same public key under two keyids
of one role is refused (python-tuf counts keyids, so one key signing twice would meet a
threshold of two); the trusted metadata is put back as it was before the refresh.

``STATE/trust_state.json`` (:class:`TrustState`) records which root-signed counter
reset epochs (:mod:`manifest.counters`) the device has applied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater

from swarmota.infra.fsio import atomic_write_bytes, atomic_write_json
from swarmota.manifest import (
    COUNTER_RESETS_FIELD,
    CounterReset,
    ManifestFormatError,
    apply_counter_reset,
    compact_target_name,
    parse_compact_pin,
    parse_counter_resets,
)
from swarmota.peer.bootctl import BootControl, write_bootctl
from swarmota.peer.errors import DownloadFailed, PinMismatch, VerifyFailed
from swarmota.peer.floors import lower_component_floors
from swarmota.peer.http import DEFAULT_MIN_RATE_BYTES_PER_S, TlsPolicy, TufFetcher
from swarmota.peer.tpm_nv import NvFloors, TrustAnchor

__all__ = ["MetadataPass", "TrustState", "apply_pending_counter_reset",
           "fetch_release_manifest", "pending_counter_reset"]

log = logging.getLogger(__name__)
_MAX_STATE_BYTES = 64 * 1024


def fetch_release_manifest(trust_dir: Path, origin_url: str, target_name: str, *,
                           timeout_s: float, scratch_dir: Path,
                           tls: TlsPolicy | None = None,
                           min_rate_bytes_per_s: int = DEFAULT_MIN_RATE_BYTES_PER_S,
                           pass_timeout_s: float | None = None,
                           compact: bool = False,
                           anchor: TrustAnchor | None = None,
                           ) -> tuple[bytes, int]:
    """Return ``(manifest bytes, metadata bytes downloaded)`` for ``target_name``: one
    :class:`MetadataPass` (refresh, then :meth:`MetadataPass.release_manifest`)."""
    with MetadataPass(trust_dir, origin_url, timeout_s=timeout_s, scratch_dir=scratch_dir,
                      tls=tls, min_rate_bytes_per_s=min_rate_bytes_per_s,
                      pass_timeout_s=pass_timeout_s, anchor=anchor) as metadata:
        metadata.refresh()
        data = metadata.release_manifest(target_name, compact=compact)
        return data, metadata.bytes_received


class MetadataPass:
    """One refresh of the metadata chain from the origin, then release manifests looked
    up in it: :meth:`refresh` (root -> timestamp -> snapshot -> targets), then any
    number of :meth:`release_manifest` (following delegations; the manifest verified
    against the signed length and hashes). Splitting the two lets the agent refresh
    while it checks in, and look up the release the tracker offers once both are done:
    the offer names a target, nothing more, and nothing is taken from it unverified.
    Blocking: call it through ``trio.to_thread.run_sync``; one thread at a time.

    ``trust_dir`` holds the trusted metadata (``root.json`` at least); python-tuf
    updates it only with metadata it accepted. ``tls``: CA bundle and pins for the
    origin (default: system store, no pins); a key outside the pins raises
    ``PinMismatch`` before any request, and no metadata moves. A response slower than
    ``min_rate_bytes_per_s`` after ``timeout_s`` is cut (slow retrieval, DownloadFailed);
    one longer than python-tuf's limit for its role or the signed length is cut there
    (VerifyFailed: bad data, not a transport failure). ``pass_timeout_s`` bounds every
    request of the pass together (DownloadFailed beyond it). ``anchor``: the trusted
    root is held to the TPM's trust anchor (a device with ``keystore: tpm``): a
    replaced ``root.json`` is refused before python-tuf reads it, and the anchor moves
    with every root python-tuf accepts (:meth:`peer.tpm_nv.TrustAnchor.sync`, which
    also raises ``TpmError``).
    """

    def __init__(self, trust_dir: Path, origin_url: str, *, timeout_s: float,
                 scratch_dir: Path, tls: TlsPolicy | None = None,
                 min_rate_bytes_per_s: int = DEFAULT_MIN_RATE_BYTES_PER_S,
                 pass_timeout_s: float | None = None,
                 anchor: TrustAnchor | None = None) -> None:
        """Raises ConfigError: ``tls.ca_file`` cannot be loaded."""
        self._trust_dir = trust_dir
        self._origin_url = origin_url
        self._scratch_dir = scratch_dir
        self._anchor = anchor
        self._fetcher = TufFetcher(timeout_s=timeout_s, tls=tls,
                                   min_rate_bytes_per_s=min_rate_bytes_per_s,
                                   pass_timeout_s=pass_timeout_s)
        self._updater: Updater | None = None

    def __enter__(self) -> MetadataPass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fetcher.close()

    @property
    def bytes_received(self) -> int:
        """Metadata bytes downloaded so far (release manifests included)."""
        return int(self._fetcher.bytes_received)

    def refresh(self) -> None:
        """Refresh the trusted top-level metadata.

        Raises:
            VerifyFailed: the repository failed verification (bad signature, expired,
                rolled back, too long; one key twice in a role of root).
            DownloadFailed: the origin cannot be reached (PinMismatch: a key outside
                the pins).
        """
        self._scratch_dir.mkdir(parents=True, exist_ok=True)
        with _tuf_errors(self._trust_dir):
            self._updater = _refreshed(self._trust_dir, self._origin_url, self._fetcher,
                                       self._scratch_dir, self._anchor)

    def release_manifest(self, target_name: str, *, compact: bool = False) -> bytes:
        """The bytes of release manifest ``target_name``, verified against the signed
        targets metadata (after :meth:`refresh`). ``compact``: when the signed entry pins
        a compact form of the manifest (:func:`manifest.parse_compact_pin`), that
        instead, verified against the pinned length and SHA-256 (its payloads name chunk
        lists instead of listing chunks).

        Raises:
            VerifyFailed, DownloadFailed: as :meth:`refresh`; VerifyFailed also when the
                target is not listed.
            RuntimeError: called before a successful :meth:`refresh`.
        """
        updater = self._updater
        if updater is None:
            raise RuntimeError("release_manifest() before a successful refresh()")
        scratch = self._scratch_dir / "release-manifest.download"
        try:
            with _tuf_errors(self._trust_dir):
                info = updater.get_targetinfo(target_name)
                if info is None:
                    raise VerifyFailed(f"{target_name} is not listed in the signed targets "
                                       "metadata")
                pin = parse_compact_pin(info.custom) if compact else None
                if pin is not None:
                    info = TargetFile(length=pin[0], hashes={"sha256": pin[1]},
                                      path=compact_target_name(target_name))
                updater.download_target(info, filepath=str(scratch))
                return scratch.read_bytes()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)


class _DurableUpdater(Updater):
    """python-tuf's updater, writing trusted metadata durably (fsync, rename, fsync of
    the directory) instead of a bare rename."""

    def _persist_file(self, filename: str, data: bytes) -> None:
        atomic_write_bytes(filename, data)


def _mend_torn_metadata(trust_dir: Path) -> None:
    """Put right trusted metadata a power cut tore (empty, or not JSON): drop a torn
    timestamp, snapshot or targets (fetched again, verified as ever); take a torn
    ``root.json`` back from the newest root of python-tuf's verified history.

    Raises:
        VerifyFailed: ``root.json`` is torn and no verified root is left to take back.
    """
    for name in ("timestamp.json", "snapshot.json", "targets.json"):
        path = trust_dir / name
        if path.exists() and not _parses(path):
            log.warning("trusted %s is torn (a power cut?): fetching it again", name)
            path.unlink()
    root = trust_dir / "root.json"
    if _parses(root):
        return
    history = sorted(((int(p.name.split(".")[0]), p)
                      for p in (trust_dir / "root_history").glob("*.root.json")
                      if p.name.split(".")[0].isdigit()), reverse=True)
    for _, candidate in history:
        if _parses(candidate):
            log.warning("trusted root.json is torn (a power cut?): restored %s",
                        candidate.name)
            atomic_write_bytes(root, candidate.read_bytes())
            return
    raise VerifyFailed(f"the trusted root {root} is damaged and no verified root is left "
                       "to restore it: re-provision the device's trust anchor")


def _parses(path: Path) -> bool:
    try:
        Metadata.from_bytes(path.read_bytes())
    except (OSError, DeserializationError, ValueError):
        return False
    return True


def _refreshed(trust_dir: Path, origin_url: str, fetcher: TufFetcher,
               scratch_dir: Path, anchor: TrustAnchor | None = None) -> Updater:
    """An updater whose top-level metadata is refreshed and checked (distinct keys);
    with ``anchor``, the trusted root checked against it before and moved with it
    after."""
    base = origin_url.rstrip("/")
    if anchor is not None:
        anchor.sync()  # a root.json that is not the anchored one is put right first
    _mend_torn_metadata(trust_dir)
    trusted = _read_trusted(trust_dir)
    updater = _DurableUpdater(metadata_dir=str(trust_dir), metadata_base_url=f"{base}/metadata/",
                      target_base_url=f"{base}/targets/", target_dir=str(scratch_dir),
                      fetcher=fetcher, bootstrap=None)
    updater.refresh()
    try:
        _check_distinct_keys(trust_dir / "root.json")
    except VerifyFailed:
        _restore_trusted(trust_dir, trusted)
        raise
    if anchor is not None:
        anchor.sync()  # along the roots python-tuf accepted
    return updater


@contextlib.contextmanager
def _tuf_errors(trust_dir: Path) -> Iterator[None]:
    """python-tuf's and the disk's errors as ours."""
    try:
        yield
    except tuf_exceptions.ExpiredMetadataError as exc:
        raise VerifyFailed(f"expired metadata (possible freeze attack): {exc}") from exc
    except tuf_exceptions.RepositoryError as exc:
        raise VerifyFailed(f"metadata rejected: {type(exc).__name__}: {exc}") from exc
    except tuf_exceptions.DownloadLengthMismatchError as exc:
        raise VerifyFailed(f"metadata rejected: longer than allowed (endless data?): "
                           f"{exc}") from exc
    except tuf_exceptions.DownloadError as exc:
        if isinstance(exc.__cause__, PinMismatch):  # python-tuf wraps what its fetcher raises
            raise PinMismatch(f"metadata download refused: {exc.__cause__}") from exc
        raise DownloadFailed(f"metadata download failed: {exc}") from exc
    except OSError as exc:
        raise VerifyFailed(f"cannot use trusted metadata in {trust_dir}: {exc}") from exc


# --- what the device keeps besides the metadata ---------------------------------------


@dataclass
class TrustState:
    """``STATE/trust_state.json``: the counter reset epoch applied per product. (Older
    agents also wrote ``refreshed_at_s``, when the chain was last refreshed; it is read
    no more: the metadata is refreshed beside every check-in.)"""

    counter_epochs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TrustState:
        """The recorded state; an absent or damaged file is an empty state (a damaged
        epoch record at worst applies the current reset again, which only lowers a floor
        to where root already said it may be)."""
        try:
            with open(path, "rb") as fh:
                raw = json.loads(fh.read(_MAX_STATE_BYTES))
            epochs = raw.get("counter_epochs", {})
            if (not isinstance(epochs, dict)
                    or not all(isinstance(v, int) for v in epochs.values())):
                return cls()
            return cls(dict(epochs))
        except (OSError, ValueError, AttributeError, RecursionError):
            return cls()

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"counter_epochs": self.counter_epochs})


def pending_counter_reset(trust_dir: Path, product: str,
                          state: TrustState) -> CounterReset | None:
    """The counter reset of ``product`` in the trusted root, if its epoch is newer than
    the one ``state`` says was applied; else ``None``.

    Raises:
        VerifyFailed: the trusted root is unreadable, or its counter resets malformed.
    """
    try:
        root = Metadata[Root].from_bytes((trust_dir / "root.json").read_bytes()).signed
        resets = parse_counter_resets(root.unrecognized_fields.get(COUNTER_RESETS_FIELD))
    except (OSError, DeserializationError) as exc:
        raise VerifyFailed(f"trusted root unreadable: {exc}") from exc
    except ManifestFormatError as exc:
        raise VerifyFailed(f"trusted root: {exc}") from exc
    reset = resets.get(product)
    if reset is None or reset.epoch <= state.counter_epochs.get(product, 0):
        return None
    return reset


def apply_pending_counter_reset(bc: BootControl, *, trust_dir: Path, state_path: Path,
                                bootctl_path: Path, product: str,
                                hardware: NvFloors | None = None) -> BootControl:
    """Apply the trusted root's counter reset of ``product`` if it is newer than the
    epoch applied: every anti-rollback floor (the image's in boot control, each
    component's in ``floors.json`` beside it) goes down to the reset's floor if it is
    above (written first, then the epoch is recorded: a crash in between applies it
    again, which changes nothing). Returns the boot control now in force.
    An unreadable root or reset is logged and changes nothing.

    ``hardware``: the floors a TPM holds (``keystore: tpm``). The epoch applied is then
    the TPM floor log's (or the file's, if higher): a deleted ``trust_state.json`` does
    not make the reset apply twice; the reset is logged after the state directory's
    floors are lowered, with the hash of the root carrying it
    (:meth:`peer.tpm_nv.NvFloors.apply_reset`). A floor log that does not verify is
    logged and changes nothing (every release is refused anyway).
    Raises ``TpmError`` when the TPM cannot be read or written."""
    state = TrustState.load(state_path)
    try:
        if hardware is not None:
            held = hardware.read().epoch
            if held > state.counter_epochs.get(product, 0):
                state.counter_epochs[product] = held
        reset = pending_counter_reset(trust_dir, product, state)
    except VerifyFailed as exc:
        log.warning("counter reset not applied: %s", exc)
        return bc
    applied = apply_counter_reset(bc.min_release_counter,
                                  state.counter_epochs.get(product, 0), reset)
    if reset is None or applied is None:
        return bc
    floor, epoch = applied
    before = lower_component_floors(bootctl_path.parent, reset.floor)
    for name, counter in sorted(before.items()):
        if counter > reset.floor:
            log.warning("root-signed counter reset (epoch %d): floor of component %s "
                        "%d -> %d", epoch, name, counter, reset.floor)
    if floor != bc.min_release_counter:
        log.warning("root-signed counter reset (epoch %d): anti-rollback floor %d -> %d",
                    epoch, bc.min_release_counter, floor)
        bc = write_bootctl(bootctl_path, replace(bc, min_release_counter=floor), what="floor")
    if hardware is not None:
        hardware.apply_reset(reset, (trust_dir / "root.json").read_bytes())
    state.counter_epochs[product] = epoch
    state.save(state_path)
    return bc


_TOP_LEVEL = ("root.json", "timestamp.json", "snapshot.json", "targets.json")


def _read_trusted(trust_dir: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for name in _TOP_LEVEL:
        try:
            out[name] = (trust_dir / name).read_bytes()
        except FileNotFoundError:
            out[name] = None
    return out


def _restore_trusted(trust_dir: Path, trusted: dict[str, bytes | None]) -> None:
    for name, data in trusted.items():
        if data is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(trust_dir / name)
        else:
            atomic_write_bytes(trust_dir / name, data)


def _check_distinct_keys(root_path: Path) -> None:
    """Raise VerifyFailed if a role of the trusted root lists one public key twice."""
    try:
        root = Metadata[Root].from_bytes(root_path.read_bytes()).signed
    except DeserializationError as exc:
        raise VerifyFailed(f"trusted root unreadable: {exc}") from exc
    for name, role in root.roles.items():
        seen: set[str] = set()
        for keyid in role.keyids:
            key = root.keys.get(keyid)
            if key is None:
                continue
            material = json.dumps([key.keytype, key.scheme, key.keyval], sort_keys=True)
            if material in seen:
                raise VerifyFailed(f"metadata rejected: root version {root.version} lists the "
                                   f"same key twice for role {name} (keyid {keyid[:16]}...): "
                                   "one key must not count twice towards a threshold")
            seen.add(material)
