"""The update state machine: pure logic, no I/O (events in, next state and actions out).

    idle ──check──► checking ──no_offer──► idle
                       │ offer (release verified)
                       ▼
                  downloading ──downloaded──► verifying ──verified──► applying
                       ▲                                                 │ applied
                       └────── fallback (delta unusable: full payload) ──┤
                                                                         ▼
                  health_checking ◄──switched── switching (slot read back, boot control)
                    │  ▲ boot_attempt (one more boot of the new slot reached the agent)
                    │  │
                    ├──┘
                    │ healthy        │ unhealthy, budget_spent
                    ▼                ▼
                committed ──budget_spent──► rolled_back ──report──► reporting ──queued──► idle
                    └──────────report──────────────────────────────────▲
    checking .. rolled_back ──failed(status)────────────────────────────┘

Boot attempts follow bootloader practice (RAUC, U-Boot's bootcount): the switch gives
the new slot a budget of boots (``boot_budget``, 3 by default); every boot of it that
reaches the agent is journaled (``boot_attempt``) before its health check runs; the
check's verdict is journaled (``committed`` / ``rolled_back``) before boot control acts
on it. So a power cut in the health check (or after it passed, before the commit) is
an interrupted attempt, retried at the next boot, never a verdict on the release. When
the budget is spent without a verdict, the bootloader falls back (``budget_spent``);
:func:`budget_spent_outcome` says whether that is status 41 (every spent boot reached
the agent: interrupted, not the release's fault) or 40 (some boots never came up: a
kernel panic, a hang, a reboot loop). Component switches (``peer.hooks``) follow the same
journal: each attempt (hooks, service restarts, health check) is journaled before it
runs, so an interrupted one is repeated at the next start, and a budget spent that way
is 41.

The agent (``peer/agent.py``) persists the :class:`Journal` (``STATE/journal.json``,
atomically) on every transition from ``downloading`` on, *before* the side effects of
the new state; ``idle`` -> ``checking`` -> ``idle`` is not persisted (it has no durable
side effects, and a poll every hour would otherwise wear the flash for nothing).

On start, :func:`recover` turns the journal and the boot-control facts into what to do:

- a switch pending in boot control: with the verdict journaled (``committed`` or
  ``rolled_back``), carry it out; else finish the boot attempt (the bootloader consumes
  a try; the health check or a spent budget decides);
- interrupted before the switch (checking .. switching): reclaim partial slot writes and
  run the pass again; verified chunks are kept (the download resumes), the slot is
  written again from the verified payload;
- interrupted after the health check's outcome reached boot control but before it was
  reported: report it (committed if the committed slot holds the journal's version);
- interrupted in ``reporting``: make sure the report is queued, then idle.

Errors: :class:`JournalError` for a journal that does not parse; an impossible transition
is a programming bug (``RuntimeError``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

__all__ = [
    "Action",
    "Event",
    "Journal",
    "JournalError",
    "Phase",
    "Recovery",
    "advance",
    "budget_spent_outcome",
    "decode_journal",
    "encode_journal",
    "recover",
]


class Phase(StrEnum):
    IDLE = "idle"
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    APPLYING = "applying"
    SWITCHING = "switching"
    HEALTH_CHECKING = "health_checking"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    REPORTING = "reporting"


class Event(StrEnum):
    CHECK = "check"
    NO_OFFER = "no_offer"
    OFFER = "offer"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    APPLIED = "applied"
    FALLBACK = "fallback"
    SWITCHED = "switched"
    RESUME_PENDING = "resume_pending"
    BOOT_ATTEMPT = "boot_attempt"
    BUDGET_SPENT = "budget_spent"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    FAILED = "failed"
    REPORT = "report"
    QUEUED = "queued"


_BEFORE_SWITCH = (Phase.CHECKING, Phase.DOWNLOADING, Phase.VERIFYING, Phase.APPLYING,
                  Phase.SWITCHING)
_TABLE: dict[tuple[Phase, Event], Phase] = {
    (Phase.IDLE, Event.CHECK): Phase.CHECKING,
    (Phase.IDLE, Event.RESUME_PENDING): Phase.HEALTH_CHECKING,
    (Phase.CHECKING, Event.NO_OFFER): Phase.IDLE,
    (Phase.CHECKING, Event.OFFER): Phase.DOWNLOADING,
    (Phase.DOWNLOADING, Event.DOWNLOADED): Phase.VERIFYING,
    (Phase.VERIFYING, Event.VERIFIED): Phase.APPLYING,
    (Phase.APPLYING, Event.APPLIED): Phase.SWITCHING,
    (Phase.SWITCHING, Event.SWITCHED): Phase.HEALTH_CHECKING,
    (Phase.HEALTH_CHECKING, Event.HEALTHY): Phase.COMMITTED,
    (Phase.HEALTH_CHECKING, Event.UNHEALTHY): Phase.ROLLED_BACK,
    (Phase.HEALTH_CHECKING, Event.BOOT_ATTEMPT): Phase.HEALTH_CHECKING,
    (Phase.HEALTH_CHECKING, Event.BUDGET_SPENT): Phase.ROLLED_BACK,
    (Phase.COMMITTED, Event.BUDGET_SPENT): Phase.ROLLED_BACK,
    (Phase.COMMITTED, Event.REPORT): Phase.REPORTING,
    (Phase.ROLLED_BACK, Event.REPORT): Phase.REPORTING,
    (Phase.REPORTING, Event.QUEUED): Phase.IDLE,
}
for _phase in (Phase.DOWNLOADING, Phase.VERIFYING, Phase.APPLYING):
    _TABLE[(_phase, Event.FALLBACK)] = Phase.DOWNLOADING
# failed: an error in any step (in health_checking .. rolled_back: a boot-control write)
for _phase in (*_BEFORE_SWITCH, Phase.HEALTH_CHECKING, Phase.COMMITTED, Phase.ROLLED_BACK):
    _TABLE[(_phase, Event.FAILED)] = Phase.REPORTING


class JournalError(ValueError):
    """The journal file does not parse (it is written atomically: this means damage)."""


@dataclass(frozen=True)
class Journal:
    """Where the update is. ``seq`` counts persisted transitions; ``attempt`` the update
    attempts of this device; ``report`` is the body queued in ``reporting``;
    ``boot_budget`` the boots the switch gave the new slot and ``boot_attempts`` those
    that reached the agent (each journaled before its health check)."""

    phase: Phase = Phase.IDLE
    seq: int = 0
    attempt: int = 0
    from_version: str | None = None
    to_version: str | None = None
    release_counter: int | None = None
    target_slot: str | None = None
    payload_sha256: str | None = None
    payload_kind: str | None = None
    status: int | None = None
    message: str | None = None
    report: dict[str, Any] | None = None
    boot_budget: int = 0
    boot_attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase.value, "seq": self.seq, "attempt": self.attempt,
                "from_version": self.from_version, "to_version": self.to_version,
                "release_counter": self.release_counter, "target_slot": self.target_slot,
                "payload_sha256": self.payload_sha256, "payload_kind": self.payload_kind,
                "status": self.status, "message": self.message, "report": self.report,
                "boot_budget": self.boot_budget, "boot_attempts": self.boot_attempts}


def advance(journal: Journal, event: Event, **fields: Any) -> Journal:
    """The journal after ``event`` in ``journal.phase``, with ``fields`` updated.

    ``offer`` starts a new attempt (clears the previous one's fields); ``seq`` grows by
    one; ``boot_attempt`` counts one more boot attempt. Raises ``RuntimeError`` for a
    transition the machine does not have.
    """
    try:
        phase = _TABLE[(journal.phase, event)]
    except KeyError:
        raise RuntimeError(f"no transition from {journal.phase.value} on {event.value}") \
            from None
    base = journal
    if event in (Event.OFFER, Event.RESUME_PENDING):
        base = Journal(seq=journal.seq, attempt=journal.attempt + 1)
    elif phase is Phase.IDLE:
        base = Journal(seq=journal.seq, attempt=journal.attempt)
    elif event is Event.BOOT_ATTEMPT:
        base = replace(journal, boot_attempts=journal.boot_attempts + 1)
    return replace(base, phase=phase, seq=journal.seq + 1, **fields)


def budget_spent_outcome(journal: Journal, slot: str | None = None) -> tuple[int, str]:
    """``(status, message)`` of a pending slot whose boot budget is spent without a
    verdict: 41 when every spent boot reached the agent (each was interrupted: power
    loss or a restart during the health check, or after it passed), else 40 (boots
    that never came up: the release's fault, as far as anyone can tell)."""
    budget, seen = journal.boot_budget, journal.boot_attempts
    target = slot or journal.target_slot or ""
    if target.startswith("component:"):  # every attempt at a component reaches the agent
        return 41, (f"update to {journal.to_version} rolled back: all {budget} attempts "
                    f"to switch component {target.removeprefix('component:')} were "
                    "interrupted before a verdict (power loss or a restart during its "
                    "hooks, service restarts or health check); not a failure of the release")
    where = f"slot {target}"
    if budget > 0 and seen >= budget:
        return 41, (f"update to {journal.to_version} rolled back: all {budget} boot "
                    f"attempts of {where} were interrupted before a verdict (power loss "
                    "or a restart during the health check); not a failure of the release")
    return 40, (f"update to {journal.to_version} rolled back: {where} did not come up in "
                f"{budget} boot attempts ({seen} reached the health check)")


class Action(StrEnum):
    RECLAIM_SLOT_WRITES = "reclaim_slot_writes"  # remove partial slot images
    FINISH_PENDING = "finish_pending"  # boot the pending slot, health-check it
    FINISH_VERDICT = "finish_verdict"  # the journaled verdict: commit or fall back
    RUN_PASS = "run_pass"  # check in and update as usual
    QUEUE_REPORT = "queue_report"  # queue ``Recovery.journal.report`` for the tracker


@dataclass(frozen=True)
class Recovery:
    """What to do on start: ``actions`` in order, from ``journal`` (already advanced
    where the recovery itself is a transition; persist it first)."""

    actions: tuple[Action, ...]
    journal: Journal
    note: str


def recover(journal: Journal, *, pending: bool, committed_version: str | None) -> Recovery:
    """Decide how to continue after a start (see the module docstring)."""
    phase = journal.phase
    if pending and phase in (Phase.COMMITTED, Phase.ROLLED_BACK):
        return Recovery((Action.RECLAIM_SLOT_WRITES, Action.FINISH_VERDICT), journal,
                        f"a switch is pending and its verdict ({phase.value}) journaled; "
                        "carrying it out")
    if pending:
        return Recovery((Action.RECLAIM_SLOT_WRITES, Action.FINISH_PENDING), journal,
                        f"a switch is pending (journal: {phase.value}); finishing it")
    if phase in (Phase.IDLE,):
        return Recovery((Action.RUN_PASS,), journal, "idle")
    if phase in _BEFORE_SWITCH:
        idle = Journal(seq=journal.seq + 1, attempt=journal.attempt)
        return Recovery((Action.RECLAIM_SLOT_WRITES, Action.RUN_PASS), idle,
                        f"interrupted while {phase.value}; starting over (verified "
                        "chunks are kept)")
    if phase in (Phase.HEALTH_CHECKING, Phase.COMMITTED, Phase.ROLLED_BACK):
        ok = committed_version is not None and committed_version == journal.to_version
        outcome = "committed" if ok else "rolled back"
        if ok:
            status, message = 0, (f"updated {journal.from_version} -> {journal.to_version} "
                                  "(finished before a restart)")
        elif phase is Phase.ROLLED_BACK and journal.status is not None:
            status, message = journal.status, journal.message or "rolled back"
        elif phase is Phase.ROLLED_BACK:  # the verdict: unhealthy
            status, message = 40, (f"update to {journal.to_version} rolled back: "
                                   f"{journal.message or 'health check failed'}")
        else:  # no verdict reached boot control: the budget was spent
            status, message = budget_spent_outcome(journal)
        report: dict[str, Any] = {
            "from_version": journal.from_version, "to_version": journal.to_version,
            "status": status, "message": message, "bytes_origin": 0, "bytes_peers": 0,
            "timings_s": {}}
        done = replace(journal, phase=Phase.REPORTING, seq=journal.seq + 1, status=status,
                       message=message, report=report)
        return Recovery((Action.RECLAIM_SLOT_WRITES, Action.QUEUE_REPORT), done,
                        f"the update was {outcome} but not reported")
    # REPORTING
    return Recovery((Action.QUEUE_REPORT,), journal, "the report was not queued yet")


def encode_journal(journal: Journal) -> bytes:
    return (json.dumps(journal.to_json(), indent=1, sort_keys=True) + "\n").encode()


def decode_journal(data: bytes) -> Journal:
    """Parse a journal file; raises :class:`JournalError`."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        report = raw.get("report")
        if report is not None and not isinstance(report, dict):
            raise TypeError("report is not an object")

        def opt(key: str, kind: type) -> Any:
            value = raw.get(key)
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{key} is not a {kind.__name__}")
            return value

        return Journal(phase=Phase(raw["phase"]), seq=int(raw["seq"]),
                       attempt=int(raw.get("attempt", 0)),
                       from_version=opt("from_version", str), to_version=opt("to_version", str),
                       release_counter=opt("release_counter", int),
                       target_slot=opt("target_slot", str),
                       payload_sha256=opt("payload_sha256", str),
                       payload_kind=opt("payload_kind", str), status=opt("status", int),
                       message=opt("message", str), report=report,
                       boot_budget=int(raw.get("boot_budget", 0)),
                       boot_attempts=int(raw.get("boot_attempts", 0)))
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalError(f"invalid journal: {exc}") from None
