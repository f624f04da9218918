"""The origin HTTP server: a raw ASGI app serving a directory of static files.

Serves the origin tree (``metadata/``, ``targets/``, ``payloads/``) to devices, or any
other directory, with what devices and CDNs need and nothing else:

- ``GET`` and ``HEAD``; any other method gets 405 with ``Allow: GET, HEAD``.
- One byte range per request (RFC 9110 section 14): ``Range: bytes=a-b``, ``bytes=a-``
  or ``bytes=-n`` on ``GET`` gives 206 with ``Content-Range``; a range that starts
  past the end gives 416 with ``Content-Range: bytes */SIZE``; malformed Range headers,
  several ranges, other units, ``If-Range`` (we send no validators) and Range on
  ``HEAD`` are ignored and the whole file is sent (200).
- ``Accept-Ranges: bytes``, ``Content-Length``, ``Content-Type`` (``application/json``
  for ``.json``, else ``application/octet-stream``), and ``Cache-Control``: immutable
  for versioned metadata, hash-prefixed targets and payloads, ``no-cache`` for
  ``timestamp.json`` and ``root.json``.
- 404 for anything that is not a regular file inside the root. Paths are checked
  before the disk is touched (no empty, ``.``/``..`` or hidden segments, no NUL or
  backslash), then resolved and required to stay inside the root, so neither ``..``
  (plain or percent-encoded), absolute paths nor symlinks leaving the root reach a file.

Files are streamed in bounded blocks read in worker threads, so a large payload never
sits in memory and never blocks the event loop; a client that disconnects stops the
stream at the next block. The parsing and policy parts (:func:`parse_range`,
:func:`split_request_path`, :func:`cache_control_for`) are pure functions.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import trio

from infra.http_serve import Receive, Scope, Send

__all__ = [
    "UNSATISFIABLE",
    "ByteRange",
    "OriginApp",
    "OriginConfig",
    "OriginStats",
    "cache_control_for",
    "content_type_for",
    "parse_range",
    "split_request_path",
]

log = logging.getLogger(__name__)

UNSATISFIABLE: Final = "unsatisfiable"
_ALLOWED_METHODS = ("GET", "HEAD")
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
_MAX_SEGMENTS = 16
_MAX_SEGMENT_BYTES = 255
_IMMUTABLE = "public, max-age=31536000, immutable"
_VERSIONED_METADATA_RE = re.compile(r"[1-9][0-9]*\.[a-z]+\.json")
_CATEGORIES = ("metadata", "targets", "payloads")


@dataclass(frozen=True)
class OriginConfig:
    """Tuning of the origin server."""

    block_size_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.block_size_bytes <= 0:
            raise ValueError("block_size_bytes must be positive")


@dataclass(frozen=True)
class OriginStats:
    """Counters since the app was created.

    ``requests`` counts every HTTP request. The byte counters count file content
    handed to the HTTP server in 200/206 responses (headers and error bodies excluded),
    in total and by the top-level directory of the request path.
    """

    requests: int = 0
    bytes_total: int = 0
    bytes_metadata: int = 0
    bytes_targets: int = 0
    bytes_payloads: int = 0


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range ``start..end`` within a file."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str, size: int) -> ByteRange | Literal["unsatisfiable"] | None:
    """Interpret one ``Range`` header value for a file of ``size`` bytes (RFC 9110).

    Returns the range to send (its end clamped to the file), :data:`UNSATISFIABLE`
    (answer 416), or ``None`` to ignore the header and send the whole file: the header
    is malformed, names another unit, lists several ranges, has ``last < first``, or
    asks for a non-empty suffix of an empty file.
    """
    match = _RANGE_RE.fullmatch(header.strip(" \t"))
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            return None
        if start >= size:
            return UNSATISFIABLE
        return ByteRange(start, min(end, size - 1))
    if not last:
        return None
    suffix = int(last)
    if suffix == 0:
        return UNSATISFIABLE
    if size == 0:
        return None
    return ByteRange(max(0, size - suffix), size - 1)


def split_request_path(path: str) -> tuple[str, ...] | None:
    """Split a decoded request path into safe segments, or ``None`` to refuse it.

    Refused: paths not starting with ``/``, the bare root, empty segments (``//``),
    segments starting with ``.`` (``.``, ``..``, hidden and temporary files),
    segments containing NUL or a backslash, overlong segments or too many segments.
    """
    if not path.startswith("/"):
        return None
    segments = tuple(path[1:].split("/"))
    if len(segments) > _MAX_SEGMENTS:
        return None
    for segment in segments:
        if (
            not segment
            or segment.startswith(".")
            or "\x00" in segment
            or "\\" in segment
            or len(segment.encode("utf-8", "surrogateescape")) > _MAX_SEGMENT_BYTES
        ):
            return None
    return segments


def content_type_for(segments: tuple[str, ...]) -> str:
    return "application/json" if segments[-1].endswith(".json") else "application/octet-stream"


def cache_control_for(segments: tuple[str, ...]) -> str | None:
    """Caching policy of an origin-tree file, or ``None`` to say nothing.

    Timestamp and the unversioned root copy change in place: ``no-cache``. Versioned
    metadata, hash-prefixed targets and content-addressed payloads never change.
    """
    top = segments[0]
    if top == "metadata" and len(segments) == 2:
        if _VERSIONED_METADATA_RE.fullmatch(segments[1]):
            return _IMMUTABLE
        return "no-cache"
    if top in ("targets", "payloads") and len(segments) >= 2:
        return _IMMUTABLE
    return None


class OriginApp:
    """ASGI app serving the regular files under ``root`` (see the module docstring).

    One instance owns its counters; it runs in a single trio event loop.
    """

    def __init__(self, root: Path, config: OriginConfig = OriginConfig()) -> None:
        """Serve ``root``, which must be an existing directory.

        Raises:
            NotADirectoryError: ``root`` is not a directory.
        """
        resolved = Path(root).resolve(strict=True)
        if not resolved.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        self._root = resolved
        self._config = config
        self._requests = 0
        self._bytes: dict[str, int] = dict.fromkeys((*_CATEGORIES, "other"), 0)

    @property
    def root(self) -> Path:
        return self._root

    def statistics(self) -> OriginStats:
        return OriginStats(
            requests=self._requests,
            bytes_total=sum(self._bytes.values()),
            bytes_metadata=self._bytes["metadata"],
            bytes_targets=self._bytes["targets"],
            bytes_payloads=self._bytes["payloads"],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self._requests += 1
        method: str = scope["method"]
        if method not in _ALLOWED_METHODS:
            await _send_error(send, 405, "method not allowed",
                              [(b"allow", ", ".join(_ALLOWED_METHODS).encode())])
            return
        segments = split_request_path(scope["path"])
        opened = None if segments is None else await trio.to_thread.run_sync(
            self._open, segments)
        if segments is None or opened is None:
            await _send_error(send, 404, "not found")
            return
        fd, size = opened
        try:
            await self._respond(scope, receive, send, segments, fd, size)
        finally:
            os.close(fd)

    async def _respond(self, scope: Scope, receive: Receive, send: Send,
                       segments: tuple[str, ...], fd: int, size: int) -> None:
        headers = [
            (b"content-type", content_type_for(segments).encode()),
            (b"accept-ranges", b"bytes"),
        ]
        cache_control = cache_control_for(segments)
        if cache_control is not None:
            headers.append((b"cache-control", cache_control.encode()))
        wanted: ByteRange | Literal["unsatisfiable"] | None = None
        range_header = _single_header(scope["headers"], b"range")
        if (scope["method"] == "GET" and range_header is not None
                and _single_header(scope["headers"], b"if-range") is None):
            wanted = parse_range(range_header, size)
        if wanted == UNSATISFIABLE:
            await _send_error(send, 416, "range not satisfiable",
                              [(b"content-range", f"bytes */{size}".encode())])
            return
        if isinstance(wanted, ByteRange):
            status, start, length = 206, wanted.start, wanted.length
            headers.append((b"content-range",
                            f"bytes {wanted.start}-{wanted.end}/{size}".encode()))
        else:
            status, start, length = 200, 0, size
        headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if scope["method"] == "HEAD" or length == 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        category = segments[0] if segments[0] in _CATEGORIES else "other"
        disconnected = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, disconnected)
            await self._stream(send, fd, start, length, category, disconnected)
            # Only the watcher is left; cancelling here never interrupts the server.
            nursery.cancel_scope.cancel()

    async def _stream(self, send: Send, fd: int, start: int, length: int,
                      category: str, disconnected: trio.Event) -> None:
        """Send ``length`` bytes from ``start`` in blocks until done or disconnected.

        The stream is stopped by checking ``disconnected`` between blocks, never by
        cancellation: ``send`` runs hypercorn's connection handling in our task, and
        cancelling it half way can leave a connection that is never closed.
        """
        offset, remaining = start, length
        while remaining > 0 and not disconnected.is_set():
            block = await trio.to_thread.run_sync(
                os.pread, fd, min(self._config.block_size_bytes, remaining), offset)
            if not block:
                # The file shrank under us; origin files are immutable, so this is damage.
                # Returning without finishing makes the server drop the connection.
                log.error("file truncated while serving (%d bytes short)", remaining)
                return
            remaining -= len(block)
            offset += len(block)
            # Counted when handed to the server, so that the counters are complete by the
            # time the client has the last byte.
            self._bytes[category] += len(block)
            await send({"type": "http.response.body", "body": block,
                        "more_body": remaining > 0})

    def _open(self, segments: tuple[str, ...]) -> tuple[int, int] | None:
        """Open a regular file inside the root; ``None`` if absent or not allowed.

        Runs in a worker thread. Symlinks are resolved and the result must stay inside
        the root; the final open refuses a symlink swapped in meanwhile.
        """
        try:
            resolved = self._root.joinpath(*segments).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            return None
        if not resolved.is_relative_to(self._root):
            return None
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (OSError, ValueError):
            return None
        try:
            info = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        return fd, info.st_size


async def _watch_disconnect(receive: Receive, disconnected: trio.Event) -> None:
    """Set ``disconnected`` when the server reports that the client has gone."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return


def _single_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The value of header ``name`` if it occurs exactly once, else ``None``."""
    values = [value for key, value in headers if key.lower() == name]
    if len(values) != 1:
        return None
    return values[0].decode("latin-1")


async def _send_error(send: Send, status: int, text: str,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = f"{text}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or []),
    ]
    message: MutableMapping[str, Any] = {"type": "http.response.start", "status": status,
                                         "headers": headers}
    await send(message)
    await send({"type": "http.response.body", "body": body, "more_body": False})
