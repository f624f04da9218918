"""A loopback relay that carries libtorrent's tracker requests over the agent's own
HTTPS client: pinned, signed with the device identity, fail closed.

libtorrent talks to HTTP trackers itself, but it can neither pin the tracker's key, nor
use the device's CA bundle, nor sign requests. So a device gives libtorrent
``http://127.0.0.1:PORT/announce`` (this relay, listening on loopback only, for the
length of an update pass) instead of the tracker, and the relay forwards each
``GET /announce?...`` or ``GET /scrape?...`` to the real tracker with
:meth:`peer.http.HttpClient.get_tracker`: same TLS policy and pins as every other
request of the agent, and the device's signature and counter (:mod:`infra.deviceauth`).
Anything else (another path or method, a request head over 8 KiB, a slow client) is
refused. When the tracker cannot be reached or fails the pin check, libtorrent gets a
bencoded ``failure reason`` naming the fault, and the agent's origin fallback carries on.

The seeder uses the same relay for its own seeding sessions (with a ``seed`` identity).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit

import trio

from swarmota.peer.errors import DownloadFailed
from swarmota.peer.http import HttpClient
from swarmota.tracker.wire import failure_reason

__all__ = ["MAX_ANSWER_BYTES", "AnnounceRelay", "background_tasks"]

MAX_ANSWER_BYTES = 256 * 1024
"""Largest tracker answer relayed (a compact peer list of 200 peers is ~1.2 KiB)."""

_MAX_HEAD = 8 * 1024
_READ_TIMEOUT_S = 5.0
_MAX_CLIENTS = 16
_PATHS = (b"/announce", b"/scrape")

log = logging.getLogger(__name__)


class AnnounceRelay:
    """Relay for one tracker. Give libtorrent :attr:`announce_url` (the socket listens
    from construction on) and run :meth:`serve` in a nursery; :meth:`close` if
    :meth:`serve` never ran.

    ``tracker_url`` is the tracker's base URL (``https://host:port``); its ``/announce``
    and ``/scrape`` are where requests go.

    Raises:
        ValueError: ``tracker_url`` is not an http(s) URL without query or fragment.
        OSError: no loopback port to listen on.
    """

    def __init__(self, http: HttpClient, tracker_url: str) -> None:
        parts = urlsplit(tracker_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query \
                or parts.fragment:
            raise ValueError(f"bad tracker URL for the announce relay: {tracker_url!r}")
        self.http = http
        self._base = tracker_url.rstrip("/")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(_MAX_CLIENTS)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._port: int = sock.getsockname()[1]
        self._limit = trio.CapacityLimiter(_MAX_CLIENTS)
        self.relayed = 0
        self.failed = 0

    @property
    def announce_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/announce"

    def close(self) -> None:
        self._socket.close()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Relay until cancelled (then the socket is closed); reports the announce URL
        through ``task_status``."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._socket))
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, [listener])
            task_status.started(self.announce_url)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream, self._limit:
            try:
                with trio.fail_after(_READ_TIMEOUT_S):
                    target = await _read_request_target(stream)
            except (trio.TooSlowError, trio.BrokenResourceError, _BadRequest) as exc:
                await _answer(stream, 400, _failure(f"relay: bad request: {exc}"))
                return
            status, body = await self._forward(target)
            await _answer(stream, status, body)

    async def _forward(self, target: bytes) -> tuple[int, bytes]:
        path, _, query = target.partition(b"?")
        url = self._base + path.decode("ascii") + ("?" + query.decode("ascii") if query
                                                    else "")
        try:
            status, body = await self.http.get_tracker(url, max_bytes=MAX_ANSWER_BYTES)
        except DownloadFailed as exc:
            self.failed += 1
            log.warning("announce relay: %s", exc)
            return 502, _failure(f"relay: {exc}")
        self.relayed += 1
        return status, body


class _BadRequest(Exception):
    pass


async def _read_request_target(stream: trio.SocketStream) -> bytes:
    head = bytearray()
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some(4096)
        if not data:
            raise _BadRequest("connection closed before the request head ended")
        head += data
        if len(head) > _MAX_HEAD:
            raise _BadRequest("request head too long")
    line = bytes(head.split(b"\r\n", 1)[0])
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest("only GET requests are relayed")
    target = parts[1]
    if target.split(b"?", 1)[0] not in _PATHS:
        raise _BadRequest("only /announce and /scrape are relayed")
    if not target.isascii() or any(c < 0x21 or c == 0x7F for c in target):
        raise _BadRequest("request target must be printable ASCII")
    return target


def _failure(reason: str) -> bytes:
    return failure_reason(reason[:512])


async def _answer(stream: trio.SocketStream, status: int, body: bytes) -> None:
    head = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode("ascii")
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(head + body)


@asynccontextmanager
async def background_tasks() -> AsyncIterator[trio.Nursery]:
    """A nursery for helpers that live as long as the ``async with`` body (the relay),
    cancelled when the body ends. An exception of the body comes out as itself, not
    wrapped in an exception group, so callers keep their documented errors."""
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
