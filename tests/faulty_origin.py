"""A misbehaving origin for the attack tests: the real published origin tree (the real
:class:`seeder.origin.OriginApp`), with faults injected into chosen requests.

Test-only. Wrap the app, add :class:`Fault` rules, serve it on loopback with
:func:`serve_faulty`; a device pointed at its URL sees the genuine, signed files, except
where a rule says otherwise:

- ``status``: answer with an HTTP error (e.g. 503) instead of the file;
- ``reset``: send the headers and the first ``after_bytes`` bytes, then drop the
  connection (the ASGI app fails mid-body: hypercorn aborts it);
- ``ignore_range``: drop the Range header, so the whole file comes back as a 200;
- ``trickle``: the real answer, ``step_bytes`` every ``interval_s`` (slow retrieval);
- ``stall``: the headers (and ``after_bytes`` bytes of the body), then nothing, forever;
- ``endless``: a 200 (206 with the asked Content-Range for a Range request) without a
  length, streaming bytes until the client goes away (endless data);
- ``redirect``: a 302 to ``location``;
- ``bomb``: a 200 (206 for a Range request) whose body is a compression bomb: a few KiB
  on the wire, ``bomb_bytes`` of zeros once decoded, sent with ``Content-Encoding:
  <encoding>`` (``gzip``, ``deflate`` or ``zstd``) whatever the client asked for.

Each rule applies to requests whose path contains ``path_part`` (is ``/path_part`` with
``exact``), at most ``times`` times (None: always); :attr:`Fault.hits` counts the
requests each rule took.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import trio
import zstandard

from swarmota.infra.http_serve import ListenConfig, serve_asgi

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

FAULTS = ("status", "reset", "ignore_range", "trickle", "stall", "endless", "redirect", "bomb")
ENCODINGS = ("gzip", "deflate", "zstd")


def compression_bomb(encoding: str, decoded_bytes: int) -> bytes:
    """``decoded_bytes`` zeros compressed with ``encoding`` (as HTTP names it), built
    1 MiB at a time (the zeros are never in memory at once)."""
    block = bytes(1 << 20)
    blocks, rest = divmod(decoded_bytes, len(block))
    if encoding == "zstd":
        out = io.BytesIO()
        with zstandard.ZstdCompressor(level=19).stream_writer(out, closefd=False) as writer:
            for _ in range(blocks):
                writer.write(block)
            writer.write(block[:rest])
        return out.getvalue()
    if encoding not in ("gzip", "deflate"):
        raise ValueError(f"unknown encoding {encoding!r}")
    # gzip: a gzip header and trailer; deflate (as HTTP means it): a zlib stream
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    parts = [packer.compress(block) for _ in range(blocks)]
    return b"".join([*parts, packer.compress(block[:rest]), packer.flush()])


class _Reset(Exception):
    """Raised inside the app to make hypercorn drop a connection mid-body."""


@dataclass
class Fault:
    kind: str
    path_part: str = ""
    times: int | None = None
    status: int = 503
    after_bytes: int = 0
    step_bytes: int = 16
    interval_s: float = 0.2
    ranged: bool = True  # endless: a 206 with the asked range (else always a 200)
    exact: bool = False
    location: str = ""
    encoding: str = "zstd"  # bomb
    bomb_bytes: int = 64 << 20  # bomb
    hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"unknown fault {self.kind!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}")

    def takes(self, path: str) -> bool:
        matches = path == "/" + self.path_part if self.exact else self.path_part in path
        if not matches or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


class FaultyOrigin:
    """ASGI wrapper around the real origin app; see the module docstring."""

    def __init__(self, inner: App) -> None:
        self.inner = inner
        self.faults: list[Fault] = []
        self.requests: list[str] = []
        self.endless_bytes_sent = 0
        self.accept_encodings: list[str] = []  # Accept-Encoding of every request ("" if none)
        self._bombs: dict[tuple[str, int], bytes] = {}

    def add(self, fault: Fault) -> Fault:
        if fault.kind == "bomb":  # built now: the answer's head must not wait for it
            key = (fault.encoding, fault.bomb_bytes)
            self._bombs.setdefault(key, compression_bomb(*key))
        self.faults.append(fault)
        return fault

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        path: str = scope["path"]
        self.requests.append(path)
        self.accept_encodings.append(next(
            (v.decode() for k, v in scope["headers"] if k.lower() == b"accept-encoding"), ""))
        fault = next((f for f in self.faults if f.takes(path)), None)
        if fault is None:
            await self.inner(scope, receive, send)
        elif fault.kind == "status":
            await send({"type": "http.response.start", "status": fault.status,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"injected fault"})
        elif fault.kind == "redirect":
            await send({"type": "http.response.start", "status": 302,
                        "headers": [(b"location", fault.location.encode())]})
            await send({"type": "http.response.body", "body": b""})
        elif fault.kind == "ignore_range":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
            await self.inner({**scope, "headers": headers}, receive, send)
        elif fault.kind == "endless":
            await self._endless(scope, receive, send, fault)
        elif fault.kind == "bomb":
            await self._bomb(scope, send, fault)
        else:
            await self.inner(scope, receive, _Mangler(fault, send))

    async def _bomb(self, scope: Scope, send: Send, fault: Fault) -> None:
        body = self._bombs[(fault.encoding, fault.bomb_bytes)]
        ranged = any(k.lower() == b"range" for k, _ in scope["headers"])
        headers = [(b"content-type", b"application/octet-stream"),
                   (b"content-encoding", fault.encoding.encode()),
                   (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 206 if ranged else 200,
                    "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _endless(self, scope: Scope, receive: Receive, send: Send, fault: Fault) -> None:
        ranged = next((v.decode() for k, v in scope["headers"] if k.lower() == b"range"), None)
        headers = [(b"content-type", b"application/octet-stream")]
        status = 200
        if fault.ranged and ranged is not None and ranged.startswith("bytes="):
            first, _, last = ranged[len("bytes="):].partition("-")
            status = 206
            headers.append((b"content-range", f"bytes {first}-{last}/*".encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        block = b"\x00" * 65536
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            # bounded anyway, so a client that never hangs up cannot fill this process
            for _ in range(16384):  # 1 GiB
                await send({"type": "http.response.body", "body": block, "more_body": True})
                self.endless_bytes_sent += len(block)
                await trio.sleep(0)
            nursery.cancel_scope.cancel()


class _Mangler:
    """The ``send`` of a faulty answer: trickles, stalls or resets the body."""

    def __init__(self, fault: Fault, send: Send) -> None:
        self.fault = fault
        self.send = send
        self.sent = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        fault, body = self.fault, bytes(message.get("body", b""))
        more = bool(message.get("more_body"))
        if fault.kind in ("reset", "stall"):
            room = max(0, fault.after_bytes - self.sent)
            if len(body) < room or (not body and more):
                self.sent += len(body)
                await self.send(message)
                return
            if room:
                await self.send({"type": "http.response.body", "body": body[:room],
                                 "more_body": True})
                self.sent += room
            if fault.kind == "stall":
                await trio.sleep_forever()
            raise _Reset(f"injected connection reset after {self.sent} bytes")
        # trickle
        for start in range(0, len(body), fault.step_bytes):
            await self.send({"type": "http.response.body",
                             "body": body[start:start + fault.step_bytes], "more_body": True})
            await trio.sleep(fault.interval_s)
        if not more:
            await self.send({"type": "http.response.body", "body": b""})


async def serve_faulty(nursery: trio.Nursery, inner: App) -> tuple[FaultyOrigin, str]:
    """Serve ``FaultyOrigin(inner)`` on 127.0.0.1; return it and its base URL."""
    origin = FaultyOrigin(inner)
    url: str = await nursery.start(serve_asgi, origin, ListenConfig())
    return origin, url


class SlowHead:
    """A raw HTTP/1.1 server (no ASGI: hypercorn sends a head at once) that reads each
    request head and answers it one byte of its head every ``interval_s``, forever (a
    valid head, never finished): slow headers. :attr:`requests` counts the heads read,
    :attr:`bytes_sent` the bytes trickled; each connection stops after ``max_s``."""

    def __init__(self, interval_s: float = 0.2, max_s: float = 120.0) -> None:
        self.interval_s = interval_s
        self.max_s = max_s
        self.requests = 0
        self.bytes_sent = 0

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(f"http://127.0.0.1:{port}")

    async def _handle(self, stream: trio.SocketStream) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + b"x-pad: " + \
            b"a" * 100_000
        with trio.move_on_after(self.max_s):
            async with stream:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = await stream.receive_some(4096)
                    if not more:
                        return
                    data += more
                self.requests += 1
                for byte in head:
                    try:
                        await stream.send_all(bytes([byte]))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    self.bytes_sent += 1
                    await trio.sleep(self.interval_s)
