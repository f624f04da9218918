"""The tracker service: SQLite store + ASGI app + hypercorn, as one trio task."""

from __future__ import annotations

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

__all__ = ["serve_tracker"]

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
    ``config.listen`` and passes the bound base URL (``http://HOST:PORT``) to
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
        await serve_asgi(app, config.listen, task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
        log.info("tracker database %s closed", config.db_path)
