"""The tracker's hand-written hot paths agree with the straightforward code they
replaced, on many generated inputs, so that a fast path can never accept, refuse or
read a request differently from the strict one.

Threat covered: a parser shortcut that disagrees with the rules (a repeated parameter
let through, a malformed escape or number accepted, a value decoded differently, an
info-hash read from the wrong bytes): the announce and scrape query parsers are
compared with the reference parser below (the tracker's parser before it was
rewritten for speed: split into a dict of lists, then one helper per check) on
queries built from valid, malformed, escaped, repeated, unknown and binary parts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmota.tracker.bittorrent import (
    DEFAULT_NUMWANT,
    EVENTS,
    MAX_NUMWANT,
    MAX_QUERY_BYTES,
    MAX_SCRAPE_HASHES,
    AnnounceRequest,
    ScrapeRequest,
    parse_announce,
    parse_scrape,
    shown,
)
from swarmota.tracker.errors import RequestError
from swarmota.tracker.registry import SwarmRegistry, draw_positions
from swarmota.tracker.wire import DEVICE_ID_RE

# --- the reference: the parser as it was before the one-pass rewrite ---------------

_BAD_ESCAPE_RE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_DIGITS_RE = re.compile(rb"[0-9]{1,20}")
_DEVICE_ID_RE = re.compile(DEVICE_ID_RE.pattern.encode("ascii"))
_MAX_COUNT = 2**63 - 1
_PARAMS = ("info_hash", "peer_id", "port", "uploaded", "downloaded", "left", "event",
           "compact", "no_peer_id", "numwant", "key", "device_id")


def _split_query(query: bytes, known: Iterable[str], repeatable: str = "",
                 max_bytes: int = MAX_QUERY_BYTES) -> dict[str, list[bytes]]:
    if len(query) > max_bytes:
        raise RequestError(f"query string of {len(query)} bytes is over the limit of "
                           f"{max_bytes} bytes")
    if _BAD_ESCAPE_RE.search(query):
        raise RequestError("malformed percent-escape in the query string")
    names = set(known)
    out: dict[str, list[bytes]] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        raw_name, _, raw_value = part.partition(b"=")
        try:
            name = _unquote(raw_name).decode("ascii")
        except UnicodeDecodeError:
            continue
        if name not in names:
            continue
        values = out.setdefault(name, [])
        if values and name != repeatable:
            raise RequestError(f"{name} given more than once")
        values.append(_unquote(raw_value))
    return out


def _unquote(raw: bytes) -> bytes:
    pieces = raw.split(b"%")
    return pieces[0] + b"".join(bytes([int(p[:2], 16)]) + p[2:] for p in pieces[1:])


def _one(params: Mapping[str, list[bytes]], name: str) -> bytes | None:
    values = params.get(name)
    return values[0] if values else None


def _info_hash(value: bytes) -> bytes:
    if len(value) == 32:
        return value[:20]
    if len(value) != 20:
        raise RequestError(f"info_hash must be 20 bytes (or a 32-byte v2 info-hash), "
                           f"got {len(value)}")
    return value


def _count(params: Mapping[str, list[bytes]], name: str, *, default: int | None,
           hi: int = _MAX_COUNT) -> int:
    raw = _one(params, name)
    if raw is None:
        if default is None:
            raise RequestError(f"missing {name}")
        return default
    if not _DIGITS_RE.fullmatch(raw):
        raise RequestError(f"{name} must be a non-negative decimal integer, "
                           f"got {shown(raw)}")
    value = int(raw)
    if value > hi:
        raise RequestError(f"{name} must be at most {hi}, got {value}")
    return value


def _flag(params: Mapping[str, list[bytes]], name: str, default: bool) -> bool:
    raw = _one(params, name)
    if raw is None:
        return default
    if raw not in (b"0", b"1"):
        raise RequestError(f"{name} must be 0 or 1, got {shown(raw)}")
    return raw == b"1"


def reference_announce(query: bytes) -> AnnounceRequest:
    params = _split_query(query, _PARAMS)
    info_hash = _one(params, "info_hash")
    if info_hash is None:
        raise RequestError("missing info_hash")
    peer_id = _one(params, "peer_id")
    if peer_id is None:
        raise RequestError("missing peer_id")
    if _one(params, "port") is None:
        raise RequestError("missing port")
    port = _count(params, "port", default=None, hi=65535)
    if port == 0:
        raise RequestError("port must be within 1..65535, got 0")
    raw_event = _one(params, "event")
    event = "" if raw_event is None else raw_event.decode("latin-1")
    if event not in EVENTS:
        raise RequestError(f"event must be started, completed, stopped or empty, "
                           f"got {shown(event)}")
    key = _one(params, "key")
    if key is not None and len(key) > 64:
        raise RequestError("key must be at most 64 bytes")
    numwant = min(_count(params, "numwant", default=DEFAULT_NUMWANT), MAX_NUMWANT)
    device_id = _one(params, "device_id")
    if device_id is not None and not _DEVICE_ID_RE.fullmatch(device_id):
        raise RequestError("device_id must be 1-128 chars of A-Z a-z 0-9 . _ : -")
    announce_hash = _info_hash(info_hash)
    if len(peer_id) != 20:
        raise RequestError(f"peer_id must be 20 bytes, got {len(peer_id)}")
    return AnnounceRequest(
        announce_hash=announce_hash, peer_id=peer_id, port=port,
        uploaded=_count(params, "uploaded", default=0),
        downloaded=_count(params, "downloaded", default=0),
        left=_count(params, "left", default=None), event=event,
        compact=_flag(params, "compact", True), no_peer_id=_flag(params, "no_peer_id", False),
        numwant=numwant, key=key,
        device_id=None if device_id is None else device_id.decode("ascii"))


def reference_scrape(query: bytes) -> ScrapeRequest:
    params = _split_query(query, ("info_hash",), repeatable="info_hash")
    hashes = params.get("info_hash", [])
    if not hashes:
        raise RequestError("missing info_hash (full scrapes are not supported)")
    if len(hashes) > MAX_SCRAPE_HASHES:
        raise RequestError(f"at most {MAX_SCRAPE_HASHES} info_hash values per scrape, "
                           f"got {len(hashes)}")
    return ScrapeRequest(tuple(dict.fromkeys(_info_hash(h) for h in hashes)))


# --- generated queries ------------------------------------------------------------------

def _escaped(raw: bytes, every: bool) -> bytes:
    """``raw`` percent-encoded: every byte (``%xx``, either case), or as a client does."""
    if every:
        return b"".join(b"%%%02x" % b if b % 2 else b"%%%02X" % b for b in raw)
    return quote_from_bytes(raw).encode("ascii")


_names = st.sampled_from([*_PARAMS, "ip", "corrupt", "trackerid", "", "info_hash",
                          "port", "left", "Port", "peer_id "])
_values = st.one_of(
    st.binary(min_size=0, max_size=34),  # binary hashes and ids of every length
    st.binary(min_size=20, max_size=20),
    st.binary(min_size=32, max_size=32),
    st.sampled_from([b"0", b"1", b"2", b"65535", b"65536", b"000", b"+1", b"-1", b"1e3",
                     b"9223372036854775807", b"9223372036854775808", b"1" * 21,
                     b"\xd9\xa3", b"started", b"stopped", b"completed", b"paused", b"",
                     b"dev-01", b"dev 01", b"a" * 129, b"k" * 64, b"k" * 65]),
    st.integers(min_value=0, max_value=2**64).map(lambda n: str(n).encode("ascii")),
)


@st.composite
def _parts(draw: st.DrawFn) -> bytes:
    name = draw(_names).encode("ascii")
    value = draw(_values)
    how = draw(st.sampled_from(["plain", "plain", "quote", "quote", "every", "name", "noeq",
                                "broken"]))
    if how == "plain":
        return name + b"=" + value.replace(b"&", b"").replace(b"%", b"")
    if how == "quote":
        return name + b"=" + _escaped(value, False)
    if how == "every":
        return name + b"=" + _escaped(value, True)
    if how == "name":
        return _escaped(name, True) + b"=" + _escaped(value, False)
    if how == "broken":
        return name + b"=" + draw(st.sampled_from([b"%", b"%4", b"%zz", b"a%g1", b"%%41"]))
    return name


_VALID: dict[str, st.SearchStrategy[bytes]] = {
    "info_hash": st.binary(min_size=20, max_size=20),
    "peer_id": st.binary(min_size=20, max_size=20),
    "port": st.integers(min_value=1, max_value=65535).map(lambda n: b"%d" % n),
    "left": st.integers(min_value=0, max_value=2**63 - 1).map(lambda n: b"%d" % n),
}


@st.composite
def _queries(draw: st.DrawFn) -> bytes:
    """Every parameter absent, valid or drawn from anything (mostly valid ones), then
    a few more parts (unknown, repeated, broken), in any order."""
    parts = []
    for name in _PARAMS:
        kind = draw(st.sampled_from(["valid"] * 6 + ["absent", "any"]))
        if kind == "absent" or (kind == "valid" and name not in _VALID):
            continue
        value = draw(_VALID[name] if kind == "valid" else _values)
        parts.append(name.encode("ascii") + b"=" + _escaped(value, draw(st.booleans())))
    parts += draw(st.lists(_parts(), max_size=4))
    parts = draw(st.permutations(parts))
    if draw(st.booleans()):
        parts = [*parts, b"", *draw(st.lists(st.sampled_from([b"", b"=", b"&"]), max_size=2))]
    return b"&".join(parts)


def _outcome(parse: object, query: bytes) -> object:
    assert callable(parse)
    try:
        return parse(query)
    except RequestError as exc:
        return ("refused", str(exc))


@settings(max_examples=1000, deadline=None)
@given(_queries())
def test_the_one_pass_announce_parser_reads_and_refuses_as_the_reference(
        query: bytes) -> None:
    assert _outcome(parse_announce, query) == _outcome(reference_announce, query)


@settings(max_examples=300, deadline=None)
@given(st.lists(_parts(), max_size=8).map(b"&".join))
def test_arbitrary_parameter_soups_are_parsed_as_the_reference(query: bytes) -> None:
    assert _outcome(parse_announce, query) == _outcome(reference_announce, query)
    assert _outcome(parse_scrape, query) == _outcome(reference_scrape, query)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(min_size=20, max_size=20).map(lambda h: b"info_hash=" + _escaped(h, False)),
    st.binary(min_size=0, max_size=33).map(lambda h: b"info_hash=" + _escaped(h, True)),
    st.binary(min_size=32, max_size=32).map(lambda h: b"%69nfo_hash=" + _escaped(h, False)),
    _parts()), max_size=MAX_SCRAPE_HASHES + 3).map(b"&".join))
def test_the_scrape_parser_reads_and_refuses_as_the_reference(query: bytes) -> None:
    assert _outcome(parse_scrape, query) == _outcome(reference_scrape, query)


def test_a_query_over_the_limit_is_refused_by_both_before_anything_else() -> None:
    query = b"port=1&port=2&" + b"x" * MAX_QUERY_BYTES
    assert _outcome(parse_announce, query) == _outcome(reference_announce, query)
    assert str(_outcome(parse_announce, query)).count("over the limit") == 1


# --- the peer registry's hand-out --------------------------------------------------------

_IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2"]


@st.composite
def _announces(draw: st.DrawFn) -> list[tuple[str, int, bytes, int, str, str | None,
                                              str | None, int]]:
    """``(ip, port, peer id, left, event, network, region, numwant)``: a few hosts and
    ports (so entries are announced again, with another peer id, role or network)."""
    return draw(st.lists(st.tuples(
        st.sampled_from(_IPS), st.integers(min_value=1, max_value=12),
        st.sampled_from([b"a" * 20, b"b" * 20]), st.sampled_from([0, 0, 5]),
        st.sampled_from(["", "", "", "started", "completed", "stopped"]),
        st.sampled_from([None, "lan-1", "lan-2"]), st.sampled_from([None, "eu"]),
        st.sampled_from([0, 1, 3, 50])), min_size=1, max_size=60))


@settings(max_examples=200, deadline=None)
@given(_announces(), st.integers(min_value=0, max_value=2**32))
def test_hand_outs_follow_the_policy_and_their_compact_forms_match_the_peers(
        announces: list[tuple[str, int, bytes, int, str, str | None, str | None, int]],
        seed: int) -> None:
    """Against a model of the swarm: every hand-out is LAN first, then region, then
    anyone, seeds first in each group (a seed gets leechers only), never the requester,
    no peer twice, as many as wanted or all there are, each with its latest peer id;
    and the compact forms the answer is made of are those of the peers handed out."""
    registry = SwarmRegistry(interval_s=100, clock=lambda: 0.0, rng=random.Random(seed))
    model: dict[tuple[str, int], tuple[bytes, int, str | None, str | None]] = {}
    for ip, port, peer_id, left, event, network, region, numwant in announces:
        query = (b"info_hash=" + b"h" * 20 + b"&peer_id=" + peer_id + b"&port=%d" % port
                 + b"&left=%d&numwant=%d" % (left, numwant)
                 + (b"&event=" + event.encode() if event else b""))
        result = registry.announce(parse_announce(query), ip, network, region)
        key = (ip, port)
        if event == "stopped":
            model.pop(key, None)
            assert result.peers == ()
            continue
        model[key] = (peer_id, left, network, region)
        others = {k: v for k, v in model.items() if k != key}

        def group(k: tuple[str, int], *, network: str | None = network,
                  region: str | None = region,
                  others: dict[tuple[str, int], tuple[bytes, int, str | None, str | None]]
                  = others) -> tuple[int, int]:
            _, their_left, their_network, their_region = others[k]
            level = (0 if network is not None and their_network == network
                     else 1 if region is not None and their_region == region else 2)
            return level, 0 if their_left == 0 else 1

        wanted = [k for k in others if left != 0 or others[k][1] != 0]
        got = [(p.address.ip, p.address.port) for p in result.peers]
        assert len(got) == len(set(got)) == min(numwant, len(wanted))
        assert key not in got and set(got) <= set(wanted)
        assert [group(k) for k in got] == sorted(group(k) for k in got)
        if len(got) < len(wanted):  # a whole group before any of the next one
            last = group(got[-1]) if got else (0, 0)
            assert all(group(k) >= last for k in wanted if k not in got)
        assert [p.peer_id for p in result.peers] == [others[k][0] for k in got]
        assert result.compact_peers == tuple(p.compact for p in result.peers)
        assert (result.complete, result.incomplete) == (
            sum(v[1] == 0 for v in model.values()), sum(v[1] != 0 for v in model.values()))


@pytest.mark.parametrize("lan_size", [3, 80])
def test_sampled_hand_outs_are_uniform_over_the_group(lan_size: int) -> None:
    """A group larger than the hand-out is sampled by position (the requester's LAN
    left out by position when it is small, by test of each draw when it is crowded):
    every other member is handed out about equally often."""
    registry = SwarmRegistry(interval_s=100, clock=lambda: 0.0, rng=random.Random(11))

    def announce(ip: str, port: int, numwant: int, network: str | None) -> list[int]:
        query = (b"info_hash=" + b"h" * 20 + b"&peer_id=" + b"p" * 20
                 + b"&port=%d&left=5&numwant=%d" % (port, numwant))
        result = registry.announce(parse_announce(query), ip, network)
        return [p.address.port for p in result.peers]

    for port in range(1, 301):
        announce("10.0.0.1", port, 0, None)
    for port in range(1, lan_size + 1):
        announce("10.0.0.2", port, 0, "lan")
    counts = dict.fromkeys(range(1, 301), 0)
    rounds = 3000
    for _ in range(rounds):
        ports = announce("10.0.0.2", 1, lan_size + 19, "lan")
        assert len(ports) == lan_size + 19
        for port in ports[lan_size - 1:]:
            counts[port] += 1
    expected = rounds * 20 / 300
    assert all(0.7 * expected < n < 1.3 * expected for n in counts.values()), (
        min(counts.values()), max(counts.values()), expected)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(min_value=1, max_value=5000),
                 st.integers(min_value=1, max_value=2**64)),
       st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=2**32))
def test_positions_drawn_at_once_are_each_slots_multiply_shift(size: int, count: int,
                                                               seed: int) -> None:
    """The hand-out's batched draws are exactly ``(v * size) >> 64`` of each 64-bit
    ``v`` (the low half of each 128-bit slot of the random bits), one at a time."""
    bits = random.Random(seed).getrandbits(128 * count) if count else 0
    want = [(size * ((bits >> (128 * i)) & (2**64 - 1))) >> 64 for i in range(count)]
    assert draw_positions(random.Random(seed), size, count) == want
    assert all(0 <= position < size for position in want)
