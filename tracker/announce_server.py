"""The lean device endpoint: ``GET /announce`` and ``GET /scrape``, and (given a device
API) ``POST /v1/checkin``, ``POST /v1/report`` and ``GET /v1/health``.

Announces and check-ins are the tracker's hot paths (every peer of every swarm, every
interval; every device, every poll), and a general-purpose ASGI server spends most of
a core on its own machinery. This module answers them over raw trio streams with a
small, strict HTTP/1.1 subset; the decisions are the director's
(:func:`tracker.bt_api.answer_bittorrent`, :func:`tracker.device_api.answer_device`),
so both endpoints share one swarm gate, one peer registry, one set of caches and
counters.

Two layers, as in h11:

- a pure core: :func:`parse_head` takes the bytes of one request head and returns a
  :class:`Request` or a :class:`Refusal` (a value, never an exception);
  :func:`render_response` builds the bytes of an answer;
- a thin shell: :func:`serve_announce` accepts connections (``trio.serve_tcp``, or
  ``trio.serve_ssl_over_tcp`` with an ``ssl.SSLContext``) and runs one task per
  connection: read a head, answer it, repeat (keep-alive). A plain TCP connection is
  read and written through its socket with one pass through trio's scheduler per
  request (:class:`_PlainSocket`); a TLS one through its ``trio.SSLStream``.

What is accepted: ``GET <path>?<query> HTTP/1.1`` (or ``HTTP/1.0``) with header lines
``name: value``, no body (``content-length: 0`` at most, no ``transfer-encoding``); and
``POST`` of the device routes with a ``content-length`` body of at most
:attr:`AnnounceServerLimits.max_body_bytes` (no ``transfer-encoding``). The request
target exactly as received and the header lines go to the answering function with the
path, query and body, so that a signed request can be checked
(:mod:`infra.deviceauth`). What is refused, with a short answer (a bencoded failure
reason; JSON for a device route's body over the limit) and the connection closed: a
head over
:attr:`AnnounceServerLimits.max_head_bytes` or a body over ``max_body_bytes`` (413), a
malformed request line or header, a body where none belongs or a POST without
``content-length``, an unsupported HTTP version (400), another path (404), another
method on our paths (405, with ``allow``), and a connection over the concurrent cap
(503). A body must arrive within ``head_timeout_s`` too. A client
that sends nothing for ``idle_timeout_s`` between requests (up to 1 % less: a busy
connection's deadline is not moved at every request), or takes longer than
``head_timeout_s`` to send a head once it started (when it does not arrive in one
piece), is disconnected; a request's answer and its sending are bounded by the same
``idle_timeout_s``. Pipelined requests
are answered in order (the buffer stays bounded by the head limit).

Errors: nothing leaves a connection task; transport failures (reset, broken pipe, TLS
errors) close that connection only and are logged at debug level; an exception from
``answer`` (a bug: it must not raise) is logged and closes that connection only. ``OSError`` from
binding the listener is raised before ``started``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from swarmota.infra.http_serve import bind_error
from swarmota.tracker.bittorrent import MAX_QUERY_BYTES
from swarmota.tracker.wire import MAX_BODY_BYTES, encode_json, failure_reason

__all__ = [
    "BITTORRENT_PATHS",
    "DEFAULT_MAX_HEAD_BYTES",
    "AnnounceServerLimits",
    "AnswerBitTorrent",
    "AnswerDevice",
    "Refusal",
    "Request",
    "parse_head",
    "render_response",
    "serve_announce",
]

log = logging.getLogger(__name__)

BITTORRENT_PATHS: Final = frozenset({"/announce", "/scrape"})
DEVICE_POST_PATHS: Final = frozenset({"/v1/checkin", "/v1/report"})
HEALTH_PATH: Final = "/v1/health"
DEFAULT_MAX_HEAD_BYTES: Final = MAX_QUERY_BYTES + 8 * 1024
"""Room for the longest query the BitTorrent parser accepts plus ordinary headers, so
that an over-long query gets the same ``failure reason`` as on the ASGI endpoint."""


class AnswerBitTorrent(Protocol):
    """``(path, query, client, *, target, headers) -> (status, body)``:
    :meth:`TrackerApp.answer_bittorrent`. ``target`` is the request line's target
    exactly as received and ``headers`` the header lines (names in lower case), which
    signed requests need (:mod:`infra.deviceauth`)."""

    def __call__(self, path: str, query: bytes, client: Sequence[object] | None, *,
                 target: bytes, headers: Sequence[tuple[bytes, bytes]]
                 ) -> Awaitable[tuple[int, bytes]]: ...


class AnswerDevice(Protocol):
    """``(path, target, body, headers) -> (status, JSON body, extra headers)``:
    :func:`tracker.device_api.answer_device` over a director."""

    def __call__(self, path: str, target: bytes, body: bytes,
                 headers: Sequence[tuple[bytes, bytes]]
                 ) -> Awaitable[tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]]: ...


@dataclass(frozen=True)
class AnnounceServerLimits:
    """Bounds of the lean endpoint.

    Attributes:
        max_head_bytes: request line plus headers; more gets 413.
        max_body_bytes: a device route's body; more gets 413 (the tracker sets it to
            its ``max_body_bytes``).
        max_connections: connections served at once; more are answered 503 and closed.
        idle_timeout_s: how long a keep-alive connection may wait for its next request.
        head_timeout_s: how long a client may take to send one head once it started.
        max_requests_per_connection: the connection is closed after this many answers.

    Raises:
        ValueError: a limit below 1 (or a timeout not positive).
    """

    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    max_body_bytes: int = MAX_BODY_BYTES
    max_connections: int = 1024
    idle_timeout_s: float = 30.0
    head_timeout_s: float = 10.0
    max_requests_per_connection: int = 10_000

    def __post_init__(self) -> None:
        if min(self.max_head_bytes, self.max_body_bytes, self.max_connections,
               self.max_requests_per_connection) < 1:
            raise ValueError("max_head_bytes, max_body_bytes, max_connections and "
                             "max_requests_per_connection must be at least 1")
        if self.idle_timeout_s <= 0 or self.head_timeout_s <= 0:
            raise ValueError("idle_timeout_s and head_timeout_s must be positive")


@dataclass(frozen=True)
class Request:
    """One accepted request: ``METHOD path?query``; ``keep_alive`` after the answer;
    ``target``: the request line's target bytes exactly as sent; ``headers``: the
    header lines as ``(lower-case name, value without surrounding blanks)``;
    ``content_length``: the body that follows the head (POST only)."""

    path: str
    query: bytes
    keep_alive: bool
    target: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    method: str = "GET"
    content_length: int = 0


@dataclass(frozen=True)
class Refusal:
    """A request refused before the app sees it: the status, a short reason, and extra
    headers (``allow`` for 405). The connection is closed after the answer."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


_REASONS: Final = {200: b"OK", 400: b"Bad Request", 404: b"Not Found",
                   405: b"Method Not Allowed", 413: b"Content Too Large",
                   500: b"Internal Server Error", 503: b"Service Unavailable"}
_TOKEN_BAD: Final = frozenset(b" \t\r\n:()<>@,;\\\"/[]?={}")


def parse_head(head: bytes, *, device_api: bool = False) -> Request | Refusal:
    """The request whose head (request line and headers, without the blank line that
    ends it) is ``head``; ``device_api``: the device routes are served too. Pure; never
    raises on any input."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3:
        return Refusal(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        keep_alive = True
    elif version == b"HTTP/1.0":
        keep_alive = False
    else:
        return Refusal(400, "unsupported HTTP version")
    raw_path, _, query = target.partition(b"?")
    if not raw_path.startswith(b"/") or not raw_path.isascii():
        return Refusal(400, "malformed request target")
    path = raw_path.decode("ascii")
    expected = b"GET"
    if path in BITTORRENT_PATHS:
        pass
    elif device_api and path in DEVICE_POST_PATHS:
        expected = b"POST"
    elif not (device_api and path == HEALTH_PATH):
        return Refusal(404, "this endpoint serves /announce, /scrape, /v1/checkin, "
                            "/v1/report and /v1/health only" if device_api
                       else "this endpoint serves /announce and /scrape only")
    if method != expected:
        allowed = expected.decode("ascii")
        return Refusal(405, f"{path} only accepts {allowed}", ((b"allow", expected),))
    content_length: int | None = None
    headers = []
    if rest:
        for header in rest.split(b"\r\n"):
            name, colon, value = header.partition(b":")
            if not colon or not name or not _TOKEN_BAD.isdisjoint(name):
                return Refusal(400, "malformed header line")
            name = name.lower()
            value = value.strip(b" \t")
            headers.append((name, value))
            if name == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
            elif name == b"transfer-encoding":
                return Refusal(400, "a request body is not accepted here"
                               if expected == b"GET" else "transfer-encoding is not accepted")
            elif name == b"content-length":
                if content_length is not None or not value.isdigit() or len(value) > 12:
                    return Refusal(400, "malformed content-length")
                content_length = int(value)
    if expected == b"GET":
        if content_length:
            return Refusal(400, "a request body is not accepted here")
        return Request(path, query, keep_alive, target, tuple(headers))
    if content_length is None:
        return Refusal(400, "a POST needs a content-length")
    return Request(path, query, keep_alive, target, tuple(headers), "POST", content_length)


def render_response(status: int, body: bytes, *, content_type: bytes = b"text/plain",
                    keep_alive: bool = True,
                    headers: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """The bytes of an HTTP/1.1 answer (``connection: close`` unless ``keep_alive``)."""
    out = [b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
           b"cache-control: no-store\r\n" % (status, _REASONS.get(status, b"Unknown"),
                                             content_type, len(body))]
    out.extend(b"%s: %s\r\n" % header for header in headers)
    if not keep_alive:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)


def _refusal_bytes(refusal: Refusal) -> bytes:
    """A refusal, its body a bencoded ``failure reason`` (what BitTorrent clients read,
    whatever the status)."""
    return render_response(refusal.status, failure_reason(refusal.reason),
                           keep_alive=False, headers=refusal.headers)


def _json_refusal(status: int, reason: str) -> bytes:
    """A device route's refusal: ``{"error": reason}``, the connection closed."""
    return render_response(status, encode_json({"error": reason}),
                           content_type=b"application/json", keep_alive=False)


_BUSY: Final = _refusal_bytes(Refusal(503, "too many connections"))
_HEALTH: Final = encode_json({"ok": True})
_TRANSPORT_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                            ssl.SSLError)


async def serve_announce(
    answer: AnswerBitTorrent,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    limits: AnnounceServerLimits | None = None,
    device_api: AnswerDevice | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/announce`` and ``/scrape`` (and, with ``device_api``, ``POST
    /v1/checkin``, ``POST /v1/report`` and ``GET /v1/health``) on ``host:port`` until
    cancelled.

    ``answer`` decides announces and scrapes (normally
    :func:`tracker.bt_api.answer_bittorrent`), ``device_api`` the device routes
    (:func:`tracker.device_api.answer_device`). Port 0 lets the
    kernel pick a free port; the base URL (``http://HOST:PORT``, or ``https://`` with
    ``ssl_context``) is passed to ``task_status.started``. On cancellation the listener
    and every connection are closed.

    Raises:
        OSError: the address cannot be bound (before ``started``).
    """
    limits = limits if limits is not None else AnnounceServerLimits()
    slots = trio.CapacityLimiter(limits.max_connections)
    handler = functools.partial(_serve_connection, answer, device_api, limits, slots)
    try:
        tcp_listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise bind_error(exc, host, port) from exc
    bound_host, bound_port = tcp_listeners[0].socket.getsockname()[:2]
    listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp_listeners)
    if ssl_context is not None:
        listeners = [trio.SSLListener(listener, ssl_context, https_compatible=True)
                     for listener in tcp_listeners]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    scheme = "https" if ssl_context is not None else "http"
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        log.info("lean BitTorrent endpoint listening on %s://%s:%d", scheme, shown,
                 bound_port)
        task_status.started(f"{scheme}://{shown}:{bound_port}")


class _Connection(Protocol):
    """What the keep-alive loop needs of a connection (a ``trio.SSLStream`` has it)."""

    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...

    async def send_all(self, data: bytes) -> None: ...


class _PlainSocket:
    """A plain TCP connection driven through its socket directly, with one pass
    through the scheduler per request instead of ``trio.SocketStream``'s two per call
    (trio's stream machinery was the largest cost of an announce after its answer). A
    receive waits until the socket is readable (``trio.lowlevel.wait_readable``, a
    checkpoint: the connection's deadline applies), then reads: one ``recv`` per
    request, none that fails with ``EAGAIN``. A send is tried at once and waits
    (``wait_writable``) only on a ``BlockingIOError``; a send that follows no wait at
    all since the last one (the next of several pipelined requests, already read)
    passes through the scheduler first, so that a client pipelining many requests
    does not keep the other connections waiting. ``OSError`` (reset, broken pipe) is
    raised as is. Owns the socket: :meth:`close`."""

    __slots__ = ("_sock", "_waited")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._waited = False

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            self._waited = True
            try:
                return self._sock.recv(max_bytes)
            except BlockingIOError:
                pass

    async def send_all(self, data: bytes) -> None:
        if not self._waited:  # fairness: one pass through the scheduler per answer
            await trio.lowlevel.checkpoint()
        self._waited = False
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()


async def _serve_connection(answer: AnswerBitTorrent, device_api: AnswerDevice | None,
                            limits: AnnounceServerLimits, slots: trio.CapacityLimiter,
                            stream: trio.abc.Stream) -> None:
    """One connection: answer requests until the client leaves, a refusal, a timeout
    or the per-connection cap. Never raises (transport errors end the connection). A
    plain TCP connection is served through its socket (:class:`_PlainSocket`), a TLS
    one through its stream."""
    plain: _PlainSocket | None = None
    try:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(1.0):
                await stream.send_all(_BUSY)
            return
        try:
            client = _client_of(stream)
            connection: _Connection = stream
            if isinstance(stream, trio.SocketStream):
                plain = _PlainSocket(socket.socket(fileno=stream.socket.detach()))
                connection = plain
            await _serve_requests(answer, device_api, limits, connection, client)
        finally:
            slots.release()
    except _TRANSPORT_ERRORS as exc:
        log.debug("lean endpoint connection ended: %r", exc)
        if isinstance(exc.__cause__, ssl.SSLError):
            await _send_tls_alert(stream)
    except Exception:  # a bug in answering: lose this connection, not the listener
        log.exception("lean endpoint: answering a request failed; connection closed")
    finally:
        if plain is not None:
            plain.close()
        with trio.move_on_after(1.0) as cleanup:
            cleanup.shield = True
            await trio.aclose_forcefully(stream)


async def _send_tls_alert(stream: trio.abc.Stream) -> None:
    """Send the TLS alert of a failed handshake (e.g. ``protocol_version`` to a TLS 1.2
    client), which trio leaves in the stream's outgoing buffer: without it the client
    sees a bare EOF and cannot tell why. Best effort, bounded."""
    outgoing = getattr(stream, "_outgoing", None)  # trio.SSLStream's memory BIO
    transport = getattr(stream, "transport_stream", None)
    if not isinstance(outgoing, ssl.MemoryBIO) or transport is None:
        return
    alert = outgoing.read()
    if alert:
        with trio.move_on_after(1.0), contextlib.suppress(*_TRANSPORT_ERRORS):
            await transport.send_all(alert)


def _client_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(inner, trio.SocketStream):
        return None
    peer = inner.socket.getpeername()
    return str(peer[0]), int(peer[1])


_DEADLINE_SLACK: Final = 0.01


async def _serve_requests(answer: AnswerBitTorrent, device_api: AnswerDevice | None,
                          limits: AnnounceServerLimits, stream: _Connection,
                          client: tuple[str, int] | None) -> None:
    """The keep-alive loop. One cancel scope per connection (cheaper than one per
    request), its deadline moved at most twice per request: ``idle_timeout_s`` from
    the moment the loop waits for a request (that deadline also bounds the app's answer
    and its sending), tightened to ``head_timeout_s`` if a head does not arrive in one
    piece. Moving a deadline costs (trio reschedules it), so a later one within
    :data:`_DEADLINE_SLACK` of ``idle_timeout_s`` is not set: a busy connection's
    deadline moves a few times a second, not at every request, and an idle client is
    cut at most that share of ``idle_timeout_s`` early, never late."""
    buffer = bytearray()
    max_head = limits.max_head_bytes
    slack = limits.idle_timeout_s * _DEADLINE_SLACK
    with trio.CancelScope(deadline=trio.current_time() + limits.idle_timeout_s) as scope:
        for _ in range(limits.max_requests_per_connection):
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                deadline = trio.current_time() + (
                    limits.head_timeout_s if buffer else limits.idle_timeout_s)
                if not 0 <= deadline - scope.deadline <= slack:
                    scope.deadline = deadline
                partial = bool(buffer)
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return  # the client closed (mid-head or between requests)
                    buffer += data
                    end = buffer.find(b"\r\n\r\n", max(0, len(buffer) - len(data) - 3))
                    if end >= 0 or len(buffer) > max_head:
                        break
                    if not partial:
                        partial = True
                        scope.deadline = trio.current_time() + limits.head_timeout_s
            if end < 0 or end + 4 > max_head:
                await stream.send_all(_refusal_bytes(Refusal(413, "request head too large")))
                return
            parsed = parse_head(bytes(buffer[:end]), device_api=device_api is not None)
            del buffer[:end + 4]
            if isinstance(parsed, Refusal):
                await stream.send_all(_refusal_bytes(parsed))
                return
            if parsed.method == "POST":
                if device_api is None:  # pragma: no cover - parse_head refused it
                    raise RuntimeError("a POST without a device API")
                length = parsed.content_length
                if length > limits.max_body_bytes:
                    await stream.send_all(_json_refusal(
                        413, f"request body of {length} bytes is over the limit of "
                             f"{limits.max_body_bytes} bytes"))
                    return
                if len(buffer) < length:
                    scope.deadline = trio.current_time() + limits.head_timeout_s
                    while len(buffer) < length:
                        data = await stream.receive_some(max(65536, length - len(buffer)))
                        if not data:
                            return  # the client closed mid-body
                        buffer += data
                body = bytes(buffer[:length])
                del buffer[:length]
                status, out, headers = await device_api(parsed.path, parsed.target, body,
                                                        parsed.headers)
                await stream.send_all(render_response(
                    status, out, content_type=b"application/json",
                    keep_alive=parsed.keep_alive, headers=headers))
            elif parsed.path == HEALTH_PATH:
                await stream.send_all(render_response(200, _HEALTH, keep_alive=parsed.keep_alive,
                                                      content_type=b"application/json"))
            else:
                status, out = await answer(parsed.path, parsed.query, client,
                                           target=parsed.target, headers=parsed.headers)
                await stream.send_all(render_response(status, out,
                                                      keep_alive=parsed.keep_alive))
            if not parsed.keep_alive:
                return
    if scope.cancelled_caught:
        log.debug("lean endpoint: client %s timed out", client)
