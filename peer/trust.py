"""The device side of the TUF metadata chain (python-tuf ngclient).

:func:`fetch_release_manifest` refreshes root -> timestamp -> snapshot -> targets from
the origin, looks up a release manifest in the signed targets and downloads it, verified
against the signed length and hashes. It blocks: call it through
``trio.to_thread.run_sync``. python-tuf errors become ours: a repository that fails
verification (bad signature, expired, rolled back, too long) is ``VerifyFailed``; an
unreachable origin is ``DownloadFailed``.

One check on top of python-tuf: a root that lists the same public key under two keyids
of one role is refused (python-tuf counts keyids, so one key signing twice would meet a
threshold of two); the trusted metadata is put back as it was before the refresh.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError
from tuf.ngclient import Updater

from infra.fsio import atomic_write_bytes
from peer.errors import DownloadFailed, PinMismatch, VerifyFailed
from peer.http import DEFAULT_MIN_RATE_BYTES_PER_S, TlsPolicy, TufFetcher

__all__ = ["fetch_release_manifest"]


def fetch_release_manifest(trust_dir: Path, origin_url: str, target_name: str, *,
                           timeout_s: float, scratch_dir: Path,
                           tls: TlsPolicy | None = None,
                           min_rate_bytes_per_s: int = DEFAULT_MIN_RATE_BYTES_PER_S,
                           pass_timeout_s: float | None = None,
                           ) -> tuple[bytes, int]:
    """Return ``(manifest bytes, metadata bytes downloaded)`` for ``target_name``.

    ``trust_dir`` holds the trusted metadata (``root.json`` at least); python-tuf
    updates it only with metadata it accepted. ``tls``: CA bundle and pins for the
    origin (default: system store, no pins); a key outside the pins raises
    ``PinMismatch`` before any request, and no metadata moves. A response slower than
    ``min_rate_bytes_per_s`` after ``timeout_s`` is cut (slow retrieval, DownloadFailed);
    one longer than python-tuf's limit for its role or the signed length is cut there
    (VerifyFailed: bad data, not a transport failure). ``pass_timeout_s`` bounds every
    request of the refresh together (DownloadFailed beyond it).
    """
    base = origin_url.rstrip("/")
    fetcher = TufFetcher(timeout_s=timeout_s, tls=tls, min_rate_bytes_per_s=min_rate_bytes_per_s,
                         pass_timeout_s=pass_timeout_s)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = scratch_dir / "release-manifest.download"
    try:
        trusted = _read_trusted(trust_dir)
        updater = Updater(metadata_dir=str(trust_dir), metadata_base_url=f"{base}/metadata/",
                          target_base_url=f"{base}/targets/", target_dir=str(scratch_dir),
                          fetcher=fetcher, bootstrap=None)
        updater.refresh()
        try:
            _check_distinct_keys(trust_dir / "root.json")
        except VerifyFailed:
            _restore_trusted(trust_dir, trusted)
            raise
        info = updater.get_targetinfo(target_name)
        if info is None:
            raise VerifyFailed(f"{target_name} is not listed in the signed targets metadata")
        updater.download_target(info, filepath=str(scratch))
        data = scratch.read_bytes()
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
    finally:
        fetcher.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
    return data, fetcher.bytes_received


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
