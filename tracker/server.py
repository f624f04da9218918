"""The tracker service: SQLite store + ASGI app + hypercorn, as one trio task."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import trio

from infra.http_serve import serve_asgi
from tracker.app import TrackerApp
from tracker.config import TrackerConfig
from tracker.registry import SwarmRegistry
from tracker.store import SqliteStore

__all__ = ["TRACKER_TLS_MIN_VERSION", "serve_tracker"]

#: The tracker speaks TLS 1.3 only (devices are ours; no legacy clients to serve).
TRACKER_TLS_MIN_VERSION = "1.3"

log = logging.getLogger(__name__)


async def serve_tracker(
    config: TrackerConfig,
    *,
    clock: Callable[[], float] = time.time,
    registry: SwarmRegistry | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the tracker API until cancelled.

    Opens (creating if needed) the database at ``config.db_path``, listens on
    ``config.listen`` (over TLS: 1.3 only, whatever ``config.listen`` says) and passes
    the bound base URL (``http://HOST:PORT`` or ``https://...``) to
    ``task_status.started``. The store is closed when the service stops, after every
    request handler has finished. ``clock`` (epoch seconds) timestamps check-ins,
    reports and releases. ``registry`` holds the BitTorrent peers (default: a new one
    built from ``config``); pass one to read its statistics.

    Raises:
        StorageError: the database cannot be opened (before ``started``).
        OSError: the address cannot be bound.
    """
    store = await trio.to_thread.run_sync(
        functools.partial(SqliteStore, config.db_path, clock=clock))
    try:
        app = TrackerApp(store, config, clock, registry=registry)
        listen = dataclasses.replace(config.listen, tls_min_version=TRACKER_TLS_MIN_VERSION)
        await serve_asgi(app, listen, task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
        log.info("tracker database %s closed", config.db_path)
