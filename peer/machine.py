"""The update state machine: pure logic, no I/O (events in, next state and actions out).

    idle ──check──► checking ──no_offer──► idle
                       │ offer (release verified)
                       ▼
                  downloading ──downloaded──► verifying ──verified──► applying
                       ▲                                                 │ applied
                       └────── fallback (delta unusable: full payload) ──┤
                                                                         ▼
                  health_checking ◄──switched── switching (slot read back, boot control)
                       │ healthy        │ unhealthy
                       ▼                ▼
                   committed       rolled_back ──report──► reporting ──queued──► idle
                       └──────────report──────────────────────▲
    checking .. rolled_back ──failed(status)───────────────────┘

The agent (``peer/agent.py``) persists the :class:`Journal` (``STATE/journal.json``,
atomically) on every transition from ``downloading`` on, *before* the side effects of
the new state; ``idle`` -> ``checking`` -> ``idle`` is not persisted (it has no durable
side effects, and a poll every hour would otherwise wear the flash for nothing).

On start, :func:`recover` turns the journal and the boot-control facts into what to do:

- a switch pending in boot control: finish it (the bootloader consumes a try; the health
  check or a used-up try counter decides), whatever the journal says;
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
    attempts of this device; ``report`` is the body queued in ``reporting``."""

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

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase.value, "seq": self.seq, "attempt": self.attempt,
                "from_version": self.from_version, "to_version": self.to_version,
                "release_counter": self.release_counter, "target_slot": self.target_slot,
                "payload_sha256": self.payload_sha256, "payload_kind": self.payload_kind,
                "status": self.status, "message": self.message, "report": self.report}


def advance(journal: Journal, event: Event, **fields: Any) -> Journal:
    """The journal after ``event`` in ``journal.phase``, with ``fields`` updated.

    ``offer`` starts a new attempt (clears the previous one's fields); ``seq`` grows by
    one. Raises ``RuntimeError`` for a transition the machine does not have.
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
    return replace(base, phase=phase, seq=journal.seq + 1, **fields)


class Action(StrEnum):
    RECLAIM_SLOT_WRITES = "reclaim_slot_writes"  # remove partial slot images
    FINISH_PENDING = "finish_pending"  # boot the pending slot, health-check it
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
        status, outcome = (0, "committed") if ok else (40, "rolled back")
        message = (f"updated {journal.from_version} -> {journal.to_version} (finished before "
                   "a restart)" if ok else f"update to {journal.to_version} rolled back "
                   "(finished before a restart)")
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
                       message=opt("message", str), report=report)
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalError(f"invalid journal: {exc}") from None
