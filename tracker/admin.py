"""The control plane's pure parts: roles, tokens, views of rollouts and the fleet.

Roles, each including the ones before it (:data:`ROLES`):

- ``viewer``: read releases, rollouts, fleet status, revoked device certificates;
- ``operator``: create rollouts, pause, resume, abort, force;
- ``admin``: revoke releases and device certificates, read the audit log.

Tokens are random (``sot_`` + 43 URL-safe characters, 256 bits); the tracker stores
only their SHA-256 (:func:`hash_token`), so a stolen database does not hold usable
tokens. :func:`check_token` decides: no token, an unknown one or an expired one is a
401 (:class:`~tracker.errors.AuthError`); a token whose role is too small a 403
(``forbidden=True``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from tracker.errors import AuthError, RequestError
from tracker.protocol import Release
from tracker.rollout import RolloutState
from tracker.store import (
    AuditEntry,
    DeviceRecord,
    RevokedCertificate,
    StoredReport,
    TokenRecord,
)
from tracker.wire import STATUS_NAMES

__all__ = [
    "ACTION_ROLES",
    "ROLES",
    "TOKEN_NAME_RE",
    "audit_to_json",
    "check_token",
    "fleet_to_json",
    "hash_token",
    "new_token",
    "release_view",
    "revoked_to_json",
    "role_arg",
    "rollout_to_json",
    "token_from_header",
]

ROLES: Final = ("viewer", "operator", "admin")
ACTION_ROLES: Final[Mapping[str, str]] = {
    "pause": "operator", "resume": "operator", "abort": "operator", "force": "operator",
    "revoke": "admin", "device.revoke": "admin", "revocations": "viewer",
}
TOKEN_NAME_RE: Final = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_TOKEN_RE: Final = re.compile(r"sot_[A-Za-z0-9_-]{43}")



def new_token() -> str:
    """A fresh random token (show it once, store :func:`hash_token` of it)."""
    return "sot_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The SHA-256 hex digest stored for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_from_header(value: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if well formed."""
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN_RE.fullmatch(token):
        return None
    return token


def check_token(record: TokenRecord | None, needed: str, now: float) -> TokenRecord:
    """The token record if it may do what needs role ``needed`` at ``now``.

    Raises:
        AuthError: no (or an unknown) token, an expired one (401), or a role below
            ``needed`` (403, ``forbidden=True``).
    """
    if record is None:
        raise AuthError("missing or unknown bearer token")
    if record.expires_at is not None and now >= record.expires_at:
        raise AuthError(f"token {record.name!r} expired")
    if record.role not in ROLES or ROLES.index(record.role) < ROLES.index(needed):
        raise AuthError(f"token {record.name!r} has role {record.role}; this needs {needed}",
                        forbidden=True)
    return record


def role_arg(role: str) -> str:
    """Validate a role name.

    Raises:
        RequestError: not one of :data:`ROLES`.
    """
    if role not in ROLES:
        raise RequestError(f"role must be one of {', '.join(ROLES)}")
    return role


def rollout_to_json(state: RolloutState) -> dict[str, Any]:
    """A rollout as the admin API shows it: phase, stage, counters per stage."""
    names = state.plan.stage_names
    totals = state.totals
    return {
        "rollout_id": state.rollout_id, "product": state.product, "version": state.version,
        "release_counter": state.release_counter, "phase": state.phase,
        "stage": names[state.stage], "stage_started_at": state.stage_started_at,
        "created_at": state.created_at, "halt_reason": state.halt_reason,
        "plan": state.plan.to_json(),
        "stages": [{"name": names[i], "offered": c.admitted, "downloading": c.downloading,
                    "succeeded": c.succeeded, "failed": c.failed,
                    "rolled_back": c.rolled_back, "bytes_origin": c.bytes_origin,
                    "bytes_peers": c.bytes_peers}
                   for i, c in enumerate(state.counters)],
        "totals": {"offered": totals.admitted, "downloading": totals.downloading,
                   "succeeded": totals.succeeded, "failed": totals.failed,
                   "rolled_back": totals.rolled_back, "bytes_origin": totals.bytes_origin,
                   "bytes_peers": totals.bytes_peers,
                   "bandwidth_saved": _saved(totals.bytes_origin, totals.bytes_peers)},
    }


def release_view(release: Release, rollout: RolloutState | None) -> dict[str, Any]:
    """A release with its rollout's phase (``none`` without one: offered to nobody)."""
    return {"product": release.product, "version": release.version,
            "release_counter": release.release_counter, "target": release.target,
            "swarms": [s.info_hash for s in release.swarms],
            "rollout": None if rollout is None else rollout.rollout_id,
            "phase": "none" if rollout is None else rollout.phase}


def fleet_to_json(devices: Sequence[DeviceRecord], reports: Iterable[StoredReport],
                  rollouts: Sequence[RolloutState]) -> dict[str, Any]:
    """Devices per product and version, reports per status, bytes and savings."""
    versions: dict[str, dict[str, int]] = {}
    for device in devices:
        per = versions.setdefault(device.product, {})
        per[device.version] = per.get(device.version, 0) + 1
    by_status = {name: 0 for name in STATUS_NAMES.values()}
    origin = peers = 0
    for report in reports:
        by_status[STATUS_NAMES[report.status]] += 1
        origin += report.bytes_origin
        peers += report.bytes_peers
    return {"devices": len(devices), "versions": versions, "reports": by_status,
            "bytes_origin": origin, "bytes_peers": peers,
            "bandwidth_saved": _saved(origin, peers),
            "rollouts": [{"product": r.product, "version": r.version, "phase": r.phase,
                          "stage": r.stage_name} for r in rollouts]}


def audit_to_json(entry: AuditEntry) -> dict[str, Any]:
    return {"id": entry.entry_id, "at": entry.at, "actor": entry.actor,
            "action": entry.action, "target": entry.target, "outcome": entry.outcome,
            "detail": entry.detail}


def revoked_to_json(record: RevokedCertificate) -> dict[str, Any]:
    return {"cert_sha256": record.cert_sha256, "device_id": record.device_id,
            "revoked_at": record.revoked_at, "actor": record.actor,
            "reason": record.reason}


def _saved(origin: int, peers: int) -> float:
    """Share of the bytes that came from peers instead of the origin (0..1)."""
    total = origin + peers
    return round(peers / total, 4) if total else 0.0
