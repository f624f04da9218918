"""The end of the agent's log of one update attempt, for its report (bounded).

A failed update's report carries what the agent logged during that attempt (its last
:data:`~tracker.wire.MAX_LOG_TAIL_BYTES` bytes), so that an operator can read why a
device failed without reaching the device. :class:`AttemptLog` listens to the agent's
loggers (``peer.*``) for the length of a pass, at INFO and above whatever the console
shows: it lowers the ``peer`` logger's level for the pass only, which changes nothing
on the console as long as the console's handlers carry their own level (``swarmota``'s
command line sets them).
"""

from __future__ import annotations

import collections
import logging
import threading
from types import TracebackType

from swarmota.tracker.wire import MAX_LOG_TAIL_BYTES

__all__ = ["AttemptLog"]

_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class AttemptLog(logging.Handler):
    """A context manager that records ``logger``'s lines (and its children's) at
    ``level`` and above, keeping the last ``max_bytes`` bytes of UTF-8 text.

    Control characters other than newline and tab are escaped (a message may quote
    what a hostile server sent), so the text is safe to show and to send.
    """

    def __init__(self, logger: str = __name__.rpartition(".")[0], *, level: int = logging.INFO,
                 max_bytes: int = MAX_LOG_TAIL_BYTES) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(_FORMAT))
        self._logger = logging.getLogger(logger)
        self._max_bytes = max_bytes
        self._lines: collections.deque[str] = collections.deque()
        self._size = 0
        self._guard = threading.Lock()
        self._saved_level = logging.NOTSET

    def __enter__(self) -> AttemptLog:
        self._saved_level = self._logger.level
        if self._logger.getEffectiveLevel() > self.level:
            self._logger.setLevel(self.level)
        self._logger.addHandler(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved_level)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = _printable(self.format(record)) + "\n"
        except Exception:  # a broken record must not break the update
            self.handleError(record)
            return
        size = len(line.encode("utf-8"))
        with self._guard:
            self._lines.append(line)
            self._size += size
            while self._size > self._max_bytes and len(self._lines) > 1:
                self._size -= len(self._lines.popleft().encode("utf-8"))

    def text(self) -> str:
        """The lines recorded so far, at most ``max_bytes`` bytes of UTF-8 (a single
        line over the bound keeps its end)."""
        with self._guard:
            text = "".join(self._lines)
        data = text.encode("utf-8")
        if len(data) <= self._max_bytes:
            return text
        return data[-self._max_bytes:].decode("utf-8", errors="ignore")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}"
                   for c in text)
