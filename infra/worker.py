"""One worker thread that runs blocking work for trio tasks, in batches:
:class:`BatchWorker`.

Like ``trio.to_thread.run_sync(fn, limiter=CapacityLimiter(1))``, cheaper under load:
work is queued to one long-lived thread (no thread hand-over per call), the thread
takes what is queued (up to a batch) at once, and the results are handed back to trio
in one wakeup, not one each. The whole batch goes to one function, which may run the
items one after the other, or together (many commands to a server in one round trip,
many decisions in one transaction). Order is the order of submission. Work cannot be
cancelled once queued (as ``to_thread.run_sync`` without ``abandon_on_cancel``): the
waiting task sees its cancellation after its result arrives. The thread stops after
``idle_s`` without work and starts again on the next submission; it is a daemon
thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, TypeVar

import outcome
import trio

__all__ = ["BatchWorker"]

_Item = TypeVar("_Item")
BATCH: Final = 16
"""Work taken at once (bounds the latency a queue adds to the first one's answer)."""


class BatchWorker(Generic[_Item]):
    """A thread that hands queued items to ``run_batch`` a batch at a time;
    ``run_batch(items)`` returns one outcome per item, in order (see the module
    docstring). ``name`` names the thread."""

    def __init__(self, name: str,
                 run_batch: Callable[[Sequence[_Item]], Sequence[outcome.Outcome[Any]]], *,
                 idle_s: float = 10.0, batch: int = BATCH) -> None:
        self._name = name
        self._run_batch = run_batch
        self._idle_s = idle_s
        self._batch = batch
        self._jobs: queue.SimpleQueue[tuple[_Item, trio.lowlevel.Task,
                                            trio.lowlevel.TrioToken]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    async def submit(self, item: _Item) -> Any:
        """``item``'s result from ``run_batch`` (or its exception, raised here)."""
        job = (item, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        with self._lock:
            self._jobs.put(job)
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name=self._name, daemon=True).start()

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the work runs anyway; wait for it

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            try:
                taken = [jobs.get(timeout=self._idle_s)]
            except queue.Empty:
                with self._lock:
                    if jobs.empty():
                        self._running = False
                        return
                continue
            while len(taken) < self._batch:
                try:
                    taken.append(jobs.get_nowait())
                except queue.Empty:
                    break
            try:
                results = list(self._run_batch([item for item, _, _ in taken]))
                if len(results) != len(taken):
                    raise RuntimeError("run_batch must return one outcome per item")
            except BaseException as exc:  # a bug in run_batch: every waiter learns it
                results = [outcome.Error(exc)] * len(taken)
            by_token: dict[trio.lowlevel.TrioToken, list[Any]] = {}
            for (_, task, token), result in zip(taken, results, strict=True):
                by_token.setdefault(token, []).append((task, result))
            for token, woken in by_token.items():
                with contextlib.suppress(trio.RunFinishedError):  # nobody waits any more
                    token.run_sync_soon(_wake, woken)


def _wake(results: list[tuple[trio.lowlevel.Task, outcome.Outcome[Any]]]) -> None:
    for task, result in results:
        trio.lowlevel.reschedule(task, result)
