"""The local control surface of a running agent: what it is doing, and what a local
client (a device UI, an MDM agent: ``peer.dbus_service``) asks of it.

    D-Bus client ──► dbus_service ──► AgentControl ──► daemon loop ──► update_once
                        ▲                 │ PassRequest (install now, cancel a switch)
                        │                 │ ExternalVerdicts (mark good / roll back a
                        │                 ▼                   health check in progress)
                        └──── StatusBoard ◄── ObservedState (journal, progress, result)

:class:`StatusBoard` holds the published view (state, progress, last result, offered
release, postponement) and wakes its watchers on every change; :class:`ObservedState`
is a :class:`~peer.state.DeviceState` whose journal, progress and result writes are also
posted there, so the agent needs no knowledge of the API. :class:`AgentControl` turns
requests into either a pass for the daemon to run (``CheckNow``, ``InstallNow``, a
``RollBack`` of a switch waiting for its reboot) or a verdict for the health check in
progress (``MarkGood``, ``RollBack``), and refuses with :class:`NotApplicable` what does
not apply. Everything runs in the agent's trio loop (one owner); the board accepts
posts from worker threads too.

The postponement (``Postpone``) is stored in ``STATE/postpone.json`` so that it
survives a restart; the install policy reads it (:func:`postponed_until`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from swarmota.infra.fsio import atomic_write_json
from swarmota.peer.health import ExternalVerdict, ExternalVerdicts
from swarmota.peer.machine import Journal, Phase
from swarmota.peer.state import DeviceState

__all__ = ["MAX_POSTPONE_S", "AgentControl", "NotApplicable", "ObservedState",
           "PassRequest", "StatusBoard", "postponed_until", "save_postponement"]

MAX_POSTPONE_S = 30 * 86400  # a UI may postpone installs for at most 30 days at a time
POSTPONE_FILE = "postpone.json"


class NotApplicable(Exception):
    """A request that does not apply in the agent's present state (the message says
    why); the local API answers it with an error, nothing changes."""


class NothingOffered(NotApplicable):
    """``InstallNow`` without a deferred release to install."""


def postponed_until(root: Path) -> float:
    """Until when (seconds since the epoch) installs are postponed; 0: not."""
    try:
        raw = json.loads((root / POSTPONE_FILE).read_bytes())
        until = float(raw["until_s"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0.0
    return until if math.isfinite(until) else 0.0


def save_postponement(root: Path, until_s: float) -> None:
    """Store the postponement (0 removes it)."""
    path = root / POSTPONE_FILE
    if until_s <= 0:
        path.unlink(missing_ok=True)
        return
    atomic_write_json(path, {"until_s": until_s})


@dataclass(frozen=True)
class PassRequest:
    """What a local client asked of the next update pass.

    ``install_now``: the version to install now, bypassing the install policy's windows
    and delay, a postponement and the retry budget (never battery, network or storage
    rules); ``cancel_switch``: roll back a switch that waits for its reboot;
    ``verdicts``: where ``MarkGood`` / ``RollBack`` reach a health check in progress.
    """

    install_now: str | None = None
    cancel_switch: bool = False
    verdicts: ExternalVerdicts | None = None


class StatusBoard:
    """The agent's published view; ``version`` grows with every change."""

    def __init__(self, *, last_result: dict[str, Any] | None, current_version: str,
                 postponed_until_s: float) -> None:
        self.running = False
        self.journal_phase = Phase.IDLE
        self.reported = False  # this pass's journal went back to idle after an attempt
        self.progress: dict[str, Any] = {}
        self.last_result: dict[str, Any] = last_result or {}
        self.current_version = current_version
        self.postponed_until_s = postponed_until_s
        self.results = 0  # passes that saved a result (the first save of each pass)
        self.result_posted = False
        self.version = 0
        self._changed = trio.Event()
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def state(self) -> str:
        """``idle``, ``checking``, a journal phase (``downloading`` .. ``reporting``),
        ``seeding``, or ``reboot_pending`` (installed, waiting for the reboot)."""
        if self.running:
            if self.progress.get("phase") == "seeding":
                return "seeding"
            if self.journal_phase is not Phase.IDLE:
                return self.journal_phase.value
            return "reporting" if self.reported else "checking"
        if self.last_result.get("reboot_pending"):
            return "reboot_pending"
        return "idle"

    @property
    def offered(self) -> tuple[str, str]:
        """The release offered but deferred by the last pass, and why (else empty)."""
        result = self.last_result
        if result.get("deferred") and not result.get("attempted") and result.get("to_version"):
            return str(result["to_version"]), str(result["deferred"])
        return "", ""

    def bind(self) -> None:
        """Remember the trio loop (call from it) so worker threads can post too."""
        self._token = trio.lowlevel.current_trio_token()

    def post(self, change: Callable[[StatusBoard], None]) -> None:
        """Apply ``change`` and wake the watchers; from the loop or a worker thread."""
        with self._lock:
            change(self)
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # a worker thread: wake the watchers from the loop
            if self._token is not None:
                self._token.run_sync_soon(self._wake)
            return
        self._wake()

    def _wake(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, seen: int) -> int:
        """Wait until ``version`` is past ``seen``; return it."""
        while self.version <= seen:
            await self._changed.wait()
        return self.version


@dataclass(frozen=True)
class ObservedState(DeviceState):
    """A device state directory whose journal, progress and result writes are also
    posted to ``board`` (the files stay what they are: the truth after a restart)."""

    board: StatusBoard = field(compare=False, repr=False, kw_only=True)

    def save_journal(self, journal: Journal) -> None:
        super().save_journal(journal)
        self.board.post(lambda b: _journal_posted(b, journal))

    def save_progress(self, progress: dict[str, Any] | None) -> None:
        super().save_progress(progress)
        self.board.post(lambda b: setattr(b, "progress", dict(progress or {})))

    def save_result(self, result: dict[str, Any]) -> None:
        super().save_result(result)
        self.board.post(lambda b: _result_posted(b, result))


def _result_posted(board: StatusBoard, result: dict[str, Any]) -> None:
    board.last_result = dict(result)
    if board.running and not board.result_posted:
        board.result_posted = True
        board.results += 1


def _journal_posted(board: StatusBoard, journal: Journal) -> None:
    if journal.phase is Phase.IDLE and board.journal_phase is not Phase.IDLE:
        board.reported = True
    board.journal_phase = journal.phase


class AgentControl:
    """Requests from local clients to the daemon (see the module docstring).

    ``who`` arguments name the caller for logs and reports (e.g. ``"uid 0 over D-Bus"``).
    """

    def __init__(self, state: DeviceState, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.wall_clock = wall_clock
        self.verdicts = ExternalVerdicts()
        bc = state.bootctl()
        self.board = StatusBoard(last_result=state.last_result(),
                                 current_version=bc.slot(bc.committed).version or "",
                                 postponed_until_s=postponed_until(state.root))
        self._next: PassRequest | None = None
        self._requested = trio.Event()

    def observed(self) -> ObservedState:
        """The device state for the next pass, posting to the board."""
        return ObservedState(self.state.root, board=self.board)

    # --- the daemon's side ----------------------------------------------------------

    def pass_started(self) -> PassRequest:
        """A pass starts: take what was asked of it."""
        request = self._next or PassRequest()
        self._next = None
        self._requested = trio.Event()

        def start(b: StatusBoard) -> None:
            b.running, b.reported, b.journal_phase, b.progress = True, False, Phase.IDLE, {}
            b.result_posted = False
        self.board.post(start)
        return replace(request, verdicts=self.verdicts)

    def pass_finished(self) -> None:
        bc = self.state.bootctl()

        def finish(b: StatusBoard) -> None:
            b.running, b.progress = False, {}
            b.current_version = bc.slot(bc.committed).version or ""
        self.board.post(finish)

    async def wait_for_request(self, timeout_s: float) -> None:
        """Sleep ``timeout_s``, or less if a client asks for a pass meanwhile."""
        with trio.move_on_after(timeout_s):
            await self._requested.wait()

    # --- the clients' side ----------------------------------------------------------

    def _queue(self, request: PassRequest) -> None:
        if self._next is not None:  # merge: nothing asked is lost
            request = PassRequest(install_now=request.install_now or self._next.install_now,
                                  cancel_switch=request.cancel_switch or
                                  self._next.cancel_switch)
        self._next = request
        self._requested.set()

    def check_now(self) -> None:
        """Run a pass now (or right after the one in progress)."""
        self._queue(PassRequest())

    def install_now(self, version: str) -> str:
        """Install the release the last pass deferred (``version``: that one, or empty
        for whichever it was) in a pass now. Returns its version.

        Raises:
            NothingOffered: no release is deferred, or another one than ``version``.
        """
        offered, _ = self.board.offered
        if not offered:
            raise NothingOffered("no release is offered and deferred: nothing to install "
                                 "now (CheckNow asks the tracker)")
        if version and version != offered:
            raise NothingOffered(f"the release offered is {offered}, not {version}")
        self._queue(PassRequest(install_now=offered))
        return offered

    async def postpone(self, seconds: int) -> float:
        """Defer installs (of releases not marked critical) for ``seconds`` from now;
        0 lifts a postponement. Returns until when (0: not postponed).

        Raises:
            ValueError: more than ``MAX_POSTPONE_S``.
        """
        if not 0 <= seconds <= MAX_POSTPONE_S:
            raise ValueError(f"postpone by 0 to {MAX_POSTPONE_S} s, not {seconds}")
        until = self.wall_clock() + seconds if seconds else 0.0
        await trio.to_thread.run_sync(save_postponement, self.state.root, until)
        self.board.post(lambda b: setattr(b, "postponed_until_s", until))
        return until

    async def mark_good(self, who: str) -> str:
        """Decide the health check in progress: healthy (the new slot or component is
        committed). Returns what it applied to.

        Raises:
            NotApplicable: no health check is running (why, in the message).
        """
        what = self.verdicts.waiting_for
        if what is not None and self.verdicts.deliver(
                ExternalVerdict(True, f"marked good by {who}")):
            return what
        pending = await self._pending_switch()
        if pending:
            raise NotApplicable(f"{pending} has not booted yet: it can be marked good only "
                                "once it runs, during its health check")
        raise NotApplicable("nothing to mark good: no health check is running and no "
                            "update is pending")

    async def roll_back(self, who: str) -> str:
        """Decide the health check in progress: unhealthy (back to the committed slot or
        the component's previous version, reported as rolled back, 40); or, with a
        switch waiting for its reboot, cancel it in a pass now. Returns what it
        applied to.

        Raises:
            NotApplicable: nothing is pending (an installed release is not undone: that
                would be a downgrade, refused without a signed release).
        """
        what = self.verdicts.waiting_for
        if what is not None and self.verdicts.deliver(
                ExternalVerdict(False, f"rolled back by {who}")):
            return what
        pending = await self._pending_switch()
        if pending and not self.board.running:
            self._queue(PassRequest(cancel_switch=True))
            return pending
        if pending:
            raise NotApplicable(f"{pending} is being handled by the pass in progress; "
                                "retry once State is idle or health_checking")
        raise NotApplicable("nothing to roll back: no update is pending (going back to an "
                            "older release needs a newer signed release: anti-rollback)")

    async def _pending_switch(self) -> str:
        """``"slot <s> (<version>)"`` if boot control has a switch pending, else ``""``."""
        bc = await trio.to_thread.run_sync(self.state.bootctl)
        if not bc.pending:
            return ""
        return f"slot {bc.primary} ({bc.slot(bc.primary).version})"
