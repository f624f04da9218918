"""Module, app and configuration updates: installed into a component directory with an
atomic replace, health-checked, committed or rolled back; through the real agent and
servers, including kill -9 in the middle of the switch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from swarmota.manifest import ReleaseManifest
from swarmota.peer.agent import update_once
from swarmota.peer.components import ComponentStore
from swarmota.peer.errors import StatusCode
from swarmota.peer.floors import raise_component_floor, read_floors
from swarmota.peer.state import DeviceState
from swarmota.seeder.publish import publish_release
from tests.release_env import HARDWARE_ID, PRODUCT, ReleaseEnv, killed_at

ROOT = Path(__file__).resolve().parents[1]
FW1 = b"modem firmware 1\n" * 4000
FW2 = FW1[:30000] + b"patched!" + FW1[30008:] + b"tail\n"


def publish_component(env: ReleaseEnv, content: bytes, version: str, counter: int, *,
                      bases: tuple[bytes, ...] = (), kind: str = "module",
                      name: str = "modem-fw") -> ReleaseManifest:
    base_paths = [env.image_path(f"{name}-base-{i}.bin", b) for i, b in enumerate(bases)]
    m = publish_release(env.repo, env.image_path(f"{name}-{version}.bin", content),
                        product=PRODUCT, version=version, release_counter=counter,
                        compatibility=[HARDWARE_ID], zstd_level=3, bases=base_paths,
                        update_type=kind, component=name)
    env.register(m)
    return m


def floor(dev: DeviceState, name: str | None) -> int:
    """The anti-rollback floor of component ``name`` (``None``: of images)."""
    return read_floors(dev.root, dev.bootctl(), ComponentStore(dev.root / "components")).of(name)


def on_v2(env: ReleaseEnv, name: str, **config: Any) -> DeviceState:
    """A device whose image is up to date (v2): only component releases are newer (a
    device that lists its components is offered the image first)."""
    return env.device(name, image=env.v2, version="2.0.0", counter=2, **config)


def current(dev: DeviceState, name: str = "modem-fw") -> bytes:
    return (dev.root / "components" / name / "current").read_bytes()


def assert_slots_untouched(env: ReleaseEnv, dev: DeviceState) -> None:
    bc = dev.bootctl()
    assert bc.primary == bc.committed == "a" and not bc.pending
    assert dev.slot_path("a").read_bytes() == env.v2 and not dev.slot_path("b").exists()


async def test_module_update_installs_into_its_component_then_a_delta_follows(
        env: ReleaseEnv) -> None:
    m3 = publish_component(env, FW1, "3.0.0", 3)
    assert (m3.update_type, m3.component) == ("module", "modem-fw")
    dev = on_v2(env, "dev-1", mode="direct")
    result = await update_once(dev)
    assert result.status == StatusCode.OK, result.message
    assert result.message == "updated component modem-fw 2.0.0 -> 3.0.0 (module)"
    assert current(dev) == FW1
    assert os.readlink(dev.root / "components" / "modem-fw" / "current").startswith("v-")
    assert floor(dev, "modem-fw") == 3, "the component's anti-rollback floor raised"
    assert floor(dev, None) == 2, "the image's floor is its own"
    assert_slots_untouched(env, dev)
    assert not list(dev.downloads_dir.iterdir())

    m4 = publish_component(env, FW2, "4.0.0", 4, bases=(FW1,))
    assert m4.delta_for(m3.image.sha256) is not None
    second = await update_once(dev)
    assert second.status == StatusCode.OK and second.payload_kind == "delta", second.message
    assert second.from_version == "3.0.0" and current(dev) == FW2
    names = sorted(p.name for p in (dev.root / "components" / "modem-fw").iterdir())
    assert names == sorted(["current", "record.json", f"v-{m3.image.sha256}",
                            f"v-{m4.image.sha256}"]), "current and previous kept, nothing else"
    assert [(r.to_version, r.status) for r in env.reports()] == [("3.0.0", 0), ("4.0.0", 0)]
    status = subprocess.run([sys.executable, "-m", "swarmota.cli", "peer", "status",
                             str(dev.root)], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    assert "component modem-fw: 4.0.0" in status.stdout


async def test_failed_health_check_restores_the_previous_content(
        env: ReleaseEnv, tmp_path: Path) -> None:
    flag = tmp_path / "unhealthy"
    check = [sys.executable, "-c", f"import os, sys; sys.exit(os.path.exists({str(flag)!r}))"]
    publish_component(env, FW1, "3.0.0", 3, kind="config", name="net-config")
    dev = on_v2(env, "dev-1", mode="direct", health_command=check)
    assert (await update_once(dev)).status == StatusCode.OK
    publish_component(env, FW2, "4.0.0", 4, kind="config", name="net-config")
    flag.touch()
    result = await update_once(dev)
    assert result.status == StatusCode.POSTCHECK_FAILED, result.message
    assert current(dev, "net-config") == FW1
    assert floor(dev, "net-config") == 3
    flag.unlink()
    assert (await update_once(dev)).status == StatusCode.OK
    assert current(dev, "net-config") == FW2



async def test_killed_mid_switch_is_an_interrupted_attempt_finished_at_the_next_start(
        env: ReleaseEnv) -> None:
    publish_component(env, FW1, "3.0.0", 3, kind="app", name="ui-app")
    publish_component(env, FW2, "4.0.0", 4, kind="app", name="ui-app")
    # before the switch: started over; in it (staged, current replaced, health check):
    # an interrupted attempt, repeated at the next start; after the commit: reported
    for point, outcome in (("slot_write.mid", "completed"),
                           ("component.record.after_rename", "finished after restart"),
                           ("component.before_link_rename", "finished after restart"),
                           ("component.after_link_rename", "finished after restart"),
                           ("health.before", "finished after restart"),
                           ("component.record.after_rename:2", "completed")):
        dev = fresh_on_fw1(env, point)
        await killed_at(dev, point)
        restart = await update_once(dev)
        assert restart.status == StatusCode.OK, (point, restart.message)
        if outcome != "completed":
            assert outcome in restart.message, (point, restart.message)
        assert current(dev, "ui-app") == FW2, point
        assert floor(dev, "ui-app") == 4 and floor(dev, None) == 2, point
        names = [p.name for p in (dev.root / "components" / "ui-app").iterdir()]
        assert not [n for n in names if n.startswith(".") or n == "incoming"], (point, names)
        assert not list(dev.downloads_dir.iterdir()), point
        assert (await update_once(dev)).status == StatusCode.OK, "nothing left to do"


def fresh_on_fw1(env: ReleaseEnv, tag: str) -> DeviceState:
    """A device whose component already holds FW1 at 3.0.0 (installed by the agent from
    the 3.0.0 release, which the tracker no longer offers: so install it directly)."""
    from swarmota.peer.components import ComponentStore, InstalledVersion
    from swarmota.peer.slots import hash_stream

    dev = on_v2(env, f"fw1-{tag}".replace(".", "-")[:60], mode="direct")
    store = ComponentStore(dev.root / "components")
    writer = store.begin_write("ui-app", len(FW1))
    writer.write(FW1)
    writer.commit()
    with open(store.directory("ui-app") / "incoming", "rb") as fh:
        size, sha = hash_stream(fh)
    store.switch("ui-app", InstalledVersion("3.0.0", 3, sha, size))
    store.commit("ui-app")
    raise_component_floor(dev.root, "ui-app", 3)
    return dev


def test_seeder_cli_needs_a_component_for_module_updates(tmp_path: Path) -> None:
    image = tmp_path / "fw.bin"
    image.write_bytes(FW1)
    exe = [sys.executable, "-m", "swarmota.cli", "seeder"]
    subprocess.run([*exe, "init", str(tmp_path / "repo")], check=True, capture_output=True,
                   cwd=ROOT)
    base = [*exe, "publish", str(tmp_path / "repo"), str(image), "--product", PRODUCT,
            "--version", "3.0.0", "--counter", "3", "--hardware-id", HARDWARE_ID,
            "--update-type", "module"]
    bad = subprocess.run(base, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "needs a component name" in bad.stderr
    good = subprocess.run([*base, "--component", "modem-fw"], capture_output=True,
                          text=True, cwd=ROOT)
    assert good.returncode == 0, good.stderr
