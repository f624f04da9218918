"""Identifier syntax shared by every component (pure).

One rule for device ids (and hardware ids): the device agent's configuration, the
device<->tracker wire format (:mod:`tracker.wire`), fleet identity certificates
(:mod:`infra.deviceauth`) and the tracker's admin API all use :data:`DEVICE_ID_RE`, so
an id one of them accepts is accepted by all.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["DEVICE_ID_RE", "DEVICE_ID_RULE"]

DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A device or hardware id: 1-128 characters of ``A-Z a-z 0-9 . _ : -``, starting with
a letter or digit (so that it is never an option, a dot-file or an empty name)."""

DEVICE_ID_RULE: Final = "1-128 chars of A-Z a-z 0-9 . _ : -, starting alphanumeric"
""":data:`DEVICE_ID_RE` in words, for error messages."""
