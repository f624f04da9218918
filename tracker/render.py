"""How the command line shows the admin API's answers to people. Pure.

Every renderer takes an answer (the JSON of :mod:`tracker.views`) and returns lines:
tables with a header row, times in the local time zone (or ``tz``) named in the
header, byte counts readable (``1.5 MiB``), durations short (``2h``). Text that
devices or operators wrote (report messages, log tails, audit details, labels) is
untrusted: :func:`escape` turns every control character into its escape sequence, so a
message cannot move the cursor, recolour the terminal or fake a line of output; every
table cell goes through it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "describe_plan",
    "duration",
    "escape",
    "escape_lines",
    "local_time",
    "readable_bytes",
    "render_audit",
    "render_device",
    "render_devices",
    "render_fleet",
    "render_registration",
    "render_release",
    "render_releases",
    "render_reports",
    "render_revocations",
    "render_rollout",
    "render_rollout_devices",
    "render_rollouts",
    "table",
    "zone_name",
]

Json = Mapping[str, Any]
_MESSAGE_CHARS: Final = 60
_STAGE_COLUMNS: Final = ("offered", "downloading", "succeeded", "failed", "rolled_back",
                         "in_flight")


# --- values ----------------------------------------------------------------------------


def escape(text: object, limit: int | None = None) -> str:
    """``text`` on one line with every control (non-printable) character escaped
    (``\\n``, ``\\x1b``, ``\\u202e``), cut to ``limit`` characters with ``...``."""
    raw = "" if text is None else str(text)
    cleaned = "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)
    if limit is not None and len(cleaned) > limit:
        return cleaned[: max(limit - 3, 0)] + "..."
    return cleaned


def escape_lines(text: str) -> list[str]:
    """A multi-line text (a log tail) as lines, each escaped (a carriage return or an
    escape sequence inside a line stays visible)."""
    return [escape(line) for line in text.removesuffix("\n").split("\n")] if text else []


def _aware(epoch: float, tz: dt.tzinfo | None) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz) if tz is not None else \
        dt.datetime.fromtimestamp(epoch).astimezone()


def local_time(epoch: float | None, tz: dt.tzinfo | None = None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in the local time zone (or ``tz``); ``-`` for none."""
    if epoch is None:
        return "-"
    return _aware(epoch, tz).strftime("%Y-%m-%d %H:%M:%S")


def zone_name(tz: dt.tzinfo | None = None, at: float | None = None) -> str:
    """The time zone's short name (``CEST``, ``UTC``) at ``at`` (default: now)."""
    moment = _aware(dt.datetime.now().timestamp() if at is None else at, tz)
    return moment.tzname() or moment.strftime("%z")


def readable_bytes(count: int | None) -> str:
    """``900 B``, ``1.5 KiB``, ``12.0 MiB``, ``3.25 GiB``."""
    if count is None:
        return "-"
    if abs(count) < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def duration(seconds: float | None) -> str:
    """``45s``, ``30m``, ``2h``, ``1h30m``, ``3d``."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            out.append(f"{s // size}{unit}")
            s %= size
    return "".join(out[:2])


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.3g}%"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], *,
          empty: str = "") -> list[str]:
    """Columns padded to their widest cell; every cell escaped. ``empty``: the one line
    printed when there are no rows."""
    cells = [[escape(c) for c in row] for row in rows]
    if not cells:
        return [empty] if empty else []
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in [list(header), *cells]]


def _fields(pairs: Iterable[tuple[str, object]]) -> list[str]:
    """``name   value`` lines, names padded; values escaped."""
    items = [(k, escape(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0)
    return [f"{k.ljust(width)}  {v}".rstrip() for k, v in items]


def _status(code: object, name: object) -> str:
    return "-" if code is None else f"{code} {name}"


# --- releases --------------------------------------------------------------------------


def render_releases(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET releases``."""
    zone = zone_name(tz)
    return table(
        ("PRODUCT", "VERSION", "COUNTER", "TYPE", "SIZE", f"ADDED ({zone})", "ROLLOUT",
         "GEN", "PHASE"),
        ([r["product"], r["version"], r["release_counter"], _kind(r),
          readable_bytes(_full_size(r)), local_time(r.get("added_at"), tz),
          r.get("rollout") or "-", r.get("generation") or "-", r["phase"]]
         for r in answer["releases"]),
        empty="no releases registered")


def _kind(release: Json) -> str:
    component = release.get("component")
    return str(release.get("update_type", "image")) + (f" {component}" if component else "")


def _full_size(release: Json) -> int | None:
    sizes = [p["size"] for p in release.get("payloads", []) if p.get("kind") == "full"]
    return sizes[0] if sizes else None


def render_release(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET releases/P/V``: the release, its payloads and every rollout it had."""
    lines = [f"release {escape(answer['product'])} {escape(answer['version'])}"]
    lines += ["  " + line for line in _fields([
        ("counter", answer["release_counter"]), ("target", answer.get("target", "-")),
        ("type", _kind(answer)),
        ("added", f"{local_time(answer.get('added_at'), tz)} {zone_name(tz)}"),
        ("phase", answer["phase"])])]
    lines.append("")
    lines += table(("PAYLOAD", "ENCODING", "SIZE", "SHA256", "FROM BASE"),
                   ([p["kind"], p["encoding"], readable_bytes(p["size"]), p["sha256"][:16],
                     (p.get("base_sha256") or "-")[:16]] for p in answer["payloads"]),
                   empty="no payloads")
    # the v2 info-hash of each payload's swarm, and the 20 bytes clients announce
    lines += [f"swarm {escape(h)} (announced as {escape(h[:40])})"
              for h in answer.get("swarms", [])]
    lines.append("")
    lines += render_rollouts({"rollouts": answer.get("rollouts", [])}, tz)
    return lines


def render_registration(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``POST releases``: what was registered and the rollout it has."""
    what = "registered" if answer.get("added") else "already registered:"
    lines = [f"{what} {escape(answer['product'])} {escape(answer['version'])} (release "
             f"counter {answer['release_counter']}, target {escape(answer['target'])}); "
             "verified against the repository's signed metadata"]
    detail = answer.get("rollout_detail")
    if detail is None:
        lines.append("no rollout: offered to nobody until one is created "
                     "('swarmota tracker rollout create')")
    else:
        lines += render_rollout(detail, tz)
    return lines


# --- rollouts --------------------------------------------------------------------------


def render_rollouts(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET rollouts``: one line per rollout."""
    zone = zone_name(tz)
    return table(
        ("ROLLOUT", "PRODUCT", "VERSION", "GEN", "PHASE", "STAGE", "OFFERED", "SUCCEEDED",
         "FAILED", f"CREATED ({zone})"),
        ([r["rollout_id"], r["product"], r["version"], r["generation"], r["phase"],
          r["stage"], r["totals"]["offered"], r["totals"]["succeeded"],
          r["totals"]["failed"] + r["totals"]["rolled_back"],
          local_time(r.get("created_at"), tz)] for r in answer["rollouts"]),
        empty="no rollouts")


def describe_plan(plan: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """A plan in words, a few lines."""
    stages = ", ".join(f"{p:g}%" for p in plan["stages_percent"])
    canary = [*plan.get("canary_devices", [])]
    label = plan.get("canary_label")
    who = ", ".join(canary[:5]) + (f" and {len(canary) - 5} more" if len(canary) > 5 else "")
    if label:
        who = f"{who} + label {label}" if who else f"label {label}"
    lines = [f"stages: {'canary (' + who + '), ' if who else ''}{stages}; each soaks "
             f"{duration(plan['soak_s'])}, then advances with "
             f">= {plan['min_successes']} successes and >= "
             f"{_percent(plan['min_success_rate'])} of reports ok",
             "halts: " + (f"{plan['canary_halt_failure_count']} canary failure(s); "
                          if who else "")
             + f"a stage over {_percent(plan['halt_failure_rate'])} failures once "
             f"{plan['halt_min_sample']} reported; {plan['halt_failure_count']} failures "
             "in all"]
    extra = []
    if plan.get("max_in_flight"):
        extra.append(f"at most {plan['max_in_flight']} devices in flight")
    if plan.get("retry_rolled_back"):
        extra.append("re-offered after a rollback")
    if plan.get("start_at") is not None:
        extra.append(f"starts {local_time(plan['start_at'], tz)} {zone_name(tz)}")
    if plan.get("advance_windows"):
        extra.append(f"advances only in {', '.join(plan['advance_windows'])} UTC")
    if extra:
        lines.append("; ".join(extra))
    return lines


def render_rollout(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """One rollout: phase, stage, plan, counts and bytes per stage, the halt reason and
    the failing devices."""
    r = answer
    zone = zone_name(tz)
    lines = [f"rollout {escape(r['rollout_id'])}: {escape(r['product'])} "
             f"{escape(r['version'])} (counter {r['release_counter']}), generation "
             f"{r['generation']}"]
    lines += ["  " + line for line in _fields([
        ("phase", f"{r['phase'].upper()} at stage {r['stage']} since "
                  f"{local_time(r.get('stage_started_at'), tz)} {zone}"),
        ("created", f"{local_time(r.get('created_at'), tz)} {zone}"),
        *(("plan", line) for line in describe_plan(r["plan"], tz)),
        *((("halted", r["halt_reason"]),) if r.get("halt_reason") else ())])]
    lines.append("")
    has_canary = bool(r["plan"].get("canary_devices") or r["plan"].get("canary_label"))
    rows = []
    for index, stage in enumerate(r["stages"]):
        if index == 0 and not has_canary:
            continue
        mark = "*" if stage["name"] == r["stage"] else " "
        rows.append(_stage_row(f"{mark}{stage['name']}", stage))
    rows.append(_stage_row(" total", r["totals"]))
    lines += table((" STAGE", "OFFERED", "DOWNLOADING", "SUCCEEDED", "FAILED",
                    "ROLLED BACK", "IN FLIGHT", "FROM ORIGIN", "FROM PEERS", "SAVED"), rows)
    if r.get("failures"):
        lines.append("")
        lines.append("failing devices (latest last):")
        lines += table(("DEVICE", "STAGE", "STATUS", f"AT ({zone})", "MESSAGE"),
                       ([f["device_id"], f["stage"], _status(f["status"], f["status_name"]),
                         local_time(f.get("at"), tz), escape(f["message"], _MESSAGE_CHARS)]
                        for f in r["failures"]))
    return lines


def _stage_row(name: str, c: Json) -> list[object]:
    moved = c["bytes_origin"] + c["bytes_peers"]
    return [name, *(c[k] for k in _STAGE_COLUMNS), readable_bytes(c["bytes_origin"]),
            readable_bytes(c["bytes_peers"]),
            _percent(c.get("bandwidth_saved")) if moved else "-"]


def render_rollout_devices(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET rollouts/P/V/devices``: each admitted device's state."""
    zone = zone_name(tz)
    return table(
        ("DEVICE", "STAGE", "STATE", "STATUS", f"UPDATED ({zone})", "MESSAGE"),
        ([d["device_id"], d["stage"], d["state"], _status(d["status"], d["status_name"]),
          local_time(d.get("updated_at"), tz), escape(d["message"], _MESSAGE_CHARS)]
         for d in answer["devices"]),
        empty="no device admitted") + _more(answer)


def _more(answer: Json) -> list[str]:
    cursor = answer.get("next")
    return [] if cursor is None else [f"(more: --after {escape(cursor)}, or --all)"]


# --- devices and reports ---------------------------------------------------------------


def render_devices(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET devices``: one line per device."""
    zone = zone_name(tz)

    def state(d: Json) -> str:
        current = d.get("rollout")
        if not current:
            return "-"
        return f"{current['version']} {current['state']}" + (
            f" ({current['status']})" if current.get("status") not in (None, 0) else "")

    return table(
        ("DEVICE", "PRODUCT", "HARDWARE", "VERSION", "COUNTER", f"LAST SEEN ({zone})",
         "TAGS", "LABELS", "NETWORK", "ROLLOUT"),
        ([d["device_id"], d["product"], d["hardware_id"], d["version"],
          d["release_counter"], local_time(d["last_seen"], tz),
          ",".join(d["tags"]) or "-", ",".join(d["labels"]) or "-",
          "/".join(x for x in (d.get("network_id"), d.get("region")) if x) or "-",
          state(d)] for d in answer["devices"]),
        empty="no devices") + _more(answer)


def render_device(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET devices/ID``: what it runs, its rollouts, its reports with log tails."""
    d = answer
    zone = zone_name(tz)
    components = d.get("components") or []
    lines = [f"device {escape(d['device_id'])}"]
    lines += ["  " + line for line in _fields([
        ("product", d["product"]), ("hardware", d["hardware_id"]),
        ("version", f"{d['version']} (counter {d['release_counter']})"),
        *((f"component {c['name']}", f"{c['version']} (counter {c['release_counter']})")
          for c in components),
        ("last seen", f"{local_time(d['last_seen'], tz)} {zone}"),
        ("network", "/".join(x for x in (d.get("network_id"), d.get("region")) if x)
         or "-"),
        ("labels", ", ".join(d["labels"]) or "-"), ("tags", ", ".join(d["tags"]) or "-"),
        ("certificates", ", ".join(c[:16] for c in d.get("certificates", [])) or "-")])]
    lines += ["", "rollouts:"]
    lines += table(("ROLLOUT", "VERSION", "GEN", "STAGE", "STATE", "STATUS",
                    f"UPDATED ({zone})", "MESSAGE"),
                   ([h["rollout_id"], h["version"], h["generation"], h["stage"], h["state"],
                     _status(h["status"], h["status_name"]),
                     local_time(h.get("updated_at"), tz),
                     escape(h["message"], _MESSAGE_CHARS)]
                    for h in d.get("rollouts", [])), empty="  (never admitted to one)")
    lines += ["", "reports (newest first):"]
    if not d.get("reports"):
        lines.append("  (none)")
    for report in d.get("reports", []):
        lines.append(f"  #{report['id']} {local_time(report['received_at'], tz)} "
                     f"{escape(report['from_version'])} -> {escape(report['to_version'])}: "
                     f"{_status(report['status'], report['status_name'])}, "
                     f"{readable_bytes(report['bytes_origin'])} from origin, "
                     f"{readable_bytes(report['bytes_peers'])} from peers")
        if report.get("message"):
            lines.append(f"    message: {escape(report['message'])}")
        tail = escape_lines(report.get("log_tail") or "")
        if tail:
            lines.append(f"    log tail ({len(tail)} lines):")
            lines += [f"      | {line}" for line in tail]
    return lines


def render_reports(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET reports``: newest first."""
    zone = zone_name(tz)
    return table(
        ("ID", f"RECEIVED ({zone})", "DEVICE", "PRODUCT", "FROM", "TO", "STATUS",
         "FROM ORIGIN", "FROM PEERS", "LOG", "MESSAGE"),
        ([r["id"], local_time(r["received_at"], tz), r["device_id"], r["product"],
          r["from_version"], r["to_version"], _status(r["status"], r["status_name"]),
          readable_bytes(r["bytes_origin"]), readable_bytes(r["bytes_peers"]),
          "yes" if r.get("has_log") else "-", escape(r["message"], _MESSAGE_CHARS)]
         for r in answer["reports"]),
        empty="no reports") + (
        [] if answer.get("next") is None else [f"(more: --before {answer['next']})"])


def render_fleet(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET fleet``: devices per version, reports per status, bytes, rollouts."""
    lines = [f"{answer['devices']} devices"]
    lines += table(("PRODUCT", "VERSION", "DEVICES"),
                   ([product, version, count]
                    for product, versions in sorted(answer["versions"].items())
                    for version, count in sorted(versions.items())))
    reports = answer["reports"]
    lines += ["", "reports: " + (", ".join(f"{name} {n}" for name, n in reports.items() if n)
                                 or "none"),
              f"bytes: {readable_bytes(answer['bytes_origin'])} from the origin, "
              f"{readable_bytes(answer['bytes_peers'])} from peers (saved "
              f"{_percent(answer['bandwidth_saved'])} of the origin's traffic)", ""]
    lines += table(("PRODUCT", "VERSION", "GEN", "PHASE", "STAGE"),
                   ([r["product"], r["version"], r["generation"], r["phase"], r["stage"]]
                    for r in answer["rollouts"]), empty="no rollouts")
    return lines


def render_audit(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET audit``: oldest first."""
    zone = zone_name(tz)
    return table(("ID", f"AT ({zone})", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAIL"),
                 ([e["id"], local_time(e["at"], tz), e["actor"], e["action"], e["target"],
                   e["outcome"], escape(e["detail"], 100)] for e in answer["audit"]),
                 empty="the audit log is empty")


def render_revocations(answer: Json, tz: dt.tzinfo | None = None) -> list[str]:
    """``GET revocations``."""
    zone = zone_name(tz)
    return table(("CERTIFICATE SHA256", "DEVICE", f"REVOKED ({zone})", "BY", "REASON"),
                 ([r["cert_sha256"], r["device_id"], local_time(r["revoked_at"], tz),
                   r["actor"], escape(r["reason"], _MESSAGE_CHARS)]
                  for r in answer["revoked"]),
                 empty="no certificate is revoked")
