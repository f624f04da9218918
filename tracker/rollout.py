"""Rollouts as a pure state machine: events and a clock in, decisions out.

A rollout releases one registered release to its product's fleet in stages:

- stage 0, ``canary``: the devices named in :attr:`RolloutPlan.canary_devices` and
  those declaring the label :attr:`RolloutPlan.canary_label` at check-in (if the plan
  has neither, the rollout starts at stage 1);
- stages 1..n: percentages of the fleet (default 1, 10, 50, 100). A device's cohort is
  :func:`cohort_percent`, a deterministic hash of the rollout id and the device id, in
  ``[0, 100)``; the device belongs to the first stage whose percentage exceeds its
  cohort. Stages only ever add devices: once admitted, a device stays admitted.

Phases (:data:`PHASES`)::

    scheduled --start time--> active                 (plan.start_at; pause/abort too)
    active --pause--> paused --resume--> active
    active --last stage soaked, enough successes--> completed
    active/paused/completed --auto-halt--> halted --resume--> active (operator override)
    active/paused/halted --force--> forced      (emergency: every device, now)
    active --advance--> next stage (operator override of soak and successes)
    any but revoked --abort--> aborted
    any --revoke--> revoked                      (terminal; the release is withdrawn)

A release whose rollout was halted or aborted may get a new rollout: a new generation
(:attr:`RolloutState.generation`), counted afresh; the earlier ones are history.

Rules, all decided here and nowhere else:

- **Admission** (:func:`admit`): only ``active``, ``completed`` and ``forced`` rollouts
  admit devices nobody admitted before. ``paused`` and ``halted`` ones keep offering
  the release to devices already admitted and still in flight (offered or
  downloading), so that a device that rebooted mid-download can finish, and to nobody
  else. ``scheduled``, ``aborted`` and ``revoked`` ones offer it to nobody. A stage may
  cap the devices in flight (:attr:`RolloutPlan.max_in_flight`); a device over the cap
  is asked to come back later.
- **Reports** (:func:`on_report`): status 0 counts as a success; 10, 20 and 30
  (install errors) as failures; 40 (post-reboot health check failed, the device rolled
  back) as a rollback, which counts as a failure for halting; 41 (the device rolled
  back because every boot attempt was interrupted, e.g. power loss: no verdict on the
  release) puts the device back in flight, counting neither way. A device counts once,
  by its latest report; a report repeating the device's current status (a replay)
  changes nothing. The latest failures (device, stage, status, message) are kept in
  :attr:`RolloutState.failures`, so that a halt names them.
- **Auto-halt**, per stage, after every report of an ``active``, ``paused`` or
  ``completed`` rollout: the canary stage halts at
  :attr:`RolloutPlan.canary_halt_failure_count` failures (default 1: any failing
  canary stops the release); a percentage stage halts when at least
  :attr:`RolloutPlan.halt_min_sample` of its devices reported and its failure rate
  exceeds :attr:`RolloutPlan.halt_failure_rate`; and the whole rollout halts when its
  failures reach :attr:`RolloutPlan.halt_failure_count`. ``forced`` rollouts never halt
  by themselves.
- **Advance** (:func:`tick`): an ``active`` rollout moves to the next stage when the
  current one has soaked for :attr:`RolloutPlan.soak_s`, has at least
  ``min(min_successes, devices admitted in it)`` successes and a success rate of at
  least :attr:`RolloutPlan.min_success_rate` among its reports, and (if the plan has
  :attr:`RolloutPlan.advance_windows`) the time is inside one of them. The canary
  stage needs ``min(min_successes, number of canaries)`` successes, whoever has checked
  in; a percentage stage nobody was admitted to advances after its soak time alone.
  The last stage, done the same way (and with at least one success), completes the
  rollout.

Downgrades are not decided here: the caller only asks about releases whose counter is
higher than the device's (see :func:`tracker.protocol.decide_offer`).

Every function returns new frozen values; invalid operator actions raise
:class:`~tracker.errors.ConflictError`, invalid plans :class:`~tracker.errors.RequestError`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

from swarmota.infra.timewindows import Window, parse_window
from swarmota.tracker.errors import ConflictError, RequestError
from swarmota.tracker.wire import STATUS_NAMES, StatusCode

__all__ = [
    "ACTIONS",
    "DEVICE_STATUSES",
    "LABEL_RE",
    "PHASES",
    "Admission",
    "Decision",
    "FailureNote",
    "RolloutPlan",
    "RESTARTABLE",
    "RolloutState",
    "StageCounters",
    "admit",
    "open_to_all",
    "allowed_actions",
    "apply_action",
    "cohort_percent",
    "mark_downloading",
    "new_rollout",
    "on_report",
    "stage_of",
    "tick",
]

PHASES: Final = ("scheduled", "active", "paused", "halted", "forced", "completed",
                  "aborted", "revoked")
ACTIONS: Final = ("pause", "resume", "advance", "abort", "force", "revoke")
DEVICE_STATUSES: Final = ("offered", "downloading", "succeeded", "failed", "rolled_back")
IN_FLIGHT: Final = ("offered", "downloading")
_OFFERING_TO_NEW: Final = ("active", "completed", "forced")
_CLOSED: Final = ("scheduled", "aborted", "revoked")
_AUTO_HALT: Final = ("active", "paused", "completed")
RESTARTABLE: Final = ("halted", "aborted")
"""Phases after which the release may get a new rollout (a new generation)."""
MAX_CANARY_DEVICES: Final = 10_000
MAX_FAILURE_NOTES: Final = 20
"""Failures a rollout remembers (the latest), for its halt reason and the admin API."""
MAX_NOTE_MESSAGE_CHARS: Final = 300
LABEL_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True)
class RolloutPlan:
    """How a rollout proceeds. Validated on construction.

    Attributes:
        canary_devices: device ids of stage 0.
        canary_label: devices declaring this label at check-in are in stage 0 too
            (``None``: none; with neither, there is no canary stage).
        stages_percent: increasing percentages in (0, 100], the last one 100.
        min_successes: successes a stage needs before it advances (capped by the
            number of canaries, or of devices admitted in a percentage stage).
        min_success_rate: success rate (0..1) a stage needs among its reports.
        soak_s: seconds a stage runs at least before it advances.
        halt_min_sample: reports needed before the failure rate can halt the rollout.
        halt_failure_rate: failure rate (0..1) above which the rollout halts.
        halt_failure_count: failures (over every stage) at which the rollout halts
            whatever the rate.
        canary_halt_failure_count: failures in the canary stage at which the rollout
            halts (default 1: any failing canary).
        max_in_flight: devices at most offered or downloading at once (0: no cap).
        in_flight_timeout_s: a device offered the release (or downloading) that has not
            reported for this long no longer counts against ``max_in_flight``.
        retry_rolled_back: offer the release again to a device that rolled it back
            (health check failed, status 40). Off by default: such a device proved the
            release does not work there, and re-offering would reinstall it in a loop;
            labs that test the device's own retry turn it on.
        start_at: when the rollout starts (epoch s); before it, the rollout is
            ``scheduled`` and offers nothing. ``None``: at once.
        advance_windows: stages advance (and the rollout completes) only inside these
            time windows, UTC (:mod:`infra.timewindows`, e.g. ``"mon,tue,wed,thu 09:00-16:00"``:
            not at night, not before a weekend). Empty: any time.

    Raises:
        RequestError: a value out of range.
    """

    canary_devices: tuple[str, ...] = ()
    canary_label: str | None = None
    stages_percent: tuple[float, ...] = (1.0, 10.0, 50.0, 100.0)
    min_successes: int = 10
    min_success_rate: float = 0.95
    soak_s: float = 3600.0
    halt_min_sample: int = 10
    halt_failure_rate: float = 0.05
    halt_failure_count: int = 20
    canary_halt_failure_count: int = 1
    max_in_flight: int = 0
    in_flight_timeout_s: float = 3600.0
    retry_rolled_back: bool = False
    start_at: float | None = None
    advance_windows: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.canary_devices) > MAX_CANARY_DEVICES:
            raise RequestError(f"plan: at most {MAX_CANARY_DEVICES} canary devices")
        if len(set(self.canary_devices)) != len(self.canary_devices):
            raise RequestError("plan: a canary device is listed twice")
        if self.canary_label is not None and not (
                isinstance(self.canary_label, str) and LABEL_RE.fullmatch(self.canary_label)):
            raise RequestError("plan: canary_label must be 1-64 chars of A-Z a-z 0-9 . _ : -")
        stages = self.stages_percent
        if not stages or len(stages) > 20:
            raise RequestError("plan: stages_percent needs 1..20 stages")
        # An int is always finite (math.isfinite would overflow on a 400-digit one).
        if any(not isinstance(p, int | float) or isinstance(p, bool)
               or (isinstance(p, float) and not math.isfinite(p)) for p in stages):
            raise RequestError("plan: stages_percent must be numbers")
        if any(b <= a for a, b in itertools.pairwise(stages)) or stages[0] <= 0:
            raise RequestError("plan: stages_percent must increase from above 0")
        if stages[-1] != 100:
            raise RequestError("plan: the last stage must be 100 percent")
        for name in ("min_success_rate", "halt_failure_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value <= 1):
                raise RequestError(f"plan: {name} must be within 0..1")
        for name in ("min_successes", "halt_min_sample", "halt_failure_count",
                     "canary_halt_failure_count", "max_in_flight"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**9:
                raise RequestError(f"plan: {name} must be an integer within 0..10^9")
        for name in ("soak_s", "in_flight_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool)
                    and 0 <= value <= 365 * 86400):
                raise RequestError(f"plan: {name} must be within 0..31536000")
        if self.halt_failure_count < 1 or self.canary_halt_failure_count < 1:
            raise RequestError("plan: halt_failure_count and canary_halt_failure_count "
                               "must be at least 1")
        if not isinstance(self.retry_rolled_back, bool):
            raise RequestError("plan: retry_rolled_back must be true or false")
        start = self.start_at
        if start is not None and (isinstance(start, bool) or not isinstance(start, int | float)
                                  or not 0 <= start <= 2**40):
            raise RequestError("plan: start_at must be a time in epoch seconds")
        if len(self.advance_windows) > 32:
            raise RequestError("plan: at most 32 advance_windows")
        self.windows()  # validates

    def windows(self) -> tuple[Window, ...]:
        """:attr:`advance_windows` parsed.

        Raises:
            RequestError: a malformed window.
        """
        out = []
        for text in self.advance_windows:
            if not isinstance(text, str):
                raise RequestError("plan: advance_windows must be strings")
            try:
                out.append(parse_window(text))
            except ValueError as exc:
                raise RequestError(f"plan: advance_windows: {exc}") from None
        return tuple(out)

    @classmethod
    def everyone(cls, *, retry_rolled_back: bool = False) -> RolloutPlan:
        """One stage of 100%: every device at once (labs, demos). Auto-halt stays on."""
        return cls(stages_percent=(100.0,), min_successes=0, soak_s=0.0,
                   retry_rolled_back=retry_rolled_back)

    @property
    def has_canaries(self) -> bool:
        return bool(self.canary_devices) or self.canary_label is not None

    @property
    def stage_names(self) -> tuple[str, ...]:
        """``canary`` then ``1%``, ``10%`` ... (stage 0 exists even without canaries)."""
        return ("canary", *(f"{p:g}%" for p in self.stages_percent))

    def to_json(self) -> dict[str, Any]:
        return {"canary_devices": list(self.canary_devices),
                "canary_label": self.canary_label,
                "stages_percent": list(self.stages_percent),
                "min_successes": self.min_successes,
                "min_success_rate": self.min_success_rate, "soak_s": self.soak_s,
                "halt_min_sample": self.halt_min_sample,
                "halt_failure_rate": self.halt_failure_rate,
                "halt_failure_count": self.halt_failure_count,
                "canary_halt_failure_count": self.canary_halt_failure_count,
                "max_in_flight": self.max_in_flight,
                "in_flight_timeout_s": self.in_flight_timeout_s,
                "retry_rolled_back": self.retry_rolled_back,
                "start_at": self.start_at,
                "advance_windows": list(self.advance_windows)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RolloutPlan:
        """Inverse of :meth:`to_json`; missing keys take defaults.

        Raises:
            RequestError: unknown keys or bad values.
        """
        if not isinstance(obj, Mapping):
            raise RequestError("plan: expected a JSON object")
        extra = sorted(set(obj) - _PLAN_KEYS)
        if extra:
            raise RequestError(f"plan: unknown keys {', '.join(map(repr, extra[:5]))}")
        kwargs: dict[str, Any] = dict(obj)
        for name in ("canary_devices", "stages_percent", "advance_windows"):
            if name in kwargs:
                if not isinstance(kwargs[name], list):
                    raise RequestError(f"plan: {name} must be a list")
                kwargs[name] = tuple(kwargs[name])
        if any(not isinstance(d, str) for d in kwargs.get("canary_devices", ())):
            raise RequestError("plan: canary_devices must be strings")
        return cls(**kwargs)


_PLAN_KEYS: Final = frozenset(RolloutPlan().to_json())


@dataclass(frozen=True)
class StageCounters:
    """Devices of one stage by their current status, and the bytes they reported.

    ``admitted`` only grows (every device ever offered the release in this stage); the
    other counts are devices whose latest status is that one.
    """

    admitted: int = 0
    downloading: int = 0
    succeeded: int = 0
    failed: int = 0
    rolled_back: int = 0
    bytes_origin: int = 0
    bytes_peers: int = 0

    @property
    def reported(self) -> int:
        return self.succeeded + self.failed + self.rolled_back

    @property
    def failures(self) -> int:
        return self.failed + self.rolled_back


@dataclass(frozen=True)
class Admission:
    """One device admitted to a rollout: its stage and latest status; ``code`` and
    ``message`` are those of its latest report (``None`` and empty before one)."""

    device_id: str
    stage: int
    status: str
    updated_at: float
    code: int | None = None
    message: str = ""

    @property
    def in_flight(self) -> bool:
        return self.status in IN_FLIGHT


@dataclass(frozen=True)
class Decision:
    """Something the rollout decided, for the audit log and metrics.

    ``kind``: ``created``, ``stage-advanced``, ``halted``, or an action name
    (``paused``, ``resumed``, ``aborted``, ``forced``, ``revoked``).
    """

    kind: str
    detail: str


@dataclass(frozen=True)
class FailureNote:
    """A device's failed attempt, as a rollout remembers it (its halt reason names it)."""

    device_id: str
    stage: int
    status: int
    message: str
    at: float

    def describe(self, plan: RolloutPlan) -> str:
        name = STATUS_NAMES.get(self.status, "?")
        text = f"{self.device_id} (stage {plan.stage_names[self.stage]}, status " \
               f"{self.status} {name})"
        return f"{text}: {self.message}" if self.message else text


@dataclass(frozen=True)
class RolloutState:
    """Everything that defines a rollout at one moment."""

    rollout_id: str
    product: str
    version: str
    release_counter: int
    plan: RolloutPlan
    phase: str
    stage: int
    stage_started_at: float
    created_at: float
    counters: tuple[StageCounters, ...]
    halt_reason: str = ""
    generation: int = 1
    """1 for a release's first rollout; a new rollout after a halt or abort is the next."""
    failures: tuple[FailureNote, ...] = ()
    """The latest failures (at most :data:`MAX_FAILURE_NOTES`), oldest first."""
    actor: str = field(default="", compare=False)
    revision: int = field(default=0, compare=False)
    """Storage's optimistic lock: how many times this rollout was saved when read."""

    @property
    def stage_name(self) -> str:
        return self.plan.stage_names[self.stage]

    @property
    def totals(self) -> StageCounters:
        """The counters summed over every stage."""
        fields = ("admitted", "downloading", "succeeded", "failed", "rolled_back",
                  "bytes_origin", "bytes_peers")
        return StageCounters(**{f: sum(getattr(c, f) for c in self.counters) for f in fields})

    @property
    def in_flight(self) -> int:
        """Devices admitted that have not reported yet."""
        totals = self.totals
        return totals.admitted - totals.reported


def new_rollout(rollout_id: str, product: str, version: str, release_counter: int,
                plan: RolloutPlan, now: float, *,
                generation: int = 1) -> tuple[RolloutState, Decision]:
    """A fresh rollout: at the canary stage, or at stage 1 without canaries;
    ``scheduled`` if the plan starts later. ``generation``: 1 for the release's first
    rollout, one more than the last for a new one after a halt or abort."""
    if not rollout_id or len(rollout_id) > 64:
        raise RequestError("rollout id must be 1..64 characters")
    if generation < 1:
        raise RequestError("rollout generation must be at least 1")
    stage = 0 if plan.has_canaries else 1
    later = plan.start_at is not None and plan.start_at > now
    start = plan.start_at if later and plan.start_at is not None else now
    state = RolloutState(rollout_id, product, version, release_counter, plan,
                         "scheduled" if later else "active", stage, start, now,
                         tuple(StageCounters() for _ in plan.stage_names),
                         generation=generation)
    when = f", scheduled for {_utc(start)}" if later else ""
    again = f" (rollout #{generation})" if generation > 1 else ""
    return state, Decision("created", f"{product} {version}{again} at stage "
                                      f"{state.stage_name}{when}")


def cohort_percent(rollout_id: str, device_id: str) -> float:
    """Where ``device_id`` falls in ``rollout_id``'s fleet, in ``[0, 100)``."""
    digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def stage_of(plan: RolloutPlan, rollout_id: str, device_id: str,
             labels: Collection[str] = ()) -> int:
    """The stage ``device_id`` (declaring ``labels``) belongs to: 0 for canaries, else
    1..n by cohort."""
    if device_id in plan.canary_devices or (plan.canary_label is not None
                                            and plan.canary_label in labels):
        return 0
    cohort = cohort_percent(rollout_id, device_id)
    for index, percent in enumerate(plan.stages_percent, start=1):
        if cohort < percent:
            return index
    return len(plan.stages_percent)  # unreachable: the last stage is 100


@dataclass(frozen=True)
class AdmitResult:
    """What :func:`admit` decided: offer or not, and the new values to store."""

    offer: bool
    state: RolloutState
    admission: Admission | None
    reason: str
    paced: bool = False


def admit(state: RolloutState, device_id: str, admission: Admission | None, now: float,
          *, in_flight: int | None = None, labels: Collection[str] = ()) -> AdmitResult:
    """Whether to offer the release to ``device_id`` now (``admission``: its record;
    ``labels``: what it declared at check-in).

    ``in_flight`` is the number of devices offered or downloading right now (default:
    the counters' view); with a cap in the plan, a new device is paced (no offer,
    ``paced=True``) while it is reached.
    """
    if state.phase in _CLOSED:
        return AdmitResult(False, state, admission, f"rollout {state.phase}")
    if admission is not None:
        if state.phase in _OFFERING_TO_NEW:
            done = ("succeeded",) if state.plan.retry_rolled_back else ("succeeded",
                                                                         "rolled_back")
            offer = admission.status not in done
        else:
            offer = admission.in_flight
        return AdmitResult(offer, state, admission,
                           "admitted before" if offer else f"rollout {state.phase}")
    if state.phase not in _OFFERING_TO_NEW:
        return AdmitResult(False, state, None, f"rollout {state.phase}")
    stage = stage_of(state.plan, state.rollout_id, device_id, labels)
    if state.phase != "forced" and stage > state.stage:
        return AdmitResult(False, state, None, f"cohort in stage {stage}")
    cap = state.plan.max_in_flight
    busy = state.in_flight if in_flight is None else in_flight
    if state.phase != "forced" and cap and busy >= cap:
        return AdmitResult(False, state, None, f"{busy} devices in flight (cap {cap})",
                           paced=True)
    counters = _bump(state.counters, stage, admitted=1)
    return AdmitResult(True, replace(state, counters=counters),
                       Admission(device_id, stage, "offered", now), "admitted")


def open_to_all(state: RolloutState) -> bool:
    """Whether every device of the product may take the release now (the swarm is then
    open to anonymous leechers too)."""
    if state.phase in ("forced", "completed"):
        return True
    return (state.phase == "active" and not state.plan.has_canaries
            and state.plan.stages_percent == (100.0,))


def mark_downloading(state: RolloutState, admission: Admission,
                     now: float) -> tuple[RolloutState, Admission]:
    """An admitted, offered device joined the swarm: it is downloading."""
    if admission.status != "offered":
        return state, admission
    return (replace(state, counters=_bump(state.counters, admission.stage, downloading=1)),
            replace(admission, status="downloading", updated_at=now))


def on_report(state: RolloutState, admission: Admission, status: int, now: float, *,
              bytes_origin: int = 0, bytes_peers: int = 0, message: str = ""
              ) -> tuple[RolloutState, Admission, list[Decision]]:
    """Count a report of an admitted device (``message``: what it said); may halt the
    rollout."""
    note = message[:MAX_NOTE_MESSAGE_CHARS]
    if status == StatusCode.INTERRUPTED:  # no verdict on the release: back in flight
        new_status = "offered"
    else:
        new_status = ("succeeded" if status == StatusCode.OK else
                      "rolled_back" if status == StatusCode.POSTCHECK_FAILED else "failed")
    if admission.status == new_status and admission.code in (None, status):
        return state, admission, []  # a replay (or a repeat) changes nothing
    counters = state.counters
    if admission.status == "downloading":
        counters = _bump(counters, admission.stage, downloading=-1)
    elif admission.status != "offered":
        counters = _bump(counters, admission.stage, **{admission.status: -1})
    counters = _bump(counters, admission.stage, bytes_origin=bytes_origin,
                     bytes_peers=bytes_peers,
                     **({} if new_status == "offered" else {new_status: 1}))
    failures = state.failures
    if new_status in ("failed", "rolled_back"):
        failures = (*failures, FailureNote(admission.device_id, admission.stage, status,
                                           note, now))[-MAX_FAILURE_NOTES:]
    state = replace(state, counters=counters, failures=failures)
    admission = replace(admission, status=new_status, updated_at=now, code=status,
                        message=note)
    decisions: list[Decision] = []
    if state.phase in _AUTO_HALT and new_status in ("failed", "rolled_back"):
        reason = _halt_reason(state, admission.stage)
        if reason:
            state = replace(state, phase="halted", halt_reason=reason)
            decisions.append(Decision("halted", f"{state.product} {state.version}: "
                                                f"{reason}"))
    return state, admission, decisions


def tick(state: RolloutState, now: float) -> tuple[RolloutState, list[Decision]]:
    """Start a ``scheduled`` rollout whose time has come; advance an ``active`` one by
    one stage if its current stage is done (inside an advance window, if the plan
    has any), or complete it at the last stage."""
    if state.phase == "scheduled":
        if now < state.stage_started_at:
            return state, []
        started = replace(state, phase="active", stage_started_at=now)
        return started, [Decision("started", f"{state.product} {state.version} at stage "
                                             f"{state.stage_name}")]
    if state.phase != "active":
        return state, []
    plan = state.plan
    if now - state.stage_started_at < plan.soak_s:
        return state, []
    current = state.counters[state.stage]
    if state.stage == 0:  # a labelled group's size is unknown: min_successes it is
        population = (len(plan.canary_devices) if plan.canary_label is None
                      else plan.min_successes)
    else:
        population = current.admitted
    needed = min(plan.min_successes, population)
    if state.stage == len(plan.stage_names) - 1:
        needed = max(1, needed)  # a rollout nobody installed is not complete
    if current.succeeded < needed:
        return state, []
    if current.reported and current.succeeded / current.reported < plan.min_success_rate:
        return state, []
    windows = plan.windows()
    if windows:
        when = datetime.fromtimestamp(now, UTC)
        if not any(w.contains(when) for w in windows):
            return state, []
    return _next_stage(state, now, f"{current.succeeded}/{current.reported} succeeded")


def _next_stage(state: RolloutState, now: float, why: str) -> tuple[RolloutState,
                                                                    list[Decision]]:
    if state.stage >= len(state.plan.stage_names) - 1:
        done = replace(state, phase="completed", stage_started_at=now)
        return done, [Decision("completed", f"{state.product} {state.version}: "
                                             f"{state.stage_name} done ({why})")]
    advanced = replace(state, stage=state.stage + 1, stage_started_at=now)
    return advanced, [Decision("stage-advanced",
                               f"{state.product} {state.version}: {state.stage_name} -> "
                               f"{advanced.stage_name} ({why})")]


_ACTION_PHASES: Final[dict[str, tuple[tuple[str, ...], str, str]]] = {
    # action: (phases it applies to, new phase, decision kind)
    "pause": (("active", "scheduled"), "paused", "paused"),
    "resume": (("paused", "halted"), "active", "resumed"),
    "advance": (("active",), "active", "stage-advanced"),
    "force": (("active", "paused", "halted", "scheduled"), "forced", "forced"),
    "abort": (("active", "paused", "halted", "forced", "scheduled", "completed"),
              "aborted", "aborted"),
    "revoke": (("active", "paused", "halted", "forced", "aborted", "scheduled",
                "completed"), "revoked", "revoked"),
}


def allowed_actions(phase: str) -> tuple[str, ...]:
    """The operator actions that apply to a rollout in ``phase`` (in :data:`ACTIONS`
    order; :func:`apply_action` refuses the others)."""
    return tuple(a for a in ACTIONS if phase in _ACTION_PHASES[a][0])


def apply_action(state: RolloutState, action: str, now: float,
                 actor: str = "") -> tuple[RolloutState, Decision]:
    """An operator action. Resuming restarts the stage's soak time (a paused rollout
    whose start time is still ahead goes back to ``scheduled``); ``advance`` moves to
    the next stage at once (or completes the last one), whatever soak and successes say.

    Raises:
        RequestError: an unknown action.
        ConflictError: the action does not apply to the rollout's phase.
    """
    if action not in _ACTION_PHASES:
        raise RequestError(f"unknown action {action!r:.40}; one of {', '.join(ACTIONS)}")
    allowed, phase, kind = _ACTION_PHASES[action]
    if state.phase not in allowed:
        raise ConflictError(f"cannot {action} a rollout that is {state.phase}")
    who = f" by {actor}" if actor else ""
    if action == "advance":
        advanced, decisions = _next_stage(state, now, f"advanced{who}")
        return replace(advanced, actor=actor), decisions[0]
    new = replace(state, phase=phase, actor=actor)
    if action == "resume":
        start = state.plan.start_at
        if start is not None and start > now and state.created_at <= start and \
                state.counters == tuple(StageCounters() for _ in state.counters):
            new = replace(new, phase="scheduled", stage_started_at=start, halt_reason="")
        else:
            new = replace(new, stage_started_at=now, halt_reason="")
    if action == "force":
        new = replace(new, stage=len(state.plan.stage_names) - 1, stage_started_at=now)
    return new, Decision(kind, f"{state.product} {state.version}: {state.phase} -> "
                               f"{new.phase}{who}")


def _halt_reason(state: RolloutState, stage: int) -> str:
    """Why the rollout must halt after a failure in ``stage`` (empty: it need not),
    naming the failing devices."""
    plan = state.plan
    counters = state.counters[stage]
    totals = state.totals
    rule = ""
    if stage == 0 and counters.failures >= plan.canary_halt_failure_count:
        rule = (f"canary stage: {counters.failures} failed of {counters.admitted} "
                f"offered (limit {plan.canary_halt_failure_count})")
    elif totals.failures >= plan.halt_failure_count:
        rule = f"{totals.failures} failures (limit {plan.halt_failure_count})"
    elif (stage > 0 and counters.reported >= plan.halt_min_sample
          and counters.failures / counters.reported > plan.halt_failure_rate):
        rule = (f"stage {plan.stage_names[stage]}: failure rate {counters.failures}/"
                f"{counters.reported} over {plan.halt_failure_rate:g} (after at least "
                f"{plan.halt_min_sample} reports)")
    if not rule:
        return ""
    in_stage = [n for n in state.failures if n.stage == stage]
    named, of = (in_stage, counters.failures) if in_stage else (list(state.failures),
                                                                 totals.failures)
    named = named[-3:]  # the latest
    more = of - len(named)
    return (f"{rule}: " + "; ".join(n.describe(plan) for n in named)
            + (f"; and {more} more" if more > 0 else ""))


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _bump(counters: tuple[StageCounters, ...], stage: int,
          **deltas: int) -> tuple[StageCounters, ...]:
    old = counters[stage]
    new = replace(old, **{k: getattr(old, k) + v for k, v in deltas.items()})
    return (*counters[:stage], new, *counters[stage + 1:])
