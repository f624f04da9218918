"""Configuration of the tracker service."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from swarmota.infra.http_serve import ListenConfig
from swarmota.tracker.announce_server import AnnounceServerLimits
from swarmota.tracker.registry import DEFAULT_MAX_PEERS_PER_SWARM, DEFAULT_MAX_PEERS_TOTAL
from swarmota.tracker.wire import MAX_BODY_BYTES, MAX_POLL_AFTER_S, MIN_POLL_AFTER_S

__all__ = [
    "DEFAULT_ANNOUNCE_INTERVAL_S",
    "DEFAULT_ANNOUNCE_KEY_LIFETIME_S",
    "DEFAULT_ANNOUNCE_MIN_INTERVAL_S",
    "DEFAULT_AUDIT_RETENTION_S",
    "DEFAULT_PACED_POLL_AFTER_S",
    "DEFAULT_POLL_JITTER_FRACTION",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_PEERS_PER_SWARM",
    "DEFAULT_MAX_PEERS_TOTAL",
    "DEFAULT_POLL_AFTER_S",
    "DEFAULT_REPORT_RETENTION_S",
    "DEFAULT_REVOCATION_REFRESH_S",
    "TrackerConfig",
]

DEFAULT_POLL_AFTER_S = 3600
DEFAULT_MAX_BODY_BYTES = MAX_BODY_BYTES  # the wire format's limit (a report with its log tail)
DEFAULT_ANNOUNCE_INTERVAL_S = 300
DEFAULT_ANNOUNCE_MIN_INTERVAL_S = 60
DEFAULT_POLL_JITTER_FRACTION = 0.1
DEFAULT_PACED_POLL_AFTER_S = 300
DEFAULT_AUDIT_RETENTION_S = 365 * 24 * 3600
DEFAULT_REVOCATION_REFRESH_S = 5.0
DEFAULT_ANNOUNCE_KEY_LIFETIME_S = 3600
"""An hour: a device's update pass checks in, then announces while it downloads; an
announce after its key expired is signed with ECDSA again."""
DEFAULT_REPORT_RETENTION_S = 180 * 24 * 3600


@dataclass(frozen=True)
class TrackerConfig:
    """Everything ``serve_tracker`` needs.

    Attributes:
        db_path: the SQLite database file (created, with its parent directory, if
            missing); ``None`` when ``db_url`` is given.
        db_url: a PostgreSQL database URL (``postgresql://...``) instead of ``db_path``
            (:func:`tracker.store.open_store`), for several tracker processes.
        redis_url: Redis for the swarms' peers and the announce replay windows, shared
            by every tracker process (:mod:`tracker.redis_state`); ``None`` (default):
            in this process's memory.
        listen: address and TLS settings; port 0 lets the kernel pick a free port.
        poll_after_s: seconds a device should wait before its next check-in.
        max_body_bytes: hard limit on a request body; larger bodies get HTTP 413.
        announce_interval_s: BitTorrent ``interval``: seconds between a peer's
            announces; peers silent for twice as long are forgotten.
        announce_min_interval_s: BitTorrent ``min interval`` (at most the interval).
        max_peers_per_swarm / max_peers_total: bounds of the in-memory peer registry.
        poll_jitter_fraction: each ``poll_after_s`` answer is drawn uniformly from
            ``poll_after_s * (1 +- fraction)`` so that a fleet does not come back in step.
        paced_poll_after_s: ``poll_after_s`` (jittered too, at most ``poll_after_s``)
            for a device held back by a stage's in-flight cap.
        audit_retention_s: audit entries older than this are deleted (checked hourly).
        report_retention_s: device reports (and the log tails they carry) older than
            this are deleted (checked hourly).
        trusted_proxies: CIDR blocks of reverse proxies in front of the tracker
            (nginx, a load balancer) whose ``Forwarded`` / ``X-Forwarded-For`` headers
            name the client: its address is the one peers are handed out at
            (:mod:`tracker.proxies`). Nobody else's headers are believed.
        rollout_tick_s: how often time acts on rollouts with no device traffic needed
            (a scheduled start, a soaked stage, completion); check-ins and reports of
            the release act on them at once too.
        announce_listen: ``(host, port)`` of the lean BitTorrent endpoint
            (:mod:`tracker.announce_server`), or ``None`` (default) for none: announces
            and scrapes are then served by the main listener only. It uses the main
            listener's TLS certificate and key when those are set.
        announce_limits: bounds of the lean endpoint (head size, connections, timeouts).
        device_ca: PEM file with the fleet CA certificate(s) (several during a CA
            rotation). When set, every device request (check-in, report, announce,
            scrape, on both listeners) must be signed by an identity that CA issued
            (:mod:`infra.deviceauth`, :mod:`tracker.identity`); unsigned, forged,
            mismatched or replayed requests are refused. ``None`` (default) is lab
            mode: device requests are not authenticated (``tracker serve`` asks for
            ``--allow-unauthenticated-devices`` explicitly). Loaded when the app is
            built.
        repository_root: the repository's root metadata (``root.json``, as devices
            are provisioned with): with ``origin_url``, releases registered through
            the admin API are verified against the signed metadata of the repository
            the origin serves (:mod:`tracker.release_trust`). ``None``: the admin API
            registers no releases.
        origin_url: base URL of the origin tree (its ``metadata/`` and ``targets/``).
        origin_ca_file: PEM certificates to trust for an HTTPS origin (default: the
            system's).
        trust_dir: where the tracker keeps the repository metadata it trusts (default:
            ``repository-trust`` beside the database).
        revocation_refresh_s: how old each process's in-memory copy of the revoked
            device certificates may get before it reads them again from the database:
            a certificate revoked through another tracker process on the same database
            is refused here at most this long after (at once through this one).
        announce_key_lifetime_s: how long an announce key handed out in a signed
            check-in's answer authenticates that device's announces and scrapes
            (:class:`infra.deviceauth.AnnounceKeys`; 0: hand out none, every announce
            is signed with ECDSA).

    Raises:
        ValueError: ``poll_after_s`` or ``paced_poll_after_s`` outside 10..604800,
            ``max_body_bytes`` outside 1..16 MiB, ``announce_interval_s`` outside
            1..86400, ``announce_min_interval_s`` outside 0..announce_interval_s,
            ``revocation_refresh_s`` outside (0, 3600], ``announce_key_lifetime_s``
            outside 0..86400, ``rollout_tick_s`` outside
            (0, 3600], ``repository_root`` without ``origin_url``, a peer limit
            below 1, neither or both of ``db_path`` and ``db_url``, or ``db_url`` with
            ``repository_root`` but no ``trust_dir`` (a programming or command-line
            validation error).
    """

    db_path: Path | None = None
    db_url: str | None = None
    redis_url: str | None = None
    listen: ListenConfig = field(default_factory=ListenConfig)
    poll_after_s: int = DEFAULT_POLL_AFTER_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    announce_interval_s: int = DEFAULT_ANNOUNCE_INTERVAL_S
    announce_min_interval_s: int = DEFAULT_ANNOUNCE_MIN_INTERVAL_S
    max_peers_per_swarm: int = DEFAULT_MAX_PEERS_PER_SWARM
    max_peers_total: int = DEFAULT_MAX_PEERS_TOTAL
    poll_jitter_fraction: float = DEFAULT_POLL_JITTER_FRACTION
    paced_poll_after_s: int = DEFAULT_PACED_POLL_AFTER_S
    audit_retention_s: float = DEFAULT_AUDIT_RETENTION_S
    report_retention_s: float = DEFAULT_REPORT_RETENTION_S
    rollout_tick_s: float = 30.0
    trusted_proxies: tuple[str, ...] = ()
    announce_listen: tuple[str, int] | None = None
    announce_limits: AnnounceServerLimits = field(default_factory=AnnounceServerLimits)
    device_ca: Path | None = None
    revocation_refresh_s: float = DEFAULT_REVOCATION_REFRESH_S
    announce_key_lifetime_s: int = DEFAULT_ANNOUNCE_KEY_LIFETIME_S
    repository_root: Path | None = None
    origin_url: str | None = None
    origin_ca_file: Path | None = None
    trust_dir: Path | None = None

    def __post_init__(self) -> None:
        if (self.db_path is None) == (self.db_url is None):
            raise ValueError("give the database as db_path (SQLite) or db_url, not both")
        if self.db_path is None and self.repository_root is not None and \
                self.trust_dir is None:
            raise ValueError("a tracker on db_url needs trust_dir for the repository "
                             "metadata it trusts")
        if not MIN_POLL_AFTER_S <= self.poll_after_s <= MAX_POLL_AFTER_S:
            raise ValueError(f"poll_after_s must be within {MIN_POLL_AFTER_S}.."
                             f"{MAX_POLL_AFTER_S}, got {self.poll_after_s}")
        if not 1 <= self.max_body_bytes <= 16 * 1024 * 1024:
            raise ValueError(f"max_body_bytes must be within 1..16 MiB, got {self.max_body_bytes}")
        if not 1 <= self.announce_interval_s <= 24 * 3600:
            raise ValueError("announce_interval_s must be within 1..86400, got "
                             f"{self.announce_interval_s}")
        if not 0 <= self.announce_min_interval_s <= self.announce_interval_s:
            raise ValueError("announce_min_interval_s must be within 0..announce_interval_s, "
                             f"got {self.announce_min_interval_s}")
        if self.max_peers_per_swarm < 1 or self.max_peers_total < 1:
            raise ValueError("max_peers_per_swarm and max_peers_total must be at least 1")
        if not 0 <= self.poll_jitter_fraction <= 0.5:
            raise ValueError("poll_jitter_fraction must be within 0..0.5")
        if not MIN_POLL_AFTER_S <= self.paced_poll_after_s <= MAX_POLL_AFTER_S:
            raise ValueError(f"paced_poll_after_s must be within {MIN_POLL_AFTER_S}.."
                             f"{MAX_POLL_AFTER_S}")
        if not 0 < self.rollout_tick_s <= 3600:
            raise ValueError("rollout_tick_s must be within (0, 3600]")
        if self.audit_retention_s <= 0 or self.report_retention_s <= 0:
            raise ValueError("audit_retention_s and report_retention_s must be positive")
        if not 0 < self.revocation_refresh_s <= 3600:
            raise ValueError("revocation_refresh_s must be within (0, 3600]")
        if not 0 <= self.announce_key_lifetime_s <= 24 * 3600:
            raise ValueError("announce_key_lifetime_s must be within 0..86400")
        if (self.repository_root is None) != (self.origin_url is None):
            raise ValueError("repository_root and origin_url go together")

    @property
    def database(self) -> str | Path:
        """The database, as :func:`swarmota.tracker.store.open_store` takes it."""
        if self.db_url is not None:
            return self.db_url
        if self.db_path is None:
            raise RuntimeError("unreachable: checked at construction")
        return self.db_path

    @property
    def repository_trust_dir(self) -> Path:
        """:attr:`trust_dir`, or its default beside the SQLite database."""
        if self.trust_dir is not None:
            return self.trust_dir
        if self.db_path is None:
            raise RuntimeError("unreachable: checked at construction")
        return self.db_path.parent / "repository-trust"
