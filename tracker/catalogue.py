"""Register a release and start its rollout in one call (CLI, demo, tests)."""

from __future__ import annotations

import secrets
import time

from tracker.protocol import Release
from tracker.rollout import RolloutPlan, RolloutState, new_rollout
from tracker.store import AuditEntry, Store

__all__ = ["register_release"]


def register_release(store: Store, release: Release, plan: RolloutPlan | None, *,
                     now: float | None = None, actor: str = "cli",
                     rollout_id: str | None = None) -> tuple[bool, RolloutState | None]:
    """Register ``release``; with a ``plan``, also start its rollout unless it has one.

    Returns ``(added, rollout)``: whether the release was new (see
    :meth:`~tracker.store.Store.add_release`) and its rollout (the existing one if it
    had one, ``None`` if it has none). A release without a rollout is offered to
    nobody. The creation is audited with ``actor``.

    Raises:
        ReleaseConflictError: see ``add_release``.
        StorageError: the database failed.
    """
    at = time.time() if now is None else now
    added = store.add_release(release, at)
    existing = store.rollout_of(release.product, release.version)
    if plan is None or existing is not None:
        return added, existing
    state, decision = new_rollout(rollout_id or secrets.token_hex(8), release.product,
                                  release.version, release.release_counter, plan, at)
    store.create_rollout(state, [AuditEntry(at, actor, "rollout.create",
                                            f"{release.product} {release.version}", "ok",
                                            decision.detail)])
    return added, state
