"""The update orchestrator: one pass of check-in, fetch, verify, install, switch, check.

    check in -> TUF refresh + release manifest -> applicability / anti-rollback
    -> chunks from LAN peers and the origin (swarm mode, ``peer.swarm_fetch``) or from
       the origin only (direct mode), each verified -> payload verified -> write the inactive
    slot: from the delta whose base is the active slot (base and result verified), or
    from the full payload (also the fallback when anything about the delta fails)
    -> boot control: new slot primary, pending, `boot_attempts` tries (default 3)
    -> "reboot" (the bootloader consumes the try) -> health check
    -> commit (mark good) or fall back -> report to the tracker
    -> swarm mode: keep seeding the installed payload for ``seed_time_s`` (upload policy)

Every step is a transition of the update state machine (``peer.machine``), persisted in
``STATE/journal.json`` before its side effects. On start the journal and boot control
say how to continue: a pending switch left by a crash or power loss is finished first
(the try counter decides whether the new slot gets its health check or the committed
slot boots again); a pass interrupted before the switch is started over after partial
slot writes are reclaimed (verified chunks are kept); an outcome not yet reported is
reported. Every failure maps to a status code (``peer.errors``); the active slot is
never written. Named crash points (``peer.crashpoints``) mark every step for tests.

Releases of update type module, app or config go through the same states into their
component directory instead of a slot, as hot updates (``peer.components``,
``peer.hooks``: atomic replace of a ``current`` symlink, hooks, services restarted,
health check, commit or back to the previous version with its services); a component
switch interrupted by a crash is attempted again on start, like a boot of an A/B slot.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from swarmota.manifest import (
    IntegrityError,
    ManifestError,
    Payload,
    ReleaseManifest,
    check_applicable,
    parse_release_manifest,
)
from swarmota.peer import machine
from swarmota.peer.announce_relay import AnnounceRelay, background_tasks
from swarmota.peer.bootctl import (
    BootControl,
    SlotRecord,
    boot,
    fall_back,
    mark_good,
    other_slot,
    read_bootctl,
    switch_to,
    write_bootctl,
)
from swarmota.peer.bootloader import Bootloader, LoaderState
from swarmota.peer.components import ComponentStore, InstalledVersion
from swarmota.peer.config import DeviceConfig
from swarmota.peer.control import PassRequest, postponed_until
from swarmota.peer.crashpoints import crash_point
from swarmota.peer.download import PayloadWorkdir, download_payload, verify_payload
from swarmota.peer.errors import (
    BootInterrupted,
    ConfigError,
    DownloadFailed,
    InstallFailed,
    PeerError,
    PostCheckFailed,
    ResourceFailed,
    StatusCode,
    VerifyFailed,
    resource_failure,
)
from swarmota.peer.floors import migrate as migrate_floors
from swarmota.peer.floors import raise_component_floor, read_floors, running_components
from swarmota.peer.health import run_health_check
from swarmota.peer.hooks import HotUpdater
from swarmota.peer.http import HttpClient
from swarmota.peer.identity import Identity, load_identity
from swarmota.peer.install import install_delta, install_image
from swarmota.peer.install_policy import Decision, PolicyPowerSource, decide, load_policy
from swarmota.peer.keystore import TpmKeyStore, open_keystore
from swarmota.peer.logtail import AttemptLog
from swarmota.peer.machine import Action, Event, Journal, JournalError, Phase
from swarmota.peer.policy import UploadPolicy, upload_policy
from swarmota.peer.slots import SlotBackend
from swarmota.peer.state import DeviceState
from swarmota.peer.swarm import SwarmConfig, SwarmSession, TorrentHandleRef, new_peer_id
from swarmota.peer.swarm_fetch import (
    SwarmOptions,
    SwarmUnavailable,
    fetch_torrent,
    swarm_download,
)
from swarmota.peer.tpm import TpmError
from swarmota.peer.tpm_nv import FloorLogError, TrustAnchor
from swarmota.peer.tracker_client import Offer, checkin, send_report
from swarmota.peer.trust import (
    MetadataPass,
    apply_pending_counter_reset,
)
from swarmota.tracker.wire import MAX_MESSAGE_CHARS

__all__ = ["UpdateResult", "swarm_config_for", "update_once"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class UpdateResult:
    """What one update pass did. ``attempted`` is False when nothing was offered."""

    status: StatusCode
    message: str
    attempted: bool = False
    updated: bool = False
    from_version: str | None = None
    to_version: str | None = None
    bytes_origin: int = 0
    bytes_peers: int = 0
    bytes_metadata: int = 0
    chunks_reused: int = 0
    payload_kind: str | None = None
    delta_fallback: str | None = None
    download_mode: str | None = None
    swarm_note: str | None = None
    deferred: str | None = None  # why an offered release was not attempted (policy)
    banned_peers: list[str] = field(default_factory=list)
    dropped_peers: list[str] = field(default_factory=list)  # silent, stalled or snubbed
    bytes_uploaded: int = 0
    reported: bool = False
    # installed and switched; the new slot boots at the next reboot (real bootloaders)
    reboot_pending: bool = False
    poll_after_s: int = 3600
    timings_s: dict[str, float] = field(default_factory=dict)
    # what the agent logged during a failed attempt (the end of it; in its report)
    log_tail: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = int(self.status)
        return out


@contextmanager
def _device_lock(state: DeviceState) -> Iterator[None]:
    if not state.root.is_dir():
        raise ConfigError(f"{state.root} is not a device state directory: run "
                          "'swarmota peer init' first")
    try:
        fd = os.open(state.root / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot lock {state.root}: {exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another agent is updating {state.root}") from None
        yield
    finally:
        os.close(fd)


async def update_once(state: DeviceState, *,
                      clock: Callable[[], float] = time.monotonic,
                      seed_time_s: float | None = None,
                      on_seeding: Callable[[UpdateResult, float], None] | None = None,
                      slots: SlotBackend | None = None,
                      wall_clock: Callable[[], float] = time.time,
                      retry_budget: int | None = None,
                      bootloader: Bootloader | None = None,
                      requests: PassRequest | None = None,
                      retry_window_s: float = 6 * 3600.0,
                      ) -> UpdateResult:
    """Run one update pass on the device in ``state``; never raises ``PeerError``
    except ``ConfigError`` (the device itself is not usable).

    After a swarm-mode update the installed payload is shared with peers for
    ``seed_time_s`` (default: the device configuration's) before this returns; the
    result is saved and reported before that, so cancelling the seeding loses nothing.
    ``on_seeding(result, seconds)`` is called when that sharing starts. ``slots`` is
    the slot backend (default: the device configuration's), ``bootloader`` the
    bootloader adapter (default: the configuration's; none for file boot control, where
    the agent plays the bootloader); ``wall_clock``
    (seconds since the epoch) measures the install policy's windows and delay. With a
    ``retry_budget``, a release whose attempts already failed that many times is not
    attempted again (``deferred``) until another release is offered, or until
    ``retry_window_s`` after the oldest of those failures (the budget recovers with
    time). A failed download (status 10: an unreachable origin, an outage) spends none
    of it: it is no verdict on the release, and the daemon's backoff paces the retries.

    A TPM that fails (``keystore: tpm``: gone, busy, refusing a command) ends the pass
    as status 30 with its words, tried again at the next pass; inside an attempt it is
    the attempt's failure, whose report waits in the outbox while the TPM cannot sign it.

    Resources: a full disk, an I/O error or no memory anywhere in the pass ends it as
    status 30 (``ResourceFailed``) with a report, after the partial files of the pass
    are removed; files that only record (the result, the attempt count) are written on
    a best-effort basis, so that a full disk never turns into a traceback.
    ``requests``: what a local client asked of this pass (``peer.control``: install a
    deferred release now, cancel a switch waiting for its reboot, decide a health check
    in progress).
    """
    with _device_lock(state):
        config = state.config()
        # a pass killed before it ended left its progress behind: it is not running
        _best_effort("removing stale progress", lambda: state.save_progress(None))
        bc = await trio.to_thread.run_sync(  # per-kind floors for an older directory
            migrate_floors, state.root, state.bootctl_path,
            ComponentStore(state.root / "components"))
        keystore = open_keystore(config, state.root)
        if keystore is None:
            identity: Identity | None = load_identity(state.root)
        else:  # the TPM's floors catch up first (a power cut between two floor writes)
            try:
                try:
                    await trio.to_thread.run_sync(_sync_hardware_floors, keystore,
                                                  state.root, bc)
                except FloorLogError as exc:  # the pass goes on: every release is refused
                    log.error("%s", exc)
                identity = await trio.to_thread.run_sync(keystore.identity)
            except TpmError as exc:  # nothing can be signed nor decided: the next pass
                result = _tpm_failed(exc, bc)
                _save_result(state, result)
                return result
        async with HttpClient.for_device(config, identity) as http, \
                background_tasks() as nursery:
            run = _Run(state, http, clock,
                       config.seed_time_s if seed_time_s is None else seed_time_s,
                       state.slots(config) if slots is None else slots, wall_clock)
            run.loader = state.bootloader(config) if bootloader is None else bootloader
            run.retry_budget = retry_budget
            run.requests = requests or PassRequest()
            run.retry_window_s = retry_window_s
            run.identity = identity
            run.keystore = keystore
            run.nursery = nursery
            try:
                with AttemptLog() as attempt_log:
                    try:
                        result = await run.start(bc)
                    except (OSError, MemoryError) as exc:  # one no step expected (recovery)
                        failure = resource_failure("update pass", exc)
                        log.error("%s", failure)
                        await run.free_resources()
                        result = UpdateResult(failure.status, str(failure),
                                              from_version=bc.slot(bc.committed).version)
                    except TpmError as exc:  # outside an attempt (recovery, a counter reset)
                        result = _tpm_failed(exc, bc)
                if (result.attempted and result.to_version is not None
                        and not result.reboot_pending
                        and result.status not in (StatusCode.INTERRUPTED,
                                                  StatusCode.DOWNLOAD_FAILED)):
                    to_version, ok = result.to_version, result.status == StatusCode.OK
                    _best_effort("recording the attempt", lambda: state.count_attempt(
                        to_version, ok=ok, now_s=wall_clock()))
                if result.status != StatusCode.OK:
                    result.log_tail = attempt_log.text()
                await run.report(result)
                _save_result(state, result)
                if run.reboot_needed:
                    await _reboot(config)
                else:
                    await run.seed(result, on_seeding)
            finally:
                await run.close()
        _save_result(state, result)
        return result


async def _reboot(config: DeviceConfig) -> None:
    """Run the device's reboot command (a real bootloader boots the new slot, or the
    committed one again, from there). Without one, the reboot is the device's to do."""
    if not config.reboot_command:
        log.warning("reboot needed to finish the update; no reboot_command configured")
        return
    log.warning("rebooting: %s", " ".join(config.reboot_command))
    try:
        with trio.fail_after(config.health_timeout_s):
            await trio.run_process(list(config.reboot_command), check=False)
    except (OSError, trio.TooSlowError) as exc:
        log.error("reboot command failed: %s", exc)


def _best_effort(what: str, write: Callable[[], object]) -> None:
    """Write a file that only records something; a full disk or an I/O error is logged,
    never raised (the pass's outcome does not depend on it)."""
    try:
        write()
    except (OSError, MemoryError) as exc:
        log.error("%s failed: %s", what, resource_failure(what, exc))


def _save_result(state: DeviceState, result: UpdateResult) -> None:
    _best_effort("saving the result", lambda: state.save_result(
        {**result.to_json(), "finished_at": time.time()}))


def _tpm_failed(exc: TpmError, bc: BootControl) -> UpdateResult:
    """The outcome of a pass the device's TPM failed outside an attempt (gone, busy, a
    command refused): a failure like any other (backoff), tried again at the next pass.
    Inside an attempt it is that attempt's failure (status 30, reported)."""
    log.error("the TPM failed, the pass ends (tried again at the next one): %s", exc)
    return UpdateResult(exc.status, f"the TPM failed: {exc}",
                        from_version=bc.slot(bc.committed).version)


def _sync_hardware_floors(keystore: TpmKeyStore, state_root: Path, bc: BootControl) -> None:
    """Raise the TPM's floors to those of the state directory (``peer.tpm_nv``): after
    every floor the agent writes there, and at the start of a pass.

    Raises:
        TpmError: the TPM cannot be read or written.
        FloorLogError: the floor log does not verify against the TPM.
    """
    keystore.floors.raise_to(read_floors(state_root, bc, ComponentStore(
        state_root / "components")))


def swarm_config_for(config: DeviceConfig, *, has_identity: bool,
                     policy: UploadPolicy | None = None) -> SwarmConfig:
    """The libtorrent session settings of a device: its listen address and rate limits,
    its upload ``policy`` (default: read now), local service discovery only if its
    configuration allows it (DHT, UPnP and NAT-PMP never), and a TLS listener for private
    swarms when it has a fleet identity."""
    host, port = config.swarm_listen_host_port
    if policy is None:
        policy = upload_policy(config)
    return SwarmConfig(
        listen_host=host, listen_port=port,
        download_rate_limit_bytes_per_s=config.download_rate_limit_bytes_per_s,
        upload_rate_limit_bytes_per_s=policy.rate_limit_bytes_per_s,
        upload_enabled=policy.allowed,
        enable_lsd=config.swarm_local_discovery,
        ssl_listen=has_identity)


def _report_text(message: str) -> str:
    """A message the tracker accepts: at most 4096 characters of valid UTF-8 (error texts
    may quote what a hostile server sent, lone surrogates included)."""
    return message.encode("utf-8", "replace").decode("utf-8")[:MAX_MESSAGE_CHARS]


def _component_of(target_slot: str | None) -> str | None:
    """The component a journal's target names (``component:<name>``), if any."""
    if target_slot is not None and target_slot.startswith("component:"):
        return target_slot.removeprefix("component:")
    return None


def _min_peer_rate(config: DeviceConfig) -> int:
    """Below this rate from peers the origin helps; never above half the device's own
    download limit (the swarm cannot be faster than that)."""
    rate = config.swarm_min_rate_bytes_per_s
    if config.download_rate_limit_bytes_per_s:
        rate = min(rate, config.download_rate_limit_bytes_per_s // 2)
    return rate


async def _outcome_into(into: list[outcome.Outcome[T]],
                        fn: Callable[..., Awaitable[T]], *args: Any) -> None:
    """Run ``fn(*args)`` beside other work; its value or error goes to ``into``, for the
    caller to unwrap where it handles that error (a task's error would cancel its
    siblings, and leave the nursery as an exception group)."""
    try:
        value = await fn(*args)
    except Exception as exc:  # handed over: raised by unwrap()
        into.append(outcome.Error(exc))
        return
    into.append(outcome.Value(value))


@dataclass(frozen=True)
class _Seedable:
    """A payload downloaded through the swarm, still in the session (may be seeded)."""

    ref: TorrentHandleRef
    work: PayloadWorkdir
    uploaded_bytes: int  # by this torrent while it was downloading


class _Run:
    """State of one pass; owned by ``update_once``."""

    def __init__(self, state: DeviceState, http: HttpClient,
                 clock: Callable[[], float], seed_time_s: float, slots: SlotBackend,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if seed_time_s < 0:
            raise ConfigError(f"seed time must be >= 0, not {seed_time_s}")
        self.seed_time_s = seed_time_s
        self.state = state
        self.slots = slots
        self.components = ComponentStore(state.root / "components")
        self.wall_clock = wall_clock
        self.retry_budget: int | None = None
        self.requests = PassRequest()
        self.loader: Bootloader | None = None  # None: file boot control, simulated boots
        self.reboot_needed = False
        self.retry_window_s = 6 * 3600.0
        self.policy = load_policy(state.policy_path)  # ConfigError: a bad file, said early
        self.journal = Journal()
        self.config = state.config()
        self.http = http
        self.clock = clock
        self.timings: dict[str, float] = {}
        self.swarm: SwarmSession | None = None
        self.identity: Identity | None = None
        self.keystore: TpmKeyStore | None = None  # keys, floors, trust anchor in a TPM
        self.nursery: trio.Nursery | None = None  # runs the announce relay
        self.relay_url: str | None = None
        self.installed: _Seedable | None = None
        self.last_swarm: _Seedable | None = None
        self.metadata: MetadataPass | None = None  # this pass's refresh of the metadata
        self.checkin_at: float | None = None  # ``clock`` when the check-in began

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.timings[name] = round(self.clock() - start, 6)

    def _step(self, event: Event, **fields: Any) -> None:
        """Advance the state machine; persist the journal unless the new state is
        ``checking`` or an ``idle`` reached from it (no durable side effects)."""
        before = self.journal.phase
        self.journal = machine.advance(self.journal, event, **fields)
        if self.journal.phase is Phase.CHECKING or (
                self.journal.phase is Phase.IDLE and before is Phase.CHECKING):
            return
        self.state.save_journal(self.journal)

    async def start(self, bc: BootControl) -> UpdateResult:
        """Read the journal, recover from an interrupted pass, run this one."""
        try:
            journal = self.state.journal()
        except JournalError as exc:
            # Written atomically, so damage: treat it as a pass interrupted before the
            # switch (boot control, checksummed and read back, still decides the rest).
            log.warning("%s: %s; starting over", self.state.journal_path, exc)
            journal = Journal(phase=Phase.APPLYING)
        if self.loader is not None:
            bc = await trio.to_thread.run_sync(self._reconcile, bc)
        committed_version = bc.slot(bc.committed).version
        component = _component_of(journal.target_slot)
        if component is not None:
            record = self.components.record(component)
            committed_version = (record.current.version if record.current and
                                 not record.pending else None)
        pending_components = await trio.to_thread.run_sync(self.components.pending)
        rec = machine.recover(journal, pending=bc.pending or bool(pending_components),
                              committed_version=committed_version)
        if rec.journal != journal:
            self.state.save_journal(rec.journal)
        self.journal = rec.journal
        if journal.phase is not Phase.IDLE or bc.pending:
            log.warning("recovering: %s", rec.note)
        if Action.RECLAIM_SLOT_WRITES in rec.actions:
            removed = await trio.to_thread.run_sync(self.slots.reclaim)
            for name in self.components.names():
                removed += await trio.to_thread.run_sync(self.components.staging(name).reclaim)
            if removed:
                log.warning("removed partial slot writes: %s", ", ".join(removed))
        if Action.FINISH_VERDICT in rec.actions and bc.pending:
            return await self.finish_verdict(bc)
        if Action.FINISH_PENDING in rec.actions or Action.FINISH_VERDICT in rec.actions:
            if bc.pending:
                return await self.finish_pending(bc)
            return await self._finish_component(pending_components, bc)
        if Action.QUEUE_REPORT in rec.actions:
            result = self._recovered_result(rec.journal)
            if result.updated:  # the interrupted pass's payload is of no use any more
                await trio.to_thread.run_sync(self._remove_downloads, set())
                if component is not None and rec.journal.release_counter is not None:
                    try:
                        self._raise_floor(component, rec.journal.release_counter)
                    except InstallFailed as exc:  # the next commit raises it
                        log.warning("anti-rollback floor not raised: %s", exc)
            return result
        return await self.update(bc)

    def _hot(self) -> HotUpdater:
        """Runs component switches: hooks, services, health (``swarmota.peer.hooks``)."""
        return HotUpdater(self.components, self.config.hot,
                          health_command=self.config.health_command,
                          health_timeout_s=self.config.health_timeout_s,
                          verdicts=self.requests.verdicts)

    async def _finish_component(self, names: list[str], bc: BootControl) -> UpdateResult:
        """A component switch left by a crash or power loss (its record still pending):
        the journaled verdict is carried out; else the attempt is repeated while the
        budget lasts (the journal counts the attempts); else the component and its
        services go back to the previous version: 41, every attempt having reached the
        agent (interrupted: not a verdict on the release)."""
        j = self.journal
        name = _component_of(j.target_slot)
        if name not in names:
            name = names[0]
        hot = self._hot()
        for other in names:
            if other != name:  # cannot happen with one journal; do not leave it pending
                log.warning("component %s is pending without a journal: rolled back", other)
                await self._component_roll_back(hot, other, "", raise_=False)
        record = self.components.record(name)
        new = record.current
        if new is None:
            raise RuntimeError("a pending component always has a current version")
        result = UpdateResult(StatusCode.OK, "", attempted=True,
                              from_version=(record.previous.version if record.previous
                                            else bc.slot(bc.committed).version),
                              to_version=new.version, timings_s=self.timings)
        try:
            if j.phase is Phase.COMMITTED:
                await trio.to_thread.run_sync(self.components.commit, name)
                self._raise_floor(name, new.release_counter)
            elif j.phase is Phase.ROLLED_BACK:
                await self._component_roll_back(
                    hot, name, j.message or f"component {name} update to {new.version} "
                                            "rolled back", status=j.status)
            else:
                if j.phase is not Phase.HEALTH_CHECKING:  # stopped before SWITCHED
                    self.journal = Journal(seq=j.seq, attempt=j.attempt)
                    self._step(Event.RESUME_PENDING, from_version=result.from_version,
                               to_version=new.version, release_counter=new.release_counter,
                               target_slot=f"component:{name}",
                               boot_budget=self.config.boot_attempts)
                if self.journal.boot_attempts >= self.journal.boot_budget:
                    status, message = machine.budget_spent_outcome(self.journal)
                    self._step(Event.BUDGET_SPENT, status=status,
                               message=_report_text(message))
                    await self._component_roll_back(hot, name, message, status=status)
                else:
                    with trio.CancelScope(shield=True):
                        await self._component_attempt(hot, name)
            result.updated = True
            result.message = (f"updated component {name} {result.from_version} -> "
                              f"{new.version} (finished after restart)")
            await trio.to_thread.run_sync(self._remove_downloads, set())
        except PeerError as exc:
            if isinstance(exc, ConfigError):
                raise
            result.status, result.message = exc.status, str(exc)
        return result

    async def _component_attempt(self, hot: HotUpdater, name: str) -> None:
        """One attempt at the staged switch of component ``name``, journaled before it
        runs (a crash in it is an interrupted attempt, repeated at the next start), its
        verdict journaled before the commit or the rollback.

        Raises:
            PostCheckFailed: a hook, a service or the health check failed; rolled back.
        """
        self._step(Event.BOOT_ATTEMPT)
        record = self.components.record(name)
        if record.current is None:
            raise RuntimeError("a pending component always has a current version")
        try:
            crash_point("health.before")
            with self._timed("health"):
                await hot.attempt(name, record.current, record.previous)
            crash_point("health.after")
        except PostCheckFailed as exc:
            crash_point("health.after")
            message = f"component {name} update to {record.current.version} rolled back: {exc}"
            self._step(Event.UNHEALTHY, status=int(StatusCode.POSTCHECK_FAILED),
                       message=_report_text(message))
            await self._component_roll_back(hot, name, message)
        self._step(Event.HEALTHY)
        await trio.to_thread.run_sync(self.components.commit, name)
        self._raise_floor(name, record.current.release_counter)

    async def _component_roll_back(self, hot: HotUpdater, name: str, message: str, *,
                                   status: int | None = None, raise_: bool = True) -> None:
        """Component ``name`` and its services back on the previous version; then raise
        ``PostCheckFailed(message)`` (``BootInterrupted`` for ``status`` 41), with what
        the rollback itself could not do."""
        try:
            problems = await hot.roll_back(name)
        except OSError as exc:
            raise ConfigError(f"cannot roll back component {name}: {exc}") from exc
        if problems:
            message += "; rolling back: " + "; ".join(problems)
        if not raise_:
            return
        if status == StatusCode.INTERRUPTED:
            raise BootInterrupted(message)
        raise PostCheckFailed(message)

    def _raise_floor(self, component: str, counter: int) -> None:
        """A committed component release raises that component's anti-rollback floor
        (``peer.floors``: one per update kind and component), then the TPM's."""
        raise_component_floor(self.state.root, component, counter)
        self._raise_hardware_floors(read_bootctl(self.state.bootctl_path))

    def _raise_hardware_floors(self, bc: BootControl) -> None:
        """With a TPM, raise its floors to the state directory's (just raised). A TPM
        that fails here costs nothing: the next pass catches up before anything else."""
        if self.keystore is None:
            return
        try:
            _sync_hardware_floors(self.keystore, self.state.root, bc)
        except (TpmError, FloorLogError) as exc:
            log.warning("the TPM's anti-rollback floors not raised (caught up at the next "
                        "pass): %s", exc)

    def _recovered_result(self, journal: Journal) -> UpdateResult:
        """The outcome of an attempt that finished (or was reported) before a restart."""
        status = StatusCode(journal.status if journal.status is not None else 0)
        return UpdateResult(status, journal.message or "", attempted=True,
                            updated=status == StatusCode.OK,
                            from_version=journal.from_version, to_version=journal.to_version,
                            payload_kind=journal.payload_kind, timings_s=self.timings)

    async def update(self, bc: BootControl) -> UpdateResult:
        active = bc.slot(bc.committed)
        if active.version is None:
            raise ConfigError(f"committed slot {bc.committed} has no version in boot control")
        result = UpdateResult(StatusCode.OK, "up to date", from_version=active.version,
                              timings_s=self.timings)
        start = self.clock()
        bc = await trio.to_thread.run_sync(self._apply_counter_reset, bc)
        self._step(Event.CHECK)
        running = await trio.to_thread.run_sync(running_components, self.components)
        # The metadata is refreshed while the device checks in: an offer only names a
        # release, which is looked up in the refreshed (verified) metadata afterwards.
        metadata = await trio.to_thread.run_sync(self._new_metadata_pass)
        self.checkin_at = self.clock()
        async with trio.open_nursery() as nursery:
            refreshed: list[outcome.Outcome[None]] = []
            nursery.start_soon(self._refresh_metadata, metadata, refreshed)
            with self._timed("checkin"):
                checked = await outcome.acapture(
                    checkin, self.http, self.config, version=active.version,
                    release_counter=bc.min_release_counter, components=running)
        result.bytes_metadata += metadata.bytes_received
        try:
            offer, result.poll_after_s = checked.unwrap()
        except DownloadFailed as exc:
            self._step(Event.NO_OFFER)
            result.status, result.message = exc.status, f"check-in failed: {exc}"
            return result
        runs = next((c.name for c in running if (c.version, c.release_counter)
                     == (offer.version, offer.release_counter)), None) if offer else None
        if offer is None or runs is not None:
            # (a tracker that reads no per-component counters offers again what a
            # component already runs: nothing to do, no attempt, no report)
            self._step(Event.NO_OFFER)
            await trio.to_thread.run_sync(self._remove_downloads, set())
            if offer is not None and runs is not None:
                result.message = f"up to date (offered {offer.version}: component {runs} runs it)"
            elif await self._trust_refreshed(refreshed[0]):
                lowered = await trio.to_thread.run_sync(self._apply_counter_reset, bc)
                if lowered.min_release_counter != bc.min_release_counter:
                    return await self.update(lowered)  # once: the epoch is now applied
            return result
        if self.retry_budget is not None and self.requests.install_now != offer.version:
            failed = self.state.failed_attempts(offer.version, now_s=self.wall_clock(),
                                                window_s=self.retry_window_s)
            if len(failed) >= self.retry_budget:
                self._step(Event.NO_OFFER)
                result.to_version = offer.version
                again = datetime.fromtimestamp(min(failed) + self.retry_window_s, UTC)
                result.deferred = (f"retry budget spent ({len(failed)} failed attempts; "
                                   f"tried again from {again:%Y-%m-%d %H:%M:%S} UTC)")
                result.message = f"{offer.version} offered, not attempted: {result.deferred}"
                return result
        result.attempted = True
        result.to_version = offer.version
        target = other_slot(bc.committed)
        try:
            refreshed[0].unwrap()  # the offer is of use only with verified metadata
            release, bc = await self._fetch_release(offer, bc, result)
            decision = await self._decide(release)
            if not decision.allowed:
                self._step(Event.NO_OFFER)
                result.attempted = False
                result.deferred = decision.reason
                result.message = f"{release.version} offered, deferred: {decision.reason}"
                log.info("%s", result.message)
                return result
            name = release.component
            backend, base_slot = self.slots, bc.committed
            base_sha, from_version = active.sha256, active.version
            if name is not None:  # module, app or config: a component, not a slot
                target = f"component:{name}"
                backend, base_slot = self.components.staging(name), "current"
                current = self.components.record(name).current
                base_sha = current.sha256 if current else None
                from_version = current.version if current else active.version
                result.from_version = from_version
            delta = release.delta_for(base_sha) if base_sha else None
            first = delta or release.full_payload
            await trio.to_thread.run_sync(  # the fallback from a delta counts too
                self._check_space, release, (first, release.full_payload))
            self._step(Event.OFFER, from_version=from_version, to_version=release.version,
                       release_counter=release.release_counter, target_slot=target,
                       payload_sha256=first.sha256, payload_kind=first.kind)
            await trio.to_thread.run_sync(self._remove_downloads,
                                          {p.sha256 for p in release.payloads})
            if name is not None:
                await self._update_component(release, name, delta, result)
                return result
            if self.slots.in_place and bc.slot(target).version is not None:
                # the partition is about to hold neither its old image nor the new one
                bc = write_bootctl(self.state.bootctl_path,
                                   bc.with_slot(target, SlotRecord(None, 0, None, 0)),
                                   what="invalidate")
            work = await self._install(release, delta, backend, base_slot, target, result)
            self._step(Event.APPLIED)
            record = SlotRecord(release.version, release.release_counter,
                                release.image.sha256, release.image.size)
            await self._read_back(self.slots, target, record)
            # From the switch to the outcome, a shutdown request waits (the health check
            # has its own timeout): cancelling here would cost the new slot a try.
            with trio.CancelScope(shield=True):
                bc = self._switch(bc, target, record)
                self._step(Event.SWITCHED, boot_budget=self.config.boot_attempts)
                if self.loader is not None:  # a real reboot decides, then the next start
                    result.reboot_pending = True
                    self.reboot_needed = True
                    result.message = (f"{release.version} installed in slot {target}; "
                                      "rebooting into it")
                    return result
                try:
                    await self._reboot_and_check(bc)
                finally:
                    # kept until the outcome: a crash in between re-applies it without
                    # downloading it again
                    if self.installed is None or self.installed.work is not work:
                        await trio.to_thread.run_sync(work.remove)  # else after seeding
            result.updated = True
            result.message = f"updated {active.version} -> {release.version}"
        except (PeerError, OSError, MemoryError) as exc:
            if isinstance(exc, ConfigError):
                raise
            failure = exc if isinstance(exc, PeerError) else resource_failure(
                f"update to {offer.version}", exc)
            result.status, result.message = failure.status, str(failure)
            log.warning("update to %s failed (%d): %s", offer.version, failure.status, failure)
            if isinstance(failure, ResourceFailed):
                await self.free_resources()
        finally:
            self.timings["total"] = round(self.clock() - start, 6)
        return result

    async def free_resources(self) -> None:
        """After a resource failure (a full disk...): remove this pass's partial files,
        download work areas and partial slot or component writes, so that the report,
        the journal and the next pass have room. (A verified download is kept otherwise:
        resuming it is cheaper than fetching it again.)"""
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self._remove_downloads, set())
                removed = await trio.to_thread.run_sync(self.slots.reclaim)
                for name in self.components.names():
                    removed += await trio.to_thread.run_sync(
                        self.components.staging(name).reclaim)
            except (OSError, MemoryError) as exc:
                log.error("cannot remove partial files: %s", exc)
                return
            if removed:
                log.warning("removed partial writes: %s", ", ".join(removed))

    async def _decide(self, release: ReleaseManifest) -> Decision:
        """The install policy's verdict on ``release`` now (``swarmota.peer.install_policy``)."""
        now_s = self.wall_clock()
        first = await trio.to_thread.run_sync(self.state.first_offered, release.version, now_s)
        power = None
        if self.policy.min_battery_percent:
            power = await trio.to_thread.run_sync(PolicyPowerSource(self.policy).read)
        postponed = await trio.to_thread.run_sync(postponed_until, self.state.root)
        return decide(self.policy, now=datetime.fromtimestamp(now_s, UTC),
                      critical=release.critical, metered=self.config.network_metered,
                      power=power, first_offered_at_s=first, now_s=now_s,
                      install_now=self.requests.install_now == release.version,
                      postponed_until_s=postponed)

    def _check_space(self, release: ReleaseManifest, payloads: Sequence[Payload]) -> None:
        """The largest of ``payloads`` still to download and the new image must fit,
        besides the policy's reserve (before anything is downloaded). ``payloads``: the
        one to fetch, and the full payload a delta falls back to (the delta's work area
        is removed before the fallback, so the larger of the two counts).

        Raises:
            InstallFailed: they do not.
            ResourceFailed: the file systems cannot be examined.
        """
        try:
            self._check_space_now(release, payloads)
        except OSError as exc:
            raise resource_failure("checking free space", exc) from exc

    def _check_space_now(self, release: ReleaseManifest, payloads: Sequence[Payload]) -> None:
        downloads = self.state.downloads_dir
        downloads.mkdir(parents=True, exist_ok=True)

        def still_to_fetch(payload: Payload) -> int:
            try:
                have = (downloads / payload.sha256 / "payload.part").stat().st_blocks * 512
            except FileNotFoundError:
                have = 0
            return max(0, payload.size - have)

        needs = {downloads: max(still_to_fetch(p) for p in payloads)}
        image_dir = self.slots.staging_dir()  # None: a partition, written in place
        if release.component is not None:  # the nearest existing directory of the file
            image_dir = self.components.directory(release.component)
            while not image_dir.exists() and image_dir != image_dir.parent:
                image_dir = image_dir.parent
        if image_dir is not None:
            needs[image_dir] = needs.get(image_dir, 0) + release.image.size
        by_device: dict[int, tuple[Path, int]] = {}
        for path, need in needs.items():
            dev = os.stat(path).st_dev
            prev = by_device.get(dev, (path, 0))
            by_device[dev] = (prev[0], prev[1] + need)
        for path, need in by_device.values():
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free < need + self.policy.reserve_bytes:
                raise InstallFailed(f"not enough free space in {path}: {need} bytes needed "
                                    f"(+{self.policy.reserve_bytes} reserved), {free} free")

    async def _update_component(self, release: ReleaseManifest, name: str,
                                delta: Payload | None, result: UpdateResult) -> None:
        """Install a module, app or config release into its component directory as a hot
        update: staged (pending), then attempts journaled like boot attempts (hooks,
        services restarted in dependency order, health check: ``peer.hooks``), then
        commit, or the component and its services back on the previous version."""
        staging = self.components.staging(name)
        work = await self._install(release, delta, staging, "current", "incoming", result)
        self._step(Event.APPLIED)
        record = SlotRecord(release.version, release.release_counter, release.image.sha256,
                            release.image.size)
        await self._read_back(staging, "incoming", record)
        new = InstalledVersion(release.version, release.release_counter,
                               release.image.sha256, release.image.size)
        hot = self._hot()
        try:
            await trio.to_thread.run_sync(hot.prepare, name, new.sha256)
        except OSError as exc:
            raise InstallFailed(f"cannot prepare component {name}: {exc}") from exc
        with trio.CancelScope(shield=True):
            try:
                try:
                    await trio.to_thread.run_sync(self.components.stage, name, new)
                except OSError as exc:
                    raise InstallFailed(f"cannot switch component {name}: {exc}") from exc
                self._step(Event.SWITCHED, boot_budget=self.config.boot_attempts)
                await self._component_attempt(hot, name)
            finally:
                if self.installed is None or self.installed.work is not work:
                    await trio.to_thread.run_sync(work.remove)  # else after seeding
        result.updated = True
        result.message = (f"updated component {name} {result.from_version} -> "
                          f"{release.version} ({release.update_type})")

    async def _read_back(self, backend: SlotBackend, slot: str, record: SlotRecord) -> None:
        """The written slot, read back from storage, must be the signed image before
        boot control may name it (catches damage after the write)."""
        try:
            size, sha = await trio.to_thread.run_sync(backend.hash, slot, record.size)
        except OSError as exc:
            raise InstallFailed(f"cannot read slot {slot} back: {exc}") from exc
        if (size, sha) != (record.size, record.sha256):
            raise VerifyFailed(f"slot {slot} read back after writing is not the signed image "
                               f"(size {size}, sha256 {sha}); not switching to it")

    def _remove_downloads(self, keep: set[str]) -> None:
        """Reclaim work areas of payloads other than ``keep`` (an older release's
        interrupted download; resume is keyed to the payload hash, never mixed)."""
        try:
            entries = list(self.state.downloads_dir.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.is_dir() and entry.name not in keep:
                log.info("removing stale download %s", entry.name[:12])
                shutil.rmtree(entry, ignore_errors=True)

    async def _download(self, payload: Payload, result: UpdateResult) -> PayloadWorkdir:
        """Fetch ``payload`` (swarm or direct mode), with its chunk list first if the
        manifest was the compact one; the origin's bytes are counted exactly (everything
        this pass's HTTP client received for it). The work area's payload is the one
        with its chunk hashes."""
        before = self.http.bytes_received
        self.last_swarm = None
        try:
            with self._timed(f"download_{payload.kind}"):
                url = f"{self.config.origin_url.rstrip('/')}/{payload.path}"
                torrent: list[outcome.Outcome[bytes]] = []
                async with trio.open_nursery() as nursery:
                    if self.config.download_mode == "swarm":  # both pinned by the manifest
                        nursery.start_soon(_outcome_into, torrent, fetch_torrent, self.http,
                                           payload, f"{url}.torrent")
                    listed = await outcome.acapture(self._with_chunk_list, payload)
                payload = listed.unwrap()
                work = PayloadWorkdir(self.state.downloads_dir, payload)
                if self.config.download_mode == "swarm":
                    try:
                        await self._swarm_download(work, url, torrent[0], result)
                        return work
                    except SwarmUnavailable as exc:
                        log.warning("swarm unavailable, downloading directly: %s", exc)
                        result.swarm_note = str(exc)
                result.download_mode = "direct"
                stats = await download_payload(
                    self.http, url, work, concurrency=self.config.download_concurrency,
                    attempts=self.config.chunk_attempts, backoff_s=self.config.retry_backoff_s,
                    on_chunk=self._direct_progress(payload), verify=False)
                result.chunks_reused += stats.chunks_reused
                self.timings[f"transfer_{payload.kind}"] = round(stats.transfer_s, 6)
                self._delivered(self.clock())
                return work
        finally:
            result.bytes_origin += self.http.bytes_received - before

    async def _with_chunk_list(self, payload: Payload) -> Payload:
        """``payload`` with its chunk hashes: from its chunk list file on the origin,
        verified against the size and SHA-256 the signed (compact) manifest names, and
        kept in the payload's work area for a resumed download.

        Raises:
            DownloadFailed: the chunk list cannot be fetched.
            VerifyFailed: it is not the one named.
        """
        listed = payload.chunk_list
        if listed is None:
            return payload
        work = PayloadWorkdir(self.state.downloads_dir, payload)
        kept = await trio.to_thread.run_sync(work.kept_chunk_list)
        if kept is not None:  # an earlier pass fetched it (its download is resumed)
            return kept
        with self._timed("chunk_list"):
            data = await self.http.get_bytes(
                f"{self.config.origin_url.rstrip('/')}/{listed.path}", max_bytes=listed.size)
        try:
            loaded = payload.with_chunk_list(data)
        except IntegrityError as exc:
            raise VerifyFailed(str(exc)) from exc
        await trio.to_thread.run_sync(work.keep_chunk_list, data)
        return loaded

    async def _swarm_download(self, work: PayloadWorkdir, url: str,
                              torrent: outcome.Outcome[bytes], result: UpdateResult) -> None:
        config = self.config
        session = await self._swarm_session()
        assert self.relay_url is not None
        identity = self.identity
        options = SwarmOptions(
            # libtorrent announces through the relay: pinned, signed (peer/announce_relay)
            announce_urls=(self.relay_url,),
            identity=None if identity is None else await trio.to_thread.run_sync(
                identity.tls_identity),
            stall_s=config.swarm_stall_s, timeout_s=config.swarm_timeout_s,
            min_peer_rate_bytes_per_s=_min_peer_rate(config),
            waste_budget_bytes=config.swarm_waste_budget_bytes,
            silent_peer_s=config.swarm_silent_peer_s,
            direct_concurrency=config.download_concurrency, attempts=config.chunk_attempts,
            backoff_s=config.retry_backoff_s, spread_key=config.device_id,
            device_id=config.device_id)  # the tracker admits the announce by rollout
        result.download_mode = "swarm"
        started = self.clock()
        ref, stats = await swarm_download(session, self.http, work, payload_url=url,
                                          options=options, progress=self.state.save_progress,
                                          torrent=torrent.unwrap())
        self._delivered(started + stats.transfer_s)
        result.bytes_peers += stats.bytes_peers
        result.bytes_uploaded += stats.bytes_uploaded
        self.timings[f"transfer_{work.payload.kind}"] = round(stats.transfer_s, 6)
        result.chunks_reused += stats.chunks_reused
        result.banned_peers.extend(p for p in stats.banned_peers if p not in result.banned_peers)
        result.dropped_peers.extend(p for p in stats.dropped_peers
                                    if p not in result.dropped_peers)
        if stats.fell_back:
            result.swarm_note = stats.fell_back
        if ref is not None:
            self.last_swarm = _Seedable(ref, work, stats.bytes_uploaded)

    async def _swarm_session(self) -> SwarmSession:
        """The pass's swarm session, started when the first swarm download begins (not
        earlier, beside the metadata: libtorrent holds the GIL while a session starts,
        so it would not overlap; tried, and 16 devices starting sessions at once slowed
        every device's metadata), with a fresh peer id for the torrent to be added."""
        if self.relay_url is None:
            assert self.nursery is not None
            relay = AnnounceRelay(self.http, self.config.tracker_url)
            self.relay_url = await self.nursery.start(relay.serve)
        if self.swarm is None:
            policy = upload_policy(self.config)
            if not policy.allowed:
                log.info("not uploading to peers: %s", policy.reason)
            swarm_config = swarm_config_for(self.config, has_identity=self.identity
                                            is not None, policy=policy)
            self.swarm = await trio.to_thread.run_sync(SwarmSession, swarm_config)
        # Its seniority among downloaders, from when it is ready to add the torrent (a
        # session can take 0.2 s to start on a busy device, and a device that started
        # earlier but announced later took the job over from one already fetching): the
        # senior fetches from the origin for the others, unless its own downloads are
        # capped (peer/swarm_fetch.py).
        self.swarm.set_peer_id(new_peer_id(
            self.wall_clock(), lead=not self.config.download_rate_limit_bytes_per_s))
        return self.swarm

    def _delivered(self, at: float) -> None:
        """Record ``delivered``: from the check-in until every chunk of the payload was
        there, verified (``at``), on the pass's clock: its phases overlap, so their sum
        is not the time it took."""
        if self.checkin_at is not None:
            self.timings["delivered"] = round(at - self.checkin_at, 6)

    def _direct_progress(self, payload: Payload) -> Callable[[int, int], None]:
        done = [0, 0.0]

        def on_chunk(index: int, length: int) -> None:
            done[0] += 1
            now = self.clock()
            if now - done[1] >= 0.5 or done[0] == payload.chunk_count:
                done[1] = now
                self.state.save_progress({
                    "phase": "downloading", "mode": "direct",
                    "payload": payload.sha256[:12], "kind": payload.kind,
                    "size": payload.size, "chunks_total": payload.chunk_count,
                    "chunks_done_this_run": done[0], "bytes_origin": self.http.bytes_received,
                    "bytes_peers": 0, "peers": 0})
        return on_chunk

    async def seed(self, result: UpdateResult,
                   on_seeding: Callable[[UpdateResult, float], None] | None = None,
                   ) -> None:
        """After a successful swarm update, keep seeding the installed payload for
        ``seed_time_s`` if the upload policy allows it."""
        if self.installed is None or self.swarm is None:
            return
        ref, work = self.installed.ref, self.installed.work
        # the installed torrent's counter includes what it uploaded while downloading
        uploaded_before = result.bytes_uploaded - self.installed.uploaded_bytes
        policy = upload_policy(self.config)
        seconds = self.seed_time_s
        if not result.updated or seconds <= 0 or not policy.allowed:
            if result.updated and seconds > 0:
                log.info("not seeding: %s", policy.reason)
            return
        log.info("seeding %s for %.0f s", ref.name, seconds)
        if on_seeding is not None:
            on_seeding(result, seconds)
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0:
            policy = upload_policy(self.config)
            if not policy.allowed:  # e.g. the battery ran low meanwhile
                log.info("stopped seeding: %s", policy.reason)
                break
            stats = self.swarm.statistics(ref)
            result.bytes_uploaded = uploaded_before + stats.bytes_uploaded_payload
            self.state.save_progress({
                "phase": "seeding", "payload": work.payload.sha256[:12],
                "bytes_uploaded": stats.bytes_uploaded_payload, "peers": stats.num_peers,
                "upload_rate_bytes_per_s": stats.upload_rate_bytes_per_s,
                "seconds_left": round(left, 1)})
            await trio.sleep(min(1.0, left))
        result.bytes_uploaded = (uploaded_before
                                 + self.swarm.statistics(ref).bytes_uploaded_payload)

    async def close(self) -> None:
        """Stop the swarm session (in a thread: libtorrent waits for its last announces)
        and remove a seeded payload's work area; also when the pass is cancelled."""
        self.state.save_progress(None)
        if self.metadata is not None:
            self.metadata.close()
            self.metadata = None
        swarm, self.swarm = self.swarm, None
        with trio.CancelScope(shield=True):
            if swarm is not None:
                await trio.to_thread.run_sync(swarm.close)
            if self.installed is not None:
                work = self.installed.work
                self.installed = None
                await trio.to_thread.run_sync(work.remove)

    async def _install(self, release: ReleaseManifest, delta: Payload | None,
                       backend: SlotBackend, base: str, target: str,
                       result: UpdateResult) -> PayloadWorkdir:
        """Write the release image into slot ``target``: from ``delta`` (whose base is the
        active slot) when there is one, else (or if anything about the delta fails) from
        the full payload. Returns the work area to clean up after the switch."""
        if delta is not None:
            try:
                work = await self._download(delta, result)
                self._step(Event.DOWNLOADED)
                await verify_payload(work)
                self._step(Event.VERIFIED)
                with self._timed("install_delta"):
                    await trio.to_thread.run_sync(
                        install_delta, work.part, delta, backend, base, release.image,
                        target)
                result.payload_kind = "delta"
                self._mark_installed(work)
                # a full payload an earlier pass began (its delta had failed then) is of
                # no use now
                await trio.to_thread.run_sync(
                    PayloadWorkdir(self.state.downloads_dir, release.full_payload).remove)
                return work
            except (DownloadFailed, VerifyFailed, InstallFailed) as exc:
                log.warning("delta %s unusable, falling back to the full payload: %s",
                            delta.sha256[:12], exc)
                result.delta_fallback = str(exc)
                # the delta's work area (if any) is of no use to this pass any more
                await trio.to_thread.run_sync(
                    PayloadWorkdir(self.state.downloads_dir, delta).remove)
                # space may have gone meanwhile: say so now, not with ENOSPC halfway
                await trio.to_thread.run_sync(self._check_space, release,
                                              (release.full_payload,))
                self._step(Event.FALLBACK, payload_sha256=release.full_payload.sha256,
                           payload_kind="full")
        work = await self._download(release.full_payload, result)
        self._step(Event.DOWNLOADED)
        await verify_payload(work)
        self._step(Event.VERIFIED)
        with self._timed("install"):
            await trio.to_thread.run_sync(install_image, work.part, release.image,
                                          backend, target)
        result.payload_kind = "full"
        self._mark_installed(work)
        return work

    def _mark_installed(self, work: PayloadWorkdir) -> None:
        """Remember the swarm torrent of the installed payload (seeded afterwards)."""
        if self.last_swarm is not None and self.last_swarm.work is work:
            self.installed = self.last_swarm

    async def _fetch_release(self, offer: Offer, bc: BootControl, result: UpdateResult
                             ) -> tuple[ReleaseManifest, BootControl]:
        """The offered release manifest, verified and applicable; and boot control, whose
        floor a counter reset in the refreshed root may have lowered."""
        metadata = self.metadata
        assert metadata is not None  # refreshed by update()
        before = metadata.bytes_received
        with self._timed("release_manifest"):
            data = await trio.to_thread.run_sync(
                partial(metadata.release_manifest, offer.target, compact=True))
        result.bytes_metadata += metadata.bytes_received - before
        bc = await trio.to_thread.run_sync(self._apply_counter_reset, bc)
        try:
            release = parse_release_manifest(data)
            if (release.product, release.version) != (offer.product, offer.version):
                raise VerifyFailed(f"target {offer.target} holds release {release.product} "
                                   f"{release.version}")
            floor = await trio.to_thread.run_sync(self._floor_of, bc, release.component)
            check_applicable(release, product=self.config.product,
                             hardware_id=self.config.hardware_id,
                             installed_counter=floor,
                             max_counter_jump=self.config.max_release_counter_jump)
        except ManifestError as exc:
            raise VerifyFailed(f"release {offer.version} refused: {exc}") from exc
        return release, bc

    def _floor_of(self, bc: BootControl, component: str | None) -> int:
        """The anti-rollback floor in force for a release of ``component`` (``None``:
        an image): the state directory's, or with a TPM the higher of it and the
        floor log's (a log that does not verify: FloorLogError, a VerifyFailed)."""
        floors = read_floors(self.state.root, bc, self.components)
        if self.keystore is None:
            return floors.of(component)
        return self.keystore.floors.of(floors, component)

    def _anchor(self) -> TrustAnchor | None:
        return None if self.keystore is None else self.keystore.anchor

    def _apply_counter_reset(self, bc: BootControl) -> BootControl:
        return apply_pending_counter_reset(
            bc, trust_dir=self.state.trust_dir, state_path=self.state.trust_state_path,
            bootctl_path=self.state.bootctl_path, product=self.config.product,
            hardware=None if self.keystore is None else self.keystore.floors)

    def _new_metadata_pass(self) -> MetadataPass:
        """This pass's refresh of the metadata (the previous one closed); ConfigError:
        the CA bundle cannot be loaded."""
        if self.metadata is not None:
            self.metadata.close()
            self.metadata = None
        self.metadata = MetadataPass(
            self.state.trust_dir, self.config.origin_url,
            timeout_s=self.config.http_timeout_s, scratch_dir=self.state.downloads_dir,
            tls=self.http.tls, min_rate_bytes_per_s=self.config.http_min_rate_bytes_per_s,
            pass_timeout_s=self.config.metadata_timeout_s, anchor=self._anchor())
        return self.metadata

    async def _refresh_metadata(self, metadata: MetadataPass,
                                into: list[outcome.Outcome[None]]) -> None:
        """Refresh the trusted metadata (root rotations, timestamp, snapshot, targets)
        beside the check-in; its outcome (an error too) goes to ``into``, for the pass
        to act on as it would on a refresh of its own."""
        with self._timed("metadata"):
            await _outcome_into(into, trio.to_thread.run_sync, metadata.refresh)

    async def _trust_refreshed(self, refreshed: outcome.Outcome[None]) -> bool:
        """With nothing offered: whether the refresh made beside the check-in (a device
        follows root rotations and counter resets even when no release reaches it)
        succeeded. A failure is logged only."""
        try:
            refreshed.unwrap()
        except PeerError as exc:
            log.warning("trust refresh failed: %s", exc)
            return False
        return True

    # --- boot control: the switch, boot attempts, the verdict ---------------------------

    def _switch(self, bc: BootControl, target: str, record: SlotRecord) -> BootControl:
        """Name ``target`` primary with the boot-attempt budget: the agent's record
        first (it holds the new slot's version and hash), then the bootloader's
        environment (from then on the bootloader boots the new slot)."""
        budget = self.config.boot_attempts
        bc = write_bootctl(self.state.bootctl_path, switch_to(bc, target, record, tries=budget),
                           what="switch")
        if self.loader is not None:
            self.loader.write(LoaderState(target, bc.committed, budget), what="switch")
        return bc

    def _commit(self, bc: BootControl) -> BootControl:
        """Mark the booted primary good: the bootloader first, then the record (which
        raises the anti-rollback floor); a crash in between is reconciled at start."""
        if self.loader is not None:
            self.loader.write(LoaderState(bc.primary, bc.primary, 0), what="commit")
        bc = write_bootctl(self.state.bootctl_path, mark_good(bc), what="commit")
        self._raise_hardware_floors(bc)
        return bc

    def _fall_back(self, bc: BootControl) -> BootControl:
        """Abandon the pending slot: the bootloader first, then the record."""
        if self.loader is not None:
            self.loader.write(LoaderState(bc.committed, bc.committed, 0), what="fall_back")
        return write_bootctl(self.state.bootctl_path, fall_back(bc), what="fall_back")

    def _reconcile(self, bc: BootControl) -> BootControl:
        """Bring the record in line with a real bootloader's environment after a crash
        between their writes (the environment is what boots)."""
        assert self.loader is not None
        env = self.loader.read()
        if env.committed != bc.committed:
            if not (bc.pending and env.committed == bc.primary):
                raise ConfigError(f"the {self.loader.name} environment commits slot "
                                  f"{env.committed}, boot control slot {bc.committed}: "
                                  "re-provision the device")
            log.warning("the bootloader committed slot %s; so does boot control now",
                        env.committed)
            return write_bootctl(self.state.bootctl_path, mark_good(bc), what="commit")
        if bc.pending and not env.pending:
            log.warning("the switch to slot %s is not in the bootloader's environment",
                        bc.primary)
            return write_bootctl(self.state.bootctl_path, fall_back(bc), what="fall_back")
        if env.pending and not bc.pending:
            self.loader.write(LoaderState(bc.committed, bc.committed, 0), what="fall_back")
        return bc

    async def _reboot_and_check(self, bc: BootControl) -> BootControl:
        """File boot control: the agent plays the bootloader. Boot the pending slot
        (consuming a try, or falling back when its budget is spent), then the attempt."""
        bc, booted = boot(bc)
        bc = write_bootctl(self.state.bootctl_path, bc, what="boot")
        if not bc.pending:
            raise self._budget_spent(booted)
        return await self._attempt(bc, booted)

    def _budget_spent(self, fell_back_to: str) -> PeerError:
        """The bootloader fell back without a verdict: 41 when every spent boot reached
        the agent (interruptions), else 40 (boots that never came up)."""
        status, message = machine.budget_spent_outcome(self.journal)
        message += f"; slot {fell_back_to} boots again"
        self._step(Event.BUDGET_SPENT, status=status, message=_report_text(message))
        if status == StatusCode.INTERRUPTED:
            return BootInterrupted(message)
        return PostCheckFailed(message)

    async def _attempt(self, bc: BootControl, booted: str) -> BootControl:
        """One boot of the pending slot that reached the agent: journaled first, then
        its health check; the verdict is journaled before boot control acts on it, so
        a power cut anywhere here is an interrupted attempt (retried at the next boot),
        never a verdict."""
        self._step(Event.BOOT_ATTEMPT)
        record = bc.slot(booted)
        try:
            crash_point("health.before")
            with self._timed("health"):
                await run_health_check(
                    self.config.health_command, slot=booted,
                    image=self.slots.image_path(booted), record=record,
                    timeout_s=self.config.health_timeout_s,
                    read_back=partial(self.slots.hash, booted, record.size),
                    verdicts=self.requests.verdicts)
            crash_point("health.after")
        except PostCheckFailed as exc:
            crash_point("health.after")
            self._step(Event.UNHEALTHY, status=int(exc.status),
                       message=_report_text(f"update to {record.version} rolled back: {exc}"))
            self._fall_back(bc)
            self.reboot_needed = self.loader is not None  # running the abandoned slot
            raise
        self._step(Event.HEALTHY)
        return self._commit(bc)

    async def finish_pending(self, bc: BootControl) -> UpdateResult:
        """A switch was written but not committed (a reboot, a crash, power loss):
        this is a boot attempt of the new slot, or the bootloader gave up on it."""
        pending = bc.slot(bc.primary)
        result = UpdateResult(StatusCode.OK, "", attempted=True,
                              from_version=bc.slot(bc.committed).version,
                              to_version=pending.version, timings_s=self.timings)
        if self.journal.phase is not Phase.HEALTH_CHECKING:
            self.journal = Journal(seq=self.journal.seq, attempt=self.journal.attempt)
            self._step(Event.RESUME_PENDING, from_version=result.from_version,
                       to_version=pending.version, release_counter=pending.release_counter,
                       target_slot=bc.primary, boot_budget=self.config.boot_attempts)
        try:
            if self.requests.cancel_switch:
                await self._cancel_switch(bc)
            elif self.loader is None:
                await self._reboot_and_check(bc)
            else:
                booted = await trio.to_thread.run_sync(self.loader.booted_slot)
                env = await trio.to_thread.run_sync(self.loader.read)
                if booted == bc.primary:
                    await self._attempt(bc, booted)
                elif env.pending and not env.fell_back:
                    # still on the committed slot: the reboot into the new one is to come
                    result.reboot_pending = True
                    self.reboot_needed = True
                    result.message = (f"{pending.version} installed in slot {bc.primary}; "
                                      "waiting for the reboot into it")
                    return result
                else:
                    exc = self._budget_spent(booted)
                    self._fall_back(bc)
                    raise exc
            result.updated = True
            result.message = f"updated {result.from_version} -> {pending.version} " \
                             "(finished after restart)"
            # the interrupted pass's payload is of no use any more
            await trio.to_thread.run_sync(self._remove_downloads, set())
        except PeerError as exc:
            if isinstance(exc, ConfigError):
                raise
            result.status, result.message = exc.status, str(exc)
        return result

    async def _cancel_switch(self, bc: BootControl) -> None:
        """A local client rolled back a switch waiting for its reboot: the verdict
        (unhealthy, 40) is journaled, then boot control falls back; if the new slot is
        the one running, the device reboots into the committed one."""
        pending = bc.slot(bc.primary)
        message = (f"update to {pending.version} rolled back on request before it was "
                   f"committed; slot {bc.committed} boots again")
        if self.journal.phase is Phase.HEALTH_CHECKING:
            self._step(Event.UNHEALTHY, status=int(StatusCode.POSTCHECK_FAILED),
                       message=_report_text(message))
        self._fall_back(bc)
        if self.loader is not None:
            booted = await trio.to_thread.run_sync(self.loader.booted_slot)
            self.reboot_needed = booted == bc.primary
        raise PostCheckFailed(message)

    async def finish_verdict(self, bc: BootControl) -> UpdateResult:
        """The health check's verdict was journaled but boot control did not act on it
        yet (power loss right after the check): carry it out, no new attempt."""
        j = self.journal
        result = UpdateResult(StatusCode.OK, "", attempted=True, from_version=j.from_version,
                              to_version=j.to_version, timings_s=self.timings)
        if j.phase is Phase.COMMITTED:
            if self.loader is not None:
                env = await trio.to_thread.run_sync(self.loader.read)
                if env.fell_back:  # the commit came too late: the last try was spent
                    exc = self._budget_spent(bc.committed)
                    self._fall_back(bc)
                    result.status, result.message = exc.status, str(exc)
                    return result
            self._commit(bc)
            result.updated = True
            result.message = f"updated {j.from_version} -> {j.to_version} (its health " \
                             "check passed before a restart)"
            await trio.to_thread.run_sync(self._remove_downloads, set())
            return result
        self._fall_back(bc)
        if self.loader is not None:
            booted = await trio.to_thread.run_sync(self.loader.booted_slot)
            self.reboot_needed = booted == bc.primary
        result.status = StatusCode(j.status if j.status is not None else 40)
        result.message = j.message or f"update to {j.to_version} rolled back"
        return result

    async def report(self, result: UpdateResult) -> None:
        """Deliver earlier undelivered reports and this one; keep what fails for later.

        This attempt's report goes through the journal (``reporting``, with the body)
        into the durable outbox before anything is sent, so a crash loses no report."""
        queue = self.state.outbox()
        if result.attempted and not result.reboot_pending:
            if self.journal.phase is Phase.REPORTING and self.journal.report is not None:
                body = self.journal.report  # recovered
            else:
                body = self._report_body(result)
                event = {Phase.COMMITTED: Event.REPORT, Phase.ROLLED_BACK: Event.REPORT}.get(
                    self.journal.phase, Event.FAILED)
                # a full disk must not cost the report: it is sent from memory then
                _best_effort("journaling the report", lambda: self._step(
                    event, status=int(result.status), message=_report_text(result.message),
                    report=body))
            crash_point("report.before_queue")
            if body not in queue:
                queue.append(body)
                _best_effort("queueing the report", lambda: self.state.save_outbox(queue))
            _best_effort("journaling the queued report", lambda: self._step(Event.QUEUED))
        crash_point("report.before_send")
        delivered = 0
        for body in queue:
            try:
                await send_report(self.http, self.config, body)
            except DownloadFailed as exc:
                if exc.http_status is not None and 400 <= exc.http_status < 500:
                    log.error("tracker rejected a report, dropping it: %s", exc)
                    delivered += 1
                    continue
                log.warning("report not delivered, kept for the next run: %s", exc)
                break
            delivered += 1
        if delivered:
            # sent, not yet cleared from the outbox: a crash here sends them again, with
            # the same report_id (the tracker stores each once)
            crash_point("report.after_send")
        if delivered or queue:
            _best_effort("clearing the outbox",
                         lambda: self.state.save_outbox(queue[delivered:]))
        result.reported = (result.attempted and not result.reboot_pending
                           and delivered == len(queue))

    @staticmethod
    def _report_body(result: UpdateResult) -> dict[str, Any]:
        """The report of this attempt, with a ``report_id`` of its own: made once, kept
        in the journal and the outbox, so that a report sent again after a crash is the
        same report (tracker.wire.REPORT_ID_RE: 22 characters of A-Z a-z 0-9 _ -)."""
        if result.from_version is None or result.to_version is None:
            raise RuntimeError("an attempted update always knows both versions")
        body = {"report_id": secrets.token_urlsafe(16),
                "from_version": result.from_version, "to_version": result.to_version,
                "status": int(result.status), "message": _report_text(result.message),
                "bytes_origin": result.bytes_origin, "bytes_peers": result.bytes_peers,
                "timings_s": dict(result.timings_s)}
        if result.log_tail:
            body["log_tail"] = result.log_tail
        return body
