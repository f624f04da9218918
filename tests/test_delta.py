"""Delta payloads: building (seeder.delta) and applying (peer.delta).

Threats and mistakes covered: a delta that does not rebuild the image, a corrupt or
hostile delta (flipped bytes, truncation, bad magic or version, sizes over the limit,
trailing garbage) that must fail cleanly with ``DeltaError`` and bounded memory, a delta
applied to the wrong base, and arbitrary bytes reaching the decoder.
"""

from __future__ import annotations

import hashlib
import lzma
import struct
from pathlib import Path

import bsdiff4.core
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmota.demo import make_image, mutate_image
from swarmota.peer.delta import (
    BSDIFF_CONTAINER_HEADER_BYTES,
    BSDIFF_CONTAINER_V2_HEADER_BYTES,
    CODEC_LZMA2,
    CODEC_ZSTD,
    CODEC_ZSTD_BASE_PREFIX,
    DeltaError,
    apply_delta,
    decode_bsdiff_container,
    encode_bsdiff_container,
    pack_bsdiff_container_v2,
    transpose_control,
)
from swarmota.peer.errors import InstallFailed
from swarmota.seeder.delta import (
    ENGINES,
    _build,
    build_best_delta,
    build_delta,
    build_delta_from_files,
)
from swarmota.seeder.errors import PublishError

KiB = 1024
MiB = 1024 * KiB
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BASE = make_image(384 * KiB, seed=11)
TARGET = mutate_image(BASE, seed=12)


@pytest.fixture(scope="module")
def bsdiff_delta() -> bytes:
    return build_delta("bsdiff-zstd", BASE, TARGET, level=3)


def real_image(version: str) -> bytes:
    path = DATA / f"rootfs-openssl-{version}.img.zst"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return zstandard.ZstdDecompressor().decompress(path.read_bytes(),
                                                   max_output_size=64 * MiB)


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_rebuilds_the_target(engine: str) -> None:
    delta = build_delta(engine, BASE, TARGET, level=3)
    assert len(delta) < len(TARGET) // 4
    assert apply_delta(engine, BASE, delta, target_size=len(TARGET)) == TARGET


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_handle_a_shrinking_image(engine: str) -> None:
    target = BASE[: len(BASE) // 2] + b"new tail" * 100
    delta = build_delta(engine, BASE, target, level=3)
    assert apply_delta(engine, BASE, delta, target_size=len(target)) == target


def test_best_delta_keeps_the_smallest_and_reports_progress(tmp_path: Path) -> None:
    base = tmp_path / "v1.img"
    target = tmp_path / "v2.img"
    base.write_bytes(BASE)
    target.write_bytes(TARGET)
    messages: list[str] = []
    engine, delta, sizes = build_best_delta(base, target, level=3, progress=messages.append)
    assert set(sizes) == set(ENGINES)
    assert len(delta) == sizes[engine] == min(sizes.values())
    assert apply_delta(engine, BASE, delta, target_size=len(TARGET)) == TARGET
    for name in ENGINES:
        assert any(name in m and "started" in m for m in messages)
        assert any(name in m and f"{sizes[name]:,} bytes" in m for m in messages)


def test_real_images_round_trip_with_both_engines() -> None:
    base, target = real_image("3.0.20"), real_image("3.0.22")
    sizes = {}
    for engine in ENGINES:
        delta = build_delta(engine, base, target, level=6)  # 19 is slow; the format is not
        assert apply_delta(engine, base, delta, target_size=len(target)) == target
        sizes[engine] = len(delta)
    # Both beat the full image compressed at level 19 (3.3 MB) by far, even at level 6.
    assert max(sizes.values()) < 2_000_000, sizes


def test_real_images_best_delta_beats_stock_bsdiff(tmp_path: Path) -> None:
    old, new = tmp_path / "3.0.17.img", tmp_path / "3.0.22.img"
    old.write_bytes(real_image("3.0.17"))
    new.write_bytes(real_image("3.0.22"))
    engine, delta, sizes = build_best_delta(old, new)
    # 0.85 x stock bsdiff4 (1,515,196 bytes), the smallest of bsdiff4, xdelta3 -9 and
    # zstd -19 --long --patch-from on this pair.
    assert len(delta) <= 1_287_916, sizes
    assert delta[4] == 2  # container format version 2
    assert apply_delta(engine, old.read_bytes(), delta,
                       target_size=new.stat().st_size) == new.read_bytes()


# --- corrupt and hostile deltas -------------------------------------------------------------


def _stream_offsets(blob: bytes) -> list[tuple[int, int]]:
    """(offset, compressed length) of the control, diff and extra streams (version 2)."""
    assert blob[4] == 2
    out = []
    offset = BSDIFF_CONTAINER_V2_HEADER_BYTES
    for i in range(3):
        _, comp_len, _, _ = struct.unpack_from(">BQQ32s", blob, 13 + 49 * i)
        out.append((offset, comp_len))
        offset += comp_len
    return out


def _apply(delta: bytes) -> bytes:
    return apply_delta("bsdiff-zstd", BASE, delta, target_size=len(TARGET))


@pytest.mark.parametrize("stream", [0, 1, 2], ids=["control", "diff", "extra"])
def test_flipped_byte_in_a_stream_is_refused(bsdiff_delta: bytes, stream: int) -> None:
    offset, length = _stream_offsets(bsdiff_delta)[stream]
    corrupt = bytearray(bsdiff_delta)
    corrupt[offset + length // 2] ^= 0x40
    with pytest.raises(DeltaError, match="bsdiff-zstd delta"):
        _apply(bytes(corrupt))


def test_flipped_stream_hash_is_refused(bsdiff_delta: bytes) -> None:
    corrupt = bytearray(bsdiff_delta)
    corrupt[13 + 49 + 17] ^= 1  # first byte of the diff stream's SHA-256
    with pytest.raises(DeltaError, match="diff stream does not match its SHA-256"):
        _apply(bytes(corrupt))


@pytest.mark.parametrize("keep", [0, 3, 12, 100, BSDIFF_CONTAINER_HEADER_BYTES,
                                  BSDIFF_CONTAINER_V2_HEADER_BYTES, -1])
def test_truncated_container_is_refused(bsdiff_delta: bytes, keep: int) -> None:
    with pytest.raises(DeltaError, match="truncated"):
        _apply(bsdiff_delta[:keep])


def test_trailing_garbage_is_refused(bsdiff_delta: bytes) -> None:
    with pytest.raises(DeltaError, match="trailing data"):
        _apply(bsdiff_delta + b"\0")


def test_bad_magic_is_refused(bsdiff_delta: bytes) -> None:
    with pytest.raises(DeltaError, match="bad magic"):
        _apply(b"BSDIFF40" + bsdiff_delta[8:])


def test_unknown_container_version_is_refused(bsdiff_delta: bytes) -> None:
    with pytest.raises(DeltaError, match="unsupported container version 3"):
        _apply(bsdiff_delta[:4] + b"\x03" + bsdiff_delta[5:])
    with pytest.raises(DeltaError, match="unsupported container version 0"):
        _apply(bsdiff_delta[:4] + b"\x00" + bsdiff_delta[5:])


def test_declared_sizes_over_the_limit_are_refused_before_allocating() -> None:
    huge = 1 << 40
    header = struct.pack(">4sBQ", b"SWDZ", 1, huge) + struct.pack(">QQ32s", 9, 0,
                                                                  bytes(32)) * 3
    with pytest.raises(DeltaError, match=f"declares a {huge}-byte target, limit 1000"):
        decode_bsdiff_container(header, max_target_bytes=1000)
    stream_too_big = struct.pack(">4sBQ", b"SWDZ", 1, 1000) + struct.pack(
        ">QQ32s", 9, huge, bytes(32)) * 3
    with pytest.raises(DeltaError, match="control stream declares"):
        decode_bsdiff_container(stream_too_big, max_target_bytes=1000)


def test_frame_lying_about_its_size_is_refused() -> None:
    control, diff, extra = b"", b"x" * 10, b""
    blob = bytearray(encode_bsdiff_container(control, diff, extra, 10, 3))
    # Re-declare the diff stream as 5 bytes (and extra 5 so the sum still holds).
    struct.pack_into(">Q", blob, 13 + 48 + 8, 5)
    struct.pack_into(">Q", blob, 13 + 96 + 8, 5)
    with pytest.raises(DeltaError, match="declares 10 content size, expected 5"):
        decode_bsdiff_container(bytes(blob), max_target_bytes=10)


def test_delta_for_another_image_size_is_refused(bsdiff_delta: bytes) -> None:
    with pytest.raises(DeltaError):
        apply_delta("bsdiff-zstd", BASE, bsdiff_delta, target_size=len(TARGET) - 1)
    zpatch = build_delta("zstd-patch", BASE, TARGET, level=3)
    with pytest.raises(DeltaError, match="expected"):
        apply_delta("zstd-patch", BASE, zpatch, target_size=len(TARGET) + 1)


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(DeltaError, match="unknown delta encoding 'xdelta3'"):
        apply_delta("xdelta3", BASE, b"", target_size=1)


@pytest.mark.parametrize("engine", ENGINES)
def test_wrong_base_fails_or_gives_a_detectable_mismatch(engine: str) -> None:
    delta = build_delta(engine, BASE, TARGET, level=3)
    other_base = make_image(len(BASE), seed=99)
    try:
        out = apply_delta(engine, other_base, delta, target_size=len(TARGET))
    except DeltaError:
        return
    assert hashlib.sha256(out).digest() != hashlib.sha256(TARGET).digest()


def test_delta_error_is_an_install_failure() -> None:
    assert issubclass(DeltaError, InstallFailed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400), encoding=st.sampled_from(ENGINES),
       target_size=st.integers(min_value=0, max_value=4096),
       header=st.sampled_from([b"", b"SWDZ\x01", b"SWDZ\x02"]))
def test_arbitrary_bytes_only_raise_delta_error(data: bytes, encoding: str,
                                                target_size: int, header: bytes) -> None:
    if encoding == "bsdiff-zstd":
        data = header + data  # get past the magic to exercise the parser
    try:
        out = apply_delta(encoding, BASE[:4096], data, target_size=target_size)
    except DeltaError as exc:
        assert str(exc)
    else:
        assert len(out) == target_size


@settings(max_examples=100, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=1, max_value=255))
def test_any_single_byte_change_only_raises_delta_error(bsdiff_delta: bytes, position: int,
                                                        value: int) -> None:
    corrupt = bytearray(bsdiff_delta)
    corrupt[position % len(corrupt)] ^= value
    try:
        out = _apply(bytes(corrupt))
    except DeltaError:
        return
    assert len(out) == len(TARGET)


# --- container format version 2 ------------------------------------------------------------


def _v2(control: bytes = b"", diff: bytes = b"x" * 10, extra: bytes = b"",
        codecs: tuple[int, int, int] = (CODEC_ZSTD, CODEC_LZMA2, CODEC_ZSTD_BASE_PREFIX),
        bodies: tuple[bytes | None, bytes | None, bytes | None] = (None, None, None)) -> bytes:
    """A hand-made version-2 container (``bodies`` override the compressed streams)."""
    streams = []
    for codec, raw, body in zip(codecs, (transpose_control(control), diff, extra), bodies,
                                strict=True):
        if body is None:
            if codec == CODEC_LZMA2:
                body = lzma.compress(raw, format=lzma.FORMAT_RAW,
                                     filters=[{"id": lzma.FILTER_LZMA2}])
            elif codec == CODEC_ZSTD_BASE_PREFIX:
                body = build_delta("zstd-patch", BASE, raw, level=3) if raw else \
                    zstandard.ZstdCompressor(write_content_size=True).compress(raw)
            else:
                body = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
        streams.append((codec, body, raw))
    return pack_bsdiff_container_v2(len(diff) + len(extra), streams)


def test_published_bsdiff_delta_is_version_2(bsdiff_delta: bytes) -> None:
    assert bsdiff_delta[:5] == b"SWDZ\x02"
    codecs = [bsdiff_delta[13 + 49 * i] for i in range(3)]
    assert codecs[0] in (CODEC_ZSTD, CODEC_LZMA2)
    assert codecs[1:] == [CODEC_LZMA2, CODEC_ZSTD_BASE_PREFIX]
    assert _apply(bsdiff_delta) == TARGET


def test_version_1_containers_still_decode() -> None:
    control, diff, extra = bsdiff4.core.diff(BASE, TARGET)
    v1 = encode_bsdiff_container(control, diff, extra, len(TARGET), 3)
    assert v1[4] == 1
    assert _apply(v1) == TARGET


def test_control_transpose_round_trips() -> None:
    control = b"".join(struct.pack("<QQQ", i * 1000, i, i * 7) for i in range(50))
    stored = transpose_control(control)
    assert stored != control and sorted(stored) == sorted(control)
    assert transpose_control(stored, inverse=True) == control
    assert transpose_control(b"") == b""
    with pytest.raises(ValueError, match="triples"):
        transpose_control(b"x" * 25)


def test_hand_made_version_2_container_applies() -> None:
    control = struct.pack("<QQQ", 4, 6, 0)  # bsdiff: 4 diff bytes, 6 extra, no seek
    delta = _v2(control, diff=bytes(4), extra=BASE[100:106])
    assert apply_delta("bsdiff-zstd", BASE, delta, target_size=10) == BASE[:4] + BASE[100:106]


def test_version_2_unknown_codec_is_refused() -> None:
    blob = bytearray(_v2())
    blob[13 + 49] = 7
    with pytest.raises(DeltaError, match="diff stream uses unknown codec 7"):
        decode_bsdiff_container(bytes(blob), max_target_bytes=10)


def test_version_2_prefix_stream_needs_the_base() -> None:
    blob = _v2(diff=b"", extra=b"y" * 10)
    with pytest.raises(DeltaError, match="needs the base image"):
        decode_bsdiff_container(blob, max_target_bytes=10)
    assert decode_bsdiff_container(blob, max_target_bytes=10, base=BASE)[2] == b"y" * 10


def test_version_2_prefix_stream_with_the_wrong_base_is_refused() -> None:
    extra = BASE[1000:3000]
    blob = _v2(diff=b"", extra=extra)
    try:
        _, _, out, _ = decode_bsdiff_container(blob, max_target_bytes=2000,
                                               base=make_image(len(BASE), seed=5))
    except DeltaError:
        return
    pytest.fail(f"decoded {len(out)} bytes against the wrong base")


@pytest.mark.parametrize("case", ["trailing", "truncated", "short", "long"])
def test_version_2_bad_lzma_streams_are_refused(case: str) -> None:
    good = lzma.compress(b"x" * 10, format=lzma.FORMAT_RAW,
                         filters=[{"id": lzma.FILTER_LZMA2}])
    if case == "trailing":
        body, match = good + b"\0", "after its end|does not decompress"
    elif case == "truncated":
        body, match = good[:-1], "does not end|does not decompress"
    elif case == "short":
        body = lzma.compress(b"x" * 9, format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2}])
        match = "decompressed to 9 bytes, expected 10"
    else:
        body = lzma.compress(b"x" * 11, format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2}])
        match = r"decompressed to 11\+ bytes, expected 10"
    blob = _v2(bodies=(None, body, None))
    with pytest.raises(DeltaError, match=match):
        decode_bsdiff_container(blob, max_target_bytes=10, base=BASE)


def test_version_2_declared_sizes_over_the_limit_are_refused() -> None:
    huge = 1 << 40
    header = struct.pack(">4sBQ", b"SWDZ", 2, 1000) + struct.pack(
        ">BQQ32s", CODEC_LZMA2, 9, huge, bytes(32)) * 3
    with pytest.raises(DeltaError, match="control stream declares"):
        decode_bsdiff_container(header, max_target_bytes=1000)
    with pytest.raises(DeltaError, match="truncated"):
        decode_bsdiff_container(header[:BSDIFF_CONTAINER_HEADER_BYTES], max_target_bytes=1000)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=1, max_value=255))
def test_version_2_header_byte_changes_only_raise_delta_error(
        bsdiff_delta: bytes, position: int, value: int) -> None:
    corrupt = bytearray(bsdiff_delta)
    corrupt[position % BSDIFF_CONTAINER_V2_HEADER_BYTES] ^= value
    try:
        out = _apply(bytes(corrupt))
    except DeltaError:
        return
    assert len(out) == len(TARGET)


def test_real_images_version_2_stays_well_below_stock_bsdiff() -> None:
    """Regression guard. The issue's target (<= 0.85 x the best other tool; measured
    1,165,026 = 0.850 x stock bsdiff4 here) is checked by bench/delta.py: its margin
    on this pair is too thin to pin in a test that runs against whatever zstd/liblzma
    versions a fresh machine installs."""
    base, target = real_image("3.0.20"), real_image("3.0.22")
    delta = build_delta("bsdiff-zstd", base, target)  # level 19, ~4 s
    assert delta[4] == 2
    assert len(delta) <= 1_192_557  # 0.87 x stock bsdiff4 (1,370,755) on this pair
    assert apply_delta("bsdiff-zstd", base, delta, target_size=len(target)) == target


@pytest.mark.parametrize("engine", ENGINES)
def test_delta_from_files_is_the_bytes_api_delta(engine: str, tmp_path: Path) -> None:
    """Publish's workers build from files (holding less memory); same delta."""
    (tmp_path / "v1.img").write_bytes(BASE)
    (tmp_path / "v2.img").write_bytes(TARGET)
    delta = build_delta_from_files(engine, tmp_path / "v1.img", tmp_path / "v2.img", level=3)
    assert delta == build_delta(engine, BASE, TARGET, level=3)
    with pytest.raises(PublishError, match="cannot read image"):
        build_delta_from_files(engine, tmp_path / "v1.img", tmp_path / "v3.img", level=3)


@pytest.mark.parametrize("engine", ENGINES)
def test_base_changed_while_building_is_never_published(engine: str) -> None:
    """The base is read again to verify the delta: if it changed on disk meanwhile the
    delta does not reproduce the target, and the build fails instead of shipping it."""
    reads = iter([BASE, mutate_image(BASE, seed=99)])
    with pytest.raises(PublishError, match=r"does not (reproduce|apply)"):
        _build(engine, lambda: next(reads), lambda: TARGET, 3)


# --- bad publisher input ------------------------------------------------------------------


def test_best_delta_refuses_bad_bases(tmp_path: Path) -> None:
    target = tmp_path / "v2.img"
    target.write_bytes(TARGET)
    with pytest.raises(PublishError, match="does not exist"):
        build_best_delta(tmp_path / "missing.img", target)
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(PublishError, match="empty"):
        build_best_delta(tmp_path / "empty.img", target)
    (tmp_path / "same.img").write_bytes(TARGET)
    with pytest.raises(PublishError, match="identical to the image"):
        build_best_delta(tmp_path / "same.img", target)
    with pytest.raises(PublishError, match="distinct names"):
        build_best_delta(target, target, engines=["bsdiff-zstd", "bsdiff-zstd"])
    with pytest.raises(PublishError, match="unknown delta engine"):
        build_delta("xdelta3", BASE, TARGET)
