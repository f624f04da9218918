"""The device side of the TUF metadata chain (python-tuf ngclient).

:func:`fetch_release_manifest` refreshes root -> timestamp -> snapshot -> targets from
the origin, looks up a release manifest in the signed targets and downloads it, verified
against the signed length and hashes. It blocks: call it through
``trio.to_thread.run_sync``. python-tuf errors become ours: a repository that fails
verification (bad signature, expired, rolled back, too long) is ``VerifyFailed``; an
unreachable origin is ``DownloadFailed``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import Updater

from peer.errors import DownloadFailed, PinMismatch, VerifyFailed
from peer.http import DEFAULT_MIN_RATE_BYTES_PER_S, TlsPolicy, TufFetcher

__all__ = ["fetch_release_manifest"]


def fetch_release_manifest(trust_dir: Path, origin_url: str, target_name: str, *,
                           timeout_s: float, scratch_dir: Path,
                           tls: TlsPolicy | None = None,
                           min_rate_bytes_per_s: int = DEFAULT_MIN_RATE_BYTES_PER_S,
                           ) -> tuple[bytes, int]:
    """Return ``(manifest bytes, metadata bytes downloaded)`` for ``target_name``.

    ``trust_dir`` holds the trusted metadata (``root.json`` at least); python-tuf
    updates it only with metadata it accepted. ``tls``: CA bundle and pins for the
    origin (default: system store, no pins); a key outside the pins raises
    ``PinMismatch`` before any request, and no metadata moves. A response slower than
    ``min_rate_bytes_per_s`` after ``timeout_s`` is cut (slow retrieval, DownloadFailed);
    one longer than python-tuf's limit for its role or the signed length is cut there.
    """
    base = origin_url.rstrip("/")
    fetcher = TufFetcher(timeout_s=timeout_s, tls=tls, min_rate_bytes_per_s=min_rate_bytes_per_s)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = scratch_dir / "release-manifest.download"
    try:
        updater = Updater(metadata_dir=str(trust_dir), metadata_base_url=f"{base}/metadata/",
                          target_base_url=f"{base}/targets/", target_dir=str(scratch_dir),
                          fetcher=fetcher, bootstrap=None)
        updater.refresh()
        info = updater.get_targetinfo(target_name)
        if info is None:
            raise VerifyFailed(f"{target_name} is not listed in the signed targets metadata")
        updater.download_target(info, filepath=str(scratch))
        data = scratch.read_bytes()
    except tuf_exceptions.ExpiredMetadataError as exc:
        raise VerifyFailed(f"expired metadata (possible freeze attack): {exc}") from exc
    except tuf_exceptions.RepositoryError as exc:
        raise VerifyFailed(f"metadata rejected: {type(exc).__name__}: {exc}") from exc
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
