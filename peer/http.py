"""The httpx adapter of the device agent: the only peer module that imports httpx (and
httpcore, httpx's transport layer, for the pin check and the deadlines).

- :class:`TufFetcher`: python-tuf's network seam (``FetcherInterface``), blocking, used
  from a worker thread.
- :class:`HttpClient`: async requests for the agent: ranged payload reads with a hard
  byte limit, and small JSON POSTs to the tracker.
- :class:`TlsPolicy`: how both trust servers: a CA bundle (default: the system store)
  and SPKI pins. Chain and hostname checks always apply; pins come on top. The pin is
  checked by a wrapper around httpcore's network backend, right after the TLS handshake
  and before the first HTTP byte; on a mismatch the connection is closed and
  :class:`peer.errors.PinMismatch` raised (fail closed).

httpx errors become :class:`peer.errors.DownloadFailed`; a server that sends more bytes
than asked for (endless data) is cut at the limit and the read fails. Redirects are
never followed; a 3xx fails with a message saying where it pointed (plain http, another
host).

**No content encodings.** Every request says ``Accept-Encoding: identity`` and every
body is read raw: the limits count the bytes that arrive, which are the bytes kept. An
answer with any other ``Content-Encoding`` is refused before its body is read
(:data:`ENCODING_REFUSED`): a compressed answer can expand a thousand to a million times
(a few KiB of gzip or zstd become gigabytes), and nothing the agent fetches gains from
it (payloads are zstd already, metadata and tracker answers are small JSON).

**Deadlines** (slow retrieval, a server trickling any part of an answer):

- the answer's headers must arrive within ``timeout_s`` of the request's start
  (connect, TLS and headers together);
- the whole request, body included, must end within ``timeout_s`` plus the largest
  body it may have (its length for a range, its size limit otherwise) at
  ``min_rate_bytes_per_s``: independent of where a range starts;
- once ``timeout_s`` has passed, the body must have averaged ``min_rate_bytes_per_s``
  (a trickle is cut early), and no read may wait longer than ``timeout_s`` (a stall).

The async client enforces them with trio cancel scopes; the blocking fetcher with a
deadline its network streams read before each socket operation (httpx's own timeouts
are per operation and would let one header byte every few seconds through forever).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import ssl
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import httpcore
import httpx
import trio
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from swarmota.infra.deviceauth import AnnounceKey, DeviceAuthError
from swarmota.infra.tlspin import PinError, pin_of_certificate_der
from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import ConfigError, DownloadFailed, PartialResponse, PinMismatch
from swarmota.peer.identity import Identity
from swarmota.tracker.wire import AnnounceKeyGrant

__all__ = ["DEFAULT_MIN_RATE_BYTES_PER_S", "ENCODING_REFUSED", "MAX_JSON_RESPONSE_BYTES",
           "HttpClient", "TlsPolicy", "TufFetcher", "check_identity_encoding",
           "content_range_matches", "decode_json_answer"]

MAX_JSON_RESPONSE_BYTES = 64 * 1024
DEFAULT_MIN_RATE_BYTES_PER_S = 1024
# At most 20 digits: any valid offset fits, and int() never sees 4300+ digits (ValueError).
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)")
_USER_AGENT = "swarmota-peer/0.1"
_HEADERS = {"user-agent": _USER_AGENT, "accept-encoding": "identity"}
ENCODING_REFUSED = "content encoding refused"
"""Words of the error for an answer with a ``Content-Encoding`` the agent did not ask for."""


def check_identity_encoding(what: str, content_encoding: str | None) -> None:
    """Refuse an answer whose ``Content-Encoding`` is not identity (pure).

    Raises:
        DownloadFailed: naming the encoding (clipped) and why it is refused.
    """
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    if all(c in ("", "identity") for c in codings):
        return
    raise DownloadFailed(f"{what}: answered with Content-Encoding "
                         f"{(content_encoding or '')[:40]!r}, which was not asked for "
                         f"({ENCODING_REFUSED}: a compressed answer may expand without "
                         "bound)")


def decode_json_answer(what: str, status: int, data: bytes) -> dict[str, Any]:
    """The JSON object a server answered with HTTP ``status`` (pure; ``what`` names the
    request in messages).

    Raises:
        DownloadFailed: ``status`` is not 200 (the message quotes the server's error,
            clipped), or the answer is not a JSON object (not UTF-8, not JSON, nested
            too deeply, or another JSON value).
    """
    try:
        answer = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deeply
        answer = None
    if status != 200:
        detail = answer.get("error") if isinstance(answer, dict) else data[:200].decode(
            errors="replace")
        raise DownloadFailed(f"{what}: HTTP {status}: {str(detail)[:200]}", http_status=status)
    if not isinstance(answer, dict):
        raise DownloadFailed(f"{what}: answer is not a JSON object")
    return answer


def content_range_matches(header: str | None, offset: int, length: int) -> bool:
    """Whether a 206 answer's ``Content-Range`` header names exactly the ``length`` bytes
    from ``offset`` (pure; any other value, malformed or overlong, is ``False``)."""
    match = _CONTENT_RANGE_RE.fullmatch(header or "")
    return (match is not None and int(match[1]) == offset
            and int(match[2]) == offset + length - 1)


@functools.cache
def _system_tls_context() -> ssl.SSLContext:
    """The system's default verifying TLS context, built once: loading the CA bundle
    takes ~30 ms, and every update pass opens two clients. SSL contexts are safe to
    share between threads for client connections."""
    return ssl.create_default_context()


@dataclass(frozen=True)
class TlsPolicy:
    """Which servers the agent trusts.

    ``ca_file``: a PEM CA bundle used instead of the system store (a private or
    development CA). ``pins``: SPKI pins (``sha256/...``, :mod:`infra.tlspin`); when not
    empty, a server whose certificate key is not among them is refused after the
    handshake, before anything is sent. Empty: no pinning.
    """

    pins: frozenset[str] = frozenset()
    ca_file: str | None = None

    @classmethod
    def for_device(cls, config: DeviceConfig) -> TlsPolicy:
        return cls(pins=frozenset(config.tls_pins), ca_file=config.tls_ca_file)

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context (TLS 1.2 at least).

        Raises:
            ConfigError: ``ca_file`` cannot be read or holds no certificate.
        """
        if self.ca_file is None:
            return _system_tls_context()
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls_ca_file {self.ca_file}: cannot load it: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


def _check_pin(ssl_object: Any, host: str | None, pins: frozenset[str]) -> None:
    """Raise PinMismatch unless the peer certificate of ``ssl_object`` has a pinned key."""
    der = ssl_object.getpeercert(True) if ssl_object is not None else None
    if not der:
        raise PinMismatch(f"TLS to {host}: no server certificate to check against the pins")
    try:
        seen = pin_of_certificate_der(der)
    except PinError as exc:
        raise PinMismatch(f"TLS to {host}: unreadable server certificate: {exc}") from None
    if seen not in pins:
        raise PinMismatch(f"TLS to {host}: the server key {seen} matches none of the "
                          f"{len(pins)} pinned keys (tls_pins); connection closed, "
                          "nothing sent")


class _PinnedStream(httpcore.NetworkStream):
    """A blocking stream whose ``start_tls`` checks the server's key against the pins."""

    def __init__(self, stream: httpcore.NetworkStream, pins: frozenset[str]) -> None:
        self._stream = stream
        self._pins = pins

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, timeout)
        try:
            _check_pin(tls.get_extra_info("ssl_object"), server_hostname, self._pins)
        except BaseException:
            tls.close()
            raise
        return _PinnedStream(tls, self._pins)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend, pins: frozenset[str]) -> None:
        self._backend = backend
        self._pins = pins

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _PinnedStream(self._backend.connect_tcp(host, port, timeout, local_address,
                                                       socket_options), self._pins)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None,
                            ) -> httpcore.NetworkStream:
        return _PinnedStream(self._backend.connect_unix_socket(path, timeout, socket_options),
                             self._pins)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _AsyncPinnedStream(httpcore.AsyncNetworkStream):
    """The async twin of :class:`_PinnedStream` (trio or asyncio, as httpcore detects)."""

    def __init__(self, stream: httpcore.AsyncNetworkStream, pins: frozenset[str]) -> None:
        self._stream = stream
        self._pins = pins

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = await self._stream.start_tls(ssl_context, server_hostname, timeout)
        try:
            _check_pin(tls.get_extra_info("ssl_object"), server_hostname, self._pins)
        except BaseException:
            await tls.aclose()
            raise
        return _AsyncPinnedStream(tls, self._pins)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _AsyncPinnedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, backend: httpcore.AsyncNetworkBackend, pins: frozenset[str]) -> None:
        self._backend = backend
        self._pins = pins

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(host, port, timeout, local_address,
                                                 socket_options)
        return _AsyncPinnedStream(stream, self._pins)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_unix_socket(path, timeout, socket_options)
        return _AsyncPinnedStream(stream, self._pins)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _Deadline:
    """When the blocking request under way must be over (``time.monotonic`` seconds;
    ``None``: no deadline). One per :class:`TufFetcher`, which makes one request at a
    time; its network streams clip every socket timeout to it."""

    def __init__(self) -> None:
        self.at: float | None = None

    def clip(self, timeout: float | None, expired: type[Exception]) -> float | None:
        """``timeout`` shortened to what is left; raises ``expired`` when nothing is."""
        if self.at is None:
            return timeout
        left = self.at - time.monotonic()
        if left <= 0:
            raise expired("deadline of the request passed (slow retrieval)")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A blocking stream whose reads, writes and TLS handshake end by the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._deadline.clip(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._deadline.clip(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname,
                                     self._deadline.clip(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, backend: httpcore.NetworkBackend, deadline: _Deadline) -> None:
        self._backend = backend
        self._deadline = deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        timeout = self._deadline.clip(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_tcp(host, port, timeout, local_address,
                                                         socket_options), self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None,
                            ) -> httpcore.NetworkStream:
        timeout = self._deadline.clip(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options),
                               self._deadline)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


_Transport = typing.TypeVar("_Transport", httpx.HTTPTransport, httpx.AsyncHTTPTransport)


def _install_deadline(transport: httpx.HTTPTransport, deadline: _Deadline
                      ) -> httpx.HTTPTransport:
    """Wrap the network backend of a blocking ``transport``'s pool with ``deadline``
    (the private attributes as in :func:`_install_pinning`)."""
    pool = getattr(transport, "_pool", None)
    if type(pool) is not httpcore.ConnectionPool or not isinstance(
            getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
        raise RuntimeError(f"httpx {httpx.__version__} / httpcore {httpcore.__version__}: "
                           f"transport pool {type(pool).__name__} has no network backend "
                           "to wrap; request deadlines cannot be installed")
    pool._network_backend = _DeadlineBackend(pool._network_backend, deadline)
    return transport


def _install_pinning(transport: _Transport, pins: frozenset[str]) -> _Transport:
    """Wrap the network backend of ``transport``'s httpcore pool with the pin check.

    The one place that reaches into private attributes: httpx's ``_pool`` and
    httpcore's ``_network_backend``. If either library changes them, this raises (and
    tests/test_transport_attacks.py fails) rather than silently not pinning.
    """
    pool = getattr(transport, "_pool", None)
    if type(pool) is httpcore.ConnectionPool and isinstance(
            getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
        pool._network_backend = _PinnedBackend(pool._network_backend, pins)
    elif type(pool) is httpcore.AsyncConnectionPool and isinstance(
            getattr(pool, "_network_backend", None), httpcore.AsyncNetworkBackend):
        pool._network_backend = _AsyncPinnedBackend(pool._network_backend, pins)
    else:
        raise RuntimeError(f"httpx {httpx.__version__} / httpcore {httpcore.__version__}: "
                           f"transport pool {type(pool).__name__} has no network backend "
                           "to wrap; TLS pinning cannot be installed")
    return transport


def _sync_client_options(tls: TlsPolicy, deadline: _Deadline) -> dict[str, Any]:
    """Options for httpx.Client: a transport whose streams keep to ``deadline`` and,
    with pins, check them."""
    transport = _install_deadline(httpx.HTTPTransport(verify=tls.ssl_context()), deadline)
    if tls.pins:
        transport = _install_pinning(transport, tls.pins)
    # No proxies from the environment: a proxy transport would bypass the wrapped pool.
    return {"follow_redirects": False, "headers": dict(_HEADERS), "transport": transport,
            "trust_env": False}


def _async_client_options(tls: TlsPolicy, local_address: str | None = None
                          ) -> dict[str, Any]:
    """Options for httpx.AsyncClient, as :func:`_sync_client_options`; connections leave
    from ``local_address`` when given."""
    options: dict[str, Any] = {"follow_redirects": False, "headers": dict(_HEADERS)}
    if not tls.pins and local_address is None:
        return {**options, "verify": tls.ssl_context()}
    transport = httpx.AsyncHTTPTransport(verify=tls.ssl_context(),
                                         local_address=local_address)
    if tls.pins:
        transport = _install_pinning(transport, tls.pins)
    return {**options, "transport": transport, "trust_env": False}


def _describe(exc: BaseException) -> str:
    """The messages along an exception's cause chain: under trio, httpx's ConnectError
    for a refused certificate has an empty message; the SSL error is its cause."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 4:
        text = str(seen)
        if text and text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return ": ".join(parts) or type(exc).__name__


def _redirect_message(method: str, url: str, response: httpx.Response) -> str:
    """Why a 3xx answer is refused: the agent follows no redirect, and says where it led."""
    location = response.headers.get("location", "")
    here = httpx.URL(url)
    try:
        there = here.join(location)
    except httpx.InvalidURL:
        there = here
    if there.scheme != "https":
        why = "to plain http" if there.scheme == "http" else "to a non-https URL"
    elif (there.host, there.port) != (here.host, here.port):
        why = f"to another host ({there.host})"
    else:
        why = "(redirects are never followed)"
    return (f"{method} {url}: HTTP {response.status_code} redirect {why} refused: "
            f"Location {location[:200]!r}")


class _RateFloor:
    """Slow-retrieval guard of one response: once ``grace_s`` has passed since the request
    started, the bytes received must average at least ``min_rate`` per second.
    ``min_rate`` 0 turns the guard off. ``clock`` is trio's (async) or monotonic (sync)."""

    def __init__(self, what: str, *, min_rate: int, grace_s: float,
                 clock: typing.Callable[[], float]) -> None:
        self._what = what
        self._min_rate = min_rate
        self._grace_s = grace_s
        self._clock = clock
        self._start = clock()

    def check(self, received: int) -> None:
        """Raise DownloadFailed if the response is too slow so far."""
        if not self._min_rate:
            return
        elapsed = self._clock() - self._start
        if elapsed >= self._grace_s and received < self._min_rate * elapsed:
            raise DownloadFailed(f"{self._what}: too slow (slow retrieval): {received} bytes "
                                 f"in {elapsed:.1f} s, below the minimum of {self._min_rate} "
                                 "bytes/s (http_min_rate_bytes_per_s)")


def request_deadline_s(timeout_s: float, min_rate_bytes_per_s: int, body_bytes: int) -> float:
    """How long one request may take in all: ``timeout_s`` plus its largest possible
    body (``body_bytes``: a range's length, or a size limit) at the floor rate; with no
    floor (0), ``timeout_s`` per started MiB of it, so that it stays bounded."""
    if min_rate_bytes_per_s:
        return timeout_s + body_bytes / min_rate_bytes_per_s
    return timeout_s * (1 + -(-body_bytes // (1 << 20)))


class TufFetcher(FetcherInterface):
    """python-tuf fetcher over a blocking httpx client (call from a worker thread).

    Each request keeps to the deadlines of the module docstring (headers within
    ``timeout_s``, the whole within :func:`request_deadline_s` of python-tuf's length
    limit for the file). ``pass_timeout_s`` bounds all requests of the fetcher together
    (one refresh of the metadata: root rotations, timestamp, snapshot, targets, the
    release manifest), whatever their number.
    """

    def __init__(self, *, timeout_s: float, tls: TlsPolicy | None = None,
                 min_rate_bytes_per_s: int = DEFAULT_MIN_RATE_BYTES_PER_S,
                 pass_timeout_s: float | None = None) -> None:
        """Raises ConfigError: ``tls.ca_file`` cannot be loaded."""
        self._deadline = _Deadline()
        self._client = httpx.Client(timeout=timeout_s,
                                    **_sync_client_options(tls or TlsPolicy(), self._deadline))
        self._timeout_s = timeout_s
        self._min_rate = min_rate_bytes_per_s
        self._pass_timeout_s = pass_timeout_s
        self._pass_ends = None if pass_timeout_s is None else time.monotonic() + pass_timeout_s
        self._max_length = 0
        self.bytes_received = 0

    def close(self) -> None:
        self._client.close()

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[Any]]:
        # python-tuf passes the file's length limit here only: keep it for the deadline
        self._max_length = max_length
        with super().download_file(url, max_length) as fh:
            yield fh

    def _until(self, seconds: float) -> float:
        """The deadline ``seconds`` from now, no later than the end of the pass."""
        at = time.monotonic() + seconds
        return at if self._pass_ends is None else min(at, self._pass_ends)

    def _timeout_error(self, url: str, exc: httpx.TimeoutException) -> str:
        if self._pass_ends is not None and time.monotonic() >= self._pass_ends:
            return (f"GET {url}: the metadata refresh took longer than its bound of "
                    f"{self._pass_timeout_s:.0f} s (slow retrieval)")
        return f"GET {url}: {_describe(exc)} (slow retrieval: no complete answer in time)"

    def _fetch(self, url: str) -> Iterator[bytes]:
        floor = _RateFloor(f"GET {url}", min_rate=self._min_rate, grace_s=self._timeout_s,
                           clock=time.monotonic)
        whole_at = self._until(request_deadline_s(self._timeout_s, self._min_rate,
                                                  self._max_length))
        self._deadline.at = self._until(self._timeout_s)  # connect, TLS and headers
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.TimeoutException as exc:
            self._deadline.at = None
            raise tuf_exceptions.DownloadError(self._timeout_error(url, exc)) from exc
        except httpx.HTTPError as exc:
            self._deadline.at = None
            raise tuf_exceptions.DownloadError(f"GET {url}: {_describe(exc)}") from exc
        self._deadline.at = whole_at
        try:
            if response.status_code != 200:
                message = (_redirect_message("GET", url, response) if response.is_redirect
                           else f"GET {url}: HTTP {response.status_code}")
                raise tuf_exceptions.DownloadHTTPError(message, response.status_code)
            check_identity_encoding(f"GET {url}", response.headers.get("content-encoding"))
        except DownloadFailed as exc:
            response.close()
            self._deadline.at = None
            raise tuf_exceptions.DownloadError(str(exc)) from exc
        except BaseException:
            response.close()
            self._deadline.at = None
            raise
        return self._stream(url, response, floor)

    def _stream(self, url: str, response: httpx.Response,
                floor: _RateFloor) -> Iterator[bytes]:
        received = 0
        try:
            # raw: no decoding (none was asked for); no chunk size: a block is whatever
            # arrived, so the rate floor sees a trickle
            for block in response.iter_raw():
                self.bytes_received += len(block)
                received += len(block)
                floor.check(received)
                yield block
        except httpx.TimeoutException as exc:
            raise tuf_exceptions.DownloadError(self._timeout_error(url, exc)) from exc
        except httpx.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"GET {url}: {_describe(exc)}") from exc
        except DownloadFailed as exc:
            raise tuf_exceptions.DownloadError(str(exc)) from exc
        finally:
            response.close()
            self._deadline.at = None


class HttpClient:
    """Async HTTP for the agent. Use as ``async with HttpClient(...) as http:``.

    ``tls`` (default: system store, no pins) is also what :attr:`tls` returns, so that
    the blocking :class:`TufFetcher` of the same pass trusts the same servers.
    """

    def __init__(self, *, timeout_s: float, tls: TlsPolicy | None = None,
                 identity: Identity | None = None, local_address: str | None = None,
                 min_rate_bytes_per_s: int = DEFAULT_MIN_RATE_BYTES_PER_S) -> None:
        """Raises ConfigError: ``tls.ca_file`` cannot be loaded."""
        self.tls = tls or TlsPolicy()
        self.timeout_s = timeout_s
        self.min_rate_bytes_per_s = min_rate_bytes_per_s
        self._client = httpx.AsyncClient(timeout=timeout_s,
                                         **_async_client_options(self.tls, local_address))
        self.bytes_received = 0
        self.identity = identity
        # signed requests go out one at a time, in counter order: the tracker refuses a
        # counter that is not above the last one it accepted from the device
        self._signing = trio.Lock()
        self._announce_key: tuple[AnnounceKey, float] | None = None  # and when to stop

    def use_announce_key(self, grant: AnnounceKeyGrant | None) -> None:
        """Authenticate announces and scrapes (:meth:`get_tracker`) with ``grant``, the
        announce key of the last check-in's answer, instead of a signature, until a
        minute before it expires by this device's clock; ``None`` drops the key."""
        identity = self.identity
        if grant is None or identity is None:
            self._announce_key = None
            return
        key = AnnounceKey(identity.device_id, identity.signer.cert_sha256, grant.expires,
                          grant.key)
        self._announce_key = (key, identity.clock() + grant.lifetime_s - 60)

    @classmethod
    def for_device(cls, config: DeviceConfig, identity: Identity | None = None) -> HttpClient:
        """A client with the device's timeout, CA bundle and pins; requests to the
        tracker are signed with ``identity`` when given. A device whose swarm listens on
        one specific address also sends its HTTP from there, so that the address the
        tracker sees on a (relayed) announce is the one peers can reach.

        Raises:
            ConfigError: the configured CA bundle cannot be loaded.
        """
        host, _ = config.swarm_listen_host_port
        local = None if host in ("", "0.0.0.0", "::") else host
        return cls(timeout_s=config.http_timeout_s, tls=TlsPolicy.for_device(config),
                   identity=identity, local_address=local,
                   min_rate_bytes_per_s=config.http_min_rate_bytes_per_s)

    def _signed(self, method: str, url: str, body: bytes,
                key: AnnounceKey | None = None) -> dict[str, str]:
        """The identity headers of ``METHOD url`` (none without an identity): signed,
        or with ``key``'s MAC. The target signed is the one httpx sends: path and query
        as encoded on the wire."""
        if self.identity is None:
            return {}
        try:
            counter = self.identity.next_counter()
        except OSError as exc:
            raise DownloadFailed(f"{method} {url}: cannot reserve a request counter: "
                                 f"{exc}") from exc
        target = httpx.URL(url).raw_path
        if key is not None:
            return dict(key.headers(method, target, body, counter))
        try:
            return dict(self.identity.signer.headers(method, target, body, counter))
        except DeviceAuthError as exc:  # a key in a TPM that will not sign now
            raise DownloadFailed(f"{method} {url}: cannot sign the request: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _exchange(self, what: str, method: str, url: str, *, body_bytes: int,
                        headers: dict[str, str] | None = None, content: bytes | None = None,
                        ) -> AsyncIterator[httpx.Response]:
        """One request under the deadlines of the module docstring: yields the response
        once its headers are in (within ``timeout_s``) and its encoding is checked; the
        caller reads the body (raw) inside, all within :func:`request_deadline_s` of
        ``body_bytes``.

        Raises:
            DownloadFailed: no headers in time, the whole deadline passed, an encoding
                that was not asked for, or a transport error (httpx's, translated).
        """
        limit = request_deadline_s(self.timeout_s, self.min_rate_bytes_per_s, body_bytes)
        with trio.move_on_after(limit) as whole:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    with trio.move_on_after(self.timeout_s) as head:
                        response = await stack.enter_async_context(self._client.stream(
                            method, url, headers=headers, content=content))
                    if head.cancelled_caught:
                        raise DownloadFailed(f"{what}: no answer within {self.timeout_s:g} s "
                                             "(connect, TLS and headers; slow retrieval)")
                    check_identity_encoding(what, response.headers.get("content-encoding"))
                    yield response
            except httpx.HTTPError as exc:
                raise DownloadFailed(f"{what}: {_describe(exc)}") from exc
        if whole.cancelled_caught:
            raise DownloadFailed(f"{what}: no complete answer within {limit:.0f} s "
                                 "(slow retrieval)")

    async def get_tracker(self, url: str, *, max_bytes: int) -> tuple[int, bytes]:
        """A signed GET to the tracker (BitTorrent announce or scrape relayed for
        libtorrent): ``(HTTP status, body)`` whatever the status, the body at most
        ``max_bytes``. Not counted in :attr:`bytes_received` (origin bytes only).

        With an announce key (:meth:`use_announce_key`) the request carries its MAC; a
        tracker that refuses the key (HTTP 401) is asked again with a signature, and
        the key is dropped.

        Raises:
            DownloadFailed: no answer, a redirect, a content encoding, or an answer over
                ``max_bytes``.
        """
        held = self._announce_key
        if held is not None and self.identity is not None \
                and self.identity.clock() < held[1]:
            status, body = await self._signed_exchange("GET", url, b"", {}, max_bytes,
                                                       key=held[0])
            if status != 401:
                return status, body
            self._announce_key = None  # expired on the tracker's clock, another secret
        return await self._signed_exchange("GET", url, b"", {}, max_bytes)

    async def _signed_exchange(self, method: str, url: str, content: bytes,
                               headers: dict[str, str], max_bytes: int, *,
                               key: AnnounceKey | None = None) -> tuple[int, bytes]:
        """One request to the tracker, signed when the client has an identity (signed
        requests go out one at a time, in counter order): ``(status, body)``, the body
        at most ``max_bytes``; redirects and transport errors are DownloadFailed."""
        what = f"{method} {url}"
        async with self._signing:  # the deadlines start once it is our turn
            if key is not None:  # a MAC: microseconds
                signed = self._signed(method, url, content, key)
            else:  # a thread: signing may be a TPM command (peer.keystore)
                signed = await trio.to_thread.run_sync(self._signed, method, url, content,
                                                       key)
            headers = {**headers, **signed}
            async with self._exchange(what, method, url, body_bytes=max_bytes,
                                      headers=headers, content=content or None) as response:
                if response.is_redirect:
                    raise DownloadFailed(_redirect_message(method, url, response),
                                         http_status=response.status_code)
                out = await self._read_limited(response, what, max_bytes, count=False)
                return response.status_code, out
        raise RuntimeError("unreachable: the exchange raises")  # pragma: no cover

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (what leaving ``async with`` does)."""
        await self._client.aclose()

    async def get_range(self, url: str, offset: int, length: int, *,
                        on_data: Callable[[bytearray], None] | None = None) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` of ``url``, or raise DownloadFailed.

        Accepts 206 with a matching Content-Range, or a 200 from a server that ignores
        Range (then skips to ``offset``). Never reads more than needed. The deadline
        counts ``length`` bytes, whatever ``offset``: a server ignoring Range that makes
        the agent skip far into a large file is cut like any slow answer. ``on_data``
        is called with the bytes from ``offset`` received so far (at most ``length``;
        valid during the call only) each time more arrive, so that a caller can use
        the first chunks of a long answer before its end.
        """
        headers = {"range": f"bytes={offset}-{offset + length - 1}"}
        what = f"GET {url} (range {offset}+{length})"
        async with self._exchange(what, "GET", url, body_bytes=length,
                                  headers=headers) as response:
            if response.status_code == 206:
                if not content_range_matches(response.headers.get("content-range"),
                                             offset, length):
                    raise DownloadFailed(f"GET {url}: bad Content-Range "
                                         f"{response.headers.get('content-range')!r}")
                skip = 0
            elif response.status_code == 200:
                skip = offset
            elif response.is_redirect:
                raise DownloadFailed(_redirect_message("GET", url, response),
                                     http_status=response.status_code)
            else:
                raise DownloadFailed(f"{what}: HTTP {response.status_code}",
                                     http_status=response.status_code)
            return await self._read_exact(response, url, skip, length, on_data)
        raise RuntimeError("unreachable: the exchange raises")  # pragma: no cover

    async def get_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """GET a whole small file (200 only), refusing answers over ``max_bytes``."""
        what = f"GET {url}"
        async with self._exchange(what, "GET", url, body_bytes=max_bytes) as response:
            if response.is_redirect:
                raise DownloadFailed(_redirect_message("GET", url, response),
                                     http_status=response.status_code)
            if response.status_code != 200:
                raise DownloadFailed(f"GET {url}: HTTP {response.status_code}",
                                     http_status=response.status_code)
            return await self._read_limited(response, what, max_bytes, count=True)
        raise RuntimeError("unreachable: the exchange raises")  # pragma: no cover

    def _floor(self, what: str) -> _RateFloor:
        return _RateFloor(what, min_rate=self.min_rate_bytes_per_s, grace_s=self.timeout_s,
                          clock=trio.current_time)

    async def _read_limited(self, response: httpx.Response, what: str, max_bytes: int, *,
                            count: bool) -> bytes:
        """The raw body, at most ``max_bytes`` (DownloadFailed beyond); ``count``: add it
        to :attr:`bytes_received` (origin bytes)."""
        out = bytearray()
        floor = self._floor(what)
        async for block in response.aiter_raw():
            if count:
                self.bytes_received += len(block)
            out += block
            if len(out) > max_bytes:
                raise DownloadFailed(f"{what}: answer over {max_bytes} bytes")
            floor.check(len(out))
        return bytes(out)

    async def _read_exact(self, response: httpx.Response, url: str, skip: int,
                          length: int,
                          on_data: Callable[[bytearray], None] | None = None) -> bytes:
        """Read ``length`` bytes after skipping ``skip`` (``on_data``: see
        :meth:`get_range`); an answer cut short raises PartialResponse with what did
        arrive."""
        out = bytearray()
        received = 0
        floor = self._floor(f"GET {url}")
        try:
            # no chunk size: a block is whatever arrived, so the rate floor sees a trickle
            async for block in response.aiter_raw():
                self.bytes_received += len(block)
                received += len(block)
                if skip:
                    dropped = min(skip, len(block))
                    block = block[dropped:]
                    skip -= dropped
                out += block
                if len(out) > length:  # anything beyond what was asked for is dropped
                    del out[length:]
                if on_data is not None and block:
                    on_data(out)
                if len(out) == length:
                    return bytes(out)
                floor.check(received)
        except (httpx.HTTPError, DownloadFailed) as exc:
            what = _describe(exc) if isinstance(exc, httpx.HTTPError) else str(exc)
            raise PartialResponse(f"GET {url}: {what}", received=bytes(out)) from exc
        raise PartialResponse(f"GET {url}: connection closed after {len(out)} of {length} bytes",
                              received=bytes(out))

    async def post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON, return the (size-limited) JSON object answer."""
        content = json.dumps(body, separators=(",", ":")).encode()
        status, data = await self._signed_exchange(
            "POST", url, content, {"content-type": "application/json"},
            MAX_JSON_RESPONSE_BYTES)
        return decode_json_answer(f"POST {url}", status, data)
