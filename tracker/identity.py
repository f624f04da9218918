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

A certificate the operator revoked (``POST /v1/admin/devices/<id>/revoke``, the
``revoked_certificates`` table) is refused on every device request, by its fingerprint
(hex SHA-256 of its DER). The check must cost nothing on the announce path, so each
process keeps the revoked fingerprints in memory (:class:`RevokedSet`) and reads them
again from SQLite when its copy is older than ``TrackerConfig.revocation_refresh_s``
(and adds its own revocations at once): several tracker processes on one database
refuse a revoked certificate at most that long after any of them revoked it.

Refusals are :class:`DeviceRefused`, with a ``kind`` (:data:`REFUSAL_KINDS`) for the
``/metrics`` label and a message safe to send back. Pure except
:func:`load_fleet_trust`, which reads one file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from infra.deviceauth import Authenticated, DeviceAuthError, FleetTrust
from tracker.errors import ConfigError

__all__ = [
    "REFUSAL_KINDS",
    "CounterWindow",
    "DeviceRefused",
    "RevokedSet",
    "WarningBudget",
    "load_fleet_trust",
    "replay_refusal",
    "revoked_refusal",
]

REFUSAL_KINDS: Final = ("unsigned", "invalid", "identity", "replayed", "revoked")
"""Why a device request was refused: no identity headers; a certificate or signature
that does not verify (foreign CA, expired, tampered request, malformed headers); a
device id that is not the certificate's; a counter not above the last accepted one; a
certificate the operator revoked."""


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
