"""`swarmota tracker serve` as an operator runs it: stopped by signals wherever it was
started, clear about an address in use, and never making directories for a typo."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "swarmota.cli", "tracker", "serve",
         "--allow-unauthenticated-devices"]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell's '&' does


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_started_in_the_background_stops_cleanly_on_sigint_and_sigterm(
        tmp_path: Path, signum: signal.Signals) -> None:
    proc = subprocess.Popen([*SERVE, "--db", str(tmp_path / "t.sqlite"), "--listen",
                             "127.0.0.1:0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ignore_sigint)
    try:
        assert proc.stdout is not None
        assert "tracker listening on" in proc.stdout.readline()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"tracker stopping ({signum.name})" in err and "Traceback" not in err


def test_an_address_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags in (["--listen", f"127.0.0.1:{port}"],
                      ["--listen", "127.0.0.1:0", "--announce-listen", f"127.0.0.1:{port}"]):
            done = subprocess.run([*SERVE, "--db", str(tmp_path / "t.sqlite"), *flags],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert done.returncode == 1
            assert re.search(rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use",
                             done.stderr), done.stderr


def test_a_database_in_a_missing_directory_is_refused_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    done = subprocess.run([*SERVE, "--db", str(missing / "t.sqlite")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("argv", [
    ["tracker", "serve", "--allow-unauthenticated-devices", "--db", "t.sqlite",
     "--listen", "::1:8470"],
    ["seeder", "serve", "origin", "--listen", "::1:8470"],
])
def test_a_bad_listen_address_is_refused_with_the_reason(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from swarmota.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "put an IPv6 address in brackets" in capsys.readouterr().err
