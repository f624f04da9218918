"""Device side of the tracker API (see docs/ARCHITECTURE.md): check-in and report.

The bodies and answers are :mod:`tracker.wire`'s, the one definition both sides share.
The tracker is not trusted for integrity: an offer only names a release; everything
about it is verified against signed metadata afterwards.
"""

from __future__ import annotations

from typing import Any

from swarmota.peer.config import DeviceConfig
from swarmota.peer.errors import DownloadFailed
from swarmota.peer.http import HttpClient
from swarmota.tracker import wire
from swarmota.tracker.wire import (
    CheckIn,
    ComponentVersion,
    Offer,
    Report,
    WireError,
    checkin_to_json,
    report_to_json,
)

__all__ = ["Offer", "checkin", "parse_checkin_answer", "send_report"]


async def checkin(http: HttpClient, config: DeviceConfig, *, version: str,
                  release_counter: int, components: tuple[ComponentVersion, ...] = (),
                  ) -> tuple[Offer | None, int]:
    """Ask the tracker what to install. Returns ``(offer or None, poll_after_s)``.

    ``release_counter`` is the image's floor; ``components`` what the device runs of
    each component, each with its own counter (sent even when empty: it tells the
    tracker that this device keeps one floor per update kind and component).

    The answer's announce key, if any, is handed to ``http``
    (:meth:`~peer.http.HttpClient.use_announce_key`) for the announces that follow.

    Raises:
        DownloadFailed: the tracker cannot be reached, or answered a malformed offer or
            announce key.
    """
    body = checkin_to_json(CheckIn(
        device_id=config.device_id, product=config.product,
        hardware_id=config.hardware_id, version=version, release_counter=release_counter,
        network_id=config.network_id, region=config.region, labels=tuple(config.labels),
        components=components))
    answer = await http.post_json(_url(config, "checkin"), body)
    chosen = parse_checkin_answer(answer)
    try:
        http.use_announce_key(wire.parse_announce_key(answer))
    except WireError as exc:
        raise DownloadFailed(str(exc)) from None
    return chosen


def parse_checkin_answer(answer: object) -> tuple[Offer | None, int]:
    """:func:`tracker.wire.parse_checkin_answer`, its refusal a transport failure.

    Raises:
        DownloadFailed: the answer or its offer is malformed.
    """
    try:
        return wire.parse_checkin_answer(answer)
    except WireError as exc:
        raise DownloadFailed(str(exc)) from None


async def send_report(http: HttpClient, config: DeviceConfig, report: dict[str, Any]) -> None:
    """Deliver a report (the outbox's body: everything but the device's id and product);
    raises ``DownloadFailed`` if the tracker did not take it."""
    fields = {"device_id": config.device_id, "product": config.product, **report}
    body = report_to_json(Report(**fields))
    await http.post_json(_url(config, "report"), body)


def _url(config: DeviceConfig, what: str) -> str:
    return f"{config.tracker_url.rstrip('/')}/v1/{what}"
