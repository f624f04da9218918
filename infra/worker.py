"""One worker thread that runs blocking calls one at a time for trio tasks:
:class:`SerialWorker`.

Like ``trio.to_thread.run_sync(fn, limiter=CapacityLimiter(1))``, cheaper under load:
calls are queued to one long-lived thread (no thread hand-over per call), and the
results of the calls it ran back to back are handed to trio in one wakeup, not one
each. The order of calls is the order of :meth:`SerialWorker.run`. A call cannot be
cancelled once queued (as ``to_thread.run_sync`` without ``abandon_on_cancel``): the
waiting task sees its cancellation after the call returns. The thread stops after
``idle_s`` without work and starts again on the next call; it is a daemon thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

import outcome
import trio

__all__ = ["SerialWorker"]

_T = TypeVar("_T")
_BATCH: Final = 16
"""Calls run back to back before their results are handed over (bounds the latency a
queue adds to the first one's answer)."""

_Job = tuple[Callable[[], Any], trio.lowlevel.Task, trio.lowlevel.TrioToken]


class SerialWorker:
    """A thread running blocking calls one at a time (see the module docstring).
    ``name`` names the thread."""

    def __init__(self, name: str, *, idle_s: float = 10.0) -> None:
        self._name = name
        self._idle_s = idle_s
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    async def run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` in the worker thread; its result, or its exception raised here."""
        job = (fn, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        with self._lock:
            self._jobs.put(job)
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name=self._name, daemon=True).start()

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the call runs anyway; wait for it

        result: _T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if jobs.empty():
                        self._running = False
                        return
                continue
            done = [(job, outcome.capture(job[0]))]
            while len(done) < _BATCH:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                done.append((job, outcome.capture(job[0])))
            by_token: dict[trio.lowlevel.TrioToken, list[Any]] = {}
            for (_, task, token), result in done:
                by_token.setdefault(token, []).append((task, result))
            for token, results in by_token.items():
                with contextlib.suppress(trio.RunFinishedError):  # nobody waits any more
                    token.run_sync_soon(_wake, results)


def _wake(results: list[tuple[trio.lowlevel.Task, outcome.Outcome[Any]]]) -> None:
    for task, result in results:
        trio.lowlevel.reschedule(task, result)
