"""``swarmota peer run``: the agent as a daemon.

    loop: update pass (peer.agent.update_once) -> sleep -> ...

- after a pass that went fine (updated, nothing offered, or deferred by policy): sleep
  the poll interval (the configured one, else what the tracker asked for, but never
  less than ``min_poll_after_s``: a tracker answering 0 must not make the device poll in
  a loop), with random jitter of ``jitter_fraction`` either way so that a fleet does
  not poll in lockstep;
- after a failure (check-in failed, or an attempt failed): exponential backoff from
  ``backoff_initial_s`` up to ``backoff_max_s`` (also jittered), reset by a good pass;
- a release whose attempts failed ``retry_budget`` times is not attempted again until
  the tracker offers another one, or ``retry_window_s`` after the oldest of those
  failures (``update_once(retry_budget=..., retry_window_s=...)``); failed downloads do
  not count (an outage is no verdict on the release);
- a resource failure (a full disk, an I/O error, no memory) or a failing TPM (gone,
  busy, refusing a command: ``peer.tpm.TpmError``) is a failed pass like any other
  (backoff), never the end of the daemon; only an unusable device (``ConfigError``) is;
- cancellation (``peer run`` turns SIGTERM and SIGINT into it) ends the loop: while
  sleeping at once; in a pass, at the next checkpoint, except between the switch and the
  health check's outcome, which is shielded (bounded by the health timeout). Whatever is
  interrupted is picked up from the journal on the next start;
- with a ``control`` (``peer.control.AgentControl``, the local API's), a client's
  ``CheckNow``, ``InstallNow`` or ``RollBack`` of a switch waiting for its reboot ends
  the sleep at once (asked during a pass: right after it), and every pass posts its
  progress to the control's status board.

:func:`next_delay_s` is the pure part (values in, seconds out).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio

from swarmota.peer.agent import UpdateResult, update_once
from swarmota.peer.control import AgentControl
from swarmota.peer.errors import ConfigError, PeerError, StatusCode, resource_failure
from swarmota.peer.state import DeviceState

__all__ = ["DaemonConfig", "next_delay_s", "run_daemon"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonConfig:
    poll_interval_s: float | None = None  # None: the tracker's poll_after_s
    jitter_fraction: float = 0.1
    backoff_initial_s: float = 30.0
    backoff_max_s: float = 3600.0
    retry_budget: int = 3
    retry_window_s: float = 6 * 3600.0
    min_poll_after_s: float = 30.0  # floor of the tracker's poll_after_s
    seed_time_s: float | None = None  # None: the device's

    def __post_init__(self) -> None:
        if self.poll_interval_s is not None and self.poll_interval_s <= 0:
            raise ConfigError("poll interval must be > 0")
        if not 0 <= self.jitter_fraction < 1:
            raise ConfigError("jitter fraction must be within [0, 1)")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ConfigError("backoff: need 0 < initial <= max")
        if self.retry_budget < 1:
            raise ConfigError("retry budget must be >= 1")
        if self.retry_window_s <= 0 or self.min_poll_after_s < 0:
            raise ConfigError("retry window must be > 0 and the minimum poll interval >= 0")


def failed(result: UpdateResult) -> bool:
    """A pass that should be retried sooner than the poll interval, with backoff."""
    return result.status != StatusCode.OK


def next_delay_s(config: DaemonConfig, result: UpdateResult, failures_in_row: int,
                 rand: Callable[[], float]) -> float:
    """Seconds to sleep after ``result``; ``failures_in_row`` counts it if it failed;
    ``rand()`` is uniform in [0, 1)."""
    if failures_in_row:
        base = min(config.backoff_max_s,
                   config.backoff_initial_s * float(2 ** min(failures_in_row - 1, 32)))
    elif config.poll_interval_s is not None:
        base = config.poll_interval_s
    else:
        base = max(config.min_poll_after_s, float(result.poll_after_s))
    return max(0.0, base * (1 + config.jitter_fraction * (2 * rand() - 1)))


async def run_daemon(state: DeviceState, config: DaemonConfig, *,
                     rand: Callable[[], float] = random.random,
                     on_result: Callable[[UpdateResult, float], None] | None = None,
                     control: AgentControl | None = None) -> None:
    """Run update passes forever (until cancelled). ``on_result(result, delay_s)`` is
    called after each pass; ``control``: the local API's requests and status board.

    Raises:
        ConfigError: the device state is unusable (the loop cannot help that).
    """
    failures_in_row = 0
    while True:
        try:
            if control is None:
                result = await update_once(state, seed_time_s=config.seed_time_s,
                                           retry_budget=config.retry_budget,
                                           retry_window_s=config.retry_window_s)
            else:
                request = control.pass_started()
                try:
                    result = await update_once(control.observed(),
                                               seed_time_s=config.seed_time_s,
                                               retry_budget=config.retry_budget,
                                               retry_window_s=config.retry_window_s,
                                               requests=request)
                finally:
                    control.pass_finished()
        except (OSError, MemoryError) as exc:  # update_once turns them into statuses;
            failure = resource_failure("update pass", exc)  # the daemon lives on anyway
            log.error("%s", failure)
            result = UpdateResult(failure.status, str(failure))
        except PeerError as exc:  # the same: only an unusable device ends the daemon
            if isinstance(exc, ConfigError):
                raise
            log.error("update pass: %s", exc)
            result = UpdateResult(exc.status, str(exc))
        failures_in_row = failures_in_row + 1 if failed(result) else 0
        delay = next_delay_s(config, result, failures_in_row, rand)
        log.info("pass: status %d: %s; next in %.0f s", result.status, result.message, delay)
        if on_result is not None:
            on_result(result, delay)
        if control is None:
            await trio.sleep(delay)
        else:
            await control.wait_for_request(delay)
