"""How the admin API shows the tracker's values as JSON. Pure.

Times are epoch seconds (UTC); the command line shows them in local time. Counts of a
rollout are devices by their latest status; bytes are what their reports said they
fetched from the origin and from peers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import (
    Admission,
    FailureNote,
    RolloutState,
    StageCounters,
    allowed_actions,
)
from swarmota.tracker.store import (
    AuditEntry,
    DeviceRecord,
    RevokedCertificate,
    RolloutDevice,
    StoredReport,
)
from swarmota.tracker.wire import FAILURE_STATUSES, STATUS_NAMES

__all__ = [
    "admission_to_json",
    "audit_to_json",
    "device_to_json",
    "fleet_to_json",
    "release_to_json",
    "report_to_json",
    "revoked_to_json",
    "rollout_to_json",
    "saved_share",
]

_DEVICE_STATE_NAMES = {"offered": "offered", "downloading": "downloading",
                       "succeeded": "installed", "failed": "failed",
                       "rolled_back": "rolled back"}


def saved_share(origin: int, peers: int) -> float:
    """Share of the bytes that came from peers instead of the origin (0..1)."""
    total = origin + peers
    return round(peers / total, 4) if total else 0.0


def _counters(c: StageCounters) -> dict[str, Any]:
    return {"offered": c.admitted, "downloading": c.downloading, "succeeded": c.succeeded,
            "failed": c.failed, "rolled_back": c.rolled_back,
            "in_flight": c.admitted - c.reported,
            "bytes_origin": c.bytes_origin, "bytes_peers": c.bytes_peers,
            "bandwidth_saved": saved_share(c.bytes_origin, c.bytes_peers)}


def _failure(note: FailureNote, state: RolloutState) -> dict[str, Any]:
    return {"device_id": note.device_id, "stage": state.plan.stage_names[note.stage],
            "status": note.status, "status_name": STATUS_NAMES.get(note.status, "?"),
            "message": note.message, "at": note.at}


def rollout_to_json(state: RolloutState) -> dict[str, Any]:
    """A rollout: phase, stage, plan, counters per stage and in total, the latest
    failures; a halted one's reason names its failing devices; ``actions``: the
    operator actions its phase allows."""
    names = state.plan.stage_names
    return {
        "rollout_id": state.rollout_id, "product": state.product, "version": state.version,
        "release_counter": state.release_counter, "generation": state.generation,
        "phase": state.phase, "stage": names[state.stage], "stage_index": state.stage,
        "stage_started_at": state.stage_started_at, "created_at": state.created_at,
        "halt_reason": state.halt_reason, "plan": state.plan.to_json(),
        "stages": [{"name": names[i], **_counters(c)} for i, c in enumerate(state.counters)],
        "totals": _counters(state.totals),
        "failures": [_failure(n, state) for n in state.failures],
        "actions": list(allowed_actions(state.phase)),
    }


def release_to_json(release: Release, rollout: RolloutState | None,
                    added_at: float | None = None) -> dict[str, Any]:
    """A release with its payloads and its latest rollout's phase (``none`` without
    one: offered to nobody)."""
    out: dict[str, Any] = {
        "product": release.product, "version": release.version,
        "release_counter": release.release_counter, "target": release.target,
        "update_type": release.update_type, "component": release.component,
        "payloads": [p.to_json() for p in release.payloads],
        "swarms": [s.info_hash for s in release.swarms],
        "rollout": None if rollout is None else rollout.rollout_id,
        "generation": None if rollout is None else rollout.generation,
        "phase": "none" if rollout is None else rollout.phase}
    if added_at is not None:
        out["added_at"] = added_at
    return out


def admission_to_json(admission: Admission, state: RolloutState | None = None
                      ) -> dict[str, Any]:
    """A device's state in a rollout: offered, downloading, installed, failed, rolled
    back; its latest report's status code and message."""
    return {"device_id": admission.device_id,
            "stage": (admission.stage if state is None
                      else state.plan.stage_names[admission.stage]),
            "state": _DEVICE_STATE_NAMES.get(admission.status, admission.status),
            "status": admission.code,
            "status_name": None if admission.code is None else STATUS_NAMES.get(
                admission.code, "?"),
            "message": admission.message, "updated_at": admission.updated_at}


def device_to_json(device: DeviceRecord, current: RolloutDevice | None = None,
                   state: RolloutState | None = None) -> dict[str, Any]:
    """A device: what it runs, when it was last heard of, its groups, and its state in
    the latest rollout it was admitted to (``current``; ``state``: that rollout, to name
    the stage)."""
    return {
        "device_id": device.device_id, "product": device.product,
        "hardware_id": device.hardware_id, "version": device.version,
        "release_counter": device.release_counter, "last_seen": device.last_seen,
        "network_id": device.network_id, "region": device.region,
        "labels": list(device.labels), "tags": list(device.tags),
        "components": None if device.components is None else [
            {"name": c.name, "version": c.version, "release_counter": c.release_counter}
            for c in device.components],
        "rollout": None if current is None else {
            "rollout_id": current.rollout_id, "version": current.version,
            "generation": current.generation,
            **admission_to_json(current.admission, state)},
    }


def report_to_json(report: StoredReport, *, with_log: bool = True) -> dict[str, Any]:
    """A stored report (its log tail only ``with_log``)."""
    out: dict[str, Any] = {
        "id": report.report_id, "received_at": report.received_at,
        "device_id": report.device_id, "product": report.product,
        "from_version": report.from_version, "to_version": report.to_version,
        "status": report.status, "status_name": STATUS_NAMES.get(report.status, "?"),
        "message": report.message, "bytes_origin": report.bytes_origin,
        "bytes_peers": report.bytes_peers, "timings_s": dict(report.timings_s),
        "report_id": report.device_report_id, "has_log": bool(report.log_tail)}
    if with_log:
        out["log_tail"] = report.log_tail
    return out


def fleet_to_json(versions: Mapping[tuple[str, str], int], by_status: Mapping[int, int],
                  bytes_origin: int, bytes_peers: int,
                  rollouts: Sequence[RolloutState], *,
                  stale: Mapping[tuple[str, str], int], stale_s: int,
                  recent: Mapping[tuple[str, int], int]) -> dict[str, Any]:
    """Devices per product and version, and how many of them were not heard of for
    ``stale_s`` (``stale``); reports per status, bytes and savings; reports of the
    last day per product and status (``recent``) and the failures among them; the
    rollouts' phases."""
    per_product: dict[str, dict[str, int]] = {}
    stale_per_product: dict[str, dict[str, int]] = {}
    for (product, version), n in versions.items():
        per_product.setdefault(product, {})[version] = n
        stale_per_product.setdefault(product, {})[version] = stale.get((product, version), 0)
    last_day: dict[str, dict[str, int]] = {}
    failures: dict[str, int] = {}
    for (product, code), n in sorted(recent.items()):
        last_day.setdefault(product, {})[STATUS_NAMES.get(code, str(code))] = n
        failures[product] = failures.get(product, 0) + (n if code in FAILURE_STATUSES else 0)
    return {"devices": sum(versions.values()), "versions": per_product,
            "stale_s": stale_s, "stale": stale_per_product,
            "reports_last_day": last_day, "failures_last_day": failures,
            "reports": {name: by_status.get(code, 0) for code, name in STATUS_NAMES.items()},
            "bytes_origin": bytes_origin, "bytes_peers": bytes_peers,
            "bandwidth_saved": saved_share(bytes_origin, bytes_peers),
            "rollouts": [{"product": r.product, "version": r.version, "phase": r.phase,
                          "stage": r.stage_name, "generation": r.generation}
                         for r in rollouts]}


def audit_to_json(entry: AuditEntry) -> dict[str, Any]:
    return {"id": entry.entry_id, "at": entry.at, "actor": entry.actor,
            "action": entry.action, "target": entry.target, "outcome": entry.outcome,
            "detail": entry.detail}


def revoked_to_json(record: RevokedCertificate) -> dict[str, Any]:
    return {"cert_sha256": record.cert_sha256, "device_id": record.device_id,
            "revoked_at": record.revoked_at, "actor": record.actor,
            "reason": record.reason}
