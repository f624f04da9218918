"""Delta payloads, device side: rebuild an image from a base image and a delta.

Two encodings (``manifest.release.DELTA_ENCODINGS``):

``zstd-patch``
    One zstd frame compressed with the base image as a raw-content *prefix* (what
    ``zstd --patch-from`` does). Decoded by python-zstandard with the base as a
    raw-content dictionary. The frame must declare its content size, equal to the
    expected image size, and be followed by nothing.

``bsdiff-zstd``
    The three raw streams of bsdiff (``bsdiff4.core``: control, diff, extra), each
    compressed with zstd, in our own small versioned container (all integers unsigned
    big-endian)::

        offset  size  field
        0       4     magic b"SWDZ"
        4       1     format version, 1
        5       8     target size: length of the image the patch produces
        13      48    control stream: compressed length (8), uncompressed length (8),
                      SHA-256 of the uncompressed stream (32)
        61      48    diff stream, same three fields
        109     48    extra stream, same three fields
        157     ...   the compressed control, diff and extra streams, in that order:
                      each one zstd frame that declares its content size

    The container is exactly ``157 + sum(compressed lengths)`` bytes. Parsing checks
    every declared length before allocating anything: the target size against the
    caller's limit, the diff and extra lengths against the target size (they add up to
    it: bsdiff's diff blocks and extra blocks tile the new image), the control length
    (a multiple of 24 bytes, at most 24 per target byte plus one triple), and each
    frame's declared content size against its header field. Decompression is capped at
    the declared size and each stream's SHA-256 is checked before bsdiff sees it.

Trust: the payload bytes were already verified against the signed release manifest
before they get here, and the output is checked against the image SHA-256 by the
caller; these checks make a bad or hostile delta fail cleanly and with bounded memory
instead of crashing or allocating without limit.

Errors: every problem with the delta bytes raises :class:`DeltaError` (an
:class:`peer.errors.InstallFailed`, status 30); zstandard and bsdiff4 errors are
translated here. The only module of the agent that imports bsdiff4.
"""

from __future__ import annotations

import hashlib
import struct

import bsdiff4.core
import zstandard

from peer.errors import InstallFailed

__all__ = [
    "BSDIFF_CONTAINER_HEADER_BYTES",
    "BSDIFF_CONTAINER_MAGIC",
    "BSDIFF_CONTAINER_VERSION",
    "DeltaError",
    "apply_delta",
    "decode_bsdiff_container",
    "encode_bsdiff_container",
]

BSDIFF_CONTAINER_MAGIC = b"SWDZ"
BSDIFF_CONTAINER_VERSION = 1
_HEAD = struct.Struct(">4sBQ")
_STREAM = struct.Struct(">QQ32s")
BSDIFF_CONTAINER_HEADER_BYTES = _HEAD.size + 3 * _STREAM.size  # 157
_STREAM_NAMES = ("control", "diff", "extra")
_CONTROL_TRIPLE_BYTES = 24
# The largest window a zstd-patch frame may use (2 GiB, zstd's limit on 64-bit).
_MAX_WINDOW_BYTES = 1 << 31


class DeltaError(InstallFailed):
    """The delta is malformed, corrupt, or does not apply to this base."""


def encode_bsdiff_container(control: bytes, diff: bytes, extra: bytes, target_size: int,
                            level: int) -> bytes:
    """Pack raw bsdiff streams into a ``bsdiff-zstd`` container (layout: module docstring).

    Each stream is compressed with zstd at ``level`` (one frame with its content size).

    Raises:
        ValueError: ``target_size`` is negative or inconsistent with the streams, or
            ``level`` is not a zstd level (programming errors of the caller).
    """
    if target_size < 0 or len(diff) + len(extra) != target_size:
        raise ValueError(f"diff ({len(diff)}) + extra ({len(extra)}) bytes do not make "
                         f"a {target_size}-byte target")
    if len(control) % _CONTROL_TRIPLE_BYTES:
        raise ValueError(f"control stream of {len(control)} bytes is not made of triples")
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(f"zstd level {level} outside 1..{zstandard.MAX_COMPRESSION_LEVEL}")
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    header = [_HEAD.pack(BSDIFF_CONTAINER_MAGIC, BSDIFF_CONTAINER_VERSION, target_size)]
    bodies: list[bytes] = []
    for stream in (control, diff, extra):
        body = cctx.compress(stream)
        header.append(_STREAM.pack(len(body), len(stream), hashlib.sha256(stream).digest()))
        bodies.append(body)
    return b"".join(header + bodies)


def decode_bsdiff_container(data: bytes, *,
                            max_target_bytes: int) -> tuple[bytes, bytes, bytes, int]:
    """Parse a ``bsdiff-zstd`` container; return ``(control, diff, extra, target_size)``.

    Nothing larger than the declared sizes is ever allocated, and no declared size may
    exceed what a target of at most ``max_target_bytes`` needs.

    Raises:
        DeltaError: bad magic or version, truncated or trailing bytes, a declared size
            over the limit or inconsistent, a stream that does not decompress to its
            declared length, or a stream whose SHA-256 does not match.
    """
    view = memoryview(data)
    if len(view) < BSDIFF_CONTAINER_HEADER_BYTES:
        if bytes(view[:4]) != BSDIFF_CONTAINER_MAGIC[:len(view)]:
            raise DeltaError("bsdiff-zstd delta: bad magic, not a SWDZ container")
        raise DeltaError(f"bsdiff-zstd delta truncated: {len(view)} bytes, the header "
                         f"alone is {BSDIFF_CONTAINER_HEADER_BYTES}")
    magic, version, target_size = _HEAD.unpack_from(view, 0)
    if magic != BSDIFF_CONTAINER_MAGIC:
        raise DeltaError(f"bsdiff-zstd delta: bad magic {magic!r}, expected "
                         f"{BSDIFF_CONTAINER_MAGIC!r}")
    if version != BSDIFF_CONTAINER_VERSION:
        raise DeltaError(f"bsdiff-zstd delta: unsupported container version {version} "
                         f"(this agent reads version {BSDIFF_CONTAINER_VERSION})")
    if target_size > max_target_bytes:
        raise DeltaError(f"bsdiff-zstd delta declares a {target_size}-byte target, "
                         f"limit {max_target_bytes}")
    fields = [_STREAM.unpack_from(view, _HEAD.size + i * _STREAM.size) for i in range(3)]
    limits = ((target_size + 1) * _CONTROL_TRIPLE_BYTES, target_size, target_size)
    for name, (_, raw_len, _), limit in zip(_STREAM_NAMES, fields, limits, strict=True):
        if raw_len > limit:
            raise DeltaError(f"bsdiff-zstd delta: {name} stream declares {raw_len} bytes, "
                             f"limit {limit} for a {target_size}-byte target")
    control_len, diff_len, extra_len = (f[1] for f in fields)
    if control_len % _CONTROL_TRIPLE_BYTES:
        raise DeltaError(f"bsdiff-zstd delta: control stream of {control_len} bytes is "
                         f"not a whole number of {_CONTROL_TRIPLE_BYTES}-byte triples")
    if diff_len + extra_len != target_size:
        raise DeltaError(f"bsdiff-zstd delta: diff ({diff_len}) and extra ({extra_len}) "
                         f"bytes do not add up to the {target_size}-byte target")
    expected_len = BSDIFF_CONTAINER_HEADER_BYTES + sum(f[0] for f in fields)
    if len(view) < expected_len:
        raise DeltaError(f"bsdiff-zstd delta truncated: {len(view)} bytes, the header "
                         f"declares {expected_len}")
    if len(view) > expected_len:
        raise DeltaError(f"bsdiff-zstd delta has {len(view) - expected_len} bytes of "
                         f"trailing data after the {expected_len} it declares")
    dctx = zstandard.ZstdDecompressor()
    streams: list[bytes] = []
    offset = BSDIFF_CONTAINER_HEADER_BYTES
    for name, (comp_len, raw_len, digest) in zip(_STREAM_NAMES, fields, strict=True):
        frame = view[offset:offset + comp_len]
        offset += comp_len
        raw = _decompress_exact(dctx, frame, raw_len, f"bsdiff-zstd delta {name} stream")
        if hashlib.sha256(raw).digest() != digest:
            raise DeltaError(f"bsdiff-zstd delta: {name} stream does not match its "
                             "SHA-256 (corrupt delta)")
        streams.append(raw)
    control, diff, extra = streams
    return control, diff, extra, target_size


def apply_delta(encoding: str, base: bytes, delta: bytes, *, target_size: int) -> bytes:
    """Rebuild the ``target_size``-byte image from ``base`` and ``delta``.

    The result has exactly ``target_size`` bytes; the caller still checks its SHA-256
    (a delta applied to the wrong base may produce well-sized garbage, or fail here).

    Raises:
        DeltaError: unknown encoding; the delta is malformed or corrupt; decompression
            or bsdiff fails; the output is not ``target_size`` bytes.
    """
    if target_size < 0:
        raise DeltaError(f"invalid target size {target_size}")
    if encoding == "bsdiff-zstd":
        control, diff, extra, declared = decode_bsdiff_container(
            delta, max_target_bytes=target_size)
        if declared != target_size:
            raise DeltaError(f"bsdiff-zstd delta builds a {declared}-byte image, the "
                             f"release says {target_size}")
        try:
            out = bsdiff4.core.patch(base, target_size, control, diff, extra)
        except Exception as exc:  # bsdiff4 raises ValueError & co. on corrupt patches
            raise DeltaError(f"bsdiff-zstd delta does not apply to this base: "
                             f"{exc}") from exc
    elif encoding == "zstd-patch":
        try:
            dictionary = zstandard.ZstdCompressionDict(
                base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            dctx = zstandard.ZstdDecompressor(dict_data=dictionary,
                                              max_window_size=_MAX_WINDOW_BYTES)
        except zstandard.ZstdError as exc:
            raise DeltaError(f"cannot use the base image as a zstd prefix: {exc}") from exc
        out = _decompress_exact(dctx, delta, target_size, "zstd-patch delta")
    else:
        raise DeltaError(f"unknown delta encoding {encoding!r}; this agent supports "
                         "bsdiff-zstd and zstd-patch")
    if len(out) != target_size:
        raise DeltaError(f"{encoding} delta produced {len(out)} bytes, expected "
                         f"{target_size}")
    return bytes(out)


def _decompress_exact(dctx: zstandard.ZstdDecompressor, frame: bytes | memoryview,
                      size: int, what: str) -> bytes:
    """Decompress one zstd frame that must declare and hold exactly ``size`` bytes.

    The declared content size is checked before decompression (python-zstandard sizes
    its output from it, whatever ``max_output_size`` says); trailing bytes are refused.
    """
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"{what} is not a zstd frame: {exc}") from exc
    if declared != size:
        shown = "no" if declared == -1 else str(declared)
        raise DeltaError(f"{what} declares {shown} content size, expected {size} bytes")
    try:
        # max_output_size 0 would mean "no limit"; the declared size was checked above.
        out = dctx.decompress(frame, max_output_size=max(size, 1), allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"{what} does not decompress: {exc}") from exc
    if len(out) != size:
        raise DeltaError(f"{what} decompressed to {len(out)} bytes, expected {size}")
    return out
