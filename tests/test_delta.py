"""Delta payloads: building (seeder.delta) and applying (peer.delta).

Threats and mistakes covered: a delta that does not rebuild the image, a corrupt or
hostile delta (flipped bytes, truncation, bad magic or version, sizes over the limit,
trailing garbage) that must fail cleanly with ``DeltaError`` and bounded memory, a delta
applied to the wrong base, and arbitrary bytes reaching the decoder.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.delta import (
    BSDIFF_CONTAINER_HEADER_BYTES,
    DeltaError,
    apply_delta,
    decode_bsdiff_container,
    encode_bsdiff_container,
)
from peer.errors import InstallFailed
from seeder.delta import ENGINES, build_best_delta, build_delta
from seeder.errors import PublishError
from swarmota.demo import make_image, mutate_image

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
        assert any(name in m and f"{sizes[name]} bytes" in m for m in messages)


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
    assert len(delta) < 1_516_347, sizes  # stock bsdiff4 (bz2 inside), data/README.md
    assert apply_delta(engine, old.read_bytes(), delta,
                       target_size=new.stat().st_size) == new.read_bytes()


# --- corrupt and hostile deltas -------------------------------------------------------------


def _stream_offsets(blob: bytes) -> list[tuple[int, int]]:
    """(offset, compressed length) of the control, diff and extra streams."""
    out = []
    offset = BSDIFF_CONTAINER_HEADER_BYTES
    for i in range(3):
        comp_len, _, _ = struct.unpack_from(">QQ32s", blob, 13 + 48 * i)
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
    corrupt[13 + 48 + 16] ^= 1  # first byte of the diff stream's SHA-256
    with pytest.raises(DeltaError, match="diff stream does not match its SHA-256"):
        _apply(bytes(corrupt))


@pytest.mark.parametrize("keep", [0, 3, 100, BSDIFF_CONTAINER_HEADER_BYTES, -1])
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
    with pytest.raises(DeltaError, match="unsupported container version 2"):
        _apply(bsdiff_delta[:4] + b"\x02" + bsdiff_delta[5:])


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
       target_size=st.integers(min_value=0, max_value=4096), use_header=st.booleans())
def test_arbitrary_bytes_only_raise_delta_error(data: bytes, encoding: str,
                                                target_size: int, use_header: bool) -> None:
    if use_header and encoding == "bsdiff-zstd":
        data = b"SWDZ\x01" + data  # get past the magic to exercise the parser
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
