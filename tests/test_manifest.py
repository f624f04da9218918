"""The release manifest codec and checks: strict parsing, limits, integrity, applicability."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmota.manifest import (
    CHUNK_DIGEST_BYTES,
    MAX_MANIFEST_BYTES,
    ImageInfo,
    IntegrityError,
    ManifestError,
    ManifestFormatError,
    NotApplicableError,
    Payload,
    ReleaseManifest,
    RollbackError,
    check_applicable,
    choose_chunk_size,
    chunk_hashes,
    compact_pin,
    compact_target_name,
    encode_chunk_list,
    parse_compact_pin,
    parse_release_manifest,
    release_target_name,
    sha256_hex,
)

PAYLOAD = bytes(range(256)) * 300  # 76800 bytes


def make_manifest(counter: int = 2, payload: bytes = PAYLOAD) -> ReleaseManifest:
    chunk = 16384
    return ReleaseManifest(
        product="acme-router", version="2.0.0", release_counter=counter,
        compatibility=("acme-router-hw1",), update_type="image",
        image=ImageInfo(size=1000, sha256="a" * 64),
        payloads=(Payload(kind="full", encoding="zstd", size=len(payload),
                          sha256=sha256_hex(payload), chunk_size=chunk,
                          chunks=tuple(chunk_hashes(payload, chunk))),),
    )


def raw(m: ReleaseManifest | None = None) -> dict:  # type: ignore[type-arg]
    return json.loads((m or make_manifest()).to_bytes())


def test_round_trip_is_canonical() -> None:
    m = make_manifest()
    data = m.to_bytes()
    assert parse_release_manifest(data) == m
    assert parse_release_manifest(data).to_bytes() == data
    assert m.target_name == "releases/acme-router/2.0.0.json"
    assert m.full_payload.path == f"payloads/{m.full_payload.sha256}.zst"


def test_chunk_verification_accepts_good_and_rejects_flipped_byte() -> None:
    p = make_manifest().full_payload
    assert p.chunk_count == 5
    off, length = p.chunk_span(4)
    assert (off, length) == (65536, len(PAYLOAD) - 65536)
    p.verify_chunk(4, PAYLOAD[off:off + length])
    bad = bytearray(PAYLOAD[off:off + length])
    bad[7] ^= 1
    with pytest.raises(IntegrityError, match="chunk 4"):
        p.verify_chunk(4, bad)
    with pytest.raises(IntegrityError, match="expected"):
        p.verify_chunk(0, PAYLOAD[:100])


def test_mix_and_match_chunk_of_another_release_is_rejected() -> None:
    other = bytes(reversed(PAYLOAD))
    p = make_manifest().full_payload
    with pytest.raises(IntegrityError):
        p.verify_chunk(0, other[:16384])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("version"), "missing version"),
    (lambda d: d.update(extra=1), "unknown keys extra"),
    (lambda d: d.update(schema=2), "unsupported manifest schema"),
    (lambda d: d.update(release_counter=-1), "release_counter"),
    (lambda d: d.update(release_counter=True), "release_counter"),
    (lambda d: d.update(product="../etc"), "invalid product"),
    (lambda d: d.update(version="1.0/../../x"), "invalid version"),
    (lambda d: d.update(compatibility=[]), "compatibility"),
    (lambda d: d["payloads"][0].update(chunk_size=20000), "not a power of two"),
    (lambda d: d["payloads"][0].update(chunk_size=1024), "chunk_size"),
    (lambda d: d["payloads"][0]["chunks"].pop(), "hashes for 5 chunks"),
    (lambda d: d["payloads"][0].update(sha256="A" * 64), "hex"),
    (lambda d: d["payloads"][0].update(kind="exotic"), "kind"),
    (lambda d: d.update(payloads=[]), "payloads"),
    (lambda d: d["image"].update(size=10**30), "image.size"),
    (lambda d: d["payloads"][0].update(encoding="bsdiff-zstd"), "encoding"),
    (lambda d: d["payloads"][0].update(base={"size": 1, "sha256": "b" * 64}),
     "only delta payloads have a base"),
    (lambda d: d["payloads"][0].update(info_hash="xyz"), "info_hash"),
])
def test_malformed_manifest_rejected_with_clear_message(mutate, message) -> None:  # type: ignore[no-untyped-def]
    d = raw()
    mutate(d)
    with pytest.raises(ManifestFormatError, match=message):
        parse_release_manifest(json.dumps(d).encode())


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "expected an object"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": 1.5}', "floating point"),
    (b'{"a": NaN}', "constant"),
    (b"[" * 100000, "not valid JSON"),
])
def test_hostile_json_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ManifestFormatError, match=message):
        parse_release_manifest(data)


def test_endless_manifest_cut_at_limit() -> None:
    with pytest.raises(ManifestFormatError, match="limit"):
        parse_release_manifest(b" " * (MAX_MANIFEST_BYTES + 1))


def test_wrong_product_or_hardware_not_applicable() -> None:
    m = make_manifest()
    with pytest.raises(NotApplicableError, match="product"):
        check_applicable(m, product="other", hardware_id="acme-router-hw1", installed_counter=0)
    with pytest.raises(NotApplicableError, match="hardware"):
        check_applicable(m, product="acme-router", hardware_id="hw2", installed_counter=0)
    check_applicable(m, product="acme-router", hardware_id="acme-router-hw1", installed_counter=1)


def test_rollback_to_older_or_same_counter_refused() -> None:
    m = make_manifest(counter=2)
    for installed in (2, 3):
        with pytest.raises(RollbackError, match="not newer"):
            check_applicable(m, product="acme-router", hardware_id="acme-router-hw1",
                             installed_counter=installed)


def test_target_name_refuses_path_traversal() -> None:
    with pytest.raises(ManifestFormatError):
        release_target_name("acme", "../../root")
    with pytest.raises(ManifestFormatError):
        release_target_name("/abs", "1")


def test_chunk_size_power_of_two_many_chunks_for_small_payloads() -> None:
    """Never one-block pieces (16 KiB): libtorrent answers a hash failure in such a
    torrent by cutting off every honest peer (MIN_CHOSEN_CHUNK_SIZE_BYTES)."""
    assert choose_chunk_size(0) == 32768
    assert choose_chunk_size(200_000) == 32768
    assert choose_chunk_size(512 * 65536) == 65536
    size = choose_chunk_size(3_000_000_000)
    assert size & (size - 1) == 0 and 3_000_000_000 / size <= 512
    assert choose_chunk_size(10**13) == 16 * 1024 * 1024


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_only_raise_manifest_errors(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_release_manifest(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                       children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["product", "version", "release_counter", "compatibility",
                        "update_type", "image", "payloads", "schema"]), json_values)
def test_fuzz_any_field_replaced_by_any_json_only_raises_manifest_errors(key: str,
                                                                         value: object) -> None:
    d = raw()
    d[key] = value
    with contextlib.suppress(ManifestError):
        parse_release_manifest(json.dumps(d).encode())


def with_delta(base_sha: str = "c" * 64, encoding: str = "zstd-patch") -> ReleaseManifest:
    m = make_manifest()
    delta_bytes = b"delta" * 5000
    delta = Payload(kind="delta", encoding=encoding, size=len(delta_bytes),
                    sha256=sha256_hex(delta_bytes), chunk_size=16384,
                    chunks=tuple(chunk_hashes(delta_bytes, 16384)),
                    base=ImageInfo(size=900, sha256=base_sha), info_hash="d" * 64)
    return ReleaseManifest(m.product, m.version, m.release_counter, m.compatibility,
                           m.update_type, m.image, (*m.payloads, delta))


def test_delta_payload_round_trips_and_is_found_by_base() -> None:
    m = with_delta()
    again = parse_release_manifest(m.to_bytes())
    assert again == m
    delta = again.delta_for("c" * 64)
    assert delta is not None and delta.kind == "delta" and delta.base == ImageInfo(900, "c" * 64)
    assert delta.path.endswith(".zpatch") and delta.torrent_path == delta.path + ".torrent"
    assert again.delta_for("e" * 64) is None
    assert with_delta(encoding="bsdiff-zstd").payloads[1].path.endswith(".bsdz")


def test_delta_payload_without_base_or_with_full_encoding_is_refused() -> None:
    d = json.loads(with_delta().to_bytes())
    del d["payloads"][1]["base"]
    with pytest.raises(ManifestFormatError, match="needs a base"):
        parse_release_manifest(json.dumps(d).encode())
    d = json.loads(with_delta().to_bytes())
    d["payloads"][1]["encoding"] = "zstd"
    with pytest.raises(ManifestFormatError, match="encoding"):
        parse_release_manifest(json.dumps(d).encode())


def test_delta_whose_base_is_the_target_image_is_refused() -> None:
    m = make_manifest()
    with pytest.raises(ManifestFormatError, match="base is the image itself"):
        with_delta(base_sha=m.image.sha256).to_bytes()


def test_critical_flag_is_optional_strict_and_round_trips() -> None:
    from dataclasses import replace

    plain = make_manifest()
    assert plain.critical is False and b"critical" not in plain.to_bytes()
    urgent = replace(plain, critical=True)
    assert parse_release_manifest(urgent.to_bytes()).critical is True
    doc = raw(plain)
    for bad in (1, "yes", None):
        doc["critical"] = bad
        with pytest.raises(ManifestFormatError, match="critical"):
            parse_release_manifest(json.dumps(doc).encode())


def test_component_updates_name_their_component_and_images_do_not() -> None:
    from dataclasses import replace

    plain = make_manifest()
    assert plain.component is None and b"component" not in plain.to_bytes()
    for kind in ("module", "app", "config"):
        m = replace(plain, update_type=kind, component="modem-fw")
        back = parse_release_manifest(m.to_bytes())
        assert (back.update_type, back.component) == (kind, "modem-fw")
    doc = raw(plain)
    doc["component"] = "modem-fw"
    with pytest.raises(ManifestFormatError, match="only for module, app and config"):
        parse_release_manifest(json.dumps(doc).encode())
    doc["update_type"] = "module"
    for bad in (None, "", "../etc", "Modem", 3):
        doc["component"] = bad
        with pytest.raises(ManifestFormatError, match="needs a component name"):
            parse_release_manifest(json.dumps(doc).encode())
    doc["update_type"] = "firmware"
    doc["component"] = "modem-fw"
    with pytest.raises(ManifestFormatError, match="update_type"):
        parse_release_manifest(json.dumps(doc).encode())


def test_compact_manifest_names_a_chunk_list_and_loads_the_chunks_it_pins() -> None:
    m = make_manifest()
    compact = m.compact()
    small = compact.full_payload
    assert small.chunks == () and small.chunk_list is not None
    assert small.chunk_count == m.full_payload.chunk_count == 5
    data = compact.to_bytes()
    assert parse_release_manifest(data) == compact
    assert len(data) < len(m.to_bytes())
    chunk_list = encode_chunk_list(m.full_payload.chunks)
    assert len(chunk_list) == 5 * CHUNK_DIGEST_BYTES
    assert small.chunk_list.path == f"payloads/{sha256_hex(chunk_list)}.chunks"
    loaded = small.with_chunk_list(chunk_list)
    assert loaded == m.full_payload
    loaded.verify_chunk(0, PAYLOAD[:16384])
    assert m.full_payload.with_chunk_list(b"ignored") is m.full_payload
    assert compact.compact() == compact


def test_compact_payload_refuses_chunks_before_its_list_and_a_wrong_list() -> None:
    small = make_manifest().compact().full_payload
    with pytest.raises(RuntimeError, match="chunk list not loaded"):
        small.verify_chunk(0, PAYLOAD[:16384])
    good = encode_chunk_list(make_manifest().full_payload.chunks)
    for bad in (good[:-1], good[:-1] + bytes([good[-1] ^ 1]), good + b"\0" * 32):
        with pytest.raises(IntegrityError):
            small.with_chunk_list(bad)


def test_compact_manifest_with_a_chunk_list_of_the_wrong_size_is_refused() -> None:
    r = json.loads(make_manifest().compact().to_bytes())
    r["payloads"][0]["chunk_list"]["size"] += CHUNK_DIGEST_BYTES
    with pytest.raises(ManifestFormatError, match=r"chunk_list\.size"):
        parse_release_manifest(json.dumps(r).encode())
    r = json.loads(make_manifest().compact().to_bytes())
    r["payloads"][0]["chunks"] = []
    with pytest.raises(ManifestFormatError):
        parse_release_manifest(json.dumps(r).encode())


def test_compact_pin_round_trips_and_unknown_forms_fall_back_to_the_canonical() -> None:
    data = make_manifest().compact().to_bytes()
    pin = compact_pin(data)
    assert parse_compact_pin(pin) == (len(data), sha256_hex(data))
    assert compact_target_name("releases/p/1.0.json") == "releases/p/1.0.compact.json"
    for custom in (None, [], {}, {"compact": "x"}, {"compact": {"length": 1}},
                   {"compact": {"length": True, "sha256": "a" * 64}},
                   {"compact": {"length": 0, "sha256": "a" * 64}},
                   {"compact": {"length": MAX_MANIFEST_BYTES + 1, "sha256": "a" * 64}},
                   {"compact": {"length": 10, "sha256": "A" * 64}},
                   {"compact": {"length": 10, "sha256": "a" * 64, "extra": 1}}):
        assert parse_compact_pin(custom) is None, custom
