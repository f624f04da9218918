"""Device configuration, stored as ``STATE/device.json``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from infra.fsio import atomic_write_json
from manifest import ManifestFormatError, validate_product
from peer.errors import ConfigError

__all__ = ["DeviceConfig", "load_config", "save_config"]

_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class DeviceConfig:
    """Everything a device needs to know besides its trusted root and its slots."""

    device_id: str
    product: str
    hardware_id: str
    origin_url: str
    tracker_url: str
    health_command: tuple[str, ...] = ()
    health_timeout_s: float = 60.0
    download_concurrency: int = 4
    chunk_attempts: int = 4
    http_timeout_s: float = 30.0
    retry_backoff_s: float = 0.2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _DEVICE_ID_RE.fullmatch(self.device_id):
            raise ConfigError(f"invalid device id {self.device_id!r}")
        try:
            validate_product(self.product)
        except ManifestFormatError as exc:
            raise ConfigError(str(exc)) from None
        if not _DEVICE_ID_RE.fullmatch(self.hardware_id):
            raise ConfigError(f"invalid hardware id {self.hardware_id!r}")
        for name in ("origin_url", "tracker_url"):
            url = urlsplit(getattr(self, name))
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError(f"{name} must be an http(s) URL, got {getattr(self, name)!r}")
        if not 1 <= self.download_concurrency <= 64:
            raise ConfigError("download_concurrency must be within 1..64")
        if not 1 <= self.chunk_attempts <= 100:
            raise ConfigError("chunk_attempts must be within 1..100")
        if self.health_timeout_s <= 0 or self.http_timeout_s <= 0:
            raise ConfigError("timeouts must be positive")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["health_command"] = list(self.health_command)
        return out


def save_config(path: Path, config: DeviceConfig) -> None:
    atomic_write_json(path, config.to_json())


def load_config(path: Path) -> DeviceConfig:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run 'swarmota peer init' first") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    raw["health_command"] = tuple(raw.get("health_command", ()))
    try:
        return DeviceConfig(**raw)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
