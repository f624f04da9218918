"""Fuzzed remote and operator input: every parser answers with a value or its own typed
error, never another exception (the manifest, check-in and report parsers have theirs in
test_manifest.py and test_tracker_protocol.py; delta containers in test_delta.py; what
the tracker, device and seeder parse from the network in test_fuzz_remote_input.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmota.peer.config import ConfigError, load_config
from swarmota.peer.http import content_range_matches
from swarmota.peer.install_policy import load_policy
from swarmota.seeder.origin import (
    UNSATISFIABLE,
    ByteRange,
    Validators,
    if_range_matches,
    is_not_modified,
    parse_range,
)
from swarmota.tracker.admin import token_from_header
from swarmota.tracker.announce_server import Refusal, Request, parse_head
from swarmota.tracker.bittorrent import parse_announce, parse_scrape
from swarmota.tracker.errors import RequestError

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Decimal numbers as a client may write them: small, huge (int() refuses more than 4300
# digits), with leading zeros.
decimals = st.one_of(st.integers(0, 10**30).map(str),
                     st.integers(4290, 6000).map(lambda n: "9" * n),
                     st.integers(0, 5000).map(lambda n: "0" * n + "7"))
range_like = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, b: f"bytes={a}-{b}", st.one_of(st.just(""), decimals),
              st.one_of(st.just(""), decimals)),
)


@FUZZ
@given(header=range_like, size=st.integers(0, 10**12))
def test_range_header_is_a_valid_range_or_refused(header: str, size: int) -> None:
    result = parse_range(header, size)
    if isinstance(result, ByteRange):
        assert 0 <= result.start <= result.end < size


def test_range_numbers_of_thousands_of_digits_mean_past_the_end_of_any_file() -> None:
    huge = "9" * 5000
    assert parse_range(f"bytes={huge}-", 100) == UNSATISFIABLE
    assert parse_range(f"bytes=10-{huge}", 100) == ByteRange(10, 99)
    assert parse_range(f"bytes=-{huge}", 100) == ByteRange(0, 99)
    assert parse_range("bytes=" + "0" * 5000 + "5-6", 100) == ByteRange(5, 6)


@FUZZ
@given(inm=st.none() | st.text(max_size=60), ims=st.none() | st.text(max_size=40)
       | st.sampled_from(["Thu, 01 Jan 1970 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
                          "Sun, 06 Nov 1994 08:49:37 GMT", "-1", "9" * 5000]),
       if_range=st.text(max_size=60), mtime=st.integers(0, 2**40))
def test_conditional_headers_at_the_origin_only_give_a_boolean(
        inm: str | None, ims: str | None, if_range: str, mtime: int) -> None:
    validators = Validators('"sha256-' + "ab" * 32 + '"', mtime)
    assert is_not_modified(inm, ims, validators) in (True, False)
    assert if_range_matches(if_range, validators) in (True, False)


@FUZZ
@given(header=st.none() | st.text(max_size=60)
       | st.builds(lambda a, b, c: f"bytes {a}-{b}/{c}", decimals, decimals,
                   decimals | st.just("*")),
       offset=st.integers(0, 2**40), length=st.integers(1, 2**24))
def test_content_range_from_a_hostile_origin_is_matched_or_refused(
        header: str | None, offset: int, length: int) -> None:
    assert content_range_matches(header, offset, length) in (True, False)
    assert content_range_matches(f"bytes {offset}-{offset + length - 1}/*", offset, length)


@FUZZ
@given(head=st.binary(max_size=300) | st.builds(
    lambda method, target, version, headers: b"%s %s %s%s" % (
        method, target, version, b"".join(b"\r\n" + h for h in headers)),
    st.sampled_from([b"GET", b"POST", b"get", b""]),
    st.sampled_from([b"/announce", b"/scrape", b"/announce?x=1", b"/../announce",
                     b"/\xff", b"*"]) | st.binary(max_size=20),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b""]),
    st.lists(st.sampled_from([b"connection: close", b"content-length: 0",
                              b"content-length: " + b"9" * 5000, b"transfer-encoding: x",
                              b"bad header", b": empty", b"x:y"]) | st.binary(max_size=30),
             max_size=5)))
def test_any_request_head_at_the_lean_announce_endpoint_is_a_request_or_a_refusal(
        head: bytes) -> None:
    parsed = parse_head(head)
    assert isinstance(parsed, Request | Refusal)
    if isinstance(parsed, Request):
        assert parsed.path in ("/announce", "/scrape")


@FUZZ
@given(value=st.none() | st.binary(max_size=120)
       | st.builds(lambda s, t: s + b" " + t, st.sampled_from([b"Bearer", b"bearer", b"Basic"]),
                   st.binary(max_size=80)))
def test_any_authorization_header_at_the_admin_api_is_a_token_or_nothing(
        value: bytes | None) -> None:
    token = token_from_header(value)
    assert token is None or (token.isascii() and token.isprintable() and " " not in token)


query_parts = st.lists(st.tuples(
    st.sampled_from(["info_hash", "peer_id", "port", "left", "uploaded", "downloaded",
                     "compact", "event", "numwant", "device_id", "key", "ip", "x"]),
    st.one_of(st.text(max_size=30), st.binary(max_size=30).map(
        lambda b: "".join(f"%{c:02x}" for c in b)), st.integers(-10**20, 10**20).map(str))),
    max_size=12)


@FUZZ
@given(parts=query_parts, raw=st.binary(max_size=300))
def test_announce_and_scrape_queries_are_parsed_or_refused(
        parts: list[tuple[str, str]], raw: bytes) -> None:
    query = "&".join(f"{k}={v}" for k, v in parts).encode("utf-8", "surrogatepass")
    for data in (query, raw):
        for parse in (parse_announce, parse_scrape):
            with contextlib.suppress(RequestError):
                parse(data)


policy_texts = st.one_of(
    st.text(max_size=400),
    st.builds(lambda table, key, value: f"[{table}]\n{key} = {value}\n",
              st.sampled_from(["schedule", "power", "network", "storage"]),
              st.sampled_from(["windows", "delay_s", "min_battery_percent", "battery_file",
                               "battery_command", "download_when_metered", "reserve_bytes"]),
              st.sampled_from(["9" * 400, "-1", "1e400", "-1e400", "nan", "inf", "0", "true",
                               '"x"', '["02:00-05:00"]', '["25:00-26:00"]', "[]"])),
)


@FUZZ
@given(text=policy_texts)
def test_policy_files_load_or_give_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(ConfigError):
        load_policy(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=10)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from([
    "device_id", "product", "hardware_id", "origin_url", "tracker_url", "download_mode",
    "health_command", "labels", "tls_pins", "tls_ca_file", "network_id", "seed_time_s",
    "swarm_listen", "unknown"]), json_values | st.sampled_from([
        "127.0.0.1:" + "9" * 5000, "127.0.0.1:\u00b2", "[::1]:\u0663", "h:65536", "h:01"]),
    max_size=8))
def test_device_config_files_load_or_give_a_config_error(tmp_path: Path,
                                                         doc: dict[str, object]) -> None:
    path = tmp_path / "device.json"
    path.write_text(json.dumps(doc))
    with contextlib.suppress(ConfigError):
        load_config(path)


VALID_DEVICE = {"device_id": "dev-1", "product": "acme", "hardware_id": "hw1",
                "origin_url": "http://127.0.0.1:8460", "tracker_url": "http://127.0.0.1:8470"}


@FUZZ
@given(key=st.sampled_from(["swarm_listen", "seed_time_s", "download_mode", "labels",
                            "network_id", "tls_pins", "health_command", "device_id"]),
       value=json_values | st.sampled_from([
           "127.0.0.1:" + "9" * 5000, "127.0.0.1:\u00b2", "[::1]:\u0663", "h:65536", ":1",
           10**400, float("inf")]))
def test_any_value_in_a_valid_device_config_loads_or_gives_a_config_error(
        tmp_path: Path, key: str, value: object) -> None:
    path = tmp_path / "device.json"
    path.write_text(json.dumps({**VALID_DEVICE, key: value}))
    with contextlib.suppress(ConfigError):
        config = load_config(path)
        host, port = config.swarm_listen_host_port
        assert host and 0 <= port <= 65535


def test_swarm_listen_port_of_non_ascii_digits_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    for listen in ("127.0.0.1:\u00b2", "[::1]:\u0663", "127.0.0.1:" + "9" * 5000):
        path.write_text(json.dumps({**VALID_DEVICE, "swarm_listen": listen}))
        with pytest.raises(ConfigError, match="swarm_listen"):
            load_config(path)
