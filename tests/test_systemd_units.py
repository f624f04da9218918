"""The shipped systemd units as an operator installs them (`swarmota systemd-units`):
valid for systemd, sandboxed, re-signing the timestamp well before it expires, and run
by services that tell systemd when they are ready and feed its watchdog."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from swarmota import cli
from swarmota.cli import build_parser
from swarmota.seeder import ExpiryConfig
from swarmota.units import render_units, swarmota_command

ROOT = Path(__file__).resolve().parent.parent
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed "
                                   "(Debian package systemd; .ci/run installs it)")


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("units")
    assert cli.main(["systemd-units", "--output", str(directory)]) == 0
    return directory


def test_units_are_written_with_this_installs_command(units: Path) -> None:
    names = sorted(p.name for p in units.iterdir())
    assert names == ["swarmota-agent.service", "swarmota-origin.service",
                     "swarmota-timestamp.service", "swarmota-timestamp.timer",
                     "swarmota-tracker.service", "swarmota.sysusers"]
    command = swarmota_command()
    for path in units.glob("*.service"):
        text = path.read_text()
        assert "@SWARMOTA@" not in text
        assert f"ExecStart={command} " in text, path.name


@needs_analyze
def test_units_pass_systemd_analyze_verify_without_a_warning(units: Path) -> None:
    assert ANALYZE is not None
    files = sorted(str(p) for p in units.iterdir() if p.suffix in (".service", ".timer"))
    done = subprocess.run([ANALYZE, "verify", *files], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", "systemd-analyze warned: " + done.stderr


@needs_analyze
@pytest.mark.parametrize("name", ["swarmota-tracker.service", "swarmota-origin.service",
                                  "swarmota-timestamp.service"])
def test_server_units_are_sandboxed(units: Path, name: str) -> None:
    """Unprivileged user, read-only system, no capabilities, no devices, a syscall
    filter: systemd's own exposure score stays "OK" (below 2 of 10)."""
    assert ANALYZE is not None
    done = subprocess.run([ANALYZE, "security", "--offline=yes", str(units / name)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found is not None, done.stdout + done.stderr
    assert float(found.group(1)) < 2.0, done.stdout


@needs_analyze
def test_the_timer_re_signs_the_timestamp_three_times_within_its_lifetime(
        units: Path) -> None:
    assert ANALYZE is not None
    timer = (units / "swarmota-timestamp.timer").read_text()
    calendar = re.search(r"^OnCalendar=(.+)$", timer, re.M)
    delay = re.search(r"^RandomizedDelaySec=(\d+)min$", timer, re.M)
    assert calendar is not None and delay is not None and "Persistent=true" in timer
    done = subprocess.run([ANALYZE, "calendar", "--iterations=6", calendar.group(1)],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, TZ="UTC", LC_ALL="C"))
    assert done.returncode == 0, done.stderr
    times = [datetime.strptime(m, "%Y-%m-%d %H:%M:%S") for m in
             re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", done.stdout)]
    assert len(times) >= 6, done.stdout
    worst_gap_s = max((b - a).total_seconds() for a, b in itertools.pairwise(times))
    worst_gap_s += int(delay.group(1)) * 60
    assert 3 * worst_gap_s <= ExpiryConfig().timestamp_s


def test_every_unit_runs_a_command_swarmota_accepts(units: Path) -> None:
    parser = build_parser()
    for path in units.glob("*.service"):
        line = re.search(r"^ExecStart=(.+)$", path.read_text(), re.M)
        assert line is not None, path.name
        argv = shlex.split(line.group(1))[1:]
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown flag
        assert callable(args.func), path.name


def test_an_edited_unit_is_kept_unless_forced(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["systemd-units", "--output", str(tmp_path)]) == 0
    edited = tmp_path / "swarmota-tracker.service"
    edited.write_text(edited.read_text() + "# local edit\n")
    capsys.readouterr()
    assert cli.main(["systemd-units", "--output", str(tmp_path)]) == 1
    assert "swarmota-tracker.service" in capsys.readouterr().err
    assert edited.read_text().endswith("# local edit\n")
    assert cli.main(["systemd-units", "--output", str(tmp_path), "--force"]) == 0
    assert edited.read_bytes() == render_units(swarmota_command())[edited.name]


def _serve_notified(argv: list[str], tmp_path: Path) -> tuple[list[str], int, str]:
    """Run ``swarmota ARGV`` as systemd would (NOTIFY_SOCKET, a 0.4 s watchdog) until
    READY=1 and two watchdog pings arrived, then SIGTERM it; the notifications, its
    exit code and its stderr."""
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(30)
        proc = subprocess.Popen([sys.executable, "-m", "swarmota", *argv], cwd=ROOT,
                                env=dict(os.environ, NOTIFY_SOCKET=address,
                                         WATCHDOG_USEC="400000"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        messages: list[str] = []
        try:
            while messages.count("WATCHDOG=1") < 2:
                messages.extend(notify.recv(4096).decode().split("\n"))
            proc.send_signal(signal.SIGTERM)
            while not any(m == "STOPPING=1" for m in messages):
                messages.extend(notify.recv(4096).decode().split("\n"))
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return messages, proc.returncode, err


def test_tracker_serve_tells_systemd_it_is_ready_and_feeds_its_watchdog(
        tmp_path: Path) -> None:
    messages, rc, err = _serve_notified(
        ["tracker", "serve", "--allow-unauthenticated-devices", "--db",
         str(tmp_path / "t.sqlite"), "--listen", "127.0.0.1:0"], tmp_path)
    assert rc == 0, err
    assert messages.index("READY=1") < messages.index("WATCHDOG=1")
    assert any(re.fullmatch(r"STATUS=serving on https?://127\.0\.0\.1:\d+", m) for m in messages)
    assert "STOPPING=1" in messages


def test_seeder_serve_tells_systemd_it_is_ready_and_feeds_its_watchdog(
        tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    (origin / "metadata").mkdir(parents=True)
    messages, rc, err = _serve_notified(
        ["seeder", "serve", str(origin), "--no-seed", "--listen", "127.0.0.1:0"], tmp_path)
    assert rc == 0, err
    assert messages.index("READY=1") < messages.index("WATCHDOG=1")
    assert "STOPPING=1" in messages


def test_python_dash_m_swarmota_is_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "swarmota", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage: swarmota" in done.stdout


def test_bench_outside_a_source_checkout_says_what_it_needs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "checkout_root", lambda: tmp_path)  # a wheel's site-packages
    assert cli.main(["bench", "swarm"]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and "dev.py swarmota bench swarm" in err
