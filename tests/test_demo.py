"""`swarmota demo` runs the whole publish and fleet update and tells the truth about it."""

from __future__ import annotations

import io
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from swarmota.demo import run_demo

ROOT = Path(__file__).resolve().parent.parent


async def test_demo_updates_every_device_through_the_delta_in_the_swarm(
        tmp_path: Path) -> None:
    out = io.StringIO()
    outcome = await run_demo(tmp_path, devices=3, image_size_bytes=1 << 20, zstd_level=3,
                             out=out)
    text = out.getvalue()
    assert outcome.ok, text
    assert outcome.reports_stored == 3 + 1  # v2 on every device, v3 on the canary
    results = outcome.results.values()
    assert all(r.payload_kind == "delta" and r.download_mode == "swarm" for r in results)
    # Every payload byte a device used came from the origin, the seeder or a peer.
    assert outcome.origin_bytes_payloads + sum(r.bytes_peers for r in results) \
        >= 3 * outcome.payload_size
    assert "demo OK" in text and text.count(" updated ") == 3
    assert "origin at https://" in text and "tracker at https://" in text
    assert "checks in: refused by the tracker" in text
    assert "CDN egress for payloads" in text and "saved" in text
    # Canary first: the others were told to wait, then the rollout opened to everyone.
    assert "2 other devices checked in and were told to wait (0 offered)" in text
    canary, everyone = outcome.rollout_stages
    assert canary[:4] == ("canary", 1, 1, 0) and everyone[:4] == ("100%", 2, 2, 0)
    # Then the bad release: it stopped at its canary, which the halt reason names.
    assert outcome.bad_release_phase == "halted"
    assert outcome.halt_reason.startswith(
        "canary stage: 1 failed of 1 offered (limit 1): device-01 (stage canary, status 40 "
        "post-check-failed): health check exited 1"), outcome.halt_reason
    assert "rollout of 3.0.0 halted at stage canary" in text
    assert "2 other devices checked in: 0 offered" in text


async def test_demo_in_direct_mode_fetches_each_delta_from_the_origin(tmp_path: Path) -> None:
    out = io.StringIO()
    outcome = await run_demo(tmp_path, devices=2, image_size_bytes=1 << 20, zstd_level=3,
                             mode="direct", cdn_rate_bytes_per_s=None, out=out)
    assert outcome.ok, out.getvalue()
    # each device: the delta and its chunk list (the manifest it reads is the compact one)
    assert outcome.origin_bytes_chunk_lists > 0 and outcome.origin_bytes_chunk_lists % 64 == 0
    assert outcome.origin_bytes_payloads - outcome.origin_bytes_chunk_lists \
        == 2 * outcome.payload_size
    assert outcome.seeder_bytes == 0 and outcome.peer_bytes == 0


async def test_demo_reports_failure_when_a_device_cannot_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo must not claim success it did not see: damage v2's payloads on the origin
    right after they are published (fault injection around the real publish)."""
    from swarmota import demo

    real_publish = demo.publish_release

    def publish_then_damage(*args, **kwargs):  # type: ignore[no-untyped-def]
        manifest = real_publish(*args, **kwargs)
        if manifest.version == "2.0.0":
            for payload in manifest.payloads:
                (args[0].origin_dir / payload.path).write_bytes(b"garbage")
        return manifest

    monkeypatch.setattr(demo, "publish_release", publish_then_damage)
    out = io.StringIO()
    outcome = await run_demo(tmp_path, devices=3, image_size_bytes=1 << 20, zstd_level=3,
                             out=out)
    assert not outcome.ok
    text = out.getvalue()
    assert "demo FAILED" in text
    # The bad release stopped itself at the canary: nobody else was ever offered it.
    assert "rollout of 2.0.0 halted" in text
    canary, everyone = outcome.rollout_stages
    assert canary[1:4] == (1, 0, 1) and everyone[1] == 0
    assert not any(outcome.results[d].attempted for d in ("device-02", "device-03"))


async def test_demo_with_a_single_device_is_its_own_canary(tmp_path: Path) -> None:
    out = io.StringIO()
    outcome = await run_demo(tmp_path, devices=1, image_size_bytes=1 << 20, zstd_level=3,
                             mode="direct", cdn_rate_bytes_per_s=None, out=out)
    assert outcome.ok, out.getvalue()
    canary, everyone = outcome.rollout_stages
    assert canary[:3] == ("canary", 1, 1) and everyone[1] == 0


def test_demo_console_keeps_the_servers_up_until_interrupted(tmp_path: Path) -> None:
    """``swarmota demo --console``: after the report, the console's address and an admin
    token; the tracker answers both until SIGINT, then the demo exits 0."""
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "swarmota.cli", "demo", "--console", "--devices", "2",
         "--image-mib", "1", "--cdn-rate-mib", "0", "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out = proc.stdout
    assert out is not None
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in out:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not any("servers stay up until Ctrl-C" in line for line in seen):
            assert proc.poll() is None, "".join(seen)
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        text = "".join(seen)
        assert "demo OK" in text, text
        url = re.search(r"^console: (https://127\.0\.0\.1:\d+/console/)$", text, re.M)
        token = re.search(r"admin token \(this run only\): (sot_\S+)$", text, re.M)
        assert url is not None and token is not None, text
        tls = ssl.create_default_context(cafile=workdir / "pki" / "server-ca" / "ca.pem")
        with httpx.Client(verify=tls, trust_env=False, timeout=10) as http:
            page = http.get(url.group(1))
            assert page.status_code == 200 and "frame-ancestors 'none'" in \
                page.headers["content-security-policy"]
            fleet = http.get(url.group(1).replace("/console/", "/v1/admin/fleet"),
                             headers={"authorization": f"Bearer {token.group(1)}"}).json()
            assert fleet["devices"] == 2 and fleet["versions"] == {
                "acme-router": {"2.0.0": 2}}, fleet
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        rest = "".join(lines.get(timeout=10) for _ in range(lines.qsize()))
        assert "SIGINT: stopping the servers" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
