"""The agent's local API on a real dbus-daemon (tests/dbus_bus.py), called by outside
clients (busctl, the shipped example client) as root, as a member of the operator group
and as a stranger; and the systemd notifications of ``peer run``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from jeepney import HeaderFields

from swarmota.peer.agent import update_once
from swarmota.peer.bootctl import SlotRecord, initial_bootctl, write_bootctl
from swarmota.peer.bootloader import GrubEnv
from swarmota.peer.control import MAX_POSTPONE_S, AgentControl, postponed_until
from swarmota.peer.daemon import DaemonConfig, run_daemon
from swarmota.peer.dbus_service import DBusUnavailable, serve_dbus
from swarmota.peer.errors import StatusCode
from swarmota.peer.state import DeviceState
from swarmota.peer.watchdog import SystemdNotifier
from tests.dbus_bus import STRANGER_UID, Bus, busctl, call, get, signals
from tests.release_env import ReleaseEnv

ROOT = Path(__file__).resolve().parents[1]
FAR_WINDOW = "[schedule]\nwindows = ['{hour:02d}:00-{hour:02d}:01']\n"


def bare_device(tmp_path: Path) -> DeviceState:
    """Just boot control: enough for the API's own behaviour."""
    root = tmp_path / "device"
    root.mkdir()
    write_bootctl(root / "bootctl.json",
                  initial_bootctl(SlotRecord("1.0.0", 1, "00" * 32, 10)))
    return DeviceState(root)


def far_window_policy() -> str:
    """A one-minute maintenance window twelve hours from now."""
    return FAR_WINDOW.format(hour=(time.gmtime().tm_hour + 12) % 24)


@asynccontextmanager
async def agent(dev: DeviceState, bus: Bus) -> AsyncIterator[AgentControl]:
    """The daemon with its API, in this process (the first pass starts at once; the
    next only when asked: the poll interval is an hour)."""
    control = AgentControl(dev)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_dbus, control, bus.address)
        nursery.start_soon(partial(run_daemon, dev, DaemonConfig(
            poll_interval_s=3600, jitter_fraction=0, backoff_initial_s=3600,
            backoff_max_s=3600), control=control))
        yield control
        nursery.cancel_scope.cancel()


async def settle(control: AgentControl, passes: int, timeout_s: float = 60) -> None:
    """Wait until ``passes`` passes saved their result and the daemon is idle again."""
    with trio.fail_after(timeout_s):
        while control.board.results < passes or control.board.running:
            await trio.sleep(0.02)


async def test_properties_are_public_but_methods_only_for_root_and_the_operator_group(
        bus: Bus, tmp_path: Path) -> None:
    control = AgentControl(bare_device(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_dbus, control, bus.address)
        for uid in (None, STRANGER_UID):
            state = await busctl(bus, "get-property", "org.swarmota.Agent1", "State", uid=uid)
            assert state.stdout.decode().strip() == 's "idle"'
            assert (await busctl(bus, "introspect", uid=uid)).returncode == 0
        assert await get(bus, "CurrentVersion") == 's "1.0.0"'
        for method, args in (("CheckNow", ()), ("Postpone", ("t", "60")),
                             ("RollBack", ()), ("InstallNow", ("s", ""))):
            refused = await busctl(bus, "call", "org.swarmota.Agent1", method, *args,
                                   check=False, uid=STRANGER_UID)
            assert refused.returncode != 0 and b"Access denied" in refused.stderr, method
        assert postponed_until(control.state.root) == 0, "a refused call changes nothing"
        write = await busctl(bus, "set-property", "org.swarmota.Agent1", "State", "s",
                             "idle", check=False)
        assert write.returncode != 0, "read-only, even for root"
        # a member of the operator group ('swarmota' in the shipped policy) may call
        until = await call(bus, "Postpone", "t", "60", uid=STRANGER_UID,
                           groups=(bus.operator_gid,))
        assert until.startswith("t ") and abs(int(until[2:]) - (time.time() + 60)) < 5
        assert await get(bus, "PostponedUntil") == until
        nothing = await busctl(bus, "call", "org.swarmota.Agent1", "MarkGood", check=False)
        assert b"nothing to mark good" in nothing.stderr
        nursery.cancel_scope.cancel()


async def test_a_second_agent_cannot_take_the_name(bus: Bus, tmp_path: Path) -> None:
    dev = bare_device(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_dbus, AgentControl(dev), bus.address)
        with pytest.raises(DBusUnavailable, match="owned by another process"):
            await serve_dbus(AgentControl(dev), bus.address)
        nursery.cancel_scope.cancel()
    with pytest.raises(DBusUnavailable, match="cannot connect"):
        await serve_dbus(AgentControl(dev), "unix:path=/nonexistent/bus")


async def test_progress_signals_are_rate_limited_and_end_on_the_last_value(
        bus: Bus, tmp_path: Path) -> None:
    control = AgentControl(bare_device(tmp_path))
    observed = control.observed()
    async with signals(bus) as received, trio.open_nursery() as nursery:
        await nursery.start(partial(serve_dbus, control, bus.address,
                                    progress_interval_s=0.5))
        started = trio.current_time()
        for done in range(1, 41):  # 40 updates in about a second (longer on a busy machine)
            observed.save_progress({"phase": "downloading", "mode": "direct",
                                    "chunks_total": 40, "chunks_done_this_run": done,
                                    "bytes_origin": done * 1000})
            await trio.sleep(0.025)
        await trio.sleep(0.8)
        elapsed = trio.current_time() - started
        progress = []
        while True:
            try:
                msg = received.receive_nowait()
            except trio.WouldBlock:
                break
            if msg.header.fields[HeaderFields.member] == "ProgressChanged":
                progress.append(msg.body[0])
        nursery.cancel_scope.cancel()
    # one signal per 0.5 s at most, plus the first one and the final value
    assert 2 <= len(progress) <= 2 + int(elapsed / 0.5), (len(progress), elapsed)
    last = progress[-1]
    assert last["chunks_done"] == ("u", 40) and last["bytes_origin"] == ("t", 40000)
    assert last["phase"] == ("s", "downloading")


async def test_install_now_skips_the_maintenance_window_but_not_the_battery_rule(
        env: ReleaseEnv, bus: Bus, tmp_path: Path) -> None:
    dev = env.device("dev-1", mode="direct")
    battery = tmp_path / "battery"
    battery.write_text("10\n")
    dev.policy_path.write_text(far_window_policy() + f"[power]\nmin_battery_percent = 30\n"
                               f"battery_file = '{battery}'\n")
    async with signals(bus) as received, agent(dev, bus) as control:
        await settle(control, 1)
        assert await get(bus, "OfferedVersion") == 's "2.0.0"'
        assert "battery 10%" in await get(bus, "DeferredReason")
        assert await call(bus, "InstallNow", "s", "2.0.0") == 's "2.0.0"'
        await settle(control, 2)
        assert "battery 10%" in await get(bus, "DeferredReason"), "battery rule kept"
        battery.write_text("80\n")
        await call(bus, "CheckNow")
        await settle(control, 3)
        assert "outside the maintenance windows" in await get(bus, "DeferredReason")
        wrong = await busctl(bus, "call", "org.swarmota.Agent1", "InstallNow", "s", "9.9.9",
                             check=False)
        assert b"the release offered is 2.0.0, not 9.9.9" in wrong.stderr
        assert await call(bus, "InstallNow", "s", "") == 's "2.0.0"'
        await settle(control, 4)
        assert await get(bus, "CurrentVersion") == 's "2.0.0"'
        assert await get(bus, "State") == 's "idle"'
        assert await get(bus, "OfferedVersion") == 's ""'
        last = await get(bus, "LastResult")
        assert '"status" i 0' in last and '"to_version" s "2.0.0"' in last
        nothing = await busctl(bus, "call", "org.swarmota.Agent1", "InstallNow", "s", "",
                               check=False)
        assert b"NothingOffered" in nothing.stderr or b"nothing to install" in nothing.stderr
        members = []
        while True:
            try:
                msg = received.receive_nowait()
            except trio.WouldBlock:
                break
            members.append((msg.header.fields[HeaderFields.member], msg.body))
    assert dev.bootctl().committed == "b" and dev.slot_path("b").read_bytes() == env.v2
    finished = [body for member, body in members if member == "UpdateFinished"]
    assert finished == [(0, "updated 1.0.0 -> 2.0.0", "1.0.0", "2.0.0")], members
    assert any(member == "ProgressChanged" and body[0]["phase"] == ("s", "downloading")
               for member, body in members)
    states = [body[1]["State"][1] for member, body in members
              if member == "PropertiesChanged" and "State" in body[1]]
    assert {"checking", "downloading", "health_checking", "idle"} <= set(states), states


async def test_postpone_defers_installs_until_lifted_and_survives_a_restart(
        env: ReleaseEnv, bus: Bus) -> None:
    dev = env.device("dev-1", mode="direct")
    dev.policy_path.write_text(far_window_policy())
    async with agent(dev, bus) as control:
        await settle(control, 1)
        until = await call(bus, "Postpone", "t", "3600")
        too_long = await busctl(bus, "call", "org.swarmota.Agent1", "Postpone", "t",
                                str(MAX_POSTPONE_S + 1), check=False)
        assert b"InvalidArgs" in too_long.stderr or b"postpone by 0 to" in too_long.stderr
        await call(bus, "CheckNow")
        await settle(control, 2)
    assert "postponed on request" in await_nothing(dev)
    assert int(until[2:]) == int(postponed_until(dev.root)), "kept in STATE/postpone.json"
    async with agent(dev, bus) as control:  # a restart: still postponed
        await settle(control, 1)
        assert await get(bus, "PostponedUntil") == until
        assert "postponed on request" in await get(bus, "DeferredReason")
        assert await call(bus, "Postpone", "t", "0") == "t 0"
        assert await call(bus, "InstallNow", "s", "2.0.0") == 's "2.0.0"'
        await settle(control, 2)
    assert dev.bootctl().committed == "b"


def await_nothing(dev: DeviceState) -> str:
    """The deferral reason of the last pass (nothing attempted)."""
    last = dev.last_result() or {}
    assert not last.get("attempted"), last
    return str(last.get("deferred"))


async def test_mark_good_and_roll_back_decide_the_health_check_in_progress(
        env: ReleaseEnv, bus: Bus) -> None:
    slow_check = [sys.executable, "-c", "import time; time.sleep(60)"]
    verdicts = {}
    for name, method in (("dev-good", "MarkGood"), ("dev-bad", "RollBack")):
        dev = env.device(name, mode="direct", health_command=slow_check,
                         health_timeout_s=120)
        async with agent(dev, bus) as control:
            with trio.fail_after(60):
                while control.board.state != "health_checking":
                    await trio.sleep(0.02)
            assert await call(bus, method) == 's "b"'
            with trio.fail_after(10):  # the 60 s check is cut short
                await settle(control, 1)
            again = await busctl(bus, "call", "org.swarmota.Agent1", method, check=False)
            assert b"NotApplicable" in again.stderr or b"nothing to" in again.stderr
        verdicts[method] = (dev.last_result() or {}, dev.bootctl())
    good, bc = verdicts["MarkGood"]
    assert good["status"] == 0 and bc.committed == "b" and not bc.pending
    bad, bc = verdicts["RollBack"]
    assert bad["status"] == StatusCode.POSTCHECK_FAILED and bc.committed == "a"
    assert "rolled back by uid 0 over D-Bus" in bad["message"], bad
    reports = {(r.device_id, r.status) for r in env.reports()}
    assert reports == {("dev-good", 0), ("dev-bad", 40)}


async def test_roll_back_cancels_a_switch_waiting_for_its_reboot(
        env: ReleaseEnv, tmp_path: Path) -> None:
    if shutil.which("grub-editenv") is None:
        pytest.skip("grub-editenv is not installed")
    grubenv = tmp_path / "grubenv"
    dev = env.device("dev-1", mode="direct", bootloader="grub", grub_env_path=str(grubenv))
    loader = GrubEnv(grubenv, booted=lambda: "a")  # still running slot a
    control = AgentControl(dev)
    nothing = await _refusal(control.roll_back("test"))
    assert "nothing to roll back" in nothing
    first = await update_once(dev, bootloader=loader)
    assert first.reboot_pending and dev.bootctl().pending
    assert "has not booted yet" in await _refusal(control.mark_good("test"))
    assert await control.roll_back("uid 0 over D-Bus") == "slot b (2.0.0)"
    request = control.pass_started()
    assert request.cancel_switch
    cancelled = await update_once(dev, bootloader=loader, requests=request)
    assert cancelled.status == StatusCode.POSTCHECK_FAILED, cancelled.message
    assert "rolled back on request" in cancelled.message
    bc = dev.bootctl()
    assert bc.committed == bc.primary == "a" and not bc.pending
    env_after = loader.read()
    assert env_after.committed == "a" and not env_after.pending
    assert [(r.to_version, r.status) for r in env.reports()] == [("2.0.0", 40)]


async def _refusal(call_: object) -> str:
    from swarmota.peer.control import NotApplicable
    with pytest.raises(NotApplicable) as info:
        await call_  # type: ignore[misc]
    return str(info.value)


async def test_example_client_reads_and_controls_the_agent(bus: Bus, tmp_path: Path) -> None:
    control = AgentControl(bare_device(tmp_path))
    client = [sys.executable, str(ROOT / "docs" / "examples" / "agent_client.py"),
              "--address", bus.address]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_dbus, control, bus.address)
        with trio.fail_after(60):  # three client processes; a busy machine is slow
            status = await trio.run_process([*client, "status"], capture_stdout=True)
            shown = json.loads(status.stdout)
            assert shown["State"] == "idle" and shown["CurrentVersion"] == "1.0.0"
            postponed = await trio.run_process([*client, "postpone", "120"],
                                               capture_stdout=True)
            assert b"postponed until" in postponed.stdout
            assert postponed_until(control.state.root) > time.time() + 100
            refused = await trio.run_process([*client, "mark-good"], capture_stderr=True,
                                             check=False)
            assert refused.returncode == 1 and b"nothing to mark good" in refused.stderr

            async def watch() -> bytes:
                proc = await trio.run_process([*client, "watch", "--count", "1"],
                                              capture_stdout=True)
                return bytes(proc.stdout)

            async with trio.open_nursery() as inner:
                seen: list[bytes] = []
                inner.start_soon(lambda: _collect(seen, watch))
                await trio.sleep(0.5)  # the watcher subscribes
                control.observed().save_progress({"phase": "downloading", "chunks_total": 4,
                                                  "chunks_done": 1, "bytes_peers": 300})
            assert b"chunks 1/4" in seen[0] and b"peers 300" in seen[0], seen
        nursery.cancel_scope.cancel()


async def _collect(out: list[bytes], fn: object) -> None:
    out.append(await fn())  # type: ignore[operator]


def test_systemd_notifier_reads_its_environment() -> None:
    assert SystemdNotifier.from_environ({}) is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "relative"}) is None
    plain = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@abstract"})
    assert plain is not None and plain.address == "\0abstract" and plain.watchdog_s is None
    dog = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "3000000",
                                        "WATCHDOG_PID": "42"}, pid=42)
    assert dog is not None and dog.watchdog_s == 3.0
    other = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "3000000",
                                          "WATCHDOG_PID": "41"}, pid=42)
    assert other is not None and other.watchdog_s is None, "another process's watchdog"
    bad = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "soon"})
    assert bad is not None and bad.watchdog_s is None


async def test_peer_run_serves_the_api_and_feeds_the_systemd_watchdog(
        env: ReleaseEnv, bus: Bus, tmp_path: Path) -> None:
    dev = env.device("dev-1", mode="direct")
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify"))
    environ = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"),
                   WATCHDOG_USEC="400000")  # 0.4 s: a ping every 0.2 s
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "swarmota.cli", "peer", "run", str(dev.root),
         "--poll-interval-s", "3600", "--dbus", bus.address],
        cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    messages: list[str] = []
    try:
        with trio.fail_after(60):
            while "READY=1" not in "\n".join(messages):
                messages.append((await notify.recv(4096)).decode())
            while await get(bus, "CurrentVersion") != 's "2.0.0"':
                assert proc.poll() is None, "peer run exited by itself"
                await trio.sleep(0.1)
            assert dev.bootctl().committed == "b"
            start = trio.current_time()
            while trio.current_time() - start < 1.0:
                messages.append((await notify.recv(4096)).decode())
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0
            while "STOPPING=1" not in messages[-1]:
                messages.append((await notify.recv(4096)).decode())
    finally:
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
        notify.close()
    assert messages[0] == "READY=1\nSTATUS=running", messages
    pings = [m for m in messages if m == "WATCHDOG=1"]
    assert len(pings) >= 3, messages  # about five a second while it ran
    assert "STATUS=status 0: updated 1.0.0 -> 2.0.0" in messages
    gone = await busctl(bus, "get-property", "org.swarmota.Agent1", "State", check=False)
    assert gone.returncode != 0, "the name left the bus with the process"


async def test_peer_run_exits_when_the_bus_it_was_given_is_unreachable(
        env: ReleaseEnv) -> None:
    dev = env.device("dev-1", mode="direct")
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "swarmota.cli", "peer", "run", str(dev.root),
             "--dbus", "unix:path=/nonexistent/bus"],
            cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert b"error: cannot connect to the D-Bus" in proc.stderr
    assert dev.bootctl().committed == "a", "nothing was attempted"
