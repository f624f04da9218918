"""The key ceremony of docs/SECURITY.md, run as written: every ``swarmota`` line of its
command block, in order, must succeed; then what it promised is checked."""

from __future__ import annotations

import random
import re
import shlex
from pathlib import Path

import pytest

from swarmota.cli import main
from swarmota.seeder.publish import published_releases
from swarmota.seeder.repository import Repository

SECURITY = Path(__file__).resolve().parents[1] / "docs" / "SECURITY.md"


def ceremony_commands() -> list[str]:
    text = SECURITY.read_text()
    block = re.search(r"<!-- ceremony -->\n```sh\n(.*?)```", text, re.S)
    assert block is not None, "docs/SECURITY.md lost its ceremony block"
    return [line for line in block.group(1).splitlines() if line.startswith("swarmota ")]


def test_every_step_of_the_documented_key_ceremony_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for version, seed in (("2.0.0", 2), ("3.0.0", 3)):
        Path(f"fw-{version}.img").write_bytes(random.Random(seed).randbytes(50_000))
    commands = ceremony_commands()
    assert len(commands) >= 20
    for line in commands:
        assert main(shlex.split(line)[1:]) == 0, line

    repo = Repository.open(tmp_path / "repo")
    assert set(published_releases(repo, "acme-router")) == {"2.0.0"}, "3.0.0 withdrawn"
    reset = repo.counter_resets()["acme-router"]
    assert (reset.epoch, reset.floor) == (1, 2)
    root = repo.root()
    assert (root.roles["targets"].threshold, len(root.roles["targets"].keyids)) == (2, 3)
    assert any(root.keys[k].unrecognized_fields.get("x-swarmota-holder") == "dana"
               for k in root.roles["targets"].keyids)
    assert (tmp_path / "repo" / "retired-keys" / "timestamp.pem").is_file()
    request = repo.staged()
    assert request is not None and request.changes[-1].startswith("rotate root keys")
