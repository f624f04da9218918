"""``swarmota peer run``: poll interval with jitter, backoff after errors, a retry budget
per release, and a clean, prompt exit on SIGTERM (a real process)."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.config import save_config
from swarmota.peer.daemon import DaemonConfig, next_delay_s, run_daemon
from swarmota.peer.errors import ConfigError, StatusCode
from tests.release_env import ReleaseEnv

ROOT = Path(__file__).resolve().parents[1]


def result(status: StatusCode = StatusCode.OK, poll_after_s: int = 600) -> UpdateResult:
    return UpdateResult(status, "", poll_after_s=poll_after_s)


def test_poll_interval_with_jitter_and_backoff_after_errors() -> None:
    config = DaemonConfig(poll_interval_s=100, jitter_fraction=0.2, backoff_initial_s=10,
                          backoff_max_s=45)
    assert next_delay_s(config, result(), 0, lambda: 0.0) == pytest.approx(80)
    assert next_delay_s(config, result(), 0, lambda: 0.5) == pytest.approx(100)
    assert next_delay_s(config, result(), 0, lambda: 0.999) < 120
    no_jitter = DaemonConfig(jitter_fraction=0, backoff_initial_s=10, backoff_max_s=45)
    assert next_delay_s(no_jitter, result(poll_after_s=600), 0, lambda: 0.3) == 600
    failed = result(StatusCode.DOWNLOAD_FAILED)
    assert [next_delay_s(no_jitter, failed, n, lambda: 0.3) for n in (1, 2, 3, 4, 40)] \
        == [10, 20, 40, 45, 45]
    for bad in ({"poll_interval_s": 0}, {"jitter_fraction": 1.0}, {"retry_budget": 0},
                {"backoff_initial_s": 5, "backoff_max_s": 1}, {"retry_window_s": 0},
                {"min_poll_after_s": -1}):
        with pytest.raises(ConfigError):
            DaemonConfig(**bad)  # type: ignore[arg-type]


def test_a_tracker_answering_poll_after_zero_does_not_make_the_device_poll_in_a_loop() -> None:
    """The tracker's ``poll_after_s`` is clamped to ``min_poll_after_s`` (30 s), still
    jittered; an interval the operator configured is taken as given."""
    config = DaemonConfig(jitter_fraction=0.1)
    delays = [next_delay_s(config, result(poll_after_s=0), 0, lambda r=r: r)
              for r in (0.0, 0.5, 0.999)]
    assert delays[0] == pytest.approx(27) and delays[1] == pytest.approx(30)
    assert 32.9 < delays[2] < 33
    assert next_delay_s(config, result(poll_after_s=45), 0, lambda: 0.5) == pytest.approx(45)
    configured = DaemonConfig(poll_interval_s=1, jitter_fraction=0)
    assert next_delay_s(configured, result(poll_after_s=0), 0, lambda: 0.5) == 1


async def test_backoff_grows_while_the_tracker_is_down(env: ReleaseEnv) -> None:
    dev = env.device("dev-1", mode="direct", tracker_url="http://127.0.0.1:9")
    seen: list[tuple[int, float]] = []
    config = DaemonConfig(jitter_fraction=0, backoff_initial_s=0.05, backoff_max_s=0.2)
    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            def on_result(r: UpdateResult, delay_s: float) -> None:
                seen.append((int(r.status), delay_s))
                if len(seen) == 4:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(lambda: run_daemon(dev, config, on_result=on_result))
    assert seen == [(10, 0.05), (10, 0.1), (10, 0.2), (10, 0.2)]


async def test_retry_budget_per_release(env: ReleaseEnv) -> None:
    dev = env.device("dev-1", mode="direct",
                     health_command=[sys.executable, "-c", "raise SystemExit(1)"])
    statuses = [(await update_once(dev, retry_budget=2)).status for _ in range(2)]
    assert statuses == [StatusCode.POSTCHECK_FAILED] * 2
    third = await update_once(dev, retry_budget=2)
    assert not third.attempted and third.deferred is not None
    assert third.deferred.startswith("retry budget spent (2 failed attempts; tried again from")
    assert [r.status for r in env.reports()] == [40, 40]
    assert dev.bootctl().primary == "a"


async def test_retry_budget_recovers_with_time(env: ReleaseEnv) -> None:
    """Two failed attempts spend a budget of two; an hour later (the window) the
    release is attempted again."""
    dev = env.device("dev-1", mode="direct",
                     health_command=[sys.executable, "-c", "raise SystemExit(1)"])
    now = [1_000_000.0]
    for _ in range(2):
        spent = await update_once(dev, retry_budget=2, retry_window_s=3600,
                                  wall_clock=lambda: now[0])
        assert spent.status == StatusCode.POSTCHECK_FAILED
        now[0] += 60
    held = await update_once(dev, retry_budget=2, retry_window_s=3600, wall_clock=lambda: now[0])
    assert not held.attempted and held.deferred is not None
    now[0] += 3600 - 120  # an hour after the first failure: forgiven
    again = await update_once(dev, retry_budget=2, retry_window_s=3600,
                              wall_clock=lambda: now[0])
    assert again.attempted and again.status == StatusCode.POSTCHECK_FAILED
    assert [r.status for r in env.reports()] == [40, 40, 40]


async def test_an_origin_outage_does_not_spend_the_retry_budget(env: ReleaseEnv) -> None:
    """Three passes while the origin is down fail to download (status 10, reported);
    none counts against a budget of three: once the origin is back, the next pass
    installs at once instead of idling until the window passes."""
    origin_url = env.origin_url
    dev = env.device("dev-1", mode="direct", origin_url="http://127.0.0.1:9")
    for _ in range(3):
        down = await update_once(dev, retry_budget=3)
        assert down.attempted and down.status == StatusCode.DOWNLOAD_FAILED
    config = dev.config()
    save_config(dev.config_path, replace(config, origin_url=origin_url))
    back = await update_once(dev, retry_budget=3)
    assert back.status == StatusCode.OK and back.updated, back.message
    assert [r.status for r in env.reports()] == [10, 10, 10, 0]


async def test_peer_run_updates_then_exits_promptly_on_sigterm(env: ReleaseEnv) -> None:
    dev = env.device("dev-1", mode="direct")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "swarmota.cli", "peer", "run", str(dev.root),
         "--poll-interval-s", "0.5", "--jitter-fraction", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(60):
            while dev.bootctl().committed != "b":
                assert proc.poll() is None, "peer run exited by itself"
                await trio.sleep(0.1)
            await trio.sleep(1.5)  # a few idle passes
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
    assert proc.stdout is not None
    data = b""
    while chunk := await proc.stdout.receive_some(1 << 16):
        data += chunk
    out = data.decode()
    assert code == 0, out
    assert "status 0: updated 1.0.0 -> 2.0.0" in out and "SIGTERM: stopping" in out
    assert out.count("status 0: up to date") >= 1
    assert dev.slot_path("b").read_bytes() == env.v2


async def test_peer_run_stops_with_a_clear_error_when_the_device_is_unusable(
        env: ReleaseEnv) -> None:
    dev = env.device("dev-1", mode="direct")
    dev.policy_path.write_text("[schedule]\nwindows = ['noon']\n")
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "swarmota.cli", "peer", "run", str(dev.root)],
            cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert b"error: policy" in proc.stderr and b"window 'noon'" in proc.stderr
