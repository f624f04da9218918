"""The httpx adapter of the device agent: the only peer module that imports httpx.

- :class:`TufFetcher`: python-tuf's network seam (``FetcherInterface``), blocking, used
  from a worker thread.
- :class:`HttpClient`: async requests for the agent: ranged payload reads with a hard
  byte limit, and small JSON POSTs to the tracker.

httpx errors become :class:`peer.errors.DownloadFailed`; a server that sends more bytes
than asked for (endless data) is cut at the limit and the read fails.
"""

from __future__ import annotations

import functools
import json
import re
import ssl
from collections.abc import Iterator
from typing import Any

import httpx
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from peer.errors import DownloadFailed

__all__ = ["MAX_JSON_RESPONSE_BYTES", "HttpClient", "TufFetcher"]

MAX_JSON_RESPONSE_BYTES = 64 * 1024
_READ_BLOCK = 64 * 1024
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_USER_AGENT = "swarmota-peer/0.1"


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The system's default verifying TLS context, built once: loading the CA bundle
    takes ~30 ms, and every update pass opens two clients. SSL contexts are safe to
    share between threads for client connections."""
    return ssl.create_default_context()


class TufFetcher(FetcherInterface):
    """python-tuf fetcher over a blocking httpx client (call from a worker thread)."""

    def __init__(self, *, timeout_s: float) -> None:
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False,
                                    headers={"user-agent": _USER_AGENT},
                                    verify=_tls_context())
        self.bytes_received = 0

    def close(self) -> None:
        self._client.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._client.send(self._client.build_request("GET", url), stream=True)
        except httpx.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"GET {url}: {exc}") from exc
        if response.status_code != 200:
            response.close()
            raise tuf_exceptions.DownloadHTTPError(f"GET {url}: HTTP {response.status_code}",
                                                   response.status_code)
        return self._stream(url, response)

    def _stream(self, url: str, response: httpx.Response) -> Iterator[bytes]:
        try:
            for block in response.iter_bytes(_READ_BLOCK):
                self.bytes_received += len(block)
                yield block
        except httpx.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"GET {url}: {exc}") from exc
        finally:
            response.close()


class HttpClient:
    """Async HTTP for the agent. Use as ``async with HttpClient(...) as http:``."""

    def __init__(self, *, timeout_s: float) -> None:
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False,
                                          headers={"user-agent": _USER_AGENT},
                                          verify=_tls_context())
        self.bytes_received = 0

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def get_range(self, url: str, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes at ``offset`` of ``url``, or raise DownloadFailed.

        Accepts 206 with a matching Content-Range, or a 200 from a server that ignores
        Range (then skips to ``offset``). Never reads more than needed.
        """
        headers = {"range": f"bytes={offset}-{offset + length - 1}"}
        try:
            async with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code == 206:
                    match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("content-range", ""))
                    if not match or int(match[1]) != offset or int(match[2]) != offset + length - 1:
                        raise DownloadFailed(f"GET {url}: bad Content-Range "
                                             f"{response.headers.get('content-range')!r}")
                    skip = 0
                elif response.status_code == 200:
                    skip = offset
                else:
                    raise DownloadFailed(f"GET {url} (range {offset}+{length}): "
                                         f"HTTP {response.status_code}")
                return await self._read_exact(response, url, skip, length)
        except httpx.HTTPError as exc:
            raise DownloadFailed(f"GET {url} (range {offset}+{length}): {exc}") from exc

    async def get_bytes(self, url: str, *, max_bytes: int) -> bytes:
        """GET a whole small file (200 only), refusing answers over ``max_bytes``."""
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise DownloadFailed(f"GET {url}: HTTP {response.status_code}",
                                         http_status=response.status_code)
                out = bytearray()
                async for block in response.aiter_raw(_READ_BLOCK):
                    self.bytes_received += len(block)
                    out += block
                    if len(out) > max_bytes:
                        raise DownloadFailed(f"GET {url}: more than {max_bytes} bytes")
                return bytes(out)
        except httpx.HTTPError as exc:
            raise DownloadFailed(f"GET {url}: {exc}") from exc

    async def _read_exact(self, response: httpx.Response, url: str, skip: int,
                          length: int) -> bytes:
        out = bytearray()
        async for block in response.aiter_raw(_READ_BLOCK):
            self.bytes_received += len(block)
            if skip:
                dropped = min(skip, len(block))
                block = block[dropped:]
                skip -= dropped
            out += block
            if len(out) >= length:  # anything beyond what was asked for is dropped
                return bytes(out[:length])
        raise DownloadFailed(f"GET {url}: connection closed after {len(out)} of {length} bytes")

    async def post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON, return the (size-limited) JSON object answer."""
        try:
            async with self._client.stream("POST", url, json=body) as response:
                data = bytearray()
                async for block in response.aiter_bytes(_READ_BLOCK):
                    data += block
                    if len(data) > MAX_JSON_RESPONSE_BYTES:
                        raise DownloadFailed(f"POST {url}: answer over "
                                             f"{MAX_JSON_RESPONSE_BYTES} bytes")
                status = response.status_code
        except httpx.HTTPError as exc:
            raise DownloadFailed(f"POST {url}: {exc}") from exc
        try:
            answer = json.loads(bytes(data))
        except ValueError:
            answer = None
        if status != 200:
            detail = answer.get("error") if isinstance(answer, dict) else data[:200].decode(
                errors="replace")
            raise DownloadFailed(f"POST {url}: HTTP {status}: {detail}", http_status=status)
        if not isinstance(answer, dict):
            raise DownloadFailed(f"POST {url}: answer is not a JSON object")
        return answer
