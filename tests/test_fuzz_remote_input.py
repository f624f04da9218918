"""Fuzzed remote input, part two: what the tracker, the device and the seeder parse from
the network answers with a value or its own typed error, never another exception
(part one, Range headers, announce/scrape queries, policy and device config files, is
test_fuzz_parsers.py; the release manifest has its fuzz tests in test_manifest.py).

Every test is named after the hostile party and what it sends; each one is bounded
(a few hundred examples at most, no deadline), so the module runs in well under a
minute on two cores.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import hashlib
import http.server
import json
import struct
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest
import trio
import trio.testing
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from swarmota.demo import make_image, mutate_image
from swarmota.infra.devca import create_ca, issue_device_cert
from swarmota.infra.deviceauth import (
    CERT_HEADER,
    SIGNATURE_HEADER,
    Authenticated,
    DeviceAuthError,
    FleetTrust,
    RequestSigner,
    certificate_sha256,
)
from swarmota.manifest import release_target_name
from swarmota.peer.agent import _report_text
from swarmota.peer.announce_relay import _BadRequest, _read_request_target
from swarmota.peer.delta import (
    BSDIFF_CONTAINER_V2_HEADER_BYTES,
    CODEC_ZSTD,
    DeltaError,
    apply_delta,
    decode_bsdiff_container,
    pack_bsdiff_container_v2,
    transpose_control,
)
from swarmota.peer.errors import DownloadFailed, VerifyFailed
from swarmota.peer.http import MAX_JSON_RESPONSE_BYTES, decode_json_answer
from swarmota.peer.swarm import TorrentFile, make_torrent, read_torrent
from swarmota.peer.tracker_client import parse_checkin_answer
from swarmota.peer.trust import fetch_release_manifest
from swarmota.seeder.delta import build_delta
from swarmota.seeder.publish import publish_release
from swarmota.seeder.repository import Repository
from swarmota.tracker.admin import MethodNotAllowed, NotFound, find_route, parse_rollout_request
from swarmota.tracker.bittorrent import (
    HandedPeer,
    PeerAddress,
    ScrapeCounts,
    announce_answer,
    failure_answer,
    scrape_answer,
)
from swarmota.tracker.errors import RequestError
from swarmota.tracker.rollout import RolloutPlan
from swarmota.tracker.wire import (
    DEVICE_ID_RE,
    HARDWARE_ID_RE,
    MAX_BYTES_COUNT,
    MAX_RELEASE_COUNTER,
    NETWORK_ID_RE,
    STATUS_NAMES,
    TIMING_NAME_RE,
    CheckIn,
    Report,
    WireError,
    checkin_to_json,
    encode_json,
    parse_checkin,
    parse_report,
    report_to_json,
)

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=100)

PRODUCT_RE = r"[a-z0-9][a-z0-9._-]{0,63}"
VERSION_RE = r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}"

# JSON values a hostile party may send, including the awkward ones: integers too large
# for a float or an int64, lone surrogates, non-finite floats, nested containers.
json_scalars = (st.none() | st.booleans() | st.integers()
                | st.sampled_from([10**400, -(10**400), 2**53, 2**53 + 1, 2**63, -1, 0])
                | st.floats() | st.text(max_size=20)
                | st.sampled_from(["\ud800", "..", "../../etc/passwd", "a/b", "\x00"]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


def _json_bytes(value: object) -> bytes:
    """JSON text of ``value`` as a hostile sender would write it (NaN literals allowed,
    lone surrogates as escapes)."""
    return json.dumps(value, allow_nan=True).encode("ascii")


def deeply_nested(depth: int, opener: str = "[", closer: str = "]") -> bytes:
    return (opener * depth + closer * depth).encode()


mutations = st.lists(st.tuples(st.sampled_from(["flip", "drop", "insert", "truncate"]),
                               st.integers(min_value=0), st.integers(0, 255)),
                     min_size=1, max_size=4)


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            break
        at = position % len(out)
        if kind == "flip":
            out[at] ^= value or 1
        elif kind == "drop":
            del out[at]
        elif kind == "insert":
            out.insert(at, value)
        else:
            del out[at:]
    return bytes(out)


# --- tracker: check-in and report bodies ---------------------------------------------------

valid_ids = st.from_regex(NETWORK_ID_RE, fullmatch=True)
valid_checkins = st.builds(
    CheckIn,
    device_id=st.from_regex(DEVICE_ID_RE, fullmatch=True),
    product=st.from_regex(PRODUCT_RE, fullmatch=True),
    hardware_id=st.from_regex(HARDWARE_ID_RE, fullmatch=True),
    version=st.from_regex(VERSION_RE, fullmatch=True),
    release_counter=st.integers(0, MAX_RELEASE_COUNTER),
    network_id=st.none() | valid_ids,
    region=st.none() | valid_ids,
    labels=st.lists(valid_ids, max_size=16).map(tuple),
)
valid_reports = st.builds(
    Report,
    device_id=st.from_regex(DEVICE_ID_RE, fullmatch=True),
    product=st.from_regex(PRODUCT_RE, fullmatch=True),
    from_version=st.from_regex(VERSION_RE, fullmatch=True),
    to_version=st.from_regex(VERSION_RE, fullmatch=True),
    status=st.sampled_from(sorted(STATUS_NAMES)),
    message=st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
    bytes_origin=st.integers(0, MAX_BYTES_COUNT),
    bytes_peers=st.integers(0, MAX_BYTES_COUNT),
    timings_s=st.dictionaries(st.from_regex(TIMING_NAME_RE, fullmatch=True),
                              st.floats(0.0, 1e9), max_size=32),
)


def _assert_checkin_is_valid(checkin: CheckIn) -> None:
    for value, pattern in ((checkin.device_id, DEVICE_ID_RE),
                           (checkin.hardware_id, HARDWARE_ID_RE)):
        assert pattern.fullmatch(value)
    assert release_target_name(checkin.product, checkin.version)
    assert 0 <= checkin.release_counter <= MAX_RELEASE_COUNTER
    assert len(checkin.labels) <= 16


@FUZZ
@given(checkin=valid_checkins)
def test_every_valid_device_check_in_round_trips_through_the_tracker_parser(
        checkin: CheckIn) -> None:
    assert parse_checkin(encode_json(checkin_to_json(checkin))) == checkin


@FUZZ
@given(report=valid_reports)
def test_every_valid_device_report_round_trips_through_the_tracker_parser(
        report: Report) -> None:
    assert parse_report(encode_json(report_to_json(report))) == report


@FEW
@given(checkin=valid_checkins, report=valid_reports, edits=mutations)
def test_corrupted_check_in_and_report_bodies_are_refused_or_still_valid(
        checkin: CheckIn, report: Report, edits: list[tuple[str, int, int]]) -> None:
    with contextlib.suppress(WireError):
        _assert_checkin_is_valid(parse_checkin(mutate(encode_json(checkin_to_json(checkin)),
                                                      edits)))
    with contextlib.suppress(WireError):
        parsed = parse_report(mutate(encode_json(report_to_json(report)), edits))
        assert parsed.status in STATUS_NAMES
        assert release_target_name(parsed.product, parsed.to_version)
        assert all(TIMING_NAME_RE.fullmatch(name) for name in parsed.timings_s)


@FEW
@given(checkin=valid_checkins, report=valid_reports, data=st.data())
def test_any_field_of_a_check_in_or_report_replaced_by_hostile_json_only_raises_request_error(
        checkin: CheckIn, report: Report, data: st.DataObject) -> None:
    """Huge integers, lone surrogates, NaN, nested values, in any field (the plain
    version of this is in test_tracker_protocol.py)."""
    for body, parse in ((checkin_to_json(checkin), parse_checkin),
                        (report_to_json(report), parse_report)):
        key = data.draw(st.sampled_from([*sorted(body), "labels", "region", "extra"]))
        body[key] = data.draw(json_values)
        with contextlib.suppress(WireError):
            parsed = parse(_json_bytes(body))
            assert parsed.device_id.isascii() and DEVICE_ID_RE.fullmatch(parsed.device_id)
            if isinstance(parsed, Report):
                parsed.message.encode("utf-8")  # storable: no lone surrogates


@settings(FEW, max_examples=20)
@given(depth=st.integers(1, 200_000))
def test_deeply_nested_check_in_and_report_bodies_are_refused(depth: int) -> None:
    for parse in (parse_checkin, parse_report):
        for opener, closer in (("[", "]"), ('{"a":', "}")):
            with pytest.raises(WireError):
                parse(deeply_nested(depth, opener, closer)[:64 * 1024])


# --- tracker: admin API bodies (operator tokens can leak; parsing must still hold) --------

plan_fields = sorted(RolloutPlan().to_json())


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", ""]) | st.text(max_size=8),
       parts=st.lists(st.sampled_from(["rollouts", "releases", "fleet", "audit", "pause",
                                       "revoke", "force", "..", "", "acme", "2.0"])
                      | st.text(max_size=30), max_size=6))
def test_any_admin_path_is_routed_or_refused_with_404_or_405(method: str,
                                                             parts: list[str]) -> None:
    try:
        route, params = find_route(method, parts)
    except (NotFound, MethodNotAllowed):
        return
    assert route.role in ("viewer", "operator", "admin") and route.method == method
    assert all(params.values())


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_as_an_admin_rollout_request_only_raise_request_error(
        data: bytes) -> None:
    with contextlib.suppress(RequestError):
        _check_rollout_request(data)


numbers = (st.integers() | st.integers(-(10**450), 10**450) | st.floats()
           | st.sampled_from([10**400, -(10**400), 2**63, 0, 1, 50, 100, 100.0, True]))


hostile_plan_values = json_values | numbers | st.lists(numbers, max_size=5)


@FUZZ
@given(replaced=st.dictionaries(st.sampled_from([*plan_fields, "unknown"]),
                                hostile_plan_values, min_size=1, max_size=2),
       dropped=st.sets(st.sampled_from(plan_fields), max_size=3),
       product=st.just("acme") | json_values, version=st.just("2.0") | json_values,
       shape=st.sampled_from(["plan", "plan", "plan", "no plan", "everyone", "extra key"]))
def test_any_json_in_an_admin_rollout_request_only_raises_request_error(
        replaced: dict[str, Any], dropped: set[str], product: object, version: object,
        shape: str) -> None:
    """A genuine request (a default plan, some keys left out) with any of its fields
    replaced by any JSON value."""
    plan: dict[str, Any] = {k: v for k, v in RolloutPlan().to_json().items()
                            if k not in dropped}
    plan.update(replaced)
    body: dict[str, object] = {"product": product, "version": version, "plan": plan}
    if shape == "no plan":
        del body["plan"]
    elif shape == "everyone":
        body["plan"] = "everyone"
    elif shape == "extra key":
        body["token"] = True
    with contextlib.suppress(RequestError):
        _check_rollout_request(_json_bytes(body))


@pytest.mark.parametrize("field", plan_fields)
@settings(FUZZ, max_examples=60)
@given(value=hostile_plan_values)
def test_any_value_in_each_rollout_plan_field_only_raises_request_error(
        field: str, value: object) -> None:
    plan = {**RolloutPlan().to_json(), field: value}
    with contextlib.suppress(RequestError):
        _check_rollout_request(_json_bytes({"product": "acme", "version": "2.0",
                                            "plan": plan}))


def _check_rollout_request(body: bytes) -> None:
    """Parse; an accepted plan must survive what the store does with it (JSON and back)
    and give its stage names (the admin views show them)."""
    product, version, plan = parse_rollout_request(body)
    assert isinstance(product, str) and isinstance(version, str)
    stored = json.dumps(plan.to_json(), sort_keys=True, allow_nan=False)
    assert RolloutPlan.from_json(json.loads(stored)) == plan
    assert len(plan.stage_names) == len(plan.stages_percent) + 1


def test_rollout_stage_of_four_hundred_digits_is_a_request_error_not_an_overflow() -> None:
    for stages in ([10**400], [1, 10**400], [10**400, 100]):
        with pytest.raises(RequestError, match="plan: "):
            parse_rollout_request(_json_bytes({"product": "p", "version": "1",
                                                "plan": {"stages_percent": stages}}))


# --- device: what a hostile tracker answers ---------------------------------------------

offers = st.fixed_dictionaries({}, optional={
    "product": json_values | st.from_regex(PRODUCT_RE, fullmatch=True),
    "version": json_values | st.from_regex(VERSION_RE, fullmatch=True),
    "release_counter": json_values,
    "target": json_values | st.sampled_from(["releases/acme/1.0.json",
                                             "releases/../../etc/passwd"]),
    "extra": json_values,
})
checkin_answers = st.fixed_dictionaries({}, optional={
    "release": json_values | offers, "poll_after_s": json_values, "error": json_values})


@FUZZ
@given(status=st.sampled_from([200, 200, 200, 400, 404, 500, 302]),
       body=st.binary(max_size=300) | checkin_answers.map(_json_bytes)
       | st.integers(1, 100_000).map(deeply_nested))
def test_hostile_tracker_check_in_answer_only_raises_download_failed(
        status: int, body: bytes) -> None:
    try:
        offer, poll_after_s = parse_checkin_answer(
            decode_json_answer("POST https://tracker/v1/checkin", status,
                               body[:MAX_JSON_RESPONSE_BYTES]))
    except DownloadFailed:
        return
    assert status == 200
    assert isinstance(poll_after_s, int) and not isinstance(poll_after_s, bool)
    assert 0 <= poll_after_s <= 7 * 86400
    if offer is not None:
        assert offer.target == release_target_name(offer.product, offer.version)
        assert ".." not in offer.target.split("/")
        assert type(offer.release_counter) is int
        assert 0 <= offer.release_counter <= 2**53


def test_tracker_answer_nested_thirty_thousand_deep_is_download_failed() -> None:
    with pytest.raises(DownloadFailed, match="not a JSON object"):
        decode_json_answer("POST https://tracker/v1/checkin", 200, deeply_nested(32_000))


def test_tracker_cannot_offer_a_boolean_release_counter() -> None:
    answer = {"release": {"product": "acme", "version": "2.0", "release_counter": True,
                          "target": "releases/acme/2.0.json"}, "poll_after_s": True}
    with pytest.raises(DownloadFailed, match="release counter"):
        parse_checkin_answer(answer)
    assert parse_checkin_answer({"release": None, "poll_after_s": True}) == (None, 3600)


# --- tracker: the bencoded answers it sends (libtorrent decodes them on every device) -----

handed_peers = st.lists(st.builds(
    lambda ip, port, peer_id: HandedPeer(PeerAddress(str(ip), port), peer_id),
    st.ip_addresses(v=4) | st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None),
    st.integers(1, 65535), st.binary(min_size=20, max_size=20)), max_size=12)
counts = st.integers(0, 2**40)


@FUZZ
@given(peers=handed_peers, complete=counts, incomplete=counts, interval=st.integers(0, 2**31),
       reason=st.text(max_size=200), no_peer_id=st.booleans(),
       files=st.dictionaries(st.binary(min_size=20, max_size=20),
                             st.builds(ScrapeCounts, counts, counts, counts), max_size=5))
def test_tracker_bencoded_answers_are_canonical_and_decode_to_what_was_meant(
        peers: list[HandedPeer], complete: int, incomplete: int, interval: int,
        reason: str, no_peer_id: bool, files: dict[bytes, ScrapeCounts]) -> None:
    """Every device's libtorrent decodes these: each must be canonical bencode (sorted
    keys: re-encoding gives the same bytes) holding exactly the values meant."""
    answers = {
        compact: announce_answer(peers, complete=complete, incomplete=incomplete,
                                 interval_s=interval, min_interval_s=interval // 2,
                                 compact=compact, no_peer_id=no_peer_id)
        for compact in (True, False)}
    for data in (*answers.values(), failure_answer(reason), scrape_answer(files)):
        assert bytes(lt.bencode(lt.bdecode(data))) == data
    compact = lt.bdecode(answers[True])
    v4 = [p.address for p in peers if not p.address.is_ipv6]
    v6 = [p.address for p in peers if p.address.is_ipv6]
    assert compact[b"peers"] == b"".join(a.compact for a in v4)
    assert compact.get(b"peers6", b"") == b"".join(a.compact for a in v6)
    assert (compact[b"complete"], compact[b"incomplete"], compact[b"interval"]) == (
        complete, incomplete, interval)
    listed = lt.bdecode(answers[False])[b"peers"]
    assert [(e[b"ip"].decode(), e[b"port"]) for e in listed] == [
        (p.address.ip, p.address.port) for p in peers]
    assert all((b"peer id" in e) != no_peer_id for e in listed)
    assert lt.bdecode(failure_answer(reason)) == {
        b"failure reason": reason.encode("utf-8", "surrogatepass")}
    scrape = lt.bdecode(scrape_answer(files))[b"files"]
    assert scrape == {h: {b"complete": c.complete, b"downloaded": c.downloaded,
                          b"incomplete": c.incomplete} for h, c in files.items()}


# --- device: the torrent file it fetches from the (untrusted) origin ---------------------

@pytest.fixture(scope="module")
def torrent(tmp_path_factory: pytest.TempPathFactory) -> TorrentFile:
    payload = tmp_path_factory.mktemp("torrent") / ("ab" * 32 + ".zst")
    payload.write_bytes(make_image(100 * 1024, seed=3))
    return make_torrent(payload, piece_size_bytes=16 * 1024,
                        web_seeds=["http://127.0.0.1:1/payloads/"],
                        trackers=["http://127.0.0.1:1/announce"])


def _same_signed_identity(parsed: TorrentFile, genuine: TorrentFile) -> None:
    """A torrent that parses and carries the signed info-hash describes the genuine
    file: name, size and piece size are all inside the hashed info dict."""
    if parsed.info_hash == genuine.info_hash:
        assert (parsed.name, parsed.size_bytes, parsed.piece_size_bytes) == (
            genuine.name, genuine.size_bytes, genuine.piece_size_bytes)


@FUZZ
@given(data=st.binary(max_size=400)
       | st.binary(max_size=200).map(lambda b: b"d4:info" + b)
       | st.integers(1, 50_000).map(lambda n: deeply_nested(n, "l", "e")))
def test_arbitrary_bytes_from_the_origin_as_a_torrent_only_raise_value_error(
        data: bytes) -> None:
    with contextlib.suppress(ValueError):
        read_torrent(data)


@FUZZ
@given(edits=mutations)
def test_corrupted_torrent_from_the_origin_is_refused_or_keeps_the_signed_identity(
        torrent: TorrentFile, edits: list[tuple[str, int, int]]) -> None:
    with contextlib.suppress(ValueError):
        _same_signed_identity(read_torrent(mutate(torrent.data, edits)), torrent)


bencodable = st.recursive(
    st.integers(-(2**63) + 1, 2**63 - 1) | st.binary(max_size=40)
    | st.sampled_from([b"../../etc/passwd", b"/abs", b"a\\b", b".", b"..", b""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.binary(min_size=1, max_size=12)
        | st.sampled_from([b"name", b"length", b"piece length", b"file tree", b"pieces root",
                           b"meta version", b"files", b"path"]), inner, max_size=4),
    max_leaves=10)


@FUZZ
@given(where=st.sampled_from(["top", "info", "file"]), key=st.binary(min_size=1, max_size=12)
       | st.sampled_from([b"info", b"piece layers", b"name", b"piece length", b"length",
                          b"meta version", b"file tree", b"pieces root", b"files",
                          b"url-list", b"announce"]),
       value=st.none() | bencodable)
def test_torrent_with_any_field_replaced_is_refused_or_keeps_the_signed_identity(
        torrent: TorrentFile, where: str, key: bytes, value: object) -> None:
    doc = lt.bdecode(torrent.data)
    target: dict[bytes, Any] = doc
    if where in ("info", "file"):
        target = doc[b"info"]
    if where == "file":
        (name,) = target[b"file tree"]
        target = target[b"file tree"][name][b""]
    if value is None:
        target.pop(key, None)
    else:
        target[key] = value
    data = lt.bencode(doc)
    assume(data != torrent.data)
    with contextlib.suppress(ValueError):
        _same_signed_identity(read_torrent(bytes(data)), torrent)


# --- device: delta containers (verified payload bytes, still parsed defensively) ---------

DELTA_BASE = make_image(48 * 1024, seed=21)
DELTA_TARGET = mutate_image(DELTA_BASE, seed=22)


@pytest.fixture(scope="module")
def small_delta() -> bytes:
    delta = build_delta("bsdiff-zstd", DELTA_BASE, DELTA_TARGET, level=3)
    assert delta[4] == 2
    return delta


def _apply_small(delta: bytes) -> None:
    try:
        out = apply_delta("bsdiff-zstd", DELTA_BASE, delta, target_size=len(DELTA_TARGET))
    except DeltaError:
        return
    assert len(out) == len(DELTA_TARGET)


# (offset, struct format) of every header field of a version-2 container
HEADER_FIELDS = [(4, ">B"), (5, ">Q")] + [
    (13 + 49 * i + offset, fmt) for i in range(3)
    for offset, fmt in ((0, ">B"), (1, ">Q"), (9, ">Q"))]


@FUZZ
@given(field=st.sampled_from(HEADER_FIELDS), value=st.integers(min_value=0),
       small=st.booleans())
def test_delta_container_with_any_header_field_replaced_only_raises_delta_error(
        small_delta: bytes, field: tuple[int, str], value: int, small: bool) -> None:
    offset, fmt = field
    limit = 2 ** (8 * struct.calcsize(fmt))
    value = value % min(300, limit) if small else value % limit
    data = bytearray(small_delta)
    struct.pack_into(fmt, data, offset, value)
    _apply_small(bytes(data))


@FUZZ
@given(edits=mutations)
def test_corrupted_delta_container_only_raises_delta_error(
        small_delta: bytes, edits: list[tuple[str, int, int]]) -> None:
    _apply_small(mutate(small_delta, edits))


@pytest.fixture(scope="module")
def small_patch_delta() -> bytes:
    return build_delta("zstd-patch", DELTA_BASE, DELTA_TARGET, level=3)


@FUZZ
@given(edits=mutations)
def test_corrupted_zstd_patch_delta_only_raises_delta_error(
        small_patch_delta: bytes, edits: list[tuple[str, int, int]]) -> None:
    try:
        out = apply_delta("zstd-patch", DELTA_BASE, mutate(small_patch_delta, edits),
                          target_size=len(DELTA_TARGET))
    except DeltaError:
        return
    assert len(out) == len(DELTA_TARGET)


def _offtout(value: int) -> bytes:
    """bsdiff's signed 64-bit integer encoding (sign and magnitude, little-endian)."""
    raw = bytearray(min(abs(value), 2**63 - 1).to_bytes(8, "little"))
    if value < 0:
        raw[7] |= 0x80
    return bytes(raw)


control_values = st.one_of(st.integers(-400, 400),
                           st.sampled_from([2**31, -(2**31), 2**62, -(2**63) + 1, 2**63 - 1]))


@FUZZ
@given(triples=st.lists(st.tuples(control_values, control_values, control_values),
                        max_size=8),
       diff_len=st.integers(0, 2000), target_size=st.integers(0, 2000))
def test_hostile_bsdiff_control_stream_with_valid_hashes_only_raises_delta_error(
        triples: list[tuple[int, int, int]], diff_len: int, target_size: int) -> None:
    """The container is well-formed and every SHA-256 matches: only bsdiff itself
    stands between hostile control triples and the device's memory."""
    diff_len = min(diff_len, target_size)
    control = b"".join(_offtout(v) for triple in triples for v in triple)
    diff, extra = bytes(range(256)) * 8, b"\x07" * target_size
    diff, extra = diff[:diff_len], extra[:target_size - diff_len]
    stored = transpose_control(control)
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
    container = pack_bsdiff_container_v2(target_size, [
        (CODEC_ZSTD, cctx.compress(raw), raw) for raw in (stored, diff, extra)])
    try:
        out = apply_delta("bsdiff-zstd", DELTA_BASE[:1000], container,
                          target_size=target_size)
    except DeltaError:
        return
    assert len(out) == target_size


def _zstd_frame_declaring(size: int, body: bytes) -> bytes:
    """A zstd frame header (single segment, 8-byte content size) claiming ``size``
    bytes, followed by ``body`` (usually not what it claims)."""
    frame = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + size.to_bytes(8, "little") + body
    assert zstandard.frame_content_size(frame) == size
    return frame


@FEW
@given(target_size=st.integers(0, 4096),
       numbers=st.lists(st.integers(0, 2**64 - 1), min_size=6, max_size=6),
       bodies=st.lists(st.binary(max_size=64), min_size=3, max_size=3),
       mode=st.sampled_from(["random header", "huge frames", "consistent header"]))
def test_declared_delta_stream_lengths_never_allocate_beyond_the_signed_image_size(
        target_size: int, numbers: list[int], bodies: list[bytes], mode: str) -> None:
    """A container declaring huge streams, or tiny zstd frames declaring huge contents
    (up to 12 GiB here), allocates at most a small multiple of the target size the
    signed manifest gives, however its header is made:

    - random header: any compressed and raw lengths over arbitrary bytes;
    - huge frames: a header and frames declaring a control stream of up to 12 GiB;
    - consistent header: lengths that pass every header check (control a multiple of
      24 up to the limit, diff + extra = target), frames claiming them over garbage,
      so that decompression itself is reached.
    """
    raw_lens = list(numbers[1::2])
    diff = raw_lens[1] % (target_size + 1)
    if mode == "huge frames":  # a control stream of up to 12 GiB, all else consistent
        raw_lens = [24 * (raw_lens[0] % 2**29), diff, target_size - diff]
    elif mode == "consistent header":
        raw_lens = [24 * (raw_lens[0] % (target_size + 2)), diff, target_size - diff]
    if mode != "random header":
        bodies = [_zstd_frame_declaring(n, b) for n, b in zip(raw_lens, bodies, strict=True)]
    comp_lens = numbers[0::2] if mode == "random header" else [len(b) for b in bodies]
    header = struct.pack(">4sBQ", b"SWDZ", 2, target_size) + b"".join(
        struct.pack(">BQQ32s", CODEC_ZSTD, comp, raw, hashlib.sha256(body).digest())
        for comp, raw, body in zip(comp_lens, raw_lens, bodies, strict=True))
    assert len(header) == BSDIFF_CONTAINER_V2_HEADER_BYTES
    data = header + b"".join(bodies)
    tracemalloc.start()
    try:
        with contextlib.suppress(DeltaError):
            decode_bsdiff_container(data, max_target_bytes=target_size, base=DELTA_BASE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * 24 * (target_size + 1) + 4 * len(data) + 256 * 1024


# --- device: TUF metadata from a hostile origin ------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def tuf_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Repository, str]]:
    """A published repository served as static files on loopback (the CDN)."""
    work = tmp_path_factory.mktemp("tuf")
    repo = Repository.create(work / "repo")
    image = work / "v1.img"
    image.write_bytes(make_image(64 * 1024, seed=5))
    publish_release(repo, image, product="acme", version="1.0.0", release_counter=1,
                    compatibility=["hw1"], zstd_level=1)
    handler = functools.partial(_QuietHandler, directory=str(repo.origin_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield repo, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trusted_device(tuf_origin: tuple[Repository, str],
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A device's trust directory after one good refresh, and the genuine manifest."""
    repo, url = tuf_origin
    trust = tmp_path_factory.mktemp("trust")
    (trust / "root.json").write_bytes(repo.root_bytes())
    manifest, _ = fetch_release_manifest(trust, url, release_target_name("acme", "1.0.0"),
                                         timeout_s=10.0, scratch_dir=trust.parent / "scratch")
    return trust, manifest


def _refresh_with_timestamp(tuf_origin: tuple[Repository, str], trust: Path, genuine: bytes,
                            timestamp: bytes) -> None:
    repo, url = tuf_origin
    path = repo.metadata_dir / "timestamp.json"
    good = path.read_bytes()
    before = _snapshot(trust)
    path.write_bytes(timestamp)
    try:
        manifest, _ = fetch_release_manifest(
            trust, url, release_target_name("acme", "1.0.0"), timeout_s=10.0,
            scratch_dir=trust.parent / "scratch")
    except (VerifyFailed, DownloadFailed):
        assert _snapshot(trust) == before  # nothing untrusted reached the trust store
    else:  # only an equivalent document may pass (e.g. the same signed content)
        assert manifest == genuine
        assert _snapshot(trust) == before
    finally:
        path.write_bytes(good)


@FEW
@given(timestamp=st.binary(max_size=300) | json_values.map(_json_bytes)
       | st.integers(1, 50_000).map(deeply_nested))
def test_arbitrary_timestamp_bytes_from_the_origin_are_refused_and_trust_is_unchanged(
        tuf_origin: tuple[Repository, str], trusted_device: tuple[Path, bytes],
        timestamp: bytes) -> None:
    trust, genuine = trusted_device
    _refresh_with_timestamp(tuf_origin, trust, genuine, timestamp)


@FEW
@given(data=st.data())
def test_forged_timestamp_fields_from_the_origin_are_refused_and_trust_is_unchanged(
        tuf_origin: tuple[Repository, str], trusted_device: tuple[Path, bytes],
        data: st.DataObject) -> None:
    trust, genuine = trusted_device
    repo, _ = tuf_origin
    good = (repo.metadata_dir / "timestamp.json").read_bytes()
    doc = json.loads(good)
    section = data.draw(st.sampled_from(["signed", "top", "meta"]))
    target = {"signed": doc["signed"], "top": doc,
              "meta": doc["signed"]["meta"]["snapshot.json"]}[section]
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=8))
    target[key] = data.draw(json_values)
    forged = _json_bytes(doc)
    if data.draw(st.booleans()):
        forged = mutate(good, data.draw(mutations))
    _refresh_with_timestamp(tuf_origin, trust, genuine, forged)


# --- tracker: device identity headers (infra.deviceauth) ----------------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[FleetTrust, RequestSigner]:
    work = tmp_path_factory.mktemp("fleet")
    ca = create_ca(work / "ca", common_name="fuzz fleet CA")
    files = issue_device_cert(ca.parent, work / "dev", "dev-1")
    signer = RequestSigner(files.cert.read_bytes(), files.key.read_bytes())
    return FleetTrust(ca.read_bytes()), signer


NOW = datetime.datetime.now(datetime.UTC)
TARGET = b"/v1/checkin"
BODY = b'{"device_id":"dev-1"}'


def _verify(trust: FleetTrust, method: str, target: bytes, body: bytes,
            cert: bytes | None, sig: bytes | None) -> Authenticated | None:
    try:
        return trust.verify(method, target, body, cert, sig, NOW)
    except DeviceAuthError:
        return None


@FUZZ
@given(cert=st.none() | st.binary(max_size=300) | st.binary(max_size=300).map(base64.b64encode),
       sig=st.none() | st.binary(max_size=300)
       | st.builds(lambda c, s: b"v1;counter=%s;sig=%s" % (c, s),
                   st.sampled_from([b"0", b"1", b"9" * 19, b"9" * 5000, b"-1", b"01"]),
                   st.binary(max_size=80).map(base64.b64encode)))
def test_arbitrary_identity_headers_at_the_tracker_only_raise_device_auth_error(
        fleet: tuple[FleetTrust, RequestSigner], cert: bytes | None, sig: bytes | None) -> None:
    trust, _ = fleet
    assert _verify(trust, "POST", TARGET, BODY, cert, sig) is None


@FUZZ
@given(part=st.sampled_from(["cert", "der", "der", "sig", "body", "target", "method"]),
       edits=mutations)
def test_tampered_signed_request_at_the_tracker_is_refused(
        fleet: tuple[FleetTrust, RequestSigner], part: str,
        edits: list[tuple[str, int, int]]) -> None:
    """Any change to a genuine signed request (its certificate header or the DER inside
    it, signature, body, target or method) is refused, or changes nothing the signature
    covers."""
    trust, signer = fleet
    headers = dict(signer.headers("POST", TARGET, BODY, 7))
    request = {"cert": headers[CERT_HEADER].encode(), "sig": headers[SIGNATURE_HEADER].encode(),
               "body": BODY, "target": TARGET, "method": b"POST"}
    genuine = dict(request)
    if part == "der":  # a certificate still in base64, its DER content changed
        request["cert"] = base64.b64encode(mutate(base64.b64decode(request["cert"]), edits))
    else:
        request[part] = mutate(request[part], edits)
    method = request["method"].decode("latin-1")
    result = _verify(trust, method, request["target"], request["body"], request["cert"],
                     request["sig"])
    if result is not None:
        assert result == Authenticated("dev-1", "device", 7, result.cert_sha256)
        assert result.cert_sha256 == certificate_sha256(base64.b64decode(request["cert"]))
        assert request["body"] == genuine["body"] and request["target"] == genuine["target"]
        assert method.upper() == "POST"


# --- device: the loopback announce relay's request parser (any local process may connect) --

@FUZZ
@given(head=st.binary(max_size=400) | st.builds(
    lambda method, target, rest: method + b" " + target + b" HTTP/1.1\r\n" + rest + b"\r\n\r\n",
    st.sampled_from([b"GET", b"POST", b"get"]),
    st.sampled_from([b"/announce?info_hash=%00", b"/scrape", b"/announce/../x", b"/x",
                     b"/announce?a=\x00", b"/announce?a b", b"/announce?\xff"])
    | st.binary(max_size=40),
    st.binary(max_size=40)))
def test_any_request_to_the_announce_relay_is_relayed_as_printable_ascii_or_refused(
        head: bytes) -> None:
    async def parse() -> bytes | None:
        client, server = trio.testing.memory_stream_pair()
        await client.send_all(head)
        await client.send_eof()
        try:
            return await _read_request_target(server)  # type: ignore[arg-type]
        except _BadRequest:
            return None

    target = trio.run(parse)
    if target is not None:
        assert target.split(b"?", 1)[0] in (b"/announce", b"/scrape")
        assert target.isascii() and all(0x21 <= c < 0x7F for c in target)
        target.decode("ascii")


@FEW
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=6000))
def test_a_report_quoting_hostile_server_text_is_still_accepted_by_the_tracker(
        text: str) -> None:
    """Error messages quote what servers sent (lone surrogates, any length): the report
    must still be one the tracker stores, or it would wait in the outbox forever."""
    body = {"device_id": "dev-1", "product": "acme-router", "from_version": "1.0.0",
            "to_version": "2.0.0", "status": 10, "message": _report_text(text),
            "bytes_origin": 0, "bytes_peers": 0, "timings_s": {}}
    report = parse_report(json.dumps(body).encode())
    assert report.message == _report_text(text) and len(report.message) <= 4096
