"""Device side of the tracker API (see docs/ARCHITECTURE.md): check-in and report.

The tracker is not trusted for integrity: an offer only names a release; everything
about it is verified against signed metadata afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from manifest import ManifestFormatError, release_target_name
from peer.config import DeviceConfig
from peer.errors import DownloadFailed
from peer.http import HttpClient

__all__ = ["Offer", "checkin", "parse_checkin_answer", "send_report"]

_COUNTER_MAX = 2**53
_POLL_MAX_S = 7 * 86400


@dataclass(frozen=True)
class Offer:
    product: str
    version: str
    release_counter: int
    target: str
    poll_after_s: int


async def checkin(http: HttpClient, config: DeviceConfig, *, version: str,
                  release_counter: int) -> tuple[Offer | None, int]:
    """Ask the tracker what to install. Returns ``(offer or None, poll_after_s)``."""
    body: dict[str, Any] = {
        "device_id": config.device_id, "product": config.product,
        "hardware_id": config.hardware_id, "version": version,
        "release_counter": release_counter,
    }
    if config.network_id is not None:  # optional: only trackers with LAN-first know them
        body["network_id"] = config.network_id
    if config.region is not None:
        body["region"] = config.region
    if config.labels:
        body["labels"] = list(config.labels)
    answer = await http.post_json(_url(config, "checkin"), body)
    return parse_checkin_answer(answer)


def parse_checkin_answer(answer: Mapping[str, Any]) -> tuple[Offer | None, int]:
    """The offer (or ``None``) and the poll interval in a check-in answer (pure).

    A missing or invalid ``poll_after_s`` (not an integer within 0..7 days) means 3600 s.
    The offer's product and version are validated as in a release manifest, its target
    must be the one they name, and its counter an integer within 0..2^53.

    Raises:
        DownloadFailed: the offer is malformed.
    """
    poll = answer.get("poll_after_s", 3600)
    poll_after_s = (poll if isinstance(poll, int) and not isinstance(poll, bool)
                    and 0 <= poll <= _POLL_MAX_S else 3600)
    release = answer.get("release")
    if release is None:
        return None, poll_after_s
    if not isinstance(release, dict):
        raise DownloadFailed("tracker answered a malformed release offer")
    product, version, counter = (release.get("product"), release.get("version"),
                                 release.get("release_counter"))
    if not isinstance(product, str) or not isinstance(version, str):
        raise DownloadFailed("tracker answered a malformed release offer: product and "
                             "version must be strings")
    try:
        target = release_target_name(product, version)
    except ManifestFormatError as exc:
        raise DownloadFailed(f"tracker answered a malformed release offer: {exc}") from None
    if (not isinstance(counter, int) or isinstance(counter, bool)
            or not 0 <= counter <= _COUNTER_MAX):
        raise DownloadFailed("tracker answered a malformed release counter")
    if release.get("target") != target:
        raise DownloadFailed(f"tracker offered target {str(release.get('target'))[:200]!r}, "
                             f"expected {target!r}")
    return Offer(product, version, counter, target, poll_after_s), poll_after_s


async def send_report(http: HttpClient, config: DeviceConfig, report: dict[str, Any]) -> None:
    """Deliver a report; raises ``DownloadFailed`` if the tracker did not take it."""
    body = {"device_id": config.device_id, "product": config.product, **report}
    await http.post_json(_url(config, "report"), body)


def _url(config: DeviceConfig, what: str) -> str:
    return f"{config.tracker_url.rstrip('/')}/v1/{what}"
