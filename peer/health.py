"""Post-switch health check of the new slot (or component).

With a configured command, it runs with a timeout and these environment variables:
``SWARMOTA_SLOT`` (a/b, or ``component:<name>``), ``SWARMOTA_SLOT_IMAGE`` (path),
``SWARMOTA_VERSION``; exit code 0 means healthy. Before it, the built-in check re-reads
the slot image and compares its SHA-256 with the boot-control record (catches damage
after writing).

A verdict may also come from outside while the command runs: the local API's
``MarkGood`` and ``RollBack`` (``peer.dbus_service``) hand one to
:class:`ExternalVerdicts`; the first of the command and that verdict decides, the other
is cancelled. The built-in image check is never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from swarmota.peer.bootctl import SlotRecord
from swarmota.peer.errors import PostCheckFailed

__all__ = ["ExternalVerdict", "ExternalVerdicts", "run_health_check", "run_health_command"]


@dataclass(frozen=True)
class ExternalVerdict:
    healthy: bool
    reason: str  # who decided, for the report ("marked good over D-Bus by uid 0")


class ExternalVerdicts:
    """Rendezvous between a running health check and whoever may decide it from outside.

    One owner (the agent's event loop): :meth:`expecting` is entered by the health check
    while its command runs; :meth:`deliver` (from the same trio loop) hands it a verdict.
    """

    def __init__(self) -> None:
        self._send: trio.MemorySendChannel[ExternalVerdict] | None = None
        self.waiting_for: str | None = None  # the slot or component being checked

    @contextmanager
    def expecting(self, what: str) -> Iterator[trio.MemoryReceiveChannel[ExternalVerdict]]:
        if self._send is not None:
            raise RuntimeError("two health checks at once")
        send, receive = trio.open_memory_channel[ExternalVerdict](1)
        self._send, self.waiting_for = send, what
        try:
            yield receive
        finally:
            self._send, self.waiting_for = None, None
            send.close()
            receive.close()

    def deliver(self, verdict: ExternalVerdict) -> bool:
        """Hand ``verdict`` to the health check in progress; False if none is waiting
        (or one verdict was delivered already)."""
        if self._send is None:
            return False
        try:
            self._send.send_nowait(verdict)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True


async def run_health_check(command: Sequence[str], *, slot: str, image: Path,
                           record: SlotRecord, timeout_s: float,
                           read_back: Callable[[], tuple[int, str]],
                           verdicts: ExternalVerdicts | None = None,
                           env: dict[str, str] | None = None) -> None:
    """Return if the slot is healthy; raise ``PostCheckFailed`` otherwise.
    ``read_back()`` gives ``(size, sha256)`` of the slot's image as storage holds it;
    ``verdicts``: an outside verdict may end the command early (either way); ``env``:
    more environment variables for the command."""
    try:
        size, sha = await trio.to_thread.run_sync(read_back)
    except OSError as exc:
        raise PostCheckFailed(f"slot {slot} image cannot be read: {exc}") from exc
    if size != record.size or sha != record.sha256:
        raise PostCheckFailed(f"slot {slot} image does not match its boot-control record "
                              f"(sha256 {sha})")
    environ = {**(env or {}), "SWARMOTA_SLOT": slot, "SWARMOTA_SLOT_IMAGE": str(image),
               "SWARMOTA_VERSION": record.version or ""}
    if not command:
        return
    if verdicts is None:
        await run_health_command(command, env=environ, timeout_s=timeout_s)
        return
    outcome: list[ExternalVerdict | PostCheckFailed | None] = []
    with verdicts.expecting(slot) as external:
        async with trio.open_nursery() as nursery:
            async def by_command() -> None:
                try:
                    await run_health_command(command, env=environ, timeout_s=timeout_s)
                    outcome.append(None)
                except PostCheckFailed as exc:
                    outcome.append(exc)
                nursery.cancel_scope.cancel()

            async def from_outside() -> None:
                outcome.append(await external.receive())
                nursery.cancel_scope.cancel()

            nursery.start_soon(by_command)
            nursery.start_soon(from_outside)
    if outcome[0] is None:
        return
    first = outcome[0]
    if isinstance(first, PostCheckFailed):
        raise first
    if not first.healthy:
        raise PostCheckFailed(first.reason)


async def run_health_command(command: Sequence[str], *, env: dict[str, str],
                             timeout_s: float, what: str = "health check") -> None:
    """Run ``command`` (with ``env`` added to the environment) within ``timeout_s``;
    raise ``PostCheckFailed`` naming ``what`` if it fails, cannot run or times out."""
    try:
        with trio.fail_after(timeout_s):
            result = await trio.run_process(list(command), env={**os.environ, **env},
                                            check=False, capture_stdout=True,
                                            capture_stderr=True)
    except trio.TooSlowError:
        raise PostCheckFailed(f"{what} timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise PostCheckFailed(f"{what} could not run: {exc}") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or b"").decode(errors="replace")[-300:]
        raise PostCheckFailed(f"{what} exited {result.returncode}: {tail.strip()}")
