"""The device API (``POST /v1/checkin``, ``POST /v1/report``) over a director, for both
front ends: the ASGI app (:mod:`tracker.app`) and the lean endpoint
(:mod:`tracker.announce_server`), which call :func:`answer_device` and never each
other. It checks the request's identity, parses the body (:mod:`tracker.wire`), asks
the :class:`~tracker.director.Director` and encodes the JSON answer; errors are
``{"error": ...}`` with 400 (the wire format refuses the body), 401 (identity, with
``www-authenticate``) or 500 (storage). It never raises on bad input.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Final

from swarmota.tracker.director import Director
from swarmota.tracker.errors import RequestError, StorageError
from swarmota.tracker.identity import DeviceRefused
from swarmota.tracker.wire import WireError, encode_json, parse_checkin, parse_report

__all__ = ["DEVICE_PATHS", "answer_device"]

DEVICE_PATHS: Final = ("/v1/checkin", "/v1/report")

log = logging.getLogger(__name__)

Headers = tuple[tuple[bytes, bytes], ...]


async def answer_device(director: Director, path: str, target: bytes, body: bytes,
                        headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, bytes, Headers]:
    """``(HTTP status, JSON body, extra headers)`` answering ``POST path`` with ``body``
    (at most the config's ``max_body_bytes``: the front end enforces it). ``target``
    is the request target as received and ``headers`` the request's headers (lower-case
    names): with a fleet CA configured, the request must be signed over them.

    Raises:
        RuntimeError: ``path`` is not one of :data:`DEVICE_PATHS` (a bug).
    """
    if path not in DEVICE_PATHS:
        raise RuntimeError(f"{path!r} is not a device route")
    counters = director.counters
    limit = director.config.max_body_bytes
    try:
        auth = await director.authenticate("POST", target, body, headers,
                                           lambda: _claimed_in_body(body))
        if path == "/v1/checkin":
            checkin = parse_checkin(body, max_bytes=limit)
            answer = (await director.checkin(checkin, auth)).to_json()
        else:
            await director.report(parse_report(body, max_bytes=limit), auth)
            answer = {"ok": True}
        return 200, encode_json(answer), ()
    except DeviceRefused as exc:
        counters.add("errors")
        director.refused(exc, f"POST {path}")
        return 401, encode_json({"error": exc.message}), (
            (b"www-authenticate", b"swarmota-signature"),)
    except (RequestError, WireError) as exc:
        counters.add("errors")
        return 400, encode_json({"error": str(exc)}), ()
    except StorageError:
        counters.add("errors")
        log.exception("tracker storage failed on POST %s", path)
        return 500, encode_json({"error": "tracker storage failure"}), ()


def _claimed_in_body(body: bytes) -> str | None:
    """The ``device_id`` a JSON body claims, if it is readable (for the log only)."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    claimed = obj.get("device_id") if isinstance(obj, dict) else None
    return claimed if isinstance(claimed, str) else None
