"""Device identity on the tracker: the fleet CA trust, refusals, announce counters.

With ``TrackerConfig.device_ca`` set, every device request (check-in, report, announce,
scrape) must be signed by a fleet identity (:mod:`infra.deviceauth`); the app verifies
it with the :class:`~infra.deviceauth.FleetTrust` loaded here, binds the body's or
query's device id to the certificate's, and refuses replays by the signature counter:

- check-ins and reports against the last counter stored in SQLite (one compare-and-set
  statement, :meth:`tracker.store.Store.advance_counter`; safe with several tracker
  processes on one database);
- announces and scrapes (every peer, every interval: too frequent for a write each)
  against the in-memory :class:`CounterWindow` only, seeded from the stored counter
  when a device is not in it. The trade-off: an announce or scrape signed after the
  device's last check-in or report can be replayed once to *another* tracker process,
  or to this one after a restart or after the device fell out of the window. What that
  buys an attacker who captured it: the peer list that device would get, and a swarm
  entry at the attacker's own address until it expires (entries are keyed by the
  connection's address, so a replay cannot touch the device's own entry); integrity
  is never at stake (pieces are verified against the signed manifest).

Announces and scrapes may instead carry an announce key's MAC
(:class:`~infra.deviceauth.AnnounceKeys`): the key is handed out in the answer to a
signed check-in, derived from one server secret every process reads from the store at
start (``Store.secret``), so verifying it needs no lookup; it names its certificate, so
the revoked set below refuses it like a signature, and its counter goes through the
same replay window. A MAC on a check-in or report is refused (``key``).

A certificate the operator revoked (``POST /v1/admin/devices/<id>/revoke``, the
``revoked_certificates`` table) is refused on every device request, by its fingerprint
(hex SHA-256 of its DER). The check must cost nothing on the announce path, so each
process keeps the revoked fingerprints in memory (:class:`RevokedSet`) and reads them
again from SQLite when its copy is older than ``TrackerConfig.revocation_refresh_s``
(and adds its own revocations at once): several tracker processes on one database
refuse a revoked certificate at most that long after any of them revoked it.

Refusals are :class:`DeviceRefused`, with a ``kind`` (:data:`REFUSAL_KINDS`) for the
``/metrics`` label and a message safe to send back.

:class:`DeviceGate` puts these together for the director: it verifies a request's
identity headers, keeps the revoked set fresh (one read at a time), checks announce
counters against the window and records the certificates devices announce with. Its
store calls go through the runner the director gives it (a worker thread, one at a
time); everything else here is pure except :func:`load_fleet_trust`, which reads one
file.
"""

from __future__ import annotations

import datetime
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

import trio

from swarmota.infra.deviceauth import (
    ANNOUNCE_AUTH_HEADER,
    CERT_HEADER,
    SIGNATURE_HEADER,
    AnnounceKey,
    AnnounceKeys,
    Authenticated,
    DeviceAuthError,
    FleetTrust,
    find_header,
)
from swarmota.tracker.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from swarmota.tracker.redis_state import RedisState
    from swarmota.tracker.store import Store

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Runner(Protocol):
    """Runs a blocking store call off the event loop (the director's worker thread)."""

    def __call__(self, fn: Callable[[], _T], /) -> Awaitable[_T]: ...

__all__ = [
    "REFUSAL_KINDS",
    "CounterWindow",
    "Runner",
    "DeviceGate",
    "DeviceRefused",
    "RevokedSet",
    "WarningBudget",
    "bind",
    "load_fleet_trust",
    "replay_refusal",
    "revoked_refusal",
]

REFUSAL_KINDS: Final = ("unsigned", "invalid", "identity", "replayed", "revoked", "key")
"""Why a device request was refused: no identity headers; a certificate or signature
that does not verify (foreign CA, expired, tampered request, malformed headers); a
device id that is not the certificate's; a counter not above the last accepted one; a
certificate the operator revoked; an announce key's MAC that is malformed, expired,
does not verify, or authenticates anything but an announce or scrape (the device signs
the request again with its certificate)."""


class DeviceRefused(Exception):
    """A device request refused for its identity (HTTP 401, or a BitTorrent ``failure
    reason``). ``claimed`` is the device id the request named, if any (for the log)."""

    def __init__(self, kind: str, message: str, claimed: str | None = None) -> None:
        if kind not in REFUSAL_KINDS:
            raise RuntimeError(f"unknown refusal kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.claimed = claimed


def replay_refusal(counter: int, floor: int, claimed: str) -> DeviceRefused:
    """The refusal of ``counter`` when ``floor`` was accepted already."""
    return DeviceRefused("replayed", f"replayed request: counter {counter} is not above "
                                     f"{floor}", claimed)


def revoked_refusal(auth: Authenticated) -> DeviceRefused:
    """The refusal of a request signed with a revoked certificate."""
    return DeviceRefused("revoked", f"device certificate sha256:{auth.cert_sha256} of "
                                    f"{auth.device_id} is revoked", auth.device_id)


def load_fleet_trust(path: Path) -> FleetTrust:
    """The fleet CA certificate(s) in the PEM file ``path``.

    Raises:
        ConfigError: the file cannot be read, holds no certificate, or one that is not
            a CA.
    """
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the fleet CA file {path}: "
                          f"{exc.strerror or exc}") from None
    try:
        return FleetTrust(pem)
    except DeviceAuthError as exc:
        raise ConfigError(f"fleet CA file {path}: {exc}") from None


class CounterWindow:
    """The highest request counter accepted per device, for the ``max_devices`` devices
    seen most recently (least recently used go first). Pure, not thread-safe: owned by
    the app's event loop.

    Raises:
        ValueError: ``max_devices`` below 1.
    """

    def __init__(self, max_devices: int) -> None:
        if max_devices < 1:
            raise ValueError("max_devices must be at least 1")
        self._max = max_devices
        self._counters: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counters)

    def get(self, device_id: str) -> int | None:
        """The highest counter accepted from ``device_id``, if it is in the window."""
        counter = self._counters.get(device_id)
        if counter is not None:
            self._counters.move_to_end(device_id)
        return counter

    def forget(self, device_id: str) -> None:
        """Drop ``device_id`` (its identities were revoked: its counters start over)."""
        self._counters.pop(device_id, None)

    def raise_to(self, device_id: str, counter: int) -> None:
        """Remember ``counter`` for ``device_id`` unless a higher one is remembered."""
        known = self._counters.get(device_id)
        self._counters[device_id] = counter if known is None else max(known, counter)
        self._counters.move_to_end(device_id)
        while len(self._counters) > self._max:
            self._counters.popitem(last=False)


class WarningBudget:
    """At most ``per_window`` log lines per ``window_s`` seconds (a monotonic clock): an
    outsider sending unsigned requests in a loop must not flood the tracker's log. The
    lines over the budget are counted, and the next line allowed says how many were
    left out. Pure, not thread-safe: owned by the app's event loop."""

    def __init__(self, per_window: int = 20, window_s: float = 60.0) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self._window_start: float | None = None
        self._used = 0
        self._left_out = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """``(log this line?, lines left out since the last one logged)``."""
        if self._window_start is None or not 0 <= now - self._window_start < self.window_s:
            self._window_start, self._used = now, 0
        if self._used >= self.per_window:
            self._left_out += 1
            return False, 0
        self._used += 1
        left_out, self._left_out = self._left_out, 0
        return True, left_out


class RevokedSet:
    """The fingerprints of revoked device certificates as this process last read them
    from the store, and when it read them (a monotonic clock value in seconds). Pure,
    not thread-safe: owned by the app's event loop. Revocations are never undone, so
    reads and local additions only ever add to the set.

    Raises:
        ValueError: ``refresh_s`` not above 0.
    """

    def __init__(self, refresh_s: float) -> None:
        if not refresh_s > 0:
            raise ValueError("refresh_s must be above 0")
        self.refresh_s = refresh_s
        self._revoked: frozenset[str] = frozenset()
        self._read_at: float | None = None

    def __contains__(self, cert_sha256: object) -> bool:
        return cert_sha256 in self._revoked

    def __len__(self) -> int:
        return len(self._revoked)

    def due(self, now: float) -> bool:
        """Whether the copy must be read again at ``now``: never read, read
        ``refresh_s`` or more ago, or the clock went backwards."""
        return self._read_at is None or not 0 <= now - self._read_at < self.refresh_s

    def refreshed(self, revoked: Mapping[str, str], read_at: float) -> set[str]:
        """The store held ``revoked`` (fingerprint -> device id) when read at ``read_at``
        (taken before the read); returns the devices with certificates new to this copy."""
        new = {device for fp, device in revoked.items() if fp not in self._revoked}
        self._revoked = self._revoked.union(revoked)
        self._read_at = read_at
        return new

    def add(self, revoked: Iterable[str]) -> None:
        """This process revoked ``revoked``: refuse them at once."""
        self._revoked = self._revoked.union(revoked)


def bind(auth: Authenticated | None, device_id: str | None) -> None:
    """The device id a signed request names must be its certificate's.

    Raises:
        DeviceRefused: ``identity``, naming both.
    """
    if auth is not None and device_id != auth.device_id:
        named = "no device_id" if device_id is None else f"device_id {device_id[:128]!r}"
        raise DeviceRefused("identity", f"request names {named}, but is signed by "
                                        f"{auth.device_id!r}", device_id)


class DeviceGate:
    """Who signed a device request, for a tracker whose config names a fleet CA.

    ``store`` is read and written only through ``run`` (the director's worker-thread
    runner); ``clock`` gives epoch seconds (certificate validity), ``monotonic`` times
    the refresh of the revoked set. ``on_refused(kind)`` is called for every refusal
    (the director counts them). ``announce_keys``: issues and verifies announce keys
    (``None``: none are handed out, and a MAC is refused). Owned by one event loop.
    """

    ANNOUNCE_COUNTER_DEVICES: Final = 100_000
    """Devices whose highest announce/scrape counter is kept in memory (about 100 bytes
    each); one that falls out is seeded again from its stored check-in/report counter."""

    def __init__(self, trust: FleetTrust, store: Store, run: Runner, *,
                 clock: Callable[[], float], monotonic: Callable[[], float],
                 revocation_refresh_s: float, max_certificates_seen: int,
                 on_refused: Callable[[str], None],
                 shared: RedisState | None = None,
                 announce_keys: AnnounceKeys | None = None) -> None:
        self._trust = trust
        self._store = store
        self._run = run
        self._clock = clock
        self._monotonic = monotonic
        self._on_refused = on_refused
        self._announce_counters = CounterWindow(self.ANNOUNCE_COUNTER_DEVICES)
        self._revoked = RevokedSet(revocation_refresh_s)
        self._revoked_reading: trio.Event | None = None
        self._refusal_log = WarningBudget()
        self._certificates_seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._max_seen = max_certificates_seen
        self._shared = shared
        self._announce_keys = announce_keys

    async def verify(self, method: str, target: bytes, body: bytes,
                     headers: Sequence[tuple[bytes, bytes]], *,
                     announce: bool = False) -> Authenticated:
        """Check the identity headers against the fleet CA (or, for an ``announce``
        or scrape, an announce key's MAC) and the revoked set.

        Raises:
            DeviceRefused: ``unsigned``, ``invalid``, ``key`` or ``revoked``.
            StorageError: the revoked certificates could not be read.
        """
        if self._revoked.due(self._monotonic()):
            await self._refresh_revoked()
        mac = find_header(headers, ANNOUNCE_AUTH_HEADER)
        if mac is not None:
            auth = self._verify_mac(method, target, body, mac, announce)
            if auth.cert_sha256 in self._revoked:
                raise revoked_refusal(auth)
            return auth
        cert = find_header(headers, CERT_HEADER)
        signature = find_header(headers, SIGNATURE_HEADER)
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        try:
            auth = self._trust.verify(method, target, body, cert, signature, now)
        except DeviceAuthError as exc:
            kind = "unsigned" if cert is None or signature is None else "invalid"
            raise DeviceRefused(kind, str(exc)) from None
        if auth.cert_sha256 in self._revoked:
            raise revoked_refusal(auth)
        return auth

    def _verify_mac(self, method: str, target: bytes, body: bytes, header: bytes,
                    announce: bool) -> Authenticated:
        if not announce:
            raise DeviceRefused("key", "an announce key authenticates announces and "
                                       "scrapes only: sign this request")
        if self._announce_keys is None:
            raise DeviceRefused("key", "this tracker hands out no announce keys: sign "
                                       "the request")
        try:
            return self._announce_keys.verify(method, target, body, header, self._clock())
        except DeviceAuthError as exc:
            raise DeviceRefused("key", f"{exc}: sign the request") from None

    def issue_announce_key(self, auth: Authenticated | None,
                           now: float) -> AnnounceKey | None:
        """The announce key for the device whose signed check-in was just accepted
        (``None`` in lab mode, for a seed, or when none are handed out), issued at
        ``now`` (epoch seconds: the check-in's time, from which the grant's lifetime is
        counted too)."""
        if auth is None or self._announce_keys is None:
            return None
        return self._announce_keys.issue(auth, now)

    def advance_counter(self, auth: Authenticated | None, now: float) -> None:
        """In the store's thread (inside the request's transaction): store a signed
        check-in's or report's counter if it is above the device's last one.

        Raises:
            DeviceRefused: ``replayed``; nothing was written.
        """
        if auth is None:
            return
        floor = self._store.advance_counter(auth.device_id, auth.counter, now,
                                            auth.cert_sha256)
        if floor is not None:
            raise replay_refusal(auth.counter, floor, auth.device_id)

    async def accepted(self, auth: Authenticated | None) -> None:
        """A signed check-in or report was accepted: announces signed before it can no
        longer be replayed to this process (nor, with shared windows, to any). The
        check-in or report is stored already: when the shared windows cannot be reached
        it is answered all the same (logged; announces fail meanwhile anyway, since
        they need the same Redis)."""
        if auth is not None:
            self._announce_counters.raise_to(auth.device_id, auth.counter)
            if self._shared is not None:
                try:
                    await self._shared.raise_counter(_window_key(auth), auth.counter)
                except StorageError as exc:
                    log.warning("raising the shared announce window of %s failed: %s",
                                auth.device_id, exc)

    async def accept_announce(self, auth: Authenticated) -> None:
        """Check an announce's or scrape's counter against the in-memory window (seeded
        from the stored counter when the device is not in it), remember it, and record
        the certificate the first time this process sees the device use it.

        Raises:
            DeviceRefused: ``replayed``.
            StorageError: reading or writing the store failed.
        """
        floor = self._announce_counters.get(auth.device_id)
        if self._shared is not None:  # every process's window: one compare-and-set
            if floor is not None and auth.counter <= floor:
                raise replay_refusal(auth.counter, floor, auth.device_id)
            floor = await self._shared.accept_counter(
                _window_key(auth), auth.counter,
                lambda: self._run(lambda: self._store.device_counter(auth.device_id)))
            if floor is not None:
                raise replay_refusal(auth.counter, floor, auth.device_id)
        elif floor is None:
            stored = await self._run(lambda: self._store.device_counter(auth.device_id))
            floor = self._announce_counters.get(auth.device_id)  # may have moved meanwhile
            if stored is not None and (floor is None or stored > floor):
                floor = stored
        if floor is not None and auth.counter <= floor:
            raise replay_refusal(auth.counter, floor, auth.device_id)
        self._announce_counters.raise_to(auth.device_id, auth.counter)
        key = (auth.device_id, auth.cert_sha256)
        if key in self._certificates_seen:
            self._certificates_seen.move_to_end(key)
            return
        now = self._clock()
        await self._run(
            lambda: self._store.record_certificate(auth.device_id, auth.cert_sha256, now))
        self._certificates_seen[key] = None
        while len(self._certificates_seen) > self._max_seen:
            self._certificates_seen.popitem(last=False)

    def revoked_here(self, device_id: str, fingerprints: Iterable[str]) -> None:
        """This process revoked ``fingerprints`` of ``device_id``: refused from now on,
        and the device's announce counters start over (reset in the store too)."""
        self._revoked.add(fingerprints)
        self._announce_counters.forget(device_id)

    def refused(self, exc: DeviceRefused, what: str) -> None:
        """Count a refusal and log it (at most a bounded number of lines a minute)."""
        self._on_refused(exc.kind)
        log_it, left_out = self._refusal_log.allow(self._monotonic())
        if not log_it:
            return  # counted in /metrics; the log keeps a bounded number of lines
        claimed = "-" if exc.claimed is None else repr(exc.claimed[:128])
        log.warning("device request refused (%s): %s: device %s: %s%s", exc.kind, what,
                    claimed, exc.message,
                    f" ({left_out} more refusals not logged)" if left_out else "")

    async def _refresh_revoked(self) -> None:
        """Read the revoked certificates again if this process's copy is
        ``revocation_refresh_s`` old. One read at a time: requests arriving while it
        runs wait for it.

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
            revoked = await self._run(self._store.revoked_fingerprints)
            for device_id in self._revoked.refreshed(revoked, read_at):
                self._announce_counters.forget(device_id)  # reset in the store too
        finally:
            self._revoked_reading = None
            done.set()


def _window_key(auth: Authenticated) -> str:
    """A device's shared announce window, per certificate: a revoked certificate's
    window (which a thief may have pushed up) does not hold back the next one, whose
    first floor is the stored check-in/report counter (reset at revocation)."""
    return f"{auth.device_id}:{auth.cert_sha256}"
