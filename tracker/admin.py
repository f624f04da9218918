"""The admin API (``/v1/admin/...``): roles, tokens, routes and actions over a director.

Roles, each including the ones before it (:data:`ROLES`):

- ``viewer``: read releases, rollouts, devices, reports, fleet status, revocations;
- ``operator``: register releases, create rollouts, pause, resume, advance, abort,
  force, tag devices;
- ``admin``: revoke releases and device certificates, read the audit log.

Tokens are random (``sot_`` + 43 URL-safe characters, 256 bits); the tracker stores
only their SHA-256 (:func:`hash_token`), so a stolen database does not hold usable
tokens. :func:`check_token` decides: no token, an unknown one or an expired one is a
401 (:class:`~tracker.errors.AuthError`); a token whose role is too small a 403
(``forbidden=True``). Both are audited.

Routes are one table (:data:`ROUTES`): a method, a path of literal and ``{named}``
segments, the role it needs and the action. :func:`handle` matches, authenticates,
authorises and runs the action; every action that changes something is audited with
the token's name, in the same store transaction as the change. Errors are the
tracker's: :class:`~tracker.errors.RequestError` (400), ``AuthError`` (401/403),
:class:`NotFound` (404), :class:`MethodNotAllowed` (405),
:class:`~tracker.errors.ConflictError` (409), ``StorageError`` (500).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

from swarmota.infra.deviceauth import DeviceAuthError, read_certificates
from swarmota.infra.ids import DEVICE_ID_RE
from swarmota.manifest import MAX_MANIFEST_BYTES
from swarmota.tracker.catalogue import register_release, start_rollout
from swarmota.tracker.director import Director, retry_stale
from swarmota.tracker.errors import (
    AuthError,
    ConflictError,
    RequestError,
    TrackerError,
)
from swarmota.tracker.protocol import Release
from swarmota.tracker.rollout import (
    ACTIONS,
    DEVICE_STATUSES,
    LABEL_RE,
    Decision,
    RolloutPlan,
    RolloutState,
    apply_action,
    tick,
)
from swarmota.tracker.store import (
    MAX_PAGE,
    AuditEntry,
    DeviceFilter,
    RevokedCertificate,
    TokenRecord,
)
from swarmota.tracker.views import (
    admission_to_json,
    audit_to_json,
    device_to_json,
    fleet_to_json,
    release_to_json,
    report_to_json,
    revoked_to_json,
    rollout_to_json,
)
from swarmota.tracker.wire import STATUS_NAMES

__all__ = [
    "ACTION_ROLES",
    "MAX_ADMIN_BODY_BYTES",
    "ROLES",
    "ROUTES",
    "TOKEN_NAME_RE",
    "MethodNotAllowed",
    "NotFound",
    "Route",
    "check_token",
    "find_route",
    "handle",
    "hash_token",
    "new_token",
    "parse_plan",
    "parse_rollout_request",
    "role_arg",
    "token_from_header",
]

ROLES: Final = ("viewer", "operator", "admin")
ACTION_ROLES: Final[Mapping[str, str]] = {
    "pause": "operator", "resume": "operator", "advance": "operator", "abort": "operator",
    "force": "operator", "revoke": "admin",
}
TOKEN_NAME_RE: Final = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MAX_ADMIN_BODY_BYTES: Final = 2 * MAX_MANIFEST_BYTES + 64 * 1024
"""Room for a release manifest as JSON text (escaped) in a registration."""
_TOKEN_RE: Final = re.compile(r"sot_[A-Za-z0-9_-]{43}")
_MAX_REVOKE_CERTIFICATES = 64
_MAX_REASON_CHARS = 500
_MAX_TAGS = 32
_DEFAULT_PAGE = 100
_DAY_S = 24 * 3600


class NotFound(TrackerError):
    """No such admin endpoint, or no such object (HTTP 404)."""


class MethodNotAllowed(TrackerError):
    """The endpoint exists, not with this method (HTTP 405; ``allow`` lists them)."""

    def __init__(self, message: str, allow: Sequence[str]) -> None:
        super().__init__(message)
        self.allow = tuple(allow)


# --- tokens ----------------------------------------------------------------------------


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


# --- routing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One authorised admin request, as an action sees it."""

    director: Director
    actor: str
    role: str
    params: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes
    now: float

    def target(self) -> str:
        return f"{self.params.get('product', '')} {self.params.get('version', '')}".strip()


Action = Callable[[Call], Awaitable[tuple[int, object]]]


@dataclass(frozen=True)
class Route:
    """``method`` on ``/v1/admin/`` + ``path`` (``{name}`` segments match anything but
    empty), needing ``role``; ``query`` names the query parameters it takes."""

    method: str
    path: tuple[str, ...]
    role: str
    action: Action
    query: tuple[str, ...] = ()
    summary: str = ""

    def match(self, parts: Sequence[str]) -> dict[str, str] | None:
        if len(parts) != len(self.path):
            return None
        params = {}
        for pattern, part in zip(self.path, parts, strict=True):
            if pattern.startswith("{"):
                if not part:
                    return None
                params[pattern[1:-1]] = part
            elif pattern != part:
                return None
        return params


async def handle(director: Director, method: str, path: str, query: bytes, body: bytes,
                 authorization: bytes | None) -> tuple[int, object]:
    """Answer an admin request: ``(HTTP status, JSON-able answer)``.

    Raises:
        NotFound, MethodNotAllowed, AuthError, RequestError, ConflictError,
        StorageError: as the module docstring says.
    """
    director.counters.add("admin_requests")
    parts = path.split("/")[3:]  # after "", "v1", "admin"
    route, params = find_route(method, parts)
    token = token_from_header(authorization)
    now = director.clock()
    store = director.store

    def authorise() -> TokenRecord:
        record = None if token is None else store.token(hash_token(token))
        try:
            return check_token(record, route.role, now)
        except AuthError as exc:
            actor = "anonymous" if record is None else record.name
            store.add_audit([AuditEntry(now, actor, f"{method} {path[:200]}", "-",
                                        "refused", str(exc))])
            raise

    try:
        record = await director.run(authorise)
    except AuthError:
        director.counters.add("admin_refused")
        raise
    if method == "POST" and len(body) > MAX_ADMIN_BODY_BYTES:
        raise RequestError("request body too large")
    call = Call(director, record.name, record.role, params,
                _query(query, route.query), body, now)
    return await route.action(call)


def find_route(method: str, parts: Sequence[str]) -> tuple[Route, dict[str, str]]:
    """The route of ``method`` on the admin path split after ``/v1/admin/``, and its
    ``{named}`` segments.

    Raises:
        NotFound: no route has this path.
        MethodNotAllowed: routes have it, with other methods.
    """
    allowed = []
    for route in ROUTES:
        params = route.match(parts)
        if params is None:
            continue
        if route.method == method:
            return route, params
        allowed.append(route.method)
    if allowed:
        raise MethodNotAllowed(f"this endpoint only accepts {', '.join(allowed)}", allowed)
    raise NotFound(f"no such admin endpoint {'/'.join(parts)[:200]!r}")


def _query(raw: bytes, known: Sequence[str]) -> dict[str, str]:
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=32)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"malformed query string: {str(exc)[:80]}") from None
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in known:
            raise RequestError(f"unknown query parameter {name[:40]!r}"
                               + (f"; this endpoint takes {', '.join(known)}" if known
                                  else "; this endpoint takes none"))
        if name in out:
            raise RequestError(f"query parameter {name!r} given twice")
        out[name] = value
    return out


def _json_body(call: Call, what: str, keys: Sequence[str]) -> dict[str, Any]:
    """The body as a JSON object with only ``keys`` (an empty body is ``{}``)."""
    return _json_object(call.body, what, keys)


def _json_object(body: bytes, what: str, keys: Sequence[str]) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(f"{what}: body is not valid UTF-8 JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise RequestError(f"{what}: expected a JSON object")
    extra = sorted(set(obj) - set(keys))
    if extra:
        raise RequestError(f"{what}: unknown keys {', '.join(repr(k)[:40] for k in extra)}; "
                           f"expected {', '.join(keys)}")
    return obj


def _int_param(call: Call, name: str, default: int, hi: int) -> int:
    raw = call.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not 0 <= int(raw) <= hi:
        raise RequestError(f"{name} must be an integer within 0..{hi}")
    return int(raw)


def _limit(call: Call) -> int:
    return _int_param(call, "limit", _DEFAULT_PAGE, MAX_PAGE)


def _page(items: list[Any], limit: int, cursor: Callable[[Any], object]) -> dict[str, Any]:
    """``items`` read with ``limit + 1``: at most ``limit`` of them and the cursor of
    the next page (``None``: this is the last)."""
    more = len(items) > limit
    items = items[:limit]
    return {"next": cursor(items[-1]) if more and items else None}


# --- releases --------------------------------------------------------------------------


async def _releases(call: Call) -> tuple[int, object]:
    store = call.director.store

    def read() -> object:
        rollouts = {(r.product, r.version): r for r in store.rollouts()}
        return {"releases": [release_to_json(r, rollouts.get((r.product, r.version)), at)
                             for r, at in store.registered_releases(
                                 call.query.get("product"))]}

    return 200, await call.director.run(read)


async def _show_release(call: Call) -> tuple[int, object]:
    store = call.director.store
    product, version = call.params["product"], call.params["version"]

    def read() -> object:
        found = [(r, at) for r, at in store.registered_releases(product)
                 if r.version == version]
        if not found:
            raise NotFound(f"no release {product[:64]} {version[:64]} is registered")
        release, at = found[0]
        history = [r for r in store.rollouts(product, history=True) if r.version == version]
        return {**release_to_json(release, history[-1] if history else None, at),
                "rollouts": [rollout_to_json(r) for r in history]}

    return 200, await call.director.run(read)


async def _register_release(call: Call) -> tuple[int, object]:
    """``{"manifest": TEXT} | {"url": URL}``, ``"rollout"?: plan | "everyone"``:
    verified against the repository's signed metadata before anything is stored."""
    obj = _json_body(call, "register release", ("manifest", "url", "rollout"))
    director = call.director
    if director.releases is None:
        raise ConflictError("this tracker verifies no releases: start it with "
                            "--repository-root ROOT.json --origin-url URL (the signed "
                            "metadata it checks each release against)")
    manifest, url = obj.get("manifest"), obj.get("url")
    if (manifest is None) == (url is None):
        raise RequestError("register release: give exactly one of manifest (its text) "
                           "and url (where to fetch it)")
    if manifest is not None and not isinstance(manifest, str):
        raise RequestError("register release: manifest must be the manifest's JSON text")
    if url is not None and not isinstance(url, str):
        raise RequestError("register release: url must be a string")
    plan = None if obj.get("rollout") is None else parse_plan(obj["rollout"])
    verified = await director.releases.verify(
        manifest.encode("utf-8") if manifest is not None else None, url)
    release = Release.from_manifest(verified)

    def write() -> object:
        added, rollout = register_release(director.store, release, plan, now=call.now,
                                          actor=call.actor)
        return {"added": added, **release_to_json(release, rollout),
                "rollout_detail": None if rollout is None else rollout_to_json(rollout)}

    answer = await director.run(write)
    director.forget_swarms()
    director.rollouts_changed()
    return 201, answer


# --- rollouts ---------------------------------------------------------------------------


def parse_plan(raw: Any) -> RolloutPlan:
    """A plan as the API takes it: an object of :class:`RolloutPlan` fields (missing
    ones take defaults) or ``"everyone"``.

    Raises:
        RequestError: anything else, or bad values.
    """
    return RolloutPlan.everyone() if raw == "everyone" else RolloutPlan.from_json(raw)


async def _rollouts(call: Call) -> tuple[int, object]:
    history = call.query.get("history", "0") not in ("", "0", "false")
    product = call.query.get("product")
    director = call.director

    def read() -> object:
        return {"rollouts": [rollout_to_json(r) for r in
                             director.store.rollouts(product, history=history)]}

    return 200, await director.run(read)


def parse_rollout_request(body: bytes) -> tuple[str, str, RolloutPlan]:
    """``{"product", "version", "plan"?}`` (``plan``: see :func:`parse_plan`).

    Raises:
        RequestError: not such a JSON object, or a bad plan.
    """
    obj = _json_object(body, "rollout", ("product", "version", "plan"))
    product, version = obj.get("product"), obj.get("version")
    if not isinstance(product, str) or not isinstance(version, str):
        raise RequestError("rollout: product and version must be strings")
    return product, version, parse_plan(obj.get("plan", {}))


async def _create_rollout(call: Call) -> tuple[int, object]:
    product, version, plan = parse_rollout_request(call.body)
    director = call.director

    def write() -> object:
        release = director.store.release(product, version)
        if release is None:
            raise RequestError(f"no release {product[:64]} {version[:64]} is registered")
        return rollout_to_json(start_rollout(director.store, release, plan, now=call.now,
                                             actor=call.actor))

    answer = await director.run(lambda: retry_stale(write))
    director.rollouts_changed()
    return 201, answer


async def _show_rollout(call: Call) -> tuple[int, object]:
    director = call.director
    state = await director.run(lambda: _find_rollout(call))
    return 200, rollout_to_json(state)


def _find_rollout(call: Call) -> RolloutState:
    """In the worker thread: the rollout the path names (by id, or the latest of a
    release), ticked to now for display.

    Raises:
        NotFound: there is none.
    """
    store = call.director.store
    if "rollout_id" in call.params:
        state = store.rollout(call.params["rollout_id"])
        what = f"rollout {call.params['rollout_id'][:64]}"
    else:
        state = store.rollout_of(call.params["product"], call.params["version"])
        what = f"no rollout of {call.target()[:130]}"
    if state is None:
        raise NotFound(what if what.startswith("no ") else f"no {what}")
    return tick(state, call.now)[0]


async def _rollout_devices(call: Call) -> tuple[int, object]:
    status = call.query.get("status")
    if status is not None and status not in DEVICE_STATUSES:
        raise RequestError(f"status must be one of {', '.join(DEVICE_STATUSES)}")
    limit = _limit(call)
    store = call.director.store

    def read() -> object:
        state = store.rollout_of(call.params["product"], call.params["version"])
        if state is None:
            raise NotFound(f"no rollout of {call.target()[:130]}")
        rows = store.admissions(state.rollout_id, status=status,
                                after=call.query.get("after"), limit=limit + 1)
        return {"rollout_id": state.rollout_id, "generation": state.generation,
                "devices": [admission_to_json(a, state) for a in rows[:limit]],
                **_page(rows, limit, lambda a: a.device_id)}

    return 200, await call.director.run(read)


def _rollout_action(action: str) -> Action:
    async def act(call: Call) -> tuple[int, object]:
        director = call.director
        store = director.store

        def write() -> tuple[dict[str, Any], Decision | None, str]:
            """``(rollout, decision, "")``, or ``(rollout, None, why)`` refused (the
            refusal is audited: nothing else changes)."""
            with store.atomic(f"rollout {action}"):
                state = store.rollout_of(call.params["product"], call.params["version"])
                if state is None:
                    raise NotFound(f"no rollout of {call.target()[:130]}")
                try:
                    new, decision = apply_action(state, action, call.now, call.actor)
                except ConflictError as exc:
                    store.add_audit([AuditEntry(call.now, call.actor, f"rollout.{action}",
                                                call.target(), "refused", str(exc))])
                    return rollout_to_json(state), None, str(exc)
                store.save_rollout(new, (), [AuditEntry(call.now, call.actor,
                                                        f"rollout.{action}", call.target(),
                                                        "ok", decision.detail)])
            director.maybe_prune(call.now)
            return rollout_to_json(new), decision, ""

        answer, decision, refused = await director.run(lambda: retry_stale(write))
        if decision is None:
            raise ConflictError(refused)
        director.decided([decision])
        return 200, answer

    return act


# --- devices and reports ----------------------------------------------------------------


async def _devices(call: Call) -> tuple[int, object]:
    q = call.query
    status = q.get("status")
    if status is not None and status not in DEVICE_STATUSES:
        raise RequestError(f"status must be one of {', '.join(DEVICE_STATUSES)}")
    if status is not None and "rollout" not in q:
        raise RequestError("status needs rollout (a rollout id)")
    stale = _int_param(call, "stale_s", -1, 10**9) if "stale_s" in q else None
    fresh = _int_param(call, "seen_within_s", -1, 10**9) if "seen_within_s" in q else None
    search = q.get("search") or None
    if search is not None and len(search) > 128:
        raise RequestError("search must be at most 128 characters")
    limit = _limit(call)
    store = call.director.store

    def read() -> object:
        where = DeviceFilter(product=q.get("product"), version=q.get("version"),
                             group=q.get("group"), rollout_id=q.get("rollout"),
                             status=status, after=q.get("after"), search=search,
                             seen_before=None if stale is None else call.now - stale,
                             seen_after=None if fresh is None else call.now - fresh)
        rows = store.devices(where, limit=limit + 1)
        devices = []
        rollouts: dict[str, RolloutState | None] = {}
        for device in rows[:limit]:
            history = store.admissions_of(device.device_id)
            current = history[0] if history else None
            if current is not None and current.rollout_id not in rollouts:
                rollouts[current.rollout_id] = store.rollout(current.rollout_id)
            devices.append(device_to_json(
                device, current, None if current is None else rollouts[current.rollout_id]))
        return {"devices": devices, **_page(rows, limit, lambda d: d.device_id)}

    return 200, await call.director.run(read)


async def _show_device(call: Call) -> tuple[int, object]:
    device_id = call.params["device_id"]
    limit = _limit(call)
    store = call.director.store

    def read() -> object:
        device = store.device(device_id)
        if device is None:
            raise NotFound(f"unknown device {device_id[:128]}")
        history = store.admissions_of(device_id)
        states = {h.rollout_id: store.rollout(h.rollout_id) for h in history}
        return {**device_to_json(device, history[0] if history else None,
                                 states[history[0].rollout_id] if history else None),
                "rollouts": [{"rollout_id": h.rollout_id, "product": h.product,
                              "version": h.version, "generation": h.generation,
                              **admission_to_json(h.admission, states[h.rollout_id])}
                             for h in history],
                "reports": [report_to_json(r) for r in store.reports(
                    device_id, limit=limit, newest_first=True)],
                "certificates": store.device_certificates(device_id)}

    return 200, await call.director.run(read)


async def _tag_device(call: Call) -> tuple[int, object]:
    device_id = call.params["device_id"]
    obj = _json_body(call, "tags", ("add", "remove"))
    add, remove = obj.get("add", []), obj.get("remove", [])
    for name, tags in (("add", add), ("remove", remove)):
        if (not isinstance(tags, list) or len(tags) > _MAX_TAGS
                or not all(isinstance(t, str) and LABEL_RE.fullmatch(t) for t in tags)):
            raise RequestError(f"tags: {name} must be a list of at most {_MAX_TAGS} tags of "
                               "1-64 chars of A-Z a-z 0-9 . _ : -")
    if not add and not remove:
        raise RequestError("tags: nothing to add or remove")
    store = call.director.store

    def write() -> object:
        audit = [AuditEntry(call.now, call.actor, "device.tag", device_id[:128], "ok",
                            f"add {add}, remove {remove}")]
        try:
            tags = store.set_tags(device_id, add, remove, call.actor, call.now, audit)
        except RequestError as exc:
            raise NotFound(str(exc)) from None
        return {"device_id": device_id, "tags": list(tags)}

    return 200, await call.director.run(write)


async def _reports(call: Call) -> tuple[int, object]:
    q = call.query
    status = None
    if "status" in q:
        status = _int_param(call, "status", 0, 1000)
        if status not in STATUS_NAMES:
            raise RequestError(f"status must be one of {sorted(STATUS_NAMES)}")
    before = _int_param(call, "before", 0, 2**62) if "before" in q else None
    limit = _limit(call)
    store = call.director.store

    def read() -> object:
        rows = store.reports(q.get("device"), product=q.get("product"), status=status,
                             before_id=before, limit=limit + 1, newest_first=True)
        return {"reports": [report_to_json(r, with_log=False) for r in rows[:limit]],
                **_page(rows, limit, lambda r: r.report_id)}

    return 200, await call.director.run(read)


async def _fleet(call: Call) -> tuple[int, object]:
    """``stale_s``: devices not heard of for this long count as stale (default: two
    check-in intervals, ``2 * poll_after_s``)."""
    store = call.director.store
    stale_s = _int_param(call, "stale_s", 2 * call.director.config.poll_after_s, 10**9)

    def read() -> object:
        by_status, origin, peers = store.report_totals()
        return fleet_to_json(store.count_devices(), by_status, origin, peers,
                             store.rollouts(),
                             stale=store.count_devices(seen_before=call.now - stale_s),
                             stale_s=stale_s, recent=store.report_counts(call.now - _DAY_S))

    return 200, await call.director.run(read)


async def _revoke_device(call: Call) -> tuple[int, object]:
    """Revoke every certificate of the device the tracker saw it sign a request with,
    and those the body gives (``{"reason"?, "certificates"?: [PEM, ...]}``); audited
    either way."""
    director = call.director
    store = director.store
    device_id = call.params["device_id"]

    def write() -> dict[str, Any]:
        try:
            if not DEVICE_ID_RE.fullmatch(device_id):
                raise RequestError(f"malformed device id {device_id[:128]!r}")
            reason, given = _parse_revoke_request(device_id, call.body)
            seen = store.device_certificates(device_id)
            if not seen and not given:
                known = store.device(device_id) is not None
                raise NotFound((f"no certificate of device {device_id} is known to the "
                                "tracker" if known else f"unknown device {device_id}")
                               + ": give its certificate file to revoke it")
        except (RequestError, NotFound) as exc:
            store.add_audit([AuditEntry(call.now, call.actor, "device.revoke",
                                        device_id[:128], "refused", str(exc))])
            raise
        fingerprints = sorted(set(seen) | set(given))
        already = store.revoke_certificates(
            [RevokedCertificate(f, device_id, call.now, call.actor, reason)
             for f in fingerprints],
            [AuditEntry(call.now, call.actor, "device.revoke", device_id, "ok",
                        f"certificates sha256 {', '.join(fingerprints)}"
                        + (f"; reason: {reason}" if reason else ""))])
        director.maybe_prune(call.now)
        return {"device_id": device_id, "revoked": fingerprints,
                "already_revoked": sorted(already), "reason": reason}

    answer = await director.run(write)
    if director.gate is not None:
        director.gate.revoked_here(device_id, answer["revoked"])  # refused from now on
    return 200, answer


def _parse_revoke_request(device_id: str, body: bytes) -> tuple[str, list[str]]:
    """``(reason, fingerprints)`` of a revoke body: empty, or
    ``{"reason"?: str, "certificates"?: [PEM, ...]}``, every certificate naming
    ``device_id``.

    Raises:
        RequestError: not such a JSON object, an unreadable certificate, or one of
            another device.
    """
    if not body.strip():
        return "", []
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(f"revoke: body is not valid UTF-8 JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict) or not set(obj) <= {"reason", "certificates"}:
        raise RequestError("revoke: expected an object with optionally reason and "
                           "certificates")
    reason, pems = obj.get("reason", ""), obj.get("certificates", [])
    if not isinstance(reason, str) or len(reason) > _MAX_REASON_CHARS:
        raise RequestError(f"revoke: reason must be a string of at most "
                           f"{_MAX_REASON_CHARS} characters")
    if (not isinstance(pems, list) or len(pems) > _MAX_REVOKE_CERTIFICATES
            or not all(isinstance(p, str) for p in pems)):
        raise RequestError(f"revoke: certificates must be a list of at most "
                           f"{_MAX_REVOKE_CERTIFICATES} PEM strings")
    fingerprints = []
    for index, pem in enumerate(pems):
        try:
            found = read_certificates(pem.encode("utf-8"))
        except (DeviceAuthError, UnicodeEncodeError) as exc:
            raise RequestError(f"revoke: certificate {index + 1}: {exc}") from None
        for cert in found:
            if cert.device_id != device_id:
                raise RequestError(f"revoke: certificate {index + 1} "
                                   f"(sha256:{cert.cert_sha256}) is for device "
                                   f"{cert.device_id!r}, not {device_id!r}")
            fingerprints.append(cert.cert_sha256)
    return reason, fingerprints


async def _revocations(call: Call) -> tuple[int, object]:
    store = call.director.store
    return 200, await call.director.run(lambda: {
        "revoked": [revoked_to_json(r) for r in store.revoked_certificates()]})


async def _audit(call: Call) -> tuple[int, object]:
    since = float(_int_param(call, "since", 0, 2**40))
    limit = _int_param(call, "limit", 10_000, 10_000)
    store = call.director.store
    return 200, await call.director.run(lambda: {
        "audit": [audit_to_json(e) for e in store.audit(since=since, limit=limit)]})


async def _whoami(call: Call) -> tuple[int, object]:
    return 200, {"name": call.actor, "role": call.role}


_PAGE = ("after", "limit")
ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", ("whoami",), "viewer", _whoami, summary="The token's name and role."),
    Route("GET", ("releases",), "viewer", _releases, ("product",),
          "Registered releases, their payloads and their rollout's phase."),
    Route("POST", ("releases",), "operator", _register_release,
          summary="Register a release, verified against the signed repository metadata."),
    Route("GET", ("releases", "{product}", "{version}"), "viewer", _show_release,
          summary="One release with every rollout it had."),
    Route("GET", ("rollouts",), "viewer", _rollouts, ("product", "history"),
          "Rollouts (the latest of each release; history=1: every generation)."),
    Route("POST", ("rollouts",), "operator", _create_rollout,
          summary="Start a rollout (or a new one after a halt or abort)."),
    Route("GET", ("rollouts", "{rollout_id}"), "viewer", _show_rollout,
          summary="One rollout by id."),
    Route("GET", ("rollouts", "{product}", "{version}"), "viewer", _show_rollout,
          summary="A release's latest rollout."),
    Route("GET", ("rollouts", "{product}", "{version}", "devices"), "viewer",
          _rollout_devices, ("status", *_PAGE),
          "Each admitted device's state in the rollout."),
    *(Route("POST", ("rollouts", "{product}", "{version}", action), ACTION_ROLES[action],
            _rollout_action(action), summary=f"{action.capitalize()} the rollout.")
      for action in ACTIONS),
    Route("GET", ("fleet",), "viewer", _fleet, ("stale_s",),
          "Devices per version (and how many are stale), reports per status (and per "
          "product in the last day), bytes and savings."),
    Route("GET", ("devices",), "viewer", _devices,
          ("product", "version", "group", "rollout", "status", "stale_s", "seen_within_s",
           "search", *_PAGE),
          "Devices, filtered, a page at a time."),
    Route("GET", ("devices", "{device_id}"), "viewer", _show_device, ("limit",),
          "One device: what it runs, its rollouts, its reports with log tails."),
    Route("POST", ("devices", "{device_id}", "tags"), "operator", _tag_device,
          summary="Add and remove operator tags (canary groups)."),
    Route("POST", ("devices", "{device_id}", "revoke"), "admin", _revoke_device,
          summary="Revoke the device's certificates."),
    Route("GET", ("reports",), "viewer", _reports,
          ("device", "product", "status", "before", "limit"),
          "Reports, newest first, a page at a time."),
    Route("GET", ("revocations",), "viewer", _revocations,
          summary="Revoked device certificates."),
    Route("GET", ("audit",), "admin", _audit, ("since", "limit"), "The audit log."),
)
"""Every admin endpoint. A path of ``rollouts/{a}/{b}`` is a release; ``rollouts/{id}``
one rollout."""
