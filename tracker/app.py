"""The tracker's HTTP API as a raw ASGI application: a thin adapter over a director.

Routes (see ARCHITECTURE.md, "Device <-> tracker API" and "Control plane"):

- ``POST /v1/checkin``, ``POST /v1/report``: the device API
  (:func:`tracker.device_api.answer_device`, which the lean endpoint calls too);
- ``GET /v1/health``: ``{"ok": true}``;
- ``GET /announce``, ``GET /scrape``: the BitTorrent tracker
  (:func:`tracker.bt_api.answer_bittorrent`, which the lean endpoint calls too);
- ``GET /metrics``: Prometheus text (no token: scrape it from the operator network);
- ``GET /v1/openapi.json``: the OpenAPI 3.1 description of all of this
  (:mod:`tracker.openapi`, also ``docs/openapi.json``);
- ``/v1/admin/...``: the admin API (:mod:`tracker.admin`: bearer tokens, roles, audit);
- ``GET /console/``: the operator console, a page over the admin API
  (:mod:`tracker.console`: static files, a strict Content-Security-Policy).

This module reads bodies (bounded), finds the route, checks the device identity
headers through the director, and turns answers and errors into HTTP. Every answer is
a JSON object with ``content-type: application/json``, but the BitTorrent routes'
(bencoded, ``text/plain``), ``/metrics`` and the console's files. Errors are
``{"error": "<message>"}``:
400 for a request the protocol refuses, 401/403 for identity and tokens, 404 for an
unknown path or object, 405 for a wrong method (with ``Allow``), 409 for an action
the state does not allow, 413 for a body over ``config.max_body_bytes`` (enforced from
``content-length`` and again while streaming, so an oversized body is never buffered),
500 when storage fails, 502 when the repository's origin cannot be used.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from swarmota.infra.http_serve import Receive, Scope, Send
from swarmota.tracker import admin, console
from swarmota.tracker.bt_api import BITTORRENT_PATHS, answer_bittorrent, wrong_method
from swarmota.tracker.device_api import DEVICE_PATHS, answer_device
from swarmota.tracker.director import Director
from swarmota.tracker.errors import (
    AuthError,
    ConflictError,
    RequestError,
    StorageError,
    UpstreamError,
)
from swarmota.tracker.identity import DeviceRefused
from swarmota.tracker.metrics import TrackerStatistics
from swarmota.tracker.openapi import openapi_document
from swarmota.tracker.wire import WireError, encode_json

__all__ = ["TrackerApp"]

log = logging.getLogger(__name__)


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
    """The tracker's HTTP API over ``director``; an ASGI 3 application. Only ``http``
    scopes are served; ``infra.http_serve`` answers ``lifespan``."""

    def __init__(self, director: Director) -> None:
        self.director = director
        self._openapi_document = openapi_document()
        self._routes: dict[str, tuple[str, Callable[[Scope, Receive], Awaitable[object]]]] = {
            # POST is answered before routing (_device); other methods get 405
            "/v1/checkin": ("POST", self._health),
            "/v1/report": ("POST", self._health),
            "/v1/health": ("GET", self._health),
            "/v1/openapi.json": ("GET", self._openapi),
        }

    def statistics(self) -> TrackerStatistics:
        """The director's counters."""
        return self.director.statistics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is answered by infra.http_serve
            return
        path, method = scope["path"], scope["method"]
        if path in BITTORRENT_PATHS and method == "GET":
            status, body = await answer_bittorrent(
                self.director, path, scope.get("query_string", b""), scope.get("client"),
                target=_target_of(scope), headers=scope.get("headers", ()))
            await _send_bytes(send, status, body, b"text/plain")
            return
        if path in BITTORRENT_PATHS:  # BitTorrent clients read bencoded refusals
            await _send_bytes(send, 405, wrong_method(self.director, path, method),
                              b"text/plain", ((b"allow", b"GET"),))
            return
        if path in DEVICE_PATHS and method == "POST":
            await self._device(scope, receive, send)
            return
        if path == "/metrics" and method == "GET":
            await _send_bytes(send, 200, self.director.metrics(),
                              b"text/plain; version=0.0.4; charset=utf-8")
            return
        if console.is_console_path(path):
            page = console.answer(method, path)
            await _send_bytes(send, page.status, page.body, page.content_type, page.headers)
            return
        counters = self.director.counters
        status = 200
        try:
            if path.startswith("/v1/admin/"):
                if method == "POST":
                    self._check_content_length(scope, admin.MAX_ADMIN_BODY_BYTES)
                body = await self._read_body(receive, admin.MAX_ADMIN_BODY_BYTES) \
                    if method == "POST" else b""
                status, answer = await admin.handle(
                    self.director, method, path, scope.get("query_string", b""), body,
                    _header(scope, b"authorization"))
            else:
                route = self._routes.get(path)
                if path == "/metrics":
                    route = ("GET", self._health)  # only reached with a wrong method
                if route is None:
                    raise _HttpError(404, f"no such endpoint {path[:200]!r}")
                expected, handler = route
                if method != expected:
                    raise _HttpError(405, f"{path} only accepts {expected}",
                                     ((b"allow", expected.encode("ascii")),))
                if method == "POST":
                    self._check_content_length(scope, self.director.config.max_body_bytes)
                answer = await handler(scope, receive)
        except _Disconnected:
            return
        except DeviceRefused as exc:
            counters.add("errors")
            self.director.refused(exc, f"{method} {path}")
            await _send_json(send, 401, {"error": exc.message},
                             ((b"www-authenticate", b"swarmota-signature"),))
            return
        except _HttpError as exc:
            counters.add("errors")
            await _send_json(send, exc.status, {"error": exc.message}, exc.headers)
            return
        except admin.MethodNotAllowed as exc:
            counters.add("errors")
            await _send_json(send, 405, {"error": str(exc)},
                             ((b"allow", ", ".join(exc.allow).encode("ascii")),))
            return
        except admin.NotFound as exc:
            counters.add("errors")
            await _send_json(send, 404, {"error": str(exc)})
            return
        except AuthError as exc:
            counters.add("errors")
            headers = () if exc.forbidden else ((b"www-authenticate", b"Bearer"),)
            await _send_json(send, 403 if exc.forbidden else 401, {"error": str(exc)},
                             headers)
            return
        except ConflictError as exc:
            counters.add("errors")
            await _send_json(send, 409, {"error": str(exc)})
            return
        except (RequestError, WireError) as exc:
            counters.add("errors")
            await _send_json(send, 400, {"error": str(exc)})
            return
        except UpstreamError as exc:
            counters.add("errors")
            log.warning("%s %s: %s", method, path, exc)
            await _send_json(send, 502, {"error": str(exc)})
            return
        except StorageError:
            counters.add("errors")
            log.exception("tracker storage failed on %s %s", method, path)
            await _send_json(send, 500, {"error": "tracker storage failure"})
            return
        await _send_json(send, status, answer)

    # --- device routes --------------------------------------------------------------------

    async def _device(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/checkin`` and ``POST /v1/report``: the body (bounded), then
        :func:`~tracker.device_api.answer_device`."""
        limit = self.director.config.max_body_bytes
        try:
            self._check_content_length(scope, limit)
            body = await self._read_body(receive, limit)
        except _Disconnected:
            return
        except _HttpError as exc:
            self.director.counters.add("errors")
            await _send_json(send, exc.status, {"error": exc.message}, exc.headers)
            return
        status, answer, headers = await answer_device(
            self.director, scope["path"], _target_of(scope), body, scope.get("headers", ()))
        await _send_bytes(send, status, answer, b"application/json", headers)

    async def _health(self, scope: Scope, receive: Receive) -> object:
        return {"ok": True}

    async def _openapi(self, scope: Scope, receive: Receive) -> object:
        return self._openapi_document

    # --- plumbing -------------------------------------------------------------------------

    @staticmethod
    def _check_content_length(scope: Scope, limit: int) -> None:
        value = _header(scope, b"content-length")
        if value is None:
            return
        try:
            length = int(value)
        except ValueError:
            raise _HttpError(400, "invalid content-length header") from None
        if length > limit:
            raise _HttpError(413, f"request body of {length} bytes is over the limit of "
                                  f"{limit} bytes")

    @staticmethod
    async def _read_body(receive: Receive, limit: int) -> bytes:
        """The whole request body, refusing (413) as soon as it exceeds ``limit``."""
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


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _target_of(scope: Scope) -> bytes:
    """The request target as received: the raw path, then ``?`` and the raw query if
    there is one (what a device signs)."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    query = scope.get("query_string", b"")
    return bytes(raw) + b"?" + bytes(query) if query else bytes(raw)


async def _send_json(send: Send, status: int, obj: Any,
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
