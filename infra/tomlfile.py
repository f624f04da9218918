"""Read a small TOML configuration file: size-limited, UTF-8, with its permission bits.

:func:`read_toml_file` is what every configuration file of ours goes through (the admin
client's ``client.toml``, the services' and the device's ``--config`` files); what the
keys mean is the caller's business. Errors are :class:`TomlFileError`, whose message
names the file.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = ["MAX_CONFIG_BYTES", "TomlFile", "TomlFileError", "read_toml_file"]

MAX_CONFIG_BYTES: Final = 64 * 1024


class TomlFileError(ValueError):
    """The file cannot be read, is too large, or is not TOML; the message names it."""


@dataclass(frozen=True)
class TomlFile:
    """A TOML file as read: its top-level table and its permission bits."""

    path: Path
    doc: dict[str, Any]
    mode: int


def read_toml_file(path: Path, *, what: str = "config file",
                   max_bytes: int = MAX_CONFIG_BYTES) -> TomlFile:
    """Read and parse ``path`` (``what`` names it in messages, e.g. "client config file").

    Raises:
        FileNotFoundError: ``path`` does not exist (the caller decides whether that is
            an error).
        TomlFileError: unreadable, larger than ``max_bytes``, not UTF-8 or not TOML.
    """
    try:
        with path.open("rb") as fh:
            mode = stat.S_IMODE(os.fstat(fh.fileno()).st_mode)
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TomlFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise TomlFileError(f"{path}: larger than {max_bytes} bytes: not a {what}")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TomlFileError(f"{path}: not a valid TOML file: {exc}") from None
    return TomlFile(path, doc, mode)
