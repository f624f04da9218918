"""bsdiff streams rebuilt from HDiffPatch covers (seeder.covers).

Mistakes covered: a cover list misread from HDiffPatch's output (the streams would not
rebuild the image), covers outside the images, a changed HDiffPatch format (must be
refused, and publishing must fall back to bsdiff4's own diff, not fail or ship garbage).
"""

from __future__ import annotations

import random

import bsdiff4.core
import hdiffpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmota.demo import make_image, mutate_image
from swarmota.peer.delta import apply_delta
from swarmota.seeder import covers
from swarmota.seeder.covers import CoverFormatError, bsdiff_streams, parse_covers
from swarmota.seeder.delta import build_delta

KiB = 1024


def moved_blocks(seed: int) -> tuple[bytes, bytes]:
    """A target whose blocks come from the base out of order (backward seeks), with
    small edits inside them and new bytes between them."""
    rng = random.Random(seed)
    base = make_image(96 * KiB, seed=seed)
    blocks = [bytearray(base[i:i + 4 * KiB]) for i in range(0, len(base), 4 * KiB)]
    rng.shuffle(blocks)
    for block in blocks[::3]:
        block[rng.randrange(len(block))] ^= 0x5A
    target = b"".join(bytes(b) + rng.randbytes(rng.randrange(0, 300)) for b in blocks)
    return base, target


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streams_rebuild_a_shuffled_and_edited_image(seed: int) -> None:
    base, target = moved_blocks(seed)
    control, diff, extra = bsdiff_streams(base, target)
    assert bsdiff4.core.patch(base, len(target), control, diff, extra) == target
    assert len(extra) < len(target) // 4  # the covers found the moved blocks


def test_streams_rebuild_a_generated_firmware_update() -> None:
    base = make_image(256 * KiB, seed=5)
    target = mutate_image(base, seed=6)
    control, diff, extra = bsdiff_streams(base, target)
    assert bsdiff4.core.patch(base, len(target), control, diff, extra) == target


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.binary(min_size=1, max_size=3000), target=st.binary(max_size=3000))
def test_streams_rebuild_arbitrary_pairs(base: bytes, target: bytes) -> None:
    control, diff, extra = bsdiff_streams(base, target)
    assert bsdiff4.core.patch(base, len(target), control, diff, extra) == target


def test_subtraction_wraps_per_byte_without_borrowing() -> None:
    new = bytes([0, 1, 255, 128, 0, 7] * 1000)
    old = bytes([1, 1, 0, 129, 255, 200] * 1000)
    expected = bytes((a - b) % 256 for a, b in zip(new, old, strict=True))
    assert covers._subtract(new, old) == expected


def test_covers_are_inside_both_images_and_in_order() -> None:
    base, target = moved_blocks(4)
    raw = hdiffpatch.diff(base, target, None, validate=False)
    found = parse_covers(raw, len(base), len(target))
    assert found
    end = 0
    for old, new, length in found:
        assert new >= end and old >= 0 and old + length <= len(base)
        end = new + length
    assert end <= len(target)


def test_compressed_or_foreign_diffs_are_refused() -> None:
    base, target = moved_blocks(5)
    compressed = hdiffpatch.diff(base, target, hdiffpatch.COMPRESSION_ZSTD, validate=False)
    with pytest.raises(CoverFormatError):
        parse_covers(compressed, len(base), len(target))
    with pytest.raises(CoverFormatError):
        parse_covers(b"BSDIFF40" + bytes(40), len(base), len(target))


def test_diff_for_other_image_sizes_is_refused() -> None:
    base, target = moved_blocks(6)
    raw = hdiffpatch.diff(base, target, None, validate=False)
    with pytest.raises(CoverFormatError):
        parse_covers(raw, len(base) + 1, len(target))


@pytest.mark.parametrize("cut", [12, 20, 40])
def test_truncated_diff_is_refused(cut: int) -> None:
    base, target = moved_blocks(7)
    raw = hdiffpatch.diff(base, target, None, validate=False)
    with pytest.raises(CoverFormatError):
        parse_covers(raw[:cut], len(base), len(target))


def test_unreadable_hdiffpatch_output_falls_back_to_bsdiff4(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    base = make_image(64 * KiB, seed=8)
    target = mutate_image(base, seed=9)
    monkeypatch.setattr(hdiffpatch, "diff", lambda *a, **k: b"HDIFF99&\x00")
    delta = build_delta("bsdiff-zstd", base, target, level=3)
    assert apply_delta("bsdiff-zstd", base, delta, target_size=len(target)) == target
    assert "using bsdiff4" in caplog.text


def _edge_cut_reference(base: bytes, target: bytes, old: int, new: int, limit: int,
                        step: int) -> int:
    """bsdiff's edge rule as a plain loop: +1 per mismatch, -1 per match, cut at the first
    strict maximum above zero."""
    score = best = cut = 0
    for k in range(limit):
        score += 1 if base[old + k * step] != target[new + k * step] else -1
        if score > best:
            best, cut = score, k + 1
    return cut


@settings(max_examples=300, deadline=None)
@given(a=st.binary(min_size=1, max_size=300), flips=st.lists(st.integers(0, 299), max_size=60),
       step=st.sampled_from([1, -1]), data=st.data())
def test_vectorised_edge_cut_is_bsdiffs_rule(a: bytes, flips: list[int], step: int,
                                             data: st.DataObject) -> None:
    b = bytearray(a)
    for i in flips:
        if i < len(b):
            b[i] ^= 0x5A
    limit = data.draw(st.integers(0, len(a)))
    edge = 0 if step > 0 else len(a) - 1
    assert covers._edge_cut(a, bytes(b), edge, edge, limit, step) == \
        _edge_cut_reference(a, bytes(b), edge, edge, limit, step)
