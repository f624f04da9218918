"""The tracker: which release each device should install, and what devices report.

Devices check in (``POST /v1/checkin``) with their product, hardware id, version and
release counter; the tracker records them and offers the newest registered release of
their product with a higher counter. After an attempt they report the outcome
(``POST /v1/report``). Operators register releases from release manifest files.

The tracker is also a BitTorrent HTTP tracker for the swarms of registered releases'
payloads (each manifest payload's ``info_hash``, the torrent's SHA-256 v2 info-hash;
clients announce its first 20 bytes). The announce URL to put in torrents is
``<tracker>/announce`` (e.g. ``http://tracker.example:8470/announce``); scrapes go to
``<tracker>/scrape``. Unknown info-hashes get a ``failure reason``. Peers are kept in
memory only (a restart forgets them; clients re-announce within one interval).

The tracker is untrusted for integrity: it only names a release; devices verify it
against signed TUF metadata and refuse anything not applicable or not newer.

Layout (pure core, thin shells):

- :mod:`tracker.protocol`: request parsing, the offer decision, answers. Pure.
- :mod:`tracker.bittorrent`: announce/scrape query parsing and bencoded answers. Pure.
- :mod:`tracker.registry`: :class:`SwarmRegistry`, the in-memory peer registry
  (bounded, expiring, clock and RNG passed in).
- :mod:`tracker.store`: the :class:`Store` interface and :class:`SqliteStore`.
- :mod:`tracker.app`: the raw ASGI application, :class:`TrackerApp`.
- :mod:`tracker.server`: :func:`serve_tracker`, store + app + hypercorn on trio.
- :mod:`tracker.cli`: ``swarmota tracker ...``.
- :mod:`tracker.errors`: the exception tree.
"""

from tracker.app import TrackerApp, TrackerStatistics
from tracker.bittorrent import (
    AnnounceRequest,
    ScrapeRequest,
    SwarmInfo,
    parse_announce,
    parse_scrape,
)
from tracker.config import TrackerConfig
from tracker.errors import ReleaseConflictError, RequestError, StorageError, TrackerError
from tracker.protocol import (
    STATUS_NAMES,
    CheckIn,
    Release,
    Report,
    checkin_answer,
    decide_offer,
    parse_checkin,
    parse_report,
)
from tracker.registry import AnnounceResult, RegistryStatistics, SwarmRegistry
from tracker.server import serve_tracker
from tracker.store import DeviceRecord, SqliteStore, Store, StoredReport

__all__ = [
    "STATUS_NAMES",
    "AnnounceRequest",
    "AnnounceResult",
    "CheckIn",
    "DeviceRecord",
    "Release",
    "ReleaseConflictError",
    "RegistryStatistics",
    "Report",
    "RequestError",
    "ScrapeRequest",
    "SqliteStore",
    "StorageError",
    "Store",
    "StoredReport",
    "SwarmInfo",
    "SwarmRegistry",
    "TrackerApp",
    "TrackerConfig",
    "TrackerError",
    "TrackerStatistics",
    "checkin_answer",
    "decide_offer",
    "parse_announce",
    "parse_checkin",
    "parse_report",
    "parse_scrape",
    "serve_tracker",
]
