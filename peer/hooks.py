"""Hot updates of components: install hooks, service restarts in dependency order, the
health check, and the rollback of both the component and its services.

One attempt at switching component ``<name>`` to a new version (``peer.agent`` journals
it first, as a boot attempt of an A/B slot):

    pre-install hook -> current -> v-<new> -> post-install hook
    -> services stopped (reverse dependency order) and started (dependency order)
    -> health check (the component's command, else the device's; with a timeout;
       ``MarkGood`` / ``RollBack`` over D-Bus may decide it)

Any failure (a hook or service command exiting non-zero or past its timeout, the
health check failing or timing out) raises ``PostCheckFailed``; the rollback then points
``current`` at the previous version, runs the previous version's post-install hook with
``SWARMOTA_ROLLBACK=1``, restarts the same services on it, and only then records the
rollback (a crash in between repeats it). Hooks and service commands must therefore be
idempotent (run again after a power cut), as RAUC and Mender require of theirs.

Where hooks come from (``peer.services.ComponentRecipe``):

- the device configuration (``pre_install`` / ``post_install``): commands that ship with
  the device's image, themselves covered by the image's signature;
- the payload (``payload_hooks``): the component's content is a tar archive, and its
  members ``.swarmota/pre-install`` and ``.swarmota/post-install`` are the hooks. They
  are copied out of the installed version file, which was verified against the image
  SHA-256 of the signed release manifest and read back before the switch, so the
  scripts that run are exactly the signed bytes; nothing else of the archive is
  unpacked by the agent (the post-install hook deploys it). Only regular files of at
  most 1 MiB by those exact names are taken; a payload that is not a tar archive fails
  the install (30) before any switch.

Hook environment: ``SWARMOTA_COMPONENT``, ``SWARMOTA_HOOK`` (pre-install /
post-install), ``SWARMOTA_VERSION`` and ``SWARMOTA_COMPONENT_FILE`` (the version being
installed and its file), ``SWARMOTA_PREVIOUS_VERSION`` and ``SWARMOTA_PREVIOUS_FILE``
(empty for a first install), ``SWARMOTA_CURRENT`` (the ``current`` link),
``SWARMOTA_ROLLBACK`` (``1`` when restoring the previous version).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from swarmota.infra.fsio import fsync_dir
from swarmota.peer.bootctl import SlotRecord
from swarmota.peer.components import CURRENT, ComponentStore, InstalledVersion
from swarmota.peer.crashpoints import crash_point
from swarmota.peer.errors import InstallFailed, PostCheckFailed
from swarmota.peer.health import ExternalVerdicts, run_health_check, run_health_command
from swarmota.peer.install import hash_file
from swarmota.peer.services import ComponentRecipe, HotConfig

__all__ = ["HOOK_NAMES", "HotUpdater", "extract_payload_hooks", "hooks_dir"]

log = logging.getLogger(__name__)

PRE_INSTALL, POST_INSTALL = "pre-install", "post-install"
HOOK_NAMES = (PRE_INSTALL, POST_INSTALL)
_MEMBER_PREFIX = ".swarmota/"
MAX_HOOK_BYTES = 1 << 20


def hooks_dir(store: ComponentStore, name: str, sha256: str) -> Path:
    """Where the payload hooks of version ``sha256`` of component ``name`` live."""
    return store.directory(name) / f"hooks-{sha256}"


def extract_payload_hooks(archive: Path, dest: Path) -> list[str]:
    """Copy the hooks out of the tar ``archive`` into the directory ``dest`` (replaced
    atomically); return the hook names found. Blocking.

    Raises:
        InstallFailed: ``archive`` is not a tar archive, or a hook member is not a
            regular file or is larger than ``MAX_HOOK_BYTES``.
    """
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not name.startswith(_MEMBER_PREFIX):
                    continue
                hook = name.removeprefix(_MEMBER_PREFIX)
                if hook not in HOOK_NAMES:
                    continue
                if not member.isreg() or member.size > MAX_HOOK_BYTES:
                    raise InstallFailed(f"payload hook {name} is not a regular file of at "
                                        f"most {MAX_HOOK_BYTES} bytes")
                fh = tar.extractfile(member)
                if fh is None:
                    raise InstallFailed(f"payload hook {name} cannot be read")
                found[hook] = fh.read(MAX_HOOK_BYTES + 1)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InstallFailed(f"the component's payload hooks cannot be read: the content "
                            f"is not a tar archive ({exc})") from exc
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700, parents=True)
    for hook, data in found.items():
        path = tmp / hook
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        path.chmod(0o700)
    fsync_dir(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return sorted(found)


@dataclass(frozen=True)
class _Step:
    """One install or rollback of component ``name`` to ``target`` (from ``other``)."""

    name: str
    target: InstalledVersion | None
    other: InstalledVersion | None
    rollback: bool


class HotUpdater:
    """Runs the attempts and rollbacks of component switches (see the module docstring).

    ``health_command`` / ``health_timeout_s``: the device's, used unless the component's
    recipe names its own; ``verdicts``: where a local client's MarkGood / RollBack
    reach the health check.
    """

    def __init__(self, store: ComponentStore, hot: HotConfig, *,
                 health_command: tuple[str, ...], health_timeout_s: float,
                 verdicts: ExternalVerdicts | None = None) -> None:
        self.store = store
        self.hot = hot
        self.health_command = health_command
        self.health_timeout_s = health_timeout_s
        self.verdicts = verdicts

    def prepare(self, name: str, sha256: str) -> None:
        """Before the switch: with payload hooks, copy them out of the verified
        ``incoming`` file (blocking). Raises ``InstallFailed``."""
        if self.hot.recipe(name).payload_hooks:
            directory = self.store.directory(name)
            found = extract_payload_hooks(directory / "incoming",
                                          hooks_dir(self.store, name, sha256))
            log.info("component %s: payload hooks %s", name, ", ".join(found) or "none")

    async def attempt(self, name: str, new: InstalledVersion,
                      previous: InstalledVersion | None) -> None:
        """Switch ``current`` to ``new`` with its hooks, restart the services, check
        health. Raises ``PostCheckFailed`` naming the step that failed."""
        recipe = self.hot.recipe(name)
        step = _Step(name, new, previous, rollback=False)
        crash_point("component.pre_install")
        await self._hook(recipe, step, PRE_INSTALL)
        await trio.to_thread.run_sync(self.store.activate, name)
        await self._hook(recipe, step, POST_INSTALL)
        crash_point("component.services")
        await self._restart(recipe)
        current = self.store.directory(name) / CURRENT
        await run_health_check(
            recipe.health_command if recipe.health_command is not None
            else self.health_command,
            slot=f"component:{name}", image=current,
            record=SlotRecord(new.version, new.release_counter, new.sha256, new.size),
            timeout_s=recipe.health_timeout_s or self.health_timeout_s,
            read_back=partial(hash_file, current), verdicts=self.verdicts,
            env={"SWARMOTA_COMPONENT": name})

    async def roll_back(self, name: str) -> list[str]:
        """Back to the previous version: ``current``, its post-install hook, the
        services, then the record. Best effort: returns what failed (never raises
        ``PostCheckFailed``); ``OSError`` if the component directory cannot be
        written."""
        record = self.store.record(name)
        recipe = self.hot.recipe(name)
        problems: list[str] = []
        await trio.to_thread.run_sync(self.store.revert, name)
        step = _Step(name, record.previous, record.current, rollback=True)
        crash_point("component.rollback.hook")
        if record.previous is not None:
            try:
                await self._hook(recipe, step, POST_INSTALL)
            except PostCheckFailed as exc:
                problems.append(str(exc))
        crash_point("component.rollback.services")
        try:
            await self._restart(recipe)
        except PostCheckFailed as exc:
            problems.append(str(exc))
        await trio.to_thread.run_sync(self.store.roll_back, name)
        for problem in problems:
            log.error("component %s rollback: %s", name, problem)
        return problems

    async def _hook(self, recipe: ComponentRecipe, step: _Step, hook: str) -> None:
        if step.target is None:
            return
        if recipe.payload_hooks:
            path = hooks_dir(self.store, step.name, step.target.sha256) / hook
            if not path.exists():
                return
            command: tuple[str, ...] = (str(path),)
        else:
            command = recipe.pre_install if hook == PRE_INSTALL else recipe.post_install
            if not command:
                return
        directory = self.store.directory(step.name)

        def file_of(version: InstalledVersion | None) -> str:
            return "" if version is None else str(directory / f"v-{version.sha256}")

        env = {"SWARMOTA_COMPONENT": step.name, "SWARMOTA_HOOK": hook,
               "SWARMOTA_VERSION": step.target.version,
               "SWARMOTA_COMPONENT_FILE": file_of(step.target),
               "SWARMOTA_PREVIOUS_VERSION": step.other.version if step.other else "",
               "SWARMOTA_PREVIOUS_FILE": file_of(step.other),
               "SWARMOTA_CURRENT": str(directory / CURRENT),
               "SWARMOTA_ROLLBACK": "1" if step.rollback else "0"}
        log.info("component %s: %s hook of %s%s", step.name, hook, step.target.version,
                 " (rollback)" if step.rollback else "")
        await run_health_command(command, env=env, timeout_s=recipe.hook_timeout_s,
                                 what=f"{hook} hook of {step.name} {step.target.version}")

    async def _restart(self, recipe: ComponentRecipe) -> None:
        """Stop (reverse order) and start (dependency order) the recipe's services and
        their dependents."""
        order = self.hot.restart_order(recipe.services)
        for spec in reversed(order):
            if spec.stop:
                await run_health_command(spec.stop, env={}, timeout_s=spec.timeout_s,
                                         what=f"service {spec.name} stop")
        for spec in order:
            command, verb = (spec.start, "start") if spec.start else (spec.restart, "restart")
            log.info("service %s: %s", spec.name, verb)
            await run_health_command(command, env={}, timeout_s=spec.timeout_s,
                                     what=f"service {spec.name} {verb}")

