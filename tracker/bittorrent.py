"""The BitTorrent HTTP tracker protocol as values: query parsing, bencoded answers. Pure.

No I/O: query strings arrive as bytes (ASGI ``scope["query_string"]``) with a size
limit and leave as frozen dataclasses, or raise :class:`~tracker.errors.RequestError`
whose message is the ``failure reason`` to send back (bencoded, HTTP 200, as clients
expect). Answers are bencoded here with a tiny encoder (libtorrent is not imported
outside ``peer/swarm.py``).

Announce (BEP 3, BEP 23 compact peers, BEP 7 ``peers6``), ``GET /announce?...``:

- ``info_hash`` and ``peer_id``: exactly 20 raw bytes each, percent-encoded. For our v2
  torrents the announced info-hash is the SHA-256 v2 info-hash truncated to 20 bytes.
- ``port`` 1..65535; ``uploaded``, ``downloaded``, ``left``: decimal integers
  0..2**63-1 (``uploaded``/``downloaded`` default to 0; ``left`` is required: 0 means
  seed).
- ``event``: ``started``, ``completed``, ``stopped``, empty or absent.
- ``compact``: ``1`` (default) or ``0``; ``no_peer_id``: ``0``/``1``.
- ``numwant``: default :data:`DEFAULT_NUMWANT`, clamped to :data:`MAX_NUMWANT`.
- ``key``: optional, at most 64 bytes, kept but unused.
- ``device_id``: optional, our extension: the announcing device's id (the one it checks
  in with, ``[A-Za-z0-9._:-]{1,128}``). Devices add it to the tracker URL
  (``/announce?device_id=...``; clients append their parameters with ``&``). The
  tracker uses it to let the swarm follow the rollout and to hand out LAN peers first.
- the ``ip`` parameter (and ``ipv4``/``ipv6``) is ignored: a peer's address is always
  the connection's remote address.

Known parameters may appear once; unknown parameters (clients send many: ``corrupt``,
``redundant``, ``supportcrypto``, ``trackerid`` ...) are ignored. Percent escapes must be
well formed (``%`` + two hex digits); ``+`` is a literal plus.

Scrape (BEP 48), ``GET /scrape?info_hash=...`` (1..:data:`MAX_SCRAPE_HASHES` times):
``{"files": {info_hash: {"complete", "downloaded", "incomplete"}}}`` for the known ones.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Final

from swarmota.tracker.errors import RequestError
from swarmota.tracker.wire import DEVICE_ID_RE, failure_reason

__all__ = [
    "ANNOUNCE_HASH_BYTES",
    "V2_INFO_HASH_BYTES",
    "DEFAULT_NUMWANT",
    "EVENTS",
    "MAX_NUMWANT",
    "MAX_QUERY_BYTES",
    "MAX_SCRAPE_HASHES",
    "AnnounceRequest",
    "HandedPeer",
    "PeerAddress",
    "ScrapeCounts",
    "ScrapeRequest",
    "SwarmInfo",
    "announce_answer",
    "bencode",
    "failure_answer",
    "parse_announce",
    "parse_scrape",
    "peer_address",
    "scrape_answer",
    "shown",
]

ANNOUNCE_HASH_BYTES: Final = 20
V2_INFO_HASH_BYTES: Final = 32
PEER_ID_BYTES: Final = 20
DEFAULT_NUMWANT: Final = 50
MAX_NUMWANT: Final = 200
MAX_SCRAPE_HASHES: Final = 64
MAX_QUERY_BYTES: Final = 8 * 1024
MAX_KEY_BYTES: Final = 64
MAX_TRANSFER_COUNT: Final = 2**63 - 1
EVENTS: Final = ("", "started", "completed", "stopped")
PAYLOAD_KINDS: Final = ("full", "delta")

_INFO_HASH_RE: Final = re.compile(r"[0-9a-f]{64}")
_BAD_ESCAPE_RE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SwarmInfo:
    """A swarm the tracker serves: one payload of one registered release.

    ``info_hash`` is the payload torrent's full SHA-256 v2 info-hash (64 lowercase hex
    characters); clients announce :attr:`announce_hash`, its first 20 bytes.
    ``payload_kind`` is the manifest payload's ``kind`` (``full`` or ``delta``).

    Raises:
        RequestError: a malformed info-hash or kind.
    """

    info_hash: str
    product: str
    version: str
    payload_kind: str

    def __post_init__(self) -> None:
        if not isinstance(self.info_hash, str) or not _INFO_HASH_RE.fullmatch(self.info_hash):
            raise RequestError(f"swarm: info_hash must be 64 lowercase hex characters, "
                               f"got {self.info_hash!r:.80}")
        if self.payload_kind not in PAYLOAD_KINDS:
            raise RequestError(f"swarm: payload kind must be one of {PAYLOAD_KINDS}, "
                               f"got {self.payload_kind!r:.40}")

    @property
    def announce_hash(self) -> bytes:
        """The 20 bytes clients announce (the v2 info-hash truncated)."""
        return bytes.fromhex(self.info_hash)[:ANNOUNCE_HASH_BYTES]


@dataclass(frozen=True)
class PeerAddress:
    """Where a peer listens: a normalised IP (IPv4-mapped IPv6 becomes IPv4) and port."""

    ip: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.ip

    @functools.cached_property
    def compact(self) -> bytes:
        """BEP 23 / BEP 7: packed address then big-endian port (6 or 18 bytes)."""
        return ipaddress.ip_address(self.ip).packed + self.port.to_bytes(2, "big")


@dataclass(frozen=True)
class HandedPeer:
    """A peer handed out in an announce answer; ``compact``: its address in the
    compact form (:attr:`PeerAddress.compact`), computed once (registries keep a
    peer's :class:`HandedPeer` and hand it out many times)."""

    address: PeerAddress
    peer_id: bytes
    compact: bytes = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compact", self.address.compact)


@dataclass(frozen=True)
class AnnounceRequest:
    """One parsed announce. ``numwant`` is already clamped to 0..MAX_NUMWANT."""

    announce_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int
    downloaded: int
    left: int
    event: str
    compact: bool
    no_peer_id: bool
    numwant: int
    key: bytes | None
    device_id: str | None = None

    @property
    def is_seed(self) -> bool:
        return self.left == 0


@dataclass(frozen=True)
class ScrapeRequest:
    """One parsed scrape: the announce hashes asked about, without duplicates, in order."""

    announce_hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class ScrapeCounts:
    """BEP 48 counters of one swarm."""

    complete: int
    downloaded: int
    incomplete: int


# --- parsing --------------------------------------------------------------------------


def peer_address(client: Sequence[object] | None, port: int) -> PeerAddress:
    """The announcing peer's address: the connection's remote IP and the announced port.

    ``client`` is the ASGI ``scope["client"]`` (``(host, port)`` or ``None``).

    Raises:
        RequestError: no remote address, or one that is not an IP address.
    """
    if not client:
        raise RequestError("cannot tell the peer's address")
    ip = _normalised_ip(str(client[0]))
    if ip is None:
        raise RequestError("the peer's address is not an IP address")
    return PeerAddress(ip, port)


@functools.lru_cache(maxsize=4096)
def _normalised_ip(text: str) -> str | None:
    """``text`` as a normalised IP (IPv4-mapped IPv6 as IPv4), ``None`` if not an IP.
    Cached: a tracker sees the same addresses again every interval."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _checked(query: bytes, max_bytes: int) -> bool:
    """Whether ``query`` holds percent-escapes, once its size and escapes are checked.

    Raises:
        RequestError: a query over ``max_bytes``, or a malformed escape.
    """
    if len(query) > max_bytes:
        raise RequestError(f"query string of {len(query)} bytes is over the limit of "
                           f"{max_bytes} bytes")
    escaped = b"%" in query
    if escaped and _BAD_ESCAPE_RE.search(query):  # once for all parts: "&" is no hex digit
        raise RequestError("malformed percent-escape in the query string")
    return escaped


def _unquote(raw: bytes) -> bytes:
    """Percent-decode ``raw`` (escapes already checked); ``+`` stays a plus."""
    if b"%" not in raw:
        return raw
    pieces = raw.split(b"%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        out.append(_HEX_BYTE[piece[:2]])
        out.append(piece[2:])
    return b"".join(out)


_HEX_BYTE: Final = {(a + b).encode(): bytes([int(a + b, 16)])
                    for a in "0123456789abcdefABCDEF" for b in "0123456789abcdefABCDEF"}


def _hash20(value: bytes, name: str) -> bytes:
    if len(value) != ANNOUNCE_HASH_BYTES:
        raise RequestError(f"{name} must be {ANNOUNCE_HASH_BYTES} bytes, got {len(value)}")
    return value


def _info_hash(value: bytes) -> bytes:
    """The 20-byte announce form of an ``info_hash``: as given, or the truncation of a
    full 32-byte v2 info-hash (BEP 52 clients announce the truncation; some send the
    whole SHA-256)."""
    if len(value) == V2_INFO_HASH_BYTES:
        return value[:ANNOUNCE_HASH_BYTES]
    if len(value) != ANNOUNCE_HASH_BYTES:
        raise RequestError(f"info_hash must be {ANNOUNCE_HASH_BYTES} bytes (or a "
                           f"{V2_INFO_HASH_BYTES}-byte v2 info-hash), got {len(value)}")
    return value


def shown(raw: bytes | str, limit: int = 24) -> str:
    """Untrusted query bytes for a failure reason: quoted, at most ``limit`` bytes,
    printable ASCII as is and anything else percent-escaped (never a Python repr)."""
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'%"' else f"%{b:02X}"
                   for b in data[:limit])
    return f'"{text}"' + ("..." if len(data) > limit else "")


_ANNOUNCE_PARAMS: Final = ("info_hash", "peer_id", "port", "uploaded", "downloaded", "left",
                           "event", "compact", "no_peer_id", "numwant", "key", "device_id")
_DEVICE_ID_RE: Final = re.compile(DEVICE_ID_RE.pattern.encode("ascii"))


_ANNOUNCE_NAMES: Final = frozenset(name.encode("ascii") for name in _ANNOUNCE_PARAMS)


def parse_announce(query: bytes, *, max_bytes: int = MAX_QUERY_BYTES) -> AnnounceRequest:
    """Parse an announce query string (the bytes after ``?``).

    The tracker's hot path, so written out in one pass: known names are looked up
    as raw bytes (percent-decoded only when they hold a ``%``), values are decoded
    only when they hold one, and nothing is built per unknown parameter. Tests hold
    it to the straightforward parser it replaced (split into a dict of lists, then
    one helper per check) on generated queries: same values, same ``failure reason``.

    Raises:
        RequestError: the ``failure reason``: a missing or malformed parameter, a
            repeated known parameter, or a query over ``max_bytes``.
    """
    escaped = _checked(query, max_bytes)
    found: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name not in _ANNOUNCE_NAMES:
            if not escaped or b"%" not in name:
                continue
            name = _unquote(name)
            if name not in _ANNOUNCE_NAMES:
                continue
        if name in found:
            raise RequestError(f"{name.decode('ascii')} given more than once")
        found[name] = value if not escaped or b"%" not in value else _unquote(value)
    get = found.get
    info_hash = get(b"info_hash")
    if info_hash is None:
        raise RequestError("missing info_hash")
    peer_id = get(b"peer_id")
    if peer_id is None:
        raise RequestError("missing peer_id")
    raw_port = get(b"port")
    if raw_port is None:
        raise RequestError("missing port")
    port = _number(raw_port, "port", 65535)
    if port == 0:
        raise RequestError("port must be within 1..65535, got 0")
    raw_event = get(b"event")
    event = "" if raw_event is None else raw_event.decode("latin-1")
    if event not in EVENTS:
        raise RequestError(f"event must be started, completed, stopped or empty, "
                           f"got {shown(event)}")
    key = get(b"key")
    if key is not None and len(key) > MAX_KEY_BYTES:
        raise RequestError(f"key must be at most {MAX_KEY_BYTES} bytes")
    raw = get(b"numwant")
    numwant = DEFAULT_NUMWANT if raw is None else min(_number(raw, "numwant"), MAX_NUMWANT)
    device_id = get(b"device_id")
    if device_id is not None and not _DEVICE_ID_RE.fullmatch(device_id):
        raise RequestError("device_id must be 1-128 chars of A-Z a-z 0-9 . _ : -")
    announce_hash = _info_hash(info_hash)
    _hash20(peer_id, "peer_id")
    raw = get(b"uploaded")
    uploaded = 0 if raw is None else _number(raw, "uploaded")
    raw = get(b"downloaded")
    downloaded = 0 if raw is None else _number(raw, "downloaded")
    raw = get(b"left")
    if raw is None:
        raise RequestError("missing left")
    left = _number(raw, "left")
    raw = get(b"compact")
    compact = raw is None or _bit(raw, "compact")
    raw = get(b"no_peer_id")
    no_peer_id = raw is not None and _bit(raw, "no_peer_id")
    return AnnounceRequest(announce_hash, peer_id, port, uploaded, downloaded, left, event,
                           compact, no_peer_id, numwant, key,
                           None if device_id is None else device_id.decode("ascii"))


def _number(raw: bytes, name: str, hi: int = MAX_TRANSFER_COUNT) -> int:
    """A parameter's decimal integer value, 0..``hi``."""
    if not raw.isdigit() or len(raw) > 20:  # bytes.isdigit: ASCII digits only
        raise RequestError(f"{name} must be a non-negative decimal integer, "
                           f"got {shown(raw)}")
    value = int(raw)
    if value > hi:
        raise RequestError(f"{name} must be at most {hi}, got {value}")
    return value


def _bit(raw: bytes, name: str) -> bool:
    """A ``0``/``1`` parameter's value."""
    if raw != b"1" and raw != b"0":
        raise RequestError(f"{name} must be 0 or 1, got {shown(raw)}")
    return raw == b"1"


def parse_scrape(query: bytes, *, max_bytes: int = MAX_QUERY_BYTES) -> ScrapeRequest:
    """Parse a scrape query: one or more ``info_hash`` (full scrapes are refused).

    Raises:
        RequestError: no info_hash, more than :data:`MAX_SCRAPE_HASHES`, one that is not
            20 bytes, a malformed escape, or a query over ``max_bytes``.
    """
    escaped = _checked(query, max_bytes)
    hashes = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if name == b"info_hash" or (escaped and b"%" in name
                                    and _unquote(name) == b"info_hash"):
            hashes.append(_unquote(value) if escaped else value)
    if not hashes:
        raise RequestError("missing info_hash (full scrapes are not supported)")
    if len(hashes) > MAX_SCRAPE_HASHES:
        raise RequestError(f"at most {MAX_SCRAPE_HASHES} info_hash values per scrape, "
                           f"got {len(hashes)}")
    unique = dict.fromkeys(_info_hash(h) for h in hashes)
    return ScrapeRequest(tuple(unique))


# --- answers --------------------------------------------------------------------------

Bencodable = (int | bytes | str | Sequence["Bencodable"] | Mapping[str, "Bencodable"]
              | Mapping[bytes, "Bencodable"])


def bencode(value: Bencodable) -> bytes:
    """Bencode ints, bytes, str (UTF-8), lists/tuples and dicts (keys sorted as bytes).

    Raises:
        TypeError: a value of another type (a programming error), e.g. ``bool``.
    """
    out = bytearray()
    _bencode_into(value, out)
    return bytes(out)


def _bencode_into(value: object, out: bytearray) -> None:
    if isinstance(value, bool):
        raise TypeError("cannot bencode a bool")
    if isinstance(value, int):
        out += b"i%de" % value
    elif isinstance(value, bytes | str):
        data = value.encode("utf-8") if isinstance(value, str) else value
        out += b"%d:" % len(data)
        out += data
    elif isinstance(value, Mapping):
        items = sorted(((k.encode("utf-8") if isinstance(k, str) else k), v)
                       for k, v in value.items())
        out += b"d"
        previous = None
        for key, item in items:
            if not isinstance(key, bytes):
                raise TypeError(f"cannot bencode a dict key of type {type(key).__name__}")
            if key == previous:
                raise TypeError(f"duplicate dict key {key!r}")
            previous = key
            _bencode_into(key, out)
            _bencode_into(item, out)
        out += b"e"
    elif isinstance(value, list | tuple):
        out += b"l"
        for item in value:
            _bencode_into(item, out)
        out += b"e"
    else:
        raise TypeError(f"cannot bencode {type(value).__name__}")


def failure_answer(reason: str) -> bytes:
    """``d14:failure reason...e``: how a tracker refuses (sent with HTTP 200)."""
    return failure_reason(reason)


def announce_answer(
    peers: Iterable[HandedPeer],
    *,
    complete: int,
    incomplete: int,
    interval_s: int,
    min_interval_s: int,
    compact: bool,
    no_peer_id: bool = False,
    compact_peers: Sequence[bytes] | None = None,
) -> bytes:
    """The bencoded answer to an announce.

    Compact (BEP 23/BEP 7): IPv4 peers as 6-byte strings concatenated in ``peers``, IPv6
    peers as 18-byte strings in ``peers6`` (present only if there are any). Otherwise
    ``peers`` is a list of ``{"ip", "port", "peer id"}`` dicts (``peer id`` left out when
    ``no_peer_id``). ``compact_peers``: the peers' compact forms in order, when the
    caller has them (:attr:`tracker.registry.AnnounceResult.compact_peers`).
    """
    if compact:  # the hot path, bencoded by hand: keys in sorted order, as bencode does
        blobs = [peer.compact for peer in peers] if compact_peers is None else compact_peers
        v4, v6 = b"".join(blobs), b""
        if len(v4) != 6 * len(blobs):  # some IPv6 peers (18 bytes each)
            v4 = b"".join([blob for blob in blobs if len(blob) == 6])
            v6 = b"".join([blob for blob in blobs if len(blob) != 6])
        tail = b"e" if not v6 else b"6:peers6%d:%se" % (len(v6), v6)
        return (b"d8:completei%de10:incompletei%de8:intervali%de12:min intervali%de"
                b"5:peers%d:%s%s" % (complete, incomplete, interval_s, min_interval_s,
                                     len(v4), v4, tail))
    answer: dict[str, Bencodable] = {
        "interval": interval_s,
        "min interval": min_interval_s,
        "complete": complete,
        "incomplete": incomplete,
    }
    listed: list[Bencodable] = []
    for peer in peers:
        entry: dict[str, Bencodable] = {"ip": peer.address.ip, "port": peer.address.port}
        if not no_peer_id:
            entry["peer id"] = peer.peer_id
        listed.append(entry)
    answer["peers"] = listed
    return bencode(answer)


def scrape_answer(files: Mapping[bytes, ScrapeCounts]) -> bytes:
    """The bencoded BEP 48 answer: ``{"files": {hash: {complete, downloaded, incomplete}}}``."""
    return bencode({"files": {
        announce_hash: {"complete": c.complete, "downloaded": c.downloaded,
                        "incomplete": c.incomplete}
        for announce_hash, c in files.items()
    }})
