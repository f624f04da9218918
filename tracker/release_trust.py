"""Releases registered through the admin API are verified as devices verify them.

The tracker holds the repository's root metadata (``tracker serve --repository-root``)
and follows the TUF chain (python-tuf ngclient: root -> timestamp -> snapshot ->
targets) from the origin, like a device. A release is registered only if its manifest
is a target of the signed targets metadata, with the signed length and hashes: given
as text (the manifest bytes are checked against the signed target) or as the URL of
the manifest in the origin tree (downloaded through python-tuf, which checks them).
Anything unsigned, altered, unknown to the signed metadata or expired is refused, so a
stolen operator token cannot make the tracker offer a release the repository did not
sign (devices would refuse it anyway; the tracker refuses it first, with a reason).

The ``httpx`` adapter of this check lives here (a blocking fetcher, run in a worker
thread); its errors become :class:`~tracker.errors.RequestError` (the release is not
signed as given) or :class:`~tracker.errors.UpstreamError` (the origin could not be
reached or served no valid metadata).
"""

from __future__ import annotations

import re
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface, Updater

from swarmota.manifest import (
    MAX_MANIFEST_BYTES,
    ManifestFormatError,
    ReleaseManifest,
    parse_release_manifest,
    release_target_name,
)
from swarmota.tracker.errors import ConfigError, RequestError, UpstreamError

__all__ = ["ReleaseVerifier"]

_HASHED_NAME_RE = re.compile(r"[0-9a-f]{64}\.(.+)")


class _Fetcher(FetcherInterface):
    """python-tuf's network seam over a blocking httpx client; no redirects."""

    def __init__(self, timeout_s: float, ca_file: Path | None) -> None:
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot use {ca_file} as the origin's CA file: "
                                  f"{exc}") from exc
        self._client = httpx.Client(timeout=timeout_s, verify=verify, trust_env=False,
                                    follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._client.send(self._client.build_request("GET", url),
                                         stream=True)
        except httpx.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"GET {url}: {exc}") from exc
        if response.status_code != 200:
            response.close()
            raise tuf_exceptions.DownloadHTTPError(f"GET {url}: HTTP {response.status_code}",
                                                   response.status_code)
        return self._stream(url, response)

    @staticmethod
    def _stream(url: str, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"GET {url}: {exc}") from exc
        finally:
            response.close()


class ReleaseVerifier:
    """Verifies release manifests against the repository at ``origin_url``.

    ``trust_dir`` keeps the trusted metadata; on first use it is seeded with
    ``root_file`` (the repository's root metadata, as provisioned on devices), and
    python-tuf moves it forward along the signed root chain only. ``ca_file``: PEM
    certificates to trust for an HTTPS origin (default: the system's).

    Raises:
        ConfigError: ``root_file`` cannot be read, or ``origin_url`` is not http(s).
    """

    def __init__(self, trust_dir: Path, origin_url: str, root_file: Path, *,
                 ca_file: Path | None = None, timeout_s: float = 30.0) -> None:
        parts = urlsplit(origin_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"origin URL {origin_url!r} is not an http(s) URL")
        self.origin_url = origin_url.rstrip("/")
        self.trust_dir = trust_dir
        self._ca_file = ca_file
        self._timeout_s = timeout_s
        self._limiter = trio.CapacityLimiter(1)  # one refresh of trust_dir at a time
        try:
            trust_dir.mkdir(parents=True, exist_ok=True)
            if not (trust_dir / "root.json").exists():
                shutil.copyfile(root_file, trust_dir / "root.json")
        except OSError as exc:
            raise ConfigError(f"cannot set up the repository trust in {trust_dir} from "
                              f"{root_file}: {exc.strerror or exc}") from exc

    async def verify(self, manifest: bytes | None, url: str | None) -> ReleaseManifest:
        """The parsed manifest, once the signed metadata vouches for it: ``manifest``
        (its bytes) or ``url`` (under the origin's ``targets/``), exactly one.

        Raises:
            RequestError: not a manifest, not signed (unknown target, other length or
                hash), or a URL outside the origin's targets.
            UpstreamError: the origin could not be reached, or its metadata is invalid
                or expired.
        """
        return await trio.to_thread.run_sync(self._verify, manifest, url,
                                             limiter=self._limiter)

    def _verify(self, manifest: bytes | None, url: str | None) -> ReleaseManifest:
        fetcher = _Fetcher(self._timeout_s, self._ca_file)
        try:
            with tempfile.TemporaryDirectory(prefix="swarmota-release-") as scratch:
                updater = Updater(metadata_dir=str(self.trust_dir),
                                  metadata_base_url=f"{self.origin_url}/metadata/",
                                  target_base_url=f"{self.origin_url}/targets/",
                                  target_dir=scratch, fetcher=fetcher, bootstrap=None)
                try:
                    updater.refresh()
                except (tuf_exceptions.RepositoryError,
                        tuf_exceptions.DownloadError) as exc:
                    raise UpstreamError(f"the repository's signed metadata at "
                                        f"{self.origin_url} cannot be used: "
                                        f"{type(exc).__name__}: {exc}") from exc
                target = self._target_of(manifest, url)
                info = updater.get_targetinfo(target)
                if info is None:
                    raise RequestError(f"{target} is not in the repository's signed "
                                       "targets metadata: not a published release")
                if manifest is None:
                    try:
                        path = updater.download_target(info, filepath=str(
                            Path(scratch) / "manifest.json"))
                    except tuf_exceptions.RepositoryError as exc:
                        raise RequestError(f"{url}: does not match the signed target "
                                           f"{target}: {exc}") from exc
                    except tuf_exceptions.DownloadError as exc:
                        raise UpstreamError(f"cannot download {url}: {exc}") from exc
                    manifest = Path(path).read_bytes()
                else:
                    try:
                        info.verify_length_and_hashes(manifest)
                    except tuf_exceptions.LengthOrHashMismatchError as exc:
                        raise RequestError(f"the manifest given is not the signed target "
                                           f"{target}: {exc}") from exc
                parsed = _parse(manifest)
                if release_target_name(parsed.product, parsed.version) != target:
                    raise RequestError(f"the manifest names {parsed.product} "
                                       f"{parsed.version}, not the target {target}")
                return parsed
        finally:
            fetcher.close()

    def _target_of(self, manifest: bytes | None, url: str | None) -> str:
        """The TUF target name a request is about."""
        if manifest is not None:
            parsed = _parse(manifest)
            return release_target_name(parsed.product, parsed.version)
        if url is None:
            raise RuntimeError("neither a manifest nor a URL")
        base = f"{self.origin_url}/targets/"
        if not url.startswith(base) or "?" in url or "#" in url:
            raise RequestError(f"url must be a release manifest under {base} (the "
                               "repository's targets)")
        name = url[len(base):]
        head, _, file = name.rpartition("/")
        match = _HASHED_NAME_RE.fullmatch(file)  # consistent snapshots prefix the hash
        target = f"{head}/{match.group(1) if match else file}"
        if not target.startswith("releases/") or ".." in target.split("/"):
            raise RequestError(f"{url} is not a release manifest of the repository")
        return target


def _parse(data: bytes) -> ReleaseManifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise RequestError(f"release manifest over {MAX_MANIFEST_BYTES} bytes")
    try:
        return parse_release_manifest(data)
    except ManifestFormatError as exc:
        raise RequestError(f"not a valid release manifest: {exc}") from None
