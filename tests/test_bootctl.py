"""Boot control: try counter armed only while pending, fallback, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmota.peer.bootctl import (
    SlotRecord,
    boot,
    fall_back,
    initial_bootctl,
    mark_good,
    read_bootctl,
    redundant_path,
    switch_to,
    write_bootctl,
)
from swarmota.peer.errors import ConfigError

V1 = SlotRecord("1.0", 1, "a" * 64, 10)
V2 = SlotRecord("2.0", 2, "b" * 64, 11)


def test_pending_slot_boots_once_then_falls_back_after_a_reboot_loop() -> None:
    bc = switch_to(initial_bootctl(V1), "b", V2, tries=1)
    assert bc.pending and bc.primary == "b"
    bc, booted = boot(bc)
    assert booted == "b" and bc.tries_remaining == 0
    bc, booted = boot(bc)  # crashed during the health check, rebooted
    assert booted == "a" and not bc.pending


def test_committed_slot_never_falls_back_later() -> None:
    bc = switch_to(initial_bootctl(V1), "b", V2, tries=1)
    bc, _ = boot(bc)
    bc = mark_good(bc)
    assert bc.committed == "b" and bc.min_release_counter == 2
    for _ in range(5):
        bc, booted = boot(bc)
        assert booted == "b"


def test_fall_back_keeps_anti_rollback_floor() -> None:
    bc = fall_back(switch_to(initial_bootctl(V1), "b", V2))
    assert bc.primary == "a" and bc.min_release_counter == 1


def test_record_round_trips_and_generation_increases(tmp_path: Path) -> None:
    path = tmp_path / "bootctl.json"
    stored = write_bootctl(path, initial_bootctl(V1))
    again = write_bootctl(path, switch_to(stored, "b", V2))
    assert read_bootctl(path) == again and again.generation == stored.generation + 1


def test_torn_or_corrupt_record_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "bootctl.json"
    write_bootctl(path, initial_bootctl(V1))
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"primary": "a"', b'"primary": "b"'))
    with pytest.raises(ConfigError, match="checksum"):
        read_bootctl(path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError):
        read_bootctl(path)


def test_writes_alternate_between_the_two_copies(tmp_path: Path) -> None:
    path = tmp_path / "bootctl.json"
    first = write_bootctl(path, initial_bootctl(V1))
    second = write_bootctl(path, switch_to(first, "b", V2))
    assert read_bootctl(redundant_path(path)) == second
    assert read_bootctl(path) == second  # the newest valid copy wins
    third = write_bootctl(path, mark_good(second))
    assert _decode_file(path) == third and _decode_file(redundant_path(path)) == second


def _decode_file(path: Path) -> object:
    from swarmota.peer.bootctl import _decode

    return _decode(path.read_bytes(), path)


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_a_torn_copy_costs_at_most_the_last_transition(tmp_path: Path, damage: str) -> None:
    """Power cut on a file system that keeps the rename but loses data blocks: the
    newest copy is torn; the other copy (one transition older) still boots a verified
    slot, and the next write goes over the torn copy."""
    path = tmp_path / "bootctl.json"
    committed = write_bootctl(path, initial_bootctl(V1))
    pending = write_bootctl(path, switch_to(committed, "b", V2))
    newest = redundant_path(path)
    data = newest.read_bytes()
    newest.write_bytes({"truncate": data[: len(data) // 3], "empty": b"",
                        "garble": data.replace(b'"primary": "b"', b'"primary": "a"')}[damage])
    assert read_bootctl(path) == committed
    again = write_bootctl(path, switch_to(read_bootctl(path), "b", V2))
    assert again.generation == pending.generation and read_bootctl(newest) == again


def test_both_copies_torn_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bootctl.json"
    write_bootctl(path, switch_to(write_bootctl(path, initial_bootctl(V1)), "b", V2))
    path.write_bytes(b"{")
    redundant_path(path).write_bytes(b"")
    with pytest.raises(ConfigError, match="no valid boot-control record"):
        read_bootctl(path)
