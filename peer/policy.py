"""Upload policy: may this device upload to peers now?

A device shares what it downloads only when that costs its owner nothing that matters:
never on a metered network (mobile data), never below a battery threshold. The battery
level comes from a file holding a percentage (e.g. ``/sys/class/power_supply/BAT0/
capacity``); a file that is configured but unreadable counts as "unknown": no upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from swarmota.peer.config import DeviceConfig

__all__ = ["UploadPolicy", "upload_policy"]


@dataclass(frozen=True)
class UploadPolicy:
    allowed: bool
    reason: str
    rate_limit_bytes_per_s: int


def upload_policy(config: DeviceConfig) -> UploadPolicy:
    """Decide from ``config`` (and the battery file it names) whether to upload."""
    limit = config.upload_rate_limit_bytes_per_s
    if config.network_metered:
        return UploadPolicy(False, "metered network", limit)
    if config.battery_percent_path:
        path = Path(config.battery_percent_path)
        try:
            percent = int(path.read_text().strip())
        except (OSError, ValueError) as exc:
            return UploadPolicy(False, f"battery level unknown ({path}: {exc})", limit)
        if percent < config.min_battery_percent_to_upload:
            return UploadPolicy(False, f"battery at {percent}%, below "
                                       f"{config.min_battery_percent_to_upload}%", limit)
    return UploadPolicy(True, "allowed", limit)
