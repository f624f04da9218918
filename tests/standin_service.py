"""A stand-in for a device service, as a real process: it serves the SHA-256 of a
component's current content on a unix socket, with a pid file and a log of starts and
stops. Used by the hot-update tests as the service commands and health check.

    standin_service.py start NAME RUN FILE   # start (detached); fails if it does not come up
    standin_service.py stop NAME RUN         # stop it (no-op when not running)
    standin_service.py restart NAME RUN FILE
    standin_service.py check NAME RUN FILE   # exit 0 if it serves FILE's current content

The service refuses to come up when the content holds b"BROKEN" (a bad release).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _log(run: Path, name: str, line: str) -> None:
    with open(run / "events.log", "a") as fh:
        fh.write(f"{name} {line}\n")


def serve(name: str, run: Path, file: Path) -> None:
    content = file.read_bytes()
    if b"BROKEN" in content:
        sys.exit(3)
    digest = hashlib.sha256(content).hexdigest()
    path = run / f"{name}.sock"
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    (run / f"{name}.pid").write_text(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(f"{os.getpid()} {digest}\n".encode())


def ask(name: str, run: Path) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(str(run / f"{name}.sock"))
        return sock.recv(200).decode().strip()


def start(name: str, run: Path, file: Path) -> int:
    (run / f"{name}.pid").unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "serve", name, str(run), str(file)],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _log(run, name, f"failed {proc.returncode}")
            return 1
        try:
            answer = ask(name, run)
        except OSError:
            time.sleep(0.02)
            continue
        _log(run, name, f"start {answer.split()[0]}")
        return 0
    return 1


def stop(name: str, run: Path) -> int:
    try:
        pid = int((run / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    (run / f"{name}.pid").unlink(missing_ok=True)
    _log(run, name, f"stop {pid}")
    return 0


def alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever adopted it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def check(name: str, run: Path, file: Path) -> int:
    want = hashlib.sha256(file.read_bytes()).hexdigest()
    try:
        answer = ask(name, run)
    except OSError as exc:
        print(f"{name} does not answer: {exc}", file=sys.stderr)
        return 1
    if answer.split()[1] != want:
        print(f"{name} serves {answer.split()[1][:12]}, not {want[:12]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    verb, name, run = argv[0], argv[1], Path(argv[2])
    if verb == "serve":
        serve(name, run, Path(argv[3]))
        return 0
    if verb == "start":
        return start(name, run, Path(argv[3]))
    if verb == "stop":
        return stop(name, run)
    if verb == "restart":
        stop(name, run)
        return start(name, run, Path(argv[3]))
    return check(name, run, Path(argv[3]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
