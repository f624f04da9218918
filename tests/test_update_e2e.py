"""A signed release reaches devices end to end through the real servers on loopback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import zstandard

from swarmota.infra.devca import create_ca, issue_device_cert
from swarmota.peer.agent import update_once
from swarmota.peer.errors import StatusCode
from tests.release_env import SHARED_DATA, ReleaseEnv, read_body, start_env


def slot_bytes(state, slot: str | None = None) -> bytes:  # type: ignore[no-untyped-def]
    bc = state.bootctl()
    return state.slot_path(slot or bc.primary).read_bytes()


async def test_device_updates_v1_to_v2_and_reports(env: ReleaseEnv) -> None:
    dev = env.device("dev-1")
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert result.updated and result.reported
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "b" and not bc.pending
    assert slot_bytes(dev) == env.v2
    assert slot_bytes(dev, "a") == env.v1
    assert bc.min_release_counter == 2
    assert result.bytes_origin == env.origin_bytes(env.m2.full_payload)
    # the wall time from the check-in to every chunk verified (phases overlap: not a sum)
    timings = result.timings_s
    assert timings["checkin"] <= timings["delivered"] <= timings["total"]
    (report,) = env.reports()
    assert (report.device_id, report.status, report.to_version) == ("dev-1", 0, "2.0.0")
    assert report.bytes_origin == env.origin_bytes(env.m2.full_payload)
    assert not list(dev.downloads_dir.iterdir()), "temporary download space reclaimed"
    # A second pass finds nothing to do and downloads nothing.
    again = await update_once(dev)
    assert again.status == StatusCode.OK and not again.attempted
    assert len(env.reports()) == 1


async def test_fleet_updates_concurrently_in_direct_mode(env: ReleaseEnv) -> None:
    devices = [env.device(f"dev-{i}", mode="direct") for i in range(4)]
    async with trio.open_nursery() as nursery:
        for d in devices:
            nursery.start_soon(update_once, d)
    for d in devices:
        assert slot_bytes(d) == env.v2
    assert len(env.reports()) == 4
    assert env.origin.statistics().bytes_payloads == 4 * env.direct_bytes(env.m2.full_payload)


async def test_health_check_failure_rolls_back_and_reports_40(env: ReleaseEnv) -> None:
    dev = env.device("dev-1", health_command=[sys.executable, "-c", "raise SystemExit(3)"])
    result = await update_once(dev)
    assert result.status == StatusCode.POSTCHECK_FAILED
    assert "exited 3" in result.message
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "a" and not bc.pending
    assert slot_bytes(dev) == env.v1
    assert bc.min_release_counter == 1
    assert [r.status for r in env.reports()] == [40]


async def test_health_check_hang_times_out_and_rolls_back(env: ReleaseEnv) -> None:
    dev = env.device("dev-1", health_command=[sys.executable, "-c", "import time; time.sleep(60)"],
                     health_timeout_s=0.5)
    result = await update_once(dev)
    assert result.status == StatusCode.POSTCHECK_FAILED and "timed out" in result.message
    assert slot_bytes(dev) == env.v1


async def test_health_command_sees_the_new_slot(env: ReleaseEnv, tmp_path: Path) -> None:
    probe = tmp_path / "probe.txt"
    code = (f"import os; open({str(probe)!r}, 'w').write(os.environ['SWARMOTA_SLOT'] + ' ' + "
            "os.environ['SWARMOTA_VERSION'])")
    dev = env.device("dev-1", health_command=[sys.executable, "-c", code])
    assert (await update_once(dev)).status == StatusCode.OK
    assert probe.read_text() == "b 2.0.0"


async def test_cli_init_update_status_end_to_end(env: ReleaseEnv, tmp_path: Path) -> None:
    state = tmp_path / "cli-device"
    root = tmp_path / "root.json"
    root.write_bytes(env.repo.root_bytes())
    image = env.image_path("v1.img", env.v1)
    exe = [sys.executable, "-m", "swarmota.cli"]
    create_ca(tmp_path / "fleet-ca")
    ident = issue_device_cert(tmp_path / "fleet-ca", tmp_path / "cli-1-identity", "cli-1")
    init = await trio.run_process(
        [*exe, "peer", "init", str(state), "--root", str(root), "--origin", env.origin_url,
         "--tracker", env.tracker_url, "--image", str(image), "--version", "1.0.0",
         "--release-counter", "1", "--device-id", "cli-1", "--product", "acme-router",
         "--hardware-id", "acme-router-hw1", "--swarm-listen", "127.0.0.9:0",
         "--identity-cert", str(ident.cert), "--identity-key", str(ident.key)],
        capture_stdout=True, check=False)
    assert init.returncode == 0, init
    assert (state / "identity" / "key.pem").read_bytes() == ident.key.read_bytes()
    upd = await trio.run_process([*exe, "peer", "update", str(state), "--seed-time-s", "1"],
                                 capture_stdout=True, capture_stderr=True, check=False)
    assert upd.returncode == 0, upd.stderr
    assert b"updated 1.0.0 -> 2.0.0" in upd.stdout
    assert b"swarm mode: bytes from origin" in upd.stdout
    assert b"sharing the payload with peers for 1 s" in upd.stderr
    status = await trio.run_process([*exe, "peer", "status", str(state)], capture_stdout=True)
    assert b"slot b: 2.0.0" in status.stdout and b"booted committed" in status.stdout


def test_cli_help_explains_every_command() -> None:
    for args in ([], ["peer"], ["peer", "update"], ["seeder"], ["seeder", "publish"],
                 ["tracker"], ["tracker", "serve"], ["demo"]):
        out = subprocess.run([sys.executable, "-m", "swarmota.cli", *args, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "usage:" in out


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
async def test_real_rootfs_openssl_3_0_17_to_3_0_22(tmp_path: Path, nursery: trio.Nursery) -> None:
    def load(version: str) -> bytes:
        packed = (SHARED_DATA / f"rootfs-openssl-{version}.img.zst").read_bytes()
        return zstandard.ZstdDecompressor().decompress(packed, max_output_size=64 << 20)

    v1, v2 = load("3.0.17"), load("3.0.22")
    assert hashlib.sha256(v2).hexdigest().startswith("0647b1f2")
    env = await start_env(nursery, tmp_path, v1, v2)
    dev = env.device("real-1")
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert slot_bytes(dev) == v2
    assert os.path.getsize(dev.slot_path("b")) == 8304640


async def test_report_kept_while_tracker_down_and_delivered_later(
        env: ReleaseEnv, nursery: trio.Nursery) -> None:
    """Nothing reported is lost: a report the tracker could not take waits in the outbox."""
    import json

    from swarmota.infra.http_serve import ListenConfig, serve_asgi

    received: list[dict[str, object]] = []
    tracker_up = False

    async def flaky_tracker(scope, receive, send):  # type: ignore[no-untyped-def]
        body = await read_body(receive)
        request = json.loads(body)
        if scope["path"] == "/v1/checkin":
            offer = None if request["release_counter"] >= 2 else {
                "product": "acme-router", "version": "2.0.0", "release_counter": 2,
                "target": "releases/acme-router/2.0.0.json"}
            status, answer = 200, {"release": offer, "poll_after_s": 60}
        elif tracker_up:
            received.append(request)
            status, answer = 200, {"ok": True}
        else:
            status, answer = 503, {"error": "overloaded"}
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    url = await nursery.start(serve_asgi, flaky_tracker, ListenConfig())
    dev = env.device("dev-1", tracker_url=url)
    first = await update_once(dev)
    assert first.status == StatusCode.OK and first.updated and not first.reported
    assert len(dev.outbox()) == 1
    tracker_up = True
    second = await update_once(dev)
    assert not second.attempted
    assert [(r["to_version"], r["status"]) for r in received] == [("2.0.0", 0)]
    assert dev.outbox() == []


def test_request_plan_groups_adjacent_missing_chunks() -> None:
    from swarmota.peer.download import MAX_REQUEST_BYTES, plan_requests

    chunk = 16384
    runs = plan_requests([0, 1, 2, 3, 5, 6, 9], chunk, 100 * chunk, concurrency=1)
    assert runs == [[0, 1, 2, 3], [5, 6], [9]]
    # Small payloads still spread over the workers; big ones are capped per request.
    assert len(plan_requests(list(range(64)), chunk, 64 * chunk, concurrency=4)) == 16
    big = plan_requests(list(range(4096)), chunk, 4096 * chunk, concurrency=2)
    assert max(len(r) for r in big) * chunk == MAX_REQUEST_BYTES


async def test_full_payload_download_uses_few_range_requests(env: ReleaseEnv) -> None:
    dev = env.device("dev-1")
    before = env.origin.statistics().requests
    assert (await update_once(dev)).status == StatusCode.OK
    from swarmota.peer.download import plan_requests

    requests = env.origin.statistics().requests - before
    p = env.m2.full_payload
    runs = len(plan_requests(list(range(p.chunk_count)), p.chunk_size, p.size, concurrency=4))
    metadata_requests = 6  # timestamp, snapshot, targets, next root (404), manifest, slack
    # adjacent chunks share a request, down to about four runs per worker (a small
    # payload of 32 KiB chunks has few enough chunks that each is a run)
    assert runs <= max(p.chunk_count // 2, 2 * 4 * 4)
    assert requests <= runs + metadata_requests, (requests, runs, p.chunk_count)
