"""A fake BitTorrent peer for tests: BEP 3 peer wire over TCP, BEP 52 (v2) handshakes.

Not a test file: a helper the swarm tests start on a loopback address to play a peer
that misbehaves in a controlled way. Standard library only; one listening socket served
by a background thread, one thread per accepted connection.

Modes (:class:`Mode`):

- ``LIAR``: handshake, a bitfield claiming every piece, unchoke, then every
  ``request(index, begin, length)`` is answered with ``piece(index, begin, <length
  garbage bytes>)``.
- ``SILENT``: handshake and the same bitfield, then nothing: never unchokes, never sends
  data, answers keep-alives with keep-alives and keeps the connection open.
- ``TEASE``: handshake, the bitfield, unchoke, then nothing: requests are taken and
  never answered (uncooperative after unchoking).
- ``SLOW``: like ``LIAR`` but trickles each block at ``slow_bytes_per_s``, with the real
  bytes of ``payload`` when given (an honest but very slow peer), garbage otherwise.

In every mode a v2 ``hash request`` (id 21) gets a ``hash reject`` (id 23) echoing its
fields. The fake sets the v2 bit (``reserved[7] & 0x10``) and no other reserved bit: no
extension protocol (BEP 10), no fast extension (BEP 6), so no ``have all``/``reject``.

It only accepts connections (``SwarmSession.connect_peer``), never dials out, and
speaks plaintext only: libtorrent's first, encrypted (MSE/PE) attempt fails the
handshake check, the fake hangs up, and libtorrent retries in plaintext (expect one
``bad_handshakes`` per leecher). Each fake gets a random peer id unless given one:
libtorrent drops a second connection with a peer id it already has. Counters
(:class:`FakePeerStats`) are read under a lock and can be polled while it runs.
"""

from __future__ import annotations

import contextlib
import enum
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "HANDSHAKE_LEN",
    "PROTOCOL",
    "RESERVED_V2",
    "FakeBtPeer",
    "FakePeerStats",
    "Mode",
    "MsgId",
    "bitfield_payload",
    "encode_handshake",
    "encode_message",
    "parse_handshake",
]

PROTOCOL: Final = b"\x13BitTorrent protocol"
HANDSHAKE_LEN: Final = len(PROTOCOL) + 8 + 20 + 20  # 68
# BEP 52: "the fourth most significant bit in the last byte of the reserved bytes"
RESERVED_V2: Final = bytes([0, 0, 0, 0, 0, 0, 0, 0x10])
_MAX_MESSAGE_BYTES: Final = 1 << 20  # a piece message carries at most one 16 KiB block
_POLL_S: Final = 0.1  # how often blocked socket calls look at the stop flag


class MsgId(enum.IntEnum):
    CHOKE = 0
    UNCHOKE = 1
    INTERESTED = 2
    NOT_INTERESTED = 3
    HAVE = 4
    BITFIELD = 5
    REQUEST = 6
    PIECE = 7
    CANCEL = 8
    EXTENDED = 20  # BEP 10; never sent to us since we do not set reserved[5] & 0x10
    HASH_REQUEST = 21  # BEP 52
    HASHES = 22
    HASH_REJECT = 23


class Mode(enum.Enum):
    LIAR = "liar"
    SILENT = "silent"
    SLOW = "slow"
    TEASE = "tease"


def encode_handshake(info_hash: bytes, peer_id: bytes,
                     reserved: bytes = RESERVED_V2) -> bytes:
    """``\\x13BitTorrent protocol`` + 8 reserved bytes + info-hash + peer id (68 bytes).

    For a v2 torrent ``info_hash`` is the SHA-256 info-hash truncated to 20 bytes."""
    if len(info_hash) != 20 or len(peer_id) != 20 or len(reserved) != 8:
        raise ValueError("info_hash and peer_id take 20 bytes, reserved 8")
    return PROTOCOL + reserved + info_hash + peer_id


def parse_handshake(data: bytes) -> tuple[bytes, bytes, bytes]:
    """-> ``(reserved, info_hash, peer_id)``; ValueError if not a BitTorrent handshake."""
    if len(data) != HANDSHAKE_LEN or not data.startswith(PROTOCOL):
        raise ValueError(f"not a BitTorrent handshake: {data[:28]!r}")
    body = data[len(PROTOCOL):]
    return body[:8], body[8:28], body[28:48]


def encode_message(msg_id: int, payload: bytes = b"") -> bytes:
    """A length-prefixed message: 4-byte big-endian length, 1-byte id, payload."""
    return struct.pack(">IB", 1 + len(payload), msg_id) + payload


def bitfield_payload(num_pieces: int) -> bytes:
    """A bitfield with every piece set (high bit first) and the spare bits clear."""
    full, rest = divmod(num_pieces, 8)
    tail = bytes([(0xFF << (8 - rest)) & 0xFF]) if rest else b""
    return b"\xff" * full + tail


@dataclass(frozen=True)
class FakePeerStats:
    """Counters since :meth:`FakeBtPeer.start`.

    ``connections`` counts accepted TCP connections, ``handshakes`` those that sent a
    valid handshake for our info-hash; ``closed_by_remote`` those the other side closed
    (or reset). ``bytes_sent`` counts every byte written, ``piece_bytes_sent`` only the
    block data in ``piece`` messages. ``remote_reserved`` lists the reserved bytes of
    each handshake received, ``remote_peer_ids`` the peer ids.
    """

    connections: int
    open_connections: int
    handshakes: int
    bad_handshakes: int
    closed_by_remote: int
    bytes_sent: int
    piece_bytes_sent: int
    pieces_sent: int
    requests: int
    hash_requests: int
    messages: dict[int, int]
    remote_reserved: tuple[bytes, ...]
    remote_peer_ids: tuple[bytes, ...]
    remote_addresses: tuple[tuple[str, int], ...]


@dataclass
class _Counters:
    connections: int = 0
    open_connections: int = 0
    handshakes: int = 0
    bad_handshakes: int = 0
    closed_by_remote: int = 0
    bytes_sent: int = 0
    piece_bytes_sent: int = 0
    pieces_sent: int = 0
    requests: int = 0
    hash_requests: int = 0
    messages: dict[int, int] = field(default_factory=dict)
    remote_reserved: list[bytes] = field(default_factory=list)
    remote_peer_ids: list[bytes] = field(default_factory=list)
    remote_addresses: list[tuple[str, int]] = field(default_factory=list)


class _Closed(Exception):
    """The connection ended: closed by the remote side, or we are stopping."""

    def __init__(self, by_remote: bool) -> None:
        super().__init__("closed by remote" if by_remote else "stopping")
        self.by_remote = by_remote


class FakeBtPeer:
    """A fake peer of one torrent, listening on ``host`` (a loopback address).

    ``info_hash``: the 20 bytes on the wire (a v2 torrent's truncated SHA-256
    info-hash); ``num_pieces``: how many pieces the bitfield claims. Use as a context
    manager, or :meth:`start` (returns the bound port) and :meth:`stop`.
    """

    def __init__(
        self,
        info_hash: bytes,
        num_pieces: int,
        *,
        mode: Mode,
        host: str = "127.0.0.4",
        port: int = 0,
        peer_id: bytes | None = None,
        reserved: bytes = RESERVED_V2,
        payload: bytes | None = None,
        piece_size_bytes: int = 0,
        slow_bytes_per_s: int = 1024,
        garbage_seed: int = 0x5EED,
    ) -> None:
        if peer_id is None:  # unique: libtorrent drops a second peer with the same id
            peer_id = b"-FK0001-" + os.urandom(6).hex().encode()
        if len(info_hash) != 20 or len(peer_id) != 20:
            raise ValueError("info_hash and peer_id take 20 bytes")
        if num_pieces <= 0:
            raise ValueError("num_pieces must be positive")
        if payload is not None and piece_size_bytes <= 0:
            raise ValueError("payload needs piece_size_bytes")
        if slow_bytes_per_s <= 0:
            raise ValueError("slow_bytes_per_s must be positive")
        self.info_hash = info_hash
        self.num_pieces = num_pieces
        self.mode = mode
        self.host = host
        self.peer_id = peer_id
        self.reserved = reserved
        self._requested_port = port
        self._payload = payload
        self._piece_size = piece_size_bytes
        self._slow_bytes_per_s = slow_bytes_per_s
        self._rng = random.Random(garbage_seed)
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Listen and serve in the background; return the bound port."""
        if self._listener is not None:
            raise RuntimeError("already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self._requested_port))
        listener.listen(16)
        listener.settimeout(_POLL_S)
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop, "fake-bt-accept")
        return self.port

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the listener and every connection; join the threads. Idempotent."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        if self._threads:  # the accept loop first: then no connection thread starts
            self._threads[0].join(timeout_s)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"fake peer threads did not stop: {alive}")

    def __enter__(self) -> FakeBtPeer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def stats(self) -> FakePeerStats:
        with self._lock:
            c = self._counters
            return FakePeerStats(
                connections=c.connections, open_connections=c.open_connections,
                handshakes=c.handshakes, bad_handshakes=c.bad_handshakes,
                closed_by_remote=c.closed_by_remote,
                bytes_sent=c.bytes_sent, piece_bytes_sent=c.piece_bytes_sent,
                pieces_sent=c.pieces_sent, requests=c.requests,
                hash_requests=c.hash_requests, messages=dict(c.messages),
                remote_reserved=tuple(c.remote_reserved),
                remote_peer_ids=tuple(c.remote_peer_ids),
                remote_addresses=tuple(c.remote_addresses))

    # ------------------------------------------------------------------ threads

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                conn, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(_POLL_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._counters.connections += 1
                self._counters.open_connections += 1
                self._counters.remote_addresses.append((str(addr[0]), int(addr[1])))
                self._conns.add(conn)
                number = self._counters.connections
            self._spawn(self._serve, f"fake-bt-conn-{number}", conn)

    def _serve(self, conn: socket.socket) -> None:
        by_remote = False
        try:
            self._session(conn)
        except _Closed as closed:
            by_remote = closed.by_remote
        except OSError:  # reset by peer, or shut down by stop()
            by_remote = not self._stop.is_set()
        except ValueError:  # protocol violation or wrong info-hash: hang up
            by_remote = False
        finally:
            with self._lock:
                self._counters.open_connections -= 1
                if by_remote:
                    self._counters.closed_by_remote += 1
                self._conns.discard(conn)
            conn.close()

    # ------------------------------------------------------------------ protocol

    def _session(self, conn: socket.socket) -> None:
        try:
            reserved, info_hash, peer_id = parse_handshake(
                self._recv_exact(conn, HANDSHAKE_LEN))
            if info_hash != self.info_hash:
                raise ValueError("handshake for another torrent")
        except ValueError:
            with self._lock:
                self._counters.bad_handshakes += 1
            raise
        with self._lock:
            self._counters.handshakes += 1
            self._counters.remote_reserved.append(reserved)
            self._counters.remote_peer_ids.append(peer_id)
        self._send(conn, encode_handshake(self.info_hash, self.peer_id, self.reserved))
        self._send(conn, encode_message(MsgId.BITFIELD, bitfield_payload(self.num_pieces)))
        if self.mode is not Mode.SILENT:
            self._send(conn, encode_message(MsgId.UNCHOKE))
        while True:
            (length,) = struct.unpack(">I", self._recv_exact(conn, 4))
            if length == 0:  # keep-alive
                self._send(conn, b"\0\0\0\0")
                continue
            if length > _MAX_MESSAGE_BYTES:
                raise ValueError(f"message of {length} bytes")
            body = self._recv_exact(conn, length)
            msg_id, payload = body[0], body[1:]
            with self._lock:
                self._counters.messages[msg_id] = self._counters.messages.get(msg_id, 0) + 1
            if msg_id == MsgId.REQUEST and len(payload) == 12:
                with self._lock:
                    self._counters.requests += 1
                if self.mode not in (Mode.SILENT, Mode.TEASE):
                    index, begin, size = struct.unpack(">III", payload)
                    self._answer_request(conn, index, begin, size)
            elif msg_id == MsgId.HASH_REQUEST:
                with self._lock:
                    self._counters.hash_requests += 1
                self._send(conn, encode_message(MsgId.HASH_REJECT, payload))

    def _answer_request(self, conn: socket.socket, index: int, begin: int, size: int) -> None:
        if size > _MAX_MESSAGE_BYTES:
            raise ValueError(f"request for {size} bytes")
        block = self._block(index, begin, size)
        header = struct.pack(">IBII", 9 + size, MsgId.PIECE, index, begin)
        if self.mode is Mode.LIAR:
            self._send(conn, header + block)
        else:  # SLOW: trickle, a small chunk at a time
            self._send(conn, header)
            chunk = max(1, self._slow_bytes_per_s // 10)
            for offset in range(0, size, chunk):
                if self._stop.wait(chunk / self._slow_bytes_per_s):
                    raise _Closed(by_remote=False)
                self._send(conn, block[offset:offset + chunk])
        with self._lock:
            self._counters.piece_bytes_sent += size
            self._counters.pieces_sent += 1

    def _block(self, index: int, begin: int, size: int) -> bytes:
        if self._payload is not None and self.mode is Mode.SLOW:
            start = index * self._piece_size + begin
            real = self._payload[start:start + size]
            if len(real) == size:
                return real
        with self._lock:
            return self._rng.randbytes(size)

    def _send(self, conn: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._stop.is_set():
                raise _Closed(by_remote=False)
            try:
                sent = conn.send(view)
            except TimeoutError:
                continue
            view = view[sent:]
            with self._lock:
                self._counters.bytes_sent += sent

    def _recv_exact(self, conn: socket.socket, size: int) -> bytes:
        parts: list[bytes] = []
        missing = size
        while missing:
            if self._stop.is_set():
                raise _Closed(by_remote=False)
            try:
                chunk = conn.recv(missing)
            except TimeoutError:
                continue
            if not chunk:
                raise _Closed(by_remote=True)
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)
