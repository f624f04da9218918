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
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SAFE_NAME_RE", "StepHook", "UnsafeNameError", "atomic_write_bytes",
           "atomic_write_json", "fsync_dir", "read_json", "safe_child"]

StepHook = Callable[[str], None]

SAFE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
"""A name that may become one path segment: 1-128 ASCII letters, digits, ``. _ + -``,
starting alphanumeric. So never empty, ``.``, ``..``, hidden, absolute, a separator
(``/`` or ``\\``), NUL, a control character or a non-ASCII lookalike."""


class UnsafeNameError(ValueError):
    """A name that is not one safe path segment (see :data:`SAFE_NAME_RE`)."""


def safe_child(directory: Path, name: str) -> Path:
    """``directory / name``, for a ``name`` that matches :data:`SAFE_NAME_RE`; the
    result is checked once more to be a direct child of ``directory`` (lexically: the
    caller owns ``directory``, and nothing from outside can make ``name`` a symlink).

    Raises:
        UnsafeNameError: ``name`` is not a safe name.
    """
    if not isinstance(name, str) or not SAFE_NAME_RE.fullmatch(name):
        raise UnsafeNameError(f"unsafe file name {str(name)[:80]!r}: expected 1-128 "
                              "chars of A-Z a-z 0-9 . _ + -, starting alphanumeric")
    path = directory / name
    if (path.parent != directory or path.name != name
            or os.path.dirname(os.path.abspath(path)) != os.path.abspath(directory)):
        raise UnsafeNameError(f"{name!r} does not stay inside {directory}")
    return path


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
