"""Trusted metadata survives power cuts: written durably, and a torn file is mended
from what was verified before, never taken as a verdict on the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode, VerifyFailed
from swarmota.peer.trust import _DurableUpdater, _mend_torn_metadata
from tests.release_env import ReleaseEnv


async def test_torn_trusted_metadata_after_a_power_cut_is_mended_and_the_update_goes_on(
        env: ReleaseEnv) -> None:
    """A VM killed in the middle of a slot write left a trusted file torn; the agent
    refused every update after it (status 20, 'Failed to deserialize JSON')."""
    dev = env.device("dev-1", mode="direct")
    trust = dev.trust_dir
    (trust / "timestamp.json").write_bytes(b"")                # torn to nothing
    root = trust / "root.json"
    whole = root.read_bytes()
    (trust / "root_history").mkdir(exist_ok=True)
    (trust / "root_history" / "1.root.json").write_bytes(whole)  # what python-tuf keeps
    root.write_bytes(whole[: len(whole) // 2])                 # torn half way
    result = await update_once(dev)
    assert result.status == StatusCode.OK and result.updated, result.message
    assert root.read_bytes() == whole


def test_a_torn_root_with_no_verified_history_is_refused_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "root.json").write_bytes(b'{"signed": ')
    with pytest.raises(VerifyFailed, match="re-provision"):
        _mend_torn_metadata(tmp_path)


def test_trusted_metadata_is_written_with_an_fsync(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    updater = _DurableUpdater.__new__(_DurableUpdater)  # only its persistence is used
    updater._persist_file(str(tmp_path / "timestamp.json"), b"{}")
    assert (tmp_path / "timestamp.json").read_bytes() == b"{}"
    assert len(synced) >= 2, "the file and its directory"
