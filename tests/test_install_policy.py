"""Install policy: maintenance windows, install delay, battery/charging, metered network,
the critical flag, and clear errors for bad policy files; unit tests of the pure
decision and end-to-end runs through the real agent and servers."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from swarmota.demo import mutate_image
from swarmota.manifest import ReleaseManifest
from swarmota.peer.agent import update_once
from swarmota.peer.errors import ConfigError, StatusCode
from swarmota.peer.install_policy import (
    InstallPolicy,
    PolicyPowerSource,
    PowerReading,
    decide,
    load_policy,
    parse_window,
)
from swarmota.peer.state import DeviceState
from swarmota.seeder.publish import publish_release
from tests.release_env import HARDWARE_ID, PRODUCT, ReleaseEnv

# Wednesday 2026-12-02 12:00 UTC, and 03:00 the same day
NOON = datetime(2026, 12, 2, 12, 0, tzinfo=UTC).timestamp()
NIGHT = datetime(2026, 12, 2, 3, 0, tzinfo=UTC).timestamp()


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_windows_wrap_midnight_and_respect_days() -> None:
    night = parse_window("22:00-04:00")
    assert night.contains(at("2026-12-02T23:30")) and night.contains(at("2026-12-03T03:59"))
    assert not night.contains(at("2026-12-02T04:00")) and not night.contains(at("2026-12-02T12:00"))
    weekend = parse_window("sat,sun 10:00-24:00")
    assert weekend.contains(at("2026-12-05T10:00"))  # a Saturday
    assert not weekend.contains(at("2026-12-04T11:00"))  # a Friday
    late_fri = parse_window("fri 23:00-01:00")
    assert late_fri.contains(at("2026-12-05T00:30"))  # Saturday, in Friday's window
    assert not late_fri.contains(at("2026-12-06T00:30"))
    for bad in ("2-4", "25:00-02:00", "10:00-10:00", "xyz 01:00-02:00", "01:60-02:00",
                "24:30-01:00"):
        with pytest.raises(ValueError):
            parse_window(bad)


def decision(policy: InstallPolicy, **kw: object) -> tuple[bool, str]:
    args: dict[str, object] = {"now": at("2026-12-02T12:00"), "critical": False,
                               "metered": False, "power": None, "first_offered_at_s": 0.0,
                               "now_s": 0.0}
    args.update(kw)
    d = decide(policy, **args)  # type: ignore[arg-type]
    return d.allowed, d.reason


def test_decisions() -> None:
    assert decision(InstallPolicy()) == (True, "allowed")
    windowed = InstallPolicy(windows=(parse_window("02:00-05:00"),))
    assert decision(windowed) == (False, "outside the maintenance windows")
    assert decision(windowed, now=at("2026-12-02T03:00"))[0]
    assert decision(windowed, critical=True) == (True, "critical release")
    frugal = InstallPolicy(download_when_metered=False)
    assert decision(frugal, metered=True) == (False, "metered network")
    assert decision(InstallPolicy(), metered=True)[0]  # the default allows it
    battery = InstallPolicy(min_battery_percent=30, battery_file="x")
    assert not decision(battery, power=PowerReading(12, False))[0]
    assert not decision(battery, power=PowerReading(None, None))[0]
    assert decision(battery, power=PowerReading(12, True))[0]
    assert decision(battery, power=PowerReading(80, False))[0]
    # critical overrides windows and delay, never the battery or the network
    assert not decision(battery, power=PowerReading(12, False), critical=True)[0]
    assert not decision(frugal, metered=True, critical=True)[0]
    delayed = InstallPolicy(delay_s=3600)
    allowed, reason = decision(delayed, first_offered_at_s=100.0, now_s=200.0)
    assert not allowed and "3500 s left" in reason
    assert decision(delayed, first_offered_at_s=100.0, now_s=3700.0)[0]
    assert decision(delayed, first_offered_at_s=100.0, now_s=200.0, critical=True)[0]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_policy_file_parses(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, """
[schedule]
windows = ["02:00-05:00", "sat,sun 10:00-16:00"]
delay_s = 86400
[power]
min_battery_percent = 30
battery_command = ["cat", "/sys/class/power_supply/BAT0/capacity"]
charging_file = "/sys/class/power_supply/AC/online"
[network]
download_when_metered = false
[storage]
reserve_bytes = 1048576
"""))
    assert len(policy.windows) == 2 and policy.delay_s == 86400
    assert policy.battery_command[0] == "cat" and not policy.download_when_metered
    assert load_policy(tmp_path / "absent.toml") == InstallPolicy()


@pytest.mark.parametrize(("text", "words"), [
    ("[schedule]\nwindow = ['02:00-04:00']", "unknown key 'window'"),
    ("[sched]\n", "unknown key 'sched'"),
    ("[schedule]\nwindows = ['2am-4am']", "window '2am-4am'"),
    ("[schedule]\ndelay_s = '1d'", "[schedule] delay_s: expected an integer or a number"),
    ("[schedule]\ndelay_s = -1", "must be >= 0"),
    ("[power]\nmin_battery_percent = 130\nbattery_file = 'x'", "0..100"),
    ("[power]\nmin_battery_percent = 30", "needs battery_file or battery_command"),
    ("[power]\nbattery_file = 'x'\nbattery_command = ['y']", "exclusive"),
    ("[network]\ndownload_when_metered = 1", "expected true or false"),
    ("schedule = 3", "schedule must be a table"),
    ("[schedule\n", "not valid TOML"),
])
def test_bad_policy_files_are_clear_errors(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_policy(write(tmp_path, text))
    assert words in str(info.value) and "policy.toml" in str(info.value)


def test_power_source_from_files_and_commands(tmp_path: Path) -> None:
    level = tmp_path / "capacity"
    level.write_text("42\n")
    online = tmp_path / "online"
    online.write_text("1\n")
    reading = PolicyPowerSource(InstallPolicy(battery_file=str(level),
                                              charging_file=str(online))).read()
    assert reading == PowerReading(42, True)
    by_command = PolicyPowerSource(InstallPolicy(
        battery_command=(sys.executable, "-c", "print('77%')"),
        charging_command=(sys.executable, "-c", "raise SystemExit(1)"))).read()
    assert by_command == PowerReading(77, None)
    assert PolicyPowerSource(InstallPolicy(battery_file=str(tmp_path / "nope"))).read() \
        == PowerReading(None, None)


def with_policy(dev: DeviceState, text: str) -> DeviceState:
    dev.policy_path.write_text(text)
    return dev


async def test_outside_the_window_nothing_is_downloaded_inside_it_installs(
        env: ReleaseEnv) -> None:
    dev = with_policy(env.device("dev-1", mode="direct"),
                      '[schedule]\nwindows = ["02:00-05:00"]\n')
    before = env.origin.statistics().bytes_payloads
    result = await update_once(dev, wall_clock=lambda: NOON)
    assert result.status == StatusCode.OK and not result.attempted
    assert result.deferred == "outside the maintenance windows"
    assert env.origin.statistics().bytes_payloads == before
    assert env.reports() == [] and not dev.journal_path.exists()
    assert dev.bootctl().primary == "a"
    result = await update_once(dev, wall_clock=lambda: NIGHT)
    assert result.status == StatusCode.OK and result.updated, result.message
    assert dev.slot_path("b").read_bytes() == env.v2


def publish_critical_v3(env: ReleaseEnv) -> tuple[bytes, ReleaseManifest]:
    v3 = mutate_image(env.v2, seed=31)
    m3 = publish_release(env.repo, env.image_path("v3-critical.img", v3), product=PRODUCT,
                         version="3.0.0", release_counter=3, compatibility=[HARDWARE_ID],
                         zstd_level=3, critical=True)
    env.register(m3)
    return v3, m3


async def test_a_critical_release_overrides_windows_and_delay(env: ReleaseEnv) -> None:
    v3, m3 = publish_critical_v3(env)
    assert m3.critical
    dev = with_policy(env.device("dev-1", mode="direct"),
                      '[schedule]\nwindows = ["02:00-05:00"]\ndelay_s = 86400\n')
    result = await update_once(dev, wall_clock=lambda: NOON)
    assert result.status == StatusCode.OK and result.to_version == "3.0.0", result.message
    assert dev.slot_path("b").read_bytes() == v3


async def test_install_delay_counts_from_the_first_offer(env: ReleaseEnv) -> None:
    dev = with_policy(env.device("dev-1", mode="direct"), "[schedule]\ndelay_s = 3600\n")
    first = await update_once(dev, wall_clock=lambda: NOON)
    assert first.deferred and "3600 s left" in first.deferred
    later = await update_once(dev, wall_clock=lambda: NOON + 1800)
    assert later.deferred and "1800 s left" in later.deferred
    done = await update_once(dev, wall_clock=lambda: NOON + 3600)
    assert done.updated, done.message


async def test_low_battery_waits_for_the_charger_and_metered_networks_wait(
        env: ReleaseEnv, tmp_path: Path) -> None:
    level, online = tmp_path / "capacity", tmp_path / "online"
    level.write_text("12\n")
    online.write_text("0\n")
    dev = with_policy(env.device("dev-1", mode="direct"), f"""
[power]
min_battery_percent = 30
battery_file = "{level}"
charging_file = "{online}"
""")
    low = await update_once(dev)
    assert low.deferred == "battery 12%, below 30% and not charging"
    online.write_text("1\n")
    assert (await update_once(dev)).updated

    metered = with_policy(env.device("dev-2", mode="direct", network_metered=True),
                          "[network]\ndownload_when_metered = false\n")
    assert (await update_once(metered)).deferred == "metered network"
    with_policy(metered, "[network]\ndownload_when_metered = true\n")
    assert (await update_once(metered)).updated


async def test_cli_refuses_a_bad_policy_file_clearly(env: ReleaseEnv, tmp_path: Path) -> None:
    bad = write(tmp_path, "[schedule]\nwindows = ['noon']\n")
    root = tmp_path / "root.json"
    root.write_bytes(env.repo.root_bytes())
    args = [sys.executable, "-m", "swarmota.cli", "peer", "init", str(tmp_path / "dev"),
            "--root", str(root), "--origin", env.origin_url, "--tracker", env.tracker_url,
            "--image", str(env.image_path("v1.img", env.v1)), "--version", "1.0.0",
            "--device-id", "cli-1", "--product", PRODUCT, "--hardware-id", HARDWARE_ID,
            "--policy", str(bad)]
    proc = await trio.run_process(args, capture_stderr=True, check=False)
    assert proc.returncode == 2
    assert b"window 'noon' is not [DAY,DAY ]HH:MM-HH:MM" in proc.stderr
    assert not (tmp_path / "dev").exists(), "nothing provisioned"
    good = write(tmp_path, "[schedule]\nwindows = ['02:00-05:00']\n")
    proc = await trio.run_process(args, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dev" / "policy.toml").read_bytes() == good.read_bytes()
