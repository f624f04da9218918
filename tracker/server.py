"""The tracker service: store (SQLite or PostgreSQL) + shared state (Redis, optional)
+ ASGI app + hypercorn (+ the lean BitTorrent endpoint), as one trio task."""

from __future__ import annotations

import dataclasses
import functools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from swarmota.infra.http_serve import ListenConfig, serve_asgi
from swarmota.tracker.announce_server import serve_announce
from swarmota.tracker.app import TrackerApp
from swarmota.tracker.bt_api import answer_bittorrent
from swarmota.tracker.config import TrackerConfig
from swarmota.tracker.device_api import answer_device
from swarmota.tracker.director import Director
from swarmota.tracker.errors import ConfigError
from swarmota.tracker.registry import SwarmRegistry
from swarmota.tracker.release_trust import ReleaseVerifier
from swarmota.tracker.store import open_store, redact_url

if TYPE_CHECKING:
    from swarmota.tracker.redis_state import RedisState

__all__ = ["TRACKER_TLS_MIN_VERSION", "TrackerUrls", "serve_tracker", "serve_tracker_endpoints"]

#: The tracker speaks TLS 1.3 only (devices are ours; no legacy clients to serve), on
#: both of its listeners.
TRACKER_TLS_MIN_VERSION = "1.3"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackerUrls:
    """Where a running tracker listens.

    Attributes:
        api: base URL of the main listener (device, admin, metrics and BitTorrent API).
        announce: base URL of the lean BitTorrent endpoint, or ``None`` if not enabled;
            the announce URL for torrents is ``announce + "/announce"``.
    """

    api: str
    announce: str | None


async def serve_tracker(
    config: TrackerConfig,
    *,
    clock: Callable[[], float] = time.time,
    registry: SwarmRegistry | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the tracker until cancelled; pass the main listener's base URL
    (``http://HOST:PORT``) to ``task_status.started``.

    Same as :func:`serve_tracker_endpoints` (which see, for the arguments and errors),
    for callers that need the main URL only.
    """
    async with trio.open_nursery() as nursery:
        urls: TrackerUrls = await nursery.start(functools.partial(
            serve_tracker_endpoints, config, clock=clock, registry=registry))
        task_status.started(urls.api)


async def serve_tracker_endpoints(
    config: TrackerConfig,
    *,
    clock: Callable[[], float] = time.time,
    registry: SwarmRegistry | None = None,
    task_status: trio.TaskStatus[TrackerUrls] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the tracker API (and the lean BitTorrent endpoint if
    ``config.announce_listen`` is set) until cancelled.

    Opens (creating if needed) the database ``config.database`` (and connects to
    ``config.redis_url`` if set), listens on
    ``config.listen`` (and ``config.announce_listen``, with the same TLS certificate
    if any; over TLS both speak 1.3 only, whatever ``config.listen`` says) and passes
    the bound :class:`TrackerUrls` to ``task_status.started``. Both
    listeners serve one :class:`~tracker.director.Director`: one swarm registry, one
    swarm gate, one set of counters. The store is closed when the service stops, after every
    request handler has finished. ``clock`` (epoch seconds) timestamps check-ins,
    reports and releases. ``registry`` holds the BitTorrent peers (default: a new one
    built from ``config``); pass one to read its statistics.

    Raises:
        StorageError: the database (or Redis) cannot be opened (before ``started``).
        ConfigError: ``config.device_ca`` cannot be read or holds no CA certificate, or
            the repository root or origin cannot be used (before ``started``).
        OSError: an address cannot be bound, or the TLS files cannot be loaded
            (``ssl.SSLError`` is an ``OSError``).
    """
    store = await trio.to_thread.run_sync(
        functools.partial(open_store, config.database, clock=clock))
    shared = None
    try:
        if config.redis_url is not None:
            shared = _shared_state(config.redis_url, config, clock)
            await trio.to_thread.run_sync(shared.ping)
        releases = None
        if config.repository_root is not None and config.origin_url is not None:
            releases = ReleaseVerifier(config.repository_trust_dir, config.origin_url,
                                       config.repository_root, ca_file=config.origin_ca_file)
        director = Director(store, config, clock=clock, registry=registry,
                            releases=releases, shared=shared)
        app = TrackerApp(director)
        if config.device_ca is not None:
            log.info("device requests must be signed by the fleet CA in %s",
                     config.device_ca)
        else:
            log.info("lab mode: device requests are not authenticated")
        listen = dataclasses.replace(config.listen, tls_min_version=TRACKER_TLS_MIN_VERSION)
        async with trio.open_nursery() as nursery:
            announce_url = None
            if config.announce_listen is not None:
                host, port = config.announce_listen
                announce_url = await nursery.start(functools.partial(
                    serve_announce, functools.partial(answer_bittorrent, director), host, port,
                    ssl_context=_server_ssl_context(listen),
                    limits=dataclasses.replace(config.announce_limits,
                                               max_body_bytes=config.max_body_bytes),
                    device_api=functools.partial(answer_device, director)))
            api_url = await nursery.start(serve_asgi, app, listen)
            await nursery.start(director.run_ticker)
            task_status.started(TrackerUrls(api=api_url, announce=announce_url))
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
            if shared is not None:
                await trio.to_thread.run_sync(shared.close)
        log.info("tracker database %s closed", redact_url(str(config.database)))


def _server_ssl_context(listen: ListenConfig) -> ssl.SSLContext | None:
    """A server context from the main listener's certificate and TLS floor, or ``None``."""
    if listen.certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = (ssl.TLSVersion.TLSv1_3 if listen.tls_min_version == "1.3"
                               else ssl.TLSVersion.TLSv1_2)
    context.load_cert_chain(listen.certfile, listen.keyfile)
    return context


def _shared_state(url: str, config: TrackerConfig, clock: Callable[[], float]) -> RedisState:
    """The Redis state of ``config`` (redis imported only when it is used).

    Raises:
        ConfigError: the URL does not parse.
    """
    from swarmota.tracker.redis_state import RedisState

    try:
        return RedisState(url, interval_s=config.announce_interval_s,
                          max_peers_per_swarm=config.max_peers_per_swarm, clock=clock)
    except ValueError as exc:
        raise ConfigError(f"Redis URL {redact_url(url)}: {exc}") from None
