"""The rollout director: the tracker's one domain object.

Every front end is a thin adapter over a :class:`Director`: the ASGI app
(:mod:`tracker.app`) for the device and admin APIs, and the BitTorrent API
(:mod:`tracker.bt_api`) that both the ASGI app and the lean announce endpoint
(:mod:`tracker.announce_server`) call. The director owns

- the store (:class:`~tracker.store.Store`), reached only through :meth:`Director.run`:
  a worker thread, one call at a time, so the event loop never blocks on SQLite and
  concurrent requests apply in some order to one final state;
- the in-memory caches of the hot paths (known swarms, the swarm gate's rollouts and
  admitted devices, the networks devices declared), bounded;
- one :class:`~tracker.metrics.Counters` object: ``statistics()`` and ``/metrics``
  read it;
- the injected clocks (``clock``: epoch seconds for everything stored; ``monotonic``:
  cache ages) and random source (poll jitter);
- the device identity gate (:class:`~tracker.identity.DeviceGate`), when the config
  names a fleet CA.

Each decision is one store transaction around a pure function: a check-in
(:func:`tracker.offers.choose_offer`), a report (:func:`tracker.rollout.on_report` and
:func:`~tracker.rollout.tick`), the swarm gate (:func:`~tracker.rollout.admit`'s
records), an admin action (:mod:`tracker.admin`). A decision that meets a rollout
saved meanwhile by another process (:class:`~tracker.errors.StaleStateError`) is
rolled back whole and taken again on a fresh read.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import outcome
import trio

from swarmota.infra.deviceauth import ANNOUNCE_KEY_BYTES, AnnounceKey, AnnounceKeys, Authenticated
from swarmota.infra.worker import BatchWorker
from swarmota.tracker.bittorrent import (
    AnnounceRequest,
    PeerAddress,
    ScrapeCounts,
    ScrapeRequest,
    SwarmInfo,
)
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.errors import StaleStateError, StorageError, UnknownSwarmError
from swarmota.tracker.identity import (
    DeviceGate,
    DeviceRefused,
    bind,
    load_fleet_trust,
    replay_refusal,
)
from swarmota.tracker.metrics import Counters, Metric, TrackerStatistics, render_statistics
from swarmota.tracker.offers import Candidate, OfferChoice, choose_offer
from swarmota.tracker.protocol import Release
from swarmota.tracker.proxies import TrustedProxies
from swarmota.tracker.registry import AnnounceResult, SwarmRegistry
from swarmota.tracker.release_trust import ReleaseVerifier
from swarmota.tracker.rollout import (
    Decision,
    RolloutState,
    mark_downloading,
    on_report,
    open_to_all,
    tick,
)
from swarmota.tracker.store import AuditEntry, Store
from swarmota.tracker.wire import (
    MAX_POLL_AFTER_S,
    MIN_POLL_AFTER_S,
    STATUS_NAMES,
    AnnounceKeyGrant,
    CheckIn,
    Report,
    StatusCode,
    announce_key_to_json,
    offer_to_json,
)

if TYPE_CHECKING:
    from swarmota.tracker.redis_state import RedisState

__all__ = ["CheckinAnswer", "Director", "retry_stale"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

ROLLOUT_CACHE_S = 1.0
"""How long announces trust a cached rollout phase that this director did not change
(e.g. one changed by another tracker process on the same database)."""
_STALE_RETRIES = 10
ANNOUNCE_KEY_SECRET = "announce-key-v1"
"""The name of the server secret announce keys derive from (``Store.secret``)."""
_PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class CheckinAnswer:
    """What a check-in is answered: the release offered (or ``None``), when to come
    back, whether an in-flight cap held the device back, and the device's announce
    key (signed check-ins of devices)."""

    offer: Release | None
    poll_after_s: int
    paced: bool
    announce_key: AnnounceKeyGrant | None = None

    def to_json(self) -> dict[str, Any]:
        offer = self.offer
        answer: dict[str, Any] = {"release": None if offer is None else offer_to_json(
                                      offer.product, offer.version, offer.release_counter),
                                  "poll_after_s": self.poll_after_s}
        if self.announce_key is not None:
            answer["announce_key"] = announce_key_to_json(self.announce_key)
        return answer


class Director:
    """The tracker's decisions over ``store`` (see the module docstring).

    ``registry`` holds BitTorrent peers (default: a new one from ``config``, on
    ``monotonic``); ``rng`` draws the jitter of ``poll_after_s``; ``releases`` verifies
    releases registered through the admin API against the repository's signed
    metadata (``None``: the API registers none). ``shared`` (Redis,
    :class:`~tracker.redis_state.RedisState`): the peers and announce replay windows
    that every tracker process shares, instead of ``registry`` and this process's
    windows (for several processes; ``None``, the default: in memory). With a fleet
    CA, the announce keys' server secret is read from ``store`` (made by the first
    process) here, once.

    Raises:
        ConfigError: ``config.device_ca`` cannot be read or holds no CA certificate, or
            a trusted proxy block does not parse.
        StorageError: the announce keys' secret could not be read or stored.
    """

    def __init__(self, store: Store, config: TrackerConfig, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 registry: SwarmRegistry | None = None,
                 releases: ReleaseVerifier | None = None,
                 shared: RedisState | None = None) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self.rng = rng if rng is not None else random.Random()
        self.counters = Counters()
        self.releases = releases
        self.shared = shared
        self.proxies = TrustedProxies(config.trusted_proxies)
        self.registry = registry if registry is not None else SwarmRegistry(
            interval_s=config.announce_interval_s,
            max_peers_per_swarm=config.max_peers_per_swarm,
            max_peers_total=config.max_peers_total, clock=monotonic)
        self.gate = None if config.device_ca is None else DeviceGate(
            load_fleet_trust(config.device_ca), store, self.run, clock=clock,
            monotonic=monotonic, revocation_refresh_s=config.revocation_refresh_s,
            max_certificates_seen=config.max_peers_total,
            on_refused=lambda kind: self.counters.add("device_auth_refused_by", label=kind),
            shared=shared, announce_keys=self._announce_keys(store, config, clock))
        self._worker: BatchWorker[Callable[[], Any]] = BatchWorker("tracker-store",
                                                                   self._run_batch)
        self._known_swarms: dict[bytes, list[SwarmInfo]] = {}
        self._networks: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        # The swarm gate's caches (announces are frequent): rollouts by release, for
        # ROLLOUT_CACHE_S or until this director changes one; and the devices known
        # admitted and past "offered" (admission never ends by itself).
        self._rollout_cache: dict[tuple[str, str], tuple[float, RolloutState | None]] = {}
        self._admitted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._refreshing: dict[tuple[str, str], trio.Event] = {}
        self._rollout_generation = 0  # bumped when this director changes a rollout
        self._last_prune = -float("inf")

    @staticmethod
    def _announce_keys(store: Store, config: TrackerConfig,
                       clock: Callable[[], float]) -> AnnounceKeys | None:
        if not config.announce_key_lifetime_s:
            return None
        secret = store.secret(ANNOUNCE_KEY_SECRET, lambda: os.urandom(ANNOUNCE_KEY_BYTES),
                              clock())
        return AnnounceKeys(secret, config.announce_key_lifetime_s)

    # --- plumbing -------------------------------------------------------------------------

    async def run(self, fn: Callable[[], _T]) -> _T:
        """Run a blocking store call in the worker thread, one at a time (calls queued
        together share one transaction, each its own savepoint: group commit)."""
        result: _T = await self._worker.submit(fn)
        return result

    def _run_batch(self, calls: Sequence[Callable[[], Any]]) -> list[outcome.Outcome[Any]]:
        """In the worker thread: ``calls`` queued together, in one store batch."""
        if len(calls) == 1:
            return [outcome.capture(calls[0])]
        try:
            with self.store.batch("decisions"):
                results = [outcome.capture(call) for call in calls]
        except StorageError as exc:  # the batch's commit failed: nothing of it was kept
            return [outcome.Error(StorageError(str(exc))) for _ in calls]
        return results

    def statistics(self) -> TrackerStatistics:
        """A snapshot of the counters."""
        return self.counters.snapshot()

    def metrics(self) -> bytes:
        """The ``/metrics`` body: every counter, and the peer registry's gauges."""
        registry = (self.registry if self.shared is None else self.shared).statistics()
        return render_statistics(self.statistics(), [
            Metric("swarmota_tracker_peers", "Peers in the swarm registry.", "gauge",
                   {(("role", "seed"),): registry.seeds,
                    (("role", "leecher"),): registry.leechers})])

    def decided(self, decisions: Sequence[Decision]) -> None:
        """Rollout decisions were saved: count and log them, and make announces read
        rollouts afresh."""
        for decision in decisions:
            self.counters.add("decisions", label=decision.kind)
            # a halt needs an operator's eyes; other decisions are the plan working
            level = logging.WARNING if decision.kind == "halted" else logging.INFO
            log.log(level, "rollout decision: %s: %s", decision.kind, _loggable(decision.detail))
        if decisions:
            self.rollouts_changed()

    def rollouts_changed(self) -> None:
        """This director changed a rollout: announces must read rollouts afresh, and
        reads already running must not refill the cache with what they saw before."""
        self._rollout_cache.clear()
        self._rollout_generation += 1

    def audit_of(self, state: RolloutState, decisions: Sequence[Decision],
                 now: float) -> list[AuditEntry]:
        """In the worker thread: the audit entries of the tracker's own decisions (and
        the retention, at most hourly)."""
        if decisions:
            self.maybe_prune(now)
        return [AuditEntry(now, "tracker", f"rollout.{d.kind}",
                           f"{state.product} {state.version}", "decided", d.detail)
                for d in decisions]

    def maybe_prune(self, now: float) -> None:
        """In the worker thread: apply the audit and report retention at most hourly."""
        if now - self._last_prune < _PRUNE_EVERY_S:
            return
        self._last_prune = now
        audit = self.store.prune_audit(now - self.config.audit_retention_s)
        reports = self.store.prune_reports(now - self.config.report_retention_s)
        if audit or reports:
            log.info("retention: %d audit entries and %d reports deleted", audit, reports)

    # --- device identity ------------------------------------------------------------------

    async def authenticate(self, method: str, target: bytes, body: bytes,
                           headers: Sequence[tuple[bytes, bytes]],
                           claimed: Callable[[], str | None], *,
                           announce: bool = False) -> Authenticated | None:
        """Who signed a device request (``None`` in lab mode). ``claimed`` tells which
        device the request names, for the log of a refusal; ``announce``: an announce
        or scrape, which an announce key's MAC may authenticate.

        Raises:
            DeviceRefused: not signed, not verifying, or revoked.
            StorageError: the revoked certificates could not be read.
        """
        if self.gate is None:
            return None
        try:
            auth = await self.gate.verify(method, target, body, headers,
                                          announce=announce)
        except DeviceRefused as exc:
            exc.claimed = claimed()
            raise
        if auth.by_key:
            self.counters.add("announce_key_auths")
        return auth

    def refused(self, exc: DeviceRefused, what: str) -> None:
        """Count and (bounded) log a refused device request."""
        if self.gate is None:
            raise RuntimeError("a refusal in lab mode")
        self.gate.refused(exc, what)

    # --- check-ins ------------------------------------------------------------------------

    async def checkin(self, checkin: CheckIn, auth: Authenticated | None) -> CheckinAnswer:
        """Record a check-in and decide what to offer.

        Raises:
            DeviceRefused: ``identity`` (the body names another device than the
                signature) or ``replayed``; nothing is stored.
            StorageError: the database failed.
        """
        bind(auth, checkin.device_id)
        now = self.clock()
        choice = await self.run(lambda: retry_stale(
            lambda: self._decide_checkin(checkin, auth, now)))
        if self.gate is not None:
            await self.gate.accepted(auth)
        self.decided(choice.decisions)
        self._remember_network(checkin.device_id, checkin.network_id, checkin.region)
        self.counters.add("checkins")
        if choice.offer is not None:
            self.counters.add("offers")
            log.info("check-in %s (%s %s): offered %s", checkin.device_id, checkin.product,
                     checkin.version, choice.offer.version)
        else:
            log.debug("check-in %s (%s %s): nothing offered", checkin.device_id,
                      checkin.product, checkin.version)
        if choice.paced:
            self.counters.add("paced")
        base = self.config.poll_after_s
        if choice.paced:
            base = min(base, self.config.paced_poll_after_s)
        key = None if self.gate is None else self.gate.issue_announce_key(auth, now)
        return CheckinAnswer(choice.offer, self._jitter(base), choice.paced,
                             None if key is None else _grant(key, now))

    def _decide_checkin(self, checkin: CheckIn, auth: Authenticated | None,
                        now: float) -> OfferChoice:
        """In the worker thread, one transaction: accept the request's counter (if
        signed), record the check-in, read every newer release's rollout state and
        decide (:func:`choose_offer`), save what changed."""
        store = self.store
        with store.atomic("check-in"):
            read = store.check_in(checkin, now,
                                  counter=None if auth is None else auth.counter,
                                  cert_sha256=None if auth is None else auth.cert_sha256)
            if auth is not None and read.replay_floor is not None:
                raise replay_refusal(auth.counter, read.replay_floor, auth.device_id)
            candidates = []
            for release, state, admission in read.candidates:
                in_flight = None
                if state is not None and admission is None and state.plan.max_in_flight:
                    in_flight = store.in_flight(
                        state.rollout_id, now - state.plan.in_flight_timeout_s)
                candidates.append(Candidate(release, state, admission, in_flight))
            groups: tuple[str, ...] = checkin.labels
            if any(c.rollout is not None and c.rollout.plan.canary_label is not None
                   for c in candidates):
                tags = read.tags
                if tags is None:
                    device = store.device(checkin.device_id)
                    tags = () if device is None else device.tags
                groups += tags
            choice = choose_offer(candidates, checkin.device_id, groups, now)
            for change in choice.changes:
                store.save_rollout(change.after, change.admissions,
                                   self.audit_of(change.before, change.decisions, now))
        return choice

    def _jitter(self, seconds: int) -> int:
        """``seconds`` +- the configured jitter, never below the wire's minimum."""
        fraction = self.config.poll_jitter_fraction
        drawn = seconds * self.rng.uniform(1 - fraction, 1 + fraction) if fraction \
            else seconds
        return min(MAX_POLL_AFTER_S, max(MIN_POLL_AFTER_S, round(drawn)))

    # --- time ----------------------------------------------------------------------------

    async def tick_rollouts(self) -> list[Decision]:
        """Let time act on every scheduled or active rollout (start, advance a soaked
        stage, complete), even when no device of the product checks in: the server
        calls it every ``config.rollout_tick_s``. Returns the decisions taken."""
        now = self.clock()

        def tick_all() -> list[Decision]:
            decided: list[Decision] = []
            with self.store.atomic("tick rollouts"):
                for state in self.store.rollouts():
                    if state.phase not in ("scheduled", "active"):
                        continue
                    ticked, decisions = tick(state, now)
                    if decisions:
                        self.store.save_rollout(ticked, (),
                                                self.audit_of(state, decisions, now))
                        decided += decisions
            return decided

        decisions = await self.run(lambda: retry_stale(tick_all))
        self.decided(decisions)
        return decisions

    async def run_ticker(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """:meth:`tick_rollouts` every ``config.rollout_tick_s`` until cancelled; a
        storage failure is logged and tried again at the next tick."""
        task_status.started()
        while True:
            await trio.sleep(self.config.rollout_tick_s)
            try:
                await self.tick_rollouts()
            except StorageError:
                log.warning("ticking the rollouts failed; trying again in %g s",
                            self.config.rollout_tick_s, exc_info=True)

    # --- reports --------------------------------------------------------------------------

    async def report(self, report: Report, auth: Authenticated | None) -> int:
        """Store a report (once: a resent one with the same ``report_id`` is not stored
        again); the inventory follows it; count it in the rollout that admitted the
        device (may halt it). Returns the stored report's id.

        Raises:
            DeviceRefused: ``identity`` or ``replayed``; nothing is stored.
            StorageError: the database failed.
        """
        bind(auth, report.device_id)
        now = self.clock()
        report_id, new, decisions = await self.run(lambda: retry_stale(
            lambda: self._record_report(report, auth, now)))
        if self.gate is not None:
            await self.gate.accepted(auth)
        if not new:
            self.counters.add("duplicate_reports")
            log.info("report %d from %s received again (report id %s): not counted",
                     report_id, report.device_id, report.report_id)
            return report_id
        self.decided(decisions)
        self.counters.add("reports_by_status", label=STATUS_NAMES[report.status])
        log.log(logging.INFO if report.status == StatusCode.OK else logging.WARNING,
                "report %d from %s: %s %s -> %s status %d %s%s", report_id,
                report.device_id, report.product, report.from_version, report.to_version,
                report.status, STATUS_NAMES[report.status],
                f": {report.message[:200]!r}" if report.message else "")
        return report_id

    def _record_report(self, report: Report, auth: Authenticated | None,
                       now: float) -> tuple[int, bool, list[Decision]]:
        """In the worker thread, one transaction: accept the request's counter (if
        signed), store the report, move the inventory, count it in the rollout that
        admitted the device (reports of devices not admitted are stored, not counted)."""
        store = self.store
        with store.atomic("report"):
            if self.gate is not None:
                self.gate.advance_counter(auth, now)
            report_id, new = store.add_report(report, now)
            if not new:
                return report_id, False, []
            release = store.release(report.product, report.to_version)
            if release is not None and report.status == StatusCode.OK:
                store.record_installed(report.device_id, release, now)
            state, admission = store.rollout_with_admission(
                report.product, report.to_version, report.device_id)
            if state is None:
                return report_id, True, []
            if admission is None:
                log.warning("report %d: %s was not admitted to the rollout of %s %s; not "
                            "counted", report_id, report.device_id, report.product,
                            report.to_version)
                return report_id, True, []
            counted, admission, decisions = on_report(
                state, admission, report.status, now, bytes_origin=report.bytes_origin,
                bytes_peers=report.bytes_peers, message=report.message)
            counted, more = tick(counted, now)
            decisions += more
            store.save_rollout(counted, [admission], self.audit_of(state, decisions, now))
        return report_id, True, decisions

    # --- the swarms ------------------------------------------------------------------------

    async def announce(self, request: AnnounceRequest, address: PeerAddress,
                       auth: Authenticated | None) -> AnnounceResult:
        """Record an announce and choose its peers; the swarm follows the rollout: a
        device gets peers only if admitted to (one of) the swarm's release(s), an
        anonymous seed (the seeder, or in lab mode anyone seeding) always, an anonymous
        leecher only while a release is open to every device.

        Raises:
            DeviceRefused: ``identity`` or ``replayed``.
            UnknownSwarmError: the info-hash is not a registered release's swarm.
            StorageError: the database failed.
        """
        trusted_seed = auth is not None and auth.is_seed
        if auth is not None:
            if trusted_seed:  # the operator's seeder: not gated, never a device
                request = replace(request, device_id=None)
            else:
                bind(auth, request.device_id)
            if self.gate is not None:
                await self.gate.accept_announce(auth)
        found = self._known_swarms.get(request.announce_hash)  # the common case, at once
        if found is None:
            found = (await self._swarms_of([request.announce_hash])).get(
                request.announce_hash)
        if not found:
            raise UnknownSwarmError(f"unknown info_hash {request.announce_hash.hex()}: no "
                                    "registered release has this swarm")
        allowed = True
        network: tuple[str | None, str | None] = (None, None)
        if not trusted_seed:
            allowed = False
            for swarm in found:  # a payload may serve several releases
                one, network = await self._gate(swarm, request)
                if one:
                    allowed = True
                    break
        if allowed:
            if self.shared is None:
                result = self.registry.announce(request, address.ip, *network)
            else:
                result = await self.shared.announce(request, address.ip, *network)
            self.counters.add("announces")
        else:
            counts = await self._scrape_one(request.announce_hash)
            result = AnnounceResult((), counts.complete, counts.incomplete, stored=False)
            self.counters.add("announces_refused")
        if log.isEnabledFor(logging.DEBUG):  # the hot path: no arguments built for nothing
            log.debug("announce %s from %s:%d (%s, left %d, device %s): %d peers handed "
                      "out", request.announce_hash.hex(), address.ip, address.port,
                      request.event or "update", request.left, request.device_id,
                      len(result.peers))
        return result

    async def scrape(self, request: ScrapeRequest,
                     auth: Authenticated | None) -> dict[bytes, ScrapeCounts]:
        """BEP 48 counters of the registered swarms among those asked about.

        Raises:
            DeviceRefused: ``replayed``.
            StorageError: the database failed.
        """
        if auth is not None and self.gate is not None:
            await self.gate.accept_announce(auth)
        known = await self._swarms_of(request.announce_hashes)
        self.counters.add("scrapes")
        return {h: await self._scrape_one(h) for h in request.announce_hashes if known.get(h)}

    async def _scrape_one(self, announce_hash: bytes) -> ScrapeCounts:
        if self.shared is None:
            return self.registry.scrape(announce_hash)
        return await self.shared.scrape(announce_hash)

    async def _swarms_of(self, hashes: Sequence[bytes]) -> dict[bytes, list[SwarmInfo]]:
        """The registered swarms of ``hashes`` (cached once known; unknown hashes are
        looked up each time)."""
        found = {h: self._known_swarms[h] for h in hashes if h in self._known_swarms}
        missing = [h for h in hashes if h not in found]
        if missing:
            fresh = await self.run(
                lambda: {h: swarms for h in missing if (swarms := self.store.swarms_of(h))})
            self._known_swarms.update(fresh)
            found.update(fresh)
        return found

    def forget_swarms(self) -> None:
        """A release was registered here: swarms may serve more releases now."""
        self._known_swarms.clear()

    async def _gate(self, swarm: SwarmInfo, request: AnnounceRequest
                    ) -> tuple[bool, tuple[str | None, str | None]]:
        """May this announce join ``swarm`` (its release's rollout decides), and the
        device's network and region (for LAN-first hand-out)."""
        cached = self._cached_gate(swarm, request)  # fresh caches: no await at all
        if cached is not None:
            return cached
        if request.device_id is not None or not request.is_seed:
            await self._refresh_rollout(swarm)
            cached = self._cached_gate(swarm, request)
            if cached is not None:
                return cached
        now = self.clock()
        generation, read_at = self._rollout_generation, self.monotonic()
        allowed, network, state, admitted = await self.run(
            lambda: retry_stale(lambda: self._swarm_gate(swarm, request, now)))
        if generation == self._rollout_generation:  # else a change raced the read
            self._rollout_cache[(swarm.product, swarm.version)] = (read_at, state)
        if admitted and state is not None and request.device_id is not None:
            self._remember(self._admitted, (state.rollout_id, request.device_id))
        if request.device_id is not None:
            self._remember_network(request.device_id, *network)
        return allowed, network

    async def _refresh_rollout(self, swarm: SwarmInfo) -> None:
        """Make the cached rollout of ``swarm``'s release fresh (read at most
        :data:`ROLLOUT_CACHE_S` ago). One read at a time per release: announces
        arriving while it runs wait for it instead of queueing reads of their own
        (single flight). A failed read leaves the cache stale; the caller then takes
        the full path."""
        key = (swarm.product, swarm.version)
        cached = self._rollout_cache.get(key)
        if cached is not None and self.monotonic() - cached[0] < ROLLOUT_CACHE_S:
            return
        running = self._refreshing.get(key)
        if running is not None:
            await running.wait()
            return
        done = self._refreshing[key] = trio.Event()
        try:
            generation, read_at = self._rollout_generation, self.monotonic()
            state = await self.run(lambda: self.store.rollout_of(*key))
            if generation == self._rollout_generation:  # else a change raced the read
                self._rollout_cache[key] = (read_at, state)
        except StorageError:
            log.warning("reading the rollout of %s %s failed", *key, exc_info=True)
        finally:
            del self._refreshing[key]
            done.set()

    def _cached_gate(self, swarm: SwarmInfo, request: AnnounceRequest
                     ) -> tuple[bool, tuple[str | None, str | None]] | None:
        """The swarm gate's answer from the caches alone, or ``None`` on a miss."""
        device_id = request.device_id
        if device_id is None and request.is_seed:
            return True, (None, None)  # the seeder (or another anonymous seed)
        cached = self._rollout_cache.get((swarm.product, swarm.version))
        if cached is None or self.monotonic() - cached[0] >= ROLLOUT_CACHE_S:
            return None
        state = cached[1]
        if device_id is None:
            return state is not None and open_to_all(state), (None, None)
        network = self._networks.get(device_id)
        if network is None:
            return None
        if state is None or state.phase in ("aborted", "revoked", "scheduled"):
            return False, network
        if (state.rollout_id, device_id) in self._admitted:
            return True, network
        return None

    def _swarm_gate(self, swarm: SwarmInfo, request: AnnounceRequest, now: float
                    ) -> tuple[bool, tuple[str | None, str | None], RolloutState | None,
                               bool]:
        """In the worker thread: may this announce join the swarm; the device's network
        and region; the release's rollout; whether the device is admitted and past
        "offered" (a device's first announce marks it downloading)."""
        store = self.store
        device_id = request.device_id
        with store.atomic("swarm gate"):
            if device_id is None:
                state = store.rollout_of(swarm.product, swarm.version)
                allowed = request.is_seed or (state is not None and open_to_all(state))
                return allowed, (None, None), state, False
            state, admission = store.rollout_with_admission(swarm.product, swarm.version,
                                                            device_id)
            network = self._networks.get(device_id)
            if network is None:
                record = store.device(device_id)
                network = ((None, None) if record is None
                           else (record.network_id, record.region))
            if state is None or state.phase in ("aborted", "revoked", "scheduled"):
                return False, network, state, False
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
        while len(cache) > self.config.max_peers_total:
            cache.popitem(last=False)


def _loggable(text: str) -> str:
    """``text`` with control characters escaped: a halt reason quotes what devices
    said, and a log line must not carry their terminal escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _grant(key: AnnounceKey, now: float) -> AnnounceKeyGrant:
    return AnnounceKeyGrant(key.key, key.expires, max(0, key.expires - int(now)))


def retry_stale(fn: Callable[[], _T]) -> _T:
    """``fn()``, run again (it reads afresh, in a new transaction) when a rollout it
    saves changed since it read it, e.g. through another tracker process.

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
