"""Registering releases and starting rollouts: written once, run in a store transaction.

The director calls these (in its worker thread) for the admin API; tests, benchmarks and
the demo call :func:`register_release` on a store directly.
"""

from __future__ import annotations

import json
import secrets
import time

from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import RolloutPlan, RolloutState, new_rollout
from swarmota.tracker.store import AuditEntry, Store

__all__ = ["register_release", "start_rollout"]


def start_rollout(store: Store, release: Release, plan: RolloutPlan, *, now: float,
                  actor: str, rollout_id: str | None = None) -> RolloutState:
    """Start a rollout of the registered ``release``: its first, or the next generation
    after a halted or aborted one. Audited as ``rollout.create`` with the plan.

    Raises:
        RequestError: the release is not registered.
        ConflictError: it has a rollout that is not halted or aborted.
        StorageError: the database failed.
    """
    with store.atomic("start rollout"):
        latest = store.rollout_of(release.product, release.version)
        generation = 1 if latest is None else latest.generation + 1
        state, decision = new_rollout(rollout_id or secrets.token_hex(8), release.product,
                                      release.version, release.release_counter, plan, now,
                                      generation=generation)
        store.create_rollout(state, [AuditEntry(
            now, actor, "rollout.create", f"{release.product} {release.version}", "ok",
            f"{decision.detail}; plan {json.dumps(plan.to_json(), sort_keys=True)}")])
    return state


def register_release(store: Store, release: Release, plan: RolloutPlan | None, *,
                     now: float | None = None, actor: str = "cli",
                     rollout_id: str | None = None) -> tuple[bool, RolloutState | None]:
    """Register ``release``; with a ``plan``, also start its rollout unless it has one.

    Returns ``(added, rollout)``: whether the release was new (see
    :meth:`~tracker.store.Store.add_release`) and its rollout (the existing one if it
    had one, ``None`` if it has none). A release without a rollout is offered to
    nobody. Registration and rollout are one transaction, audited with ``actor``.

    Raises:
        ReleaseConflictError: see ``add_release``.
        StorageError: the database failed.
    """
    at = time.time() if now is None else now
    with store.atomic("register release"):
        added = store.add_release(release, at)
        if added:
            store.add_audit([AuditEntry(at, actor, "release.register",
                                        f"{release.product} {release.version}", "ok",
                                        f"counter {release.release_counter}")])
        existing = store.rollout_of(release.product, release.version)
        if plan is None or existing is not None:
            return added, existing
        return added, start_rollout(store, release, plan, now=at, actor=actor,
                                    rollout_id=rollout_id)
