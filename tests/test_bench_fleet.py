"""The fleet benchmark: its shaped namespace, its start barrier, a tiny real run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from bench.fleet import (
    REPO_ROOT,
    DeviceRun,
    RunResult,
    main,
    ratios,
    render_markdown,
    summarize,
)
from bench.netns import (
    ORIGIN_CLASS,
    NetnsError,
    Shaping,
    class_sent_bytes,
    exec_argv,
    missing_privileges,
    shaped_namespace,
)
from bench.origin_nginx import nginx_binary, run_nginx_origin
from swarmota.infra.http_serve import ListenConfig
from swarmota.seeder.origin import OriginApp
from swarmota.seeder.server import serve_origin

needs_netns = pytest.mark.skipif(
    missing_privileges() is not None,
    reason=f"needs root and iproute2: {missing_privileges()}")


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, check=True).stdout
    return {line.split()[0] for line in out.decode().splitlines() if line.strip()}


def test_unprivileged_user_gets_a_clear_message() -> None:
    assert "run it as root" in (missing_privileges(euid=1000) or "")


def test_shaping_refuses_non_loopback_origins_and_silly_rates() -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        Shaping("10.0.0.1", 40_000_000)
    with pytest.raises(ValueError, match="at least"):
        Shaping("127.0.1.1", 10)
    with pytest.raises(ValueError, match="LAN rate"):
        Shaping("127.0.1.1", 40_000_000, -1)


def test_bench_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--repeat", "0"], ["--devices", "0"], ["--origin-mbit", "0"],
                 ["--image-mib", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err


def _run(kind: str, scenario: str, delivered: list[float], origin: int) -> RunResult:
    return RunResult(kind=kind, scenario=scenario, devices=len(delivered), payload_bytes=1000,
                     origin_bytes_total=origin, origin_bytes_payloads=origin,
                     origin_link_bytes=origin + 10, cpu_s=2.0 * len(delivered),
                     device_runs=[DeviceRun(f"d{i}", True, "", t, t + 1, 100, 900)
                                  for i, t in enumerate(delivered)])


def test_summary_and_ratios_put_swarm_beside_the_baseline() -> None:
    rate = 100.0  # bytes per second: lower bound 10 s
    swarm = summarize([_run("full", "swarm", [11.0, 12.0], 1050),
                       _run("full", "swarm", [11.0, 13.0], 1100)], rate)
    baseline = summarize([_run("full", "baseline", [19.0, 20.0], 2000)], rate)
    assert swarm["lower_bound_s"] == 10.0
    assert swarm["delivered_slowest_s"] == 12.5  # median of the slowest devices
    assert swarm["completion_x_lower_bound"] == 1.25
    assert swarm["origin_egress_x_payload"] == pytest.approx(1.075)
    assert swarm["cpu_s_per_device"] == 2.0
    [row] = ratios([swarm, baseline])
    assert row["origin_egress_baseline_over_swarm"] == pytest.approx(2000 / 1075, abs=0.01)
    assert "direct" not in json.dumps(row)


@needs_netns
def test_namespace_shapes_the_origin_and_is_removed_after_an_error() -> None:
    shaping = Shaping("127.0.1.1", 8_000_000)  # 1 MB/s
    seen: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), \
            shaped_namespace(shaping, prefix="swarmota-test") as name:
        seen.append(name)
        assert name in namespaces()
        # A server on the origin address inside: 1 MiB takes about 1 s through the class.
        script = ("import socket,time\n"
                  "s=socket.socket(); s.bind(('127.0.1.1',0)); s.listen()\n"
                  "c=socket.create_connection(s.getsockname()); a,_=s.accept()\n"
                  "t=time.monotonic(); a.sendall(b'x'*(1<<20)); n=0\n"
                  "while n < 1<<20: n+=len(c.recv(65536))\n"
                  "print(time.monotonic()-t)\n")
        took = float(subprocess.run(exec_argv(name, [sys.executable, "-c", script]),
                                    capture_output=True, check=True, timeout=60).stdout)
        assert took > 0.5  # unshaped loopback moves 1 MiB in milliseconds
        assert class_sent_bytes(name)[ORIGIN_CLASS] >= 1 << 20
        raise RuntimeError("boom")
    assert seen and seen[0] not in namespaces()


@needs_netns
def test_leftover_namespace_of_a_dead_process_is_removed() -> None:
    stale = f"swarmota-test-{_dead_pid()}"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with shaped_namespace(Shaping("127.0.1.1", 8_000_000), prefix="swarmota-test"):
            assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_netns_errors_name_the_command() -> None:
    if shutil.which("ip") is None:
        pytest.skip("no iproute2")
    with pytest.raises(NetnsError, match="netns exec"):
        class_sent_bytes("swarmota-test-does-not-exist")


@needs_netns
def test_tiny_fleet_in_a_shaped_namespace_end_to_end(tmp_path: Path) -> None:
    """Real devices as processes, real servers, real tc: the swarm spares the origin."""
    rc = main(["--devices", "3", "--repeat", "1", "--image-mib", "2", "--origin-mbit", "40",
               "--run-timeout-s", "300", "--out", str(tmp_path)])
    assert rc == 0
    # its namespace is gone (other processes' namespaces may come and go meanwhile)
    assert f"swarmota-fleet-{os.getpid()}" not in namespaces()
    result = json.loads((tmp_path / "fleet.json").read_text())
    cells = {(c["kind"], c["scenario"]): c for c in result["cells"]}
    assert set(cells) == {(k, s) for k in ("full", "delta")
                          for s in ("baseline", "direct", "swarm")}
    assert all(c["all_ok"] and c["devices"] == 3 for c in cells.values())
    for kind in ("full", "delta"):
        assert cells[(kind, "baseline")]["origin_egress_x_payload"] == pytest.approx(3.0,
                                                                                   abs=0.01)
        assert cells[(kind, "direct")]["device_bytes_peers_median"] == 0
        assert cells[(kind, "swarm")]["device_bytes_peers_median"] > 0
        assert cells[(kind, "swarm")]["origin_egress_x_payload"] < 2.0
        # tc saw what the origin sent (plus headers)
        assert cells[(kind, "baseline")]["origin_link_x_payload"] >= 3.0
    # the delta is far smaller than the full payload
    assert cells[("delta", "swarm")]["payload_bytes"] < cells[("full", "swarm")][
        "payload_bytes"] / 2
    if nginx_binary() is not None:  # the default origin: a CDN's role
        assert "the origin is nginx" in result["notes"][0]
    markdown = (tmp_path / "fleet.md").read_text()
    assert markdown == render_markdown(result)
    assert "| full | 3 | swarm |" in markdown and "| delta | 3 | baseline |" in markdown


@needs_netns
def test_interrupted_benchmark_removes_its_namespace(tmp_path: Path) -> None:
    before = namespaces()
    # a pytest-xdist worker ignores SIGINT, and a child would inherit that: restore the
    # default, as in a terminal where Ctrl-C reaches the benchmark
    proc = subprocess.Popen([sys.executable, "-m", "bench.fleet", "--devices", "2",
                             "--repeat", "1", "--image-mib", "2", "--out", str(tmp_path)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    mine = f"swarmota-fleet-{proc.pid}"  # other benchmarks may run beside this test
    deadline = time.monotonic() + 60
    while mine not in namespaces() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mine in namespaces(), "the benchmark never created its namespace"
    time.sleep(1.0)  # let it start its inner run
    assert proc.poll() is None, "the benchmark ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 130
    assert mine not in namespaces()
    assert not {n for n in namespaces() - before if n.startswith("swarmota-fleet-")
                and n.endswith(f"-{proc.pid}")}
    assert not (tmp_path / "fleet.json").exists()
    assert os.path.isdir(tmp_path)


def test_swarmota_bench_fleet_runs_the_benchmark_of_the_checkout() -> None:
    done = subprocess.run([sys.executable, "-m", "swarmota.cli", "bench", "fleet", "--help"],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0
    assert b"python -m bench.fleet" in done.stdout and b"--origin-mbit" in done.stdout
    done = subprocess.run([sys.executable, "-m", "swarmota.cli", "bench", "fleet",
                           "--repeat", "0"], capture_output=True, timeout=60, check=False)
    assert done.returncode == 2 and b"--repeat must be >= 1" in done.stderr


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
async def test_nginx_origin_counts_what_the_embedded_origin_counts(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """The benchmark's default origin is nginx with docs/ORIGIN.md's configuration; its
    byte counts (from the access log) must be the embedded server's, request for request:
    the fleet tables compare runs of either."""
    root = tmp_path / "origin"
    files = {"metadata/timestamp.json": b"t" * 700, "metadata/3.snapshot.json": b"s" * 900,
             "targets/releases/p/ab.1.0.0.json": b"m" * 1500,
             "payloads/" + "c" * 64 + ".zst": bytes(range(256)) * 400,
             "payloads/" + "c" * 64 + ".zst.torrent": b"d" * 2000,
             "payloads/" + "e" * 64 + ".chunks": b"h" * 640}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    payload = "/payloads/" + "c" * 64 + ".zst"
    requests = [("/metadata/timestamp.json", None), ("/metadata/3.snapshot.json", None),
                ("/metadata/4.root.json", None), ("/targets/releases/p/ab.1.0.0.json", None),
                (payload, "bytes=0-65535"), (payload, "bytes=65536-102399"),
                (payload + ".torrent", None), ("/payloads/" + "e" * 64 + ".chunks", None),
                ("/payloads/.hidden", None)]
    embedded = OriginApp(root)
    embedded_url = await nursery.start(serve_origin, embedded, ListenConfig())
    with run_nginx_origin(root, tmp_path) as nginx:
        for base in (embedded_url, nginx.url):
            async with httpx.AsyncClient(base_url=base) as client:
                for path, wanted in requests:
                    headers = {"range": wanted} if wanted else {}
                    await client.get(path, headers=headers)
        counted = nginx.statistics()
        assert nginx.cpu_s() >= 0
    mine = embedded.statistics()
    assert counted.bytes_payloads == 65536 + 36864 + 2000 + 640
    for field in ("requests", "bytes_total", "bytes_metadata", "bytes_targets",
                  "bytes_payloads", "bytes_torrents", "bytes_chunk_lists", "responses_206"):
        assert getattr(counted, field) == getattr(mine, field), field
