"""``swarmota systemd-units``: the shipped systemd units, written for this install.

The units (``swarmota/systemd/``) name the command as ``@SWARMOTA@``; writing them puts
the absolute path of the ``swarmota`` command that runs this code in its place (a venv's
``bin/swarmota``, or ``/usr/bin/swarmota``), since systemd wants an absolute path.
Files are written atomically; a file that exists with other content is left alone
unless ``--force`` (an operator's edit is never overwritten silently).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from swarmota.infra.fsio import atomic_write_bytes

__all__ = ["PLACEHOLDER", "add_parser", "render_units", "swarmota_command"]

PLACEHOLDER = "@SWARMOTA@"


def swarmota_command() -> Path:
    """The absolute path of the ``swarmota`` command beside this interpreter (a venv's
    ``bin/``), else the one on ``PATH``.

    Raises:
        FileNotFoundError: neither exists.
    """
    beside = Path(sys.executable).parent / "swarmota"
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("swarmota")
    if found is None:
        raise FileNotFoundError("no swarmota command beside this Python or on PATH")
    return Path(found).absolute()


def render_units(command: Path) -> dict[str, bytes]:
    """Every shipped unit (and the sysusers.d file) by file name, ``@SWARMOTA@``
    replaced with ``command``."""
    if not command.is_absolute():
        raise ValueError(f"the swarmota command must be an absolute path, not {command}")
    units: dict[str, bytes] = {}
    for entry in resources.files("swarmota").joinpath("systemd").iterdir():
        if entry.name.startswith("swarmota"):
            text = entry.read_text(encoding="utf-8")
            units[entry.name] = text.replace(PLACEHOLDER, str(command)).encode()
    return dict(sorted(units.items()))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "systemd-units", help="write the systemd units of the tracker, origin and agent",
        description="List the shipped systemd units, or write them to --output (e.g. "
                    "/etc/systemd/system) with this install's swarmota command in "
                    "ExecStart: swarmota-tracker.service, swarmota-origin.service, "
                    "swarmota-timestamp.service and .timer (re-signs the timestamp every "
                    "6 hours), swarmota-agent.service (the device daemon), and "
                    "swarmota.sysusers (install as /etc/sysusers.d/swarmota.conf). "
                    "Then: systemd-sysusers; systemctl daemon-reload; systemctl enable "
                    "--now UNIT. See docs/OPERATIONS.md.")
    parser.add_argument("--output", type=Path, metavar="DIR",
                        help="write the units into DIR (it must exist)")
    parser.add_argument("--force", action="store_true",
                        help="replace files in DIR whose content differs")
    parser.set_defaults(func=_cmd_units)


def _cmd_units(args: argparse.Namespace) -> int:
    try:
        command = swarmota_command()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    units = render_units(command)
    if args.output is None:
        for name in units:
            print(name)
        print(f"(ExecStart uses {command}; write them with --output DIR)", file=sys.stderr)
        return 0
    directory: Path = args.output
    if not directory.is_dir():
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return 2
    differing = [name for name, data in units.items()
                 if (directory / name).exists() and (directory / name).read_bytes() != data]
    if differing and not args.force:
        print(f"error: {', '.join(differing)} in {directory} differ from the shipped "
              "units (edited?): kept; --force replaces them (prefer drop-ins: "
              "systemctl edit UNIT)", file=sys.stderr)
        return 1
    for name, data in units.items():
        try:
            atomic_write_bytes(directory / name, data, mode=0o644)
        except OSError as exc:
            print(f"error: cannot write {directory / name}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {directory / name}")
    return 0
