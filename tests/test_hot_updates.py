"""Hot updates of components without a reboot: hooks from the device configuration or
from the signed payload, services (real processes: tests/standin_service.py) restarted
in dependency order, health checks with timeouts, and rollback of the component and of
its services when anything fails; kill -9 in the middle of an attempt."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from swarmota.peer.agent import update_once
from swarmota.peer.config import DeviceConfig, save_config
from swarmota.peer.errors import ConfigError, StatusCode
from swarmota.peer.services import parse_hot_config
from swarmota.peer.state import DeviceState
from tests.release_env import ReleaseEnv, killed_at
from tests.test_component_updates import publish_component

STANDIN = [sys.executable, str(Path(__file__).with_name("standin_service.py"))]
APP1 = b"ui app 1\n" * 3000
APP2 = b"ui app 2\n" * 3000
APP_BROKEN = b"ui app 3 BROKEN\n" * 2000


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the stand-in services keep pid files, sockets and their event log; every
    service still running at the end is stopped."""
    run = tmp_path / "run"
    run.mkdir()
    yield run
    for pidfile in run.glob("*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def current_of(env: ReleaseEnv, device: str, component: str = "ui-app") -> Path:
    return env.workdir / "devices" / device / "components" / component / "current"


def events(run: Path) -> list[str]:
    path = run / "events.log"
    return path.read_text().splitlines() if path.exists() else []


def served(run: Path, name: str) -> tuple[str, str]:
    """(pid, sha256) the service answers with."""
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(run / f"{name}.sock"))
        pid, digest = sock.recv(200).decode().split()
    return pid, digest


def hook_logger(run: Path) -> list[str]:
    """A hook command that writes what it was told into the event log."""
    log = str(run / "events.log")
    code = (f"import os; e = os.environ; open({log!r}, 'a').write("
            "f\"hook {e['SWARMOTA_HOOK']} {e['SWARMOTA_VERSION']} "
            "prev={e['SWARMOTA_PREVIOUS_VERSION'] or '-'} rollback={e['SWARMOTA_ROLLBACK']}"
            "\\n\")")
    return [sys.executable, "-c", code]


def app_device(env: ReleaseEnv, run: Path, name: str = "dev-1", **recipe: Any) -> DeviceState:
    current = str(current_of(env, name))
    services = {
        "db": {"restart": [*STANDIN, "restart", "db", str(run), current]},
        "api": {"stop": [*STANDIN, "stop", "api", str(run)],
                "start": [*STANDIN, "start", "api", str(run), current], "after": ["db"]},
        "ui": {"restart": [*STANDIN, "restart", "ui", str(run), current], "after": ["api"]},
    }
    components = {"ui-app": {"services": ["api"],
                             "health_command": [*STANDIN, "check", "api", str(run), current],
                             **recipe}}
    return env.device(name, image=env.v2, version="2.0.0", counter=2, mode="direct",
                      services=services, components=components)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_hooks_run_and_services_restart_in_dependency_order_then_a_bad_release_is_undone(
        env: ReleaseEnv, run_dir: Path) -> None:
    hook = hook_logger(run_dir)
    dev = app_device(env, run_dir, pre_install=hook, post_install=hook)
    publish_component(env, APP1, "3.0.0", 3, kind="app", name="ui-app")
    first = await update_once(dev)
    assert first.status == StatusCode.OK, first.message
    assert [e.rsplit(" ", 1)[0] if e.startswith(("api", "ui")) else e
            for e in events(run_dir)] == [
        "hook pre-install 3.0.0 prev=- rollback=0", "hook post-install 3.0.0 prev=- rollback=0",
        "api start", "ui start"], "db is not a dependent of api: left alone"
    assert served(run_dir, "api")[1] == served(run_dir, "ui")[1] == sha(APP1)

    publish_component(env, APP2, "4.0.0", 4, kind="app", name="ui-app")
    before = len(events(run_dir))
    second = await update_once(dev)
    assert second.status == StatusCode.OK, second.message
    assert [e.split()[0:2] for e in events(run_dir)[before:]] == [
        ["hook", "pre-install"], ["hook", "post-install"],
        ["api", "stop"], ["api", "start"], ["ui", "stop"], ["ui", "start"]]
    assert served(run_dir, "api")[1] == served(run_dir, "ui")[1] == sha(APP2)

    publish_component(env, APP_BROKEN, "5.0.0", 5, kind="app", name="ui-app")
    before = len(events(run_dir))
    third = await update_once(dev)
    assert third.status == StatusCode.POSTCHECK_FAILED, third.message
    assert "service api start exited 1" in third.message, third.message
    after = events(run_dir)[before:]
    assert after[:4] == ["hook pre-install 5.0.0 prev=4.0.0 rollback=0",
                         "hook post-install 5.0.0 prev=4.0.0 rollback=0",
                         after[2], "api failed 3"] and after[2].startswith("api stop")
    assert "hook post-install 4.0.0 prev=5.0.0 rollback=1" in after, after
    assert current_of(env, "dev-1").read_bytes() == APP2, "the component is back"
    assert served(run_dir, "api")[1] == served(run_dir, "ui")[1] == sha(APP2), \
        "and its services run the previous version again"
    assert dev.bootctl().min_release_counter == 2, "the image's floor is its own"
    assert [(r.to_version, r.status) for r in env.reports()] == [
        ("3.0.0", 0), ("4.0.0", 0), ("5.0.0", 40)]


def app_archive(version: bytes, *, post_exit: int = 0, deploy: Path, log: Path) -> bytes:
    """A component bundle: app.txt plus the hooks in .swarmota/ (shell scripts)."""
    pre = f'#!/bin/sh\necho "pre $SWARMOTA_VERSION rollback=$SWARMOTA_ROLLBACK" >> {log}\n'
    post = (f'#!/bin/sh\nset -e\nmkdir -p {deploy}\n'
            f'tar -xf "$SWARMOTA_COMPONENT_FILE" -C {deploy} app.txt\n'
            f'echo "post $SWARMOTA_VERSION rollback=$SWARMOTA_ROLLBACK" >> {log}\n'
            f'exit {post_exit}\n')
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in ((".swarmota/pre-install", pre.encode(), 0o755),
                                 (".swarmota/post-install", post.encode(), 0o755),
                                 ("app.txt", version, 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_payload_hooks_come_from_the_signed_archive_and_restore_the_previous_version(
        env: ReleaseEnv, run_dir: Path, tmp_path: Path) -> None:
    deploy, log = tmp_path / "deployed", tmp_path / "hooks.log"
    dev = env.device("dev-1", image=env.v2, version="2.0.0", counter=2, mode="direct",
                     components={"ui-app": {"payload_hooks": True}})
    publish_component(env, app_archive(b"v3\n", deploy=deploy, log=log), "3.0.0", 3,
                      kind="app", name="ui-app")
    assert (await update_once(dev)).status == StatusCode.OK
    assert (deploy / "app.txt").read_bytes() == b"v3\n"
    publish_component(env, app_archive(b"v4\n", post_exit=7, deploy=deploy, log=log),
                      "4.0.0", 4, kind="app", name="ui-app")
    failed = await update_once(dev)
    assert failed.status == StatusCode.POSTCHECK_FAILED, failed.message
    assert "post-install hook of ui-app 4.0.0 exited 7" in failed.message
    assert (deploy / "app.txt").read_bytes() == b"v3\n", "the previous hook redeployed v3"
    assert log.read_text().splitlines() == [
        "pre 3.0.0 rollback=0", "post 3.0.0 rollback=0", "pre 4.0.0 rollback=0",
        "post 4.0.0 rollback=0", "post 3.0.0 rollback=1"]
    names = sorted(p.name for p in (dev.root / "components" / "ui-app").iterdir())
    hooks = [n for n in names if n.startswith("hooks-")]
    assert len(hooks) == 1, names  # the current version's; the failed one's pruned

    publish_component(env, b"not a tar archive\n" * 100, "5.0.0", 5, kind="app",
                      name="ui-app")
    refused = await update_once(dev)
    assert refused.status == StatusCode.INSTALL_FAILED, refused.message
    assert "not a tar archive" in refused.message
    assert current_of(env, "dev-1").read_bytes().startswith(b".swarmota/"), "unchanged"
    assert (dev.root / "components" / "ui-app" / "record.json").read_text().count(
        '"pending": false') == 1


async def test_health_check_or_hook_past_its_timeout_rolls_back_component_and_services(
        env: ReleaseEnv, run_dir: Path) -> None:
    sleeper = [sys.executable, "-c", "import time, sys; time.sleep(30)"]
    dev = app_device(env, run_dir)
    publish_component(env, APP1, "3.0.0", 3, kind="app", name="ui-app")
    assert (await update_once(dev)).status == StatusCode.OK
    pid_before = served(run_dir, "api")[0]
    for recipe, words in (({"health_command": sleeper, "health_timeout_s": 1},
                           "health check timed out after 1 s"),
                          ({"pre_install": sleeper, "hook_timeout_s": 1},
                           "pre-install hook of ui-app 4.0.0 timed out after 1 s")):
        config = dev.config()
        components = {"ui-app": {**config.components["ui-app"], **recipe}}
        save_config(dev.config_path, replace(config, components=components))
        publish_component(env, APP2, "4.0.0", 4, kind="app", name="ui-app")
        result = await update_once(dev)
        assert result.status == StatusCode.POSTCHECK_FAILED, result.message
        assert words in result.message, result.message
        assert current_of(env, "dev-1").read_bytes() == APP1
        pid, digest = served(run_dir, "api")
        assert digest == sha(APP1) and pid != pid_before, "restarted on the previous version"
        pid_before = pid


async def test_a_component_switch_interrupted_is_attempted_again_and_41_once_the_budget_is_spent(
        env: ReleaseEnv, run_dir: Path) -> None:
    publish_component(env, APP1, "3.0.0", 3, kind="app", name="ui-app")
    dev = app_device(env, run_dir)
    await killed_at(dev, "component.services")  # first attempt: power cut mid-restart
    again = await update_once(dev)
    assert again.status == StatusCode.OK, again.message
    assert "finished after restart" in again.message
    assert served(run_dir, "api")[1] == sha(APP1)

    publish_component(env, APP2, "4.0.0", 4, kind="app", name="ui-app")
    for _ in range(3):  # every attempt interrupted: the budget (boot_attempts) is spent
        await killed_at(dev, "health.before")
    spent = await update_once(dev)
    assert spent.status == StatusCode.INTERRUPTED, spent.message
    assert "all 3 attempts to switch component ui-app were interrupted" in spent.message
    assert current_of(env, "dev-1").read_bytes() == APP1
    assert served(run_dir, "api")[1] == sha(APP1), "services back on the previous version"
    assert [(r.to_version, r.status) for r in env.reports()] == [("3.0.0", 0), ("4.0.0", 41)]


def test_service_graphs_and_recipes_are_checked_when_the_configuration_loads() -> None:
    ok = parse_hot_config({"a": {"restart": ["x"]}, "b": {"start": ["y"], "after": ["a"]},
                           "c": {"restart": ["z"], "after": ["b"]}, "d": {"restart": ["w"]}},
                          {"app": {"services": ["b"]}})
    assert [s.name for s in ok.restart_order(["a"])] == ["a", "b", "c"]
    assert [s.name for s in ok.restart_order(["b"])] == ["b", "c"]
    assert ok.recipe("other").services == ()
    for services, components, words in (
            ({"a": {"restart": ["x"], "after": ["b"]}, "b": {"restart": ["y"], "after": ["a"]}},
             {}, "dependency cycle among a, b"),
            ({"a": {"restart": ["x"], "after": ["a"]}}, {}, "dependency cycle among a"),
            ({"a": {"restart": ["x"], "after": ["nope"]}}, {}, "no service 'nope'"),
            ({"a": {"restart": ["x"], "start": ["y"]}}, {}, "not both"),
            ({"a": {"stop": ["x"]}}, {}, "needs a 'restart' command"),
            ({"a": {"restart": "x"}}, {}, "a command"),
            ({"a": {"restart": ["x"], "timeout_s": -1}}, {}, "seconds"),
            ({"a": {"restart": ["x"], "wants": []}}, {}, "unknown key 'wants'"),
            ({}, {"app": {"services": ["a"]}}, "no service 'a'"),
            ({}, {"app": {"payload_hooks": True, "pre_install": ["x"]}}, "not both"),
            ({}, {"app": {"payload_hooks": "yes"}}, "true or false")):
        with pytest.raises(ConfigError, match=words):
            parse_hot_config(services, components)
    with pytest.raises(ConfigError, match="dependency cycle"):
        DeviceConfig(device_id="d", product="acme-router", hardware_id="h",
                     origin_url="http://o", tracker_url="http://t",
                     services={"a": {"restart": ["x"], "after": ["a"]}})
