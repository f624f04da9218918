"""The tracker: which release each device should install, and what devices report.

Devices check in (``POST /v1/checkin``) with their product, hardware id, version and
release counter; the tracker records them and offers the newest registered release of
their product with a higher counter. After an attempt they report the outcome
(``POST /v1/report``). Operators register releases from release manifest files.

The tracker is untrusted for integrity: it only names a release; devices verify it
against signed TUF metadata and refuse anything not applicable or not newer.

Layout (pure core, thin shells):

- :mod:`tracker.protocol`: request parsing, the offer decision, answers. Pure.
- :mod:`tracker.store`: the :class:`Store` interface and :class:`SqliteStore`.
- :mod:`tracker.app`: the raw ASGI application, :class:`TrackerApp`.
- :mod:`tracker.server`: :func:`serve_tracker`, store + app + hypercorn on trio.
- :mod:`tracker.cli`: ``swarmota tracker ...``.
- :mod:`tracker.errors`: the exception tree.
"""

from tracker.app import TrackerApp, TrackerStatistics
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
from tracker.server import serve_tracker
from tracker.store import DeviceRecord, SqliteStore, Store, StoredReport

__all__ = [
    "STATUS_NAMES",
    "CheckIn",
    "DeviceRecord",
    "Release",
    "ReleaseConflictError",
    "Report",
    "RequestError",
    "SqliteStore",
    "StorageError",
    "Store",
    "StoredReport",
    "TrackerApp",
    "TrackerConfig",
    "TrackerError",
    "TrackerStatistics",
    "checkin_answer",
    "decide_offer",
    "parse_checkin",
    "parse_report",
    "serve_tracker",
]
