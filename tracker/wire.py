"""The device <-> tracker wire format, written once: the agent and the tracker import it.

Pure: no I/O. It imports nothing of ours but :mod:`manifest` (product and version
rules) and :mod:`infra.ids` (the device id rule), so the device agent (``peer/``)
may import this module, and only this one, of the tracker (see
``tests/test_import_graph.py``).

What crosses the wire (JSON objects, ``content-type: application/json``):

- ``POST /v1/checkin``: :class:`CheckIn` (:func:`checkin_to_json` /
  :func:`parse_checkin`), answered by :func:`checkin_answer` (the tracker) and read by
  :func:`parse_checkin_answer` (the device); a signed check-in's answer also carries
  an announce key (:func:`announce_key_to_json`, read by :func:`parse_announce_key`):
  the device authenticates its announces and scrapes with it (HMAC-SHA256, the
  ``swarmota-announce-auth`` header of :mod:`infra.deviceauth`) until it expires,
  then signs them with its certificate again;
- ``POST /v1/report``: :class:`Report` (:func:`report_to_json` / :func:`parse_report`);
- device status codes (:class:`StatusCode`, :data:`STATUS_NAMES`);
- BitTorrent refusals: :func:`failure_reason`, the bencoded body both the tracker and
  the agent's announce relay send.

Parsing is strict, because the other side is not trusted:

- UTF-8 JSON, the top level an object, at most :data:`MAX_BODY_BYTES`;
- no duplicate keys, no unknown keys, no missing keys, no ``NaN``/``Infinity``;
- integers are real integers (not booleans, not floats), non-negative and bounded;
- strings have bounded lengths and character sets;
- ``status`` is one of :data:`STATUS_NAMES`; ``timings_s`` has at most
  :data:`MAX_TIMINGS` entries named ``[a-z_]{1,32}`` with finite, non-negative values.

Errors are :class:`WireError` (a ``ValueError``) whose message names the fault and is
safe to send back to the other side.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from swarmota.infra.ids import DEVICE_ID_RE, DEVICE_ID_RULE
from swarmota.manifest import (
    ManifestFormatError,
    release_target_name,
    validate_component,
    validate_product,
    validate_version,
)

__all__ = [
    "DEVICE_ID_RE",
    "FAILURE_STATUSES",
    "HARDWARE_ID_RE",
    "MAX_BODY_BYTES",
    "MAX_BYTES_COUNT",
    "MAX_COMPONENTS",
    "MAX_LABELS",
    "MAX_LOG_TAIL_BYTES",
    "MAX_MESSAGE_CHARS",
    "MAX_POLL_AFTER_S",
    "MIN_POLL_AFTER_S",
    "MAX_RELEASE_COUNTER",
    "MAX_TIMINGS",
    "MAX_TIMING_S",
    "NETWORK_ID_RE",
    "REPORT_ID_RE",
    "STATUS_NAMES",
    "TIMING_NAME_RE",
    "CheckIn",
    "ComponentVersion",
    "AnnounceKeyGrant",
    "Offer",
    "Report",
    "StatusCode",
    "WireError",
    "announce_key_to_json",
    "checkin_answer",
    "checkin_to_json",
    "encode_json",
    "failure_reason",
    "offer_to_json",
    "parse_checkin",
    "parse_announce_key",
    "parse_checkin_answer",
    "parse_report",
    "report_to_json",
]


class WireError(ValueError):
    """A body the protocol refuses; the message is safe to send back."""


class StatusCode(IntEnum):
    """What a device reports after an update attempt."""

    OK = 0
    DOWNLOAD_FAILED = 10
    VERIFY_FAILED = 20
    INSTALL_FAILED = 30
    POSTCHECK_FAILED = 40
    """The new slot failed its health check; the device rolled back."""
    INTERRUPTED = 41
    """The device rolled back because its boot attempts were all interrupted (power
    loss, reset) before the health check gave a verdict: not a verdict on the release."""


STATUS_NAMES: Final[Mapping[int, str]] = {
    StatusCode.OK: "ok",
    StatusCode.DOWNLOAD_FAILED: "download-failed",
    StatusCode.VERIFY_FAILED: "verify-failed",
    StatusCode.INSTALL_FAILED: "install-failed",
    StatusCode.POSTCHECK_FAILED: "post-check-failed",
    StatusCode.INTERRUPTED: "interrupted",
}
"""Device status codes and their display names."""

FAILURE_STATUSES: Final = frozenset({StatusCode.DOWNLOAD_FAILED, StatusCode.VERIFY_FAILED,
                                     StatusCode.INSTALL_FAILED,
                                     StatusCode.POSTCHECK_FAILED})
"""Statuses that count against a release (a rollout's halt rules)."""

MAX_BODY_BYTES: Final = 128 * 1024
MAX_MESSAGE_CHARS: Final = 4096
MAX_LOG_TAIL_BYTES: Final = 16 * 1024
"""A report's ``log_tail``: the end of the agent's log of that attempt, UTF-8."""
MAX_TIMINGS: Final = 32
MAX_TIMING_S: Final = 1e9
"""Upper bound of one timing (about 31 years): keeps values finite and storable."""
MAX_RELEASE_COUNTER: Final = 2**53
"""Same bound as the release manifest's ``release_counter``."""
MAX_BYTES_COUNT: Final = 2**53
"""Upper bound of ``bytes_origin`` / ``bytes_peers`` (exact in JSON doubles, fits SQLite)."""
MAX_POLL_AFTER_S: Final = 7 * 86400
MIN_POLL_AFTER_S: Final = 10
"""No device is told to come back sooner than this (a tracker answering 0 would make
its fleet poll in a loop): the tracker never says less, the agent never waits less."""
MAX_LABELS: Final = 16
MAX_COMPONENTS: Final = 32

HARDWARE_ID_RE: Final = DEVICE_ID_RE
NETWORK_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TIMING_NAME_RE: Final = re.compile(r"[a-z_]{1,32}")
REPORT_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")

_CHECKIN_KEYS = ("device_id", "product", "hardware_id", "version", "release_counter")
_CHECKIN_OPTIONAL_KEYS = ("network_id", "region", "labels", "components")
_COMPONENT_KEYS = ("name", "version", "release_counter")
_REPORT_KEYS = ("device_id", "product", "from_version", "to_version", "status", "message",
                "bytes_origin", "bytes_peers", "timings_s")
_REPORT_OPTIONAL_KEYS = ("report_id", "log_tail")


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentVersion:
    """A component (module, app or config: a release manifest's ``component``) a
    device has installed, with the release counter of what it runs: the floor of that
    component's own counter sequence."""

    name: str
    version: str
    release_counter: int


@dataclass(frozen=True)
class CheckIn:
    """A device says who it is and what it runs (``POST /v1/checkin``).

    ``network_id`` (optional): an opaque id of the device's LAN, e.g. a hash of its
    gateway's address, so that the tracker can hand it peers of the same LAN first;
    ``region`` (optional): a coarse location, the next preference. Both match
    :data:`NETWORK_ID_RE`. ``labels`` (optional, at most :data:`MAX_LABELS`, each
    matching :data:`NETWORK_ID_RE`): groups the device is in, e.g. ``canary`` (a
    rollout's canary group may be a label). ``release_counter`` is the counter of the
    image the device runs; ``components`` (optional, at most :data:`MAX_COMPONENTS`,
    names unique) what it runs of each component, each with its own counter. A device
    that sends no ``components`` keeps one counter for everything it installs.
    """

    device_id: str
    product: str
    hardware_id: str
    version: str
    release_counter: int
    network_id: str | None = None
    region: str | None = None
    labels: tuple[str, ...] = ()
    components: tuple[ComponentVersion, ...] | None = None


@dataclass(frozen=True)
class Report:
    """A device reports the outcome of one update attempt (``POST /v1/report``).

    ``status`` is a key of :data:`STATUS_NAMES`; ``timings_s`` maps phase names to
    seconds (read-only: the dataclass is frozen, the dict is not). ``report_id``
    (optional, :data:`REPORT_ID_RE`) names the attempt's report, so that a report sent
    twice (a crash between sending it and clearing the outbox) is stored once.
    ``log_tail`` (optional, at most :data:`MAX_LOG_TAIL_BYTES` of UTF-8): the end of
    the agent's log of a failed attempt.
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
    report_id: str | None = None
    log_tail: str = ""


@dataclass(frozen=True)
class Offer:
    """The release a check-in answer offers: what to fetch (verified afterwards against
    signed metadata: the tracker only names it), and when to check in again."""

    product: str
    version: str
    release_counter: int
    target: str
    poll_after_s: int


# --- encoding -------------------------------------------------------------------------


def encode_json(obj: Any) -> bytes:
    """Compact, sorted, ASCII JSON bytes (what both sides send)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def checkin_to_json(checkin: CheckIn) -> dict[str, Any]:
    """The request body of a check-in; :func:`parse_checkin` inverts it."""
    out: dict[str, Any] = {
        "device_id": checkin.device_id,
        "product": checkin.product,
        "hardware_id": checkin.hardware_id,
        "version": checkin.version,
        "release_counter": checkin.release_counter,
    }
    if checkin.network_id is not None:  # optional: sent only when set
        out["network_id"] = checkin.network_id
    if checkin.region is not None:
        out["region"] = checkin.region
    if checkin.labels:
        out["labels"] = list(checkin.labels)
    if checkin.components is not None:
        out["components"] = [{"name": c.name, "version": c.version,
                              "release_counter": c.release_counter}
                             for c in checkin.components]
    return out


def report_to_json(report: Report) -> dict[str, Any]:
    """The request body of a report; :func:`parse_report` inverts it."""
    out: dict[str, Any] = {
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
    if report.report_id is not None:
        out["report_id"] = report.report_id
    if report.log_tail:
        out["log_tail"] = report.log_tail
    return out


def offer_to_json(product: str, version: str, release_counter: int) -> dict[str, Any]:
    """The ``release`` member of a check-in answer."""
    return {"product": product, "version": version, "release_counter": release_counter,
            "target": release_target_name(product, version)}


@dataclass(frozen=True)
class AnnounceKeyGrant:
    """An announce key as a check-in answer hands it out: the key's bytes, its expiry
    (epoch s on the tracker's clock: part of the key's name, sent back with every MAC)
    and its lifetime in seconds from the answer (what the device times it by, on its
    own clock)."""

    key: bytes = field(repr=False)
    expires: int
    lifetime_s: int


def announce_key_to_json(grant: AnnounceKeyGrant) -> dict[str, Any]:
    """The ``announce_key`` member of a check-in answer."""
    return {"key": base64.b64encode(grant.key).decode("ascii"), "expires": grant.expires,
            "lifetime_s": grant.lifetime_s}


def checkin_answer(offer: Mapping[str, Any] | None, poll_after_s: int) -> dict[str, Any]:
    """The JSON object answering a check-in: the offer (:func:`offer_to_json`, or
    ``None``) and when to come back."""
    return {"release": None if offer is None else dict(offer), "poll_after_s": poll_after_s}


def failure_reason(reason: str) -> bytes:
    """A bencoded BitTorrent ``failure reason`` answer (BEP 3), UTF-8."""
    data = reason.encode("utf-8", errors="replace")
    return b"d14:failure reason" + str(len(data)).encode("ascii") + b":" + data + b"e"


# --- parsing --------------------------------------------------------------------------


def parse_checkin(data: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> CheckIn:
    """Parse a check-in request body.

    Raises:
        WireError: larger than ``max_bytes``, not a JSON object, or any field invalid.
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
        components=_components(obj.get("components"), "checkin.components"),
    )


def parse_report(data: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> Report:
    """Parse a report request body.

    Raises:
        WireError: larger than ``max_bytes``, not a JSON object, or any field invalid.
    """
    obj = _object(_load(data, max_bytes, "report"), "report", _REPORT_KEYS,
                  _REPORT_OPTIONAL_KEYS)
    status = obj["status"]
    if (not isinstance(status, int) or isinstance(status, bool)
            or status not in STATUS_NAMES):
        raise WireError(f"report.status: {_show(status)} is not one of "
                        f"{sorted(STATUS_NAMES)}")
    report_id = obj.get("report_id")
    if report_id is not None and not (isinstance(report_id, str)
                                      and REPORT_ID_RE.fullmatch(report_id)):
        raise WireError(f"report.report_id: {_show(report_id)} is not 8-64 chars of "
                        "A-Z a-z 0-9 _ -")
    return Report(
        device_id=_device_id(obj["device_id"], "report.device_id"),
        product=_product(obj["product"], "report.product"),
        from_version=_version(obj["from_version"], "report.from_version"),
        to_version=_version(obj["to_version"], "report.to_version"),
        status=int(status),
        message=_text(obj["message"], "report.message", MAX_MESSAGE_CHARS),
        bytes_origin=_int(obj["bytes_origin"], "report.bytes_origin", MAX_BYTES_COUNT),
        bytes_peers=_int(obj["bytes_peers"], "report.bytes_peers", MAX_BYTES_COUNT),
        timings_s=_timings(obj["timings_s"], "report.timings_s"),
        report_id=report_id,
        log_tail=_log_tail(obj.get("log_tail", ""), "report.log_tail"),
    )


def parse_checkin_answer(answer: object) -> tuple[Offer | None, int]:
    """The offer (or ``None``) and the poll interval in a check-in answer.

    A missing or invalid ``poll_after_s`` (not an integer within 0..7 days) means
    3600 s. The offer's product and version are validated as in a release manifest,
    its target must be the one they name, and its counter an integer within 0..2^53.

    Raises:
        WireError: the answer is not an object, or the offer is malformed.
    """
    if not isinstance(answer, dict):
        raise WireError(f"check-in answer: expected a JSON object, got {_kind(answer)}")
    poll = answer.get("poll_after_s", 3600)
    poll_after_s = (poll if isinstance(poll, int) and not isinstance(poll, bool)
                    and 0 <= poll <= MAX_POLL_AFTER_S else 3600)
    release = answer.get("release")
    if release is None:
        return None, poll_after_s
    if not isinstance(release, dict):
        raise WireError("tracker answered a malformed release offer")
    product, version, counter = (release.get("product"), release.get("version"),
                                 release.get("release_counter"))
    if not isinstance(product, str) or not isinstance(version, str):
        raise WireError("tracker answered a malformed release offer: product and "
                        "version must be strings")
    try:
        target = release_target_name(product, version)
    except ManifestFormatError as exc:
        raise WireError(f"tracker answered a malformed release offer: {exc}") from None
    if (not isinstance(counter, int) or isinstance(counter, bool)
            or not 0 <= counter <= MAX_RELEASE_COUNTER):
        raise WireError("tracker answered a malformed release counter")
    if release.get("target") != target:
        raise WireError(f"tracker offered target {_show(release.get('target'))}, "
                        f"expected {target!r}")
    return Offer(product, version, counter, target, poll_after_s), poll_after_s


def parse_announce_key(answer: object) -> AnnounceKeyGrant | None:
    """The announce key in a check-in answer (``None`` when it has none).

    Raises:
        WireError: the answer is not an object, or its ``announce_key`` is malformed
            (not 32 bytes of base64, an expiry or lifetime that is not an integer
            within range).
    """
    if not isinstance(answer, dict):
        raise WireError(f"check-in answer: expected a JSON object, got {_kind(answer)}")
    raw = answer.get("announce_key")
    if raw is None:
        return None
    obj = _object(raw, "announce_key", ("key", "expires", "lifetime_s"), ())
    key = obj["key"]
    try:
        decoded = base64.b64decode(key, validate=True) if isinstance(key, str) else b""
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 32:
        raise WireError("announce_key.key: expected 32 bytes in base64")
    return AnnounceKeyGrant(decoded, _int(obj["expires"], "announce_key.expires", 10**12),
                            _int(obj["lifetime_s"], "announce_key.lifetime_s", 24 * 3600))


def _load(data: bytes, max_bytes: int, where: str) -> Any:
    if len(data) > max_bytes:
        raise WireError(f"{where}: body is {len(data)} bytes, limit {max_bytes}")
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates,
                          parse_constant=_reject_constant)
    except WireError as exc:
        raise WireError(f"{where}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"{where}: body is not valid UTF-8 JSON: {_clip(str(exc))}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WireError(f"duplicate key {_show(key)}")
        out[key] = value
    return out


def _reject_constant(text: str) -> Any:
    raise WireError(f"constant {text} is not allowed")


def _object(value: Any, where: str, keys: Sequence[str],
            optional: Sequence[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{where}: expected a JSON object, got {_kind(value)}")
    extra = sorted(set(value) - set(keys) - set(optional))
    if extra:
        shown = ", ".join(_show(k) for k in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise WireError(f"{where}: unknown keys {shown}{more}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise WireError(f"{where}: missing {', '.join(missing)}")
    return value


def _int(value: Any, where: str, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{where}: expected an integer, got {_kind(value)}")
    if not 0 <= value <= hi:
        raise WireError(f"{where}: {_show(value)} outside 0..{hi}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise WireError(f"{where}: expected a string, got {_kind(value)}")
    return value


def _device_id(value: Any, where: str) -> str:
    text = _str(value, where)
    if not DEVICE_ID_RE.fullmatch(text):
        raise WireError(f"{where}: invalid device id {_show(text)}: {DEVICE_ID_RULE}")
    return text


def _components(value: Any, where: str) -> tuple[ComponentVersion, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise WireError(f"{where}: expected a list, got {_kind(value)}")
    if len(value) > MAX_COMPONENTS:
        raise WireError(f"{where}: {len(value)} components, limit {MAX_COMPONENTS}")
    out = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        obj = _object(item, at, _COMPONENT_KEYS)
        name = _str(obj["name"], f"{at}.name")
        try:
            validate_component(name)
        except ManifestFormatError:
            raise WireError(f"{at}.name: invalid component {_show(name)}: 1-64 chars of "
                            "a-z 0-9 . _ -, starting alphanumeric") from None
        out.append(ComponentVersion(name, _version(obj["version"], f"{at}.version"),
                                    _int(obj["release_counter"], f"{at}.release_counter",
                                         MAX_RELEASE_COUNTER)))
    if len({c.name for c in out}) != len(out):
        raise WireError(f"{where}: a component is listed twice")
    return tuple(out)


def _hardware_id(value: Any, where: str) -> str:
    text = _str(value, where)
    if not HARDWARE_ID_RE.fullmatch(text):
        raise WireError(f"{where}: invalid hardware id {_show(text)}: {DEVICE_ID_RULE}")
    return text


def _network_id(value: Any, where: str) -> str | None:
    if value is None:
        return None
    text = _str(value, where)
    if not NETWORK_ID_RE.fullmatch(text):
        raise WireError(f"{where}: invalid id {_show(text)}: 1-64 chars of "
                        "A-Z a-z 0-9 . _ : -")
    return text


def _labels(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise WireError(f"{where}: expected a list, got {_kind(value)}")
    if len(value) > MAX_LABELS:
        raise WireError(f"{where}: {len(value)} labels, limit {MAX_LABELS}")
    labels = []
    for item in value:
        label = _network_id(item, where)
        if label is None:
            raise WireError(f"{where}: expected strings, got null")
        labels.append(label)
    return tuple(labels)


def _product(value: Any, where: str) -> str:
    text = _str(value, where)
    try:
        return validate_product(text)
    except ManifestFormatError:
        raise WireError(f"{where}: invalid product {_show(text)}: 1-64 chars of "
                        "a-z 0-9 . _ -, starting alphanumeric") from None


def _version(value: Any, where: str) -> str:
    text = _str(value, where)
    try:
        return validate_version(text)
    except ManifestFormatError:
        raise WireError(f"{where}: invalid version {_show(text)}: 1-64 chars of "
                        "A-Z a-z 0-9 . _ + -, starting alphanumeric") from None


def _text(value: Any, where: str, limit: int) -> str:
    text = _str(value, where)
    if len(text) > limit:
        raise WireError(f"{where}: {len(text)} characters, limit {limit}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise WireError(f"{where}: contains unpaired surrogate escapes") from None
    return text


def _log_tail(value: Any, where: str) -> str:
    text = _text(value, where, MAX_LOG_TAIL_BYTES)
    size = len(text.encode("utf-8"))
    if size > MAX_LOG_TAIL_BYTES:
        raise WireError(f"{where}: {size} bytes of UTF-8, limit {MAX_LOG_TAIL_BYTES}")
    return text


def _timings(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise WireError(f"{where}: expected a JSON object, got {_kind(value)}")
    if len(value) > MAX_TIMINGS:
        raise WireError(f"{where}: {len(value)} entries, limit {MAX_TIMINGS}")
    out: dict[str, float] = {}
    for name, seconds in value.items():
        if not TIMING_NAME_RE.fullmatch(name):
            raise WireError(f"{where}: invalid name {_show(name)}: 1-32 chars of a-z _")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise WireError(f"{where}.{name}: expected a number, got {_kind(seconds)}")
        if isinstance(seconds, int) and seconds > MAX_TIMING_S:
            raise WireError(f"{where}.{name}: {_show(seconds)} outside 0..{MAX_TIMING_S:g}")
        number = float(seconds)
        if not (math.isfinite(number) and 0.0 <= number <= MAX_TIMING_S):
            raise WireError(f"{where}.{name}: {_show(seconds)} outside 0..{MAX_TIMING_S:g}")
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
