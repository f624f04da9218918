"""A real dbus-daemon per test, configured like a system bus (method calls denied unless
a policy allows them) with the agent's shipped policy file; and outside clients
(``busctl``, as root or another uid) and an in-process jeepney listener for signals."""

from __future__ import annotations

import grp
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from jeepney import MatchRule, Message
from jeepney.bus_messages import message_bus
from jeepney.io.trio import open_dbus_router

from swarmota.peer.dbus_service import BUS_NAME, INTERFACE, OBJECT_PATH, policy_file

STRANGER_UID = 65534  # nobody

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


@dataclass(frozen=True)
class Bus:
    address: str
    operator_gid: int  # stands in for the group 'swarmota' of the shipped policy


def operator_group() -> grp.struct_group:
    """An existing group, not root's nor nobody's, to play 'swarmota' (creating a group
    would change the machine)."""
    for group in sorted(grp.getgrall(), key=lambda g: g.gr_gid):
        if group.gr_gid not in (0, STRANGER_UID) and "nobody" not in group.gr_mem:
            return group
    pytest.skip("no spare group to play 'swarmota'")


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A fresh dbus-daemon on a unix socket that other uids can reach."""
    for tool in ("dbus-daemon", "busctl", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    directory = Path(tempfile.mkdtemp(prefix="swarmota-bus-", dir="/tmp"))
    directory.chmod(0o755)  # a stranger uid must reach the socket to be refused
    group = operator_group()
    policy = directory / "org.swarmota.Agent1.conf"
    policy.write_text(policy_file().replace('group="swarmota"', f'group="{group.gr_name}"'))
    config = directory / "bus.conf"
    config.write_text(_BUS_CONFIG.format(socket=directory / "socket", policy=policy))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork",
                             "--print-address=1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("unix:path="), address
        yield Bus(address, group.gr_gid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


async def busctl(bus: Bus, verb: str, *args: str, uid: int | None = None,
                 groups: tuple[int, ...] = (), check: bool = True
                 ) -> subprocess.CompletedProcess[bytes]:
    """``busctl --address=... VERB org.swarmota.Agent1 /org/swarmota/Agent1 ARGS`` as an
    outside client; as ``uid`` (with only ``groups``) when given."""
    cmd = ["busctl", f"--address={bus.address}", verb, BUS_NAME, OBJECT_PATH, *args]
    if uid is not None:
        group_opt = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", group_opt, *cmd]
    with trio.fail_after(20):
        proc = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True,
                                      check=False)
    if check:
        assert proc.returncode == 0, (cmd, proc.stderr)
    return proc


async def call(bus: Bus, method: str, *args: str, **kwargs: object) -> str:
    """Call a method of the agent's interface; the reply as busctl prints it."""
    proc = await busctl(bus, "call", INTERFACE, method, *args, **kwargs)  # type: ignore[arg-type]
    return proc.stdout.decode().strip()


async def get(bus: Bus, prop: str) -> str:
    return (await busctl(bus, "get-property", INTERFACE, prop)).stdout.decode().strip()


@asynccontextmanager
async def signals(bus: Bus) -> AsyncIterator[trio.MemoryReceiveChannel[Message]]:
    """The agent's signals (its own and PropertiesChanged), through jeepney."""
    async with open_dbus_router(bus.address) as router:
        rule = MatchRule(type="signal", path=OBJECT_PATH)
        await router.send_and_get_reply(message_bus.AddMatch(rule))
        async with router.filter(rule, bufsize=1000) as channel:
            yield channel
