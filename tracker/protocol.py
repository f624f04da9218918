"""The device <-> tracker protocol as values: request parsing, offers, answers. Pure.

Nothing here performs I/O. Request bodies arrive as bytes with a size limit and leave
as frozen dataclasses, or raise :class:`~tracker.errors.RequestError` whose message
names the fault and is safe to send back to the client. Parsing is strict:

- UTF-8 JSON, and the top level must be an object;
- no duplicate keys, no unknown keys, no missing keys, no ``NaN``/``Infinity``;
- integers are real integers (not booleans, not floats), non-negative and bounded;
- strings have bounded lengths and character sets (see the ``*_RE`` patterns);
- ``status`` is one of :data:`STATUS_NAMES`; ``timings_s`` has at most
  :data:`MAX_TIMINGS` entries named ``[a-z_]{1,32}`` with finite, non-negative values.

The one policy decision, :func:`decide_offer`, is also here: it takes a check-in and
the release catalogue and returns the release to offer, if any.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from manifest import (
    ManifestFormatError,
    ReleaseManifest,
    release_target_name,
    validate_product,
    validate_version,
)
from tracker.bittorrent import SwarmInfo
from tracker.errors import RequestError

__all__ = [
    "DEVICE_ID_RE",
    "HARDWARE_ID_RE",
    "MAX_BODY_BYTES",
    "MAX_BYTES_COUNT",
    "MAX_LABELS",
    "MAX_MESSAGE_CHARS",
    "MAX_RELEASE_COUNTER",
    "MAX_TIMINGS",
    "MAX_TIMING_S",
    "NETWORK_ID_RE",
    "STATUS_NAMES",
    "TIMING_NAME_RE",
    "CheckIn",
    "Release",
    "Report",
    "checkin_answer",
    "checkin_to_json",
    "decide_offer",
    "encode_json",
    "parse_checkin",
    "parse_report",
    "release_to_json",
    "report_to_json",
]

MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 4096
MAX_TIMINGS = 32
MAX_TIMING_S = 1e9
"""Upper bound of one timing (about 31 years): keeps values finite and storable."""
MAX_RELEASE_COUNTER = 2**53
"""Same bound as the release manifest's ``release_counter``."""
MAX_BYTES_COUNT = 2**53
"""Upper bound of ``bytes_origin`` / ``bytes_peers`` (exact in JSON doubles, fits SQLite)."""

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
HARDWARE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
TIMING_NAME_RE = re.compile(r"[a-z_]{1,32}")

STATUS_NAMES: Mapping[int, str] = {
    0: "ok",
    10: "download-failed",
    20: "verify-failed",
    30: "install-failed",
    40: "post-check-failed",
    41: "interrupted",
}
"""Device status codes (see ARCHITECTURE.md) and their display names."""

_CHECKIN_KEYS = ("device_id", "product", "hardware_id", "version", "release_counter")
_CHECKIN_OPTIONAL_KEYS = ("network_id", "region", "labels")
MAX_LABELS = 16
NETWORK_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_REPORT_KEYS = ("device_id", "product", "from_version", "to_version", "status", "message",
                "bytes_origin", "bytes_peers", "timings_s")


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckIn:
    """A device says who it is and what it runs (``POST /v1/checkin``).

    ``network_id`` (optional): an opaque id of the device's LAN, e.g. a hash of its
    gateway's address, so that the tracker can hand it peers of the same LAN first;
    ``region`` (optional): a coarse location, the next preference. Both match
    :data:`NETWORK_ID_RE`. ``labels`` (optional, at most :data:`MAX_LABELS`, each
    matching :data:`NETWORK_ID_RE`): groups the device is in, e.g. ``canary`` (a
    rollout's canary group may be a label).
    """

    device_id: str
    product: str
    hardware_id: str
    version: str
    release_counter: int
    network_id: str | None = None
    region: str | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """A device reports the outcome of one update attempt (``POST /v1/report``).

    ``status`` is a key of :data:`STATUS_NAMES`; ``timings_s`` maps phase names to
    seconds. Treat ``timings_s`` as read-only (the dataclass is frozen, the dict is not).
    """

    device_id: str
    product: str
    from_version: str
    to_version: str
    status: int
    message: str
    bytes_origin: int
    bytes_peers: int
    timings_s: dict[str, float]


@dataclass(frozen=True)
class Release:
    """One registered release: what the tracker may offer.

    ``target`` is the TUF target name of its release manifest and always equals
    ``manifest.release_target_name(product, version)``; build with :meth:`create` or
    :meth:`from_manifest` to have it derived. ``swarms`` are the BitTorrent swarms of
    its payloads (those whose manifest entry carries an ``info_hash``), in manifest
    order; releases registered without them have none.

    Raises:
        RequestError: invalid product or version, counter outside
            0..MAX_RELEASE_COUNTER, a ``target`` that does not match, or a swarm of
            another release or listed twice.
    """

    product: str
    version: str
    release_counter: int
    target: str
    swarms: tuple[SwarmInfo, ...] = ()

    def __post_init__(self) -> None:
        try:
            expected = release_target_name(self.product, self.version)
        except ManifestFormatError as exc:
            raise RequestError(f"release: {exc}") from None
        _int(self.release_counter, "release.release_counter", MAX_RELEASE_COUNTER)
        if self.target != expected:
            raise RequestError(f"release: target {_show(self.target)} should be {expected!r}")
        seen: set[bytes] = set()
        for swarm in self.swarms:
            if (swarm.product, swarm.version) != (self.product, self.version):
                raise RequestError(f"release: swarm {swarm.info_hash} belongs to "
                                   f"{swarm.product} {swarm.version}")
            if swarm.announce_hash in seen:
                raise RequestError(f"release: swarm {swarm.info_hash} listed twice (or two "
                                   "info-hashes share their first 20 bytes)")
            seen.add(swarm.announce_hash)

    @classmethod
    def create(cls, product: str, version: str, release_counter: int) -> Release:
        """A release with its target name derived from product and version."""
        try:
            target = release_target_name(product, version)
        except ManifestFormatError as exc:
            raise RequestError(f"release: {exc}") from None
        return cls(product, version, release_counter, target)

    @classmethod
    def from_manifest(cls, manifest: ReleaseManifest) -> Release:
        """The catalogue entry of a parsed release manifest, with its payloads' swarms."""
        base = cls.create(manifest.product, manifest.version, manifest.release_counter)
        swarms = tuple(SwarmInfo(p.info_hash, manifest.product, manifest.version, p.kind)
                       for p in manifest.payloads if p.info_hash is not None)
        return cls(base.product, base.version, base.release_counter, base.target, swarms)


# --- decision -------------------------------------------------------------------------


def decide_offer(checkin: CheckIn, releases: Iterable[Release]) -> Release | None:
    """The release to offer ``checkin``'s device, or ``None``.

    The newest release (highest ``release_counter``) of the device's product whose
    counter is strictly higher than the device's. Releases of other products are
    ignored. Counters are unique per product, so the choice is unambiguous.
    """
    best: Release | None = None
    for release in releases:
        if release.product != checkin.product:
            continue
        if release.release_counter <= checkin.release_counter:
            continue
        if best is None or release.release_counter > best.release_counter:
            best = release
    return best


# --- parsing --------------------------------------------------------------------------


def parse_checkin(data: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> CheckIn:
    """Parse a check-in request body.

    Raises:
        RequestError: larger than ``max_bytes``, not a JSON object, or any field invalid.
    """
    obj = _object(_load(data, max_bytes, "checkin"), "checkin", _CHECKIN_KEYS,
                  _CHECKIN_OPTIONAL_KEYS)
    return CheckIn(
        device_id=_device_id(obj["device_id"], "checkin.device_id"),
        product=_product(obj["product"], "checkin.product"),
        hardware_id=_hardware_id(obj["hardware_id"], "checkin.hardware_id"),
        version=_version(obj["version"], "checkin.version"),
        release_counter=_int(obj["release_counter"], "checkin.release_counter",
                             MAX_RELEASE_COUNTER),
        network_id=_network_id(obj.get("network_id"), "checkin.network_id"),
        region=_network_id(obj.get("region"), "checkin.region"),
        labels=_labels(obj.get("labels", []), "checkin.labels"),
    )


def parse_report(data: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> Report:
    """Parse a report request body.

    Raises:
        RequestError: larger than ``max_bytes``, not a JSON object, or any field invalid.
    """
    obj = _object(_load(data, max_bytes, "report"), "report", _REPORT_KEYS)
    status = obj["status"]
    if (not isinstance(status, int) or isinstance(status, bool)
            or status not in STATUS_NAMES):
        raise RequestError(f"report.status: {_show(status)} is not one of "
                           f"{sorted(STATUS_NAMES)}")
    return Report(
        device_id=_device_id(obj["device_id"], "report.device_id"),
        product=_product(obj["product"], "report.product"),
        from_version=_version(obj["from_version"], "report.from_version"),
        to_version=_version(obj["to_version"], "report.to_version"),
        status=status,
        message=_message(obj["message"], "report.message"),
        bytes_origin=_int(obj["bytes_origin"], "report.bytes_origin", MAX_BYTES_COUNT),
        bytes_peers=_int(obj["bytes_peers"], "report.bytes_peers", MAX_BYTES_COUNT),
        timings_s=_timings(obj["timings_s"], "report.timings_s"),
    )


def _load(data: bytes, max_bytes: int, where: str) -> Any:
    if len(data) > max_bytes:
        raise RequestError(f"{where}: body is {len(data)} bytes, limit {max_bytes}")
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates,
                          parse_constant=_reject_constant)
    except RequestError as exc:
        raise RequestError(f"{where}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(f"{where}: body is not valid UTF-8 JSON: {_clip(str(exc))}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestError(f"duplicate key {_show(key)}")
        out[key] = value
    return out


def _reject_constant(text: str) -> Any:
    raise RequestError(f"constant {text} is not allowed")


def _object(value: Any, where: str, keys: Sequence[str],
            optional: Sequence[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{where}: expected a JSON object, got {_kind(value)}")
    extra = sorted(set(value) - set(keys) - set(optional))
    if extra:
        shown = ", ".join(_show(k) for k in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise RequestError(f"{where}: unknown keys {shown}{more}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise RequestError(f"{where}: missing {', '.join(missing)}")
    return value


def _int(value: Any, where: str, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{where}: expected an integer, got {_kind(value)}")
    if not 0 <= value <= hi:
        raise RequestError(f"{where}: {_show(value)} outside 0..{hi}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected a string, got {_kind(value)}")
    return value


def _device_id(value: Any, where: str) -> str:
    text = _str(value, where)
    if not DEVICE_ID_RE.fullmatch(text):
        raise RequestError(f"{where}: invalid device id {_show(text)}: "
                           "1-128 chars of A-Z a-z 0-9 . _ : -")
    return text


def _network_id(value: Any, where: str) -> str | None:
    if value is None:
        return None
    text = _str(value, where)
    if not NETWORK_ID_RE.fullmatch(text):
        raise RequestError(f"{where}: invalid id {_show(text)}: 1-64 chars of "
                           "A-Z a-z 0-9 . _ : -")
    return text


def _labels(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RequestError(f"{where}: expected a list, got {_kind(value)}")
    if len(value) > MAX_LABELS:
        raise RequestError(f"{where}: {len(value)} labels, limit {MAX_LABELS}")
    labels = []
    for item in value:
        label = _network_id(item, where)
        if label is None:
            raise RequestError(f"{where}: expected strings, got null")
        labels.append(label)
    return tuple(labels)


def _hardware_id(value: Any, where: str) -> str:
    text = _str(value, where)
    if not HARDWARE_ID_RE.fullmatch(text):
        raise RequestError(f"{where}: invalid hardware id {_show(text)}: "
                           "1-128 chars of A-Z a-z 0-9 . _ : -, starting alphanumeric")
    return text


def _product(value: Any, where: str) -> str:
    text = _str(value, where)
    try:
        return validate_product(text)
    except ManifestFormatError:
        raise RequestError(f"{where}: invalid product {_show(text)}: 1-64 chars of "
                           "a-z 0-9 . _ -, starting alphanumeric") from None


def _version(value: Any, where: str) -> str:
    text = _str(value, where)
    try:
        return validate_version(text)
    except ManifestFormatError:
        raise RequestError(f"{where}: invalid version {_show(text)}: 1-64 chars of "
                           "A-Z a-z 0-9 . _ + -, starting alphanumeric") from None


def _message(value: Any, where: str) -> str:
    text = _str(value, where)
    if len(text) > MAX_MESSAGE_CHARS:
        raise RequestError(f"{where}: {len(text)} characters, limit {MAX_MESSAGE_CHARS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{where}: contains unpaired surrogate escapes") from None
    return text


def _timings(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise RequestError(f"{where}: expected a JSON object, got {_kind(value)}")
    if len(value) > MAX_TIMINGS:
        raise RequestError(f"{where}: {len(value)} entries, limit {MAX_TIMINGS}")
    out: dict[str, float] = {}
    for name, seconds in value.items():
        if not TIMING_NAME_RE.fullmatch(name):
            raise RequestError(f"{where}: invalid name {_show(name)}: 1-32 chars of a-z _")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise RequestError(f"{where}.{name}: expected a number, got {_kind(seconds)}")
        if isinstance(seconds, int) and seconds > MAX_TIMING_S:
            raise RequestError(f"{where}.{name}: {_show(seconds)} outside 0..{MAX_TIMING_S:g}")
        number = float(seconds)
        if not (math.isfinite(number) and 0.0 <= number <= MAX_TIMING_S):
            raise RequestError(f"{where}.{name}: {_show(seconds)} outside 0..{MAX_TIMING_S:g}")
        out[name] = number
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # unreachable for json.loads output


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """``repr`` of untrusted input, clipped so that error messages stay small."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"<integer of {len(str(abs(value)))} digits>"
    return _clip(repr(value), 60)


# --- encoding -------------------------------------------------------------------------


def encode_json(obj: Any) -> bytes:
    """Compact, sorted, ASCII JSON bytes (what the tracker sends and tests post)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def release_to_json(release: Release) -> dict[str, Any]:
    """The ``release`` member of a check-in answer."""
    return {
        "product": release.product,
        "version": release.version,
        "release_counter": release.release_counter,
        "target": release.target,
    }


def checkin_answer(offer: Release | None, poll_after_s: int) -> dict[str, Any]:
    """The JSON object answering a check-in: the offer (or null) and when to come back."""
    return {"release": None if offer is None else release_to_json(offer),
            "poll_after_s": poll_after_s}


def checkin_to_json(checkin: CheckIn) -> dict[str, Any]:
    """The request body of a check-in; ``parse_checkin`` inverts it."""
    out: dict[str, Any] = {
        "device_id": checkin.device_id,
        "product": checkin.product,
        "hardware_id": checkin.hardware_id,
        "version": checkin.version,
        "release_counter": checkin.release_counter,
    }
    if checkin.network_id is not None:
        out["network_id"] = checkin.network_id
    if checkin.region is not None:
        out["region"] = checkin.region
    if checkin.labels:
        out["labels"] = list(checkin.labels)
    return out


def report_to_json(report: Report) -> dict[str, Any]:
    """The request body of a report; ``parse_report`` inverts it."""
    return {
        "device_id": report.device_id,
        "product": report.product,
        "from_version": report.from_version,
        "to_version": report.to_version,
        "status": report.status,
        "message": report.message,
        "bytes_origin": report.bytes_origin,
        "bytes_peers": report.bytes_peers,
        "timings_s": dict(report.timings_s),
    }
