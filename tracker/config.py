"""Configuration of the tracker service."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infra.http_serve import ListenConfig

__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_POLL_AFTER_S", "TrackerConfig"]

DEFAULT_POLL_AFTER_S = 3600
DEFAULT_MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class TrackerConfig:
    """Everything ``serve_tracker`` needs.

    Attributes:
        db_path: the SQLite database file (created, with its parent directory, if missing).
        listen: address and TLS settings; port 0 lets the kernel pick a free port.
        poll_after_s: seconds a device should wait before its next check-in.
        max_body_bytes: hard limit on a request body; larger bodies get HTTP 413.

    Raises:
        ValueError: ``poll_after_s`` outside 0..604800 or ``max_body_bytes`` outside
            1..16 MiB (a programming or command-line validation error).
    """

    db_path: Path
    listen: ListenConfig = field(default_factory=ListenConfig)
    poll_after_s: int = DEFAULT_POLL_AFTER_S
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if not 0 <= self.poll_after_s <= 7 * 24 * 3600:
            raise ValueError(f"poll_after_s must be within 0..604800, got {self.poll_after_s}")
        if not 1 <= self.max_body_bytes <= 16 * 1024 * 1024:
            raise ValueError(f"max_body_bytes must be within 1..16 MiB, got {self.max_body_bytes}")
