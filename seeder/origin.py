"""The origin HTTP server: a raw ASGI app serving a directory of static files.

Serves the origin tree (``metadata/``, ``targets/``, ``payloads/``) to devices, or any
other directory, with what devices and CDNs need and nothing else:

- ``GET`` and ``HEAD``; any other method gets 405 with ``Allow: GET, HEAD``.
- One byte range per request (RFC 9110 section 14): ``Range: bytes=a-b``, ``bytes=a-``
  or ``bytes=-n`` on ``GET`` gives 206 with ``Content-Range``; a range that starts
  past the end gives 416 with ``Content-Range: bytes */SIZE``; malformed Range headers,
  several ranges, other units and Range on ``HEAD`` are ignored and the whole file is
  sent (200).
- Validators (RFC 9110 section 8.8) on 200, 206 and 304: a strong ``ETag`` and
  ``Last-Modified``. Content-addressed files (``payloads/<sha256>.<ext>``,
  ``targets/.../<sha256>.<name>.json``) get ``"sha256-<hex>"`` from their name, so
  every copy of the tree agrees; other files get one derived from size, mtime and path
  (never the inode). ``If-None-Match`` (weak comparison, ``*`` included) and, without
  it, ``If-Modified-Since`` give 304 on ``GET``/``HEAD``; ``If-Range`` with the current
  ETag (strong comparison) or exactly the ``Last-Modified`` date honours the Range,
  anything else sends the whole file (200). ``If-Match``/``If-Unmodified-Since`` are
  not evaluated (the tree is read-only).
- ``Accept-Ranges: bytes``, ``Content-Length``, ``Content-Type`` (``application/json``
  for ``.json``, ``application/x-bittorrent`` for ``.torrent``, else
  ``application/octet-stream``, e.g. ``.zst``, ``.bsdz``, ``.zpatch``), and
  ``Cache-Control``: immutable for versioned metadata, hash-prefixed targets and
  payloads, ``no-cache`` for ``timestamp.json`` and ``root.json``.
- 404 for anything that is not a regular file inside the root. Paths are checked
  before the disk is touched (no empty, ``.``/``..`` or hidden segments, no NUL or
  backslash), then resolved and required to stay inside the root, so neither ``..``
  (plain or percent-encoded), absolute paths nor symlinks leaving the root reach a file.

Files are streamed in bounded blocks read in worker threads, so a large payload never
sits in memory and never blocks the event loop; a client that disconnects stops the
stream at the next block. With ``OriginConfig.rate_limit_bytes_per_s`` all responses of
one app share a :class:`TokenBucket` (egress budget, e.g. to emulate a slow CDN link);
a client waiting for budget that disconnects stops waiting at once. The parsing and
policy parts (:func:`parse_range`, :func:`split_request_path`, :func:`cache_control_for`,
:func:`validators_for`, :func:`is_not_modified`, :func:`if_range_matches`) are pure
functions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, Literal

import trio

from swarmota.infra.http_serve import Receive, Scope, Send

__all__ = [
    "UNSATISFIABLE",
    "ByteRange",
    "OriginApp",
    "OriginConfig",
    "OriginStats",
    "TokenBucket",
    "Validators",
    "cache_control_for",
    "content_type_for",
    "if_range_matches",
    "is_not_modified",
    "parse_range",
    "served_kind",
    "split_request_path",
    "validators_for",
]

log = logging.getLogger(__name__)

UNSATISFIABLE: Final = "unsatisfiable"
_ALLOWED_METHODS = ("GET", "HEAD")
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
_MAX_SEGMENTS = 16
_MAX_SEGMENT_BYTES = 255
_IMMUTABLE = "public, max-age=31536000, immutable"
_VERSIONED_METADATA_RE = re.compile(r"[1-9][0-9]*\.[a-z][a-z0-9._-]*\.json")
_CONTENT_ADDRESSED_PAYLOAD_RE = re.compile(r"([0-9a-f]{64})\.[a-z0-9]+")
_CONTENT_ADDRESSED_TARGET_RE = re.compile(r"([0-9a-f]{64})\..+\.json")
_ENTITY_TAG_RE = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')
_CONTENT_TYPES = {
    ".json": "application/json",
    ".torrent": "application/x-bittorrent",
}
_CATEGORIES = ("metadata", "targets", "payloads")
_COUNTED_SUFFIXES = (".torrent", ".chunks")  # small files beside payloads, counted apart


@dataclass(frozen=True)
class OriginConfig:
    """Tuning of the origin server.

    ``rate_limit_bytes_per_s`` caps the body bytes per second of all responses of one
    app together (``None``: no limit); bursts are at most ``rate_limit_burst_bytes``.
    """

    block_size_bytes: int = 256 * 1024
    rate_limit_bytes_per_s: int | None = None
    rate_limit_burst_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.block_size_bytes <= 0:
            raise ValueError("block_size_bytes must be positive")
        if self.rate_limit_bytes_per_s is not None and self.rate_limit_bytes_per_s <= 0:
            raise ValueError("rate_limit_bytes_per_s must be positive (or None: no limit)")
        if self.rate_limit_burst_bytes <= 0:
            raise ValueError("rate_limit_burst_bytes must be positive")


@dataclass(frozen=True)
class OriginStats:
    """Counters since the app was created.

    ``requests`` counts every HTTP request. The byte counters count file content
    handed to the HTTP server in 200/206 responses (headers and error bodies excluded),
    in total and by the top-level directory of the request path (``bytes_torrents`` and
    ``bytes_chunk_lists``: of ``bytes_payloads``, those of ``.torrent`` and ``.chunks``
    files); a response cut short
    by a disconnect counts what was handed over. ``responses_206`` and
    ``responses_304`` count partial-content and not-modified responses started.
    """

    requests: int = 0
    bytes_total: int = 0
    bytes_metadata: int = 0
    bytes_targets: int = 0
    bytes_payloads: int = 0
    bytes_torrents: int = 0
    bytes_chunk_lists: int = 0
    responses_206: int = 0
    responses_304: int = 0


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range ``start..end`` within a file."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class Validators:
    """The validators of one file: a strong entity tag (with its quotes) and the
    modification time in whole seconds since the epoch (what ``Last-Modified`` says)."""

    etag: str
    last_modified_s: int

    @property
    def last_modified_header(self) -> str:
        return formatdate(self.last_modified_s, usegmt=True)


class TokenBucket:
    """A byte budget of ``rate_bytes_per_s`` shared by the tasks of one trio run.

    Holds at most ``burst_bytes`` (it starts full). :meth:`acquire` waits with
    ``trio.sleep`` until enough budget has accrued; waiters are served first come,
    first served (a fair ``trio.Lock``). Cancelling a waiter takes nothing from the
    budget. Time is trio's clock (so ``trio.testing.MockClock`` drives it); the bucket
    may be created outside the run but used in one run only.

    Kept as a virtual time at which the budget taken so far is paid off (the generic
    cell rate algorithm), not as a token count updated on wake-up: a sleep that
    overshoots (a busy event loop) then costs no budget, and the long-run rate is the
    configured one, not a few percent less.
    """

    def __init__(self, rate_bytes_per_s: int, burst_bytes: int) -> None:
        """Raises ``ValueError`` for a non-positive rate or burst."""
        if rate_bytes_per_s <= 0 or burst_bytes <= 0:
            raise ValueError("rate and burst must be positive")
        self._rate = rate_bytes_per_s
        self._burst = burst_bytes
        self._paid_until: float | None = None  # None: never used, full
        self._lock = trio.Lock()

    @property
    def burst_bytes(self) -> int:
        return self._burst

    async def acquire(self, n: int) -> None:
        """Take ``n`` bytes of budget, waiting until they are there.

        Raises:
            ValueError: ``n`` is negative or larger than the burst (it could never fit).
        """
        if not 0 <= n <= self._burst:
            raise ValueError(f"cannot take {n} bytes from a bucket of {self._burst}")
        async with self._lock:
            now = trio.current_time()
            # paid_until - now is the debt; a full bucket lends up to `tolerance` ahead
            tolerance = self._burst / self._rate
            paid_until = now if self._paid_until is None else max(self._paid_until, now)
            paid_until += n / self._rate
            wait = paid_until - now - tolerance
            if wait > 0:
                await trio.sleep(wait)  # cancelled here: nothing was taken
            self._paid_until = paid_until


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
        start = _decimal(first)
        end = _decimal(last) if last else size - 1
        if last and end < start:
            return None
        if start >= size:
            return UNSATISFIABLE
        return ByteRange(start, min(end, size - 1))
    if not last:
        return None
    suffix = _decimal(last)
    if suffix == 0:
        return UNSATISFIABLE
    if size == 0:
        return None
    return ByteRange(max(0, size - suffix), size - 1)


def _decimal(digits: str) -> int:
    """A Range number of any length (RFC 9110 sets no limit; ``int`` refuses more than
    4300 digits): numbers of over 19 significant digits all mean 2^64, past any file."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 19 else 2**64


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
    """``application/json``, ``application/x-bittorrent`` or ``application/octet-stream``
    (payloads ``.zst``, ``.bsdz``, ``.zpatch`` and anything else) by file extension."""
    _, dot, extension = segments[-1].rpartition(".")
    return _CONTENT_TYPES.get(f"{dot}{extension}", "application/octet-stream")


def served_kind(segments: Sequence[str]) -> tuple[str, str | None]:
    """How :class:`OriginStats` counts the bytes of the file at path ``segments``: under
    its top-level directory (``metadata``, ``targets``, ``payloads``, else ``other``),
    and ``.torrent`` and ``.chunks`` files apart too (their suffix; else ``None``)."""
    category = segments[0] if segments and segments[0] in _CATEGORIES else "other"
    last = segments[-1] if segments else ""
    return category, next((x for x in _COUNTED_SUFFIXES if last.endswith(x)), None)


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


def validators_for(segments: tuple[str, ...], size: int, mtime_ns: int) -> Validators:
    """The validators of the file at ``segments`` with this size and mtime.

    A payload named ``<sha256>.<ext>`` or a target named ``<sha256>.<name>.json`` is
    tagged ``"sha256-<hex>"``: the same in every copy of the tree (mirrors, CDN origins).
    Anything else (metadata, ``.torrent`` files) is tagged by size, mtime and path, so
    the tag changes whenever the file is replaced and never depends on the inode.
    """
    name = segments[-1]
    match = None
    if segments[0] == "payloads" and len(segments) == 2:
        match = _CONTENT_ADDRESSED_PAYLOAD_RE.fullmatch(name)
    elif segments[0] == "targets" and len(segments) >= 2:
        match = _CONTENT_ADDRESSED_TARGET_RE.fullmatch(name)
    if match is not None:
        etag = f'"sha256-{match.group(1)}"'
    else:
        path_tag = hashlib.blake2s("/".join(segments).encode("utf-8", "surrogateescape"),
                                   digest_size=6).hexdigest()
        etag = f'"{size:x}-{mtime_ns:x}-{path_tag}"'
    return Validators(etag=etag, last_modified_s=mtime_ns // 1_000_000_000)


def is_not_modified(if_none_match: str | None, if_modified_since: str | None,
                    validators: Validators) -> bool:
    """Whether a ``GET``/``HEAD`` with these conditional headers gets 304 (RFC 9110 13.2.2).

    ``If-None-Match`` (``*`` or a list of entity tags, weak comparison) decides when
    present; otherwise ``If-Modified-Since`` (a valid HTTP date not older than the
    file's ``Last-Modified``). Unparsable values never give 304.
    """
    if if_none_match is not None:
        if if_none_match.strip(" \t") == "*":
            return True
        return any(tag == validators.etag for _, tag in _entity_tags(if_none_match))
    if if_modified_since is not None:
        since = _parse_http_date(if_modified_since)
        return since is not None and validators.last_modified_s <= since
    return False


def if_range_matches(if_range: str, validators: Validators) -> bool:
    """Whether an ``If-Range`` value lets the Range apply (RFC 9110 13.1.5).

    True for our current entity tag (strong comparison: a weak ``W/`` tag never
    matches) or an HTTP date equal to the ``Last-Modified`` we send; else the whole
    file is sent.
    """
    value = if_range.strip(" \t")
    if value.startswith(('"', "W/")):
        tags = _entity_tags(value)
        return len(tags) == 1 and not tags[0][0] and tags[0][1] == validators.etag
    date = _parse_http_date(value)
    return date is not None and date == validators.last_modified_s


def _entity_tags(value: str) -> list[tuple[bool, str]]:
    """``(weak, "opaque")`` pairs of a comma-separated entity-tag list; ``[]`` if malformed."""
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(value):
        match = _ENTITY_TAG_RE.match(value, position)
        if match is None or match.end() == position:
            return []
        tags.append((match.group(1) is not None, match.group(2)))
        position = match.end()
    return tags


def _parse_http_date(value: str) -> int | None:
    """Seconds since the epoch of an HTTP date, ``None`` if it is not one."""
    try:
        parsed = parsedate_to_datetime(value.strip(" \t"))
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


class _Disconnect:
    """Whether the client of one response has gone, and the budget wait to interrupt."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.pacing: trio.CancelScope | None = None

    def set(self) -> None:
        self.event.set()
        if self.pacing is not None:
            self.pacing.cancel()


class OriginApp:
    """ASGI app serving the regular files under ``root`` (see the module docstring).

    One instance owns its counters and its rate limit budget; it runs in a single trio
    event loop.
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
        self._responses_206 = 0
        self._responses_304 = 0
        self._bytes: dict[str, int] = dict.fromkeys((*_CATEGORIES, "other"), 0)
        self._bytes_by_suffix: dict[str, int] = dict.fromkeys(_COUNTED_SUFFIXES, 0)
        self._bucket = (None if config.rate_limit_bytes_per_s is None else
                        TokenBucket(config.rate_limit_bytes_per_s,
                                    config.rate_limit_burst_bytes))

    @property
    def root(self) -> Path:
        return self._root

    @property
    def config(self) -> OriginConfig:
        return self._config

    def statistics(self) -> OriginStats:
        return OriginStats(
            requests=self._requests,
            bytes_total=sum(self._bytes.values()),
            bytes_metadata=self._bytes["metadata"],
            bytes_targets=self._bytes["targets"],
            bytes_payloads=self._bytes["payloads"],
            bytes_torrents=self._bytes_by_suffix[".torrent"],
            bytes_chunk_lists=self._bytes_by_suffix[".chunks"],
            responses_206=self._responses_206,
            responses_304=self._responses_304,
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
        fd, info = opened
        try:
            await self._respond(scope, receive, send, segments, fd, info)
        finally:
            os.close(fd)

    async def _respond(self, scope: Scope, receive: Receive, send: Send,
                       segments: tuple[str, ...], fd: int, info: os.stat_result) -> None:
        size = info.st_size
        validators = validators_for(segments, size, info.st_mtime_ns)
        request_headers = scope["headers"]
        headers = [
            (b"etag", validators.etag.encode()),
            (b"last-modified", validators.last_modified_header.encode()),
        ]
        cache_control = cache_control_for(segments)
        if cache_control is not None:
            headers.append((b"cache-control", cache_control.encode()))
        if is_not_modified(_single_header(request_headers, b"if-none-match"),
                           _single_header(request_headers, b"if-modified-since"),
                           validators):
            self._responses_304 += 1
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers += [
            (b"content-type", content_type_for(segments).encode()),
            (b"accept-ranges", b"bytes"),
        ]
        wanted: ByteRange | Literal["unsatisfiable"] | None = None
        range_header = _single_header(request_headers, b"range")
        if scope["method"] == "GET" and range_header is not None:
            if_range = _single_header(request_headers, b"if-range")
            if if_range is None or if_range_matches(if_range, validators):
                wanted = parse_range(range_header, size)
        if wanted == UNSATISFIABLE:
            await _send_error(send, 416, "range not satisfiable",
                              [(b"content-range", f"bytes */{size}".encode())])
            return
        if isinstance(wanted, ByteRange):
            status, start, length = 206, wanted.start, wanted.length
            headers.append((b"content-range",
                            f"bytes {wanted.start}-{wanted.end}/{size}".encode()))
            self._responses_206 += 1
        else:
            status, start, length = 200, 0, size
        headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if scope["method"] == "HEAD" or length == 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        category, suffix = served_kind(segments)
        disconnect = _Disconnect()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, disconnect)
            await self._stream(send, fd, start, length, category, disconnect, suffix)
            # Only the watcher is left; cancelling here never interrupts the server.
            nursery.cancel_scope.cancel()

    async def _stream(self, send: Send, fd: int, start: int, length: int,
                      category: str, disconnect: _Disconnect, suffix: str | None) -> None:
        """Send ``length`` bytes from ``start`` in blocks until done or disconnected.

        The stream is stopped by checking ``disconnect`` between blocks, never by
        cancelling ``send``: it runs hypercorn's connection handling in our task, and
        cancelling it half way can leave a connection that is never closed. Only the
        wait for rate-limit budget is cancelled when the client goes.
        """
        bucket = self._bucket
        block_size = self._config.block_size_bytes
        if bucket is not None:
            block_size = min(block_size, bucket.burst_bytes)
        offset, remaining = start, length
        while remaining > 0 and not disconnect.event.is_set():
            wanted = min(block_size, remaining)
            if bucket is not None:
                with trio.CancelScope() as pacing:
                    disconnect.pacing = pacing
                    await bucket.acquire(wanted)
                disconnect.pacing = None
                if pacing.cancelled_caught:
                    return
            block = await trio.to_thread.run_sync(os.pread, fd, wanted, offset)
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
            if suffix is not None:
                self._bytes_by_suffix[suffix] += len(block)
            await send({"type": "http.response.body", "body": block,
                        "more_body": remaining > 0})

    def _open(self, segments: tuple[str, ...]) -> tuple[int, os.stat_result] | None:
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
        return fd, info


async def _watch_disconnect(receive: Receive, disconnect: _Disconnect) -> None:
    """Report through ``disconnect`` when the server says that the client has gone."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnect.set()
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
