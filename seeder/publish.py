"""Publishing: image -> zstd payload (+ deltas) -> release manifest -> signed TUF target.

:func:`publish_release` is the whole operation; :func:`build_full_payload` is its
payload step on its own (for benchmarks and future payload kinds). Delta payloads from
older images (``bases``) are built by :func:`seeder.delta.build_best_delta`.

Order of writes (each atomic): the payload ``origin/payloads/<sha256>.zst``, then each
delta ``origin/payloads/<sha256>.<bsdz|zpatch>``, each payload's torrent and chunk list
(``payloads/<sha256>.chunks``) and the compact manifest
(``targets/releases/<product>/<sha256>.<version>.compact.json``), then the release
manifest target, whose targets entry pins the compact manifest, and new
targets/snapshot/timestamp metadata
(:meth:`seeder.repository.Repository.add_target`). A crash at any point leaves at most
unreferenced content-addressed files or a hidden ``.incoming-*.tmp`` file; devices only
see a release once timestamp.json names it.

Memory stays bounded whatever the image size: the image is read once, in blocks, hashed
and compressed in the same pass; the payload is then re-read once, chunk by chunk, to
hash its chunks. Deltas need whole images in memory: the delta workers hold the image
and one base at a time (plus bsdiff's working set, ~17x the input), this process one
finished delta at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from swarmota.infra.fsio import atomic_write_bytes, fsync_dir
from swarmota.manifest import (
    DEFAULT_MAX_COUNTER_JUMP,
    ImageInfo,
    ManifestFormatError,
    Payload,
    ReleaseManifest,
    choose_chunk_size,
    compact_pin,
    compact_target_name,
    encode_chunk_list,
    parse_release_manifest,
    release_target_name,
    sha256_hex,
)
from swarmota.manifest.release import MAX_IMAGE_SIZE_BYTES
from swarmota.peer.swarm import make_torrent
from swarmota.seeder.delta import ENGINES, Progress, build_best_delta, file_digest
from swarmota.seeder.errors import PublishError, RepositoryError
from swarmota.seeder.repository import Repository

__all__ = [
    "DEFAULT_ZSTD_LEVEL",
    "DeltaSummary",
    "attach_torrent",
    "build_full_payload",
    "highest_counter",
    "is_live",
    "publish_release",
    "published_releases",
    "store_compact",
]

log = logging.getLogger(__name__)

DEFAULT_ZSTD_LEVEL = 19
_READ_BLOCK_BYTES = 1024 * 1024
_PAYLOAD_FILE_MODE = 0o644
_PLACEHOLDER_SHA256 = "0" * 64
_MAX_BASES = 15  # a manifest holds at most 16 payloads, one of them full


@dataclass(frozen=True)
class DeltaSummary:
    """What building one delta payload chose, for reporting."""

    base_path: Path
    payload: Payload
    sizes_by_engine: dict[str, int]


def publish_release(
    repo: Repository,
    image: Path,
    *,
    product: str,
    version: str,
    release_counter: int,
    compatibility: Sequence[str],
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    now: datetime | None = None,
    bases: Sequence[Path] = (),
    progress: Progress | None = None,
    on_delta: Callable[[DeltaSummary], None] | None = None,
    web_seed_url: str | None = None,
    announce_urls: Sequence[str] = (),
    critical: bool = False,
    update_type: str = "image",
    component: str | None = None,
    swarm_ca: bytes | None = None,
    allow_counter_jump: bool = False,
) -> ReleaseManifest:
    """Publish ``image`` as release ``version`` of ``product`` and return its manifest.

    Compresses the image into a content-addressed zstd payload (skipped if an
    identical payload exists), builds the release manifest (update type ``image``, one
    ``full`` payload, chunk size from :func:`manifest.choose_chunk_size`) and adds it as
    TUF target ``releases/<product>/<version>.json``.

    For each image in ``bases`` (older releases devices may have), the smallest delta
    from that base to ``image`` (:func:`seeder.delta.build_best_delta`, checked to
    rebuild the image) is stored as ``payloads/<sha256>.<ext>`` and listed after the
    full payload as a ``delta`` payload naming its base by size and SHA-256.
    ``progress(message)`` receives a line as each step starts and finishes, prefixed
    with a bar of the steps done (compressing the image, each delta engine per base,
    signing): ``[#####---------------] 1/4 full payload: ...``; ``on_delta`` a
    :class:`DeltaSummary` per delta built.

    Every payload gets a BitTorrent v2 torrent (:func:`attach_torrent`), piece size equal
    to its chunk size, written beside it as ``<payload path>.torrent``; its info-hash is
    in the signed manifest. ``web_seed_url`` (the origin's public base URL) becomes the
    payload's BEP 19 web seed, ``announce_urls`` the torrent's trackers; both sit outside
    the info dict, so they never change the info-hash. ``swarm_ca`` (the fleet CA
    certificate, PEM) makes every payload's swarm private: an SSL torrent (the
    certificate is in the info dict, so the signed info-hash covers it) whose peers must
    hold a certificate from that CA. ``critical`` marks an emergency
    release (devices install it outside their maintenance windows). ``update_type``
    ``module``, ``app`` or ``config`` with a ``component`` name publishes ``image`` as
    the new content of that component instead of a slot image.

    The release goes live at once when this host holds enough targets keys (the
    single-key setup); otherwise it is a signing request (``REPO/staged.json``) that
    goes live once the release signers' threshold is met (:func:`is_live` tells).
    A counter more than :data:`manifest.DEFAULT_MAX_COUNTER_JUMP` above the highest
    published is refused unless ``allow_counter_jump``.

    Duplicate hardware ids are dropped (first occurrence kept). Publishing the same
    release again (same version, image, counter, hardware ids and delta bases) returns
    the manifest already published and changes nothing, so an interrupted publish can
    be re-run.

    Raises:
        PublishError: the image is missing, not a regular file, empty or too large; a
            base is missing, empty, identical to the image or given twice, or there are
            more than 15 bases; the
            product, version, counter or a hardware id is invalid; ``zstd_level`` is
            outside 1..22; the version is already published or staged with other
            content; the counter is not higher than every published or staged release of
            the product, or jumps too far; or a staged targets change signed by other
            holders would have to be amended.
        RepositoryError: the repository cannot be read or written.
    """
    image = Path(image)
    if isinstance(compatibility, str):
        raise PublishError("compatibility must be a list of hardware ids, not a string")
    compat = tuple(dict.fromkeys(compatibility))
    _check_fields(product, version, release_counter, compat, update_type, component)
    name = release_target_name(product, version)
    image_size = _image_size(image)
    base_infos = _check_bases(image, bases)
    base_shas = frozenset(info.sha256 for info in base_infos.values())

    # Cheap checks before the expensive compression; repeated under the lock below.
    existing = _check_conflicts(repo, product, version, release_counter,
                                allow_counter_jump=allow_counter_jump)
    if existing is not None:
        return _same_release_or_raise(existing, image, release_counter, compat, base_shas,
                                      kind=(update_type, component, critical))

    steps = _Steps(progress, 2 + len(base_infos) * len(ENGINES))
    steps.note(f"compressing {image.name} ({image_size:,} bytes, zstd level {zstd_level})")
    image_info, payload = build_full_payload(image, repo.origin_dir, zstd_level=zstd_level)
    steps.finish(f"full payload: {payload.size:,} bytes "
                 f"({payload.size / max(1, image_size):.1%} of the image)")
    if image_info.size != image_size:
        raise PublishError(f"image {image} changed size while it was being published")
    def with_torrent(p: Payload) -> Payload:
        return attach_torrent(repo.origin_dir, p, web_seed_url=web_seed_url,
                              announce_urls=announce_urls, swarm_ca=swarm_ca)

    payload = with_torrent(payload)
    payloads = [payload]
    for base_path, base_info in base_infos.items():
        engine, delta, sizes = build_best_delta(base_path, image, level=zstd_level,
                                                progress=steps.note, finished=steps.finish)
        delta_payload = with_torrent(store_payload(repo.origin_dir, delta, kind="delta",
                                                   encoding=engine, base=base_info))
        del delta
        payloads.append(delta_payload)
        if on_delta is not None:
            on_delta(DeltaSummary(base_path=base_path, payload=delta_payload,
                                  sizes_by_engine=sizes))
    manifest = ReleaseManifest(
        product=product,
        version=version,
        release_counter=release_counter,
        compatibility=compat,
        update_type=update_type,
        image=image_info,
        payloads=tuple(payloads),
        critical=critical,
        component=component,
    )
    try:
        data = manifest.to_bytes()
    except ManifestFormatError as exc:
        raise PublishError(f"release manifest refused by the trust core: {exc}") from exc

    with repo.locked():
        existing = _check_conflicts(repo, product, version, release_counter,
                                    allow_counter_jump=allow_counter_jump)
        if existing is not None:
            return _same_release_or_raise(existing, image, release_counter, compat,
                                          base_shas, kind=(update_type, component, critical))
        pin = store_compact(repo.origin_dir, manifest)
        live = repo.add_target(name, data, custom=pin, now=now)
    steps.finish(f"signed {name} (targets, snapshot, timestamp)" if live
                 else f"staged {name}: waiting for the release signers' signatures")
    log.info("published %s (counter %d): payload %s, %d bytes, %d chunks, %d deltas",
             name, release_counter, payload.path, payload.size, payload.chunk_count,
             len(payloads) - 1)
    return manifest


class _Steps:
    """Counts the steps of one publish and prefixes each progress line with a bar."""

    _BAR = 20

    def __init__(self, progress: Progress | None, total: int) -> None:
        self._progress = progress
        self._total = total
        self._done = 0

    def note(self, message: str) -> None:
        if self._progress is not None:
            filled = self._BAR * self._done // self._total
            self._progress(f"[{'#' * filled}{'-' * (self._BAR - filled)}] "
                           f"{self._done}/{self._total} {message}")

    def finish(self, message: str) -> None:
        self._done = min(self._total, self._done + 1)
        self.note(message)


def attach_torrent(origin_dir: Path, payload: Payload, *, web_seed_url: str | None = None,
                   announce_urls: Sequence[str] = (),
                   swarm_ca: bytes | None = None) -> Payload:
    """Write the v2 torrent of a stored payload beside it; return it with its info-hash.
    With ``swarm_ca`` (PEM) the torrent is a private (SSL) swarm of that CA.

    Raises:
        PublishError: a web seed or announce URL is not a plain http(s) URL, or
            ``swarm_ca`` is not a PEM certificate.
        RepositoryError: the payload cannot be read or the torrent written.
    """
    web_seeds = [f"{web_seed_url.rstrip('/')}/{payload.path}"] if web_seed_url else []
    try:
        torrent = make_torrent(origin_dir / payload.path, piece_size_bytes=payload.chunk_size,
                               web_seeds=web_seeds, trackers=announce_urls,
                               swarm_ca=swarm_ca)
        atomic_write_bytes(origin_dir / payload.torrent_path, torrent.data)
    except ValueError as exc:
        raise PublishError(f"cannot make the torrent of {payload.path}: {exc}") from exc
    except OSError as exc:
        raise RepositoryError(f"cannot write the torrent of {payload.path}: {exc}") from exc
    return replace(payload, info_hash=torrent.info_hash)


def store_compact(origin_dir: Path, manifest: ReleaseManifest) -> dict[str, Any]:
    """Write the compact form of ``manifest`` (:meth:`manifest.ReleaseManifest.compact`)
    and its payloads' chunk lists into the origin tree; return the custom data of the
    manifest's targets entry that pins it (:func:`manifest.compact_pin`). Both files are
    content-addressed: writing them again is harmless, and until the targets entry is
    live nothing names them.

    Raises:
        RepositoryError: a file cannot be written.
    """
    compact = manifest.compact()
    data = compact.to_bytes()
    target = compact_target_name(manifest.target_name)
    directory, _, basename = target.rpartition("/")
    files = {f"targets/{directory}/{sha256_hex(data)}.{basename}": data}
    for full, small in zip(manifest.payloads, compact.payloads, strict=True):
        assert small.chunk_list is not None
        files[small.chunk_list.path] = encode_chunk_list(full.chunks)
    for rel, content in files.items():
        path = Path(origin_dir) / rel
        try:
            if not _file_has(path, len(content), sha256_hex(content)):
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, content, mode=_PAYLOAD_FILE_MODE)
        except OSError as exc:
            raise RepositoryError(f"cannot write {path}: {exc}") from exc
    return compact_pin(data)


def published_releases(repo: Repository, product: str, *,
                       staged: bool = False) -> dict[str, ReleaseManifest]:
    """The committed releases of ``product``, by version; with ``staged``, those of the
    targets that will be live once the signing request is (when it changes targets).

    Raises:
        RepositoryError: a release manifest is missing, corrupt or malformed.
    """
    prefix = f"releases/{product}/"
    out: dict[str, ReleaseManifest] = {}
    for name, target in repo.targets(staged=staged).items():
        if not (name.startswith(prefix) and name.endswith(".json")):
            continue
        data = repo.read_target(target)
        try:
            manifest = parse_release_manifest(data)
        except ManifestFormatError as exc:
            raise RepositoryError(f"published target {name} is not a release manifest: "
                                  f"{exc}") from exc
        if manifest.target_name != name:
            raise RepositoryError(f"published target {name} holds {manifest.target_name}")
        out[manifest.version] = manifest
    return out


def highest_counter(repo: Repository, product: str) -> int | None:
    """The highest release counter of ``product`` in the targets that will be live
    (staged or committed), or ``None`` if it has no release.

    Raises:
        RepositoryError: a release manifest is missing, corrupt or malformed.
    """
    counters = [m.release_counter for m in published_releases(repo, product,
                                                               staged=True).values()]
    return max(counters, default=None)


def is_live(repo: Repository, manifest: ReleaseManifest) -> bool:
    """True once ``manifest``'s release is in the committed targets (devices see it).

    Raises:
        RepositoryError: the metadata chain is missing or corrupt.
    """
    return manifest.target_name in repo.targets()


def build_full_payload(
    image: Path, origin_dir: Path, *, zstd_level: int = DEFAULT_ZSTD_LEVEL
) -> tuple[ImageInfo, Payload]:
    """Compress ``image`` into ``origin_dir/payloads/<sha256>.zst``; describe both.

    One streaming pass reads, hashes and compresses the image (zstd frame with the
    content size and a checksum, all CPU cores) into a hidden temp file beside the
    target; a second pass hashes the payload and its chunks. The temp file is then renamed
    into place atomically, or dropped if an identical payload already exists.

    Raises:
        PublishError: the image is missing, unreadable, empty, too large or changed
            while being read, or ``zstd_level`` is outside 1..22.
        RepositoryError: the payload cannot be written.
    """
    if not 1 <= zstd_level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise PublishError(
            f"zstd level {zstd_level} outside 1..{zstandard.MAX_COMPRESSION_LEVEL}"
        )
    payloads_dir = Path(origin_dir) / "payloads"
    try:
        payloads_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=payloads_dir, prefix=".incoming-", suffix=".tmp")
    except OSError as exc:
        raise RepositoryError(f"cannot write to {payloads_dir}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            image_info = _compress(image, out, zstd_level)
            try:
                out.flush()
                os.fsync(out.fileno())
                payload_size = os.fstat(out.fileno()).st_size
            except OSError as exc:
                raise RepositoryError(f"cannot write payload {tmp}: {exc}") from exc
        chunk_size = choose_chunk_size(payload_size)
        payload_sha256, chunks = _hash_file_chunks(tmp, chunk_size)
        payload = Payload(
            kind="full",
            encoding="zstd",
            size=payload_size,
            sha256=payload_sha256,
            chunk_size=chunk_size,
            chunks=tuple(chunks),
        )
        final = Path(origin_dir) / payload.path
        try:
            if _file_has(final, payload_size, payload_sha256):
                tmp.unlink()
                log.info("payload %s already present", final)
            else:
                os.chmod(tmp, _PAYLOAD_FILE_MODE)
                os.replace(tmp, final)
                fsync_dir(payloads_dir)
        except OSError as exc:
            raise RepositoryError(f"cannot store payload {final}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return image_info, payload


def store_payload(origin_dir: Path, data: bytes, *, kind: str, encoding: str,
                  base: ImageInfo | None = None) -> Payload:
    """Write ``data`` as ``origin_dir/payloads/<sha256>.<ext>`` and describe it.

    Atomic (hidden temp file, fsync, rename, directory fsync); an identical file already
    there is kept. Chunk size from :func:`manifest.choose_chunk_size`.

    Raises:
        RepositoryError: the payload cannot be written.
    """
    chunk_size = choose_chunk_size(len(data))
    payload = Payload(
        kind=kind,
        encoding=encoding,
        size=len(data),
        sha256=sha256_hex(data),
        chunk_size=chunk_size,
        chunks=tuple(sha256_hex(data[i:i + chunk_size])
                     for i in range(0, len(data), chunk_size)),
        base=base,
    )
    payloads_dir = Path(origin_dir) / "payloads"
    final = Path(origin_dir) / payload.path
    try:
        payloads_dir.mkdir(parents=True, exist_ok=True)
        if _file_has(final, payload.size, payload.sha256):
            log.info("payload %s already present", final)
            return payload
        fd, tmp_name = tempfile.mkstemp(dir=payloads_dir, prefix=".incoming-", suffix=".tmp")
    except OSError as exc:
        raise RepositoryError(f"cannot write to {payloads_dir}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, _PAYLOAD_FILE_MODE)
        os.replace(tmp, final)
        fsync_dir(payloads_dir)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise RepositoryError(f"cannot store payload {final}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return payload


# --- helpers ---------------------------------------------------------------------------


def _check_bases(image: Path, bases: Sequence[Path]) -> dict[Path, ImageInfo]:
    """Size and SHA-256 of each delta base, checked before any expensive work.

    Raises:
        PublishError: too many bases; a base is missing, not a regular file, empty, too
            large, identical to the image, or the same image as another base.
    """
    if isinstance(bases, str | Path):
        raise PublishError("bases must be a list of image paths, not a single path")
    if not bases:
        return {}
    if len(bases) > _MAX_BASES:
        raise PublishError(f"{len(bases)} delta bases, at most {_MAX_BASES} per release")
    _, image_sha = file_digest(image, "image")
    out: dict[Path, ImageInfo] = {}
    seen: dict[str, Path] = {}
    for raw in bases:
        base = Path(raw)
        size, sha = file_digest(base, "delta base")
        _check_image_size(base, size)
        if sha == image_sha:
            raise PublishError(f"delta base {base} is identical to the image "
                               f"(sha256 {sha[:12]}): nothing to update")
        if sha in seen:
            raise PublishError(f"delta base {base} is the same image as {seen[sha]} "
                               f"(sha256 {sha[:12]}): give each base once")
        seen[sha] = base
        out[base] = ImageInfo(size=size, sha256=sha)
    return out



def _compress(image: Path, out: BinaryIO, level: int) -> ImageInfo:
    """Stream ``image`` through zstd into ``out``; return what was read of the image."""
    try:
        src = open(image, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError as exc:
        raise PublishError(f"image {image} does not exist") from exc
    except OSError as exc:
        raise PublishError(f"cannot read image {image}: {exc}") from exc
    image_sha = hashlib.sha256()
    read = 0
    with src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PublishError(f"image {image} is not a regular file")
        _check_image_size(image, info.st_size)
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                        write_checksum=True, threads=-1)
        try:
            with cctx.stream_writer(out, size=info.st_size, closefd=False) as writer:
                while block := _read_block(src, image):
                    image_sha.update(block)
                    read += len(block)
                    writer.write(block)
        except zstandard.ZstdError as exc:
            raise PublishError(f"image {image} changed while it was being compressed "
                               f"({exc})") from exc
        except OSError as exc:
            raise RepositoryError(f"cannot write payload: {exc}") from exc
    if read != info.st_size:
        raise PublishError(f"image {image} changed size while it was being compressed")
    return ImageInfo(size=read, sha256=image_sha.hexdigest())


def _read_block(src: BinaryIO, image: Path) -> bytes:
    try:
        return src.read(_READ_BLOCK_BYTES)
    except OSError as exc:
        raise PublishError(f"cannot read image {image}: {exc}") from exc


def _hash_file_chunks(path: Path, chunk_size: int) -> tuple[str, list[str]]:
    """SHA-256 of the whole file and of each ``chunk_size`` chunk, in one pass."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk_size):
                whole.update(block)
                chunks.append(sha256_hex(block))
    except OSError as exc:
        raise RepositoryError(f"cannot read payload {path}: {exc}") from exc
    return whole.hexdigest(), chunks


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BLOCK_BYTES):
            sha.update(block)
    return sha.hexdigest()


def _file_has(path: Path, size: int, sha256: str) -> bool:
    """True if ``path`` is a regular file of exactly ``size`` bytes and ``sha256``."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size and _file_sha256(path) == sha256


def _image_size(image: Path) -> int:
    try:
        info = image.stat()
    except FileNotFoundError:
        raise PublishError(f"image {image} does not exist") from None
    except OSError as exc:
        raise PublishError(f"cannot read image {image}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise PublishError(f"image {image} is not a regular file")
    _check_image_size(image, info.st_size)
    return info.st_size


def _check_image_size(image: Path, size: int) -> None:
    if size == 0:
        raise PublishError(f"image {image} is empty")
    if size > MAX_IMAGE_SIZE_BYTES:
        raise PublishError(f"image {image} is {size} bytes, limit {MAX_IMAGE_SIZE_BYTES}")


def _check_fields(product: str, version: str, release_counter: int,
                  compatibility: tuple[str, ...], update_type: str = "image",
                  component: str | None = None) -> None:
    """Validate the manifest fields with the trust core's own parser, before any work.

    A placeholder manifest carrying the real product, version, counter and hardware
    ids is encoded (which round-trips it through ``parse_release_manifest``), so the
    seeder refuses exactly what devices would refuse.
    """
    trial = ReleaseManifest(
        product=product,
        version=version,
        release_counter=release_counter,
        compatibility=compatibility,
        update_type=update_type,
        image=ImageInfo(size=1, sha256=_PLACEHOLDER_SHA256),
        payloads=(Payload(kind="full", encoding="zstd", size=1,
                          sha256=_PLACEHOLDER_SHA256, chunk_size=choose_chunk_size(1),
                          chunks=(_PLACEHOLDER_SHA256,)),),
        component=component,
    )
    try:
        release_target_name(product, version)
        trial.to_bytes()
    except (ManifestFormatError, TypeError, ValueError) as exc:
        raise PublishError(f"cannot publish {product!r} {version!r}: {exc}") from exc


def _check_conflicts(repo: Repository, product: str, version: str,
                     release_counter: int, *,
                     allow_counter_jump: bool = False) -> ReleaseManifest | None:
    """Return the manifest already published or staged for ``version``, or check the
    counter against every release published or staged.

    Raises:
        PublishError: ``release_counter`` is not higher than every published release,
            or (unless ``allow_counter_jump``) more than
            :data:`manifest.DEFAULT_MAX_COUNTER_JUMP` above the highest.
    """
    published = published_releases(repo, product, staged=True)
    if version in published:
        return published[version]
    if published:
        highest = max(published.values(), key=lambda m: m.release_counter)
        if release_counter <= highest.release_counter:
            raise PublishError(
                f"release counter {release_counter} is not higher than "
                f"{highest.release_counter} (version {highest.version}), the highest "
                f"published for {product}; devices would refuse it as a rollback"
            )
        jump = release_counter - highest.release_counter
        if jump > DEFAULT_MAX_COUNTER_JUMP and not allow_counter_jump:
            raise PublishError(
                f"release counter {release_counter} is {jump} above {highest.release_counter} "
                f"(version {highest.version}); devices accept at most "
                f"{DEFAULT_MAX_COUNTER_JUMP} by default (max_release_counter_jump), and a "
                "device that installs it can never go back below it. A typo? If not, "
                "publish with --allow-counter-jump"
            )
    return None


def _same_release_or_raise(existing: ReleaseManifest, image: Path, release_counter: int,
                           compatibility: tuple[str, ...],
                           base_shas: frozenset[str] = frozenset(), *,
                           kind: tuple[str, str | None, bool] = ("image", None, False),
                           ) -> ReleaseManifest:
    """Return ``existing`` if it is the release being published again, else raise.
    ``kind``: the update type, component and critical flag being published."""
    differences: list[str] = []
    had = (existing.update_type, existing.component, existing.critical)
    if had != kind:
        differences.append(f"update type, component, critical {had} != {kind}")
    existing_bases = frozenset(p.base.sha256 for p in existing.payloads
                               if p.base is not None)
    if existing_bases != base_shas:
        differences.append(f"deltas from {len(existing_bases)} base(s), not the "
                           f"{len(base_shas)} given")
    if existing.release_counter != release_counter:
        differences.append(f"counter {existing.release_counter} != {release_counter}")
    if existing.compatibility != compatibility:
        differences.append(f"hardware ids {list(existing.compatibility)} != "
                           f"{list(compatibility)}")
    if not differences:
        try:
            same_image = _file_has(image, existing.image.size, existing.image.sha256)
        except OSError as exc:
            raise PublishError(f"cannot read image {image}: {exc}") from exc
        if not same_image:
            differences.append("a different image")
    if differences:
        raise PublishError(
            f"{existing.product} {existing.version} is already published with other "
            f"content ({'; '.join(differences)}); publish a new version instead"
        )
    log.info("%s is already published with the same content", existing.target_name)
    return existing
