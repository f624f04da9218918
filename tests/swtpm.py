"""A real software TPM per test: Debian's ``swtpm`` on a UNIX socket in a temporary
directory, driven by the agent through ``tpm2-tools`` (``peer/tpm.py``); stopped after
the test. Tests skip with the reason when either is missing (``.ci/run`` installs both).

:class:`SoftTpm` can also cut the TPM's power (SIGKILL) and bring it back on the same
state, as a device's power cut does: what the TPM had committed to its NV memory is
there, nothing else.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmota.peer.tpm import Tpm, tools_missing

__all__ = ["SoftTpm", "pcr_extend", "soft_tpm", "swtpm_missing"]


def swtpm_missing() -> str | None:
    """Why the software TPM cannot run here (``None``: it can)."""
    if shutil.which("swtpm") is None:
        return "swtpm not installed (Debian package swtpm; .ci/run installs it)"
    missing = tools_missing()
    if missing:
        return f"tpm2-tools not installed ({', '.join(missing[:3])}...)"
    return None


class SoftTpm:
    """One ``swtpm`` process with its state in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def device(self) -> str:
        """What ``peer init --tpm-device`` is given."""
        return f"swtpm:path={self.socket}"

    def tpm(self) -> Tpm:
        return Tpm(self.device)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in (self.socket, self.socket.with_name("sock.ctrl")):
            stale.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.directory}",
             "--server", f"type=unixio,path={self.socket}",
             "--ctrl", f"type=unixio,path={self.socket}.ctrl",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not (self.socket.exists() and self.socket.with_name("sock.ctrl").exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swtpm did not start (exit {self.proc.poll()})")
            time.sleep(0.01)

    def power_cut(self) -> None:
        """SIGKILL: the TPM keeps only what it committed to its NV memory."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.power_cut()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def pcr_extend(tpm: SoftTpm, pcr: int, data: bytes) -> None:
    """Extend PCR ``pcr`` (sha256 bank) as a boot stage measuring ``data`` would."""
    tpm.tpm().run("tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}")


@pytest.fixture
def soft_tpm(tmp_path: Path) -> Iterator[SoftTpm]:
    """A started software TPM for this test (skips when swtpm or tpm2-tools is absent)."""
    reason = swtpm_missing()
    if reason is not None:
        pytest.skip(reason)
    tpm = SoftTpm(tmp_path / "swtpm")
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()
