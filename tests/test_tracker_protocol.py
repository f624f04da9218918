"""The tracker protocol: strict request parsing and the offer decision (pure)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import ConfigError as PeerConfigError
from swarmota.tracker.errors import RequestError
from swarmota.tracker.protocol import Release, decide_offer, floor_of, newer_releases
from swarmota.tracker.wire import (
    MAX_MESSAGE_CHARS,
    MAX_TIMINGS,
    CheckIn,
    ComponentVersion,
    Report,
    WireError,
    checkin_answer,
    checkin_to_json,
    encode_json,
    offer_to_json,
    parse_checkin,
    parse_report,
    report_to_json,
)


def checkin_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"device_id": "dev-1", "product": "acme-router",
                            "hardware_id": "acme-router-hw1", "version": "1.0.0",
                            "release_counter": 1}
    body.update(changes)
    return body


def report_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"device_id": "dev-1", "product": "acme-router",
                            "from_version": "1.0.0", "to_version": "2.0.0", "status": 0,
                            "message": "installed", "bytes_origin": 4242, "bytes_peers": 0,
                            "timings_s": {"download": 1.5, "install": 2}}
    body.update(changes)
    return body


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def rejected_checkin(body: bytes) -> str:
    with pytest.raises(WireError) as info:
        parse_checkin(body)
    return str(info.value)


def rejected_report(body: bytes) -> str:
    with pytest.raises(WireError) as info:
        parse_report(body)
    return str(info.value)


# --- accepted ---------------------------------------------------------------------------


def test_valid_checkin_is_parsed() -> None:
    assert parse_checkin(raw(checkin_body())) == CheckIn(
        device_id="dev-1", product="acme-router", hardware_id="acme-router-hw1",
        version="1.0.0", release_counter=1)


def test_valid_report_is_parsed_with_integer_timings_as_floats() -> None:
    report = parse_report(raw(report_body()))
    assert report == Report(device_id="dev-1", product="acme-router", from_version="1.0.0",
                            to_version="2.0.0", status=0, message="installed",
                            bytes_origin=4242, bytes_peers=0,
                            timings_s={"download": 1.5, "install": 2.0})
    assert isinstance(report.timings_s["install"], float)


@pytest.mark.parametrize("status", [0, 10, 20, 30, 40])
def test_every_device_status_code_is_accepted(status: int) -> None:
    assert parse_report(raw(report_body(status=status))).status == status


def test_edge_values_are_accepted() -> None:
    report = parse_report(raw(report_body(
        device_id="A" * 128, message="x" * MAX_MESSAGE_CHARS, bytes_origin=0,
        timings_s={"a" * (i + 1): 0 for i in range(MAX_TIMINGS)})))
    assert len(report.timings_s) == MAX_TIMINGS
    assert parse_checkin(raw(checkin_body(device_id="0:.-_", release_counter=0)))


@pytest.mark.parametrize("device_id", ["dev-1", "0:.-_", "A" * 128, ".hidden", "-rf",
                                       ":x", "", "A" * 129, "d\u00e9v", "a b"])
def test_the_agent_and_the_tracker_accept_exactly_the_same_device_ids(
        device_id: str) -> None:
    """One device-id rule (infra.ids): a device the agent's configuration accepts is one
    the tracker accepts, and the reverse (the two copies of the rule once disagreed)."""
    try:
        DeviceConfig(device_id=device_id, product="acme-router", hardware_id="hw1",
                     origin_url="https://origin", tracker_url="https://tracker")
        agent = True
    except PeerConfigError:
        agent = False
    try:
        parse_checkin(raw(checkin_body(device_id=device_id)))
        tracker = True
    except WireError:
        tracker = False
    assert agent == tracker, (device_id, agent, tracker)


def test_a_check_in_names_each_installed_component_with_its_own_counter() -> None:
    body = checkin_body(components=[{"name": "modem-fw", "version": "7.1",
                                     "release_counter": 12}])
    parsed = parse_checkin(raw(body))
    assert parsed.components == (ComponentVersion("modem-fw", "7.1", 12),)
    assert parse_checkin(encode_json(checkin_to_json(parsed))) == parsed
    assert parse_checkin(raw(checkin_body())).components is None
    for bad, why in (([{"name": "x", "version": "1", "release_counter": 1}] * 2, "twice"),
                     ([{"name": "Modem", "version": "1", "release_counter": 1}], "component"),
                     ([{"name": "m", "version": "1", "release_counter": -1}], "outside"),
                     ([{"name": "m", "version": "1"}], "missing"),
                     ([{"name": "m", "version": "1", "release_counter": 1, "x": 1}],
                      "unknown"),
                     ({"m": 1}, "list"),
                     ([{"name": f"m{i}", "version": "1", "release_counter": 1}
                       for i in range(33)], "limit")):
        with pytest.raises(WireError, match=why):
            parse_checkin(raw(checkin_body(components=bad)))


def test_encoded_requests_round_trip() -> None:
    checkin = parse_checkin(raw(checkin_body()))
    report = parse_report(raw(report_body()))
    assert parse_checkin(encode_json(checkin_to_json(checkin))) == checkin
    assert parse_report(encode_json(report_to_json(report))) == report


# --- rejected ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe{}", b"[]", b"null", b"42", b'"x"'])
def test_non_object_bodies_are_rejected(body: bytes) -> None:
    message = rejected_checkin(body)
    assert "JSON" in message or "object" in message


def test_unknown_keys_are_rejected_by_name() -> None:
    assert "unknown keys 'rollout'" in rejected_checkin(raw(checkin_body(rollout="all")))


def test_missing_keys_are_rejected_by_name() -> None:
    body = checkin_body()
    del body["hardware_id"]
    assert "missing hardware_id" in rejected_checkin(raw(body))


def test_duplicate_keys_are_rejected() -> None:
    body = (b'{"device_id":"a","device_id":"b","product":"p","hardware_id":"h",'
            b'"version":"1","release_counter":1}')
    assert "duplicate key 'device_id'" in rejected_checkin(body)


def test_oversize_body_is_rejected_before_decoding() -> None:
    body = raw(report_body(message="x" * 100))
    with pytest.raises(WireError, match="limit 50"):
        parse_report(body, max_bytes=50)


@pytest.mark.parametrize("counter", ["1", 1.0, True, None, -1, 2**53 + 1, [1]])
def test_release_counter_must_be_a_bounded_non_negative_integer(counter: Any) -> None:
    assert "release_counter" in rejected_checkin(raw(checkin_body(release_counter=counter)))


@pytest.mark.parametrize("status", [1, -10, 50, "0", 0.0, False, None])
def test_unknown_status_is_rejected(status: Any) -> None:
    assert "report.status" in rejected_report(raw(report_body(status=status)))


@pytest.mark.parametrize("field", ["bytes_origin", "bytes_peers"])
def test_negative_byte_counts_are_rejected(field: str) -> None:
    message = rejected_report(raw(report_body(**{field: -1})))
    assert f"report.{field}: -1 outside" in message


def test_huge_integers_are_rejected_with_a_short_message() -> None:
    message = rejected_report(raw(report_body(bytes_peers=10**200)))
    assert "bytes_peers" in message and len(message) < 200


@pytest.mark.parametrize("device_id", ["", "a" * 129, "dev 1", "dev/1", "dév", "a\n", 7])
def test_bad_device_ids_are_rejected(device_id: Any) -> None:
    assert "device_id" in rejected_checkin(raw(checkin_body(device_id=device_id)))


@pytest.mark.parametrize("field, value", [
    ("product", "Acme"), ("product", "../etc"), ("version", ""), ("version", "1.0/.."),
    ("hardware_id", "-hw"), ("hardware_id", ""),
])
def test_bad_product_version_and_hardware_ids_are_rejected(field: str, value: str) -> None:
    assert f"checkin.{field}" in rejected_checkin(raw(checkin_body(**{field: value})))


def test_oversize_message_is_rejected() -> None:
    message = rejected_report(raw(report_body(message="x" * (MAX_MESSAGE_CHARS + 1))))
    assert "report.message" in message


def test_message_with_lone_surrogate_is_rejected() -> None:
    body = raw(report_body()).replace(b'"installed"', b'"\\ud800"')
    assert "surrogate" in rejected_report(body)


@pytest.mark.parametrize("timings", [
    [], {"Download": 1}, {"": 1}, {"x" * 33: 1}, {"download": -0.5}, {"download": "1"},
    {"download": True}, {"download": None}, {"download": 1e10},
    {"a" * (i + 1): 0 for i in range(MAX_TIMINGS + 1)},
])
def test_bad_timings_are_rejected(timings: Any) -> None:
    assert "report.timings_s" in rejected_report(raw(report_body(timings_s=timings)))


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_timings_are_rejected(literal: bytes) -> None:
    body = raw(report_body(timings_s={"download": 12345})).replace(b"12345", literal)
    rejected_report(body)


def test_error_messages_about_untrusted_values_stay_short() -> None:
    message = rejected_checkin(raw(checkin_body(device_id="!" * 10_000)))
    assert len(message) < 200


# --- property: arbitrary input only ever raises WireError ----------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12),
                                                                 inner, max_size=4),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_raise_anything_but_request_error(data: bytes) -> None:
    for parse in (parse_checkin, parse_report):
        with contextlib.suppress(WireError):
            parse(data)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(report_body())), json_values)
def test_any_json_value_in_any_report_field_only_raises_request_error(
        field: str, value: Any) -> None:
    try:
        report = parse_report(raw(report_body(**{field: value})))
    except WireError:
        return
    assert parse_report(encode_json(report_to_json(report))) == report


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(checkin_body())), json_values)
def test_any_json_value_in_any_checkin_field_only_raises_request_error(
        field: str, value: Any) -> None:
    try:
        parsed = parse_checkin(raw(checkin_body(**{field: value})))
    except WireError:
        return
    assert parse_checkin(encode_json(checkin_to_json(parsed))) == parsed


# --- the offer decision ----------------------------------------------------------------


def checkin(counter: int, product: str = "acme-router") -> CheckIn:
    return CheckIn("dev-1", product, "acme-router-hw1", "x", counter)


CATALOGUE = [
    Release.create("acme-router", "1.0.0", 1),
    Release.create("acme-router", "3.0.0", 3),
    Release.create("acme-router", "2.0.0", 2),
    Release.create("other-thing", "9.0.0", 9),
]


def test_offer_is_the_newest_release_with_a_higher_counter() -> None:
    assert decide_offer(checkin(1), CATALOGUE) == Release.create("acme-router", "3.0.0", 3)
    assert decide_offer(checkin(0), CATALOGUE) == Release.create("acme-router", "3.0.0", 3)


def test_up_to_date_device_is_offered_nothing() -> None:
    assert decide_offer(checkin(3), CATALOGUE) is None
    assert decide_offer(checkin(7), CATALOGUE) is None


def test_device_is_never_offered_another_products_release() -> None:
    assert decide_offer(checkin(0, "lonely-product"), CATALOGUE) is None
    assert decide_offer(checkin(5, "other-thing"), CATALOGUE) == CATALOGUE[3]


def test_empty_catalogue_offers_nothing() -> None:
    assert decide_offer(checkin(0), []) is None


def test_checkin_answer_shape() -> None:
    assert checkin_answer(None, 60) == {"release": None, "poll_after_s": 60}
    offer = CATALOGUE[1]
    assert checkin_answer(offer_to_json(offer.product, offer.version,
                                        offer.release_counter), 60) == {
        "release": {"product": "acme-router", "version": "3.0.0", "release_counter": 3,
                    "target": "releases/acme-router/3.0.0.json"},
        "poll_after_s": 60,
    }


def test_release_target_must_match_product_and_version() -> None:
    with pytest.raises(RequestError, match="target"):
        Release("acme-router", "1.0.0", 1, "releases/acme-router/2.0.0.json")
    with pytest.raises(RequestError, match="product"):
        Release.create("Bad Product", "1.0.0", 1)
    with pytest.raises(RequestError, match="release_counter"):
        Release.create("acme-router", "1.0.0", -1)


def test_each_update_kind_has_its_own_counter_sequence() -> None:
    """A config release with counter 3 installed first must not make image release 2
    uninstallable: a device listing its components is offered per sequence."""
    image2 = Release.create("acme-router", "2.0.0", 2)
    config3 = dataclasses.replace(Release.create("acme-router", "cfg-3", 3),
                                  update_type="config", component="settings")
    modem5 = dataclasses.replace(Release.create("acme-router", "fw-5", 5),
                                 update_type="module", component="modem")
    catalogue = [config3, image2, modem5]
    runs = CheckIn("d1", "acme-router", "hw1", "1.0.0", 1,
                   components=(ComponentVersion("settings", "cfg-3", 3),))
    assert newer_releases(runs, catalogue) == [image2, modem5]  # image first, then by name
    assert floor_of(runs, config3) == 3 and floor_of(runs, modem5) == 0
    legacy = CheckIn("d1", "acme-router", "hw1", "1.0.0", 3)  # one sequence for all
    assert newer_releases(legacy, catalogue) == [modem5]
