"""Delta payloads, publisher side: build the smallest delta from a base image to a target.

Engines (the ``encoding`` of the delta payload, applied by :mod:`peer.delta`):

``bsdiff-zstd``
    bsdiff's approximate matches (usually the smallest deltas on executables), found by
    HDiffPatch and turned into bsdiff's raw streams (:mod:`seeder.covers`; 3-4x faster
    than ``bsdiff4.core.diff``, which remains the fallback), packed into our container,
    format version 2 (:func:`peer.delta.pack_bsdiff_container_v2`): the control stream
    byte-plane transposed (zstd or LZMA2, whichever is smaller), the mostly-zero diff
    stream in raw LZMA2 (``PRESET_EXTREME``: ~12% smaller than zstd there), the extra
    stream zstd-compressed with the base image as prefix and long-distance matching (4-7%
    smaller). The last two are compressed in two threads (both release the GIL).
``zstd-patch``
    zstd with the base as a raw-content *prefix*, long-distance matching and a window
    covering the larger of the two images (what ``zstd --patch-from`` does), via
    ``backports.zstd``: python-zstandard's raw-content *dictionary* compression finds
    far fewer matches (docs: ../shared/ENGINES.md).

Every delta is applied again with :func:`peer.delta.apply_delta`, the device's own code,
and compared with the target before it is returned: a delta that does not round-trip is
never published.

:func:`build_best_delta` runs each engine in its own worker process (at most two at a
time, and never two bsdiff runs at once) and keeps the smallest. Memory: each worker
reads the images itself (:func:`build_delta_from_files`) and holds each only while it
needs it: while compressing, bsdiff-zstd holds the base once (as zstd's prefix), not the
target, beside its engine's working set (the LZMA2 match finder of a 3 MiB dictionary
and zstd's binary tree over the base); the calling process holds only the finished
deltas.

Errors: :class:`seeder.errors.PublishError` for bad input (a base missing, empty,
unreadable or identical to the target, an unknown engine) or when no engine produced a
delta.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import lzma
import math
import multiprocessing
import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import bsdiff4.core
import zstandard
from backports.zstd import CompressionParameter, ZstdDict, ZstdError
from backports.zstd import compress as zstd_compress

from swarmota.peer.delta import (
    CODEC_LZMA2,
    CODEC_ZSTD,
    CODEC_ZSTD_BASE_PREFIX,
    LZMA2_DICT_BYTES,
    DeltaError,
    apply_delta,
    pack_bsdiff_container_v2,
    transpose_control,
)
from swarmota.seeder.covers import CoverFormatError, bsdiff_streams
from swarmota.seeder.errors import PublishError

__all__ = [
    "DEFAULT_DELTA_LEVEL",
    "ENGINES",
    "Progress",
    "build_best_delta",
    "build_delta",
    "build_delta_from_files",
    "file_digest",
]

log = logging.getLogger(__name__)

ENGINES: tuple[str, ...] = ("bsdiff-zstd", "zstd-patch")
DEFAULT_DELTA_LEVEL = 19
_MAX_WORKERS = 2  # publishing machines have two cores
_BSDIFF_ENGINES = frozenset({"bsdiff-zstd"})
_READ_BLOCK_BYTES = 1024 * 1024
_MIN_WINDOW_LOG = 10
_MAX_WINDOW_LOG = 31

Progress = Callable[[str], None]


def build_delta(engine: str, base: bytes, target: bytes, *,
                level: int = DEFAULT_DELTA_LEVEL) -> bytes:
    """Build the ``engine`` delta that turns ``base`` into ``target``, checked to apply.

    Raises:
        PublishError: unknown engine, ``level`` outside 1..22, an empty base, or the
            delta does not reproduce the target (a bug in an engine).
    """
    return _build(engine, lambda: base, lambda: target, level)


def build_delta_from_files(engine: str, base_path: Path, target_path: Path, *,
                           level: int = DEFAULT_DELTA_LEVEL) -> bytes:
    """:func:`build_delta` from image files: what publish runs in each worker process.

    Holds less memory than the bytes API can (whose caller keeps both images): the
    target is dropped once it is no longer needed (bsdiff's streams built, or compressed)
    and checked afterwards by its SHA-256; the base is held once, as the zstd prefix,
    while compressing, and read again to verify the delta.

    Raises:
        PublishError: as :func:`build_delta`; a file that cannot be read; the base
            changed on disk while the delta was built (the verification fails).
    """
    return _build(engine, lambda: _read_image(base_path, "delta base"),
                  lambda: _read_image(target_path, "image"), level)


def _build(engine: str, load_base: Callable[[], bytes], load_target: Callable[[], bytes],
           level: int) -> bytes:
    """Build and verify one delta. Keeps each image only as long as it is needed, so
    the memory is freed when the loaders return fresh objects (see
    :func:`build_delta_from_files`)."""
    if engine not in ENGINES:
        raise PublishError(f"unknown delta engine {engine!r}; choose from {list(ENGINES)}")
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise PublishError(f"zstd level {level} outside 1..{zstandard.MAX_COMPRESSION_LEVEL}")
    base = load_base()
    if not base:
        raise PublishError("the delta base is empty")
    target = load_target()
    target_size, target_sha = len(target), hashlib.sha256(target).digest()
    if engine == "bsdiff-zstd":
        streams = _bsdiff_streams(base, target)
        del target
        _return_free_memory()  # HDiffPatch's suffix array
    prefix, base_size = ZstdDict(base, is_raw=True), len(base)  # a copy of the base
    del base
    if engine == "bsdiff-zstd":
        delta = _bsdiff_container(prefix, base_size, *streams, target_size, level)
        del streams  # ~the target's size: not needed to verify
    else:
        delta = _zstd_patch(prefix, base_size, target, level)
        del target
    del prefix
    _return_free_memory()
    try:
        rebuilt = apply_delta(engine, load_base(), delta, target_size=target_size)
    except DeltaError as exc:
        raise PublishError(f"{engine} delta does not apply to its own base: {exc}") from exc
    if hashlib.sha256(rebuilt).digest() != target_sha:
        raise PublishError(f"{engine} delta does not reproduce the target")
    return delta


def build_best_delta(
    base_path: Path,
    target_path: Path,
    *,
    engines: Sequence[str] = ENGINES,
    level: int = DEFAULT_DELTA_LEVEL,
    progress: Progress | None = None,
    finished: Progress | None = None,
) -> tuple[str, bytes, dict[str, int]]:
    """Build a delta from ``base_path`` to ``target_path`` with each engine; keep the smallest.

    Returns ``(engine, delta, sizes_by_engine)``. ``progress(message)`` is called as each
    engine starts, and ``finished(message)`` (default: ``progress``) once as each engine
    finishes (with its size and time) or fails. An engine that fails (e.g. its worker
    runs out of memory) is reported and skipped.

    Raises:
        PublishError: a file is missing, unreadable, not a regular file or empty; the base
            is the target (same SHA-256); ``engines`` is empty, repeats an engine or names
            an unknown one; ``level`` is outside 1..22; or no engine produced a delta.
    """
    say = progress if progress is not None else _log_progress
    done = finished if finished is not None else say
    engines = tuple(engines)
    unknown = [e for e in engines if e not in ENGINES]
    if not engines or unknown or len(set(engines)) != len(engines):
        raise PublishError(f"delta engines must be distinct names from {list(ENGINES)}, "
                           f"got {list(engines)}")
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise PublishError(f"zstd level {level} outside 1..{zstandard.MAX_COMPRESSION_LEVEL}")
    base_size, base_sha = file_digest(base_path, "delta base")
    _, target_sha = file_digest(target_path, "image")
    if base_sha == target_sha:
        raise PublishError(f"delta base {base_path} is identical to the image "
                           f"(sha256 {base_sha[:12]}): nothing to update")
    name = base_path.name
    sizes: dict[str, int] = {}
    deltas: dict[str, bytes] = {}
    failures: list[str] = []
    # Non-bsdiff engines may run beside one bsdiff; bsdiff runs go one after another.
    with ProcessPoolExecutor(max_workers=min(_MAX_WORKERS, len(engines)),
                             mp_context=_mp_context()) as pool:
        pending: list[tuple[str, Future[tuple[bytes, float]]]] = []
        waiting = list(engines)
        while waiting or pending:
            running_bsdiff = any(e in _BSDIFF_ENGINES for e, _ in pending)
            for engine in list(waiting):
                if len(pending) >= _MAX_WORKERS:
                    break
                if engine in _BSDIFF_ENGINES and running_bsdiff:
                    continue
                waiting.remove(engine)
                running_bsdiff = running_bsdiff or engine in _BSDIFF_ENGINES
                say(f"delta {name}: {engine} started")
                pending.append((engine, pool.submit(_run_engine, engine, base_path,
                                                    target_path, level)))
            engine, future = pending.pop(0)
            try:
                delta, seconds = future.result()
            except (PublishError, BrokenProcessPool, MemoryError, OSError) as exc:
                failures.append(f"{engine}: {exc}")
                done(f"delta {name}: {engine} failed: {exc}")
                log.warning("delta engine %s failed on %s: %s", engine, base_path, exc)
                continue
            sizes[engine] = len(delta)
            deltas[engine] = delta
            done(f"delta {name}: {engine} {len(delta):,} bytes in {seconds:.1f} s")
    if not deltas:
        raise PublishError(f"no delta engine produced a delta from {base_path}: "
                           f"{'; '.join(failures)}")
    best = min(deltas, key=lambda e: (len(deltas[e]), engines.index(e)))
    log.info("delta from %s (%d bytes, %s): %s %d bytes", base_path, base_size,
             base_sha[:12], best, sizes[best])
    return best, deltas[best], sizes


def file_digest(path: Path, what: str) -> tuple[int, str]:
    """``(size, sha256)`` of a non-empty regular file, read in blocks.

    Raises:
        PublishError: the file is missing, unreadable, not a regular file or empty.
    """
    sha = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise PublishError(f"{what} {path} is not a regular file")
            while block := fh.read(_READ_BLOCK_BYTES):
                sha.update(block)
                size += len(block)
    except FileNotFoundError:
        raise PublishError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise PublishError(f"{what} {path} is not a regular file") from None
    except OSError as exc:
        raise PublishError(f"cannot read {what} {path}: {exc}") from exc
    if size == 0:
        raise PublishError(f"{what} {path} is empty")
    return size, sha.hexdigest()


# --- helpers ---------------------------------------------------------------------------


def _return_free_memory() -> None:
    """Give memory freed by the compressors back to the OS (glibc keeps it in per-thread
    arenas otherwise, and the verification apply then adds to the peak). A no-op where
    there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _zstd_patch(prefix: ZstdDict, base_size: int, target: bytes, level: int, *,
                span: int = 0, hash_log: int | None = None,
                long_distance: bool = True) -> bytes:
    """One zstd frame of ``target`` with the base (``prefix``, ``base_size`` bytes) as
    prefix (``zstd --patch-from``); the window covers the larger image, or ``span`` bytes
    if larger; ``hash_log`` caps the hash table (``None``: the level's own);
    ``long_distance`` turns long-distance matching on (else explicitly off)."""
    largest = max(base_size, len(target), span, 2)
    window_log = min(_MAX_WINDOW_LOG, max(_MIN_WINDOW_LOG, math.ceil(math.log2(largest))))
    options: dict[int, int] = {
        CompressionParameter.compression_level: level,
        CompressionParameter.window_log: window_log,
        # 1 on, 2 off (0 would mean "zstd decides")
        CompressionParameter.enable_long_distance_matching: 1 if long_distance else 2,
        CompressionParameter.content_size_flag: 1,
        CompressionParameter.checksum_flag: 0,
    }
    if hash_log is not None:
        options[CompressionParameter.hash_log] = hash_log
    try:
        return zstd_compress(target, options=options, zstd_dict=prefix.as_prefix)
    except ZstdError as exc:
        raise PublishError(f"zstd-patch compression failed: {exc}") from exc


def _bsdiff_container(prefix: ZstdDict, base_size: int, control: bytes, diff: bytes,
                      extra: bytes, target_size: int, level: int) -> bytes:
    """Compress bsdiff's raw streams into a version-2 ``bsdiff-zstd`` container."""
    stored_control = transpose_control(control)
    plain = zstandard.ZstdCompressor(level=level, write_content_size=True)
    with ThreadPoolExecutor(max_workers=2) as threads:
        diff_body = threads.submit(_lzma2, diff, level)
        extra_body = threads.submit(_zstd_prefixed, prefix, base_size, extra, level)
        # The control stream is small: try both codecs, keep the smaller.
        control_codec, control_body = min(
            (CODEC_ZSTD, plain.compress(stored_control)),
            (CODEC_LZMA2, _lzma2(stored_control, level, lc=0)),
            key=lambda candidate: (len(candidate[1]), candidate[0]))
        streams = [(control_codec, control_body, stored_control),
                   (CODEC_LZMA2, diff_body.result(), diff),
                   (CODEC_ZSTD_BASE_PREFIX, extra_body.result(), extra)]
    return pack_bsdiff_container_v2(target_size, streams)


def _bsdiff_streams(base: bytes, target: bytes) -> tuple[bytes, bytes, bytes]:
    """Raw bsdiff streams from HDiffPatch's covers; ``bsdiff4.core.diff`` (3-4x slower,
    0.2-1.7% smaller) if HDiffPatch's output cannot be read."""
    try:
        return bsdiff_streams(base, target)
    except CoverFormatError as exc:
        log.warning("HDiffPatch covers unreadable (%s); using bsdiff4's slower diff", exc)
        control, diff, extra = bsdiff4.core.diff(base, target)
        return control, diff, extra


ENCODER_DICT_BYTES = 3 * 1024 * 1024
_EXTRA_HASH_LOG = 19
assert ENCODER_DICT_BYTES <= LZMA2_DICT_BYTES


def _lzma2(data: bytes, level: int, *, lc: int = 3) -> bytes:
    """Raw LZMA2 (end marker included); zstd ``level`` 17+ maps to preset 9 extreme.

    ``lc=3``, ``pb=0`` measured best on bsdiff diff streams (byte differences, no
    alignment; lc=3 saved 33-321 bytes over lc=2 on the real pairs with a 4 MiB
    dictionary); ``lc=0`` on transposed control streams. The dictionary is at most
    :data:`ENCODER_DICT_BYTES` (the match finder needs ~11x it): on the real images a
    4 MiB dictionary gave the same size as 16 MiB (273,097 vs 273,136 bytes for the
    diff stream of 3.0.17 -> 3.0.22) in a third of the memory, and 3 MiB the same again
    (-310, -20 and +148 bytes on the three pairs) in 9 MiB less, and 20% faster; 1 MiB
    cost 1%. Devices decode with :data:`peer.delta.LZMA2_DICT_BYTES`, which covers
    it."""
    preset = 9 | lzma.PRESET_EXTREME if level >= 17 else min(9, level // 2)
    dict_size = min(ENCODER_DICT_BYTES,
                    max(1 << 16, 1 << max(1, len(data) - 1).bit_length()))
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": dict_size, "lc": lc,
         "pb": 0}])


def _zstd_prefixed(prefix: ZstdDict, base_size: int, data: bytes, level: int) -> bytes:
    """One zstd frame of ``data`` with the base as a raw prefix.

    Measured on the real images' extra streams (level 19, window 2^24): long-distance
    matching found nothing the binary tree did not (same bytes; 8 MiB of tables), and a
    hash table of 2^19 entries gave the same bytes as the level's 2^22 (12 MiB less; it
    takes ~1 s longer, still less than the diff stream's LZMA2 beside it). Capping the
    chain table (the tree, 64 MiB) cost 300-600 bytes per delta: kept."""
    return _zstd_patch(prefix, base_size, data, level, span=base_size + len(data),
                       hash_log=_EXTRA_HASH_LOG, long_distance=False)


def _read_image(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PublishError(f"cannot read {what} {path}: {exc}") from exc


def _run_engine(engine: str, base_path: Path, target_path: Path,
                level: int) -> tuple[bytes, float]:
    """Worker process: build and verify one delta from the image files; return it and
    its time."""
    started = time.monotonic()
    delta = build_delta_from_files(engine, base_path, target_path, level=level)
    return delta, time.monotonic() - started


def _mp_context() -> multiprocessing.context.BaseContext:
    """Fork where available: no re-import of ``__main__`` (scripts need no main guard)
    and no start-up cost; the publisher calls this from one thread. Spawn elsewhere."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _log_progress(message: str) -> None:
    log.info("%s", message)
