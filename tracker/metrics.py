"""Prometheus text exposition (version 0.0.4) of the tracker's counters. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Metric", "render_metrics"]


@dataclass(frozen=True)
class Metric:
    """One metric family: ``samples`` maps a label set (sorted pairs) to a value."""

    name: str
    help: str
    kind: str  # "counter" or "gauge"
    samples: Mapping[tuple[tuple[str, str], ...], float]


def render_metrics(metrics: Sequence[Metric]) -> bytes:
    """The ``/metrics`` body for ``metrics``."""
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
