"""Fuzzed remote and operator input: every parser answers with a value or its own typed
error, never another exception (the manifest, check-in and report parsers have theirs in
test_manifest.py and test_tracker_protocol.py; delta containers in test_delta.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.config import ConfigError, load_config
from peer.install_policy import load_policy
from seeder.origin import ByteRange, parse_range
from tracker.bittorrent import parse_announce, parse_scrape
from tracker.errors import RequestError

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

range_like = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, b: f"bytes={a}-{b}", st.one_of(st.just(""), st.integers(0, 10**30)),
              st.one_of(st.just(""), st.integers(0, 10**30))),
)


@FUZZ
@given(header=range_like, size=st.integers(0, 10**12))
def test_range_header_is_a_valid_range_or_refused(header: str, size: int) -> None:
    result = parse_range(header, size)
    if isinstance(result, ByteRange):
        assert 0 <= result.start <= result.end < size


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


@FUZZ
@given(text=st.text(max_size=400))
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
    "swarm_listen", "unknown"]), json_values, max_size=8))
def test_device_config_files_load_or_give_a_config_error(tmp_path: Path,
                                                         doc: dict[str, object]) -> None:
    path = tmp_path / "device.json"
    path.write_text(json.dumps(doc))
    with contextlib.suppress(ConfigError):
        load_config(path)
