"""What an operator meets at the command line when things go wrong (issue 15, "CLI and
docs"): output piped into ``head`` (a closed pipe) on any command, ``peer update`` on a
directory that is not a device, a ``peer init`` that fails halfway, and help texts
that name flags that exist. No traceback, ever; a clear message and exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarmota.cli import EXIT_BROKEN_PIPE, main
from swarmota.seeder import Repository
from tests.release_env import HARDWARE_ID, PRODUCT
from tests.test_seeder_cli import run as run_seeder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def provisioning(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository's root.json, a factory image, a fleet CA and an identity issued to
    another device than the one provisioned."""
    base = tmp_path_factory.mktemp("provisioning")
    assert run_seeder("seeder", "init", str(base / "repo")) == 0
    (base / "root.json").write_bytes(Repository.open(base / "repo").root_bytes())
    (base / "factory.img").write_bytes(b"\0" * 8192)
    assert main(["tls", "ca", str(base / "fleet-ca")]) == 0
    assert main(["tls", "device-cert", str(base / "other"), "--ca", str(base / "fleet-ca"),
                 "--device-id", "someone-else"]) == 0
    return base


def init_args(base: Path, state: Path, *extra: str) -> list[str]:
    return ["peer", "init", str(state), "--root", str(base / "root.json"),
            "--image", str(base / "factory.img"), "--version", "1.0.0",
            "--device-id", "d1", "--product", PRODUCT, "--hardware-id", HARDWARE_ID,
            "--origin", "http://127.0.0.1:9", "--tracker", "http://127.0.0.1:9", *extra]


def into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``swarmota ARGV`` with its stdout a pipe whose reader is gone."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        return subprocess.run([sys.executable, "-m", "swarmota.cli", *argv], stdout=writer,
                              stderr=subprocess.PIPE, cwd=ROOT, timeout=120, check=False)
    finally:
        os.close(writer)


def test_output_into_a_closed_pipe_ends_any_command_quietly(
        provisioning: Path, tmp_path: Path) -> None:
    """``swarmota ... | head``: help, a command that creates something, a status: exit
    141 (as for SIGPIPE), nothing on stderr (a BrokenPipeError traceback, or a command
    reporting the pipe as its own failure)."""
    assert main(init_args(provisioning, tmp_path / "dev")) == 0
    for argv in (["--help"], ["tls", "device-cert", "--help"],
                 ["tls", "ca", str(tmp_path / "ca")],
                 ["peer", "status", str(tmp_path / "dev"), "--json"]):
        proc = into_closed_pipe(*argv)
        assert (proc.returncode, proc.stderr) == (EXIT_BROKEN_PIPE, b""), (argv, proc)


def test_peer_update_on_a_missing_directory_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "device"
    assert main(["peer", "update", str(missing)]) == 2
    assert "is not a device state directory: run 'swarmota peer init'" in \
        capsys.readouterr().err
    assert not (tmp_path / "no").exists(), "nothing created"


def test_a_failed_peer_init_leaves_no_half_made_state_directory(
        provisioning: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The identity is for another device: found after the slot, configuration and
    boot control were written (it left all of them). Nothing is left, neither the
    directory nor a temporary one beside it; an empty directory given stays empty; a
    device re-provisioned with --force keeps its configuration."""
    identity = ["--identity-cert", str(provisioning / "other" / "cert.pem"),
                "--identity-key", str(provisioning / "other" / "key.pem")]
    state = tmp_path / "dev"
    assert main(init_args(provisioning, state, *identity)) == 2
    assert "identity certificate is for 'someone-else'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    state.mkdir()
    assert main(init_args(provisioning, state, *identity)) == 2
    assert list(state.iterdir()) == [] and list(tmp_path.iterdir()) == [state]
    assert main(init_args(provisioning, state)) == 0
    before = (state / "device.json").read_bytes()
    assert main(init_args(provisioning, state, "--force", "--concurrency", "8",
                          *identity)) == 2
    assert (state / "device.json").read_bytes() == before


def test_help_names_only_flags_that_exist(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    """``tls device-cert --help`` named ``seeder serve --identity-cert`` (it is
    ``--identity``); ``tls ca`` told operators to give any CA to devices as
    ``--tls-ca-file`` (right for a server CA only; a fleet CA goes to the tracker)."""
    with pytest.raises(SystemExit):
        main(["tls", "device-cert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seeder serve --identity DIR" in text and "--identity-cert ..." not in text
    with pytest.raises(SystemExit):
        main(["seeder", "serve", "--help"])
    assert "--identity DIR" in capsys.readouterr().out
    assert main(["tls", "ca", str(tmp_path / "ca")]) == 0
    out = capsys.readouterr().out
    assert "as a server CA" in out and "--tls-ca-file" in out
    assert "as a fleet CA" in out and "tracker serve --device-ca" in out
