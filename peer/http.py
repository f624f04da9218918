"""The httpx adapter of the device agent: the only peer module that imports httpx (and
httpcore, httpx's transport layer, for the pin check).

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
host). Slow retrieval: httpx's ``timeout_s`` bounds each network operation (a stalled
server fails after it); on top, a response body must arrive at ``min_rate_bytes_per_s``
on average once ``timeout_s`` has passed since the request started (a server trickling
a few bytes per second is cut off), and an async request as a whole gets at most
``timeout_s`` plus its size at that rate (trickled headers).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import ssl
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
import trio
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from infra.tlspin import PinError, pin_of_certificate_der
from peer.config import DeviceConfig
from peer.errors import ConfigError, DownloadFailed, PartialResponse, PinMismatch
from peer.identity import Identity

__all__ = ["DEFAULT_MIN_RATE_BYTES_PER_S", "MAX_JSON_RESPONSE_BYTES", "HttpClient", "TlsPolicy",
           "TufFetcher", "content_range_matches", "decode_json_answer"]

MAX_JSON_RESPONSE_BYTES = 64 * 1024
DEFAULT_MIN_RATE_BYTES_PER_S = 1024
# At most 20 digits: any valid offset fits, and int() never sees 4300+ digits (ValueError).
_CONTENT_RANGE_RE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)")
_USER_AGENT = "swarmota-peer/0.1"


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


_Transport = typing.TypeVar("_Transport", httpx.HTTPTransport, httpx.AsyncHTTPTransport)


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


def _sync_client_options(tls: TlsPolicy) -> dict[str, Any]:
    """Options for httpx.Client: with pins, a transport whose pool checks them."""
    options: dict[str, Any] = {"follow_redirects": False,
                               "headers": {"user-agent": _USER_AGENT}}
    if not tls.pins:
        return {**options, "verify": tls.ssl_context()}
    transport = _install_pinning(httpx.HTTPTransport(verify=tls.ssl_context()), tls.pins)
    # No proxies from the environment: a proxy transport would bypass the pinned pool.
    return {**options, "transport": transport, "trust_env": False}


def _async_client_options(tls: TlsPolicy, local_address: str | None = None
                          ) -> dict[str, Any]:
    """Options for httpx.AsyncClient, as :func:`_sync_client_options`; connections leave
    from ``local_address`` when given."""
    options: dict[str, Any] = {"follow_redirects": False,
                               "headers": {"user-agent": _USER_AGENT}}
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

    @staticmethod
    def deadline_s(timeout_s: float, min_rate: int, size: int) -> float:
        """How long a whole request of ``size`` bytes may take at the floor rate."""
        return timeout_s + (size / min_rate if min_rate else math.inf)


class TufFetcher(FetcherInterface):
    """python-tuf fetcher over a blocking httpx client (call from a worker thread)."""

    def __init__(self, *, timeout_s: float, tls: TlsPolicy | None = None,
                 min_rate_bytes_per_s: int = DEFAULT_MIN_RATE_BYTES_PER_S) -> None:
        """Raises ConfigError: ``tls.ca_file`` cannot be loaded."""
        self._client = httpx.Client(timeout=timeout_s,
                                    **_sync_client_options(tls or TlsPolicy()))
        self._timeout_s = timeout_s
        self._min_rate = min_rate_bytes_per_s
        self.bytes_received = 0

    def close(self) -> None:
        self._client.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        floor = _RateFloor(f"GET {url}", min_rate=self._min_rate, grace_s=self._timeout_s,
                           clock=time.monotonic)
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"GET {url}: {_describe(exc)}") from exc
        if response.status_code != 200:
            response.close()
            message = (_redirect_message("GET", url, response) if response.is_redirect
                       else f"GET {url}: HTTP {response.status_code}")
            raise tuf_exceptions.DownloadHTTPError(message, response.status_code)
        return self._stream(url, response, floor)

    def _stream(self, url: str, response: httpx.Response,
                floor: _RateFloor) -> Iterator[bytes]:
        received = 0
        try:
            # no chunk size: a block is whatever arrived, so the rate floor sees a trickle
            for block in response.iter_bytes():
                self.bytes_received += len(block)
                received += len(block)
                floor.check(received)
                yield block
        except httpx.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"GET {url}: {_describe(exc)}") from exc
        except DownloadFailed as exc:
            raise tuf_exceptions.DownloadError(str(exc)) from exc
        finally:
            response.close()


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

    def _signed(self, method: str, url: str, body: bytes) -> dict[str, str]:
        """The identity headers of ``METHOD url`` (none without an identity). The target
        signed is the one httpx sends: path and query as encoded on the wire."""
        if self.identity is None:
            return {}
        try:
            counter = self.identity.next_counter()
        except OSError as exc:
            raise DownloadFailed(f"{method} {url}: cannot reserve a request counter: "
                                 f"{exc}") from exc
        target = httpx.URL(url).raw_path
        return dict(self.identity.signer.headers(method, target, body, counter))

    async def get_tracker(self, url: str, *, max_bytes: int) -> tuple[int, bytes]:
        """A signed GET to the tracker (BitTorrent announce or scrape relayed for
        libtorrent): ``(HTTP status, body)`` whatever the status, the body at most
        ``max_bytes``. Not counted in :attr:`bytes_received` (origin bytes only).

        Raises:
            DownloadFailed: no answer, a redirect, or an answer over ``max_bytes``.
        """
        return await self._signed_exchange("GET", url, b"", {}, max_bytes)

    async def _signed_exchange(self, method: str, url: str, content: bytes,
                               headers: dict[str, str], max_bytes: int) -> tuple[int, bytes]:
        """One request to the tracker, signed when the client has an identity (signed
        requests go out one at a time, in counter order): ``(status, body)``, the body
        at most ``max_bytes``; redirects and transport errors are DownloadFailed."""
        what = f"{method} {url}"
        async with self._signing:  # the slow-retrieval deadline starts once it is our turn
            with self._deadline(what, max_bytes):
                try:
                    headers = {**headers, **self._signed(method, url, content)}
                    async with self._client.stream(method, url, content=content or None,
                                                   headers=headers) as response:
                        if response.is_redirect:
                            raise DownloadFailed(_redirect_message(method, url, response),
                                                 http_status=response.status_code)
                        out = bytearray()
                        floor = self._floor(what)
                        async for block in response.aiter_bytes():
                            out += block
                            if len(out) > max_bytes:
                                raise DownloadFailed(f"{what}: answer over {max_bytes} bytes")
                            floor.check(len(out))
                        return response.status_code, bytes(out)
                except httpx.HTTPError as exc:
                    raise DownloadFailed(f"{what}: {_describe(exc)}") from exc
            raise RuntimeError("unreachable: the deadline raises")  # pragma: no cover

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (what leaving ``async with`` does)."""
        await self._client.aclose()

    async def get_range(self, url: str, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` of ``url``, or raise DownloadFailed.

        Accepts 206 with a matching Content-Range, or a 200 from a server that ignores
        Range (then skips to ``offset``). Never reads more than needed.
        """
        headers = {"range": f"bytes={offset}-{offset + length - 1}"}
        what = f"GET {url} (range {offset}+{length})"
        with self._deadline(what, offset + length):
            try:
                async with self._client.stream("GET", url, headers=headers) as response:
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
                    return await self._read_exact(response, url, skip, length)
            except httpx.HTTPError as exc:
                raise DownloadFailed(f"{what}: {_describe(exc)}") from exc
        raise RuntimeError("unreachable: the deadline raises")  # pragma: no cover

    async def get_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """GET a whole small file (200 only), refusing answers over ``max_bytes``."""
        with self._deadline(f"GET {url}", max_bytes):
            try:
                async with self._client.stream("GET", url) as response:
                    if response.is_redirect:
                        raise DownloadFailed(_redirect_message("GET", url, response),
                                             http_status=response.status_code)
                    if response.status_code != 200:
                        raise DownloadFailed(f"GET {url}: HTTP {response.status_code}",
                                             http_status=response.status_code)
                    out = bytearray()
                    floor = self._floor(f"GET {url}")
                    async for block in response.aiter_raw():
                        self.bytes_received += len(block)
                        out += block
                        if len(out) > max_bytes:
                            raise DownloadFailed(f"GET {url}: more than {max_bytes} bytes")
                        floor.check(len(out))
                    return bytes(out)
            except httpx.HTTPError as exc:
                raise DownloadFailed(f"GET {url}: {_describe(exc)}") from exc
        raise RuntimeError("unreachable: the deadline raises")  # pragma: no cover

    def _floor(self, what: str) -> _RateFloor:
        return _RateFloor(what, min_rate=self.min_rate_bytes_per_s, grace_s=self.timeout_s,
                          clock=trio.current_time)

    @contextlib.contextmanager
    def _deadline(self, what: str, size: int) -> Iterator[None]:
        """Cancel the request inside after ``timeout_s`` plus ``size`` bytes at the floor
        rate (a server trickling its headers), raising DownloadFailed."""
        limit = _RateFloor.deadline_s(self.timeout_s, self.min_rate_bytes_per_s, size)
        with trio.move_on_after(limit) as scope:
            yield
        if scope.cancelled_caught:
            raise DownloadFailed(f"{what}: no complete answer within {limit:.0f} s "
                                 "(slow retrieval)")

    async def _read_exact(self, response: httpx.Response, url: str, skip: int,
                          length: int) -> bytes:
        """Read ``length`` bytes after skipping ``skip``; an answer cut short raises
        PartialResponse with what did arrive."""
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
                if len(out) >= length:  # anything beyond what was asked for is dropped
                    return bytes(out[:length])
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
