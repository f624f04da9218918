"""Durable file operations: atomic replace, fsync of files and directories.

Every file that matters is written as: temp file in the same directory, write, fsync,
``os.replace`` over the target, fsync the directory. A crash at any instant leaves
either the old or the new content, never a mix.

``hook`` (optional) is called with the name of each step as it is reached:
``before_fsync``, ``after_fsync``, ``before_rename``, ``after_rename``,
``after_dir_fsync``. Callers use it to observe or interrupt a write at every step (the
device agent's crash points); this module gives the names no meaning.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["StepHook", "atomic_write_bytes", "atomic_write_json", "fsync_dir", "read_json"]

StepHook = Callable[[str], None]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that renames inside it survive power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644,
                       hook: StepHook | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably (``hook``: see module)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            if hook is not None:
                hook("before_fsync")
            os.fsync(fh.fileno())
            if hook is not None:
                hook("after_fsync")
        if hook is not None:
            hook("before_rename")
        os.replace(tmp, target)
        if hook is not None:
            hook("after_rename")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
    if hook is not None:
        hook("after_dir_fsync")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, mode: int = 0o644,
                      hook: StepHook | None = None) -> None:
    """Write ``obj`` as pretty, sorted JSON with :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(),
                       mode=mode, hook=hook)


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, "rb") as fh:
        return json.loads(fh.read())
