"""The BitTorrent HTTP tracker API (``GET /announce``, ``GET /scrape``) over a director.

Both front ends call :func:`answer_bittorrent`: the ASGI app (:mod:`tracker.app`) and
the lean endpoint (:mod:`tracker.announce_server`); neither calls the other. It parses
the query (:mod:`tracker.bittorrent`, pure), checks the request's identity, asks the
:class:`~tracker.director.Director`, and bencodes the answer. Refusals are a ``failure
reason`` with HTTP 200, as BitTorrent clients expect (but HTTP 401 for a refused
announce key: only the device's relay sends one, and it signs the request again); a
storage failure is one with HTTP 500. It never raises on bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from swarmota.tracker.bittorrent import (
    announce_answer,
    parse_announce,
    parse_scrape,
    peer_address,
    scrape_answer,
)
from swarmota.tracker.director import Director
from swarmota.tracker.errors import RequestError, StorageError, UnknownSwarmError
from swarmota.tracker.identity import DeviceRefused
from swarmota.tracker.wire import failure_reason

__all__ = ["BITTORRENT_PATHS", "answer_bittorrent", "wrong_method"]

BITTORRENT_PATHS: Final = ("/announce", "/scrape")

log = logging.getLogger(__name__)


async def answer_bittorrent(director: Director, path: str, query: bytes,
                            client: Sequence[object] | None, *,
                            target: bytes | None = None,
                            headers: Sequence[tuple[bytes, bytes]] = ()
                            ) -> tuple[int, bytes]:
    """``(HTTP status, bencoded body)`` answering ``GET path?query`` from ``client``
    (``(host, port)`` of the connection, or ``None``). ``target`` is the request target
    exactly as received (default: ``path``, then ``?query`` if there is one) and
    ``headers`` the request's headers (lower-case names): with a fleet CA configured,
    the request must be signed over them (else a ``failure reason``: outsiders learn
    no peers); from a trusted proxy, their ``Forwarded`` / ``X-Forwarded-For`` give the
    peer's address (:mod:`tracker.proxies`).

    Raises:
        RuntimeError: ``path`` is not one of :data:`BITTORRENT_PATHS` (a bug).
    """
    if path not in BITTORRENT_PATHS:
        raise RuntimeError(f"{path!r} is not a BitTorrent route")
    counters = director.counters
    route = path.removeprefix("/")
    try:
        if target is None:
            target = path.encode("ascii") + (b"?" + query if query else b"")
        auth = await director.authenticate("GET", target, b"", headers,
                                           lambda: _claimed(path, query), announce=True)
        if path == "/announce":
            request = parse_announce(query)
            if client and director.proxies:  # behind a reverse proxy: who it forwards for
                client = (director.proxies.client_ip(str(client[0]), headers), client[1])
            address = peer_address(client, request.port)
            result = await director.announce(request, address, auth)
            config = director.config
            return 200, announce_answer(result.peers, complete=result.complete,
                                        incomplete=result.incomplete,
                                        interval_s=config.announce_interval_s,
                                        min_interval_s=config.announce_min_interval_s,
                                        compact=request.compact,
                                        no_peer_id=request.no_peer_id,
                                        compact_peers=result.compact_peers)
        return 200, scrape_answer(await director.scrape(parse_scrape(query), auth))
    except DeviceRefused as exc:
        counters.add("bittorrent_refused", label=f"{route}:identity")
        director.refused(exc, f"GET {path}")
        # an announce key refused (expired, another secret): 401 tells the device's
        # relay to sign the request again with its certificate
        return 401 if exc.kind == "key" else 200, failure_reason(exc.message)
    except UnknownSwarmError as exc:
        counters.add("bittorrent_refused", label=f"{route}:unknown-swarm")
        return 200, failure_reason(str(exc))
    except RequestError as exc:
        counters.add("bittorrent_refused", label=f"{route}:bad-query")
        return 200, failure_reason(str(exc))
    except StorageError:
        counters.add("bittorrent_refused", label=f"{route}:storage")
        counters.add("errors")
        log.exception("tracker storage failed on GET %s", path)
        return 500, failure_reason("tracker storage failure")


def _claimed(path: str, query: bytes) -> str | None:
    """The ``device_id`` an announce query claims, if it parses (for the log only)."""
    if path != "/announce":
        return None
    try:
        return parse_announce(query).device_id
    except RequestError:
        return None


def wrong_method(director: Director, path: str, method: str) -> bytes:
    """The bencoded refusal (sent with HTTP 405, ``allow: GET``) of a BitTorrent route
    asked with another method than GET; counted."""
    director.counters.add("bittorrent_refused", label=f"{path.removeprefix('/')}:method")
    return failure_reason(f"{path} only accepts GET, not {method[:16]}")
