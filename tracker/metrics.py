"""The tracker's counters, declared once, and their Prometheus text exposition. Pure.

:class:`TrackerStatistics` is the declaration: one field per counter, whose metadata
(:func:`counter`, :func:`labelled`) names its ``/metrics`` family and help text.
:class:`Counters` holds the live values (owned by the director's event loop);
``statistics()`` snapshots them and ``/metrics`` renders the same snapshot
(:func:`render_statistics`), so the two can never disagree or drift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarmota.tracker.identity import REFUSAL_KINDS
from swarmota.tracker.wire import STATUS_NAMES

__all__ = ["Counters", "Metric", "TrackerStatistics", "render_metrics",
           "render_statistics"]


def counter(name: str, text: str) -> Any:
    """A plain counter field: ``swarmota_tracker_<name>``."""
    return field(default=0, metadata={"metric": name, "help": text})


def labelled(name: str, label: str, text: str, keys: Sequence[str] = ()) -> Any:
    """A counter family with one label; ``keys`` are the label values always shown
    (0 until counted)."""
    return field(default_factory=lambda: dict.fromkeys(keys, 0),
                 metadata={"metric": name, "help": text, "label": label, "keys": keys})


@dataclass(frozen=True)
class TrackerStatistics:
    """The tracker's counters since it started (see each field's help text).

    The labelled families are mappings of label value to count. ``stage_transitions``
    and ``halts`` read the ``rollout_decisions`` family.
    """

    checkins: int = counter("checkins_total", "Check-ins answered.")
    offers: int = counter("offers_total", "Check-ins answered with a release.")
    paced: int = counter("offers_paced_total", "Check-ins held back by an in-flight cap.")
    reports_by_status: Mapping[str, int] = labelled(
        "reports_total", "status", "Reports stored, by status.", tuple(STATUS_NAMES.values()))
    duplicate_reports: int = counter(
        "reports_duplicate_total", "Reports received again (same report id), not stored.")
    announces: int = counter("announces_total", "BitTorrent announces answered.")
    announces_refused: int = counter(
        "announces_refused_total", "Announces answered without peers (not admitted).")
    scrapes: int = counter("scrapes_total", "BitTorrent scrapes answered.")
    announce_key_auths: int = counter(
        "announce_key_auth_total", "Announces and scrapes authenticated by an announce "
        "key's MAC instead of a signature.")
    bittorrent_refused: Mapping[str, int] = labelled(
        "bittorrent_refused_total", "reason",
        "Announces and scrapes answered with a failure reason, by route and why "
        "(bad-query, unknown-swarm, identity, storage, method).",
        tuple(f"{route}:{why}" for route in ("announce", "scrape")
              for why in ("bad-query", "unknown-swarm", "identity", "storage", "method")))
    decisions: Mapping[str, int] = labelled(
        "rollout_decisions_total", "kind",
        "Rollout decisions (started, stage-advanced, completed, halted, operator actions).")
    admin_requests: int = counter("admin_requests_total", "Admin API requests.")
    admin_refused: int = counter("admin_refused_total",
                                 "Admin API requests refused (401/403).")
    device_auth_refused_by: Mapping[str, int] = labelled(
        "device_auth_refused_total", "reason",
        "Device requests refused for their identity (unsigned, invalid, identity: "
        "another device's id, replayed, revoked, an announce key refused).", REFUSAL_KINDS)
    errors: int = counter("errors_total", "Requests answered with an error status.")

    @property
    def bittorrent_failures(self) -> int:
        """Announces and scrapes refused, for whatever reason."""
        return sum(self.bittorrent_refused.values())

    @property
    def reports(self) -> int:
        return sum(self.reports_by_status.values())

    @property
    def stage_transitions(self) -> int:
        return self.decisions.get("stage-advanced", 0)

    @property
    def halts(self) -> int:
        return self.decisions.get("halted", 0)

    @property
    def device_auth_refused(self) -> int:
        return sum(self.device_auth_refused_by.values())


_FIELDS = tuple(dataclasses.fields(TrackerStatistics))


class Counters:
    """The live values of :class:`TrackerStatistics`. Not thread-safe: owned by one
    event loop (the director's)."""

    def __init__(self) -> None:
        blank = TrackerStatistics()
        self._values: dict[str, Any] = {
            f.name: dict(getattr(blank, f.name)) if "label" in f.metadata else 0
            for f in _FIELDS}

    def add(self, name: str, n: int = 1, *, label: str | None = None) -> None:
        """Count ``n`` more of counter ``name`` (of its ``label`` value for a family).

        Raises:
            RuntimeError: an undeclared counter, or a label on a plain one (a bug).
        """
        if name not in self._values:
            raise RuntimeError(f"undeclared counter {name!r}")
        value = self._values[name]
        if isinstance(value, dict) != (label is not None):
            raise RuntimeError(f"counter {name!r} {'needs' if label is None else 'has no'} "
                               "label")
        if label is None:
            self._values[name] = value + n
        else:
            value[label] = value.get(label, 0) + n

    def snapshot(self) -> TrackerStatistics:
        values: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v
                                  for k, v in self._values.items()}
        return TrackerStatistics(**values)


@dataclass(frozen=True)
class Metric:
    """One metric family: ``samples`` maps a label set (sorted pairs) to a value."""

    name: str
    help: str
    kind: str  # "counter" or "gauge"
    samples: Mapping[tuple[tuple[str, str], ...], float]


def render_statistics(stats: TrackerStatistics, extra: Sequence[Metric] = ()) -> bytes:
    """The ``/metrics`` body of ``stats`` (every declared counter) and ``extra``
    (gauges read elsewhere, e.g. the peer registry's)."""
    metrics = []
    for f in _FIELDS:
        value = getattr(stats, f.name)
        name = f"swarmota_tracker_{f.metadata['metric']}"
        samples: dict[tuple[tuple[str, str], ...], float]
        if "label" in f.metadata:
            samples = {((f.metadata["label"], k),): n for k, n in value.items()}
        else:
            samples = {(): value}
        metrics.append(Metric(name, f.metadata["help"], "counter", samples))
    return render_metrics([*metrics, *extra])


def render_metrics(metrics: Sequence[Metric]) -> bytes:
    """The Prometheus text (version 0.0.4) of ``metrics``."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in sorted(metric.samples.items()):
            shown = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            text = str(int(value)) if float(value).is_integer() else repr(float(value))
            lines.append(f"{metric.name}{{{shown}}} {text}" if shown
                         else f"{metric.name} {text}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
