"""Post-switch health check of the new slot.

With a configured command, it runs with a timeout and these environment variables:
``SWARMOTA_SLOT`` (a/b), ``SWARMOTA_SLOT_IMAGE`` (path), ``SWARMOTA_VERSION``; exit code
0 means healthy. Before it, the built-in check re-reads the slot image and compares
its SHA-256 with the boot-control record (catches damage after writing).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from peer.bootctl import SlotRecord
from peer.errors import PostCheckFailed

__all__ = ["run_health_check"]


async def run_health_check(command: Sequence[str], *, slot: str, image: Path,
                           record: SlotRecord, timeout_s: float,
                           read_back: Callable[[], tuple[int, str]]) -> None:
    """Return if the slot is healthy; raise ``PostCheckFailed`` otherwise.
    ``read_back()`` gives ``(size, sha256)`` of the slot's image as storage holds it."""
    try:
        size, sha = await trio.to_thread.run_sync(read_back)
    except OSError as exc:
        raise PostCheckFailed(f"slot {slot} image cannot be read: {exc}") from exc
    if size != record.size or sha != record.sha256:
        raise PostCheckFailed(f"slot {slot} image does not match its boot-control record "
                              f"(sha256 {sha})")
    if not command:
        return
    env = dict(os.environ, SWARMOTA_SLOT=slot, SWARMOTA_SLOT_IMAGE=str(image),
               SWARMOTA_VERSION=record.version or "")
    try:
        with trio.fail_after(timeout_s):
            result = await trio.run_process(list(command), env=env, check=False,
                                            capture_stdout=True, capture_stderr=True)
    except trio.TooSlowError:
        raise PostCheckFailed(f"health check timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise PostCheckFailed(f"health check could not run: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or b"").decode(errors="replace")[-300:]
        raise PostCheckFailed(f"health check exited {result.returncode}: {tail.strip()}")
