"""The tracker's HTTP API as a raw ASGI application (no web framework).

Routes (see ARCHITECTURE.md, "Device <-> tracker API"):

- ``POST /v1/checkin``: record the device, answer
  ``{"release": null | {...}, "poll_after_s": N}``;
- ``POST /v1/report``: store the report, answer ``{"ok": true}``;
- ``GET /v1/health``: ``{"ok": true}``;
- ``GET /announce`` and ``GET /scrape``: the BitTorrent HTTP tracker (BEP 3/23/7/48)
  for the swarms of registered releases (:mod:`tracker.bittorrent`); peers live in one
  in-memory :class:`~tracker.registry.SwarmRegistry` owned by the app.

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

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from infra.http_serve import Receive, Scope, Send
from tracker.bittorrent import (
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
from tracker.errors import RequestError, StorageError
from tracker.protocol import (
    CheckIn,
    Release,
    checkin_answer,
    decide_offer,
    encode_json,
    parse_checkin,
    parse_report,
)
from tracker.registry import SwarmRegistry
from tracker.store import Store

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
    """

    checkins: int
    reports: int
    offers: int
    errors: int
    announces: int = 0
    scrapes: int = 0
    bittorrent_failures: int = 0


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

    ``clock`` returns seconds since the epoch; it timestamps check-ins and reports.
    ``registry`` holds BitTorrent peers (default: a new one from ``config``'s interval
    and limits, on the monotonic clock); pass one to read its statistics or to control
    its clock. Only ``http`` scopes are served; ``infra.http_serve`` answers ``lifespan``.
    """

    def __init__(self, store: Store, config: TrackerConfig,
                 clock: Callable[[], float] = time.time, *,
                 registry: SwarmRegistry | None = None) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self.registry = registry if registry is not None else SwarmRegistry(
            interval_s=config.announce_interval_s,
            max_peers_per_swarm=config.max_peers_per_swarm,
            max_peers_total=config.max_peers_total)
        self._known_swarms: dict[bytes, SwarmInfo] = {}
        self._bittorrent_routes: dict[str, Callable[[Scope], Awaitable[bytes]]] = {
            "/announce": self._announce,
            "/scrape": self._scrape,
        }
        self._db_limiter = trio.CapacityLimiter(1)
        self._routes: dict[str, tuple[str, Callable[[Receive], Awaitable[object]]]] = {
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

    def statistics(self) -> TrackerStatistics:
        """A snapshot of the counters."""
        return TrackerStatistics(checkins=self._checkins, reports=self._reports,
                                 offers=self._offers, errors=self._errors,
                                 announces=self._announces, scrapes=self._scrapes,
                                 bittorrent_failures=self._bittorrent_failures)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is answered by infra.http_serve
            return
        bittorrent = self._bittorrent_routes.get(scope["path"])
        if bittorrent is not None and scope["method"] == "GET":
            await self._serve_bittorrent(scope, send, bittorrent)
            return
        try:
            route = self._routes.get(scope["path"])
            if bittorrent is not None:
                route = ("GET", self._health)  # only reached with a wrong method
            if route is None:
                raise _HttpError(404, f"no such endpoint {scope['path'][:200]!r}")
            method, handler = route
            if scope["method"] != method:
                raise _HttpError(405, f"{scope['path']} only accepts {method}",
                                 ((b"allow", method.encode("ascii")),))
            if method == "POST":
                self._check_content_length(scope)
            answer = await handler(receive)
        except _Disconnected:
            return
        except _HttpError as exc:
            self._errors += 1
            await _send_json(send, exc.status, {"error": exc.message}, exc.headers)
            return
        except RequestError as exc:
            self._errors += 1
            await _send_json(send, 400, {"error": str(exc)})
            return
        except StorageError:
            self._errors += 1
            log.exception("tracker storage failed on %s %s", scope["method"], scope["path"])
            await _send_json(send, 500, {"error": "tracker storage failure"})
            return
        await _send_json(send, 200, answer)

    # --- handlers ---------------------------------------------------------------------

    async def _checkin(self, receive: Receive) -> object:
        checkin = parse_checkin(await self._read_body(receive),
                                max_bytes=self._config.max_body_bytes)
        now = self._clock()

        def record_and_list() -> list[Release]:
            self._store.record_checkin(checkin, now)
            return self._store.releases(checkin.product)

        offer = decide_offer(checkin, await self._in_thread(record_and_list))
        self._checkins += 1
        if offer is not None:
            self._offers += 1
        _log_checkin(checkin, offer)
        return checkin_answer(offer, self._config.poll_after_s)

    async def _report(self, receive: Receive) -> object:
        report = parse_report(await self._read_body(receive),
                              max_bytes=self._config.max_body_bytes)
        now = self._clock()
        report_id = await self._in_thread(lambda: self._store.add_report(report, now))
        self._reports += 1
        log.info("report %d from %s: %s -> %s status %d", report_id, report.device_id,
                 report.from_version, report.to_version, report.status)
        return {"ok": True}

    async def _health(self, receive: Receive) -> object:
        return {"ok": True}

    # --- BitTorrent tracker -----------------------------------------------------------

    async def _serve_bittorrent(self, scope: Scope, send: Send,
                                handler: Callable[[Scope], Awaitable[bytes]]) -> None:
        status = 200
        try:
            body = await handler(scope)
        except RequestError as exc:
            self._bittorrent_failures += 1
            body = failure_answer(str(exc))
        except StorageError:
            self._bittorrent_failures += 1
            self._errors += 1
            log.exception("tracker storage failed on %s %s", scope["method"], scope["path"])
            status, body = 500, failure_answer("tracker storage failure")
        await _send_bytes(send, status, body, b"text/plain")

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

    async def _announce(self, scope: Scope) -> bytes:
        request = parse_announce(scope.get("query_string", b""))
        address = peer_address(scope.get("client"), request.port)
        if request.announce_hash not in await self._swarms_of([request.announce_hash]):
            raise RequestError(f"unknown info_hash {request.announce_hash.hex()}: no "
                               "registered release has this swarm")
        result = self.registry.announce(request, address.ip)
        self._announces += 1
        log.debug("announce %s from %s:%d (%s, left %d): %d peers handed out",
                  request.announce_hash.hex(), address.ip, address.port,
                  request.event or "update", request.left, len(result.peers))
        return announce_answer(result.peers, complete=result.complete,
                               incomplete=result.incomplete,
                               interval_s=self._config.announce_interval_s,
                               min_interval_s=self._config.announce_min_interval_s,
                               compact=request.compact, no_peer_id=request.no_peer_id)

    async def _scrape(self, scope: Scope) -> bytes:
        request = parse_scrape(scope.get("query_string", b""))
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
