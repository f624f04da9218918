"""Bootloaders: the GRUB and U-Boot adapters of boot control.

With the file backends (the default: simulation, tests, the demo) the agent plays the
bootloader itself (``peer.bootctl.boot``). On a real device the bootloader decides
which slot boots, from three facts kept in its environment:

    SWARMOTA_ORDER      "a b" or "b a": the slot tried first comes first (the primary)
    SWARMOTA_A_GOOD     1 for the committed slot: it boots without counting
    SWARMOTA_B_GOOD
    SWARMOTA_A_TRIES    boots left for a slot that is not good (its boot-attempt budget)
    SWARMOTA_B_TRIES

At every boot the bootloader takes the slots in order: a good slot boots; a slot that
is not good boots if it has tries left, and one is taken off first (saved before the
kernel starts); a slot without tries is skipped. So a pending slot boots at most its
budget of times; then the committed one boots again. A blank or unreadable environment
means the factory state: slot a, committed. The scripts that do this are shipped in the
package (:func:`script`): ``grub.cfg`` for GRUB (``load_env``/``save_env``; the tries
are counted down with an if-chain, GRUB has no arithmetic, so a budget of at most 9),
``boot.cmd`` for U-Boot (``setexpr``).

The agent's side (:class:`Bootloader`): :meth:`~Bootloader.read` the environment as a
:class:`LoaderState` (primary, committed, tries left), :meth:`~Bootloader.write` a new
one, and :meth:`~Bootloader.booted_slot`, the slot the running system came from (the
kernel command line's ``swarmota.slot=``, or the slot device mounted as ``/``; see
``peer.blockslots.booted_slot``).

- :class:`GrubEnv` edits the environment block with ``grub-editenv`` (Debian
  ``grub-common``): never in place (``grub-editenv`` truncates and rewrites its file) but
  in a copy beside it, fsynced and renamed over it, the directory fsynced, then read
  back. The block's variables fit in its first 512-byte sector, so GRUB's own
  ``save_env`` (in place, one sector) cannot tear them either.
- :class:`UBootEnv` uses ``fw_printenv``/``fw_setenv`` (Debian ``libubootenv-tool``),
  all variables in one ``fw_setenv --script`` write. With two copies configured in
  ``fw_env.config`` (a file or a partition, each with its CRC and a generation flag)
  libubootenv writes the older copy and a torn write leaves the other one valid.

Both raise :class:`peer.errors.InstallFailed` when the tool fails or the environment
does not read back as written, and ``ConfigError`` for an environment that names no
valid state. Crash points: ``bootenv.<what>.before_write``, ``.before_rename`` (GRUB),
``.after_rename`` (GRUB), ``.after_read_back``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

from swarmota.infra.fsio import fsync_dir
from swarmota.peer.crashpoints import crash_point
from swarmota.peer.errors import ConfigError, InstallFailed

__all__ = [
    "FACTORY",
    "MAX_GRUB_TRIES",
    "Bootloader",
    "GrubEnv",
    "LoaderState",
    "UBootEnv",
    "decode_env",
    "encode_env",
    "script",
]

MAX_GRUB_TRIES = 9
_SLOTS = ("a", "b")
_TOOL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LoaderState:
    """What the bootloader will do: boot ``primary`` first; ``committed`` is good;
    ``tries_remaining`` boots are left for a pending primary."""

    primary: str
    committed: str
    tries_remaining: int

    @property
    def pending(self) -> bool:
        return self.primary != self.committed

    @property
    def fell_back(self) -> bool:
        """A pending primary without tries: the committed slot boots."""
        return self.pending and self.tries_remaining <= 0


FACTORY = LoaderState("a", "a", 0)


def encode_env(state: LoaderState) -> dict[str, str]:
    """The environment variables of ``state`` (see the module docstring)."""
    if state.primary not in _SLOTS or state.committed not in _SLOTS:
        raise RuntimeError(f"invalid loader state {state}")
    other = "b" if state.primary == "a" else "a"
    env = {"SWARMOTA_ORDER": f"{state.primary} {other}"}
    for slot in _SLOTS:
        good = slot == state.committed
        env[f"SWARMOTA_{slot.upper()}_GOOD"] = "1" if good else "0"
        tries = state.tries_remaining if slot == state.primary and not good else 0
        env[f"SWARMOTA_{slot.upper()}_TRIES"] = str(max(0, tries))
    return env


def decode_env(env: Mapping[str, str], where: str) -> LoaderState:
    """The state an environment describes; blank means the factory state.

    Raises:
        ConfigError: the variables are there but make no sense (no good slot, or an
            order that is not a permutation of the slots).
    """
    if not any(k.startswith("SWARMOTA_") for k in env):
        return FACTORY
    order = env.get("SWARMOTA_ORDER", "").split()
    if sorted(order) != list(_SLOTS):
        raise ConfigError(f"{where}: SWARMOTA_ORDER must be 'a b' or 'b a', got "
                          f"{env.get('SWARMOTA_ORDER')!r}")
    good = [s for s in _SLOTS if env.get(f"SWARMOTA_{s.upper()}_GOOD") == "1"]
    if not good:
        raise ConfigError(f"{where}: no slot is marked good")
    primary = order[0]
    committed = primary if primary in good else good[0]
    tries = 0
    if primary != committed:
        raw = env.get(f"SWARMOTA_{primary.upper()}_TRIES", "0")
        tries = int(raw) if raw.isdigit() else 0  # the bootloader skips a garbled count
    return LoaderState(primary, committed, tries)


class Bootloader(Protocol):
    """A real bootloader's environment, as the agent sees it."""

    name: str

    def read(self) -> LoaderState:
        """The environment's state. Raises ``InstallFailed`` or ``ConfigError``."""

    def write(self, state: LoaderState, *, what: str) -> None:
        """Make ``state`` durable and read it back. Raises ``InstallFailed``."""

    def booted_slot(self) -> str:
        """The slot the running system booted from. Raises ``ConfigError``."""


def _run(argv: Sequence[str], what: str) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True,
                              timeout=_TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallFailed(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise InstallFailed(f"{what}: {argv[0]} exited {proc.returncode}: "
                            f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout


def _parse_listing(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key] = value
    return env


def _check_read_back(wanted: Mapping[str, str], got: Mapping[str, str], where: str) -> None:
    wrong = {k: got.get(k) for k, v in wanted.items() if got.get(k) != v}
    if wrong:
        raise InstallFailed(f"{where} read back differs from what was written: {wrong}")


class _BootedSlot:
    """Booted-slot detection shared by the adapters (see ``swarmota.peer.blockslots``)."""

    booted: Callable[[], str] | None = None

    def booted_slot(self) -> str:
        if self.booted is None:
            raise ConfigError("this bootloader was given no way to tell the booted slot")
        return self.booted()


class GrubEnv(_BootedSlot):
    """The GRUB environment block at ``path`` (e.g. ``/boot/grub/grubenv``)."""

    name = "grub"

    def __init__(self, path: Path, *, booted: Callable[[], str] | None = None,
                 tool: str = "grub-editenv") -> None:
        self.path = path
        self.tool = tool
        self.booted = booted

    def _list(self, path: Path) -> dict[str, str]:
        return _parse_listing(_run([self.tool, str(path), "list"], f"reading {path}"))

    def read(self) -> LoaderState:
        if not self.path.exists():
            return FACTORY
        return decode_env(self._list(self.path), str(self.path))

    def write(self, state: LoaderState, *, what: str) -> None:
        if state.tries_remaining > MAX_GRUB_TRIES:
            raise ConfigError(f"GRUB counts at most {MAX_GRUB_TRIES} boot attempts")
        env = encode_env(state)
        tmp = self.path.with_name(f".{self.path.name}.swarmota-tmp")
        crash_point(f"bootenv.{what}.before_write")
        try:
            tmp.unlink(missing_ok=True)
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
            else:
                _run([self.tool, str(tmp), "create"], f"creating {tmp}")
            _run([self.tool, str(tmp), "set", *(f"{k}={v}" for k, v in env.items())],
                 f"writing {tmp}")
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            crash_point(f"bootenv.{what}.before_rename")
            os.replace(tmp, self.path)
            crash_point(f"bootenv.{what}.after_rename")
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise InstallFailed(f"cannot write the GRUB environment {self.path}: {exc}") \
                from exc
        _check_read_back(env, self._list(self.path), str(self.path))
        crash_point(f"bootenv.{what}.after_read_back")


class UBootEnv(_BootedSlot):
    """The U-Boot environment described by ``config`` (a ``fw_env.config``: one line
    per copy, ``DEVICE OFFSET SIZE``; two lines for a redundant environment).
    ``default_env`` is what libubootenv starts from when no copy is valid (a file of
    ``name=value`` lines; the factory state)."""

    name = "uboot"

    def __init__(self, config: Path, *, default_env: Path | None = None,
                 booted: Callable[[], str] | None = None,
                 tools: tuple[str, str] = ("fw_printenv", "fw_setenv")) -> None:
        self.config = config
        self.default_env = default_env
        self.booted = booted
        self.printenv, self.setenv = tools

    def _args(self) -> list[str]:
        args = ["-c", str(self.config)]
        if self.default_env is not None:
            args += ["-f", str(self.default_env)]
        return args

    def _list(self) -> dict[str, str]:
        return _parse_listing(_run([self.printenv, *self._args()],
                                   f"reading the U-Boot environment ({self.config})"))

    def read(self) -> LoaderState:
        return decode_env(self._list(), f"U-Boot environment ({self.config})")

    def write(self, state: LoaderState, *, what: str) -> None:
        env = encode_env(state)
        script_path = self.config.with_name(f".{self.config.name}.swarmota-script")
        crash_point(f"bootenv.{what}.before_write")
        try:
            script_path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        except OSError as exc:
            raise InstallFailed(f"cannot write {script_path}: {exc}") from exc
        try:
            _run([self.setenv, *self._args(), "--script", str(script_path)],
                 f"writing the U-Boot environment ({self.config})")
        finally:
            script_path.unlink(missing_ok=True)
        _check_read_back(env, self._list(), f"U-Boot environment ({self.config})")
        crash_point(f"bootenv.{what}.after_read_back")


def script(name: str) -> str:
    """A bootloader script shipped with the package: ``grub.cfg`` or ``boot.cmd``."""
    if name not in ("grub.cfg", "boot.cmd"):
        raise ConfigError(f"no bootloader script {name!r}: grub.cfg or boot.cmd")
    return resources.files("swarmota.peer").joinpath("bootscripts", name).read_text()
