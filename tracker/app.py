"""The tracker's HTTP API as a raw ASGI application (no web framework).

Routes (see ARCHITECTURE.md, "Device <-> tracker API"):

- ``POST /v1/checkin``: record the device, answer
  ``{"release": null | {...}, "poll_after_s": N}``;
- ``POST /v1/report``: store the report, answer ``{"ok": true}``;
- ``GET /v1/health``: ``{"ok": true}``;
- ``GET /announce`` and ``GET /scrape``: the BitTorrent HTTP tracker (BEP 3/23/7/48)
  for the swarms of registered releases (:mod:`tracker.bittorrent`); peers live in one
  in-memory :class:`~tracker.registry.SwarmRegistry` owned by the app. The decision is
  :meth:`TrackerApp.answer_bittorrent`, which the lean endpoint
  (:mod:`tracker.announce_server`) calls too: one gate, one registry, one set of counters;
- ``GET /metrics``: Prometheus text (no token: scrape it from the operator network);
- ``/v1/admin/...``: the admin API (bearer tokens, roles, audit; see ARCHITECTURE.md).

Rollouts (:mod:`tracker.rollout`) decide offers: a check-in is offered the newest
release of its product with a higher counter whose rollout admits the device; a release
without a rollout is offered to nobody. Rollouts are advanced (soak, stage checks) at
every check-in and report of their product; reports of admitted devices feed their
counters and may halt them. The swarm follows the rollout: an announce that names a
device (``device_id``) gets peers only if that device is admitted to the swarm's
release; an anonymous seed (the seeder) always does; an anonymous leecher only while
the rollout is open to every device (one 100% stage and no canaries, or forced).
Peers are handed out LAN first, from the network id and region of the device's check-in.
Store calls that decide and write run in one worker-thread call each, and those calls
run one at a time, so concurrent check-ins, reports and admin actions are serialised.

Device identity (``config.device_ca`` set; :mod:`tracker.identity`): every check-in,
report, announce and scrape must be signed by a fleet identity (:mod:`infra.deviceauth`)
over its method, raw target and body. The device id in a check-in's or report's body,
or an announce's ``device_id``, must be the certificate's; an identity of role ``seed``
(the operator's seeders) always gets peers, like an anonymous seed in lab mode. The
signature counter must be above the last one accepted from that device: stored in
SQLite for check-ins and reports (compare-and-set), remembered in memory only for
announces and scrapes (see :mod:`tracker.identity` for the trade-off). A certificate
the operator revoked (``POST /v1/admin/devices/<device_id>/revoke``) is refused on every
device route; the revoked fingerprints are kept in memory (:class:`~tracker.identity.
RevokedSet`), read again from SQLite when older than ``config.revocation_refresh_s``
(a read that fails fails the request: 500, or a ``failure reason``). A refusal is
HTTP 401 ``{"error": ...}`` on the JSON API and a ``failure reason`` on the BitTorrent
routes; nothing is stored or counted, a WARNING is logged, and
``swarmota_tracker_device_auth_refused_total{reason}`` moves. Without ``device_ca``
(lab mode) device requests are not authenticated and an anonymous seed gets peers.

Every answer is a JSON object with ``content-type: application/json``. Errors are
``{"error": "<message>"}``: 400 for a request the protocol refuses, 404 for an unknown
path, 405 for a wrong method (with ``Allow``), 413 for a body over
``config.max_body_bytes`` (enforced from ``content-length`` and again while streaming,
so an oversized body is never buffered), 500 when storage fails.

The BitTorrent routes answer bencoded bodies with ``content-type: text/plain``: a
refused announce or scrape (bad query, unknown info-hash) is a ``failure reason`` with
HTTP 200, as clients expect; a storage failure is a ``failure reason`` with HTTP 500.
A swarm is known once its release is registered; known swarms are cached in memory
(releases are never removed), unknown info-hashes are looked up in the store each time.

The app is a thin shell: :mod:`tracker.protocol` parses and decides, the
:class:`~tracker.store.Store` persists. Blocking store calls run in a worker thread,
one at a time (a ``trio.CapacityLimiter(1)``), so the event loop never blocks on SQLite.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from infra.deviceauth import (
    CERT_HEADER,
    DEVICE_ID_RE,
    SIGNATURE_HEADER,
    Authenticated,
    DeviceAuthError,
    find_header,
    read_certificates,
)
from infra.http_serve import Receive, Scope, Send
from tracker.admin import (
    ACTION_ROLES,
    audit_to_json,
    check_token,
    fleet_to_json,
    hash_token,
    release_view,
    revoked_to_json,
    rollout_to_json,
    token_from_header,
)
from tracker.bittorrent import (
    AnnounceRequest,
    ScrapeCounts,
    SwarmInfo,
    announce_answer,
    failure_answer,
    parse_announce,
    parse_scrape,
    peer_address,
    scrape_answer,
)
from tracker.config import TrackerConfig
from tracker.errors import (
    AuthError,
    ConflictError,
    RequestError,
    StaleStateError,
    StorageError,
)
from tracker.identity import (
    REFUSAL_KINDS,
    CounterWindow,
    DeviceRefused,
    RevokedSet,
    WarningBudget,
    load_fleet_trust,
    replay_refusal,
    revoked_refusal,
)
from tracker.metrics import Metric, render_metrics
from tracker.protocol import Release, decide_offer
from tracker.registry import AnnounceResult, SwarmRegistry
from tracker.rollout import ACTIONS as ROLLOUT_ACTIONS
from tracker.rollout import (
    Decision,
    RolloutPlan,
    RolloutState,
    admit,
    apply_action,
    mark_downloading,
    new_rollout,
    on_report,
    tick,
)
from tracker.store import AuditEntry, RevokedCertificate, Store
from tracker.wire import (
    STATUS_NAMES,
    CheckIn,
    Report,
    WireError,
    checkin_answer,
    encode_json,
    offer_to_json,
    parse_checkin,
    parse_report,
)

__all__ = ["TrackerApp", "TrackerStatistics"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class TrackerStatistics:
    """Counters since the app was created.

    Attributes:
        checkins: check-ins recorded.
        reports: reports stored.
        offers: check-ins answered with a release.
        errors: requests answered with an error status (4xx or 5xx).
        announces: BitTorrent announces answered with peers (``stopped`` included).
        scrapes: BitTorrent scrapes answered.
        bittorrent_failures: announces and scrapes answered with a ``failure reason``
            (bad query, unknown info-hash, storage failure).
        paced: check-ins held back by a stage's in-flight cap.
        announces_refused: announces answered without peers because the device (or an
            anonymous leecher) is not admitted to the swarm's release.
        stage_transitions: rollout stages advanced.
        halts: rollouts halted by themselves.
        admin_requests / admin_refused: admin API calls, and those refused (401/403).
        device_auth_refused: device requests refused for their identity (unsigned,
            not verifying, another device's id, replayed); those of the BitTorrent
            routes count in ``bittorrent_failures`` too, those of the JSON API in
            ``errors``.
    """

    checkins: int
    reports: int
    offers: int
    errors: int
    announces: int = 0
    scrapes: int = 0
    bittorrent_failures: int = 0
    paced: int = 0
    announces_refused: int = 0
    stage_transitions: int = 0
    halts: int = 0
    admin_requests: int = 0
    admin_refused: int = 0
    device_auth_refused: int = 0


class _HttpError(Exception):
    """An error answer; raised inside the app only, never escapes it."""

    def __init__(self, status: int, message: str,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class _Disconnected(Exception):
    """The client went away before sending its whole body."""


class TrackerApp:
    """The tracker API over ``store``; an ASGI 3 application.

    ``clock`` returns seconds since the epoch; it timestamps check-ins, reports, rollout
    decisions and audit entries, and checks token expiry. ``registry`` holds BitTorrent
    peers (default: a new one from ``config``'s interval and limits, on the monotonic
    clock); pass one to read its statistics or to control its clock. ``rng`` draws the
    jitter of ``poll_after_s`` and new rollout ids. ``monotonic`` (seconds) times the
    refresh of the revoked certificates (``config.revocation_refresh_s``). Only ``http``
    scopes are served; ``infra.http_serve`` answers ``lifespan``.

    Raises:
        ConfigError: ``config.device_ca`` cannot be read or holds no CA certificate.
    """

    def __init__(self, store: Store, config: TrackerConfig,
                 clock: Callable[[], float] = time.time, *,
                 registry: SwarmRegistry | None = None,
                 rng: random.Random | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._config = config
        self._trust = (None if config.device_ca is None
                       else load_fleet_trust(config.device_ca))
        self._announce_counters = CounterWindow(_ANNOUNCE_COUNTER_DEVICES)
        self._revoked = RevokedSet(config.revocation_refresh_s)
        self._revoked_reading: trio.Event | None = None
        self._monotonic = monotonic
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.registry = registry if registry is not None else SwarmRegistry(
            interval_s=config.announce_interval_s,
            max_peers_per_swarm=config.max_peers_per_swarm,
            max_peers_total=config.max_peers_total)
        self._known_swarms: dict[bytes, SwarmInfo] = {}
        self._networks: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        # The swarm gate's caches (announces are frequent): rollouts by release, for
        # _ROLLOUT_CACHE_S (monotonic) or until this app changes a phase or stage; and
        # devices known admitted and past "offered" (admission never ends by itself).
        self._rollout_cache: dict[tuple[str, str], tuple[float, RolloutState | None]] = {}
        self._admitted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._refreshing: dict[tuple[str, str], trio.Event] = {}
        self._rollout_generation = 0  # bumped when this app changes a rollout
        self._bittorrent_routes: dict[
            str, Callable[[bytes, Sequence[object] | None, Authenticated | None],
                          Awaitable[bytes]]] = {
            "/announce": self._announce,
            "/scrape": self._scrape,
        }
        self._db_limiter = trio.CapacityLimiter(1)
        self._routes: dict[str, tuple[str, Callable[[Scope, Receive],
                                                    Awaitable[object]]]] = {
            "/v1/checkin": ("POST", self._checkin),
            "/v1/report": ("POST", self._report),
            "/v1/health": ("GET", self._health),
        }
        self._checkins = 0
        self._reports = 0
        self._offers = 0
        self._errors = 0
        self._announces = 0
        self._scrapes = 0
        self._bittorrent_failures = 0
        self._paced = 0
        self._announces_refused = 0
        self._admin_requests = 0
        self._admin_refused = 0
        self._auth_refused = dict.fromkeys(REFUSAL_KINDS, 0)
        self._refusal_log = WarningBudget()
        self._certificates_seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._reports_by_status = dict.fromkeys(STATUS_NAMES, 0)
        self._decisions: dict[str, int] = {}
        self._last_prune = -float("inf")

    def statistics(self) -> TrackerStatistics:
        """A snapshot of the counters."""
        return TrackerStatistics(checkins=self._checkins, reports=self._reports,
                                 offers=self._offers, errors=self._errors,
                                 announces=self._announces, scrapes=self._scrapes,
                                 bittorrent_failures=self._bittorrent_failures,
                                 paced=self._paced,
                                 announces_refused=self._announces_refused,
                                 stage_transitions=self._decisions.get("stage-advanced", 0),
                                 halts=self._decisions.get("halted", 0),
                                 admin_requests=self._admin_requests,
                                 admin_refused=self._admin_refused,
                                 device_auth_refused=sum(self._auth_refused.values()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is answered by infra.http_serve
            return
        path = scope["path"]
        bittorrent = self._bittorrent_routes.get(path)
        if bittorrent is not None and scope["method"] == "GET":
            status, body = await self.answer_bittorrent(
                path, scope.get("query_string", b""), scope.get("client"),
                target=_target_of(scope), headers=scope.get("headers", ()))
            await _send_bytes(send, status, body, b"text/plain")
            return
        if path == "/metrics" and scope["method"] == "GET":
            await _send_bytes(send, 200, self._metrics(),
                              b"text/plain; version=0.0.4; charset=utf-8")
            return
        status = 200
        try:
            if path.startswith("/v1/admin/"):
                status, answer = await self._admin(scope, receive)
            else:
                route = self._routes.get(path)
                if bittorrent is not None or path == "/metrics":
                    route = ("GET", self._health)  # only reached with a wrong method
                if route is None:
                    raise _HttpError(404, f"no such endpoint {path[:200]!r}")
                method, handler = route
                if scope["method"] != method:
                    raise _HttpError(405, f"{path} only accepts {method}",
                                     ((b"allow", method.encode("ascii")),))
                if method == "POST":
                    self._check_content_length(scope)
                answer = await handler(scope, receive)
        except _Disconnected:
            return
        except DeviceRefused as exc:
            self._errors += 1
            self._count_refusal(exc, f"{scope['method']} {path}")
            await _send_json(send, 401, {"error": exc.message},
                             ((b"www-authenticate", b"swarmota-signature"),))
            return
        except _HttpError as exc:
            self._errors += 1
            await _send_json(send, exc.status, {"error": exc.message}, exc.headers)
            return
        except AuthError as exc:
            self._errors += 1
            headers = () if exc.forbidden else ((b"www-authenticate", b"Bearer"),)
            await _send_json(send, 403 if exc.forbidden else 401, {"error": str(exc)},
                             headers)
            return
        except ConflictError as exc:
            self._errors += 1
            await _send_json(send, 409, {"error": str(exc)})
            return
        except (RequestError, WireError) as exc:
            self._errors += 1
            await _send_json(send, 400, {"error": str(exc)})
            return
        except StorageError:
            self._errors += 1
            log.exception("tracker storage failed on %s %s", scope["method"], path)
            await _send_json(send, 500, {"error": "tracker storage failure"})
            return
        await _send_json(send, status, answer)

    # --- device handlers ----------------------------------------------------------------

    async def _checkin(self, scope: Scope, receive: Receive) -> object:
        body = await self._read_body(receive)
        now = self._clock()
        auth = await self._authenticate_json(scope, body, now)
        checkin = parse_checkin(body, max_bytes=self._config.max_body_bytes)
        _bind(auth, checkin.device_id)
        offer, paced, decisions = await self._in_thread(
            lambda: self._decide_offer(checkin, now, auth))
        self._accepted(auth)
        self._count_decisions(decisions)
        if decisions:
            self._forget_rollouts()
        self._remember_network(checkin.device_id, checkin.network_id, checkin.region)
        self._checkins += 1
        if offer is not None:
            self._offers += 1
        if paced:
            self._paced += 1
        _log_checkin(checkin, offer)
        base = self._config.poll_after_s
        if paced:
            base = min(base, self._config.paced_poll_after_s)
        return checkin_answer(None if offer is None else offer_to_json(
            offer.product, offer.version, offer.release_counter), self._jitter(base))

    def _decide_offer(self, checkin: CheckIn, now: float, auth: Authenticated | None
                      ) -> tuple[Release | None, bool, list[Decision]]:
        """In a worker thread: accept the request's counter (if signed), record the
        check-in, then ask each newer release's rollout, newest first, whether it
        admits the device."""
        store = self._store
        self._advance_counter(auth, now)
        store.record_checkin(checkin, now)
        candidates = [r for r in store.releases(checkin.product)
                      if r.release_counter > checkin.release_counter]
        candidates.sort(key=lambda r: r.release_counter, reverse=True)
        paced = False
        decided: list[Decision] = []
        for release in candidates:
            if decide_offer(checkin, [release]) is None:  # the anti-downgrade rule
                continue
            offer, held, decisions = _retry_stale(
                functools.partial(self._admit, release, checkin, now))
            decided += decisions
            paced = paced or held
            if offer:
                return release, False, decided
        return None, paced, decided

    def _admit(self, release: Release, checkin: CheckIn,
               now: float) -> tuple[bool, bool, list[Decision]]:
        """In a worker thread: ``(offer, paced, decisions)`` of one release's rollout for
        one device, saved. Raises StaleStateError if the rollout changed meanwhile."""
        store = self._store
        state = store.rollout_of(release.product, release.version)
        if state is None:
            return False, False, []  # registered but not rolled out: offered to nobody
        ticked, decisions = tick(state, now)
        admission = store.admission(state.rollout_id, checkin.device_id)
        in_flight = None
        if admission is None and ticked.plan.max_in_flight:
            in_flight = store.in_flight(state.rollout_id,
                                        now - ticked.plan.in_flight_timeout_s)
        result = admit(ticked, checkin.device_id, admission, now, in_flight=in_flight,
                       labels=checkin.labels)
        changed = ([result.admission] if result.admission is not None
                   and result.admission != admission else [])
        if decisions or changed:
            store.save_rollout(result.state, changed,
                               self._decision_audit(state, decisions, now))
        return result.offer, result.paced, decisions

    async def _report(self, scope: Scope, receive: Receive) -> object:
        body = await self._read_body(receive)
        now = self._clock()
        auth = await self._authenticate_json(scope, body, now)
        report = parse_report(body, max_bytes=self._config.max_body_bytes)
        _bind(auth, report.device_id)
        report_id, decisions = await self._in_thread(
            lambda: self._record_report(report, now, auth))
        self._accepted(auth)
        self._count_decisions(decisions)
        if decisions:
            self._forget_rollouts()
        self._reports += 1
        self._reports_by_status[report.status] += 1
        log.info("report %d from %s: %s -> %s status %d", report_id, report.device_id,
                 report.from_version, report.to_version, report.status)
        return {"ok": True}

    def _record_report(self, report: Report, now: float, auth: Authenticated | None
                       ) -> tuple[int, list[Decision]]:
        """In a worker thread: accept the request's counter (if signed), store the
        report; count it in the rollout that admitted the device (reports of devices
        not admitted are stored, not counted)."""
        self._advance_counter(auth, now)
        report_id = self._store.add_report(report, now)
        return report_id, _retry_stale(lambda: self._count_report(report_id, report, now))

    def _count_report(self, report_id: int, report: Report, now: float) -> list[Decision]:
        """In a worker thread: count a stored report in its rollout, if the device was
        admitted. Raises StaleStateError if the rollout changed meanwhile."""
        store = self._store
        state = store.rollout_of(report.product, report.to_version)
        if state is None:
            return []
        admission = store.admission(state.rollout_id, report.device_id)
        if admission is None:
            log.warning("report %d: %s was not admitted to the rollout of %s %s; not "
                        "counted", report_id, report.device_id, report.product,
                        report.to_version)
            return []
        counted, admission, decisions = on_report(
            state, admission, report.status, now, bytes_origin=report.bytes_origin,
            bytes_peers=report.bytes_peers)
        counted, more = tick(counted, now)
        decisions += more
        store.save_rollout(counted, [admission], self._decision_audit(state, decisions, now))
        return decisions

    async def _health(self, scope: Scope, receive: Receive) -> object:
        return {"ok": True}

    # --- device identity ----------------------------------------------------------------

    async def _authenticate_json(self, scope: Scope, body: bytes,
                                 now: float) -> Authenticated | None:
        """Who signed this check-in or report (``None`` in lab mode).

        Raises:
            DeviceRefused: not signed, not verifying, or revoked.
            StorageError: the revoked certificates could not be read.
        """
        if self._trust is None:
            return None
        await self._refresh_revoked()
        headers = scope.get("headers", ())
        try:
            return self._verify(scope["method"], _target_of(scope), body, headers, now)
        except DeviceRefused as exc:
            exc.claimed = _claimed_in_body(body)
            raise

    def _verify(self, method: str, target: bytes, body: bytes,
                headers: Sequence[tuple[bytes, bytes]], now: float) -> Authenticated:
        """Check the identity headers against the fleet CA (``self._trust`` is set).

        Raises:
            DeviceRefused: ``unsigned``, ``invalid`` or ``revoked`` (against the
                in-memory copy of the revoked certificates).
        """
        if self._trust is None:
            raise RuntimeError("_verify in lab mode")
        cert = find_header(headers, CERT_HEADER)
        signature = find_header(headers, SIGNATURE_HEADER)
        try:
            auth = self._trust.verify(method, target, body, cert, signature,
                                      datetime.datetime.fromtimestamp(now, datetime.UTC))
        except DeviceAuthError as exc:
            kind = "unsigned" if cert is None or signature is None else "invalid"
            raise DeviceRefused(kind, str(exc)) from None
        if auth.cert_sha256 in self._revoked:
            raise revoked_refusal(auth)
        return auth

    async def _refresh_revoked(self) -> None:
        """Read the revoked certificates again if this process's copy is
        ``config.revocation_refresh_s`` old. One read at a time: requests arriving
        while it runs wait for it.

        Raises:
            StorageError: the read failed (this request's, or the one it waited for):
                a request is never judged against a copy older than the bound.
        """
        if not self._revoked.due(self._monotonic()):
            return
        running = self._revoked_reading
        if running is not None:
            await running.wait()
            if self._revoked.due(self._monotonic()):
                raise StorageError("the revoked device certificates could not be read")
            return
        done = self._revoked_reading = trio.Event()
        try:
            read_at = self._monotonic()
            revoked = await self._in_thread(self._store.revoked_fingerprints)
            for device_id in self._revoked.refreshed(revoked, read_at):
                self._announce_counters.forget(device_id)  # reset in the store too
        finally:
            self._revoked_reading = None
            done.set()

    def _advance_counter(self, auth: Authenticated | None, now: float) -> None:
        """In a worker thread: store a signed check-in's or report's counter if it is
        above the device's last one (compare-and-set in SQLite).

        Raises:
            DeviceRefused: ``replayed``; nothing was written.
        """
        if auth is None:
            return
        floor = self._store.advance_counter(auth.device_id, auth.counter, now,
                                            auth.cert_sha256)
        if floor is not None:
            raise replay_refusal(auth.counter, floor, auth.device_id)

    def _accepted(self, auth: Authenticated | None) -> None:
        """A signed check-in or report was accepted: announces signed before it can no
        longer be replayed to this process."""
        if auth is not None:
            self._announce_counters.raise_to(auth.device_id, auth.counter)

    async def _accept_announce_counter(self, auth: Authenticated) -> None:
        """Check an announce's or scrape's counter against the in-memory window (seeded
        from the stored counter when the device is not in it) and remember it.

        Raises:
            DeviceRefused: ``replayed``.
            StorageError: seeding from the store failed.
        """
        floor = self._announce_counters.get(auth.device_id)
        if floor is None:
            stored = await self._in_thread(
                lambda: self._store.device_counter(auth.device_id))
            floor = self._announce_counters.get(auth.device_id)  # may have moved meanwhile
            if stored is not None and (floor is None or stored > floor):
                floor = stored
        if floor is not None and auth.counter <= floor:
            raise replay_refusal(auth.counter, floor, auth.device_id)
        self._announce_counters.raise_to(auth.device_id, auth.counter)
        await self._record_certificate(auth)

    async def _record_certificate(self, auth: Authenticated) -> None:
        """The first time this process sees a device announce with a certificate, store
        the pair, so that revoking the device also takes a certificate it only ever
        announced with (check-ins and reports record theirs with the counter). One
        write per new pair per process: the pairs seen are kept in memory (bounded)."""
        key = (auth.device_id, auth.cert_sha256)
        if key in self._certificates_seen:
            self._certificates_seen.move_to_end(key)
            return
        now = self._clock()
        await self._in_thread(
            lambda: self._store.record_certificate(auth.device_id, auth.cert_sha256, now))
        self._remember(self._certificates_seen, key)

    def _count_refusal(self, exc: DeviceRefused, what: str) -> None:
        self._auth_refused[exc.kind] += 1
        log_it, left_out = self._refusal_log.allow(self._monotonic())
        if not log_it:
            return  # counted in /metrics; the log keeps a bounded number of lines
        claimed = "-" if exc.claimed is None else repr(exc.claimed[:128])
        log.warning("device request refused (%s): %s: device %s: %s%s", exc.kind, what,
                    claimed, exc.message,
                    f" ({left_out} more refusals not logged)" if left_out else "")

    # --- admin API ----------------------------------------------------------------------

    async def _admin(self, scope: Scope, receive: Receive) -> tuple[int, object]:
        """Route ``/v1/admin/...``: authenticate, authorise, act, audit."""
        self._admin_requests += 1
        method, path = scope["method"], scope["path"]
        parts = path.split("/")[3:]  # after "", "v1", "admin"
        needed, action = _admin_route(method, parts)
        header = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                header = value
        token = token_from_header(header)
        now = self._clock()
        if method == "POST":
            self._check_content_length(scope)
            body = await self._read_body(receive)
        else:
            body = b""

        def run() -> tuple[int, object]:
            record = None if token is None else self._store.token(hash_token(token))
            try:
                record = check_token(record, needed, now)
            except AuthError as exc:
                actor = "anonymous" if record is None else record.name
                self._store.add_audit([AuditEntry(now, actor, f"{method} {path[:200]}",
                                                  "-", "refused", str(exc))])
                raise
            name = record.name
            return _retry_stale(lambda: self._admin_action(action, parts, name, body, now))

        try:
            answer = await self._in_thread(run)
        except AuthError:
            self._admin_refused += 1
            raise
        if action == "device.revoke":
            revoked = answer[1]
            if isinstance(revoked, dict):
                self._revoked.add(revoked["revoked"])  # refused here from now on
                self._announce_counters.forget(revoked["device_id"])
                log.warning("device %s revoked: certificates %s", revoked["device_id"],
                            ", ".join(revoked["revoked"]))
        elif method == "POST":
            self._forget_rollouts()
        return answer

    def _admin_action(self, action: str, parts: list[str], actor: str, body: bytes,
                      now: float) -> tuple[int, object]:
        """In a worker thread, authorised: one admin action."""
        store = self._store
        if action == "releases":
            rollouts = {(r.product, r.version): r for r in store.rollouts()}
            return 200, {"releases": [release_view(r, rollouts.get((r.product, r.version)))
                                      for r in store.releases()]}
        if action == "rollouts":
            return 200, {"rollouts": [rollout_to_json(tick(r, now)[0])
                                      for r in store.rollouts()]}
        if action == "fleet":
            return 200, fleet_to_json(store.devices(), store.reports(), store.rollouts())
        if action == "audit":
            return 200, {"audit": [audit_to_json(e) for e in store.audit(limit=10_000)]}
        if action == "revocations":
            return 200, {"revoked": [revoked_to_json(r)
                                     for r in store.revoked_certificates()]}
        if action == "device.revoke":
            return self._revoke_device(parts[1], actor, body, now)
        if action == "create":
            product, version, plan = _parse_rollout_request(body)
            release = next((r for r in store.releases(product) if r.version == version),
                           None)
            if release is None:
                raise RequestError(f"no release {product} {version} is registered")
            rollout_id = f"{self._rng.getrandbits(64):016x}"
            state, decision = new_rollout(rollout_id, product, version,
                                          release.release_counter, plan, now)
            store.create_rollout(state, [AuditEntry(
                now, actor, "rollout.create", f"{product} {version}", "ok",
                f"{decision.detail}; plan {json.dumps(plan.to_json(), sort_keys=True)}")])
            self._maybe_prune(now)
            return 201, rollout_to_json(state)
        product, version = parts[1], parts[2]
        found = store.rollout_of(product, version)
        if found is None:
            raise _HttpError(404, f"no rollout of {product[:64]} {version[:64]}")
        state = found
        if action == "show":
            return 200, rollout_to_json(tick(state, now)[0])
        target = f"{product} {version}"
        try:
            new, decision = apply_action(state, action, now, actor)
        except ConflictError as exc:
            store.add_audit([AuditEntry(now, actor, f"rollout.{action}", target, "refused",
                                        str(exc))])
            raise
        store.save_rollout(new, (), [AuditEntry(now, actor, f"rollout.{action}", target,
                                                "ok", decision.detail)])
        self._decisions[decision.kind] = self._decisions.get(decision.kind, 0) + 1
        self._maybe_prune(now)
        return 200, rollout_to_json(new)

    def _revoke_device(self, device_id: str, actor: str, body: bytes,
                       now: float) -> tuple[int, object]:
        """In a worker thread, authorised: revoke every certificate of ``device_id``
        the tracker saw it sign a check-in or report with, and those the body gives
        (``{"reason"?, "certificates"?: [PEM, ...]}``); audited either way.

        Raises:
            RequestError: a malformed device id or body, or a certificate of another
                device (400).
            _HttpError: 404, no certificate of the device is known and none was given.
        """
        store = self._store
        try:
            if not DEVICE_ID_RE.fullmatch(device_id):
                raise RequestError(f"malformed device id {device_id[:128]!r}")
            reason, given = _parse_revoke_request(device_id, body)
            seen = store.device_certificates(device_id)
            if not seen and not given:
                known = store.device(device_id) is not None
                raise _HttpError(404, (f"no certificate of device {device_id} is known to "
                                       "the tracker" if known else
                                       f"unknown device {device_id}") +
                                 ": give its certificate file to revoke it")
        except (RequestError, _HttpError) as exc:
            store.add_audit([AuditEntry(now, actor, "device.revoke", device_id[:128],
                                        "refused", str(exc))])
            raise
        fingerprints = sorted(set(seen) | set(given))
        already = store.revoke_certificates(
            [RevokedCertificate(f, device_id, now, actor, reason) for f in fingerprints],
            [AuditEntry(now, actor, "device.revoke", device_id, "ok",
                        f"certificates sha256 {', '.join(fingerprints)}"
                        + (f"; reason: {reason}" if reason else ""))])
        self._maybe_prune(now)
        return 200, {"device_id": device_id, "revoked": fingerprints,
                     "already_revoked": sorted(already), "reason": reason}

    def _decision_audit(self, state: RolloutState, decisions: Sequence[Decision],
                        now: float) -> list[AuditEntry]:
        if decisions:
            self._maybe_prune(now)
        return [AuditEntry(now, "tracker", f"rollout.{d.kind}",
                           f"{state.product} {state.version}", "decided", d.detail)
                for d in decisions]

    def _maybe_prune(self, now: float) -> None:
        """In a worker thread: apply the audit retention at most once an hour."""
        if now - self._last_prune >= 3600:
            self._last_prune = now
            pruned = self._store.prune_audit(now - self._config.audit_retention_s)
            if pruned:
                log.info("audit retention: %d entries deleted", pruned)

    def _count_decisions(self, decisions: Sequence[Decision]) -> None:
        for decision in decisions:
            self._decisions[decision.kind] = self._decisions.get(decision.kind, 0) + 1
            # a halt needs an operator's eyes; other decisions are the plan working
            level = logging.WARNING if decision.kind == "halted" else logging.INFO
            log.log(level, "rollout decision: %s: %s", decision.kind, decision.detail)

    def _jitter(self, seconds: int) -> int:
        fraction = self._config.poll_jitter_fraction
        if not fraction or not seconds:
            return seconds
        return min(7 * 24 * 3600, max(1, round(seconds * self._rng.uniform(1 - fraction,
                                                                            1 + fraction))))

    # --- metrics ------------------------------------------------------------------------

    def _metrics(self) -> bytes:
        registry = self.registry.statistics()
        none: tuple[tuple[str, str], ...] = ()

        def counter(name: str, text: str, value: float) -> Metric:
            return Metric(f"swarmota_tracker_{name}", text, "counter", {none: value})

        return render_metrics([
            counter("checkins_total", "Check-ins answered.", self._checkins),
            counter("offers_total", "Check-ins answered with a release.", self._offers),
            counter("offers_paced_total", "Check-ins held back by an in-flight cap.",
                    self._paced),
            Metric("swarmota_tracker_reports_total", "Reports stored, by status.", "counter",
                   {(("status", STATUS_NAMES[code]),): n
                    for code, n in self._reports_by_status.items()}),
            counter("announces_total", "BitTorrent announces answered.", self._announces),
            counter("announces_refused_total",
                    "Announces answered without peers (not admitted).",
                    self._announces_refused),
            counter("scrapes_total", "BitTorrent scrapes answered.", self._scrapes),
            Metric("swarmota_tracker_rollout_decisions_total",
                   "Rollout decisions (stage-advanced, halted, operator actions).",
                   "counter", {(("kind", k),): n for k, n in self._decisions.items()}),
            counter("admin_requests_total", "Admin API requests.", self._admin_requests),
            counter("admin_refused_total", "Admin API requests refused (401/403).",
                    self._admin_refused),
            Metric("swarmota_tracker_device_auth_refused_total",
                   "Device requests refused for their identity (unsigned, invalid, "
                   "identity: another device's id, replayed, revoked).", "counter",
                   {(("reason", kind),): n for kind, n in self._auth_refused.items()}),
            counter("errors_total", "Requests answered with an error status.",
                    self._errors),
            Metric("swarmota_tracker_peers", "Peers in the swarm registry.", "gauge",
                   {(("role", "seed"),): registry.seeds,
                    (("role", "leecher"),): registry.leechers}),
        ])

    # --- BitTorrent tracker -----------------------------------------------------------

    async def answer_bittorrent(self, path: str, query: bytes,
                                client: Sequence[object] | None, *,
                                target: bytes | None = None,
                                headers: Sequence[tuple[bytes, bytes]] = ()
                                ) -> tuple[int, bytes]:
        """``(HTTP status, bencoded body)`` answering ``GET path?query`` from ``client``
        (``(host, port)`` of the connection, or ``None``), ``path`` being ``/announce``
        or ``/scrape``. ``target`` is the request target exactly as received (default:
        ``path``, then ``?query`` if there is a query) and ``headers`` the request's
        headers (lower-case names): with ``config.device_ca`` set, the request must be
        signed over them (else a ``failure reason``: outsiders learn no peers).

        The one BitTorrent decision of the tracker: the ASGI routes and the lean
        endpoint (:mod:`tracker.announce_server`) both call it, so they share the swarm
        gate, the registry, the caches and the counters. A refused request (bad query,
        unknown info-hash) is a ``failure reason`` with status 200; a storage failure
        one with status 500. Never raises on bad input.

        Raises:
            RuntimeError: ``path`` is not a BitTorrent route (a programming bug).
        """
        handler = self._bittorrent_routes.get(path)
        if handler is None:
            raise RuntimeError(f"{path!r} is not a BitTorrent route")
        try:
            auth = None
            if self._trust is not None:
                if target is None:
                    target = path.encode("ascii") + (b"?" + query if query else b"")
                await self._refresh_revoked()
                try:
                    auth = self._verify("GET", target, b"", headers, self._clock())
                except DeviceRefused as exc:
                    exc.claimed = _claimed_in_query(query) if path == "/announce" else None
                    raise
            return 200, await handler(query, client, auth)
        except DeviceRefused as exc:
            self._bittorrent_failures += 1
            self._count_refusal(exc, f"GET {path}")
            return 200, failure_answer(exc.message)
        except RequestError as exc:
            self._bittorrent_failures += 1
            return 200, failure_answer(str(exc))
        except StorageError:
            self._bittorrent_failures += 1
            self._errors += 1
            log.exception("tracker storage failed on GET %s", path)
            return 500, failure_answer("tracker storage failure")

    async def _swarms_of(self, hashes: Sequence[bytes]) -> dict[bytes, SwarmInfo]:
        """The registered swarms among ``hashes`` (cached once known)."""
        found = {h: self._known_swarms[h] for h in hashes if h in self._known_swarms}
        missing = [h for h in hashes if h not in found]
        if missing:
            def look_up() -> dict[bytes, SwarmInfo]:
                out = {}
                for h in missing:
                    swarm = self._store.swarm_of(h)
                    if swarm is not None:
                        out[h] = swarm
                return out

            fresh = await self._in_thread(look_up)
            self._known_swarms.update(fresh)
            found.update(fresh)
        return found

    async def _announce(self, query: bytes, client: Sequence[object] | None,
                        auth: Authenticated | None) -> bytes:
        request = parse_announce(query)
        trusted_seed = auth is not None and auth.is_seed
        if auth is not None:
            if trusted_seed:  # the operator's seeder: not gated, never a device
                request = dataclasses.replace(request, device_id=None)
            else:
                _bind(auth, request.device_id)
            await self._accept_announce_counter(auth)
        address = peer_address(client, request.port)
        swarm = (await self._swarms_of([request.announce_hash])).get(request.announce_hash)
        if swarm is None:
            raise RequestError(f"unknown info_hash {request.announce_hash.hex()}: no "
                               "registered release has this swarm")
        now = self._clock()
        if not trusted_seed and (request.device_id is not None or not request.is_seed):
            await self._refresh_rollout(swarm)
        cached = (True, (None, None)) if trusted_seed else self._cached_gate(swarm, request)
        if cached is not None:
            allowed, network = cached
        else:
            generation, read_at = self._rollout_generation, time.monotonic()
            allowed, network, state, admitted = await self._in_thread(
                lambda: _retry_stale(lambda: self._swarm_gate(swarm, request, now)))
            if generation == self._rollout_generation:  # else a change raced the read
                self._rollout_cache[(swarm.product, swarm.version)] = (read_at, state)
            if admitted and state is not None and request.device_id is not None:
                self._remember(self._admitted, (state.rollout_id, request.device_id))
            if request.device_id is not None:
                self._remember_network(request.device_id, *network)
        if allowed:
            result = self.registry.announce(request, address.ip, *network)
            self._announces += 1
        else:
            counts = self.registry.scrape(request.announce_hash)
            result = AnnounceResult((), counts.complete, counts.incomplete, stored=False)
            self._announces_refused += 1
        log.debug("announce %s from %s:%d (%s, left %d, device %s): %d peers handed out",
                  request.announce_hash.hex(), address.ip, address.port,
                  request.event or "update", request.left, request.device_id,
                  len(result.peers))
        return announce_answer(result.peers, complete=result.complete,
                               incomplete=result.incomplete,
                               interval_s=self._config.announce_interval_s,
                               min_interval_s=self._config.announce_min_interval_s,
                               compact=request.compact, no_peer_id=request.no_peer_id)

    async def _refresh_rollout(self, swarm: SwarmInfo) -> None:
        """Make the cached rollout of ``swarm``'s release fresh (read at most
        ``_ROLLOUT_CACHE_S`` ago). One read at a time per release: announces arriving
        while it runs wait for it instead of queueing reads of their own (single
        flight), so an expiring cache costs one SQLite read, not one per announce.
        A failed read leaves the cache stale; the caller then takes the full path."""
        key = (swarm.product, swarm.version)
        cached = self._rollout_cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < _ROLLOUT_CACHE_S:
            return
        running = self._refreshing.get(key)
        if running is not None:
            await running.wait()
            return
        done = self._refreshing[key] = trio.Event()
        try:
            generation, read_at = self._rollout_generation, time.monotonic()
            state = await self._in_thread(lambda: self._store.rollout_of(*key))
            if generation == self._rollout_generation:  # else a change raced the read
                self._rollout_cache[key] = (read_at, state)
        except StorageError:
            log.warning("reading the rollout of %s %s failed", *key, exc_info=True)
        finally:
            del self._refreshing[key]
            done.set()

    def _forget_rollouts(self) -> None:
        """This app changed a rollout: announces must read rollouts afresh, and reads
        already running must not refill the cache with what they saw before."""
        self._rollout_cache.clear()
        self._rollout_generation += 1

    def _cached_gate(self, swarm: SwarmInfo, request: AnnounceRequest
                     ) -> tuple[bool, tuple[str | None, str | None]] | None:
        """The swarm gate's answer from the caches alone, or ``None`` on a miss."""
        device_id = request.device_id
        if device_id is None and request.is_seed:
            return True, (None, None)  # the seeder (or another anonymous seed)
        cached = self._rollout_cache.get((swarm.product, swarm.version))
        if cached is None or time.monotonic() - cached[0] >= _ROLLOUT_CACHE_S:
            return None
        state = cached[1]
        if device_id is None:
            return state is not None and _open_to_all(state), (None, None)
        network = self._networks.get(device_id)
        if network is None:
            return None
        if state is None or state.phase in ("aborted", "revoked"):
            return False, network
        if (state.rollout_id, device_id) in self._admitted:
            return True, network
        return None

    def _swarm_gate(self, swarm: SwarmInfo, request: AnnounceRequest, now: float
                    ) -> tuple[bool, tuple[str | None, str | None], RolloutState | None,
                               bool]:
        """In a worker thread: may this announce join the swarm (the swarm follows the
        rollout); the device's network and region (for LAN-first hand-out), the
        release's rollout, and whether the device is admitted and past "offered"."""
        store = self._store
        device_id = request.device_id
        state = store.rollout_of(swarm.product, swarm.version)
        if device_id is None:
            allowed = request.is_seed or (state is not None and _open_to_all(state))
            return allowed, (None, None), state, False
        network = self._networks.get(device_id)
        if network is None:
            record = store.device(device_id)
            network = (None, None) if record is None else (record.network_id, record.region)
        if state is None or state.phase in ("aborted", "revoked"):
            return False, network, state, False
        admission = store.admission(state.rollout_id, device_id)
        if admission is None:
            return False, network, state, False
        if not request.is_seed and admission.status == "offered":
            state, admission = mark_downloading(state, admission, now)
            store.save_rollout(state, [admission])
        return True, network, state, admission.status != "offered"

    def _remember_network(self, device_id: str, network_id: str | None,
                          region: str | None) -> None:
        """Cache what a device declared (bounded: the oldest entries go first)."""
        self._networks[device_id] = (network_id, region)
        self._remember(self._networks, device_id)

    def _remember(self, cache: OrderedDict[Any, Any], key: Any) -> None:
        if key not in cache:
            cache[key] = None
        cache.move_to_end(key)
        while len(cache) > self._config.max_peers_total:
            cache.popitem(last=False)

    async def _scrape(self, query: bytes, client: Sequence[object] | None,
                      auth: Authenticated | None) -> bytes:
        request = parse_scrape(query)
        if auth is not None:
            await self._accept_announce_counter(auth)
        known = await self._swarms_of(request.announce_hashes)
        files: dict[bytes, ScrapeCounts] = {
            h: self.registry.scrape(h) for h in request.announce_hashes if h in known}
        self._scrapes += 1
        return scrape_answer(files)

    # --- plumbing ---------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[[], _T]) -> _T:
        """Run a blocking store call in a worker thread, one at a time."""
        return await trio.to_thread.run_sync(fn, limiter=self._db_limiter)

    def _check_content_length(self, scope: Scope) -> None:
        limit = self._config.max_body_bytes
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _HttpError(400, "invalid content-length header") from None
                if length > limit:
                    raise _HttpError(413, f"request body of {length} bytes is over the "
                                          f"limit of {limit} bytes")

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole request body, refusing (413) as soon as it exceeds the limit."""
        limit = self._config.max_body_bytes
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > limit:
                raise _HttpError(413, f"request body is over the limit of {limit} bytes")
            body += chunk
            if not message.get("more_body", False):
                return bytes(body)


_ADMIN_MAX_BODY_BYTES = 1024 * 1024
_ANNOUNCE_COUNTER_DEVICES = 100_000
"""Devices whose highest announce/scrape counter is kept in memory (about 100 bytes
each); one that falls out is seeded again from its stored check-in/report counter."""
_ROLLOUT_CACHE_S = 1.0
"""How long announces trust a cached rollout phase that this app did not change (e.g. a
rollout created by ``tracker release add`` in another process)."""


_STALE_RETRIES = 10


def _retry_stale(fn: Callable[[], _T]) -> _T:
    """``fn()``, run again (it reads afresh) when the rollout it saves changed since it
    read it, e.g. through another tracker process on the same database.

    Raises:
        StaleStateError: still stale after ``_STALE_RETRIES`` attempts.
    """
    for attempt in range(_STALE_RETRIES):
        try:
            return fn()
        except StaleStateError:
            if attempt == _STALE_RETRIES - 1:
                raise
            log.info("rollout changed meanwhile; reading it again")
    raise RuntimeError("unreachable")


def _admin_route(method: str, parts: list[str]) -> tuple[str, str]:
    """``(role needed, action)`` of an admin path split after ``/v1/admin/``.

    Raises:
        _HttpError: 404 for an unknown path, 405 for a wrong method.
    """
    reads = {"releases": "viewer", "rollouts": "viewer", "fleet": "viewer",
             "audit": "admin", "revocations": ACTION_ROLES["revocations"]}
    if len(parts) == 1 and parts[0] in reads:
        if parts[0] == "rollouts" and method == "POST":
            return "operator", "create"
        _expect(method, "GET" if parts[0] != "rollouts" else "GET, POST")
        return reads[parts[0]], parts[0]
    if len(parts) == 3 and parts[0] == "rollouts":
        _expect(method, "GET")
        return "viewer", "show"
    if len(parts) == 4 and parts[0] == "rollouts" and parts[3] in ROLLOUT_ACTIONS:
        _expect(method, "POST")
        return ACTION_ROLES[parts[3]], parts[3]
    if len(parts) == 3 and parts[0] == "devices" and parts[2] == "revoke":
        _expect(method, "POST")
        return ACTION_ROLES["device.revoke"], "device.revoke"
    raise _HttpError(404, f"no such admin endpoint {'/'.join(parts)[:200]!r}")


def _expect(method: str, allowed: str) -> None:
    if method not in allowed.split(", "):
        raise _HttpError(405, f"this endpoint only accepts {allowed}",
                         ((b"allow", allowed.encode("ascii")),))


def _parse_rollout_request(body: bytes) -> tuple[str, str, RolloutPlan]:
    """``{"product", "version", "plan"?}``; ``plan`` is an object (see
    :class:`~tracker.rollout.RolloutPlan`, missing keys take defaults) or ``"everyone"``.

    Raises:
        RequestError: not such a JSON object.
    """
    if len(body) > _ADMIN_MAX_BODY_BYTES:
        raise RequestError("rollout: body too large")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(f"rollout: body is not valid UTF-8 JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict) or not set(obj) <= {"product", "version", "plan"}:
        raise RequestError("rollout: expected an object with product, version and "
                           "optionally plan")
    product, version = obj.get("product"), obj.get("version")
    if not isinstance(product, str) or not isinstance(version, str):
        raise RequestError("rollout: product and version must be strings")
    raw_plan: Any = obj.get("plan", {})
    plan = RolloutPlan.everyone() if raw_plan == "everyone" else RolloutPlan.from_json(raw_plan)
    return product, version, plan


_MAX_REVOKE_CERTIFICATES = 64
_MAX_REASON_CHARS = 500


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


def _target_of(scope: Scope) -> bytes:
    """The request target as received: the raw path, then ``?`` and the raw query if
    there is one (what a device signs)."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    query = scope.get("query_string", b"")
    return bytes(raw) + b"?" + bytes(query) if query else bytes(raw)


def _bind(auth: Authenticated | None, device_id: str | None) -> None:
    """The device id a signed request names must be its certificate's.

    Raises:
        DeviceRefused: ``identity``, naming both.
    """
    if auth is not None and device_id != auth.device_id:
        named = "no device_id" if device_id is None else f"device_id {device_id[:128]!r}"
        raise DeviceRefused("identity", f"request names {named}, but is signed by "
                                        f"{auth.device_id!r}", device_id)


def _claimed_in_body(body: bytes) -> str | None:
    """The ``device_id`` a JSON body claims, if it is readable (for the log only)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    claimed = obj.get("device_id") if isinstance(obj, dict) else None
    return claimed if isinstance(claimed, str) else None


def _claimed_in_query(query: bytes) -> str | None:
    """The ``device_id`` an announce query claims, if it parses (for the log only)."""
    try:
        return parse_announce(query).device_id
    except RequestError:
        return None


def _open_to_all(state: RolloutState) -> bool:
    """Whether every device of the product may take the release now."""
    if state.phase == "forced":
        return True
    return (state.phase == "active" and not state.plan.has_canaries
            and state.plan.stages_percent == (100.0,))


def _log_checkin(checkin: CheckIn, offer: Release | None) -> None:
    if offer is None:
        log.debug("check-in %s (%s %s): up to date", checkin.device_id, checkin.product,
                  checkin.version)
    else:
        log.info("check-in %s (%s %s): offered %s", checkin.device_id, checkin.product,
                 checkin.version, offer.version)


async def _send_json(send: Send, status: int, obj: object,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await _send_bytes(send, status, encode_json(obj), b"application/json", headers)


async def _send_bytes(send: Send, status: int, body: bytes, content_type: bytes,
                      headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})
