"""Which release a checking-in device gets: one pure decision over its rollouts.

The director reads, in one store transaction, every release newer than what the device
runs (:func:`tracker.protocol.newer_releases`, in offer order) with its rollout, the
device's admission to it and, where the plan caps devices in flight, how many are;
:func:`choose_offer` decides; the director writes back what changed, in the same
transaction. Nothing here performs I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import Admission, Decision, RolloutState, admit, tick

__all__ = ["Candidate", "OfferChoice", "RolloutChange", "choose_offer"]


@dataclass(frozen=True)
class Candidate:
    """A release newer than what the device runs, and what the store says of it."""

    release: Release
    rollout: RolloutState | None
    admission: Admission | None = None
    in_flight: int | None = None
    """Devices offered or downloading (read only when the plan caps them)."""


@dataclass(frozen=True)
class RolloutChange:
    """A rollout to save: its new state (read as ``before``), the admission that
    changed, and the decisions taken (for the audit log)."""

    before: RolloutState
    after: RolloutState
    admissions: tuple[Admission, ...]
    decisions: tuple[Decision, ...]


@dataclass(frozen=True)
class OfferChoice:
    """The decision: the release to offer (or none), whether the device was held back
    by an in-flight cap, and the rollouts to save."""

    offer: Release | None
    paced: bool
    changes: tuple[RolloutChange, ...] = field(default=())

    @property
    def decisions(self) -> list[Decision]:
        return [d for c in self.changes for d in c.decisions]


def choose_offer(candidates: Sequence[Candidate], device_id: str, groups: Collection[str],
                 now: float) -> OfferChoice:
    """Ask each candidate's rollout, in order, whether it admits ``device_id`` (which
    declares or was tagged with ``groups``) at ``now``; the first that does is offered.
    Every rollout asked is ticked first (a stage may advance or a schedule start). A
    release without a rollout is offered to nobody."""
    paced = False
    changes: list[RolloutChange] = []
    for candidate in candidates:
        state = candidate.rollout
        if state is None:
            continue
        ticked, decisions = tick(state, now)
        result = admit(ticked, device_id, candidate.admission, now,
                       in_flight=candidate.in_flight, labels=groups)
        changed = (result.admission,) if (result.admission is not None and
                                          result.admission != candidate.admission) else ()
        if decisions or changed:
            changes.append(RolloutChange(state, result.state, changed, tuple(decisions)))
        paced = paced or result.paced
        if result.offer:
            return OfferChoice(candidate.release, False, tuple(changes))
    return OfferChoice(None, paced, tuple(changes))
